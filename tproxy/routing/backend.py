"""The small interface every routing backend implements.

A backend owns some kinds of plan items (python-iptables: chains and mangle
rules; pyroute2 (:mod:`.iproute`): ip rules and local routes) and can add one,
remove one, and list what of its kind is installed and tagged as ours. The installer
(:mod:`tproxy.routing.installer`) builds apply / verify / revert / inspect on
top of these four calls. The nftables backend (:mod:`.nft`) handles one item
kind, the whole table of an instance, added and removed in one transaction each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .items import Found, Item


class StepError(Exception):
    """The kernel refused to add or remove one item.

    ``step`` is the item's command line (as ``--dry-run`` prints it), ``cause``
    the kernel's (or library's) error text.
    """

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


class Backend(Protocol):
    """Adds, removes and lists installed items of the kinds it handles."""

    def handles(self, item: object) -> bool:
        """Whether this backend installs ``item``."""
        ...

    def add(self, item: Item) -> None:
        """Install ``item``; raise :class:`StepError` if the kernel refuses."""
        ...

    def remove(self, item: Found) -> bool:
        """Remove ``item``; False if it was not there (that is not an error).

        ``item`` may be an :class:`~.items.UnknownRule` (a rule of ours that
        python-iptables lists but the plan cannot express); backends that
        never list one return False for it.
        """
        ...

    def installed(self) -> Sequence[Found]:
        """Every installed item of ours (any instance) this backend can see."""
        ...

    def close(self) -> None:
        """Release kernel handles."""
        ...
