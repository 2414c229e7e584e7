#!/usr/bin/env python3
"""tproxy against no proxy, HAProxy, socat and pproxy on one namespace path, interleaved.

Entry point: ``scripts/bench`` (installs the tools, raises limits, runs this).

Path: client -- gateway -- server network namespaces (``netns-tests/nsharness``,
veth pairs, IPv4). The proxy under test runs in the gateway. Servers in the
server namespace: iperf3 and nginx, each on two ports: a *diverted* port
(5201, 80) that the gateway's TPROXY rules (installed once with ``tproxy
setup``) hand to whatever listens on 127.0.0.1:9091, and a *direct* port
(5202, 8080) that is only routed (no proxy) and that forward-mode proxies
target. Forward-mode proxies listen on the gateway's client-side address
(15201 -> 5202, 18080 -> 8080).

Configurations (``--only`` picks some):

==============  ===========  ==========================================================
name            mode         what
==============  ===========  ==========================================================
none            routed       no proxy: the gateway only forwards
tproxy          transparent  ``tproxy run`` without interceptors (passthrough)
tproxy-label    transparent  ``tproxy run -i label`` (empty text, both directions)
tproxy-copy     transparent  ``tproxy run --no-splice`` (the copy path; when available)
tproxy-w2       transparent  ``tproxy run --workers 2`` (when available)
haproxy-t       transparent  HAProxy, one thread, ``bind ... transparent``,
                             ``source 0.0.0.0 usesrc client``
tproxy-fwd      forward      ``tproxy run --mode forward:...`` (when available)
tproxy-fwd-i    forward      the same with ``-i scripts/bench_interceptors.py:Unchanged``:
                             every chunk both ways through an interceptor that returns it
                             unchanged (the copy path through the flow core)
tproxy-fwd-blk  forward      the same with ``-i block -o cidr=192.0.2.0/24``, which no flow
                             matches (block goes passthrough in ``start``: spliced)
tproxy-fwd-sel  forward      the same with ``-i UNCHANGED --when port=1``: the interceptor
                             selects no flow (``--when``), so none is built (spliced)
haproxy-f       forward      HAProxy, one thread, ``mode tcp``
socat-f         forward      ``socat TCP-LISTEN:...,fork TCP:...``
pproxy-f        forward      ``pproxy -l tunnel{...}://...`` (uvloop)
==============  ===========  ==========================================================

Every round runs every configuration once (A B C ... A B C ...): start the
proxy, iperf3 one stream up and down, four streams up and down, wrk with
``Connection: close`` (new connections/s) and keep-alive (requests/s), stop
it. CPU seconds per GiB come from ``/proc/<pid>/stat`` of the proxy's
processes around each iperf3 run. After the rounds, one memory pass per
configuration: a fresh proxy, 500 flows, then N flows, each after one
keep-alive HTTP request and its reply, then idle; resident memory per flow
is the RSS growth divided by the extra flows.

Then the chunk sizes (``--chunk-sizes LIST``; 16384,65536,262144,1048576 in a
full run, off with ``--quick`` unless given): the copy path, ``tproxy run -i
label -o text= -o direction=both --read-size SIZE`` (every chunk through the
interceptor both ways), a fresh process per size and round, iperf3 one stream
up and down (with the proxy's CPU s/GiB) and wrk keep-alive; two rounds (one
with ``--rounds 1``), sizes ascending in the first and descending in the
second, so that a drift of the machine does not favour one end. About 1.5
min with the default 4 sizes and ``--seconds`` (~10 s per size and round).
Before the churn, so that the throughput numbers come from the same stretch
of the run as the rounds.

Then the churn (``--churn SECONDS``; 600 in a full run, off with ``--quick``
or ``--churn 0``): ``tproxy`` alone (``--churn-configs`` may add others, each
for as long again), a fresh process, wrk with ``Connection: close`` back to back
in 10 s slices for SECONDS, its RSS sampled after each slice. The first 30 s
are warm-up; a least-squares line over the samples from then on gives the
slope. "Flat" means the fitted growth over that window is under
``CHURN_MAX_GROWTH`` (2 MiB) and under ``CHURN_MAX_SLOPE`` (1 % of the RSS at
the start) per minute; see ``Churn``.

Medians over rounds, spread as min..max. Ratios against HAProxy use the
HAProxy of the same mode (transparent or forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "netns-tests"))

import nsharness as H  # noqa: E402

PY = sys.executable
PROXY_PORT = 9091
IPERF_T, IPERF_D = 5201, 5202  # diverted, direct
HTTP_T, HTTP_D = 80, 8080
FWD_IPERF, FWD_HTTP = 15201, 18080
UNCHANGED = str(ROOT / "scripts" / "bench_interceptors.py") + ":Unchanged"
"""An interceptor that returns every chunk unchanged, both ways (loaded as FILE.py:NAME)."""
INSTANCE = "tpxbench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20

# The churn: slices of wrk, a warm-up, and what counts as flat. 2 MiB over the
# ~9.5 measured minutes of a full run (over two million flows on this
# machine) is under 1 byte per flow: anything kept per flow (a Python object
# is >= 16 bytes, a dict entry more) shows above it, and allocator noise (arenas, the few dozen
# flows in flight at a sample) stays below it. A 2 MiB cap alone would say
# nothing about a one-minute run, so the slope must also stay under 1 % of the
# RSS at the start per minute (linear growth that would take 100 min to double).
CHURN_SLICE = 10.0
CHURN_WARMUP = 30.0
CHURN_MAX_GROWTH = 2 * MiB
CHURN_MAX_SLOPE = 0.01  # of the RSS at the start, per minute

# The chunk-size phase: the copy path (an interceptor on every chunk, both ways)
# at each --read-size; what a full run measures, and how many rounds at most.
CHUNK_SIZES = (16384, 65536, 262144, 1048576)
CHUNK_ROUNDS = 2
CHUNK_DEFAULT = 262144  # tproxy run's own --read-size default, marked in the table
CHUNK_INTERCEPTOR = ("-i", "label", "-o", "text=", "-o", "direction=both")


# ----------------------------------------------------------------------------
# Process accounting: CPU and RSS of a process tree, from /proc.


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [
                    int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return kids


def tree(pids: list[int]) -> list[int]:
    """The pids and all their live descendants."""
    seen: list[int] = []
    todo = list(pids)
    for _ in range(100_000):
        if not todo:
            break
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU of the trees rooted at ``pids``, reaped children included."""
    ticks = 0
    roots = set(pids)
    for pid in tree(pids):
        with contextlib.suppress(OSError, IndexError):
            f = _stat(pid)
            ticks += int(f[11]) + int(f[12])  # utime, stime
            if pid in roots:
                ticks += int(f[13]) + int(f[14])  # cutime, cstime: reaped children
    return ticks / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in tree(pids):
        with contextlib.suppress(OSError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


# ----------------------------------------------------------------------------
# Configurations.


@dataclass
class Target:
    """Where the client aims for each service under one configuration."""

    host: str
    iperf: int
    http: int
    server_http: int
    """The port the server sees (forward proxies connect to the direct one)."""


@dataclass
class Config:
    name: str
    mode: str  # "none", "transparent", "forward"
    start: Callable[[Bench], list[subprocess.Popen[Any]]] | None
    note: str = ""

    @property
    def reference(self) -> str | None:
        return {"transparent": "haproxy-t", "forward": "haproxy-f"}.get(self.mode)


@dataclass
class Churn:
    """RSS of one proxy while short flows come and go, sampled after each wrk slice."""

    config: str
    seconds: float
    """How long the churn was asked to run (warm-up included)."""
    warmup: float = CHURN_WARMUP
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since the proxy came up, RSS bytes, flows served so far); the first at 0."""
    start: int = 0
    """Index of the first sample after warm-up: the RSS "at start"."""
    errors: int = 0
    """wrk socket errors and non-2xx replies, all slices."""

    @property
    def measured(self) -> list[tuple[float, int, int]]:
        return self.samples[self.start :] if self.start else []

    @property
    def window(self) -> float:
        """Seconds between the RSS at start and at end."""
        m = self.measured
        return m[-1][0] - m[0][0] if len(m) > 1 else 0.0

    @property
    def slope(self) -> float | None:
        """Least-squares RSS growth over the measured samples, bytes per minute."""
        m = self.measured
        if len(m) < 2:
            return None
        fit = statistics.linear_regression([t for t, _, _ in m], [float(r) for _, r, _ in m])
        return fit.slope * 60

    @property
    def growth(self) -> float | None:
        """The fitted growth over the measured window, bytes."""
        slope = self.slope
        return None if slope is None else slope * self.window / 60

    @property
    def flows(self) -> int:
        return self.samples[-1][2] if self.samples else 0

    @property
    def rate(self) -> float | None:
        """Flows per second after warm-up."""
        m = self.measured
        return (m[-1][2] - m[0][2]) / self.window if self.window else None

    @property
    def per_flow(self) -> float | None:
        """Fitted growth per flow served after warm-up, bytes."""
        m, growth = self.measured, self.growth
        done = m[-1][2] - m[0][2] if m else 0
        return growth / done if growth is not None and done else None

    @property
    def flat(self) -> bool | None:
        """Below both thresholds (module docstring); None when too short to tell."""
        slope, growth = self.slope, self.growth
        if slope is None or growth is None:
            return None
        start_rss = self.measured[0][1]
        return growth < CHURN_MAX_GROWTH and slope < CHURN_MAX_SLOPE * start_rss

    @property
    def verdict(self) -> str:
        return {True: "flat", False: "**growing**", None: "too short"}[self.flat]

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "warmup": self.warmup,
            "samples": self.samples,
            "start": self.start,
            "errors": self.errors,
            "slope_bytes_per_min": self.slope,
            "growth_bytes": self.growth,
            "flat": self.flat,
        }


@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    churn: dict[str, Churn] = field(default_factory=dict)
    chunks: dict[int, str] = field(default_factory=dict)
    """--read-size -> the name its values are kept under (the chunk-size phase)."""
    chunk_rounds: int = 0

    def add(self, config: str, metric: str, value: float) -> None:
        self.values.setdefault(config, {}).setdefault(metric, []).append(value)

    def fail(self, config: str, what: str) -> None:
        self.errors.setdefault(config, []).append(what)

    def median(self, config: str, metric: str) -> float | None:
        vals = self.values.get(config, {}).get(metric)
        return statistics.median(vals) if vals else None

    def spread(self, config: str, metric: str) -> tuple[float, float] | None:
        vals = self.values.get(config, {}).get(metric)
        return (min(vals), max(vals)) if vals else None


METRICS: list[tuple[str, str, bool]] = [
    # key, label, higher is better
    ("t1_up", "1 stream up, Gbit/s", True),
    ("t1_down", "1 stream down, Gbit/s", True),
    ("t4_up", "4 streams up, Gbit/s", True),
    ("t4_down", "4 streams down, Gbit/s", True),
    ("cps", "new connections/s", True),
    ("cps_p50", "  latency p50, ms", False),
    ("cps_p99", "  latency p99, ms", False),
    ("cps_cpu", "  proxy CPU us per connection", False),
    ("cps_busy", "  whole machine CPU busy, %", False),
    ("rps", "keep-alive requests/s", True),
    ("rps_p50", "  latency p50, ms", False),
    ("rps_p99", "  latency p99, ms", False),
    ("rps_cpu", "  proxy CPU us per request", False),
    ("cpu_gib", "CPU s/GiB (iperf3)", False),
    ("mem_flow", "RSS KiB per idle flow", False),
]


class Bench:
    """The topology, the servers, the routing, and the measurements."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.topo = H.Topology(log_dir=work / "logs")
        self.client, self.gw, self.server = self.topo.namespaces
        self.env = dict(os.environ, TPROXY_STATE_DIR=str(work / "state"))
        self.routing = False
        self.iperf: dict[int, subprocess.Popen[Any]] = {}
        self.results = Results()

    # -- set-up ---------------------------------------------------------------

    def setup(self) -> None:
        for ns in (self.client, self.gw, self.server):
            ns.sysctl({
                "net.ipv4.ip_local_port_range": "1024 65000",
                "net.ipv4.tcp_tw_reuse": 1,
                "net.core.somaxconn": 8192,
                "net.ipv4.tcp_max_syn_backlog": 8192,
            })  # fmt: skip
        srv = self.topo.server_ip4
        for port in (IPERF_T, IPERF_D):
            self.iperf[port] = H.iperf3_server(self.server, srv, port)
        conf = self.work / "nginx.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        conf.write_text(
            NGINX_CONF.format(work=self.work, srv=srv, ports=(HTTP_T, HTTP_D), nofile=nofile)
        )
        self.nginx = self.server.popen("nginx", "-c", conf, "-p", self.work, log_name="nginx")
        for port in (HTTP_T, HTTP_D):
            self.server.wait_port(port, srv, proc=self.nginx)
        self.install_routing()

    def install_routing(self) -> None:
        """The TPROXY rules for the diverted ports, once, with ``tproxy setup``."""
        ports = f"{IPERF_T},{HTTP_T}"
        self.routing = True
        self.gw.python(
            "-m", "tproxy", "setup", self.topo.gw_in, self.topo.gw_out, "-p", ports,
            "--proxy-port", PROXY_PORT, "--ipv4", "--instance", INSTANCE,
            env=self.env, cwd=ROOT,
        )  # fmt: skip

    def close(self) -> None:
        try:
            if self.routing:
                self.gw.python(
                    "-m", "tproxy", "teardown", "--instance", INSTANCE,
                    env=self.env, cwd=ROOT, check=False,
                )  # fmt: skip
        finally:
            self.topo.close()

    # -- targets ----------------------------------------------------------------

    def target(self, cfg: Config) -> Target:
        srv, gw = self.topo.server_ip4, self.topo.gw_in_ip4
        if cfg.mode == "none":
            return Target(srv, IPERF_D, HTTP_D, HTTP_D)
        if cfg.mode == "transparent":
            return Target(srv, IPERF_T, HTTP_T, HTTP_T)
        return Target(gw, FWD_IPERF, FWD_HTTP, HTTP_D)

    # -- proxies ----------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, cfg: Config) -> Iterator[list[int]]:
        procs = cfg.start(self) if cfg.start else []
        try:
            if cfg.mode == "transparent":
                self.gw.wait_port(PROXY_PORT, "127.0.0.1", timeout=20)
            elif cfg.mode == "forward":
                for port in (FWD_IPERF, FWD_HTTP):
                    self.gw.wait_port(port, self.topo.gw_in_ip4, timeout=20)
            yield [p.pid for p in procs]
            for p in procs:
                if p.poll() is not None:
                    raise H.HarnessError(f"{cfg.name} exited {p.returncode}: {self.gw.read_log(p)}")
        finally:
            for p in procs:
                self.gw.stop(p, timeout=15)

    def tproxy(
        self, *extra: str, log: str = "tproxy", tree: Path = ROOT
    ) -> Callable[[Bench], list[Any]]:
        def start(b: Bench) -> list[Any]:
            return [
                b.gw.popen(
                    PY, "-m", "tproxy", "run", "-q", "--grace", "1", *extra,
                    log_name=log, cwd=tree, env=b.env,
                )
            ]  # fmt: skip

        return start

    def tproxy_transparent(self, *extra: str, tree: Path = ROOT) -> Callable[[Bench], list[Any]]:
        return self.tproxy("--mode", f"transparent@127.0.0.1:{PROXY_PORT}", *extra, tree=tree)

    def tproxy_forward(self, *extra: str) -> Callable[[Bench], list[Any]]:
        srv, gw = self.topo.server_ip4, self.topo.gw_in_ip4
        return self.tproxy(
            "--mode", f"forward:{srv}:{IPERF_D}@{gw}:{FWD_IPERF}",
            "--mode", f"forward:{srv}:{HTTP_D}@{gw}:{FWD_HTTP}",
            "--allow-client", self.topo.client_net4,
            *extra,
        )  # fmt: skip

    def haproxy(self, transparent: bool) -> Callable[[Bench], list[Any]]:
        def start(b: Bench) -> list[Any]:
            srv, gw = b.topo.server_ip4, b.topo.gw_in_ip4
            if transparent:
                body = HAPROXY_TRANSPARENT.format(port=PROXY_PORT)
            else:
                body = HAPROXY_FORWARD.format(
                    gw=gw, srv=srv, fi=FWD_IPERF, fh=FWD_HTTP, di=IPERF_D, dh=HTTP_D
                )
            conf = b.work / f"haproxy-{'t' if transparent else 'f'}.cfg"
            # Descriptors: two per connection, two per pipe, all under RLIMIT_NOFILE.
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            maxconn = b.args.flows + 600
            maxpipes = max(16, min(maxconn // 4, (limit - 2 * maxconn - 200) // 2))
            conf.write_text(HAPROXY_GLOBAL.format(maxconn=maxconn, maxpipes=maxpipes) + body)
            return [b.gw.popen("haproxy", "-db", "-f", conf, log_name="haproxy")]

        return start

    def socat(self, b: Bench) -> list[Any]:
        srv, gw = b.topo.server_ip4, b.topo.gw_in_ip4
        return [
            b.gw.popen(
                "socat", f"TCP-LISTEN:{lp},bind={gw},fork,reuseaddr,backlog=4096",
                f"TCP:{srv}:{dp}", log_name=f"socat-{lp}",
            )
            for lp, dp in ((FWD_IPERF, IPERF_D), (FWD_HTTP, HTTP_D))
        ]  # fmt: skip

    def pproxy(self, b: Bench) -> list[Any]:
        srv, gw = b.topo.server_ip4, b.topo.gw_in_ip4
        return [
            b.gw.popen(
                PY, "-m", "pproxy",
                "-l", f"tunnel{{{srv}:{IPERF_D}}}://{gw}:{FWD_IPERF}",
                "-l", f"tunnel{{{srv}:{HTTP_D}}}://{gw}:{FWD_HTTP}",
                log_name="pproxy",
            )
        ]  # fmt: skip

    # -- measurements -------------------------------------------------------------

    def iperf3(self, cfg: Config, t: Target, pids: list[int], key: str, *flags: str) -> None:
        cpu0 = cpu_seconds(pids) if pids else 0.0
        try:
            report = H.iperf3_client(
                self.client, t.host, "-t", self.args.seconds, *flags,
                port=t.iperf, timeout=self.args.seconds + 30,
            )  # fmt: skip
        except (H.HarnessError, H.CommandError, H.CommandTimeout, json.JSONDecodeError) as exc:
            self.results.fail(cfg.name, f"iperf3 {key}: {str(exc)[:300]}")
            self.restart_iperf(t)
            return
        cpu = (cpu_seconds(pids) - cpu0) if pids else None
        received = report["end"]["sum_received"]
        self.results.add(cfg.name, key, received["bits_per_second"] / 1e9)
        if cpu is not None and received["bytes"]:
            self.results.add(cfg.name, "cpu_gib", cpu / (received["bytes"] / 2**30))

    def restart_iperf(self, t: Target) -> None:
        port = IPERF_D if t.iperf in (IPERF_D, FWD_IPERF) else IPERF_T
        with contextlib.suppress(Exception):
            self.server.stop(self.iperf[port])
        self.iperf[port] = H.iperf3_server(self.server, self.topo.server_ip4, port)

    def wrk(self, cfg: Config, t: Target, pids: list[int], key: str, *flags: str) -> None:
        url = f"http://{t.host}:{t.http}/"
        cpu0 = cpu_seconds(pids) if pids else 0.0
        busy0, total0 = machine_cpu()
        try:
            out = self.client.run(
                "wrk", "-t1", f"-c{self.args.connections}", f"-d{self.args.seconds}s",
                "--latency", *flags, url, timeout=self.args.seconds + 30,
            ).stdout  # fmt: skip
        except (H.CommandError, H.CommandTimeout) as exc:
            self.results.fail(cfg.name, f"wrk {key}: {str(exc)[:300]}")
            return
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not rate:
            self.results.fail(cfg.name, f"wrk {key}: no rate in {out[-300:]!r}")
            return
        self.results.add(cfg.name, key, float(rate.group(1)))
        if key == "cps":
            # Whether a core was left for more proxy processes (the --workers target).
            busy1, total1 = machine_cpu()
            if total1 > total0:
                self.results.add(cfg.name, "cps_busy", 100 * (busy1 - busy0) / (total1 - total0))
        done = re.search(r"(\d+) requests in", out)
        if pids and done and int(done.group(1)):
            per = (cpu_seconds(pids) - cpu0) / int(done.group(1)) * 1e6
            self.results.add(cfg.name, f"{key}_cpu", per)
        for pct in ("50", "99"):
            m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if m:
                scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
                self.results.add(cfg.name, f"{key}_p{pct}", float(m.group(1)) * scale)
        errors = re.search(r"Socket errors: (.*)", out)
        if errors:
            self.results.fail(cfg.name, f"wrk {key}: socket errors {errors.group(1)}")
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            self.results.fail(cfg.name, f"wrk {key}: {non2xx.group(1)} non-2xx responses")

    def round(self, cfg: Config) -> None:
        t = self.target(cfg)
        with self.running(cfg) as pids:
            self.check_serves(t)
            self.iperf3(cfg, t, pids, "t1_up")
            self.iperf3(cfg, t, pids, "t1_down", "-R")
            self.iperf3(cfg, t, pids, "t4_up", "-P", "4")
            self.iperf3(cfg, t, pids, "t4_down", "-P", "4", "-R")
            self.wrk(cfg, t, pids, "cps", "-H", "Connection: close")
            self.wrk(cfg, t, pids, "rps")

    def chunk(self, cfg: Config) -> None:
        """The chunk-size phase, one size: 1 stream up and down, keep-alive requests/s."""
        t = self.target(cfg)
        with self.running(cfg) as pids:
            self.check_serves(t)
            self.iperf3(cfg, t, pids, "t1_up")
            self.iperf3(cfg, t, pids, "t1_down", "-R")
            self.wrk(cfg, t, pids, "rps")

    def check_serves(self, t: Target) -> None:
        """One real request through the configuration before anything is measured."""
        self.client.run("curl", "-sS", "--fail", "-o", "/dev/null", "--max-time", "10",
                        f"http://{t.host}:{t.http}/", timeout=15)  # fmt: skip

    def memory(self, cfg: Config) -> None:
        """RSS growth per idle flow between ``base`` and ``flows`` idle flows."""
        t = self.target(cfg)
        base, total = 500, self.args.flows
        with self.running(cfg) as pids:
            holders = []
            try:
                before = None
                for count in (base, total - base):
                    proc = self.client.popen(
                        PY, ROOT / "scripts" / "bench_flows.py", t.host, t.http, count,
                        "--request", "--timeout", "60",
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, log_name="flows",
                    )  # fmt: skip
                    holders.append(proc)
                    line = proc.stdout.readline().decode() if proc.stdout else ""
                    if not line.startswith("connected"):
                        raise H.HarnessError(f"flow holder: {line!r} {self.client.read_log(proc)}")
                    want = count + (base if before is not None else 0)
                    self.wait_established(want, t.server_http)
                    time.sleep(0.5)  # let the proxy finish setting the last flows up
                    if before is None:
                        before = rss_bytes(pids)
                after = rss_bytes(pids)
                assert before is not None
                self.results.add(cfg.name, "mem_flow", (after - before) / (total - base) / 1024)
            except (H.HarnessError, H.CommandError, H.CommandTimeout, OSError) as exc:
                self.results.fail(cfg.name, f"memory: {str(exc)[:300]}")
            finally:
                for proc in holders:
                    with contextlib.suppress(OSError):
                        if proc.stdin:
                            proc.stdin.close()
                    self.client.stop(proc)

    def churn(self, cfg: Config, seconds: float) -> Churn:
        """Short flows through a fresh proxy for ``seconds``, its RSS after every slice.

        wrk (``Connection: close``, so every request is a flow of its own) runs back
        to back in slices of CHURN_SLICE seconds; after each, once the last flows
        have had a moment to close, the proxy's RSS is sampled and a progress line
        printed. Failures are recorded in the results; what was sampled is kept.
        """
        t = self.target(cfg)
        url = f"http://{t.host}:{t.http}/"
        result = Churn(cfg.name, seconds, warmup=min(CHURN_WARMUP, seconds / 2))
        self.results.churn[cfg.name] = result
        try:
            with self.running(cfg) as pids:
                began = time.monotonic()
                result.samples.append((0.0, rss_bytes(pids), 0))
                while (left := seconds - (time.monotonic() - began)) >= 1:
                    d = max(1, min(round(CHURN_SLICE), int(left)))
                    out = self.client.run(
                        "wrk", "-t1", f"-c{self.args.connections}", f"-d{d}s",
                        "-H", "Connection: close", url, timeout=d + 30,
                    ).stdout  # fmt: skip
                    done = re.search(r"(\d+) requests in", out)
                    if not done:
                        raise H.HarnessError(f"wrk: no request count in {out[-300:]!r}")
                    errors = re.search(r"Socket errors: (.*)", out)
                    if errors:
                        result.errors += sum(int(n) for n in re.findall(r"\d+", errors.group(1)))
                    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                    if non2xx:
                        result.errors += int(non2xx.group(1))
                    time.sleep(0.3)  # let the last flows of the slice close
                    rss = rss_bytes(pids)
                    if not rss:
                        raise H.HarnessError(f"{cfg.name} is gone")
                    now = time.monotonic() - began
                    flows = result.samples[-1][2] + int(done.group(1))
                    result.samples.append((round(now, 1), rss, flows))
                    if not result.start and now >= result.warmup:
                        result.start = len(result.samples) - 1
                    print(f"  churn  {cfg.name:13s} {now:5.0f}/{seconds:.0f}s "
                          f"{flows:>10,} flows {int(done.group(1)) / d:7,.0f}/s "
                          f"RSS {rss / MiB:6.1f} MiB", flush=True)  # fmt: skip
        except (H.HarnessError, H.CommandError, H.CommandTimeout, OSError) as exc:
            self.results.fail(cfg.name, f"churn: {str(exc)[:300]}")
        if result.errors:
            self.results.fail(cfg.name, f"churn: {result.errors} wrk socket errors/non-2xx")
        return result

    def profile(self, cfg: Config, out: Path, seconds: int) -> None:
        """py-spy on the proxy while wrk runs (new connections, or keep-alive with
        ``--profile-keepalive``); top frames."""
        t = self.target(cfg)
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        close = [] if self.args.profile_keepalive else ["-H", "Connection: close"]
        with self.running(cfg) as pids:
            wrk = self.client.popen(
                "wrk", "-t1", f"-c{self.args.connections}", f"-d{seconds + 2}s", "--latency",
                *close, f"http://{t.host}:{t.http}/", log_name="wrk",
            )  # fmt: skip
            time.sleep(1)
            if self.args.profile_with:  # another profiler, e.g. "perf record -g -o FILE"
                cmd = [*self.args.profile_with.split(), "-p", str(pids[0])]
                r = subprocess.run(
                    ["timeout", "-s", "INT", str(seconds), *cmd],
                    capture_output=True, text=True, timeout=seconds + 60,
                )  # fmt: skip
                print(r.stdout[-6000:], r.stderr[-6000:])
                wrk.wait(timeout=60)
                print(self.client.read_log(wrk))
                return
            subprocess.run(
                [spy, "record", "--pid", str(pids[0]), "--duration", str(seconds), "--rate", "200",
                 "--format", "raw", "--nonblocking", "-o", str(out),
                 *(["--native"] if self.args.native else [])],
                check=True, capture_output=True, timeout=seconds + 60,
            )  # fmt: skip
            wrk.wait(timeout=60)
            print(self.client.read_log(wrk))
        print_profile(out)

    def wait_established(self, count: int, port: int) -> None:
        """Until the server holds ``count`` connections on ``port`` (bounded)."""
        deadline = time.monotonic() + 30
        n = -1
        for _ in range(600):
            out = self.server.run(
                "ss", "-Htn", "state", "established", f"( sport = :{port} )", timeout=30
            ).stdout
            n = len(out.splitlines())
            if n >= count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if n < count:
            raise H.HarnessError(f"only {n} of {count} flows reached the server")


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 19000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_header_timeout 600s;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    server {{
        listen {srv}:{ports[0]} backlog=8192 reuseport;
        listen {srv}:{ports[1]} backlog=8192 reuseport;
        location / {{ return 200 "hello from the server namespace\\n"; }}
    }}
}}
"""

HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn {maxconn}
    maxpipes {maxpipes}
defaults
    mode tcp
    option splice-auto
    timeout connect 10s
    timeout client 600s
    timeout server 600s
"""

