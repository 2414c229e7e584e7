"""The explicit front doors: ``forward``, ``socks`` (SOCKS4/4a/5) and ``http`` (CONNECT, TLS).

``tproxy run`` finds this package and calls :func:`add_arguments` (the
policy and limit options), :func:`front_door` (one handler per
``--mode`` listener) and :func:`check_unused` (options given without an
explicit listener). Each front door learns the destination its own way —
a fixed target, a SOCKS request, an HTTP request head — and then uses the
engine exactly as transparent mode does: :meth:`Engine.connect
<tproxy.engine.Engine.connect>` (through :mod:`.upstream`, which applies
the policy to resolved addresses), :meth:`Engine.relay
<tproxy.engine.Engine.relay>` for every relayed flow (interceptors, flow
records, idle timeout, shutdown) and :meth:`Engine.reject
<tproxy.engine.Engine.reject>` for every refused one.

Module map: :mod:`.settings` (options, checked at start), :mod:`.accepted`
(client allow list, per-client cap), :mod:`.handshake` (the sans-io
driver), :mod:`.upstream` (resolve, check, connect), :mod:`.forward`,
:mod:`.socks`, :mod:`.udp` (UDP ASSOCIATE), :mod:`.http`.
"""

from __future__ import annotations

import argparse

import trio

from ..engine import Engine
from ..errors import UsageError
from ..modes import ModeSpec
from ..server import FastHandler, Handler
from .accepted import Accepted, serve_accepted
from .forward import forward_in_hub, serve_forward
from .http import serve_http
from .settings import ExplicitSettings, add_arguments, check_unused, settings_from
from .socks import serve_socks

__all__ = [
    "ExplicitSettings",
    "add_arguments",
    "check_unused",
    "fast_door",
    "front_door",
    "handler_for",
]


def front_door(spec: ModeSpec, engine: Engine, args: argparse.Namespace) -> Handler:
    """The handler of one explicit listener; every option is checked here, before listening."""
    return handler_for(spec, engine, settings_from(args))


def fast_door(spec: ModeSpec, engine: Engine, args: argparse.Namespace) -> FastHandler | None:
    """The synchronous handler of one explicit listener where it has one (see :mod:`.forward`)."""
    if spec.kind != "forward":
        return None
    assert spec.target is not None
    return forward_in_hub(engine, settings_from(args), spec.target)


def handler_for(spec: ModeSpec, engine: Engine, settings: ExplicitSettings) -> Handler:
    """The handler of one explicit listener, from settings already built (also for tests)."""
    settings.check_listener(spec)
    if spec.kind == "forward":
        assert spec.target is not None
        target = spec.target

        async def forward(accepted: Accepted) -> None:
            await serve_forward(accepted, target)

        body = forward
    elif spec.kind == "socks":
        body = serve_socks
    elif spec.kind == "http":
        body = serve_http
    else:
        raise UsageError(f"mode {spec.kind!r} is not an explicit mode")

    async def handle(stream: trio.SocketStream) -> None:
        await serve_accepted(stream, engine, settings, spec.kind, body)

    return handle
