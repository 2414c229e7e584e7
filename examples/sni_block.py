"""Block TLS connections by the server name the client asks for (SNI).

    tproxy run -i examples/sni_block.py:SniBlock -o host='(.*\\.)?blocked\\.test' --when port=443

Reads the client's ClientHello with :func:`tproxy.tls.parse_client_hello`
(which copes with a hello split over TCP segments or TLS records) and aborts
the flow when the name matches; any other flow, TLS or not, is handed back
to the engine untouched after its first bytes.
"""

from __future__ import annotations

from tproxy import Interceptor, options
from tproxy.tls import ClientHello, NeedMore, parse_client_hello

PEEK_LIMIT = 16 * 1024


class SniBlock(Interceptor):
    """Abort TLS flows whose SNI fully matches the regex ``host`` (case-insensitive)."""

    @classmethod
    def parse_options(cls, raw):  # type: ignore[no-untyped-def]
        return options.parse("sni_block", raw, host=options.parse_text_regex)

    def __init__(self, flow, opts):  # type: ignore[no-untyped-def]
        super().__init__(flow, opts)
        self.held = b""

    def client_data(self, data: bytes) -> bytes:
        self.held += data
        hello = parse_client_hello(self.held)
        if isinstance(hello, NeedMore) and hello.at_least <= PEEK_LIMIT:
            return b""  # a TLS client sends nothing else before the server answers
        if isinstance(hello, ClientHello) and hello.sni is not None:
            if self.options.host.fullmatch(hello.sni):
                self.abort(f"sni_block: {hello.sni}")
        self.passthrough()
        held, self.held = self.held, b""
        return held

    def client_eof(self) -> bytes:
        held, self.held = self.held, b""
        return held
