"""Small steps the relay tests take on the outer ends of a relayed TCP pair."""

from __future__ import annotations

import socket
import struct

import trio

_LINGER_RESET = struct.pack("ii", 1, 0)


async def read_all(stream: trio.abc.ReceiveStream, *, timeout: float = 10.0) -> bytes:
    """Everything until end of stream; fails instead of hanging after ``timeout`` seconds."""
    chunks = []
    with trio.fail_after(timeout):
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks)


async def send_and_eof(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data``, then end of stream (FIN)."""
    if data:
        await stream.send_all(data)
    await stream.send_eof()


def reset(stream: trio.SocketStream) -> None:
    """Close so that the peer sees RST (SO_LINGER 0), at once."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    stream.socket.close()
