"""`premier serve` (being built for issue 7)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    return None
