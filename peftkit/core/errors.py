"""Exception types. Each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["PeftConfigError", "TargetModuleError", "CheckpointError", "AdapterNotFoundError", "NotMergeableError"]


class PeftConfigError(ValueError):
    """A config field has a bad value, an unknown name, or the file holding it cannot be read."""


class TargetModuleError(ValueError):
    """``target_modules`` names modules that are missing from the model or cannot be wrapped."""


class CheckpointError(ValueError):
    """An adapter checkpoint is missing, corrupt, or does not fit the model."""


class AdapterNotFoundError(KeyError):
    """An adapter name is not loaded on the model."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written.
        return str(self.args[0])


class NotMergeableError(RuntimeError):
    """The method computes something that cannot be folded into the base weights."""
