"""``tproxy setup``, ``teardown``, ``status`` and ``doctor`` (placeholder until routing lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the routing subcommands to the ``tproxy`` parser."""
