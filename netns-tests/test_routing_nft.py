"""The nftables backend's own promises: atomic replacement, ownership, doctor.

The common setup/teardown/status/interception tests run for both backends in
``test_routing.py``; here what only the nft backend promises: a batch the
kernel refuses leaves the previous table (and everything else) exactly as it
was, a foreign table in our name space is never taken, and ``doctor`` says
which backend ``auto`` picks.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
from nsharness import Namespace
from test_routing import IN, OUT, gw1, snapshot, state_dir_of, tproxy  # noqa: F401

# Replaces the installed plan with a wider one whose batch the kernel refuses
# (its last rule jumps to a chain that does not exist), through the installer.
FAILING_REPLACE = r"""
import dataclasses
from tproxy.routing import installer
from tproxy.routing.plan import NftTable, Plan, build_request, make_plan
plan = make_plan(build_request("in0", "out0", "80,443", backend="nft"))
table = plan.items[-1]
lines = table.script.splitlines()
lines[-1] = "add rule inet tproxy_default prerouting jump no_such_chain"
broken = dataclasses.replace(table, script="\n".join(lines) + "\n")
try:
    installer.install(Plan(plan.request, plan.items[:-1] + (broken,)), replace=True)
except installer.SetupError as exc:
    print("REFUSED", exc)
"""


def test_a_failing_batch_leaves_the_previous_table(gw1: Namespace) -> None:  # noqa: F811
    gw = gw1
    assert tproxy(gw, "setup", IN, OUT, "--port", "80", "--backend", "nft").returncode == 0
    installed = snapshot(gw)
    failed = gw.python("-c", FAILING_REPLACE)
    assert "REFUSED step failed: nft -f - (table inet tproxy_default" in failed.stdout
    assert "no_such_chain" in failed.stdout or "No such file" in failed.stdout, failed.stdout
    assert snapshot(gw) == installed  # the old table, rules and routes, byte for byte
    status = tproxy(gw, "status")  # the record is the old one again
    assert "ports tcp 80 -> " in status.stdout and "complete" in status.stdout, status.stdout
    # a good replacement swaps the table in one transaction
    replaced = tproxy(gw, "setup", IN, OUT, "--port", "80,443", "--backend", "nft", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert "elements = { 80, 443 }" in snapshot(gw)["nft"]
    assert tproxy(gw, "teardown").returncode == 0


def test_a_foreign_table_with_our_name_is_not_taken(gw1: Namespace) -> None:  # noqa: F811
    gw = gw1
    gw.run("nft", "add", "table", "inet", "tproxy_default")
    gw.run("nft", "add", "chain", "inet", "tproxy_default", "mine")
    before = snapshot(gw)
    doctor = tproxy(gw, "doctor", "--backend", "nft")
    assert "[fail] nft table tproxy_default: exists and is not ours" in doctor.stdout
    assert tproxy(gw, "status").returncode == 3  # not ours: nothing of ours installed
    refused = tproxy(gw, "setup", IN, OUT, "--port", "80", "--backend", "nft")
    assert refused.returncode == 1 and "exists and is not ours" in refused.stderr, refused.stderr
    assert tproxy(gw, "teardown").returncode == 0
    assert snapshot(gw) == before


@pytest.mark.parametrize("backend", ["auto", "iptables", "nft"])
def test_doctor_says_which_backend_and_why(gw1: Namespace, backend: str) -> None:  # noqa: F811
    result = tproxy(gw1, "doctor", "--backend", backend, "--local")
    out = result.stdout
    chosen = "iptables" if backend == "auto" else backend
    assert f"[ok  ] backend: would use {chosen}: " in out, out
    assert "[ok  ] nftables: libnftables answers" in out
    assert "[ok  ] nft table tproxy_default: name is free" in out
    assert "[ok  ] local: proxy mark: 0x7470" in out
    assert ("xtables plugins" in out) == (backend != "nft")


def test_with_nft_the_legacy_tables_stay_empty(netns: Callable[..., Namespace]) -> None:
    """A namespace that never used legacy iptables: nft setup, status, teardown leave none."""
    ns = netns("fresh")
    ns.run("ip", "link", "add", IN, "type", "veth", "peer", "name", OUT)
    try:
        assert tproxy(ns, "setup", IN, OUT, "-p", "80", "--backend", "nft").returncode == 0
        assert "table inet tproxy_default" in ns.run("nft", "list", "ruleset").stdout
        assert tproxy(ns, "status").returncode == 1  # complete; nothing listens
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            assert ns.run(tool).stdout == ""
        assert tproxy(ns, "teardown").returncode == 0
        assert ns.run("nft", "list", "ruleset").stdout == ""
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            assert ns.run(tool).stdout == ""
    finally:
        shutil.rmtree(state_dir_of(ns), ignore_errors=True)


NFT_COMMAND = r"""
from tproxy.routing.nft import Nft
from tproxy.routing.nftrules import batch, delete_script, read_table
from tproxy.routing.plan import build_request, make_plan
table = make_plan(build_request("in0", "out0", "80,443", backend="nft")).items[-1]
for use_library in (False, True):
    nft = Nft(use_library=use_library)
    assert nft.run(batch(table))[0] == 0
    assert read_table(nft.list_json("table inet tproxy_default"), table.name) == table
    rc, _, err = nft.run(batch(table))  # create: refused, the name is taken
    assert rc != 0 and "File exists" in err, err
    assert nft.run(delete_script(table.name))[0] == 0
    assert nft.list_json("table inet tproxy_default") == []
print("OK")
"""


def test_the_nft_command_applies_what_libnftables_does(gw1: Namespace) -> None:  # noqa: F811
    """Without libnftables, ``nft -f -`` applies the same script and lists the same table."""
    before = snapshot(gw1)
    assert gw1.python("-c", NFT_COMMAND).stdout == "OK\n"
    assert snapshot(gw1) == before
