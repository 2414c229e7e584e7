"""Backend for ip rules and local routes through pyroute2 (rtnetlink).

Ip rules and routes have no comments, so ours carry the protocol number
:data:`~tproxy.routing.plan.RT_PROTO` (``protocol 116`` / ``proto 116``).
The kernel compares it when adding (a foreign ``fwmark 1 lookup 100`` rule
does not clash with ours) and when deleting (we never delete a foreign twin).
Deleting what is not there (ENOENT/ESRCH) counts as already done.
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
_GONE = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def _error_text(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})"
    return str(exc) or type(exc).__name__


class IPRouteBackend:
    """Ip rules and local routes via ``pyroute2.IPRoute`` in the current namespace."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ipr: Any = IPRoute()

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
        indices = self._ipr.link_lookup(ifname=item.dev)
        if not indices:
            raise StepError(describe(item), f"no device {item.dev}")
        args: dict[str, Any] = {
            "family": _AF[item.family],
            "dst": item.dst,
            "type": "local",
            "oif": indices[0],
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
            return False  # no lo: the route cannot be there
        except Exception as exc:
            if getattr(exc, "code", None) in _GONE:
                return False
            raise StepError("remove " + step, _error_text(exc)) from exc
        return True

    def installed(self) -> list[Item]:
        found: list[Item] = []
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        family: Family
        for family in (4, 6):
            for rule in self._ipr.get_rules(family=_AF[family]):
                if rule.get_attr("FRA_PROTOCOL") != RT_PROTO:
                    continue
                table = rule.get_attr("FRA_TABLE") or rule["table"]
                found.append(
                    IpRule(
                        family,
                        rule.get_attr("FRA_FWMARK") or 0,
                        rule.get_attr("FRA_FWMASK") or 0,
                        table,
                        rule.get_attr("FRA_PRIORITY") or 0,
                    )
                )
            for route in self._ipr.get_routes(family=_AF[family], table=None):
                if route["proto"] != RT_PROTO:
                    continue
                table = route.get_attr("RTA_TABLE") or route["table"]
                dev = names.get(route.get_attr("RTA_OIF"), "?")
                if route["type"] == 2 and route["dst_len"] == 0:  # RTN_LOCAL
                    found.append(LocalRoute(family, table, dev))
                else:
                    found.append(LocalRoute(family, table, f"?{route['type']}/{dev}"))
        return found

    def close(self) -> None:
        self._ipr.close()
