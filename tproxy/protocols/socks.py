"""One SOCKS listener for SOCKS4, 4a and 5: the first byte tells them apart.

:class:`SocksHandshake` waits for the first byte (the version: 4 or 5), then
hands everything to a :class:`~.socks4.Socks4Handshake` or a
:class:`~.socks5.Socks5Handshake` and behaves exactly like it, so a front
door drives one object whatever the version. Any other first byte raises
:class:`~.socks_request.SocksError` with an empty reply (there is no way to
answer a protocol we do not know): close the connection.
"""

from __future__ import annotations

from .socks4 import DEFAULT_MAX_SIZE as SOCKS4_MAX_SIZE
from .socks4 import Socks4Handshake
from .socks5 import DEFAULT_MAX_SIZE as SOCKS5_MAX_SIZE
from .socks5 import Address, Authenticator, Socks5Handshake, Socks5Reply
from .socks_request import SocksError, SocksRequest


class SocksHandshake:
    """A SOCKS4/4a/5 handshake, the version chosen by the client's first byte.

    ``authenticate`` (``(user, password) -> bool``) makes SOCKS5 require
    RFC 1929 username/password; SOCKS4 cannot carry a password, so with
    credentials configured a SOCKS4 request is read and refused with 91
    (unless ``allow_socks4_without_auth`` is set). ``socks4_max_size`` and
    ``socks5_max_size`` bound each version's handshake.

    Events and errors are those of the chosen handshake: ``Reply`` events
    (SOCKS5 only), then one :class:`SocksRequest`; :class:`SocksError` with
    the reply bytes. After the request, answer with :meth:`reply_success`
    (the bound address; BIND calls it twice) or :meth:`reply_failure` (the
    caught exception, or ``Socks5Reply.NOT_ALLOWED`` for a policy refusal;
    SOCKS4 turns every failure into 91).
    """

    def __init__(
        self,
        *,
        authenticate: Authenticator | None = None,
        allow_socks4_without_auth: bool = False,
        socks4_max_size: int = SOCKS4_MAX_SIZE,
        socks5_max_size: int = SOCKS5_MAX_SIZE,
    ) -> None:
        self.authenticate = authenticate
        self.allow_socks4_without_auth = allow_socks4_without_auth
        self.socks4_max_size = socks4_max_size
        self.socks5_max_size = socks5_max_size
        self._inner: Socks4Handshake | Socks5Handshake | None = None

    @property
    def version(self) -> int | None:
        """4 or 5 once the first byte arrived; ``None`` before."""
        return None if self._inner is None else self._inner.version

    @property
    def complete(self) -> bool:
        return self._inner is not None and self._inner.complete

    @property
    def request(self) -> SocksRequest | None:
        """The parsed request, once complete."""
        return None if self._inner is None else self._inner.request

    @property
    def leftover(self) -> bytes:
        return b"" if self._inner is None else self._inner.leftover

    def take_leftover(self) -> bytes:
        return b"" if self._inner is None else self._inner.take_leftover()

    def receive_data(self, data: bytes) -> list[object]:
        """Feed client bytes; return ``Reply`` events and the ``SocksRequest``."""
        if self._inner is None:
            if not data:
                return []
            if data[0] == 4:
                self._inner = Socks4Handshake(
                    max_size=self.socks4_max_size,
                    allowed=self.authenticate is None or self.allow_socks4_without_auth,
                )
            elif data[0] == 5:
                self._inner = Socks5Handshake(
                    authenticate=self.authenticate, max_size=self.socks5_max_size
                )
            else:
                raise SocksError(f"not a SOCKS request (first byte {data[0]:#04x})", b"")
        return self._inner.receive_data(data)

    def reply_success(self, bound: Address | None = None) -> bytes:
        """Granted (SOCKS4 90) / succeeded (SOCKS5 0x00) with the bound address."""
        if self._inner is None:
            raise RuntimeError("no SOCKS request yet")
        return self._inner.reply_success(bound)

    def reply_failure(self, cause: BaseException | int | Socks5Reply | None = None) -> bytes:
        """Rejected (SOCKS4 91) / the SOCKS5 REP derived from ``cause``."""
        if self._inner is None:
            raise RuntimeError("no SOCKS request yet")
        return self._inner.reply_failure(cause)
