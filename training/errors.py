"""Errors caused by the user's input: the launcher prints them as one line and exits ``exit_code``."""


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
