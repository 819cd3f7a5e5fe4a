"""Errors caused by evaluation input (weights, references, sample folders, prompts).

They subclass ``ValueError`` so evaluation stays independent of the trainer; the trainer and the
scripts turn them into one-line user errors.
"""


class EvaluationError(ValueError):
    """Unusable evaluation input; the message names the problem and the fix."""