HAPROXY_TRANSPARENT = """\
frontend diverted
    bind 127.0.0.1:{port} transparent
    default_backend original
backend original
    source 0.0.0.0 usesrc client
    server original 0.0.0.0:0
"""

HAPROXY_FORWARD = """\
listen iperf
    bind {gw}:{fi}
    server s {srv}:{di}
listen http
    bind {gw}:{fh}
    server s {srv}:{dh}
"""


# ----------------------------------------------------------------------------
# The run.


def _tproxy_flags(tree: Path = ROOT) -> str:
    try:
        return subprocess.run(
            [PY, "-m", "tproxy", "run", "--help"], capture_output=True, text=True, cwd=tree,
            timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""


def configs(b: Bench) -> list[Config]:
    help_text = _tproxy_flags()
    found = [
        Config("none", "none", None, "routed by the gateway, no proxy"),
        Config("tproxy", "transparent", b.tproxy_transparent(), "passthrough"),
        Config(
            "tproxy-label",
            "transparent",
            b.tproxy_transparent("-i", "label", "-o", "text=", "-o", "direction=both"),
            "-i label -o text= -o direction=both: every chunk both ways through the "
            "interceptor (copy path), with an empty label so that iperf3's and HTTP's "
            "framing stay intact",
        ),
    ]
    if b.args.alt_tree:
        # Another checkout (e.g. with a patch), A/B against this one in the same run.
        # Needs a venv without an editable install of either (TPROXY_VENV).
        alt = Path(b.args.alt_tree).resolve()
        note = b.args.alt_note or f"from {alt}"
        found.append(Config("tproxy-alt", "transparent", b.tproxy_transparent(tree=alt), note))
        found.append(
            Config(
                "tproxy-alt-label",
                "transparent",
                b.tproxy_transparent(
                    "-i", "label", "-o", "text=", "-o", "direction=both", tree=alt
                ),
                f"{note}, -i label as tproxy-label",
            )
        )
        if "--workers" in _tproxy_flags(alt):
            w2 = b.tproxy_transparent("--workers", "2", tree=alt)
            found.append(Config("tproxy-alt-w2", "transparent", w2, f"{note}, 2 workers"))
    if "--no-splice" in help_text:
        found.append(
            Config("tproxy-copy", "transparent", b.tproxy_transparent("--no-splice"), "--no-splice")
        )
    if "--workers" in help_text:
        found.append(
            Config("tproxy-w2", "transparent", b.tproxy_transparent("--workers", "2"), "2 workers")
        )
    found.append(Config("haproxy-t", "transparent", b.haproxy(True), "1 thread"))
    if "forward:" in help_text:
        found.append(Config("tproxy-fwd", "forward", b.tproxy_forward(), "passthrough"))
        found.append(
            Config(
                "tproxy-fwd-i",
                "forward",
                b.tproxy_forward("-i", UNCHANGED),
                "every chunk both ways through an interceptor that returns it unchanged",
            )
        )
        found.append(
            Config(
                "tproxy-fwd-blk",
                "forward",
                b.tproxy_forward("-i", "block", "-o", "cidr=192.0.2.0/24"),
                "-i block -o cidr=192.0.2.0/24, matching no flow",
            )
        )
        if "--when" in help_text:
            found.append(
                Config(
                    "tproxy-fwd-sel",
                    "forward",
                    b.tproxy_forward("-i", UNCHANGED, "--when", "port=1"),
                    "-i ... --when port=1, selecting no flow",
                )
            )
    found += [
        Config("haproxy-f", "forward", b.haproxy(False), "1 thread"),
        Config("socat-f", "forward", b.socat, "fork per connection"),
        Config("pproxy-f", "forward", b.pproxy, "tunnel, uvloop"),
    ]
    return found


def chunk_configs(b: Bench, sizes: list[int]) -> list[tuple[int, Config]]:
    """The copy path at each --read-size; none when this tree's tproxy has no such flag."""
    if "--read-size" not in _tproxy_flags():
        b.results.fail("chunk sizes", "tproxy run has no --read-size on this tree")
        return []
    return [
        (
            size,
            Config(
                f"tproxy-label-r{size}",
                "transparent",
                b.tproxy_transparent(*CHUNK_INTERCEPTOR, "--read-size", str(size)),
                f"{' '.join(CHUNK_INTERCEPTOR)} --read-size {size}",
            ),
        )
        for size in sizes
    ]


def parse_sizes(text: str) -> list[int]:
    """``--chunk-sizes``: comma-separated byte counts; '' or 'none' for none."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of byte counts: {text!r}") from None
    if any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"byte counts must be positive: {text!r}")
    return list(dict.fromkeys(sizes))


def machine() -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str], pattern: str = r"(\d+\.\d+(\.\d+)?)") -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            m = re.search(pattern, p.stdout + p.stderr)
            return m.group(1) if m else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "missing"

    def py_version(module: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(module)
        except Exception:
            return "missing"

    os_name = ""
    with contextlib.suppress(OSError):
        os_name = "; " + platform.freedesktop_os_release().get("PRETTY_NAME", "")
    socat = version(["socat", "-V"], r"socat version ([\d.]+)")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores (`nproc`), shared by client, proxy and server",
        f"- Kernel: Linux {platform.release()}{os_name}",
        f"- Python {platform.python_version()}, trio {py_version('trio')}, "
        f"pproxy {py_version('pproxy')}, uvloop {py_version('uvloop')}",
        f"- HAProxy {version(['haproxy', '-v'])}, socat {socat}, "
        f"nginx {version(['nginx', '-v'])}, iperf3 {version(['iperf3', '--version'])}, "
        f"wrk {version(['wrk', '-v'])}",
    ]


def print_profile(path: Path, top: int = 40) -> None:
    """Inclusive and self share of samples per frame, from py-spy's collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    print(f"profile: {total} samples in {path}")
    for title, table_ in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title} --")
        for frame, n in sorted(table_.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{100 * n / max(total, 1):5.1f}%  {frame}")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(results: Results, cfgs: list[Config]) -> list[str]:
    lines = [
        "| metric | config | median | spread (min..max) | vs HAProxy (same mode) | vs no proxy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, label, _ in METRICS:
        for cfg in cfgs:
            med = results.median(cfg.name, key)
            if med is None:
                continue
            spread = results.spread(cfg.name, key)
            ref = cfg.reference
            vs_ha = ratio(med, results.median(ref, key)) if ref and ref != cfg.name else "-"
            vs_none = ratio(med, results.median("none", key)) if cfg.name != "none" else "-"
            spread_s = f"{fmt(spread[0])}..{fmt(spread[1])}" if spread else "-"
            lines.append(
                f"| {label} | {cfg.name} | {fmt(med)} | {spread_s} | {vs_ha} | {vs_none} |"
            )
    return lines


TARGETS: list[tuple[str, str, str, str, float, bool]] = [
    # (target, ours, theirs, metric, goal, lower is better); "{t}" is tproxy or tproxy-alt
    ("passthrough, 1 stream up >= 1.2x HAProxy-t", "{t}", "haproxy-t", "t1_up", 1.2, False),
    ("passthrough, 1 stream down >= 1.2x HAProxy-t", "{t}", "haproxy-t", "t1_down", 1.2, False),
    ("passthrough, 4 streams up >= 1.0x HAProxy-t", "{t}", "haproxy-t", "t4_up", 1.0, False),
    ("passthrough, 4 streams down >= 1.0x HAProxy-t", "{t}", "haproxy-t", "t4_down", 1.0, False),
    ("label, 1 stream up >= 1.5x pproxy", "tproxy-label", "pproxy-f", "t1_up", 1.5, False),
    ("label, 1 stream down >= 1.5x pproxy", "tproxy-label", "pproxy-f", "t1_down", 1.5, False),
    ("new conn/s, 1 worker >= 1.0x pproxy", "{t}", "pproxy-f", "cps", 1.0, False),
    ("new conn/s, 1 worker >= 2x pproxy (goal)", "{t}", "pproxy-f", "cps", 2.0, False),
    ("new conn/s, 1 worker >= 0.5x HAProxy-t (goal)", "{t}", "haproxy-t", "cps", 0.5, False),
    ("new conn/s, 2 workers >= 1.6x 1 worker", "{t}-w2", "{t}", "cps", 1.6, False),
    ("forward mode new conn/s >= 1.0x pproxy", "tproxy-fwd", "pproxy-f", "cps", 1.0, False),
    # issue 11: "-i" is tproxy-fwd-i (an interceptor returning every chunk unchanged);
    # intercepted flows at the cost of passthrough ones
    ("-i, keep-alive >= 0.8x passthrough", "tproxy-fwd-i", "tproxy-fwd", "rps", 0.8, False),
    ("-i, keep-alive >= 1.0x pproxy", "tproxy-fwd-i", "pproxy-f", "rps", 1.0, False),
    ("-i, new conn/s >= 0.7x passthrough", "tproxy-fwd-i", "tproxy-fwd", "cps", 0.7, False),
    ("-i, new conn/s >= 1.5x pproxy", "tproxy-fwd-i", "pproxy-f", "cps", 1.5, False),
    ("-i, 1 stream up >= 0.9x label", "tproxy-fwd-i", "tproxy-label", "t1_up", 0.9, False),
    ("-i, 1 stream down >= 0.9x label", "tproxy-fwd-i", "tproxy-label", "t1_down", 0.9, False),
    ("block, no match, conn/s >= 0.9x fwd", "tproxy-fwd-blk", "tproxy-fwd", "cps", 0.9, False),
    # issue 12: a flow that no interceptor selects costs what a passthrough flow costs
    ("--when, unselected, conn/s ~ fwd", "tproxy-fwd-sel", "tproxy-fwd", "cps", 0.9, False),
    ("--when, unselected, keep-alive ~ fwd", "tproxy-fwd-sel", "tproxy-fwd", "rps", 0.9, False),
    ("keep-alive req/s >= 1.0x pproxy", "{t}", "pproxy-f", "rps", 1.0, False),
    ("keep-alive req/s >= 1.0x HAProxy-t (goal)", "{t}", "haproxy-t", "rps", 1.0, False),
    ("RSS per idle flow <= 3x HAProxy-t", "{t}", "haproxy-t", "mem_flow", 3.0, True),
]


def fmt_churn(c: Churn) -> str:
    """One line: RSS at start and end, slope, fitted growth, flows."""
    if c.flat is None:
        return f"{len(c.samples)} samples, {c.flows:,} flows"
    m = c.measured
    assert c.slope is not None and c.growth is not None and c.per_flow is not None
    return (
        f"RSS {m[0][1] / MiB:.1f} -> {m[-1][1] / MiB:.1f} MiB, {c.slope / 1024:+.0f} KiB/min, "
        f"fitted {c.growth / MiB:+.2f} MiB over {c.window / 60:.1f} min "
        f"({c.per_flow:+.2f} B/flow), {c.flows:,} flows"
    )


def churn_section(args: argparse.Namespace, results: Results) -> list[str]:
    """The churn: how it was run, a row per configuration, every sample, a blank line."""
    if not results.churn:
        return []
    names = ", ".join(f"`{n}`" for n in results.churn)
    warmup = min(c.warmup for c in results.churn.values())
    fewest = min(c.flows for c in results.churn.values())
    per_flow = (
        f" (with the {fewest:,} flows churned here, {CHURN_MAX_GROWTH / MiB:.0f} MiB is "
        f"{CHURN_MAX_GROWTH / fewest:.1f} bytes per flow: anything kept per flow shows)"
        if fewest
        else ""
    )
    lines = [
        "## Churn",
        "",
        f"{names} alone, not interleaved, each a fresh process after the rounds: wrk with "
        f"one thread, {args.connections} connections and `Connection: close` (a flow per "
        f"request) back to back in {CHURN_SLICE:.0f} s slices for {args.churn:.0f} s, the "
        f"proxy's RSS sampled after each slice. RSS at start is the first sample after "
        f"{warmup:.0f} s of warm-up; the slope is a least-squares fit over the samples from "
        f"there to the end, the fitted growth that slope over the same window. Flat: fitted "
        f"growth under {CHURN_MAX_GROWTH / MiB:.0f} MiB and slope under "
        f"{CHURN_MAX_SLOPE:.0%} of the RSS at start per minute{per_flow}.",
    ]
    if "haproxy-t" not in results.churn:
        lines[-1] += (
            " HAProxy-t is not churned: it would add as long again to the run "
            "(`--churn-configs tproxy,haproxy-t`)."
        )
    lines += [
        "",
        "| config | flows | flows/s | RSS at launch, MiB | at start | at end | end - start "
        "| slope, KiB/min | fitted growth, MiB | per flow, B | wrk errors | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, c in results.churn.items():
        m = c.measured
        if c.flat is None or not m:
            lines.append(f"| {name} | {c.flows:,} | - | - | - | - | - | - | - | - "
                         f"| {c.errors:,} | {c.verdict} |")  # fmt: skip
            continue
        assert c.slope is not None and c.growth is not None and c.per_flow is not None
        rate = f"{c.rate:,.0f}" if c.rate is not None else "-"
        lines.append(
            f"| {name} | {c.flows:,} | {rate} | {c.samples[0][1] / MiB:.1f} "
            f"| {m[0][1] / MiB:.1f} | {m[-1][1] / MiB:.1f} | {(m[-1][1] - m[0][1]) / MiB:+.2f} "
            f"| {c.slope / 1024:+.0f} | {c.growth / MiB:+.2f} | {c.per_flow:+.2f} "
            f"| {c.errors:,} | {c.verdict} |"
        )
    lines += ["", "RSS samples, seconds since the proxy came up : MiB (warm-up before `|`):", ""]
    for name, c in results.churn.items():
        cells = [f"{t:.0f}:{r / MiB:.2f}" for t, r, _ in c.samples]
        if c.start:
            cells.insert(c.start, "|")
        lines.append(f"- `{name}`: " + " ".join(cells))
    return [*lines, ""]


def kib(size: int) -> str:
    """16 KiB, 1 MiB, 1,500 B."""
    if size % MiB == 0:
        return f"{size // MiB:,} MiB"
    return f"{size // 1024:,} KiB" if size % 1024 == 0 else f"{size:,} B"


def chunk_section(args: argparse.Namespace, results: Results) -> list[str]:
    """The copy path by --read-size: a row per size, medians (min..max), a blank line."""
    if not results.chunks:
        return []

    def cell(name: str, key: str) -> str:
        med, spread = results.median(name, key), results.spread(name, key)
        if med is None or spread is None:
            return "-"
        return (
            fmt(med)
            if spread[0] == spread[1]
            else f"{fmt(med)} ({fmt(spread[0])}..{fmt(spread[1])})"
        )

    def best(key: str, higher: bool) -> str:
        got = [
            (m, s) for s, n in results.chunks.items() if (m := results.median(n, key)) is not None
        ]
        if not got:
            return "-"
        return kib((max if higher else min)(got)[1])

    rounds = results.chunk_rounds
    lines = [
        "## Copy path by chunk size",
        "",
        f"How the copy path's throughput and CPU per byte depend on `--read-size` (the "
        f"largest read per chunk, so the number of chunks and trips through the "
        f"interceptor per GiB), with `tproxy run {' '.join(CHUNK_INTERCEPTOR)}` (every "
        f"chunk through the interceptor, both ways). A fresh process per size and round, "
        f"{rounds} round{'s' if rounds != 1 else ''} after the rounds above (sizes "
        f"ascending, then descending), {args.seconds} s per run, medians (min..max); CPU "
        f"s/GiB is the proxy's over both iperf3 runs. Fastest here: 1 stream up at "
        f"{best('t1_up', True)}, down at {best('t1_down', True)}; least CPU per GiB at "
        f"{best('cpu_gib', False)}.",
        "",
        "| --read-size | 1 stream up, Gbit/s | 1 stream down, Gbit/s | CPU s/GiB (iperf3) "
        "| keep-alive requests/s | proxy CPU us per request |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size, name in results.chunks.items():
        cells = " | ".join(cell(name, k) for k in ("t1_up", "t1_down", "cpu_gib", "rps", "rps_cpu"))
        default = ", default" if size == CHUNK_DEFAULT else ""
        lines.append(f"| {size:,} ({kib(size)}{default}) | {cells} |")
    return [*lines, ""]


def targets(results: Results) -> list[str]:
    """The issue's targets as ratios from this run, met or not; a column per tproxy tree."""
    trees = ["tproxy"] + (["tproxy-alt"] if "tproxy-alt" in results.values else [])
    head = " | ".join("this tree" if t == "tproxy" else "alt tree" for t in trees)
    lines = [f"| target | {head} |", "|---|" + "---:|" * len(trees)]
    for what, ours, theirs, key, goal, lower in TARGETS:
        cells = []
        for t in trees:
            a = results.median(ours.format(t=t), key)
            b = results.median(theirs.format(t=t), key)
            if a is None or b is None or b == 0:
                cells.append("not measured")
                continue
            r = a / b
            met = r <= goal if lower else r >= goal
            cells.append(f"{r:.2f}x {'met' if met else '**missed**'}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    cells = []
    for t in trees:
        c = results.churn.get(t)
        if c is None or c.flat is None or c.slope is None or c.growth is None:
            cells.append("not measured")
            continue
        short = f" (only {c.seconds / 60:g} min)" if c.seconds < 600 else ""
        cells.append(f"{c.growth / MiB:+.2f} MiB, {c.slope / 1024:+.0f} KiB/min "
                     f"{'met' if c.flat else '**missed**'}{short}")  # fmt: skip
    lines.append("| RSS flat over a 10-minute churn (see Churn) | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~3 minutes: 2 rounds, short runs")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--seconds", type=int, default=None, help="per iperf3/wrk run")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--flows", type=int, default=None, help="idle flows for the memory test")
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--churn", type=float, default=None, metavar="SECONDS",
                   help="after the rounds, short flows through a fresh proxy for this long, "
                   "RSS sampled every ~10 s (default 600; 0 with --quick; 0 skips)")  # fmt: skip
    p.add_argument("--chunk-sizes", type=parse_sizes, default=None, metavar="LIST",
                   help="after the rounds (before the churn), the copy path (-i label, both "
                   "ways) at each --read-size in this comma-separated list of bytes, a fresh "
                   "tproxy per size: 1 stream up/down, CPU s/GiB, keep-alive req/s; 2 rounds "
                   "(default 16384,65536,262144,1048576; none with --quick; '' or none "
                   "skips), whatever --only says")  # fmt: skip
    p.add_argument("--churn-configs", default="tproxy", metavar="CONFIGS",
                   help="comma-separated configurations to churn, one after the other, "
                   "each for --churn SECONDS, whatever --only says (default: tproxy)")  # fmt: skip
    p.add_argument("--output", default=None, help="markdown report (default: docs/benchmarks.md "
                   "for a full run, none for --quick)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write raw results here")
    p.add_argument("--alt-note", default=None, help="what --alt-tree is, for the report")
    p.add_argument("--native", action="store_true", help="--profile with native frames")
    p.add_argument("--profile-keepalive", action="store_true",
                   help="--profile under wrk's keep-alive test instead")  # fmt: skip
    p.add_argument("--profile-with", default=None, metavar="COMMAND",
                   help="--profile with this command instead of py-spy, given '-p PID' and "
                   "stopped with SIGINT (e.g. 'perf record -g -o FILE')")  # fmt: skip
    p.add_argument("--keep-logs", default=None, metavar="DIR", help="copy the processes' logs here")
    p.add_argument("--alt-tree", default=None, metavar="DIR",
                   help="also run tproxy (passthrough) from this checkout, "
                   "as tproxy-alt")  # fmt: skip
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="instead of the benchmark: py-spy the first --only configuration "
                   "(default tproxy) under wrk's new-connection test; "
                   "collapsed stacks to FILE")  # fmt: skip
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.seconds = args.seconds or (1 if args.quick else 3)
    if args.churn is None:
        args.churn = 0 if args.quick else 600
    if args.chunk_sizes is None:
        args.chunk_sizes = [] if args.quick else list(CHUNK_SIZES)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A proxy holds two sockets per flow; where the hard limit on descriptors is
    # lower than 2 x 10,000 (+ listeners, pipes), hold as many flows as fit.
    args.flows = args.flows or min(2000 if args.quick else 10_000, (hard - 2000) // 2)
    if args.output is None and not args.quick:
        args.output = str(ROOT / "docs" / "benchmarks.md")

    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("iperf3", "wrk", "nginx", "haproxy", "socat", "curl", "ss"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing (scripts/bench installs it)", file=sys.stderr)
            return 2

    H.install_signal_handlers()
    H.remove_stale()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tpxb-"))
    (work / "nginx-tmp").mkdir()
    bench = Bench(args, work)
    results = bench.results
    cfgs: list[Config] = []
    try:
        bench.setup()
        cfgs = everything = configs(bench)
        if args.only:
            wanted = set(args.only.split(","))
            cfgs = [c for c in cfgs if c.name in wanted]
        if args.profile:
            chosen = cfgs if args.only else [c for c in cfgs if c.name == "tproxy"]
            bench.profile(chosen[0], Path(args.profile).resolve(), max(args.seconds, 10))
            return 0
        print(f"bench: {len(cfgs)} configurations x {args.rounds} rounds, "
              f"{args.seconds}s per run, {args.flows} idle flows", flush=True)  # fmt: skip
        for r in range(args.rounds):
            for cfg in cfgs:
                t0 = time.monotonic()
                try:
                    bench.round(cfg)
                except (H.HarnessError, H.CommandError, H.CommandTimeout) as exc:
                    results.fail(cfg.name, f"round {r + 1}: {str(exc)[:500]}")
                latest = results.values.get(cfg.name, {})
                shown = " ".join(f"{k}={fmt(v[-1])}" for k, v in latest.items() if k != "mem_flow")
                print(f"  round {r + 1} {cfg.name:13s} {time.monotonic() - t0:5.1f}s {shown}")
        if not args.no_memory:
            for cfg in cfgs:
                if cfg.mode == "none" or cfg.name == "socat-f":
                    continue  # nothing to measure / a process per flow
                t0 = time.monotonic()
                try:
                    bench.memory(cfg)
                except (H.HarnessError, H.CommandError, H.CommandTimeout) as exc:
                    results.fail(cfg.name, f"memory: {str(exc)[:500]}")
                mem = results.median(cfg.name, "mem_flow")
                print(f"  memory {cfg.name:13s} {time.monotonic() - t0:5.1f}s "
                      f"{fmt(mem)} KiB/flow", flush=True)  # fmt: skip
        if args.chunk_sizes:
            sized = chunk_configs(bench, args.chunk_sizes)
            results.chunk_rounds = min(CHUNK_ROUNDS, args.rounds) if sized else 0
            for size, cfg in sized:
                results.chunks[size] = cfg.name
            for r in range(results.chunk_rounds):
                for size, cfg in sized if r % 2 == 0 else sized[::-1]:
                    t0 = time.monotonic()
                    try:
                        bench.chunk(cfg)
                    except (H.HarnessError, H.CommandError, H.CommandTimeout) as exc:
                        results.fail(cfg.name, f"chunk round {r + 1}: {str(exc)[:500]}")
                    latest = results.values.get(cfg.name, {})
                    shown = " ".join(f"{k}={fmt(v[-1])}" for k, v in latest.items())
                    print(f"  chunk {r + 1} {size:>9,} B {time.monotonic() - t0:5.1f}s {shown}",
                          flush=True)  # fmt: skip
            print("\n".join(chunk_section(args, results)), flush=True)
        if args.churn > 0:
            by_name = {c.name: c for c in everything}
            for name in args.churn_configs.split(","):
                if name not in by_name:
                    results.fail(name, f"churn: no configuration {name!r} on this tree")
                    continue
                c = bench.churn(by_name[name], args.churn)
                print(f"  churn  {name:13s} {c.verdict}: {fmt_churn(c)}", flush=True)
    finally:
        bench.close()
        if args.keep_logs:
            shutil.copytree(work / "logs", args.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    report = render(args, cfgs, results, elapsed)
    print("\n".join(report))
    if args.output:
        Path(args.output).write_text("\n".join(report) + "\n")
        print(f"bench: wrote {args.output}")
    if args.json:
        per_size = set(results.chunks.values())
        Path(args.json).write_text(
            json.dumps(
                {
                    "values": {k: v for k, v in results.values.items() if k not in per_size},
                    "errors": results.errors,
                    "chunk_sizes": {
                        str(size): {
                            "config": name,
                            "rounds": results.chunk_rounds,
                            **results.values.get(name, {}),
                        }
                        for size, name in results.chunks.items()
                    },
                    "churn": {k: c.as_json() for k, c in results.churn.items()},
                },
                indent=1,
            )
        )
    return 0


def render(
    args: argparse.Namespace, cfgs: list[Config], results: Results, elapsed: float
) -> list[str]:
    out = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (do not edit by hand; rerun it). "
        f"{args.rounds} interleaved rounds (every configuration once per round), "
        f"{args.seconds} s per iperf3/wrk run, wrk with one thread and {args.connections} "
        f"connections, {args.flows:,} idle flows for memory; medians, spread min..max; "
        f"whole run {elapsed / 60:.1f} min, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "## Path and configurations",
        "",
        "client -- gateway -- server network namespaces joined by veth pairs (IPv4); the proxy "
        "runs in the gateway; iperf3 and nginx (one process, a 32-byte reply) in the server "
        "namespace. Transparent configurations get connections diverted by TPROXY rules "
        "installed once with `tproxy setup`; forward ones listen on the gateway's address. "
        "Ratios compare with the HAProxy of the same mode. Up = client to server.",
        "",
        *(f"- `{c.name}` ({c.mode}): {c.note}" for c in cfgs),
        "",
        "## Results",
        "",
        *table(results, cfgs),
        "",
        *chunk_section(args, results),
        *churn_section(args, results),
        "## Targets (issue 6)",
        "",
        *targets(results),
    ]
    if results.errors:
        out += ["", "## Errors seen during the run", ""]
        for name, errs in results.errors.items():
            for e in errs:
                out.append(f"- `{name}`: {e.splitlines()[0][:200]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
