"""Loading interceptors from specs and parsing ``-i SPEC -o KEY=VALUE``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tproxy.cli import ArgumentParser, UsageError
from tproxy.flow import FlowInfo
from tproxy.interceptor import Interceptor
from tproxy.interceptors.label import Label, LabelOptions
from tproxy.interceptors.replace import Replace
from tproxy.loading import (
    InterceptorFactory,
    LoadError,
    add_interceptor_arguments,
    load_all,
    load_interceptor,
    parse_interceptor_args,
)

PLUGIN = textwrap.dedent(
    '''
    from tproxy import Interceptor, OptionError

    class Upper(Interceptor):
        """Upper-cases client data; option ``only`` limits it to one letter."""

        @classmethod
        def parse_options(cls, options):
            extra = set(options) - {"only"}
            if extra:
                raise OptionError(f"upper: unknown option {sorted(extra)[0]!r}")
            return options.get("only")

        def client_data(self, data):
            if self.options is None:
                return data.upper()
            return data.replace(self.options.encode(), self.options.upper().encode())

    def not_a_class():
        pass

    class NotAnInterceptor:
        pass
    '''
)


def flow() -> FlowInfo:
    return FlowInfo.example()


# -- built-ins -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["label", "hexdump", "replace", "block"])
def test_builtins_resolve(name: str) -> None:
    options = {"replace": {"old": "a"}, "block": {"port": "1"}}.get(name, {})
    factory = load_interceptor(name, options)
    assert isinstance(factory, InterceptorFactory)
    assert factory.name == name
    assert isinstance(factory(flow()), Interceptor)


def test_builtin_factory_builds_one_instance_per_flow_with_parsed_options() -> None:
    factory = load_interceptor("label", {"text": ">", "direction": "both"})
    assert factory.cls is Label
    assert factory.options == LabelOptions(text=b">", directions=frozenset({"client", "server"}))
    a, b = factory(flow()), factory(flow())
    assert a is not b and a.options is b.options
    assert a.client_data(b"x") == b">x"


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(LoadError) as info:
        load_interceptor("nope", {})
    message = str(info.value)
    assert "unknown interceptor 'nope'" in message
    for name in ("block", "hexdump", "label", "replace"):
        assert name in message
    assert "\n" not in message


def test_load_error_is_a_value_error_and_a_usage_error() -> None:
    # tproxy.cli.main prints UsageError as one line and exits 2
    assert issubclass(LoadError, ValueError) and issubclass(LoadError, UsageError)


# -- module and file specs ------------------------------------------------------------


def test_module_spec() -> None:
    factory = load_interceptor("tproxy.interceptors.replace:Replace", {"old": "a", "new": "b"})
    assert factory.cls is Replace
    assert factory.name == "tproxy.interceptors.replace:Replace"


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "tp_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tp_plugin_mod", None)


def test_module_spec_from_sys_path(plugin_dir: Path) -> None:
    factory = load_interceptor("tp_plugin_mod:Upper", {"only": "a"})
    assert factory(flow()).client_data(b"banana") == b"bAnAnA"


def test_module_not_found() -> None:
    with pytest.raises(LoadError, match=r"no module named 'no_such_mod_xyz'"):
        load_interceptor("no_such_mod_xyz:Thing", {})


def test_module_whose_import_fails_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tp_broken_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LoadError, match=r"importing 'tp_broken_mod' failed.*no_such_dependency"):
        load_interceptor("tp_broken_mod:X", {})
    (tmp_path / "tp_raising_mod.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(LoadError, match=r"RuntimeError: boom"):
        load_interceptor("tp_raising_mod:X", {})


def test_file_spec(tmp_path: Path) -> None:
    path = tmp_path / "my plugin.py"
    path.write_text(PLUGIN)
    factory = load_interceptor(f"{path}:Upper", {})
    assert factory.cls.__name__ == "Upper"
    assert factory(flow()).client_data(b"abc") == b"ABC"
    # the file is executed once: a second spec gets the same class
    assert load_interceptor(f"{path}:Upper", {"only": "b"}).cls is factory.cls


def test_relative_file_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rel_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    assert load_interceptor("sub/rel_plugin.py:Upper", {}).cls.__name__ == "Upper"


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"file not found: .*missing\.py"):
        load_interceptor(f"{tmp_path}/missing.py:X", {})


def test_file_that_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad_plugin.py"
    path.write_text("1/0\n")
    with pytest.raises(LoadError, match=r"ZeroDivisionError"):
        load_interceptor(f"{path}:X", {})


def test_attribute_missing(plugin_dir: Path) -> None:
    with pytest.raises(LoadError, match=r"tp_plugin_mod has no attribute 'Lower'"):
        load_interceptor("tp_plugin_mod:Lower", {})


@pytest.mark.parametrize("attr", ["not_a_class", "NotAnInterceptor"])
def test_not_an_interceptor(plugin_dir: Path, attr: str) -> None:
    with pytest.raises(LoadError, match=r"is not a subclass of tproxy.Interceptor"):
        load_interceptor(f"tp_plugin_mod:{attr}", {})


@pytest.mark.parametrize("spec", ["", ":X", "mod:", "  "])
def test_malformed_specs(spec: str) -> None:
    with pytest.raises(LoadError):
        load_interceptor(spec, {})


# -- options --------------------------------------------------------------------


def test_option_error_is_one_line_with_the_spec() -> None:
    with pytest.raises(LoadError) as info:
        load_interceptor("label", {"colour": "red"})
    assert str(info.value).startswith("interceptor 'label': unknown option 'colour'")
    assert "\n" not in str(info.value)


def test_default_parse_options_rejects_options() -> None:
    with pytest.raises(LoadError, match=r"takes no options"):
        load_interceptor("tproxy.interceptor:Interceptor", {"a": "b"})


def test_parse_options_raising_something_else(tmp_path: Path) -> None:
    path = tmp_path / "odd_plugin.py"
    path.write_text(
        "from tproxy import Interceptor\n"
        "class Odd(Interceptor):\n"
        "    @classmethod\n"
        "    def parse_options(cls, options):\n"
        "        return int(options['n'])\n"
    )
    assert load_interceptor(f"{path}:Odd", {"n": "3"}).options == 3
    with pytest.raises(LoadError, match=r"parse_options raised"):
        load_interceptor(f"{path}:Odd", {"n": "x"})


def test_load_all_keeps_order_and_stops_at_first_error() -> None:
    factories = load_all([("label", {}), ("replace", {"old": "x"}), ("hexdump", {})])
    assert [f.name for f in factories] == ["label", "replace", "hexdump"]
    with pytest.raises(LoadError, match="'bad'"):
        load_all([("label", {}), ("bad", {}), ("nope", {})])


# -- entry points -----------------------------------------------------------------


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real distribution on sys.path that registers two entry points."""
    (tmp_path / "tp_ep_plugin.py").write_text(PLUGIN)
    info = tmp_path / "tp_ep_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-ep-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[tproxy.interceptors]\n"
        "upper = tp_ep_plugin:Upper\n"
        "label = tp_ep_plugin:Upper\n"
        "broken = tp_ep_plugin:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tp_ep_plugin", None)


