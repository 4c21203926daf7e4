"""Errors with the exit codes of the command-line contract (design.md).

0 success, 1 numerical mismatch, 2 bad or unsupported input or usage, 3 the runtime could
not run the model.  Every error carries one clear paragraph for stderr: what was found and
what to do about it.
"""

from __future__ import annotations


class LemonError(Exception):
    """Base class: ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one paragraph
        return self.message if not self.hint else f"{self.message} {self.hint}"


class InputError(LemonError):
    """The file cannot be read, or is not a valid ONNX model (exit 2)."""


class UnsupportedModelError(LemonError):
    """A valid ONNX model that is not a Transformer lemon-onnx understands (exit 2)."""


class PlanError(LemonError):
    """The requested expansion is impossible or not lossless (exit 2)."""


class MismatchError(LemonError):
    """The expanded model does not compute the same numbers (exit 1)."""

    exit_code = 1


class RuntimeFailure(LemonError):
    """ONNX Runtime could not run a model (exit 3)."""

    exit_code = 3
