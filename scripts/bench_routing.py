#!/usr/bin/env python3
"""How long ``tproxy setup`` takes for 100 port ranges, per backend (needs root).

    .venv/bin/python scripts/bench_routing.py [--ranges 100] [--runs 5]

For each backend, in a fresh network namespace: install a plan with N TCP
port ranges (IPv4 and IPv6) through the installer, as ``tproxy setup`` does,
and tear it down again; prints the median and best of RUNS installs in ms.
The time is the installer's own (python start-up, argument parsing and
making the plan are not counted; making the plan is timed on its own): the
ownership record, reading what is installed, the ip rules and routes through
pyroute2 (one IPRoute, opened once before the clock starts), then either one
python-iptables transaction per chain and rule or one nftables transaction
for the whole table; the part spent in pyroute2's calls is reported too. For nft the table's
transaction is timed alone too, both ways it is applied: creating the table
(a fresh install) and swapping an installed one (``--replace``). A
measurement, not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _time_ip_calls(opened: list) -> list[float]:
    """Wrap the pyroute2 backend's calls so each one's time (ms) lands in the returned list."""
    from tproxy.routing.iproute import IPRouteBackend

    spent: list[float] = []
    for backend in opened:
        if not isinstance(backend, IPRouteBackend):
            continue
        for name in ("add", "remove", "installed"):
            call = getattr(backend, name)

            def timed(*args, _call=call):
                start = time.perf_counter()
                try:
                    return _call(*args)
                finally:
                    spent.append((time.perf_counter() - start) * 1000)

            setattr(backend, name, timed)
    return spent


def inner(backend: str, ranges: int, runs: int) -> None:
    """Runs inside the namespace: install and tear down RUNS times, print timings as JSON."""
    sys.path.insert(0, str(ROOT))
    from tproxy.routing import installer
    from tproxy.routing.plan import NftTable, build_request, make_plan

    ports = ",".join(f"{10000 + 10 * i}-{10000 + 10 * i + 4}" for i in range(ranges))
    request = build_request("in0", "out0", ports, backend=backend)
    plans = []
    for _ in range(runs):
        start = time.perf_counter()
        plan = make_plan(request)
        plans.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    import pyroute2  # noqa: F401  (what a setup process pays once, before any request)

    import_ms = (time.perf_counter() - start) * 1000
    installs, teardowns, ip_installs = [], [], []
    start = time.perf_counter()
    with installer._backends(None, backend) as opened:
        open_ms = (time.perf_counter() - start) * 1000
        ip_ms = _time_ip_calls(opened)
        for _ in range(runs):
            ip_ms.clear()
            start = time.perf_counter()
            installer.install(plan, backends=opened)
            installs.append((time.perf_counter() - start) * 1000)
            ip_installs.append(sum(ip_ms))
            start = time.perf_counter()
            installer.teardown(plan.instance, backends=opened)
            teardowns.append((time.perf_counter() - start) * 1000)
        creates, swaps = [], []
        if backend == "nft":  # the table's one transaction alone (no rules, routes, records)
            from tproxy.routing.nft import Nft
            from tproxy.routing.nftrules import batch, delete_script

            nft, table = Nft(), plan.items[-1]
            assert isinstance(table, NftTable)
            for _ in range(runs):
                start = time.perf_counter()
                assert nft.run(batch(table))[0] == 0
                creates.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                assert nft.run(batch(table, replace=True))[0] == 0
                swaps.append((time.perf_counter() - start) * 1000)
                assert nft.run(delete_script(table.name))[0] == 0
    print(
        json.dumps(
            {
                "backend": backend,
                "items": len(plan.items),
                "plan_ms": plans,
                "install_ms": installs,
                "ip_install_ms": ip_installs,
                "pyroute2_import_ms": import_ms,
                "open_ms": open_ms,
                "teardown_ms": teardowns,
                "create_ms": creates,
                "swap_ms": swaps,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--backend",
        action="append",
        choices=("iptables", "nft"),
        help="only this backend (repeatable; default both)",
    )
    parser.add_argument("--inner", choices=("iptables", "nft"))
    args = parser.parse_args()
    if args.inner:
        inner(args.inner, args.ranges, args.runs)
        return 0
    if os.geteuid() != 0:
        print("bench_routing: needs root (network namespaces)", file=sys.stderr)
        return 2
    for backend in args.backend or ("iptables", "nft"):
        name = f"tpx-bench-routing-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            with tempfile.TemporaryDirectory() as records:
                script = (
                    f"ip link set lo up && ip link add in0 type veth peer name out0 && "
                    f"iptables-legacy -t mangle -S >/dev/null && "
                    f"ip6tables-legacy -t mangle -S >/dev/null && "
                    f"TPROXY_STATE_DIR={records} {sys.executable} {__file__} "
                    f"--inner {backend} --ranges {args.ranges} --runs {args.runs}"
                )
                out = subprocess.run(
                    ["ip", "netns", "exec", name, "sh", "-c", script],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
        finally:
            subprocess.run(["ip", "netns", "delete", name], check=False)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        install, teardown = result["install_ms"], result["teardown_ms"]
        print(
            f"setup of {args.ranges} port ranges (IPv4+IPv6), {backend:8}: "
            f"median {statistics.median(install):8.1f} ms, best {min(install):8.1f} ms; "
            f"teardown median {statistics.median(teardown):8.1f} ms "
            f"({result['items']} plan items, {args.runs} runs)"
        )
        print(
            f"  of which pyroute2 (ip rules and routes: one rule dump, one route dump, "
            f"2 rules and 2 routes added): median {statistics.median(result['ip_install_ms']):.1f}"
            f" ms, best {min(result['ip_install_ms']):.1f} ms"
        )
        print(
            f"  making the plan (not in the setup time): median "
            f"{statistics.median(result['plan_ms']):.1f} ms; not in it either: importing "
            f"pyroute2 {result['pyroute2_import_ms']:.0f} ms, opening the backends "
            f"{result['open_ms']:.1f} ms (once per process)"
        )
        if result["create_ms"]:
            print(
                f"  the nft table's one transaction alone: creating it median "
                f"{statistics.median(result['create_ms']):.1f} ms (best "
                f"{min(result['create_ms']):.1f}), swapping an installed one median "
                f"{statistics.median(result['swap_ms']):.1f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
