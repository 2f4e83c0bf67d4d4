"""``--quick`` for every benchmark: a run in seconds that proves the benchmark works end to end and prints its
last line with the same names (the figures of a quick run mean nothing). The test suite runs each benchmark so."""

from __future__ import annotations

import argparse
from typing import Any

QUICK_HELP = "a tiny run in seconds: checks that the benchmark works end to end (figures not meaningful)"


def parse_quick(ap: argparse.ArgumentParser, **small: Any) -> argparse.Namespace:
    """Add ``--quick`` to ``ap`` and parse; with it, each argument named in ``small`` takes that value."""
    ap.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = ap.parse_args()
    if args.quick:
        for name, value in small.items():
            if not hasattr(args, name):
                raise AttributeError(f"--quick sets {name!r}, which the benchmark has no argument for")
            setattr(args, name, value)
    return args
