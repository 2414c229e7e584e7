#!/usr/bin/env python3
"""Hold N idle TCP connections open to HOST:PORT (the memory-per-idle-flow test).

Run by ``scripts/bench`` inside the client namespace. Connects in batches
(so no listen queue on the way overflows), with ``--request`` sends one
keep-alive HTTP request on each and reads its reply, prints ``connected N``,
then holds them, sending nothing, until stdin closes or a signal arrives;
then closes them all and exits. Plain blocking Python:
nothing here is measured but the proxy in between.
"""

from __future__ import annotations

import argparse
import errno
import resource
import selectors
import signal
import socket
import sys
import time

BATCH = 256


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))


def open_flows(host: str, port: int, count: int, deadline: float) -> list[socket.socket]:
    """``count`` connected sockets, opened BATCH at a time; raises on failure or timeout."""
    held: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        while len(held) < count:
            pending = []
            for _ in range(min(BATCH, count - len(held))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                rc = s.connect_ex((host, port))
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    raise OSError(rc, f"connect: {errno.errorcode.get(rc, rc)}")
                sel.register(s, selectors.EVENT_WRITE)
                pending.append(s)
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(held)} of {count} flows connected")
                for key, _ in sel.select(timeout=min(left, 1.0)):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    sel.unregister(s)
                    pending.remove(s)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
                    held.append(s)
        return held
    except BaseException:
        for s in held:
            s.close()
        raise
    finally:
        sel.close()


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def one_request_each(held: list[socket.socket], deadline: float) -> None:
    """One keep-alive request and its whole reply on every flow, so that every proxy
    has really set the flow up (some connect upstream only when data arrives)."""
    for s in held:
        s.setblocking(True)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        s.sendall(REQUEST)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"\n"):
            data = s.recv(4096)
            if not data:
                raise OSError("the server closed a flow")
            reply += data
            if len(reply) > 65536:
                raise OSError("reply too long")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--request", action="store_true", help="one HTTP request per flow first")
    args = p.parse_args()
    _raise_nofile(args.count + 100)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    deadline = time.monotonic() + args.timeout
    held = open_flows(args.host, args.port, args.count, deadline)
    if args.request:
        one_request_each(held, deadline)
    print(f"connected {len(held)}", flush=True)
    try:
        sys.stdin.read()  # until the bench closes our stdin
    finally:
        for s in held:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
