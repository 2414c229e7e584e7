"""The tproxy demo: a real client, gateway and server in network namespaces.

Run through ``scripts/demo`` (which installs what it needs first). Every step
prints what it does and checks what it claims; the first check that fails
ends the demo with exit code 1, after the same clean teardown.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "netns-tests"))

from nsharness import (  # noqa: E402
    Namespace,
    Topology,
    curl,
    http_server,
    install_signal_handlers,
    list_namespaces,
    remove_stale,
    url,
)

PAGE = "Hello! I like apples.\n"
PROXY_PORT = 9091
WEB_PORT = 80
BOLD, GREEN, RED, DIM, RESET = "\033[1m", "\033[32m", "\033[31m", "\033[2m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = GREEN = RED = DIM = RESET = ""


class DemoFailed(Exception):
    """A step did not do what it said."""


_step = 0


def step(title: str) -> None:
    global _step
    _step += 1
    print(f"\n{BOLD}[{_step}] {title}{RESET}")


def show(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"    {DIM}{line}{RESET}")


def ok(claim: str) -> None:
    print(f"    {GREEN}ok{RESET}  {claim}")


def check(condition: bool, claim: str, evidence: str = "") -> None:
    if not condition:
        raise DemoFailed(f"{claim}\n{evidence}".rstrip())
    ok(claim)


def tproxy(ns: Namespace, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, "-m", "tproxy", *args, check=check, timeout=60)


def demo(topo: Topology, www: Path) -> None:
    gw = topo.gateway
    step("Three network namespaces: client -- gateway -- server")
    show(
        textwrap.dedent(f"""\
        client  {topo.client.name:<28} {topo.client_ip4}, {topo.client_ip6}
        gateway {gw.name:<28} {topo.gw_in}: {topo.gw_in_ip4} | {topo.gw_out}: {topo.gw_out_ip4}
        server  {topo.server.name:<28} {topo.server_ip4}, {topo.server_ip6}""")
    )
    ok("built, with the gateway routing between client and server")

    step(f"A web server on the server, port {WEB_PORT}")
    (www / "index.html").write_text(PAGE)
    web = http_server(topo.server, "::", WEB_PORT, www)
    show(f"index.html: {PAGE!r}")
    ok("python -m http.server is listening")

    step("tproxy run on the gateway, with the built-in `replace` interceptor")
    run_args = ["-i", "replace", "-o", "old=apples", "-o", "new=tproxy", "-o", "direction=server"]
    show("tproxy run " + " ".join(run_args))
    proxy = gw.popen(sys.executable, "-m", "tproxy", "run", *run_args, log_name="tproxy")
    gw.wait_port(PROXY_PORT, "127.0.0.1", proc=proxy)
    ok(f"listening on 127.0.0.1:{PROXY_PORT} and [::1]:{PROXY_PORT} (IP_TRANSPARENT)")

    step(f"tproxy setup {topo.gw_in} {topo.gw_out} --port {WEB_PORT}: divert web traffic")
    setup = tproxy(gw, "setup", topo.gw_in, topo.gw_out, "--port", str(WEB_PORT))
    show(setup.stdout + setup.stderr)
    rules = gw.run("iptables-legacy-save", "-t", "mangle").stdout
    show("\n".join(line for line in rules.splitlines() if "tproxy:" in line))
    check("TPROXY --on-port 9091" in rules, "the TPROXY rules are in the gateway's mangle table")

    step("tproxy status")
    status = tproxy(gw, "status", check=False)
    show(status.stdout)
    check(status.returncode == 0, "status says: installed and complete (exit code 0)")

    for family, server_ip, client_ip in (
        ("IPv4", topo.server_ip4, topo.client_ip4),
        ("IPv6", topo.server_ip6, topo.client_ip6),
    ):
        page_url = url(server_ip, WEB_PORT, "/index.html")
        step(f"The client fetches {page_url} with curl ({family})")
        page = curl(topo.client, page_url).stdout
        show(f"curl got: {page!r}")
        check(page == PAGE.replace("apples", "tproxy"), "the page arrived rewritten in flight")
        server_log = topo.server.read_log(web)
        # A dual-stack server writes IPv4 clients as ::ffff:a.b.c.d.
        seen = [
            line.removeprefix("::ffff:")
            for line in server_log.splitlines()
            if "GET /index.html" in line
        ]
        show(f"server log: {seen[-1] if seen else '(nothing)'}")
        check(
            bool(seen) and seen[-1].startswith(client_ip + " "),
            f"the server saw the client's own address {client_ip}, not the gateway's",
        )
    flows = [line for line in gw.read_log(proxy).splitlines() if " flow " in line]
    show("\n".join(line.split(": ", 1)[-1] for line in flows))
    check(
        any(f"client={topo.client_ip4}:" in line and "reason=eof" in line for line in flows),
        "the gateway's flow log has each flow, from the client to the server, ended cleanly",
    )

    step("Teardown: rules first, then the proxy")
    teardown = tproxy(gw, "teardown")
    show(teardown.stdout + teardown.stderr)
    status = tproxy(gw, "status", check=False)
    check(status.returncode == 3, "status now says: nothing installed (exit code 3)")
    rules = gw.run("iptables-legacy-save", "-t", "mangle").stdout
    check("tproxy:" not in rules and "TPROXY" not in rules, "no TPROXY rule is left")
    rule_list = gw.run("ip", "rule").stdout + gw.run("ip", "-6", "rule").stdout
    check("fwmark" not in rule_list, "no fwmark rule is left", rule_list)
    gw.stop(proxy)
    check(proxy.returncode == 0, "tproxy run stopped cleanly on SIGTERM (exit code 0)")


def main() -> int:
    install_signal_handlers()
    remove_stale()
    names: list[str] = []
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="tproxy-demo-") as tmp:
        topo = Topology(log_dir=Path(tmp) / "logs")
        names = [ns.name for ns in topo.namespaces]
        try:
            demo(topo, Path(tmp))
        except DemoFailed as exc:
            failure = str(exc)
        except Exception as exc:  # a broken step: say what, then clean up anyway
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            if failure:
                print(f"\n{RED}FAILED:{RESET} {failure}")
                show(topo.read_logs()[-4000:])
            step("Deleting the namespaces")
            topo.close()
    left = [name for name in names if name in list_namespaces()]
    try:
        check(not left, "nothing is left: no namespace, and with them no veth, rule or route")
    except DemoFailed:
        print(f"{RED}FAILED:{RESET} namespaces left: {left}")
        return 1
    if failure:
        return 1
    print(f"\n{GREEN}{BOLD}Demo complete.{RESET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
