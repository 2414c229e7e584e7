"""Backend for ip rules and local routes through rtnetlink (:mod:`.rtnl`).

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

from . import rtnl
from .backend import StepError
from .commands import describe
from .items import Family, Found, IpRule, Item, LocalRoute
from .plan import RT_PROTO

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _error_text(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})"
    return str(exc) or type(exc).__name__


def _name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return "?"


class IPRouteBackend:
    """Ip rules and local routes on one rtnetlink socket in the current namespace."""

    def __init__(self) -> None:
        self._rtnl = rtnl.Rtnl()

    def handles(self, item: object) -> bool:
        return isinstance(item, IpRule | LocalRoute)

    def _message(self, item: IpRule | LocalRoute) -> tuple[int, int, bytes, bytes]:
        """(add type, delete type, header, attributes) of an item's request."""
        if isinstance(item, IpRule):
            body, attrs = rtnl.rule_message(
                _AF[item.family], item.fwmark, item.fwmask, item.table, item.priority, RT_PROTO
            )
            return rtnl.RTM_NEWRULE, rtnl.RTM_DELRULE, body, attrs
        try:
            oif = socket.if_nametoindex(item.dev)
        except OSError:
            raise StepError(describe(item), f"no device {item.dev}") from None
        body, attrs = rtnl.local_route_message(_AF[item.family], oif, item.table, RT_PROTO)
        return rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE, body, attrs

    def add(self, item: Item) -> None:
        if not isinstance(item, IpRule | LocalRoute):
            raise StepError(describe(item), "not an ip rule or route")
        new, _, body, attrs = self._message(item)
        try:
            self._rtnl.request(new, body, attrs, create=True)
        except OSError as exc:
            raise StepError(describe(item), _error_text(exc)) from exc

    def remove(self, item: Found) -> bool:
        if not isinstance(item, IpRule | LocalRoute):
            return False
        try:
            _, delete, body, attrs = self._message(item)
        except StepError:
            return False  # no such device: the route cannot be there
        try:
            self._rtnl.request(delete, body, attrs)
        except OSError as exc:
            if exc.errno in rtnl.GONE:
                return False
            raise StepError("remove " + describe(item), _error_text(exc)) from exc
        return True

    def installed(self) -> list[Item]:
        found: list[Item] = []
        family: Family
        for family in (4, 6):
            for rule in self._rtnl.dump(rtnl.RTM_GETRULE, _AF[family]):
                if rule.u8(rtnl.FRA_PROTOCOL) != RT_PROTO:
                    continue
                found.append(
                    IpRule(
                        family,
                        rule.u32(rtnl.FRA_FWMARK),
                        rule.u32(rtnl.FRA_FWMASK),
                        rule.u32(rtnl.FRA_TABLE, rule.table),
                        rule.u32(rtnl.FRA_PRIORITY),
                    )
                )
            for route in self._rtnl.dump(rtnl.RTM_GETROUTE, _AF[family]):
                if route.protocol != RT_PROTO:
                    continue
                table = route.u32(rtnl.RTA_TABLE, route.table)
                dev = _name(route.u32(rtnl.RTA_OIF))
                if route.kind == rtnl.RTN_LOCAL and route.dst_len == 0:
                    found.append(LocalRoute(family, table, dev))
                else:
                    found.append(LocalRoute(family, table, f"?{route.kind}/{dev}"))
        return found

    def close(self) -> None:
        self._rtnl.close()
