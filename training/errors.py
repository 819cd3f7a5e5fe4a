"""Errors caused by the user's input: the launcher prints them as one line and exits ``exit_code``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """Bad input or an unusable environment; the message names the problem and the fix."""

    exit_code = 2


class NonFiniteLossError(UserError):
    """The loss became NaN or inf and the ``nan_policy`` could not recover."""


class RunInterrupted(UserError):
    """SIGINT or SIGTERM stopped the run; its message says where last.pt is and how to resume."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_code = 143 if signal_name == "SIGTERM" else 130  # 128 + the signal's number, as shells report


@contextlib.contextmanager
def user_errors(prefix: str = "", kinds: tuple[type[Exception], ...] = (ValueError,)) -> Iterator[None]:
    """The one place bad input found inside the objects a run builds (a value a class rejects, unreadable
    data, an evaluation that cannot run: ``DataError`` and ``EvaluationError`` are ValueErrors) becomes a
    one-line ``UserError``, ``prefix`` first. ``kinds`` narrows it where a ValueError could be a bug."""
    try:
        yield
    except kinds as e:
        raise UserError(f"{prefix}{e}") from e
