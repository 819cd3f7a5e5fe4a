"""Errors caused by the user's input: the launcher prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input or an unusable environment; the message names the problem and the fix."""


class NonFiniteLossError(UserError):
    """The loss became NaN or inf and ``nan_policy=stop``."""
