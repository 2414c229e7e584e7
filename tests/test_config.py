"""``tproxy run -c FILE.toml``: the file says what the command line says, is checked
key by key (errors name the key and the line), and the command line overrides it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tproxy import config
from tproxy.cli import build_parser
from tproxy.modes import parse_mode

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "tproxy.example.toml"


def _args(path: Path, *cli: str) -> argparse.Namespace:
    argv = ["run", "-c", str(path), *cli]
    args = build_parser().parse_args(argv)
    args.argv = argv
    return config.apply(args, config.run_argv(args))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tproxy.toml"
    path.write_text(text)
    return path


def _check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tproxy", "run", "-c", str(path), "--check", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_example_config_checks() -> None:
    done = _check(EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert "ok (2 listener(s), 2 interceptor(s))" in done.stdout


def test_file_values_reach_the_options(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
listeners = ["socks@127.0.0.1:1080"]
[flows]
connect_timeout = 3.5
idle-timeout = 60
splice = false
[logging]
log-format = "json"
verbose = 2
[routing]
setup = ["gw-in", "gw-out"]
port = [80, 443]
[[interceptor]]
spec = "label"
options = { text = "x", direction = "both" }
[[interceptor]]
spec = "hexdump"
""",
    )
    args = _args(path)
    assert args.mode == [parse_mode("socks@127.0.0.1:1080")]
    assert args.connect_timeout == 3.5 and args.idle_timeout == 60.0
    assert args.splice is False
    assert args.log_format == "json" and args.verbose == 2
    assert args.setup == ["gw-in", "gw-out"]
    assert args.interceptors == [("label", {"text": "x", "direction": "both"}), ("hexdump", {})]


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
mode = ["socks@127.0.0.1:1080", "http@127.0.0.1:3128"]
connect-timeout = 3
idle-timeout = 60
[[interceptor]]
spec = "label"
""",
    )
    args = _args(path, "--connect-timeout", "7", "--mode", "http@127.0.0.1:8080", "-i", "hexdump")
    assert args.connect_timeout == 7.0  # the command line wins
    assert args.idle_timeout == 60.0  # the file fills in the rest
    assert args.mode == [parse_mode("http@127.0.0.1:8080")]  # a list is replaced, not added to
    assert args.interceptors == [("hexdump", {})]
    assert args.config == str(path)
    plain = _args(path)
    assert plain.interceptors == [("label", {})] and plain.connect_timeout == 3.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("connect-timeout = 3\nbogus = 1\n", "tproxy.toml:2: unknown key 'bogus'"),
        ("[flows]\ngrace = 1\n\nspeed = 2\n", "tproxy.toml:4: unknown key 'speed'"),
        ("[nosuch]\na = 1\n", "tproxy.toml:1: unknown table [nosuch]"),
        (
            '[[interceptor]]\nspec = "label"\ncolour = "red"\n',
            "tproxy.toml:3: unknown key 'colour' in [[interceptor]]",
        ),
        ('\n\nconnect-timeout = "soon"\n', "tproxy.toml:3: connect-timeout: argument"),
        ('source = "elsewhere"\n', "tproxy.toml:1: source: argument --source: invalid choice"),
        ("splice = 3\n", "tproxy.toml:1: splice: expected true or false"),
        ("check = true\n", "tproxy.toml:1: unknown key 'check'"),
        ("worker-index = 1\n", "tproxy.toml:1: unknown key 'worker-index'"),
        ("a = [1,\n", "tproxy.toml: "),
        ('[[interceptor]]\noptions = {a = "b"}\n', "tproxy.toml:1: interceptor: each entry needs"),
    ],
)
def test_errors_name_the_key_and_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(config.ConfigError) as caught:
        config.file_tokens(str(path))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_of_a_bad_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, "[flows]\nconnect-timeout = 1\nmax-flow = 3\n")
    done = _check(path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"tproxy run: error: {path}:3: unknown key 'max-flow'")
    assert done.stdout == ""


def test_check_loads_the_interceptors(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[interceptor]]\nspec = "replace"\noptions = { from = "a" }\n')
    done = _check(path)
    assert done.returncode == 2
    assert "unknown option 'from'" in done.stderr


def test_check_refuses_values_the_engine_refuses(tmp_path: Path) -> None:
    done = _check(_write(tmp_path, "read-size = 10\n"))
    assert done.returncode == 2 and "read size must be" in done.stderr


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    done = _check(tmp_path / "nope.toml")
    assert done.returncode == 2 and "cannot read config file" in done.stderr
