"""Port specifications for routing plans (``--port``, ``--udp-port``).

The syntax and its errors live in :mod:`tproxy.ports`, shared with every
other place that reads ports; this module keeps the names the routing code
imports. A spec becomes sorted, merged :class:`PortRange` values so that two
specs naming the same ports give the same plan, and each range becomes one
iptables ``--dport``/``--sport`` match or one nft range.
"""

from __future__ import annotations

from ..ports import PortRange, PortSpecError, parse_port, parse_ports

__all__ = ["PortRange", "PortSpecError", "parse_port", "parse_ports"]
