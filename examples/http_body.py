"""Rewrite text in HTTP response bodies, with correct lengths, on keep-alive connections.

    tproxy run -i examples/http_body.py:BodyReplace -o old=world -o new=WORLD --when port=80

Written on :class:`tproxy.http.HttpInterceptor`: it frames requests and
responses (Content-Length, chunked, HEAD/204/304, pipelining), forwards
unchanged messages byte-identical and gives a changed body a new length.
"""

from __future__ import annotations

from tproxy import options
from tproxy.http import HttpInterceptor, Request, Response


class BodyReplace(HttpInterceptor):
    """Replace ``old`` with ``new`` in every response body (not compressed ones)."""

    option_schema = {"old": options.parse_bytes, "new": (options.parse_bytes, b"")}

    def response(self, req: Request, resp: Response) -> None:
        if resp.header("content-encoding") in (None, "identity"):
            resp.body = resp.body.replace(self.options.old, self.options.new)
