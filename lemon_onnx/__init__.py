"""lemon-onnx: lossless width and depth expansion (LEMON) of Transformers exported to ONNX.

The Python API (README, "Python")::

    import lemon_onnx
    desc = lemon_onnx.inspect("model.onnx")                      # ModelDescription
    res = lemon_onnx.expand("model.onnx", "big.onnx", width=2)   # ExpandResult
    rep = lemon_onnx.verify("model.onnx", "big.onnx")            # VerifyReport

Failures raise ``LemonError`` subclasses (``InputError``, ``PlanError``, ``MismatchError``,
``RuntimeFailure``, ``InternalError``) or ``Interrupted``, each with the command line's
``exit_code``.

``expand`` and ``verify`` live in ``lemon_onnx.expansion`` and ``lemon_onnx.verification``;
the package hands them out on first use, so nothing heavy is imported until then and the
command line starts (and installs its signal handlers) quickly.
"""

from __future__ import annotations

import functools

from .errors import (EXIT_CODES, InputError, InternalError, Interrupted, LemonError,
                     MismatchError, PlanError, RuntimeFailure, UnsupportedModelError,
                     contract_errors)

__version__ = "0.1.0"

#: public name -> (module, function): loaded on first use (``__getattr__``)
_LAZY = {"expand": ("expansion", "expand"), "verify": ("verification", "verify"),
         "ExpandResult": ("expansion", "ExpandResult"),
         "VerifyReport": ("verification", "VerifyReport"),
         "ModelDescription": ("recognize", "ModelDescription")}


def _contract(fn):
    """``fn`` with every failure leaving as an exception with an ``exit_code``."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with contract_errors(f"running lemon_onnx.{fn.__name__}"):
            return fn(*args, **kwargs)

    return call


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        if callable(value) and not isinstance(value, type):
            value = _contract(value)
        globals()[name] = value  # loaded once
        return value
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
