"""The base class that tells bad input from a failure, and the error of an evaluation that cannot be done.

An exception that derives from :class:`UsageError` means the input was wrong — a profile value, a flag, a run id,
a model reference, an image set — and the message says which; the CLI prints it as one line and exits 2. Anything
else that escapes a command is a failure (exit 1).
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input rather than a failure (the CLI exits 2). Mixed into the engine's input errors."""


class EvaluationError(RuntimeError):
    """An evaluation that cannot be done: runs that form no attack pair, a missing twin, evaluation images that
    cannot be compared (one-line message)."""
