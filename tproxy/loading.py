"""Turn ``-i SPEC -o KEY=VALUE`` command-line arguments into interceptor factories.

A SPEC is one of:

- a built-in name: ``label``, ``hexdump``, ``replace``, ``block`` (see
  :data:`tproxy.interceptors.BUILTINS`; the top-level ``interceptors/`` folder
  of the source tree, installed as ``tproxy.interceptors``);
- ``package.module:Name`` (importable from ``sys.path``);
- ``path/to/file.py:Name`` (a file; told apart by the ``.py`` ending or a
  path separator); its folder is first on ``sys.path`` while it is loaded, so
  it can import a module beside it;
- a name registered by an installed distribution in the entry-point group
  ``tproxy.interceptors``, e.g. in its ``pyproject.toml``::

      [project.entry-points."tproxy.interceptors"]
      tarpit = "mypkg.tarpit:Tarpit"

Built-in names win over entry points of the same name, so installing a
package can never silently change what ``-i block`` does; the third-party
class stays reachable as ``-i mypkg.tarpit:Tarpit``.

Option keys are spelled with ``_`` before ``parse_options`` sees them
(:func:`tproxy.options.normalize_keys`: ``-o max-bytes=1`` arrives as
``max_bytes``). ``--when EXPR`` after an ``-i`` limits it to the flows that
match (:mod:`tproxy.selection`); :meth:`InterceptorFactory.selects` decides.

Everything is loaded and every option checked (``parse_options``) before the
proxy listens: any problem is a :class:`LoadError` with one line, which the
``tproxy`` command prints before exiting with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import selection as _selection
from .errors import UsageError
from .flow import FlowInfo
from .interceptor import Interceptor, OptionError
from .options import normalize_key, normalize_keys
from .selection import Selection, SelectionError

ENTRY_POINT_GROUP = "tproxy.interceptors"
"""The entry-point group third-party packages register interceptors in."""

InterceptorSpec = tuple[str, dict[str, str]] | tuple[str, dict[str, str], tuple[str, ...]]
"""One ``-i SPEC`` with the options of the ``-o KEY=VALUE`` that followed it, and the
``--when`` expressions given for it (the third item, only when there are any)."""


class LoadError(UsageError, ValueError):
    """An interceptor spec or its options are wrong. The message is one line."""


@dataclass(frozen=True)
class InterceptorFactory:
    """A loaded interceptor class with its checked options: call it once per flow."""

    cls: type[Interceptor]
    options: Any = field(compare=False)
    """What ``cls.parse_options`` returned; each instance sees it as ``self.options``."""
    spec: str
    """The spec as given on the command line."""
    selection: Selection = field(default_factory=Selection, compare=False)
    """Which flows get this interceptor (``--when``, else the class's ``when``)."""

    def selects(self, info: FlowInfo) -> bool:
        """Whether the flow ``info`` gets this interceptor (decided once, at its start):
        ``--when`` (or the class's ``when``), then the class's ``applies_to``."""
        return self.selection.matches(info) and self.cls.applies_to(self.options, info)

    def wants_client_hello(self, info: FlowInfo) -> bool:
        """Whether ``info.sni`` (a peeked ClientHello) could change :meth:`selects`."""
        return self.selection.wants_client_hello(info)

    @property
    def name(self) -> str:
        """A short name for logs: the spec as given (``replace``, ``mymod:Tarpit``)."""
        return self.spec

    def __call__(self, flow: FlowInfo) -> Interceptor:
        """Make the interceptor of one flow pair."""
        return self.cls(flow, self.options)


def builtin_names() -> dict[str, str]:
    """Built-in interceptor names -> ``module:Class`` specs."""
    return dict(_builtin_package().BUILTINS)


def _builtin_package() -> ModuleType:
    """``tproxy.interceptors``: installed (package-dir), or, in a source tree that was
    never installed, the ``interceptors/`` folder beside ``tproxy/`` under that name."""
    name = "tproxy.interceptors"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
    folder = Path(__file__).resolve().parent.parent / "interceptors"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise LoadError(f"the built-in interceptors are missing ({folder})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    import tproxy

    tproxy.interceptors = module  # type: ignore[attr-defined]
    return module


def resolve(spec: str) -> type[Interceptor]:
    """Find the interceptor class that ``spec`` names; raise :class:`LoadError`."""
    spec = spec.strip()
    if not spec:
        raise LoadError("empty interceptor spec")
    if ":" in spec:
        where, _, attr = spec.rpartition(":")
        if not where or not attr:
            raise LoadError(f"bad interceptor spec {spec!r}: expected MODULE:NAME or FILE.py:NAME")
        if where.endswith(".py") or os.sep in where or "/" in where:
            module = _load_file(spec, where)
        else:
            module = _import(spec, where)
        return _interceptor_class(spec, _attribute(spec, module, attr))
    builtins = builtin_names()
    if spec in builtins:
        module_name, _, attr = builtins[spec].partition(":")
        return _interceptor_class(spec, _attribute(spec, _import(spec, module_name), attr))
    entry = _entry_point(spec)
    if entry is not None:
        try:
            obj = entry.load()
        except Exception as exc:
            raise LoadError(
                f"interceptor {spec!r} (entry point {entry.value!r}) failed to load: "
                f"{_one_line(exc)}"
            ) from exc
        return _interceptor_class(spec, obj)
    others = sorted(_entry_point_names())
    known = ", ".join(sorted(builtins))
    extra = f"; installed: {', '.join(others)}" if others else ""
    raise LoadError(
        f"unknown interceptor {spec!r} (built-in: {known}{extra}; "
        "or give MODULE:NAME or FILE.py:NAME)"
    )


def load_interceptor(
    spec: str, options: Mapping[str, str] | None = None, when: Sequence[str] = ()
) -> InterceptorFactory:
    """Load ``spec``, check ``options`` with its ``parse_options`` and parse its selection.

    ``when`` holds ``--when`` expressions (OR); none keeps the class's ``when``
    attribute, if it has one, else every flow is selected.
    """
    cls = resolve(spec)
    try:
        selection = _selection.parse_selection(when or _selection.class_default(cls))
    except SelectionError as exc:
        raise LoadError(f"interceptor {spec!r}: {exc}") from exc
    try:
        parsed = cls.parse_options(normalize_keys(options or {}))
    except OptionError as exc:
        message = _one_line(exc)
        short = spec.strip()
        if message.startswith(f"{short}: "):  # built-ins name themselves already
            message = message[len(short) + 2 :]
        raise LoadError(f"interceptor {spec!r}: {message}") from exc
    except Exception as exc:
        raise LoadError(f"interceptor {spec!r}: parse_options raised {_one_line(exc)}") from exc
    return InterceptorFactory(cls=cls, options=parsed, spec=spec.strip(), selection=selection)


def load_all(specs: Iterable[Sequence[Any]]) -> list[InterceptorFactory]:
    """Load every ``(spec, options)`` or ``(spec, options, when)`` in order; the first
    problem raises :class:`LoadError`."""
    return [load_interceptor(*entry) for entry in specs]


def selection_warnings(
    factories: Iterable[InterceptorFactory], modes: Iterable[str], *, sni_available: bool = True
) -> list[str]:
    """Start-up warnings: selection terms, or options (an interceptor class's own
    ``unmatchable(options, modes)``), that can never match with these listener modes.

    ``sni_available``: TCP flows get their ClientHello peeked when ``sni=`` or
    ``host=`` needs it (:mod:`tproxy.peek`; with ``--tls intercept`` the TLS
    layer reads it), so those terms can match on every TCP listener; they are
    reported only for UDP-only listeners, or when this is False."""
    modes = list(modes)
    lines = []
    for factory in factories:
        for problem in _selection.unmatchable(
            factory.selection, modes, sni_available=sni_available
        ):
            lines.append(f"interceptor {factory.spec!r}: {problem}")
        own = getattr(factory.cls, "unmatchable", None)
        if callable(own):
            for problem in own(factory.options, modes):
                lines.append(f"interceptor {factory.spec!r}: {problem}")
    return lines


def warn_unmatchable(factories: Iterable[InterceptorFactory], specs: Iterable[Any]) -> None:
    """Log :func:`selection_warnings` for the listeners ``specs`` (``ModeSpec``s)."""
    import logging

    log = logging.getLogger("tproxy")
    for line in selection_warnings(factories, [spec.kind for spec in specs]):
        log.warning("%s", line)


# -- command line ----------------------------------------------------------


class InterceptorAction(argparse.Action):
    """``-i SPEC``: append ``(SPEC, {})`` to ``namespace.interceptors``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, str)
        if not values.strip():
            raise argparse.ArgumentError(self, "empty interceptor spec")
        specs: list[InterceptorSpec] = list(getattr(namespace, self.dest, None) or [])
        specs.append((values.strip(), {}))
        setattr(namespace, self.dest, specs)


class OptionAction(argparse.Action):
    """``-o KEY=VALUE``: add an option to the most recent ``-i``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, str)
        specs = _specs_so_far(self, namespace, values, "options follow their interceptor")
        key, eq, value = values.partition("=")
        key = key.strip()
        if not eq or not key:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {values!r}")
        spec, options, *rest = specs[-1]
        same = [k for k in options if normalize_key(k) == normalize_key(key)]
        if same:
            raise argparse.ArgumentError(self, f"option {key!r} given twice for -i {spec}")
        specs[-1] = (spec, {**options, key: value}, *rest)  # type: ignore[assignment]
        setattr(namespace, self.dest, specs)


class WhenAction(argparse.Action):
    """``--when EXPR``: limit the most recent ``-i`` to matching flows (repeat = OR)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, str)
        specs = _specs_so_far(self, namespace, values, "--when follows its interceptor")
        try:
            _selection.parse_condition(values)
        except SelectionError as exc:
            parser.error(str(exc))
        spec, options, *rest = specs[-1]
        whens: tuple[str, ...] = rest[0] if rest else ()
        specs[-1] = (spec, options, (*whens, values.strip()))
        setattr(namespace, self.dest, specs)


def _specs_so_far(
    action: argparse.Action, namespace: argparse.Namespace, values: str, rule: str
) -> list[InterceptorSpec]:
    """The ``-i`` specs given so far (a copy); an error when there is none to follow."""
    specs: list[InterceptorSpec] = list(getattr(namespace, action.dest, None) or [])
    if not specs:
        raise argparse.ArgumentError(action, f"{values!r} comes before any -i SPEC ({rule})")
    return specs


def add_interceptor_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-i/--interceptor SPEC`` and ``-o/--option KEY=VALUE`` to ``parser``.

    The result is ``args.interceptors``: a list of ``(spec, {key: value})``
    in command-line order, ready for :func:`load_all`.
    """
    parser.set_defaults(interceptors=[])
    group = parser.add_argument_group("interceptors")
    group.add_argument(
        "-i",
        "--interceptor",
        dest="interceptors",
        metavar="SPEC",
        action=InterceptorAction,
        help="add an interceptor to the chain (repeatable, in order): a built-in name "
        f"({', '.join(sorted(builtin_names()))}), MODULE:NAME, FILE.py:NAME, or an "
        f"installed '{ENTRY_POINT_GROUP}' entry point",
    )
    group.add_argument(
        "-o",
        "--option",
        dest="interceptors",
        metavar="KEY=VALUE",
        action=OptionAction,
        help="an option of the preceding -i (repeatable; max-bytes and max_bytes are one key)",
    )
    group.add_argument(
        "--when",
        dest="interceptors",
        metavar="EXPR",
        action=WhenAction,
        help="limit the preceding -i to flows matching EXPR: comma-separated KEY=VALUE terms "
        "that must all hold, keys dst=CIDR[;CIDR], port=PORTS (80;8000-8100), "
        "client=CIDR[;CIDR], mode=transparent|forward|socks|http, host=REGEX, sni=REGEX; "
        "repeat --when for OR. A flow no interceptor selects is relayed untouched",
    )


def parse_interceptor_args(argv: Sequence[str]) -> list[InterceptorSpec]:
    """Parse only ``-i``/``-o`` arguments; a usage error raises :class:`LoadError`."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            raise LoadError(message)

    parser = _Parser(add_help=False)
    add_interceptor_arguments(parser)
    result: list[InterceptorSpec] = parser.parse_args(list(argv)).interceptors
    return result


# -- helpers ------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _import(spec: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise LoadError(f"interceptor {spec!r}: no module named {missing!r}") from exc
        raise LoadError(
            f"interceptor {spec!r}: importing {module_name!r} failed: {_one_line(exc)}"
        ) from exc
    except Exception as exc:
        raise LoadError(
            f"interceptor {spec!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from exc


_file_modules: dict[Path, ModuleType] = {}


def _load_file(spec: str, filename: str) -> ModuleType:
    """Import a Python file once per resolved path, under a private module name."""
    path = Path(filename).expanduser()
    if not path.is_file():
        raise LoadError(f"interceptor {spec!r}: file not found: {filename}")
    path = path.resolve()
    if path in _file_modules:
        return _file_modules[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    name = f"tproxy_file_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise LoadError(f"interceptor {spec!r}: cannot import {filename} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    folder = str(path.parent)
    sys.path.insert(0, folder)  # so the file can import a module beside it
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise LoadError(
            f"interceptor {spec!r}: running {filename} raised "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    _file_modules[path] = module
    return module


def _attribute(spec: str, module: ModuleType, attr: str) -> Any:
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoadError(
                f"interceptor {spec!r}: {module.__name__} has no attribute {attr!r}"
            ) from None
    return obj


def _interceptor_class(spec: str, obj: Any) -> type[Interceptor]:
    if isinstance(obj, type) and issubclass(obj, Interceptor):
        return obj
    what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
    raise LoadError(f"interceptor {spec!r}: {what} is not a subclass of tproxy.Interceptor")


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    """The entry point called ``name``; two different ones are an error, not a guess."""
    found = {ep.value: ep for ep in _entry_points() if ep.name == name}
    if len(found) > 1:
        raise LoadError(
            f"interceptor {name!r} is registered more than once ({', '.join(sorted(found))}); "
            "give MODULE:NAME instead"
        )
    return next(iter(found.values()), None)


def _entry_point_names() -> set[str]:
    return {ep.name for ep in _entry_points()}
