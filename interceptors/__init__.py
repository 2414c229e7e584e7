"""Built-in interceptors of tproxy, usable by name with ``tproxy run -i NAME``.

This folder installs as the package ``tproxy.interceptors`` (``package-dir`` in
pyproject.toml), so it never takes the generic top-level name ``interceptors``
that a user's own package may have.

Each lives in its own module and is an ordinary
:class:`tproxy.Interceptor` subclass, so ``-i tproxy.interceptors.label:Label`` works
as well as ``-i label``. :data:`BUILTINS` maps the short names to those specs;
:mod:`tproxy.loading` resolves them.
"""

from __future__ import annotations

BUILTINS: dict[str, str] = {
    "label": "tproxy.interceptors.label:Label",
    "hexdump": "tproxy.interceptors.hexdump:Hexdump",
    "replace": "tproxy.interceptors.replace:Replace",
    "block": "tproxy.interceptors.block:Block",
    "latency": "tproxy.interceptors.latency:Latency",
    "bandwidth": "tproxy.interceptors.bandwidth:Bandwidth",
    "slicer": "tproxy.interceptors.slicer:Slicer",
    "limit": "tproxy.interceptors.limit:Limit",
    "reset": "tproxy.interceptors.reset:Reset",
    "blackhole": "tproxy.interceptors.blackhole:Blackhole",
    "slow-close": "tproxy.interceptors.slow_close:SlowClose",
    "dns": "tproxy.interceptors.dns:Dns",
}
"""Built-in name -> ``module:Class`` spec."""

__all__ = ["BUILTINS"]
