"""lemon-onnx: lossless width and depth expansion (LEMON) of Transformers exported to ONNX.

The Python API (README, "Python")::

    import lemon_onnx
    desc = lemon_onnx.inspect("model.onnx")                      # ModelDescription
    res = lemon_onnx.expand("model.onnx", "big.onnx", width=2)   # ExpandResult
    rep = lemon_onnx.verify("model.onnx", "big.onnx")            # VerifyReport

Failures raise ``LemonError`` subclasses (``InputError``, ``PlanError``, ``MismatchError``,
``RuntimeFailure``, ``InternalError``) or ``Interrupted``, each with the command line's
``exit_code``.

``lemon_onnx.expand`` and ``lemon_onnx.verify`` are also the names of the modules that hold
them, and importing a submodule sets the package attribute of that name to the module.  So
those two modules are made callable (``lemon_onnx.expand(...)`` calls
``lemon_onnx.expand.expand(...)``) whichever way and order they are imported; everything else
about them stays a module.  Nothing heavy is imported until it is used, so the command line
starts (and installs its signal handlers) quickly.
"""

from __future__ import annotations

import sys
import types

from .errors import (EXIT_CODES, InputError, InternalError, Interrupted, LemonError,
                     MismatchError, PlanError, RuntimeFailure, UnsupportedModelError,
                     contract_errors)

__version__ = "0.1.0"

#: submodule -> the function a call of the module runs
_CALLABLE = {"expand": "expand", "verify": "verify"}


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        name = _CALLABLE[self.__name__.rpartition(".")[2]]
        with contract_errors(f"running lemon_onnx.{name}"):
            return getattr(self, name)(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _CALLABLE and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _CALLABLE:
        import importlib

        return importlib.import_module(f".{name}", __name__)  # the import sets the attribute
    if name == "ExpandResult":
        from .expand import ExpandResult

        return ExpandResult
    if name == "VerifyReport":
        from .verify import VerifyReport

        return VerifyReport
    if name == "ModelDescription":
        from .recognize import ModelDescription

        return ModelDescription
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def inspect(path):
    """Recognise the Transformer in the ONNX file at ``path``: a ``ModelDescription``
    (family, layout, sizes, blocks, size literals; ``lemon_plan`` if lemon-onnx made it)."""
    from .io import load
    from .recognize import recognize

    with contract_errors("inspecting the model"):
        return recognize(load(path))


__all__ = ["inspect", "expand", "verify", "ExpandResult", "VerifyReport", "ModelDescription",
           "EXIT_CODES", "LemonError", "InputError", "UnsupportedModelError", "PlanError",
           "MismatchError", "RuntimeFailure", "InternalError", "Interrupted", "__version__"]
