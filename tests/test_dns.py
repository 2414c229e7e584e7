"""The ``dns`` built-in, driven with datagrams: logging, rewrite, block, malformed input."""

from __future__ import annotations

import logging

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.interceptor import OptionError
from tproxy.loading import load_interceptor, resolve
from tproxy.testing import Driver

Dns = resolve("dns")  # by its built-in name, wherever the built-ins are installed


def query(name: str, rdtype: str = "A") -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype)


def answer(q: dns.message.Message, *records: str) -> bytes:
    """The server's answer to ``q``: records as 'NAME TTL TYPE VALUE'."""
    r = dns.message.make_response(q)
    for text in records:
        name, ttl, rdtype, value = text.split()
        r.answer.append(dns.rrset.from_text(name, int(ttl), "IN", rdtype, value))
    return r.to_wire()


def addresses(wire: bytes) -> list[str]:
    msg = dns.message.from_wire(wire)
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)


def test_is_a_builtin() -> None:
    factory = load_interceptor("dns", {"rewrite": "a.test=192.0.2.1"})
    assert factory.cls is Dns and Dns.__name__ == "Dns"


def test_without_options_forwards_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tproxy.dns")
    d = Driver.datagrams(Dns)
    q = query("example.test")
    assert d.client_datagram(q.to_wire()).to_server == [q.to_wire()]
    wire = answer(q, "example.test. 300 A 198.51.100.7")
    assert d.server_datagram(wire).to_client == [wire]  # the very same bytes
    assert f"dns query id={q.id} example.test. A" in caplog.text
    assert "NOERROR" in caplog.text and "198.51.100.7" in caplog.text


def test_log_no_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tproxy.dns")
    d = Driver.datagrams(Dns, log="no")
    q = query("example.test")
    d.client_datagram(q.to_wire())
    d.server_datagram(answer(q, "example.test. 300 A 198.51.100.7"))
    assert "dns" not in caplog.text


def test_rewrite_a_and_aaaa_keeps_the_ttl() -> None:
    d = Driver.datagrams(Dns, rewrite="www.test=192.0.2.9; www.test=2001:db8::9")
    q4 = query("WWW.test.")
    out = d.server_datagram(answer(q4, "www.test. 42 A 198.51.100.1", "www.test. 42 A 10.0.0.1"))
    assert addresses(out.to_client[0]) == ["192.0.2.9"]
    assert dns.message.from_wire(out.to_client[0]).answer[0].ttl == 42
    q6 = query("www.test", "AAAA")
    out = d.server_datagram(answer(q6, "www.test. 42 AAAA 2001:db8:2::2"))
    assert addresses(out.to_client[0]) == ["2001:db8::9"]


def test_rewrite_turns_nxdomain_into_an_answer_and_replaces_cname_chains() -> None:
    d = Driver.datagrams(Dns, rewrite="gone.test=192.0.2.5")
    q = query("gone.test")
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.NXDOMAIN)
    out = dns.message.from_wire(d.server_datagram(r.to_wire()).to_client[0])
    assert out.rcode() == dns.rcode.NOERROR
    assert [rd.to_text() for rd in out.answer[0]] == ["192.0.2.5"]
    chained = answer(q, "gone.test. 60 CNAME real.test.", "real.test. 60 A 198.51.100.3")
    assert addresses(d.server_datagram(chained).to_client[0]) == ["192.0.2.5"]


def test_rewrite_of_one_family_answers_the_other_with_nodata() -> None:
    d = Driver.datagrams(Dns, rewrite="v4only.test=192.0.2.5")
    q6 = query("v4only.test", "AAAA")
    out = dns.message.from_wire(
        d.server_datagram(answer(q6, "v4only.test. 60 AAAA 2001:db8::1")).to_client[0]
    )
    assert out.answer == [] and out.rcode() == dns.rcode.NOERROR


