"""The control socket of ``tproxy run`` and the ``tproxy flows`` command.

Every ``tproxy run`` listens on a Unix socket under ``/run/tproxy/``
(``$TPROXY_RUN_DIR`` overrides it), readable by root only: the directory is
mode 0700 and the socket 0600. The name says whose it is:
``run-<pid>.sock`` for a process that serves clients or supervises
workers, ``run-<supervisor pid>.w<I>.sock`` for worker ``I`` of
``--workers N`` (the supervisor asks its workers and answers for all).

The protocol is one JSON object per connection each way, a line each:
``{"op": "flows"}`` -> ``{"flows": [...]}``; ``{"op": "kill", "id": N}`` ->
``{"killed": true|false}``; ``{"op": "stats"}`` -> a metrics snapshot
(:meth:`tproxy.metrics.FlowStats.snapshot`).

``tproxy flows`` prints the live flows (id, mode, protocol, client,
destination, sni, age, bytes read each way, interceptors, idle time), TCP
flow pairs and UDP sessions alike; ``--json`` prints them as a JSON array;
``--kill ID`` ends one flow (a TCP pair's ends are reset; a UDP session is
closed and its interceptors told). With several ``tproxy run`` processes,
``--pid PID`` chooses one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import trio

from .errors import UsageError
from .flow import EndReason, FlowRecord, format_address

log = logging.getLogger("tproxy.control")

MAX_REQUEST = 64 * 1024
QUERY_TIMEOUT = 5.0
SAMPLE_INTERVAL = 1.0
"""How often byte counters are sampled for the idle time."""


def run_dir() -> Path:
    """Where control sockets live (``/run/tproxy`` unless ``$TPROXY_RUN_DIR``)."""
    return Path(os.environ.get("TPROXY_RUN_DIR", "/run/tproxy"))


def protocol_of(mode: str) -> str:
    """``"udp"`` for a flow of a UDP mode (``transparent-udp``, ``socks-udp``), else ``"tcp"``."""
    return "udp" if mode.endswith("-udp") else "tcp"


def socket_path(pid: int | None = None, worker: int | None = None) -> Path:
    """This process's control socket (or that of ``pid``; of its worker ``worker``)."""
    pid = os.getpid() if pid is None else pid
    suffix = f".w{worker}" if worker is not None else ""
    return run_dir() / f"run-{pid}{suffix}.sock"


# -- the server side -------------------------------------------------------------


class FlowTable:
    """Answers the control requests of one engine process.

    ``live`` holds the TCP flow pairs' records (and SOCKS UDP associations),
    ``sessions`` the UDP sessions' (``Engine.udp_live``); ``kills`` ends any of
    them by id.
    """

    def __init__(
        self,
        live: Mapping[int, FlowRecord],
        kills: Mapping[int, Callable[[], None]],
        stats: Callable[[], dict[str, Any]],
        hub_kill: Callable[[int], bool] | None = None,
        worker: str | None = None,
        sessions: Mapping[int, FlowRecord] | None = None,
    ) -> None:
        self.live = live
        self.sessions: Mapping[int, FlowRecord] = sessions if sessions is not None else {}
        self.kills = kills
        self.stats = stats
        self.hub_kill = hub_kill
        self.worker = worker
        self._seen: dict[int, tuple[int, float]] = {}
        """Flow id -> (bytes moved, when that count was first seen): for the idle time."""

    def sample(self) -> None:
        """Note which flows moved bytes since the last sample (idle time)."""
        now = time.monotonic()
        seen = self._seen
        fresh: dict[int, tuple[int, float]] = {}
        for fid, record in self._records():
            moved = record.bytes_up + record.bytes_down
            old = seen.get(fid)
            fresh[fid] = old if old is not None and old[0] == moved else (moved, now)
        self._seen = fresh

    def flows(self) -> list[dict[str, Any]]:
        self.sample()
        now = time.monotonic()
        out = []
        for fid, record in sorted(self._records(), key=lambda item: item[0]):
            info = record.info
            since = self._seen.get(fid, (0, now))[1]
            out.append(
                {
                    "id": fid,
                    "worker": self.worker,
                    "mode": info.mode,
                    "protocol": protocol_of(info.mode),
                    "client": format_address(info.client),
                    "destination": format_address(info.destination),
                    "sni": getattr(info, "sni", None),
                    "age": round(now - record.started, 3),
                    "idle": round(now - max(since, record.started), 3),
                    "bytes_read_up": record.bytes_up,
                    "bytes_read_down": record.bytes_down,
                    "interceptors": list(record.interceptors),
                }
            )
        return out

    def _records(self) -> list[tuple[int, FlowRecord]]:
        """Every live flow's ``(id, record)``: TCP pairs and UDP sessions."""
        return [*self.live.items(), *self.sessions.items()]

    def kill(self, fid: int) -> bool:
        record = self.live.get(fid) or self.sessions.get(fid)
        if record is None:
            return False
        record.end(EndReason.SHUTDOWN, "killed (tproxy flows --kill)", now=time.monotonic())
        killer = self.kills.get(fid)
        if killer is not None:
            killer()
            return True
        return self.hub_kill(fid) if self.hub_kill is not None else False

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "flows":
            return {"flows": self.flows()}
        if op == "kill":
            return {"killed": self.kill(int(request.get("id", -1)))}
        if op == "stats":
            return self.stats()
        return {"error": f"unknown op {op!r}"}


