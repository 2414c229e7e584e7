"""Backend for ip rules and local routes through pyroute2 (rtnetlink).

Ip rules and routes have no comments, so ours carry the protocol number
:data:`~tproxy.routing.plan.RT_PROTO` (``protocol 116`` / ``proto 116``).
The kernel compares it when adding (a foreign ``fwmark 1 lookup 100`` rule
does not clash with ours) and when deleting (we never delete a foreign twin).
Deleting what is not there (ENOENT/ESRCH) counts as already done.

Kept cheap (``docs/measurements.md``): one ``IPRoute`` per backend, opened
once per command and reused for every request; it joins no multicast group
(nothing but the answers to our requests arrives on it) and asks for strict
checking, so the kernel itself keeps only our routes (``proto 116``) in a
route dump. One dump of each kind serves both families, and device names
and indices come from ``if_nametoindex``/``if_indextoname`` (the socket and
the process are in the same namespace), never from a link dump.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from .backend import StepError
from .commands import describe
from .items import Family, Found, IpRule, Item, LocalRoute
from .plan import RT_PROTO

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY: dict[int, Family] = {socket.AF_INET: 4, socket.AF_INET6: 6}
_GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}
_RTN_LOCAL = 2


def _error_text(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})"
    return str(exc) or type(exc).__name__


def _name(index: int | None) -> str:
    try:
        return socket.if_indextoname(index or 0)
    except OSError:
        return "?"


class IPRouteBackend:
    """Ip rules and local routes via one ``pyroute2.IPRoute`` in the current namespace."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr: Any = IPRoute(groups=0, strict_check=True)

    def handles(self, item: object) -> bool:
        return isinstance(item, IpRule | LocalRoute)

    def _rule_args(self, item: IpRule) -> dict[str, Any]:
        return {
            "family": _AF[item.family],
            "fwmark": item.fwmark,
            "fwmask": item.fwmask,
            "table": item.table,
            "priority": item.priority,
            "protocol": RT_PROTO,
        }

    def _route_args(self, item: LocalRoute) -> dict[str, Any]:
        try:
            oif = socket.if_nametoindex(item.dev)
        except OSError:
            raise StepError(describe(item), f"no device {item.dev}") from None
        args: dict[str, Any] = {
            "family": _AF[item.family],
            "dst": item.dst,
            "type": "local",
            "oif": oif,
            "table": item.table,
            "proto": RT_PROTO,
        }
        if item.family == 4:
            args["scope"] = "host"  # the kernel answers EINVAL otherwise
        return args

    def add(self, item: Item) -> None:
        step = describe(item)
        try:
            if isinstance(item, IpRule):
                self._ipr.rule("add", **self._rule_args(item))
            elif isinstance(item, LocalRoute):
                self._ipr.route("add", **self._route_args(item))
            else:
                raise StepError(step, "not an ip rule or route")
        except StepError:
            raise
        except Exception as exc:
            raise StepError(step, _error_text(exc)) from exc

    def remove(self, item: Found) -> bool:
        if not isinstance(item, IpRule | LocalRoute):
            return False
        step = describe(item)
        try:
            if isinstance(item, IpRule):
                self._ipr.rule("del", **self._rule_args(item))
            else:
                self._ipr.route("del", **self._route_args(item))
        except StepError:
            return False  # no such device: the route cannot be there
        except Exception as exc:
            if getattr(exc, "code", None) in _GONE:
                return False
            raise StepError("remove " + step, _error_text(exc)) from exc
        return True

    def installed(self) -> list[Item]:
        """Our ip rules and routes, IPv4 and IPv6: one rule dump and one route dump.

        ``dump_filter=None`` skips pyroute2's own matching in Python; for
        routes the remaining arguments go into the request, where the kernel
        applies them (strict checking). Rule dumps take no filter but the
        family, so rules are picked by their ``FRA_PROTOCOL`` here.
        """
        found: list[Item] = []
        for rule in self._ipr.rule("dump", dump_filter=None, family=socket.AF_UNSPEC):
            family = _FAMILY.get(rule["family"])
            if family is None or rule.get_attr("FRA_PROTOCOL") != RT_PROTO:
                continue
            found.append(
                IpRule(
                    family,
                    rule.get_attr("FRA_FWMARK") or 0,
                    rule.get_attr("FRA_FWMASK") or 0,
                    rule.get_attr("FRA_TABLE") or rule["table"],
                    rule.get_attr("FRA_PRIORITY") or 0,
                )
            )
        routes = self._ipr.route("dump", dump_filter=None, family=socket.AF_UNSPEC, proto=RT_PROTO)
        for route in routes:
            family = _FAMILY.get(route["family"])
            if family is None or route["proto"] != RT_PROTO:
                continue
            table = route.get_attr("RTA_TABLE") or route["table"]
            dev = _name(route.get_attr("RTA_OIF"))
            if route["type"] == _RTN_LOCAL and route["dst_len"] == 0:
                found.append(LocalRoute(family, table, dev))
            else:
                found.append(LocalRoute(family, table, f"?{route['type']}/{dev}"))
        return found

    def close(self) -> None:
        self._ipr.close()
