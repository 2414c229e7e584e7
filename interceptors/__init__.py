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
    "latency": "interceptors.latency:Latency",
    "bandwidth": "interceptors.bandwidth:Bandwidth",
    "slicer": "interceptors.slicer:Slicer",
    "limit": "interceptors.limit:Limit",
    "reset": "interceptors.reset:Reset",
    "blackhole": "interceptors.blackhole:Blackhole",
    "slow-close": "interceptors.slow_close:SlowClose",
}
"""Built-in name -> ``module:Class`` spec."""

__all__ = ["BUILTINS"]
