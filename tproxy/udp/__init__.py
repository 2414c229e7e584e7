"""Transparent UDP proxying: sessions per (client, original destination), datagram hooks.

- :mod:`.sockets`: the diverted listener, session and reply sockets;
- :mod:`.chain`: :class:`DatagramChain`, interceptors fed whole datagrams;
- :mod:`.relay`: :class:`UdpRelay`, the session table (idle expiry, cap);
- :mod:`.door`: ``tproxy run``'s options and the listeners next to the TCP server.
"""

from __future__ import annotations

from .chain import DatagramChain, DatagramOutput

__all__ = ["DatagramChain", "DatagramOutput"]