def test_rewrite_rules_under_several_keys() -> None:
    d = Driver.datagrams(
        (
            Dns,
            {
                "rewrite": "a.test=192.0.2.1",
                "rewrite.2": "a.test=192.0.2.2",
                "rewrite_b": "b.test=192.0.2.3",
            },
        )
    )
    q = query("a.test")
    assert addresses(d.server_datagram(answer(q, "a.test. 5 A 10.0.0.1")).to_client[0]) == [
        "192.0.2.1",
        "192.0.2.2",
    ]
    q = query("b.test")
    assert addresses(d.server_datagram(answer(q, "b.test. 5 A 10.0.0.1")).to_client[0]) == [
        "192.0.2.3"
    ]


def test_wildcard_covers_names_below_not_the_name_itself() -> None:
    d = Driver.datagrams(Dns, rewrite="*.corp.test=192.0.2.77")
    q = query("a.b.corp.test")
    assert addresses(d.server_datagram(answer(q, "a.b.corp.test. 9 A 10.1.1.1")).to_client[0]) == [
        "192.0.2.77"
    ]
    apex = answer(query("corp.test"), "corp.test. 9 A 10.1.1.1")
    assert d.server_datagram(apex).to_client == [apex]


def test_other_names_and_types_are_left_byte_identical() -> None:
    d = Driver.datagrams(Dns, rewrite="www.test=192.0.2.9")
    other = answer(query("other.test"), "other.test. 5 A 10.0.0.2")
    mx = answer(query("www.test", "TXT"), "www.test. 5 TXT hello")
    assert d.server_datagram(other).to_client == [other]
    assert d.server_datagram(mx).to_client == [mx]


def test_block_answers_nxdomain_and_never_asks_the_server() -> None:
    d = Driver.datagrams(Dns, block=r"(^|\.)ads\.test$")
    q = query("x.ADS.test")
    out = d.client_datagram(q.to_wire())
    assert out.to_server == []
    reply = dns.message.from_wire(out.to_client[0])
    assert reply.id == q.id and reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.QR and reply.question == q.question
    fine = query("notads.test").to_wire()
    assert d.client_datagram(fine).to_server == [fine]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rewrite": "a.test"}, "not NAME=ADDRESS"),
        ({"rewrite": "a.test=999.1.1.1"}, "not an IP address"),
        ({"rewrite": ";"}, "rewrite is empty"),
        ({"rewrite": "a.*.test=192.0.2.1"}, "bad name"),
        ({"block": "("}, "not a valid regex"),
        ({"log": "maybe"}, "log must be yes or no"),
        ({"colour": "red"}, "unknown option"),
        ({"rewriter": "a.test=192.0.2.1"}, "unknown option"),
    ],
)
def test_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Dns.parse_options(options)


def test_what_is_not_dns_passes_unchanged() -> None:
    d = Driver.datagrams(Dns, rewrite="a.test=192.0.2.1", block="a")
    for junk in (b"", b"\x00", b"GET / HTTP/1.1\r\n\r\n", query("a.test").to_wire()[:-3]):
        assert d.client_datagram(junk).to_server == [junk]
        assert d.server_datagram(junk).to_client == [junk]
    assert d.error is None


_seed_query = query("www.test").to_wire()
_seed_answer = answer(query("www.test"), "www.test. 60 A 10.0.0.1")


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Real DNS messages with bytes flipped, cut or appended, or any bytes at all."""
    kind = draw(st.sampled_from(["random", "flip", "cut", "append"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    base = bytearray(draw(st.sampled_from([_seed_query, _seed_answer])))
    if kind == "flip":
        for i in draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=6)):
            base[i] = draw(st.integers(0, 255))
    elif kind == "cut":
        base = base[: draw(st.integers(0, len(base)))]
    else:
        base += draw(st.binary(min_size=1, max_size=40))
    return bytes(base)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled(), st.booleans())
def test_fuzz_never_raises_and_forwards_what_it_cannot_parse(
    data: bytes, from_client: bool
) -> None:
    d = Driver.datagrams(Dns, rewrite="www.test=192.0.2.9;www.test=2001:db8::9", block="^blocked")
    if from_client:
        out = d.client_datagram(data)
    else:
        out = d.server_datagram(data)
    assert d.error is None and d.aborted is None
    try:
        dns.message.from_wire(data)
        parsed = True
    except Exception:
        parsed = False
    if not parsed:
        assert (out.to_server if from_client else out.to_client) == [data]
    else:
        assert len(out.to_server) + len(out.to_client) == 1