def test_entry_point(installed_plugin: Path) -> None:
    factory = load_interceptor("upper", {"only": "n"})
    assert factory.cls.__name__ == "Upper"
    assert factory(flow()).client_data(b"banana") == b"baNaNa"


def test_builtin_wins_over_entry_point_of_the_same_name(installed_plugin: Path) -> None:
    assert load_interceptor("label", {}).cls is Label


def test_broken_entry_point(installed_plugin: Path) -> None:
    with pytest.raises(LoadError, match=r"entry point 'tp_ep_plugin:Missing'.*failed to load"):
        load_interceptor("broken", {})


def test_two_packages_registering_one_name_is_an_error(
    installed_plugin: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = tmp_path_factory.mktemp("other")
    info = other / "tp_other-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-other\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[tproxy.interceptors]\nupper = tp_other:Upper\n")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(LoadError, match=r"registered more than once.*tp_ep_plugin:Upper"):
        load_interceptor("upper", {})


def test_unknown_name_lists_installed_entry_points(installed_plugin: Path) -> None:
    with pytest.raises(LoadError, match=r"installed: .*upper"):
        load_interceptor("nope", {})


# -- command line ---------------------------------------------------------------------


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="tproxy run")
    add_interceptor_arguments(p)
    return p


def test_cli_options_follow_their_interceptor() -> None:
    args = parser().parse_args(
        [
            "-i",
            "replace",
            "-o",
            "old=a",
            "--option",
            "new=b=c",
            "-i",
            "hexdump",
            "--interceptor",
            "label",
            "-o",
            "text=",
        ]
    )
    assert args.interceptors == [
        ("replace", {"old": "a", "new": "b=c"}),
        ("hexdump", {}),
        ("label", {"text": ""}),
    ]
    assert [f.name for f in load_all(args.interceptors)] == ["replace", "hexdump", "label"]


