"""TLS for tproxy: reading ClientHellos (and, with ``--tls intercept``, the TLS layer).

``parse_client_hello`` is the public, sans-io reader of a client's first bytes;
see :mod:`tproxy.tls.clienthello`.
"""

from .clienthello import ClientHello, NeedMore, NotTLS, ParseResult, parse_client_hello

__all__ = ["ClientHello", "NeedMore", "NotTLS", "ParseResult", "parse_client_hello"]
