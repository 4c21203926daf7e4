"""Errors with the exit codes of the command-line contract (README, "Commands": exit codes).

Every error carries one clear paragraph for stderr: what was found and what to do about it,
and the exit code the command line ends with (``exit_code``), so a pipeline calling the
Python API can map failures the same way.  ``EXIT_CODES`` is the table that ``--help`` and
the README show.
"""

from __future__ import annotations

import contextlib
import errno

#: The contract, as ``--help`` of every command prints it.
EXIT_CODES = {
    0: "success",
    1: "not equivalent: the expanded model does not compute the same outputs",
    2: "bad or unsupported input, usage error, a refused expansion, or a file system or "
       "memory problem to fix on your side",
    3: "the source model cannot run in ONNX Runtime, or the requested provider is missing "
       "(checked before expanding)",
    4: "lemon-onnx produced an invalid graph or failed unexpectedly: a bug, please report it "
       "(rerun with LEMON_ONNX_DEBUG=1 for a traceback)",
    130: "interrupted (SIGINT or SIGTERM)",
}


def exit_codes_help(width: int = 78) -> str:
    """The exit-code table for ``--help`` (click keeps a ``\\b`` paragraph as it is)."""
    import textwrap

    rows = [textwrap.fill(what, width, initial_indent=f"  {code:>3}  ",
                          subsequent_indent=" " * 7) for code, what in EXIT_CODES.items()]
    return "\b\nExit codes:\n" + "\n".join(rows)


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


class ResourceError(LemonError):
    """The expansion does not fit in the free disk or memory of this machine (exit 2): refused
    before anything is computed, with the estimate's figures."""


class MismatchError(LemonError):
    """The expanded model does not compute the same numbers (exit 1)."""

    exit_code = 1


class RuntimeFailure(LemonError):
    """ONNX Runtime could not run the source model, or the provider is missing (exit 3)."""

    exit_code = 3


class Float64Unavailable(RuntimeFailure):
    """``--float64 on`` and the float64 level could not run (exit 3): neither ONNX Runtime nor
    onnx's reference evaluator runs a float64 copy of a model, so the algebraic proof is
    missing."""


class InternalError(LemonError):
    """lemon-onnx produced an invalid graph, or failed in a way it did not foresee (exit 4).

    Either way it is lemon-onnx's bug, not the user's: nothing was written."""

    exit_code = 4
    REPORT = ("This is a bug in lemon-onnx; nothing was written. Please report it with the "
              "command line and the output of a rerun with LEMON_ONNX_DEBUG=1 (a traceback).")

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, hint=hint or self.REPORT)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (exit 130); nothing was written and temporaries are gone.

    A ``KeyboardInterrupt``, not a ``LemonError``: ``except Exception`` and ``except
    LemonError`` in a pipeline do not swallow a Ctrl-C."""

    exit_code = 130

    def __init__(self, signum: int | None = None):
        import signal

        name = signal.Signals(signum).name if signum else "interrupt"
        self.signum = signum
        self.message = f"interrupted ({name}); nothing was written."
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's message on one line (runtime logs span several), at most ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: errno values of a write that found no room: a full disk, a quota, a file-size limit
_NO_ROOM = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, n)}


def as_contract_error(exc: BaseException, *, signal_received: int | None = None,
                      doing: str = "processing the model") -> BaseException:
    """The exception a failure leaves lemon-onnx as: ``exc`` itself when it already carries
    an exit code, else one that does.  A signal that came decides (130) whatever it turned
    into inside a library; an exception nobody foresaw is lemon-onnx's bug (4)."""
    if signal_received is not None and not isinstance(exc, Interrupted):
        return Interrupted(signal_received)
    if isinstance(exc, (LemonError, Interrupted)):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        import signal

        return Interrupted(signal.SIGINT)
    if isinstance(exc, MemoryError):
        return InputError("ran out of memory; nothing was written.",
                          hint="Use a machine with more RAM.")
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:  # said as what it is
        where = f" writing {exc.filename}" if exc.filename else ""
        return InputError(f"no room to write the output: {exc.strerror or exc}{where} (the "
                          "disk is full, or a quota or file-size limit was reached); nothing "
                          "was written.", hint="Free disk space (or raise the limit) and run "
                                               "again.")
    if isinstance(exc, OSError):  # permissions, full disk, missing folders: the user's to fix
        return InputError(f"{exc.strerror or exc} ({exc.filename or 'file'}); nothing was "
                          "written.", hint="Check the path, its permissions and the free "
                                           "disk space.")
    if isinstance(exc, Exception):
        return InternalError(f"unexpected {type(exc).__name__} while {doing}: "
                             f"{one_line(exc)}.")
    return exc  # SystemExit, GeneratorExit: not failures


@contextlib.contextmanager
def contract_errors(doing: str, source=None):
    """Every failure inside leaves as an exception with an ``exit_code``.  ``source``: the
    model file being processed; a failure that would be lemon-onnx's bug (exit 4) is the
    input's (exit 2) when that file is not a valid ONNX model (``invalid_source``)."""
    try:
        yield
    except BaseException as exc:
        from .signals import received  # (signals imports this module)

        new = as_contract_error(exc, signal_received=received(), doing=doing)
        if isinstance(new, InternalError) and source is not None:
            blamed = invalid_source(source, new)
            if blamed is not None:
                raise blamed from None
        if new is exc:
            raise
        raise new from (exc if isinstance(new, InternalError) else None)


def invalid_source(source, failure: "InternalError") -> "InputError | None":
    """An ``InputError`` when ``source`` fails ``onnx.checker`` with its full check (strict
    shape inference included): lemon-onnx stopped on a model that is not valid ONNX, which is
    the input's problem, not a bug.  None when the source is valid (or cannot be checked)."""
    import onnx

    try:
        onnx.checker.check_model(str(source), full_check=True)
        return None
    except Exception as exc:  # ValidationError, InferenceError, ...: the model is invalid
        problem = one_line(exc, 300)
    return InputError(f"{source} is not a valid ONNX model (onnx.checker: {problem}); "
                      f"lemon-onnx stopped on it ({one_line(failure.message, 200)}). Nothing "
                      "was written.", hint="Re-export the model, or check it with "
                                           "onnx.checker.check_model(path, full_check=True).")
