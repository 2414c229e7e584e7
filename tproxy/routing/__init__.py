"""Interception routing: a pure plan, and backends that apply and revert it.

Public API (details in each module):

* :mod:`.plan` -- ``PlanRequest``, ``build_request(...)``, ``make_plan(request) -> Plan``
* :mod:`.commands` -- ``setup_commands(plan)``, ``teardown_commands(items)`` (dry-run text)
* :mod:`.installer` -- ``install(plan, replace=False)``, ``teardown(instance)``,
  ``inspect(instance=None)``, errors ``RoutingError`` and subclasses
* :mod:`.run` -- ``add_run_arguments(parser)``, ``installed_for_run(args, ...)``
  for ``tproxy run --setup IN OUT --port PORTS``
"""

from __future__ import annotations

from typing import Any

from .plan import Plan, PlanError, PlanRequest, build_request, make_plan

__all__ = [
    "Plan",
    "PlanError",
    "PlanRequest",
    "add_run_arguments",
    "build_request",
    "check_for_run",
    "installed_for_run",
    "make_plan",
    "prepare_run_args",
]


def __getattr__(name: str) -> Any:
    # run.py imports tproxy.cli, which imports this package: load it lazily.
    if name in ("add_run_arguments", "check_for_run", "installed_for_run", "prepare_run_args"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
