#!/usr/bin/env python3
"""A TCP client for end-to-end tests of the engine, run inside the client namespace.

Each subcommand connects to HOST PORT (usually the echo server in the server
namespace, reached through the gateway), does one thing, and prints one JSON
object on stdout that the test checks. Standard library only. Every wait is
bounded by ``--timeout``.

- ``peer``: the local address and the ``PEER`` line the server answers with.
- ``bulk --size N``: sends N pseudo-random bytes while reading the echo;
  SHA-256 of both ways.
- ``halfclose --size N``: sends N bytes, shuts down writing, reads to EOF.
- ``expect-reset``: connects and reads; reports whether a reset came.
- ``many --count N``: N concurrent connections, each sends and reads back.
- ``stream --seconds S``: sends forever (bounded by S) and reports how it ended.
- ``http10 [--source-port P]``: one HTTP/1.0 GET (the server closes first),
  from local port P if given; the status line and the local address.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time


def connect(host: str, port: int, timeout: float, source_port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
    sock.connect((host, port))
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def cmd_peer(args: argparse.Namespace) -> dict:
    with connect(args.host, args.port, args.timeout) as sock:
        local = sock.getsockname()
        line = read_line(sock).decode().split()
    return {"local": [local[0], local[1]], "peer": [line[1], int(line[2])]}


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes (a 1 MiB random block, salted per block)."""
    rng = random.Random(seed)
    return rng.randbytes(min(size, 1 << 20))


def cmd_bulk(args: argparse.Namespace) -> dict:
    block = payload(args.size)
    received = hashlib.sha256()
    got = 0
    errors: list[str] = []
    with connect(args.host, args.port, args.timeout) as sock:
        peer_line = read_line(sock)

        def reader() -> None:
            nonlocal got
            try:
                while data := sock.recv(1 << 20):
                    received.update(data)
                    got += len(data)
            except OSError as exc:
                errors.append(repr(exc))

        thread = threading.Thread(target=reader)
        thread.start()
        sent = hashlib.sha256()
        left = args.size
        counter = 0
        while left:
            chunk = block[: min(left, len(block))]
            chunk = counter.to_bytes(8, "big") + chunk[8:] if len(chunk) > 8 else chunk
            sock.sendall(chunk)
            sent.update(chunk)
            left -= len(chunk)
            counter += 1
        sock.shutdown(socket.SHUT_WR)
        thread.join(args.timeout)
    return {
        "peer": peer_line.decode().split()[1:],
        "sent": args.size,
        "received": got,
        "sent_sha256": sent.hexdigest(),
        "received_sha256": received.hexdigest(),
        "errors": errors,
    }


def cmd_halfclose(args: argparse.Namespace) -> dict:
    data = payload(args.size)
    with connect(args.host, args.port, args.timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while chunk := sock.recv(65536):
            reply += chunk
    line, _, rest = bytes(reply).partition(b"\n")
    return {"peer_line": line.decode(), "echo_ok": rest == data, "echoed": len(rest)}


def cmd_expect_reset(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    try:
        with connect(args.host, args.port, args.timeout) as sock:
            data = sock.recv(100)
            outcome = "eof" if not data else "data"
    except ConnectionResetError:
        outcome = "reset"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    return {"outcome": outcome, "seconds": time.monotonic() - started}


def cmd_many(args: argparse.Namespace) -> dict:
    ok = 0
    failures: list[str] = []
    lock = threading.Lock()
    message = b"x" * 1024

    def one(i: int) -> None:
        nonlocal ok
        try:
            with connect(args.host, args.port, args.timeout) as sock:
                read_line(sock)
                sock.sendall(message)
                sock.shutdown(socket.SHUT_WR)
                echoed = b""
                while chunk := sock.recv(4096):
                    echoed += chunk
            with lock:
                if echoed == message:
                    ok += 1
                else:
                    failures.append(f"{i}: got {len(echoed)} bytes")
        except OSError as exc:
            with lock:
                failures.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.timeout)
    return {"ok": ok, "failures": failures[:10], "failed": len(failures)}


def cmd_stream(args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + args.seconds
    sent = 0
    outcome = "deadline"
    with connect(args.host, args.port, args.timeout) as sock:
        read_line(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        chunk = b"s" * 16384
        print("STREAMING", file=sys.stderr, flush=True)
        try:
            while time.monotonic() < deadline:
                sent += sock.send(chunk)
                while True:  # drain the echo so the flow keeps moving
                    sock.setblocking(False)
                    try:
                        if not sock.recv(1 << 16):
                            outcome = "eof"
                            break
                    except BlockingIOError:
                        break
                    finally:
                        sock.setblocking(True)
                        sock.settimeout(args.timeout)
                if outcome == "eof":
                    break
                time.sleep(0.01)
        except ConnectionResetError:
            outcome = "reset"
        except BrokenPipeError:
            outcome = "broken-pipe"
    return {"outcome": outcome, "sent": sent}


def cmd_http10(args: argparse.Namespace) -> dict:
    with connect(args.host, args.port, args.timeout, args.source_port) as sock:
        local = sock.getsockname()
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {args.host}\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return {"local": [local[0], local[1]], "status": reply.split(b"\r\n", 1)[0].decode()}


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = ["peer", "bulk", "halfclose", "expect-reset", "many", "stream", "http10"]
    parser.add_argument("command", choices=commands)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--source-port", type=int, default=0)
    args = parser.parse_args()
    fn = globals()["cmd_" + args.command.replace("-", "_")]
    print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
