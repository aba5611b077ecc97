"""The library's own exception types (below every other module, so any of them may raise these)."""

from __future__ import annotations

__all__ = ["UnsupportedHardwareError"]


class UnsupportedHardwareError(RuntimeError):
    """A backend or device was asked for on a machine or for inputs it cannot serve."""
