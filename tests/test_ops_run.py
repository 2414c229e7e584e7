"""Operating a real ``tproxy run`` on loopback: metrics, JSON log, live flows, reload,
signals. Every test drives the proxy process from outside, as an operator would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from ops_harness import Proxy, echo_once, echo_server, free_port, samples, scrape, wait_until

UPPER = """
from tproxy import Interceptor

class Shout(Interceptor):
    def server_data(self, data):
        return data.upper()
"""

TAGGED = """
from tproxy import Interceptor

class Shout(Interceptor):
    def server_data(self, data):
        return b"v2:" + data
"""


@pytest.fixture
def echo() -> object:
    with echo_server() as port:
        yield port


def test_metrics_count_every_flow_reason_and_byte(tmp_path: Path, echo: int) -> None:
    port, mport = free_port(), free_port()
    proxy = Proxy(
        tmp_path,
        "--mode",
        f"forward:127.0.0.1:{echo}@127.0.0.1:{port}",
        "--metrics",
        f"127.0.0.1:{mport}",
    )
    try:
        proxy.wait_log("metrics at")
        proxy.wait_port(port)
        for i in range(25):
            assert echo_once(port, b"x" * (i + 1)) == b"x" * (i + 1)
        wait_until(
            lambda: sum(samples(scrape(mport), "tproxy_flows_total").values()) == 25,
            what="25 ended flows",
        )
        text = scrape(mport)
        ended = samples(text, "tproxy_flows_total")
        assert ended == {'{listener="forward",mode="forward",reason="eof"}': 25.0}, ended
        assert samples(text, "tproxy_flows_opened_total") == {
            '{listener="forward",mode="forward"}': 25.0
        }
        sent = sum(range(1, 26))
        assert samples(text, "tproxy_bytes_read_total") == {
            '{direction="down"}': float(sent),
            '{direction="up"}': float(sent),
        }
        assert samples(text, "tproxy_flows_live") == {"": 0.0}
        assert samples(text, "tproxy_flow_duration_seconds_count") == {"": 25.0}
        labels = [line for line in text.splitlines() if "{" in line and not line.startswith("#")]
        assert not any("127.0.0.1" in line or "client" in line for line in labels)
    finally:
        assert proxy.stop() == 0, proxy.log


def test_connect_failures_are_counted_by_cause(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    dead = free_port()  # nothing listens there: refused
    proxy = Proxy(
        tmp_path,
        "--mode",
        f"forward:127.0.0.1:{dead}@127.0.0.1:{port}",
        "--metrics",
        f"127.0.0.1:{mport}",
    )
    try:
        proxy.wait_log("metrics at")
        proxy.wait_port(port)
        for _ in range(3):
            try:
                echo_once(port, b"hello")
            except OSError:
                pass
        wait_until(
            lambda: (
                samples(scrape(mport), "tproxy_connect_failures_total")
                == {'{cause="refused"}': 3.0}
            ),
            what="3 refused connects",
        )
        ended = samples(scrape(mport), "tproxy_flows_total")
        assert ended == {'{listener="forward",mode="forward",reason="connect-failed"}': 3.0}
    finally:
        assert proxy.stop() == 0, proxy.log


def test_handshake_rejections_carry_the_protocol_reply_code(tmp_path: Path) -> None:
    """A refused SOCKS5, SOCKS4 and HTTP CONNECT request and a timed-out HTTP head each
    count under the code the client was answered with."""
    socks, http, mport = free_port(), free_port(), free_port()
    proxy = Proxy(
        tmp_path,
        *("--mode", f"socks@127.0.0.1:{socks}", "--mode", f"http@127.0.0.1:{http}"),
        *("--deny-port", "7", "--metrics", f"127.0.0.1:{mport}", "--handshake-timeout", "0.5"),
    )
    target = socket.inet_aton("127.0.0.1")
    try:
        proxy.wait_port(socks)
        proxy.wait_port(http)
        with socket.create_connection(("127.0.0.1", socks), timeout=10) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + target + (7).to_bytes(2, "big"))
            assert s.recv(100)[:2] == b"\x05\x02"
        with socket.create_connection(("127.0.0.1", socks), timeout=10) as s:
            s.sendall(b"\x04\x01" + (7).to_bytes(2, "big") + target + b"me\x00")
            assert s.recv(100)[:2] == b"\x00\x5b"
        with socket.create_connection(("127.0.0.1", http), timeout=10) as s:
            s.sendall(b"CONNECT 127.0.0.1:7 HTTP/1.1\r\nHost: 127.0.0.1:7\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 403 ")
        with socket.create_connection(("127.0.0.1", http), timeout=10) as s:
            s.sendall(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n")  # and never the end of the head
            assert s.recv(100).startswith(b"HTTP/1.1 408 ")
        want = {
            '{code="timeout",mode="http",reply="408"}': 1.0,
            '{code="rejected",mode="socks",reply="0x02"}': 1.0,
            '{code="rejected",mode="socks",reply="0x5b"}': 1.0,
            '{code="rejected",mode="http",reply="403"}': 1.0,
        }
        wait_until(
            lambda: samples(scrape(mport), "tproxy_handshake_rejections_total") == want,
            what=f"the three rejections in the metrics:\n{scrape(mport)}",
        )
    finally:
        assert proxy.stop() == 0, proxy.log


def test_json_log_is_one_object_per_line_and_reopens_on_sigusr1(tmp_path: Path, echo: int) -> None:
    port = free_port()
    log_file = tmp_path / "tproxy.log"
    proxy = Proxy(
        tmp_path,
        "--mode",
        f"forward:127.0.0.1:{echo}@127.0.0.1:{port}",
        "--log-format",
        "json",
        "--log-file",
        str(log_file),
    )
    try:
        wait_until(
            lambda: log_file.exists() and "listening" in log_file.read_text(),
            what=f"the listener in the log:\n{proxy.log}",
        )
        for _ in range(3):
            assert echo_once(port, b"abc") == b"abc"
        wait_until(lambda: log_file.read_text().count('"flow_end"') == 3, what="3 flow ends")
        rotated = tmp_path / "tproxy.log.1"
        log_file.rename(rotated)
        proxy.signal(signal.SIGUSR1)
        wait_until(log_file.exists, what="the log file reopened")
        assert echo_once(port, b"defg") == b"defg"
        wait_until(lambda: '"flow_end"' in log_file.read_text(), what="a flow end after rotation")
    finally:
        assert proxy.stop() == 0, proxy.log
    for path in (rotated, log_file):
        # jq is what an operator would use: it must parse every line.
        done = subprocess.run(
            ["jq", "-c", "."], stdin=path.open("rb"), capture_output=True, timeout=30
        )
        assert done.returncode == 0, (done.stderr, path.read_text())
    lines = [json.loads(line) for line in rotated.read_text().splitlines()]
    ends = [rec for rec in lines if rec.get("event") == "flow_end"]
    opens = [rec for rec in lines if rec.get("event") == "flow_open"]
    assert len(ends) == len(opens) == 3
    end = ends[0]
    for key in (
        "id",
        "worker",
        "mode",
        "client",
        "destination",
        "via",
        "sni",
        "interceptors",
        "reason",
        "detail",
        "bytes_read_up",
        "bytes_read_down",
        "bytes_delivered_up",
        "bytes_delivered_down",
        "duration",
        "started",
        "ended",
        "time",
    ):
        assert key in end, key
    assert end["reason"] == "eof" and end["bytes_read_up"] == 3 and end["bytes_read_down"] == 3
    assert end["destination"] == f"127.0.0.1:{echo}"
    assert end["client"].startswith("127.0.0.1:")
    assert any(rec.get("message", "").startswith("listening") for rec in lines)
    last = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any(r.get("event") == "flow_end" and r["bytes_read_up"] == 4 for r in last)


def test_flows_lists_a_held_flow_and_kills_it(tmp_path: Path, echo: int) -> None:
    port = free_port()
    proxy = Proxy(tmp_path, "--mode", f"forward:127.0.0.1:{echo}@127.0.0.1:{port}", "-i", "label")
    try:
        proxy.wait_port(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            held.sendall(b"ping")
            assert held.recv(100).endswith(b"ping")
            client = f"127.0.0.1:{held.getsockname()[1]}"
            listed = json.loads(proxy.tproxy("flows", "--json").stdout)
            assert len(listed) == 1, listed
            flow = listed[0]
            assert flow["client"] == client
            assert flow["destination"] == f"127.0.0.1:{echo}"
            assert flow["mode"] == "forward" and flow["interceptors"] == ["label"]
            assert flow["bytes_read_up"] == 4 and flow["age"] >= 0 and flow["idle"] >= 0
            table = proxy.tproxy("flows").stdout
            assert client in table and "DESTINATION" in table
            killed = proxy.tproxy("flows", "--kill", str(flow["id"]))
            assert f"killed flow {flow['id']}" in killed.stdout
            # the client sees the end of the flow
            ended = b""
            try:
                while chunk := held.recv(100):
                    ended += chunk
            except ConnectionResetError:
                pass
        missing = proxy.tproxy("flows", "--kill", "99999", check=False)
        assert missing.returncode == 1 and "no live flow 99999" in missing.stderr
        proxy.wait_log(r"flow \d+ end reason=shutdown .*killed")
        assert json.loads(proxy.tproxy("flows", "--json").stdout) == []
    finally:
        assert proxy.stop() == 0, proxy.log
    assert not list((tmp_path / "run").glob("*.sock")), "the control socket is removed"


def _client_hello(name: str) -> bytes:
    """The first flight of a TLS client for ``name`` (a ClientHello), made in memory."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_flow_names_only_the_interceptors_its_when_selected(tmp_path: Path, echo: int) -> None:
    """The flow record, JSON log and ``tproxy flows`` name the interceptors a flow got,
    not every one loaded; one selected by its ClientHello is named once it is read."""
    port = free_port()
    log_file = tmp_path / "tproxy.log"
    proxy = Proxy(
        tmp_path,
        "--mode",
        f"forward:127.0.0.1:{echo}@127.0.0.1:{port}",
        "--log-format",
        "json",
        "--log-file",
        str(log_file),
        *("-i", "label", "--when", f"port={echo}"),
        *("-i", "replace", "-o", "old=zzz", "-o", "new=yyy", "--when", "port=1"),
        *("-i", "block", "-o", f"port={echo}", "--when", r"sni=blocked\.test"),
    )
    try:
        wait_until(
            lambda: log_file.exists() and "listening" in log_file.read_text(),
            what=f"the listener in the log:\n{proxy.log}",
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            held.sendall(b"ping")
            assert held.recv(100) == b"[tproxy] ping"
            (listed,) = json.loads(proxy.tproxy("flows", "--json").stdout)
            assert listed["interceptors"] == ["label"]
            assert "replace" not in proxy.tproxy("flows").stdout
        assert echo_once(port, _client_hello("ok.test")).startswith(b"[tproxy] ")
        try:
            blocked = echo_once(port, _client_hello("blocked.test"))
        except ConnectionResetError:
            blocked = b""
        assert b"[tproxy]" not in blocked
        wait_until(lambda: log_file.read_text().count('"flow_end"') == 3, what="3 flow ends")
    finally:
        assert proxy.stop() == 0, proxy.log
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    opens = [rec["interceptors"] for rec in lines if rec.get("event") == "flow_open"]
    ends = [rec for rec in lines if rec.get("event") == "flow_end"]
    assert opens == [["label"]] * 3  # the sni= term is decided after the open line
    assert [(rec["sni"], rec["interceptors"]) for rec in ends] == [
        (None, ["label"]),
        ("ok.test", ["label"]),
        ("blocked.test", ["label", "block"]),
    ], ends


def test_control_socket_is_root_only(tmp_path: Path, echo: int) -> None:
    port = free_port()
    proxy = Proxy(tmp_path, "--mode", f"forward:127.0.0.1:{echo}@127.0.0.1:{port}")
    try:
        proxy.wait_port(port)
        sock = wait_until(
            lambda: next((tmp_path / "run").glob("run-*.sock"), None), what="the control socket"
        )
        assert sock.name == f"run-{proxy.proc.pid}.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    finally:
        assert proxy.stop() == 0, proxy.log


def test_sighup_reloads_interceptor_file_for_new_flows_only(tmp_path: Path, echo: int) -> None:
    port = free_port()
    module = tmp_path / "shout.py"
    module.write_text(UPPER)
    proxy = Proxy(
        tmp_path, "--mode", f"forward:127.0.0.1:{echo}@127.0.0.1:{port}", "-i", f"{module}:Shout"
    )
    try:
        proxy.wait_port(port)
        assert echo_once(port, b"abc") == b"ABC"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as live:
            live.sendall(b"one")
            assert live.recv(100) == b"ONE"
            module.write_text(TAGGED)
            proxy.signal(signal.SIGHUP)
            proxy.wait_log("reloaded: interceptors for new flows")
            assert echo_once(port, b"abc") == b"v2:abc"  # a new flow: the new code
            live.sendall(b"two")
            assert live.recv(100) == b"TWO"  # the live flow keeps its chain
            module.write_text("this is not python(\n")
            proxy.signal(signal.SIGHUP)
            proxy.wait_log("reload failed, keeping the running configuration")
            assert echo_once(port, b"abc") == b"v2:abc"  # the old one still works
            live.sendall(b"three")
            assert live.recv(100) == b"THREE"
        assert proxy.proc.poll() is None
    finally:
        assert proxy.stop() == 0, proxy.log


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_sighup_and_sigquit_never_end_without_the_ordered_shutdown(
    tmp_path: Path, echo: int, signum: int
) -> None:
    port = free_port()
    proxy = Proxy(tmp_path, "--mode", f"forward:127.0.0.1:{echo}@127.0.0.1:{port}")
    try:
        proxy.wait_port(port)
        proxy.signal(signum)
        if signum == signal.SIGHUP:
            proxy.wait_log("received SIGHUP|nothing to reload|reloaded")
            assert proxy.proc.poll() is None, proxy.log  # before: killed, exit 129
            assert echo_once(port, b"still") == b"still"
            proxy.signal(signal.SIGQUIT)
        assert proxy.proc.wait(20) == 0, proxy.log
        assert "shutting down" in proxy.log
        assert "received SIGQUIT: stopping" in proxy.log
    finally:
        proxy.stop()


def test_sighup_early_in_startup_is_not_fatal(tmp_path: Path, echo: int) -> None:
    """A SIGHUP before the event loop runs is held and acted on, not the default (exit)."""
    port = free_port()
    proxy = Proxy(tmp_path, "--mode", f"forward:127.0.0.1:{echo}@127.0.0.1:{port}")
    try:
        # as soon as the interpreter has started our code (the handler is installed first)
        wait_until(lambda: "tproxy" in _cmdline(proxy.proc.pid), what="the process")
        proxy.wait_port(port)
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("SIGHUP|nothing to reload|reloaded")
        assert proxy.proc.poll() is None
    finally:
        assert proxy.stop() == 0, proxy.log


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
def test_workers_sum_metrics_and_list_all_flows(tmp_path: Path, echo: int) -> None:
    port, mport = free_port(), free_port()
    proxy = Proxy(
        tmp_path,
        "--mode",
        f"forward:127.0.0.1:{echo}@127.0.0.1:{port}",
        "--workers",
        "2",
        "--metrics",
        f"127.0.0.1:{mport}",
        "-i",
        "label",
    )
    try:
        proxy.wait_log("2 workers listening")
        for _ in range(40):
            assert echo_once(port, b"ab").endswith(b"ab")
        wait_until(
            lambda: sum(samples(scrape(mport), "tproxy_flows_total").values()) == 40,
            what="40 ended flows over both workers",
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
            held.sendall(b"x")
            held.recv(100)
            listed = json.loads(proxy.tproxy("flows", "--json").stdout)
            assert [f["client"] for f in listed] == [f"127.0.0.1:{held.getsockname()[1]}"]
            assert listed[0]["worker"] in ("w0", "w1")
        wait_until(
            lambda: sum(samples(scrape(mport), "tproxy_flows_total").values()) == 41,
            what="41 ended flows",
        )
        # kill a worker: its counts stay in the sum, never going backwards
        sockets = sorted((tmp_path / "run").glob("run-*.w*.sock"))
        assert len(sockets) == 2
        worker_pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proxy.proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(worker_pids) == 2
        os.kill(worker_pids[0], signal.SIGKILL)
        proxy.wait_log("restarting in")
        assert sum(samples(scrape(mport), "tproxy_flows_total").values()) >= 41
        proxy.wait_log("worker 0 started|worker 1 started", count=3)
        wait_until(
            lambda: len(list((tmp_path / "run").glob("run-*.w*.sock"))) == 2,
            what="the restarted worker's control socket",
        )
        assert echo_once(port, b"cd").endswith(b"cd")
        wait_until(
            lambda: sum(samples(scrape(mport), "tproxy_flows_total").values()) >= 42,
            what="a flow after the restart",
        )
    finally:
        assert proxy.stop() == 0, proxy.log


def test_sighup_rereads_the_config_file(tmp_path: Path, echo: int) -> None:
    port = free_port()
    path = tmp_path / "tproxy.toml"

    def write(text: str) -> None:
        path.write_text(
            f'mode = ["forward:127.0.0.1:{echo}@127.0.0.1:{port}"]\n'
            f'[[interceptor]]\nspec = "label"\noptions = {{ text = "{text}" }}\n'
        )

    write("<a>")
    proxy = Proxy(tmp_path, "-c", str(path))
    try:
        proxy.wait_port(port)
        assert echo_once(port, b"x") == b"<a>x"
        write("<b>")
        proxy.signal(signal.SIGHUP)
        proxy.wait_log("reloaded: interceptors for new flows: label")
        assert echo_once(port, b"x") == b"<b>x"
        path.write_text(path.read_text() + "nonsense-key = 1\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_log(
            r"reload failed, keeping the running configuration: .*tproxy.toml:5: "
            r"unknown key 'nonsense-key'"
        )
        assert echo_once(port, b"x") == b"<b>x"
    finally:
        assert proxy.stop() == 0, proxy.log
