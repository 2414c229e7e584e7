"""One vocabulary for failed connects (tproxy.errors), from the errno to the protocol reply."""

from __future__ import annotations

import errno
import socket

import pytest

from tproxy.cli import UsageError as UsageErrorFromCli
from tproxy.errors import (
    ConnectError,
    ConnectFailure,
    UsageError,
    classify_error,
    connect_error_from,
    most_telling,
)
from tproxy.protocols import ConnectFailure as ProtocolsConnectFailure
from tproxy.protocols import classify_error as protocols_classify_error
from tproxy.protocols.http_proxy import HttpProxyHandshake


def test_the_old_import_paths_name_the_same_objects() -> None:
    assert UsageErrorFromCli is UsageError
    assert ProtocolsConnectFailure is ConnectFailure
    assert protocols_classify_error is classify_error


@pytest.mark.parametrize(
    ("caught", "kind", "text"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused", None),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network-unreachable", None),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "host-unreachable", None),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), "timeout", None),
        (OSError(errno.EPERM, "Operation not permitted"), "not-allowed", None),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "dns", "name resolution"),
        (OSError(errno.EIO, "Input/output error"), "error", None),
    ],
)
def test_a_caught_error_becomes_one_connect_error_with_its_kind_in_front(caught, kind, text):
    error = connect_error_from(caught)
    assert error.kind is ConnectFailure(kind)
    assert str(error).startswith(f"{kind}: ")
    if text:
        assert text in str(error)
    assert classify_error(error) is error.kind  # and it reads back the same
    assert connect_error_from(error) is error


def test_the_most_telling_of_several_failures_is_a_refusal() -> None:
    errors = [
        ConnectError(ConnectFailure.TIMEOUT, "t"),
        ConnectError(ConnectFailure.REFUSED, "r"),
        ConnectError(ConnectFailure.OTHER, "o"),
    ]
    assert most_telling(errors).kind is ConnectFailure.REFUSED
    assert most_telling(errors[2:]).kind is ConnectFailure.OTHER


@pytest.mark.parametrize(
    ("kind", "status"), [("timeout", b" 504 "), ("dns", b" 502 "), ("refused", b" 502 ")]
)
def test_the_http_proxy_answers_from_the_kind_without_translation(kind, status) -> None:
    reply = HttpProxyHandshake().reply_failure(ConnectError(kind, "x"))
    assert status in reply.split(b"\r\n", 1)[0]
