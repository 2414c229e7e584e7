#!/usr/bin/env python3
"""What tproxy.http costs per keep-alive request, sans-io (no sockets, one core).

Feeds N request/response pairs through a chain, as the engine would, for:
a plain Interceptor (the floor: the chain's own cost), an HttpInterceptor
that changes nothing (framing, parsing, forwarding the original bytes), and
one that rewrites every response body (re-serialising with a new length).
Prints microseconds per request and requests per second, for a small and a
64 KiB response body, plain and chunked. Standalone (not part of
scripts/bench, which belongs to the core's measurements):

    .venv/bin/python scripts/bench_http.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import time

from tproxy import Interceptor
from tproxy.http import HttpInterceptor, Request, Response
from tproxy.testing import Driver

REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: server.test\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n\r\n"
)


def response(size: int, chunked: bool) -> bytes:
    body = (b"hello world " * (size // 12 + 1))[:size]
    if chunked:
        parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + framed
        )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Rewrite(HttpInterceptor):
    def response(self, req: Request, resp: Response) -> None:
        resp.body = resp.body.replace(b"world", b"WORLD")


def run(cls: type[Interceptor], reply: bytes, requests: int, read: int) -> float:
    """Seconds per request: the request in one read, the response in ``read``-byte reads."""
    d = Driver(cls)
    pieces = [reply[i : i + read] for i in range(0, len(reply), read)]
    start = time.perf_counter()
    for _ in range(requests):
        d.client(REQUEST)
        for piece in pieces:
            d.server(piece)
        d.to_client = d.to_server = b""  # the engine would have sent them
    return (time.perf_counter() - start) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'body':>12} {'framing':>8} {'interceptor':>22} {'us/request':>11} {'req/s':>9}")
    for size in (1024, 65536):
        for chunked in (False, True):
            reply = response(size, chunked)
            n = args.requests if size < 10000 else max(1, args.requests // 10)
            for name, cls in (
                ("Interceptor (floor)", Interceptor),
                ("HttpInterceptor", HttpInterceptor),
                ("body rewrite", Rewrite),
            ):
                seconds = run(cls, reply, n, read=16384)
                print(
                    f"{size:>12} {'chunked' if chunked else 'length':>8} {name:>22} "
                    f"{seconds * 1e6:>11.1f} {1 / seconds:>9.0f}"
                )


if __name__ == "__main__":
    main()
