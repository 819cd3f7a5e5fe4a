"""What the command-line scripts share: argument types and how bad input ends a script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from training.errors import UserError


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and sizes: an int >= 1, else argparse's one-line usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def exit_code(run: Callable[[], int], kinds: tuple[type[BaseException], ...] = (UserError,)) -> int:
    """A script's body run for its exit code: bad input (``kinds``) becomes one ``error: ...`` line on
    stderr and exit code 2, instead of a traceback."""
    try:
        return run()
    except kinds as e:
        print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
