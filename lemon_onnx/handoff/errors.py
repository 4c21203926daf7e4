"""The hand-off's error: a name, a config or an output that cannot be produced (exit 2)."""

from __future__ import annotations

from ..errors import LemonError


class HandoffError(LemonError):
    """export-torch cannot write PyTorch weights for this model (exit 2)."""
