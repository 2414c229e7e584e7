"""Routing for ``tproxy run --setup IN OUT --port PORTS``.

The engine's owner calls :func:`add_run_arguments` on ``run``'s parser and,
once its transparent listener is up, enters :func:`installed_for_run`::

    with installed_for_run(args, proxy_port=9091, proxy_address_v4="127.0.0.1",
                           proxy_address_v6="::1"):
        ...serve until stopped...

The plan is installed on enter (after the listener exists, so diverted SYNs
always find it) and removed on exit, whatever ends the block: a normal
return, an exception, a cancelled task, KeyboardInterrupt. After ``kill -9``
nothing can run, so the rules stay; ``tproxy teardown`` removes them (the
record under ``/run/tproxy`` says what they are).

Option names in ``run``: ``--setup IN OUT``, ``-p/--port PORTS``, ``--udp-port``,
``--block-quic``, ``--backend``, ``--local``, ``--exclude-uid``, ``--exclude-cgroup``,
``--route-mark MARK[/MASK]``, ``--route-table TABLE``,
``--route-priority PRIO``, ``--route-instance NAME``, ``--ipv4``, ``--ipv6``
(``--mark`` is ``run``'s own SO_MARK option). The proxy port and address
come from the engine's listener, not from options.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from . import installer, state
from .cli import add_plan_arguments, request_from_args
from .installer import RoutingError
from .plan import DEFAULT_PROXY_MARK, DEFAULT_PROXY_V4, DEFAULT_PROXY_V6, Plan, make_plan

log = logging.getLogger("tproxy")

__all__ = [
    "RoutingError",
    "add_run_arguments",
    "check_for_run",
    "installed_for_run",
    "prepare_run_args",
    "wants_setup",
]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--setup IN OUT`` and the plan options (prefixed ``--route-``) to ``run``."""
    parser.add_argument(
        "--setup",
        nargs=2,
        metavar=("IN", "OUT"),
        default=None,
        help="install the TPROXY routing for IN -> OUT while running "
        "(needs --port); removed when the engine stops",
    )
    add_plan_arguments(parser, prefix="route-")


def prepare_run_args(args: argparse.Namespace) -> None:
    """Before ``run`` builds its engine: ``--setup --local`` gives the proxy's sockets a mark.

    The OUTPUT rules of ``--local`` skip that mark, so the proxy's own
    upstream connections are never captured again. ``--mark`` given by the
    user is kept (and skipped instead).
    """
    if wants_setup(args) and args.route_local and getattr(args, "mark", None) is None:
        args.mark = DEFAULT_PROXY_MARK


def wants_setup(args: argparse.Namespace) -> bool:
    """Whether ``run`` was asked to install routing (``--setup`` given)."""
    return getattr(args, "setup", None) is not None


def plan_for_run(
    args: argparse.Namespace,
    proxy_port: int,
    proxy_address_v4: str | None,
    proxy_address_v6: str | None,
) -> Plan:
    """The plan ``run`` would install; raises ``tproxy.cli.UsageError`` on bad options.

    An address of None means no listener of that family: the family is left
    out of the plan (asking for it with ``--ipv4``/``--ipv6`` is a usage
    error), so traffic is never diverted to a port nobody listens on. A
    wildcard address means the family's default (127.0.0.1 / ::1; a wildcard
    listener accepts what TPROXY hands to those).
    """
    from ..errors import UsageError

    in_interface, out_interface = args.setup
    listening = {4: proxy_address_v4, 6: proxy_address_v6}
    for family, flag in ((4, args.route_ipv4), (6, args.route_ipv6)):
        if flag and listening[family] is None:
            raise UsageError(f"--ipv{family} needs a transparent IPv{family} listener")
    if not (args.route_ipv4 or args.route_ipv6):
        if listening[4] is None and listening[6] is None:
            raise UsageError("--setup needs a transparent listener")
        args = argparse.Namespace(**vars(args))
        args.route_ipv4 = listening[4] is not None and listening[6] is None
        args.route_ipv6 = listening[6] is not None and listening[4] is None
    addresses = [a for a in listening.values() if a and a not in ("0.0.0.0", "::")]
    if args.route_local:
        args = argparse.Namespace(**vars(args))
        args.route_proxy_mark = args.mark if args.mark is not None else DEFAULT_PROXY_MARK
    request = request_from_args(args, in_interface, out_interface, proxy_port, addresses)
    return make_plan(request)


def check_for_run(
    args: argparse.Namespace,
    proxy_port: int,
    proxy_address_v4: str | None,
    proxy_address_v6: str | None,
) -> Plan:
    """Every check ``run --setup`` can make before anything listens; returns the plan.

    Bad options (ports, mark, ...), a missing interface, no privileges, or a
    different plan installed for the instance raise ``tproxy.cli.UsageError``
    (one line, exit 2), so ``run`` fails before it opens a socket.
    """
    from ..errors import UsageError

    plan = plan_for_run(args, proxy_port, proxy_address_v4, proxy_address_v6)
    try:
        installer.check_host(plan.request)
        clash = installer.conflict(plan)
    except installer.InputError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # a backend's StepError (python-iptables cannot load, ...)
        raise UsageError(f"cannot read the installed routing: {exc}") from None
    if clash:
        raise UsageError(
            clash
            + "; tproxy teardown"
            + ("" if plan.instance == "default" else f" --instance {plan.instance}")
            + " first"
        )
    return plan


@contextlib.contextmanager
def installed_for_run(
    args: argparse.Namespace,
    proxy_port: int,
    proxy_address_v4: str | None = DEFAULT_PROXY_V4,
    proxy_address_v6: str | None = DEFAULT_PROXY_V6,
    plan: Plan | None = None,
) -> Iterator[Plan | None]:
    """Install ``run``'s plan for the block's duration; yields the plan (None without --setup).

    Raises ``tproxy.cli.UsageError`` for bad options and
    :class:`~tproxy.routing.installer.RoutingError` (``InputError``,
    ``ConflictError``, ``SetupError``; message says what and why) if it cannot
    install, having rolled back. The same plan already installed by an
    earlier ``run`` (killed with -9) is adopted and removed on exit like a
    fresh one; the same plan installed by ``tproxy setup`` is used and left
    in place (it belongs to whoever ran setup). ``plan`` is the one
    :func:`check_for_run` returned before the listeners opened (recomputed if None).
    """
    if not wants_setup(args):
        yield None
        return
    if plan is None:
        plan = plan_for_run(args, proxy_port, proxy_address_v4, proxy_address_v6)
    installer.check_host(plan.request)
    outcome = installer.install(plan, replace=False, owner="run")
    request = plan.request
    log.info("routing installed (%s backend, instance %s)", request.backend, request.instance)
    if request.local:
        log.info(
            "--local: this host's own connections to the diverted ports are intercepted; "
            "their outgoing source is this host's own address (there is no other client "
            "address to keep, whatever --source says); the proxy's sockets carry mark "
            "%#x and are never captured again",
            request.proxy_mark,
        )
    if outcome == "unchanged" and state.owner(plan.instance) == "setup":
        print(
            f"tproxy run: routing instance {plan.instance!r} was installed by tproxy setup; "
            "using it and leaving it in place",
            file=sys.stderr,
        )
        yield plan
        return
    try:
        yield plan
    finally:
        try:
            installer.teardown(plan.instance)
        except RoutingError as exc:  # report, but do not hide the block's own error
            print(
                f"tproxy run: removing the routing failed: {exc}; run tproxy teardown",
                file=sys.stderr,
            )
