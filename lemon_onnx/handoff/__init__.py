"""Hand-off to training: the expanded model as transformers loads it (safetensors under the
target architecture's own names, config.json), checked, and LEMON's learning-rate advice."""

from .errors import HandoffError
from .export import ExportResult, export_torch, verify_folder

__all__ = ["ExportResult", "HandoffError", "export_torch", "verify_folder"]