def hub_killer(engine: Any) -> Callable[[int], bool]:
    """End a flow the splice hub relays by id (flows it connected itself have no task)."""

    def kill(fid: int) -> bool:
        hub = engine.hub
        if hub is None:
            return False
        for flow in list(hub._fds.values()):  # the hub keeps no index by flow id
            if flow.record is not None and flow.record.info.id == fid:
                hub.abort(flow, EndReason.SHUTDOWN, "killed")
                return True
        return False

    return kill


Answer = Callable[[dict[str, Any]], Any]


def bind(path: Path) -> socket.socket:
    """Create the root-only directory and the listening socket (replacing a stale one)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    path: Path,
    answer: Answer,
    *,
    sample: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve control requests on ``path`` until cancelled; remove the socket after."""
    try:
        plain = bind(path)
    except OSError as exc:
        log.warning("no control socket at %s: %s", path, exc)
        task_status.started()
        return
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(plain))
    try:
        async with trio.open_nursery() as nursery:
            if sample is not None:
                nursery.start_soon(_sampling, sample)
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_one, stream, answer)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        with trio.CancelScope(shield=True):
            await listener.aclose()


async def _sampling(sample: Callable[[], None]) -> None:
    while True:
        await trio.sleep(SAMPLE_INTERVAL)
        sample()


async def _one(stream: trio.SocketStream, answer: Answer) -> None:
    try:
        with trio.move_on_after(QUERY_TIMEOUT):
            data = b""
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            try:
                request = json.loads(data.split(b"\n", 1)[0] or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = answer(request)
                if hasattr(reply, "__await__"):
                    reply = await reply
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


# -- the client side -----------------------------------------------------------


def query(path: Path | str, request: dict[str, Any], timeout: float = QUERY_TIMEOUT) -> Any:
    """Send one request and return the decoded answer (blocking; raises OSError)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ConnectionError(f"{path}: no answer")
    return json.loads(data)


def instances() -> Iterator[tuple[int, Path]]:
    """``(pid, path)`` of every running ``tproxy run``'s main control socket."""
    try:
        entries = sorted(run_dir().glob("run-*.sock"))
    except OSError:
        return
    for path in entries:
        name = path.name[len("run-") : -len(".sock")]
        if not name.isdigit():
            continue  # a worker's socket
        pid = int(name)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        yield pid, path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``flows`` to the ``tproxy`` parser."""
    p = sub.add_parser(
        "flows",
        help="list (or kill) the live flows of a running tproxy",
        description="List the live flows of a running `tproxy run` (all its workers).",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--kill", type=int, metavar="ID", default=None, help="end flow ID now")
    p.add_argument("--pid", type=int, default=None, help="which tproxy run (when several)")
    p.set_defaults(handler=flows_main)


def _choose(pid: int | None) -> Path:
    found = dict(instances())
    if pid is not None:
        if pid not in found:
            raise UsageError(f"no tproxy run with pid {pid} has a control socket in {run_dir()}")
        return found[pid]
    if not found:
        raise UsageError(f"no running tproxy run found (no control socket in {run_dir()})")
    if len(found) > 1:
        pids = ", ".join(str(p) for p in sorted(found))
        raise UsageError(f"several tproxy run processes ({pids}): choose one with --pid")
    return next(iter(found.values()))


def flows_main(args: argparse.Namespace) -> int:
    """Entry point of ``tproxy flows``."""
    path = _choose(args.pid)
    try:
        if args.kill is not None:
            answer = query(path, {"op": "kill", "id": args.kill})
            if answer.get("killed"):
                print(f"killed flow {args.kill}")
                return 0
            print(f"tproxy flows: no live flow {args.kill}", file=sys.stderr)
            return 1
        answer = query(path, {"op": "flows"})
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UsageError(f"{path}: permission denied (the control socket is root's)") from None
        raise UsageError(f"{path}: {exc}") from None
    flows = answer.get("flows", [])
    if args.json:
        print(json.dumps(flows, indent=2))
    else:
        print(format_table(flows))
    return 0


def format_table(flows: list[dict[str, Any]]) -> str:
    """The live flows as an aligned text table."""
    header = [
        "ID",
        "MODE",
        "PROTO",
        "CLIENT",
        "DESTINATION",
        "SNI",
        "AGE",
        "IDLE",
        "UP",
        "DOWN",
        "INTERCEPTORS",
    ]
    rows = [header]
    for f in flows:
        rows.append(
            [
                str(f["id"]),
                f["mode"],
                f.get("protocol") or protocol_of(f["mode"]),
                f["client"],
                f["destination"],
                f.get("sni") or "-",
                f"{f['age']:.1f}s",
                f"{f['idle']:.1f}s",
                str(f["bytes_read_up"]),
                str(f["bytes_read_down"]),
                ",".join(f.get("interceptors") or []) or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
