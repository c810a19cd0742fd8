"""`premier world ...` and `premier eval` (being built for issue 6)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    return None