def test_cli_no_interceptors_gives_empty_list() -> None:
    p = parser()
    assert p.parse_args([]).interceptors == []
    p.parse_args(["-i", "label"])
    assert p.parse_args([]).interceptors == []  # the default was not mutated


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-o", "a=b"], "comes before any -i"),
        (["-i", "label", "-o", "novalue"], "expected KEY=VALUE"),
        (["-i", "label", "-o", "=v"], "expected KEY=VALUE"),
        (["-i", "label", "-o", "a=1", "-o", "a=2"], "given twice"),
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_parse_interceptor_args_helper() -> None:
    assert parse_interceptor_args(["-i", "block", "-o", "port=22"]) == [("block", {"port": "22"})]
    with pytest.raises(LoadError, match="before any -i"):
        parse_interceptor_args(["-o", "x=y"])


def test_plain_argparse_parser_works_too() -> None:
    p = argparse.ArgumentParser()
    add_interceptor_arguments(p)
    assert p.parse_args(["-i", "x", "-o", "k=v"]).interceptors == [("x", {"k": "v"})]


# -- packaging and file specs ----------------------------------------------------


def test_builtins_live_under_tproxy_namespace() -> None:
    import tproxy.interceptors

    assert tproxy.interceptors.BUILTINS["block"] == "tproxy.interceptors.block:Block"
    assert load_interceptor("block", {"port": "22"}).cls.__module__ == "tproxy.interceptors.block"


def test_a_users_own_interceptors_package_does_not_break_tproxy(tmp_path: Path) -> None:
    package = tmp_path / "interceptors"
    package.mkdir()
    (package / "__init__.py").write_text("MINE = True\n")
    (package / "mine.py").write_text(
        "from tproxy import Interceptor\n\nclass Mine(Interceptor):\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for argv in (["--help"], ["run", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "tproxy", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout
    check = (
        "from tproxy.loading import load_all; "
        "print([f.cls.__module__ for f in load_all([('interceptors.mine:Mine', {}), "
        "('block', {'port': '1'})])])"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['interceptors.mine', 'tproxy.interceptors.block']"


def test_file_spec_imports_a_module_beside_it(tmp_path: Path) -> None:
    (tmp_path / "sibling_helpers_xyz.py").write_text("SUFFIX = b'!'\n")
    (tmp_path / "shout.py").write_text(
        "from tproxy import Interceptor\n"
        "from sibling_helpers_xyz import SUFFIX\n\n"
        "class Shout(Interceptor):\n"
        "    def client_data(self, data):\n"
        "        return data + SUFFIX\n"
    )
    before = list(sys.path)
    factory = load_interceptor(f"{tmp_path / 'shout.py'}:Shout")
    assert factory(flow()).client_data(b"hi") == b"hi!"
    assert sys.path == before  # the folder was on sys.path only while loading
    sys.modules.pop("sibling_helpers_xyz", None)


def test_user_interceptor_options_arrive_with_normalised_keys(tmp_path: Path) -> None:
    (tmp_path / "keys.py").write_text(
        "from tproxy import Interceptor\n\n"
        "class Keys(Interceptor):\n"
        "    @classmethod\n"
        "    def parse_options(cls, options):\n"
        "        return dict(options)\n"
    )
    specs = parse_interceptor_args(
        ["-i", f"{tmp_path / 'keys.py'}:Keys", "-o", "max-bytes=1", "-o", r"y=\n"]
    )
    assert load_all(specs)[0].options == {"max_bytes": "1", "y": r"\n"}
