"""Built-in interceptors of tproxy, usable by name with ``tproxy run -i NAME``.

Each lives in its own module and is an ordinary
:class:`tproxy.Interceptor` subclass, so ``-i interceptors.label:Label`` works
as well as ``-i label``. :data:`BUILTINS` maps the short names to those specs;
:mod:`tproxy.loading` resolves them.
"""

from __future__ import annotations

BUILTINS: dict[str, str] = {
    "label": "interceptors.label:Label",
    "hexdump": "interceptors.hexdump:Hexdump",
    "replace": "interceptors.replace:Replace",
    "block": "interceptors.block:Block",
    "dns": "interceptors.dns:Dns",
}
"""Built-in name -> ``module:Class`` spec."""

__all__ = ["BUILTINS"]
