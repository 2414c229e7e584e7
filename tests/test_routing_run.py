"""``tproxy run --setup``: options next to run's own, and install-for-the-block semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_routing_installer import MemoryKernel

from tproxy import runner
from tproxy.cli import UsageError, build_parser, main
from tproxy.routing import installer, state
from tproxy.routing.run import installed_for_run, plan_for_run

REAL_CHECK_HOST = installer.check_host


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MemoryKernel:
    memory = MemoryKernel()
    monkeypatch.setattr(state, "ROOT", tmp_path / "run-tproxy")
    monkeypatch.setattr(installer, "open_backends", lambda kind="all": [memory])
    monkeypatch.setattr(installer, "check_host", lambda request: None)
    return memory


def run_args(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["run", *argv])


def test_options_do_not_clash_with_runs_own() -> None:
    args = run_args(
        "--setup",
        "in0",
        "out0",
        "--port",
        "80,443",
        "--route-mark",
        "0x2/0xff",
        "--route-table",
        "7",
        "--route-priority",
        "9",
        "--route-instance",
        "x",
        "--ipv4",
    )
    plan = plan_for_run(args, 9091, "127.0.0.1", "::1")
    request = plan.request
    assert (request.in_interface, request.out_interface) == ("in0", "out0")
    assert (request.mark, request.mask, request.table, request.priority) == (2, 0xFF, 7, 9)
    assert request.instance == "x" and request.families == (4,)
    assert run_args().setup is None


def test_families_follow_the_listeners() -> None:
    args = run_args("--setup", "a", "b", "-p", "80")
    assert plan_for_run(args, 1234, "127.0.0.1", None).request.families == (4,)
    assert plan_for_run(args, 1234, None, "::1").request.families == (6,)
    both = plan_for_run(args, 1234, "0.0.0.0", "::").request
    assert both.families == (4, 6) and (both.proxy_v4, both.proxy_v6) == ("127.0.0.1", "::1")
    assert both.proxy_port == 1234
    with pytest.raises(UsageError, match="IPv6 listener"):
        plan_for_run(run_args("--setup", "a", "b", "-p", "80", "--ipv6"), 1, "127.0.0.1", None)
    with pytest.raises(UsageError, match="no ports"):
        plan_for_run(run_args("--setup", "a", "b"), 1, "127.0.0.1", None)


def test_installed_for_the_block_and_removed_even_on_error(kernel: MemoryKernel) -> None:
    args = run_args("--setup", "in0", "out0", "-p", "80")
    with pytest.raises(RuntimeError), installed_for_run(args, 9091, "127.0.0.1", "::1") as plan:
        assert plan is not None and kernel.items == list(plan.items)
        assert state.owner("default") == "run"
        raise RuntimeError("engine crashed")
    assert kernel.items == []
    assert state.load("default") is None


def test_without_setup_nothing_happens(kernel: MemoryKernel) -> None:
    with installed_for_run(run_args(), 9091) as plan:
        assert plan is None
    assert kernel.log == []


def test_failure_raises_after_rollback(kernel: MemoryKernel) -> None:
    args = run_args("--setup", "in0", "out0", "-p", "80")
    plan = plan_for_run(args, 9091, "127.0.0.1", "::1")
    kernel.fail_on = plan.items[-1]
    with pytest.raises(installer.SetupError), installed_for_run(args, 9091):
        raise AssertionError("the block must not run")
    assert kernel.items == []


def test_leftover_of_a_killed_run_is_adopted_setup_one_is_left(kernel: MemoryKernel) -> None:
    args = run_args("--setup", "in0", "out0", "-p", "80")
    plan = plan_for_run(args, 9091, "127.0.0.1", "::1")
    installer.install(plan, owner="run")  # as if a run was killed -9
    with installed_for_run(args, 9091):
        pass
    assert kernel.items == []
    installer.install(plan)  # tproxy setup by the user
    with installed_for_run(args, 9091):
        pass
    assert kernel.items == list(plan.items)


def test_udp_port_and_block_quic_pass_through() -> None:
    args = run_args("--setup", "in0", "out0", "--port", "80", "--udp-port", "53", "--block-quic")
    request = plan_for_run(args, 9091, "127.0.0.1", "::1").request
    assert [str(p) for p in request.udp_ports] == ["53"] and request.block_quic
    udp_only = plan_for_run(
        run_args("--setup", "in0", "out0", "--udp-port", "53"), 9091, "127.0.0.1", None
    ).request
    assert udp_only.ports == () and udp_only.families == (4,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--setup", "nosuch0", "lo", "--port", "80"], "no such interface 'nosuch0'"),
        (["--setup", "lo", "lo", "--port", "65536"], "port 65536 is out of range"),
        (["--setup", "lo", "lo", "--port", "80,abc"], "port 'abc' is not a number"),
        (["--setup", "lo", "lo"], "no ports to divert"),
        (["--setup", "lo", "lo", "--udp-port", "443", "--block-quic"], "block-quic"),
    ],
)
def test_bad_setup_arguments_fail_before_anything_listens(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kernel: MemoryKernel,
) -> None:
    def must_not_listen(*args: object, **kw: object) -> None:
        raise AssertionError("a listener was opened before the routing arguments were checked")

    monkeypatch.setattr(runner, "open_doors", must_not_listen)
    monkeypatch.setattr(installer, "check_host", REAL_CHECK_HOST)  # the fixture's stub is out
    monkeypatch.setattr(installer, "has_net_admin", lambda: True)
    assert main(["run", "--mode", "transparent@127.0.0.1:19091", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("tproxy run: error:"), err


def test_a_different_installed_plan_fails_run_before_it_listens(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kernel: MemoryKernel,
) -> None:
    installer.install(
        plan_for_run(run_args("--setup", "lo", "lo", "-p", "80"), 19091, "127.0.0.1", None)
    )
    monkeypatch.setattr(runner, "open_doors", lambda *a, **k: pytest.fail("listened"))
    assert (
        main(
            ["run", "--mode", "transparent@127.0.0.1:19091", "--setup", "lo", "lo", "-p", "80,443"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different plan" in err and "tproxy teardown" in err, err
    assert kernel.items  # the installed plan is left alone


def test_local_gives_the_proxy_its_mark_and_skips_it() -> None:
    from tproxy.routing.run import prepare_run_args

    args = run_args("--setup", "in0", "out0", "-p", "80", "--local", "--backend", "iptables")
    assert args.mark is None
    prepare_run_args(args)
    assert args.mark == 0x7470
    request = plan_for_run(args, 9091, "127.0.0.1", "::1").request
    assert request.local and request.proxy_mark == 0x7470
    own = run_args(
        "--setup", "in0", "out0", "-p", "80", "--local", "--mark", "0x20", "--backend", "nft"
    )
    prepare_run_args(own)
    assert own.mark == 0x20
    assert plan_for_run(own, 9091, "127.0.0.1", "::1").request.proxy_mark == 0x20
    plain = run_args("--setup", "in0", "out0", "-p", "80")
    prepare_run_args(plain)
    assert plain.mark is None  # without --local the proxy's sockets stay unmarked
