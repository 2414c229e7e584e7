"""The TLS layer on bytes alone: two in-memory SSLObjects play client and server."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from tls_helpers import Endpoint, Upstream, client_context

from tproxy.flow import FlowInfo
from tproxy.interceptor import AbortFlow, Chain, Interceptor, Output
from tproxy.interceptors.replace import Replace
from tproxy.tls import ca
from tproxy.tls.certs import LeafForge, names_of
from tproxy.tls.layer import (
    ALERT_BAD_CERTIFICATE,
    TlsInterception,
    TlsLayer,
    TlsSettings,
    alert_record,
)

NAME = "www.example.test"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pki(tmp_path: Path) -> tuple[ca.CertificateAuthority, Upstream]:
    return ca.create(tmp_path / "ca"), Upstream(tmp_path)


def interception(pki, clock=None, **settings) -> TlsInterception:
    authority, upstream = pki
    settings.setdefault("upstream_ca", upstream.ca_file)
    s = TlsSettings(clock=clock or Clock(), **settings)
    return TlsInterception(s, LeafForge(authority, keylog=s.keylog))


class Wire:
    """client Endpoint <-> layer <-> server Endpoint, carried until nothing moves."""

    def __init__(self, layer: TlsLayer, client: Endpoint, server: Endpoint) -> None:
        self.layer, self.client, self.server = layer, client, server
        self.to_server = b""  # raw bytes the layer sent toward the server
        self.from_client = b""  # raw bytes the client sent
        self.aborted: AbortFlow | None = None
        self.emit(layer.start())

    def emit(self, out: Output) -> None:
        self.to_server += out.to_server
        self.server.incoming.write(out.to_server)
        self.client.incoming.write(out.to_client)

    def run(self, rounds: int = 20) -> Wire:
        for _ in range(rounds):
            if self.aborted:
                return self
            self.client.step()
            self.server.step()
            c, s = self.client.take(), self.server.take()
            if not c and not s:
                if self.client.incoming.pending or self.server.incoming.pending:
                    continue
                return self
            try:
                if c:
                    self.from_client += c
                    self.emit(self.layer.client_data(c))
                if s:
                    self.emit(self.layer.server_data(s))
            except AbortFlow as exc:
                self.aborted = exc
                self.client.incoming.write(exc.to_client)
                self.client.step()
        raise AssertionError("the wire did not settle")


def flow(dst: str = "198.51.100.20", client: str = "192.0.2.10") -> FlowInfo:
    return FlowInfo.example(client=(client, 40000), destination=(dst, 443))


def connect(
    tls,
    upstream,
    *,
    interceptors=(),
    client_ca,
    names=(NAME,),
    sni=NAME,
    client_alpn=None,
    server_alpn=None,
    info=None,
) -> Wire:
    info = info or flow()
    built = [i(info) if isinstance(i, type) else i for i in interceptors]
    layer = tls.wrap(Chain(built), info)
    client = Endpoint(client_context(client_ca, client_alpn), server_side=False, name=sni)
    server = Endpoint(upstream.server_context(list(names), server_alpn), server_side=True)
    return Wire(layer, client, server).run()


def test_intercepts_with_a_leaf_that_copies_the_upstream_names(pki):
    authority, upstream = pki
    tls = interception(pki)
    wire = connect(tls, upstream, client_ca=authority.cert_path, names=(NAME, "alt.example.test"))
    assert wire.client.done and wire.server.done and wire.aborted is None
    leaf = x509.load_der_x509_certificate(wire.client.obj.getpeercert(binary_form=True))
    assert names_of(leaf) == [NAME, "alt.example.test"]
    assert leaf.issuer == authority.cert.subject
    meta = wire.layer.info.tls
    assert meta is not None and meta.intercepted and meta.sni == NAME
    assert meta.version == wire.client.obj.version() and meta.cipher
    assert meta.upstream_issuer == upstream.ca.cert.subject.rfc4514_string()
    assert "CN=www.example.test" in (meta.upstream_subject or "")


def test_interceptors_see_plaintext_both_ways(pki):
    authority, upstream = pki
    tls = interception(pki)
    info = flow()
    replace = Replace(info, Replace.parse_options({"old": "page", "new": "PAGE"}))
    wire = connect(tls, upstream, client_ca=authority.cert_path, interceptors=[replace], info=info)
    wire.client.obj.write(b"GET /page HTTP/1.1\r\n\r\n")
    wire.run()
    assert wire.server.received == b"GET /PAGE HTTP/1.1\r\n\r\n"
    wire.server.obj.write(b"the page")
    wire.run()
    assert wire.client.received == b"the PAGE"
    assert b"page" not in wire.to_server  # what went upstream is ciphertext


def test_alpn_http1_offers_only_http11_mirror_passes_h2(pki):
    authority, upstream = pki
    both = ["h2", "http/1.1"]
    wire = connect(
        interception(pki),
        upstream,
        client_ca=authority.cert_path,
        client_alpn=both,
        server_alpn=both,
    )
    assert wire.client.obj.selected_alpn_protocol() == "http/1.1"
    assert wire.layer.info.tls.client_alpn == ("h2", "http/1.1")
    wire = connect(
        interception(pki, alpn="mirror"),
        upstream,
        client_ca=authority.cert_path,
        client_alpn=both,
        server_alpn=both,
    )
    assert wire.client.obj.selected_alpn_protocol() == "h2"
    assert wire.layer.info.tls.alpn == "h2"


def test_a_hundred_connections_to_one_host_sign_one_certificate(pki):
    authority, upstream = pki
    tls = interception(pki)
    for _ in range(100):
        wire = connect(tls, upstream, client_ca=authority.cert_path)
        assert wire.client.done
    assert tls.forge.signed == 1
    assert tls.forge.contexts_made == 1
    connect(tls, upstream, client_ca=authority.cert_path, names=("other.test",), sni="other.test")
    assert tls.forge.signed == 2


def test_the_cache_is_bounded(pki):
    authority, _ = pki
    forge = LeafForge(authority, cache_size=3)
    for i in range(10):
        forge.context([f"h{i}.test"], None)
    assert forge.signed == 10
    assert len(list(forge.directory.glob("leaf-*.pem"))) == 3
    forge.context(["h9.test"], None)
    assert forge.signed == 10


def test_ignored_sni_passes_byte_identical(pki):
    _, upstream = pki
    tls = interception(pki, ignore=[r"\.example\.test$"])
    wire = connect(tls, upstream, client_ca=upstream.ca_file)
    assert wire.layer.passthrough
    assert wire.client.done and wire.server.done
    assert wire.to_server == wire.from_client
    leaf = x509.load_der_x509_certificate(wire.client.obj.getpeercert(binary_form=True))
    assert leaf.issuer == upstream.ca.cert.subject  # the server's real certificate
    assert wire.layer.info.tls.passthrough_reason == "--tls-ignore"
    assert not wire.layer.info.tls.intercepted


def test_a_client_that_rejects_the_leaf_passes_through_next_time(pki, caplog):
    authority, upstream = pki
    clock = Clock()
    tls = interception(pki, clock=clock, learn=600)
    caplog.set_level(logging.WARNING, "tproxy.tls")
    # the client trusts only the real server's CA, not the interception CA
    wire = connect(tls, upstream, client_ca=upstream.ca_file)
    assert wire.aborted is not None and "rejected the forged certificate" in wire.aborted.reason
    assert wire.client.error is not None
    wire = connect(tls, upstream, client_ca=upstream.ca_file)
    assert wire.aborted is None and wire.client.done and wire.layer.passthrough
    assert wire.to_server == wire.from_client
    # another client is still intercepted
    other = connect(tls, upstream, client_ca=authority.cert_path, info=flow(client="192.0.2.99"))
    assert other.layer.info.tls.intercepted
    learned = [r for r in caplog.records if "rejected the forged certificate" in r.message]
    assert len(learned) == 1
    clock.now += 601
    wire = connect(tls, upstream, client_ca=upstream.ca_file)
    assert wire.aborted is not None  # forgotten: tried again


def test_upstream_verification_failure_is_an_alert_to_the_client(pki, tmp_path, caplog):
    authority, upstream = pki
    stranger = ca.create(tmp_path / "stranger")
    tls = interception(pki, upstream_ca=stranger.cert_path)
    caplog.set_level(logging.WARNING, "tproxy.tls")
    wire = connect(tls, upstream, client_ca=authority.cert_path)
    assert wire.aborted is not None
    assert wire.aborted.to_client == alert_record(ALERT_BAD_CERTIFICATE)
    assert wire.client.error is not None and "BAD_CERTIFICATE" in wire.client.error.reason
    assert any("upstream certificate" in r.message for r in caplog.records)
    # verification off: the same server is accepted
    tls = interception(pki, upstream_ca=stranger.cert_path, upstream_verify=False)
    assert connect(tls, upstream, client_ca=authority.cert_path).client.done


def test_no_sni_uses_the_destination_address(pki):
    authority, upstream = pki
    tls = interception(pki)
    info = flow(dst="127.0.0.1")
    wire = connect(
        tls,
        upstream,
        client_ca=authority.cert_path,
        names=("127.0.0.1",),
        sni="127.0.0.1",
        info=info,
    )
    assert wire.client.done and info.tls.sni is None
    assert info.tls.names == ("127.0.0.1",)


def test_a_destination_name_is_the_sni_fallback(pki):
    authority, upstream = pki
    tls = interception(pki)
    info = FlowInfo(id=1, client=("192.0.2.1", 5), destination=(NAME, 443), mode="socks")
    layer = tls.wrap(Chain([]), info)
    ctx = client_context(authority.cert_path)
    ctx.check_hostname = False  # so the client sends no SNI
    client = Endpoint(ctx, server_side=False)
    server = Endpoint(upstream.server_context([NAME]), server_side=True)
    wire = Wire(layer, client, server).run()
    assert wire.client.done and info.tls.sni is None and info.tls.names == (NAME,)


class Guard(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        if b"forbidden" in data:
            self.inject_to_client(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            self.abort("forbidden")
        return data


def test_abort_sends_the_reply_then_close_notify(pki):
    authority, upstream = pki
    wire = connect(interception(pki), upstream, client_ca=authority.cert_path, interceptors=[Guard])
    wire.client.obj.write(b"GET /forbidden HTTP/1.1\r\n\r\n")
    wire.run()
    assert wire.aborted is not None and wire.aborted.reason == "forbidden"
    assert wire.client.received == b"HTTP/1.1 403 Forbidden\r\n\r\n"
    assert wire.client.closed
    assert wire.server.received == b""


class Banner(Interceptor):
    def start(self) -> None:
        self.inject_to_client(b"hello client\n")
        self.inject_to_server(b"hello server\n")


def test_start_injections_wait_for_the_handshake_and_are_encrypted(pki):
    authority, upstream = pki
    wire = connect(
        interception(pki), upstream, client_ca=authority.cert_path, interceptors=[Banner]
    )
    assert wire.client.received == b"hello client\n"
    assert wire.server.received == b"hello server\n"


def test_close_notify_crosses_the_layer(pki):
    authority, upstream = pki
    wire = connect(interception(pki), upstream, client_ca=authority.cert_path)
    wire.server.obj.write(b"bye")
    try:
        wire.server.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    wire.run()
    assert wire.client.received == b"bye" and wire.client.closed
    wire.emit(wire.layer.server_eof())  # the server's FIN after its close_notify: no-op


def test_keylog_has_lines_for_both_sides(pki, tmp_path):
    authority, upstream = pki
    keylog = tmp_path / "keys.log"
    tls = interception(pki, keylog=str(keylog))
    wire = connect(tls, upstream, client_ca=authority.cert_path)
    assert wire.client.done
    lines = keylog.read_text().splitlines()
    randoms = {line.split()[1] for line in lines if line.startswith("CLIENT_TRAFFIC_SECRET_0")}
    assert len(randoms) == 2  # one per side: the client's and the layer's own hello


class Seen(Interceptor):
    def client_data(self, data: bytes) -> bytes:
        return data.upper()


def test_not_tls_goes_to_the_inner_chain(pki):
    tls = interception(pki)
    info = flow()
    layer = tls.wrap(Chain([Seen(info)]), info)
    layer.start()
    out = layer.client_data(b"GET / HTTP/1.0\r\n\r\n")
    assert out.to_server == b"GET / HTTP/1.0\r\n\r\n".upper()
    assert info.tls is None and not layer.passthrough


def test_a_server_that_speaks_first_is_not_tls(pki):
    tls = interception(pki)
    layer = tls.wrap(None, flow())
    layer.start()
    assert layer.server_data(b"220 smtp ready\r\n").to_client == b"220 smtp ready\r\n"
    assert layer.passthrough  # no interceptors: the relay may splice the rest


def test_a_hello_in_many_small_pieces_is_intercepted(pki):
    authority, upstream = pki
    tls = interception(pki)
    info = flow()
    layer = tls.wrap(Chain([]), info)
    client = Endpoint(client_context(authority.cert_path), server_side=False, name=NAME)
    server = Endpoint(upstream.server_context([NAME]), server_side=True)
    wire = Wire(layer, client, server)
    client.step()
    hello = client.take()
    for i in range(0, len(hello), 7):
        wire.emit(layer.client_data(hello[i : i + 7]))
    wire.run()
    assert client.done and info.tls.intercepted


def hello_bytes() -> bytes:
    client = Endpoint(client_context(None), server_side=False, name=NAME)
    client.step()
    return client.take()


@pytest.mark.parametrize(
    ("data", "eof", "message"),
    [
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", False, "broken ClientHello"),
        (b"\x16\x03\x01\x40\x00\x01\x00\x4e\x20\x03\x03", False, "larger than 16 KiB"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", True, "closed after 11 bytes"),
    ],
    ids=["garbage", "too-big", "truncated"],
)
def test_bad_hellos_end_their_flow_with_one_line(pki, caplog, data, eof, message):
    tls = interception(pki)
    layer = tls.wrap(None, flow())
    layer.start()
    caplog.set_level(logging.WARNING, "tproxy.tls")
    with pytest.raises(AbortFlow, match=message):
        layer.client_data(data)
        if eof:
            layer.client_eof()
    assert len(caplog.records) == 1 and message in caplog.records[0].message


def test_garbage_after_a_real_hello_prefix(pki):
    hello = hello_bytes()
    layer = interception(pki).wrap(None, flow())
    layer.start()
    broken = hello[:9] + b"\xff" * (len(hello) - 9)
    with pytest.raises(AbortFlow, match="broken ClientHello"):
        layer.client_data(broken)


def test_a_client_that_stalls_mid_hello_times_out(pki, caplog):
    clock = Clock()
    tls = interception(pki, clock=clock, handshake_timeout=5)
    layer = tls.wrap(None, flow())
    layer.start()
    # nothing sent yet: no handshake under way, the check moves on
    assert layer.next_deadline() == 105.0
    assert not layer.on_timer(105.0)
    assert layer.next_deadline() == 110.0
    clock.now = 100.0
    layer.client_data(hello_bytes()[:20])
    assert layer.next_deadline() == 105.0
    assert not layer.on_timer(104.0)
    caplog.set_level(logging.WARNING, "tproxy.tls")
    with pytest.raises(AbortFlow, match="stalled"):
        layer.on_timer(105.0)
    assert len(caplog.records) == 1


def test_a_client_that_closes_during_its_handshake_is_learned(pki):
    authority, upstream = pki
    tls = interception(pki)
    info = flow()
    layer = tls.wrap(None, info)
    client = Endpoint(client_context(authority.cert_path), server_side=False, name=NAME)
    server = Endpoint(upstream.server_context([NAME]), server_side=True)
    wire = Wire(layer, client, server)
    client.step()
    wire.emit(layer.client_data(client.take()))
    for _ in range(5):  # the upstream handshake, until the client has its ServerHello
        server.step()
        if data := server.take():
            wire.emit(layer.server_data(data))
    assert client.incoming.pending  # the forged flight reached the client
    with pytest.raises(AbortFlow, match="rejected the forged certificate"):
        layer.client_eof()
    assert tls.is_learned(info.client[0], NAME)


def test_a_server_that_fails_its_handshake_is_an_alert(pki, caplog):
    authority, _ = pki
    tls = interception(pki)
    layer = tls.wrap(None, flow())
    client = Endpoint(client_context(authority.cert_path), server_side=False, name=NAME)
    client.step()
    layer.start()
    layer.client_data(client.take())
    caplog.set_level(logging.WARNING, "tproxy.tls")
    with pytest.raises(AbortFlow) as info:
        layer.server_data(b"\x15\x03\x03\x00\x02\x02\x28")  # handshake_failure from the server
    assert info.value.to_client == alert_record(40)
    assert "upstream handshake" in caplog.records[0].message


# -- the inner chain built after the hello (--when sni=), --tls-when -------------------


class Shout(Interceptor):
    """Upper-cases what the server sends (visible in the client's plaintext)."""

    def server_data(self, data: bytes) -> bytes:
        return data.upper()


def builder(made: list[FlowInfo], when: str | None = None):
    """A chain builder like the engine's: records the metadata it was called with."""

    def build(info: FlowInfo) -> Chain | None:
        made.append(info)
        if when is not None and info.sni != when:
            return None
        return Chain([Shout(info)])

    return build


def wire_for(tls, upstream, build, client_ca, sni=NAME) -> Wire:
    layer = tls.wrap(build, flow())
    client = Endpoint(client_context(client_ca), server_side=False, name=sni)
    server = Endpoint(upstream.server_context([NAME, "other.example.test"]), server_side=True)
    return Wire(layer, client, server).run()


def test_a_builder_is_called_after_the_hello_with_sni_and_alpn(pki):
    authority, upstream = pki
    made: list[FlowInfo] = []
    wire = wire_for(interception(pki), upstream, builder(made, NAME), authority.cert_path)
    assert wire.client.done and wire.aborted is None
    (info,) = made
    assert info.sni == NAME and info.alpn == () and info.tls is wire.layer.info.tls
    wire.server.obj.write(b"hello")
    wire.run()
    assert wire.client.received == b"HELLO"  # the selected interceptor sees plaintext


def test_a_builder_that_selects_nothing_still_intercepts(pki):
    authority, upstream = pki
    made: list[FlowInfo] = []
    wire = wire_for(
        interception(pki), upstream, builder(made, "other.example.test"), authority.cert_path
    )
    assert [i.sni for i in made] == [NAME]
    wire.server.obj.write(b"hello")
    wire.run()
    assert wire.client.received == b"hello" and wire.layer.info.tls.intercepted


def test_a_builder_sees_a_flow_that_is_not_tls_as_it_is(pki):
    made: list[FlowInfo] = []
    layer = interception(pki).wrap(builder(made), flow())
    assert layer.start() == Output() and made == []  # nothing is built before the first bytes
    assert layer.client_data(b"GET / HTTP/1.0\r\n\r\n").to_server == b"GET / HTTP/1.0\r\n\r\n"
    assert [i.sni for i in made] == [None]
    assert layer.server_data(b"ok").to_client == b"OK"


def test_tls_when_passes_unselected_names_untouched_and_builds_nothing(pki):
    authority, upstream = pki
    tls = interception(pki, when=[r"sni=other\.example\.test"])
    made: list[FlowInfo] = []
    wire = wire_for(tls, upstream, builder(made), upstream.ca_file)
    assert wire.client.done and wire.aborted is None and made == []
    leaf = x509.load_der_x509_certificate(wire.client.obj.getpeercert(binary_form=True))
    assert leaf.issuer == upstream.ca.cert.subject  # the server's own certificate
    assert wire.to_server == wire.from_client  # byte-identical ciphertext
    meta = wire.layer.info.tls
    assert not meta.intercepted and meta.passthrough_reason == "not selected by --tls-when"
    assert wire.layer.passthrough
    chosen = wire_for(tls, upstream, builder(made), authority.cert_path, sni="other.example.test")
    assert chosen.layer.info.tls.intercepted and [i.sni for i in made] == ["other.example.test"]


def test_a_bad_tls_when_is_a_value_error_naming_the_option():
    with pytest.raises(ValueError, match=r"^--tls-when 'port=x'"):
        TlsSettings(when=["port=x"])
