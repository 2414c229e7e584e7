"""A small HTTPS server for the TLS tests: ``python tls_server.py HOST PORT CHAIN KEY``.

Every GET is answered with the page and the peer's address (``peer IP``), so
a test sees both a rewrite and whom the server saw. HTTP/1.1 with keep-alive.
"""

from __future__ import annotations

import http.server
import socketserver
import ssl
import sys

PAGE = b"hello world, from the server\n"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = PAGE + f"peer {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.client_address[0]} {format % args}", flush=True)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class Server6(Server):
    import socket

    address_family = socket.AF_INET6


def main() -> None:
    host, port, chain, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["http/1.1"])  # it speaks nothing else
    server = (Server6 if ":" in host else Server)((host, port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening on {host} {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
