"""The errors an immunization run raises (the CLI turns each into a one-line message and an exit code)."""

from __future__ import annotations

from ..errors import UsageError


class ImmunizationError(RuntimeError):
    pass


class ImmunizationUsageError(ImmunizationError, ValueError, UsageError):
    """Bad input rather than a failure: a run that cannot be resumed, a method that does not exist (the CLI exits 2)."""


class ImmunizationInterrupted(KeyboardInterrupt):
    """Ctrl-C during an immunization run: ``run_id`` and the step its last checkpoint holds (None: no checkpoint)."""

    def __init__(self, run_id: str, step: int | None):
        self.run_id, self.step = run_id, step
        super().__init__(f"run {run_id} interrupted; "
                         + (f"its checkpoint holds step {step}" if step else "it has no checkpoint yet"))


class NonFiniteCheckpoint(ImmunizationError):
    """A checkpoint that was not written because some of its tensors are ``inf`` or ``nan``."""
