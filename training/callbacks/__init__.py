"""The run's hook list: everything that happens around the optimizer step (checkpoints, evaluation,
stop signals, an adapter's phases and files) is a ``Callback`` the trainer calls at fixed points."""

from training.callbacks.base import Callback

__all__ = ["Callback"]
