"""The ``label`` built-in, driven with bytes."""

from __future__ import annotations

import pytest

from tproxy.interceptor import OptionError
from tproxy.interceptors.label import Label
from tproxy.testing import Driver


def test_default_labels_server_data_per_read() -> None:
    d = Driver(Label)
    d.server(b"HTTP/1.0 200 OK\r\n")
    d.server(b"\r\nbody")
    d.client(b"GET /")
    assert d.to_client == b"[tproxy] HTTP/1.0 200 OK\r\n[tproxy] \r\nbody"
    assert d.to_server == b"GET /"
    assert not d.passthrough


def test_suffix_both_directions_with_escapes() -> None:
    d = Driver(Label, text=r"<\n>", position="suffix", direction="both")
    d.client("a")
    d.server("b")
    assert d.to_server == b"a<\n>"
    assert d.to_client == b"b<\n>"


def test_client_only() -> None:
    d = Driver(Label, text="#", direction="client")
    d.client("a")
    d.server("b")
    d.client_eof()
    d.server_eof()
    assert (d.to_server, d.to_client) == (b"#a", b"b")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"position": "middle"}, "position must be one of prefix, suffix"),
        ({"direction": "up"}, "direction must be client, server or both"),
        ({"text": "\\q"}, "unknown escape"),
        ({"colour": "red"}, "unknown option 'colour'"),
    ],
)
def test_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Label.parse_options(options)


def test_works_without_parse_options() -> None:
    from tproxy.flow import FlowInfo

    assert Label(FlowInfo.example()).server_data(b"x") == b"[tproxy] x"
