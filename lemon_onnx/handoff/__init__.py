"""Hand-off to training: PyTorch-named weights, config.json and LEMON's schedule."""

from .errors import HandoffError
from .export import ExportResult, export_torch

__all__ = ["ExportResult", "HandoffError", "export_torch"]
