"""``flow.tls``: what the TLS layer learnt about a flow, for interceptors and logs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TlsInfo:
    """TLS facts of one flow, filled in as its handshakes go.

    Set on :attr:`tproxy.flow.FlowInfo.tls` when ``--tls intercept`` saw a
    ClientHello (``None`` on every other flow). By the time an interceptor
    sees plaintext, the handshakes are done and every field is known.
    """

    sni: str | None = None
    """The server name the client asked for (``None`` if it sent none)."""
    client_alpn: tuple[str, ...] = ()
    """The protocols the client offered."""
    alpn: str | None = None
    """The protocol agreed with the client (``None``: no ALPN)."""
    version: str | None = None
    """The client side's TLS version, e.g. ``TLSv1.3``."""
    cipher: str | None = None
    """The client side's cipher suite, e.g. ``TLS_AES_256_GCM_SHA384``."""
    upstream_version: str | None = None
    upstream_cipher: str | None = None
    upstream_subject: str | None = None
    """The upstream certificate's subject (RFC 4514), ``None`` before its handshake."""
    upstream_issuer: str | None = None
    names: tuple[str, ...] = ()
    """The names on the leaf forged for the client."""
    intercepted: bool = False
    """Whether the layer decrypts this flow (False: passed through untouched)."""
    passthrough_reason: str | None = None
    """Why an untouched flow was not intercepted (``--tls-ignore``, learned, ...)."""
