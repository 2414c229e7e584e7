"""``tproxy run``: placeholder until the engine lands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``run`` to the ``tproxy`` parser."""
