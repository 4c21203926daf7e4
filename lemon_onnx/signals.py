"""SIGINT and SIGTERM: exit 130 with nothing written and no temporaries, whenever they come.

The handler (``install`` for the command line, ``handling`` around an API call) raises
``Interrupted`` at the next Python instruction, except inside ``deferred()`` blocks, where it
only records the signal: the block finishes and ``Interrupted`` is raised as it ends.  Temporary
folders are created and removed, and the output is committed, inside such blocks, so none of
them is ever half done.  Rules that make the outcome consistent:

- the first signal raises ``Interrupted`` once; later ones only record (a second Ctrl-C does
  not abort the cleanup of the first);
- the commit (the renames that put the output in place) starts only if no signal was
  received; once it has started it completes, and from then on signals are recorded and
  ignored: the run ends with exit 0 and its output, never with 130 and an output;
- once the command line has decided its exit code, signals are ignored (``finish``);
- ``received()`` tells the command line that a signal came even when a library turned the
  ``Interrupted`` into another exception (an import of a C extension can): exit 130 then.

Python runs handlers in the main thread only, between instructions: a signal that comes
while ONNX Runtime or protobuf is inside C code takes effect when that call returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM)


class _State:
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal number
        self.raised = False  # Interrupted was raised once already
        self.deferring = 0  # depth of deferred() blocks
        self.committed = False  # the commit started: signals no longer interrupt
        self.installed = False


_state = _State()


def _handler(signum, frame) -> None:
    if _state.received is None:
        _state.received = signum
    if _state.deferring or _state.committed or _state.raised:
        return
    _state.raised = True
    raise Interrupted(signum)


def install() -> None:
    """Process-wide handlers for the command line (never restored: the process ends)."""
    if _state.installed:
        return
    _state.__init__()
    for s in HANDLED:
        signal.signal(s, _handler)
    _state.installed = True


def finish() -> None:
    """The exit code is decided: ignore signals from here on.  (Python restores the default
    handlers while the interpreter shuts down, which takes a while after ONNX Runtime was
    loaded: a late Ctrl-C would otherwise kill a run that already succeeded.)"""
    _state.deferring += 1
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def handling():
    """Handlers for one API call, restored afterwards.  Only in the main thread, and only
    where the caller kept Python's defaults (a custom handler is left alone); inside an
    ``install``-ed process or a nested call this does nothing."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    mine = [s for s in HANDLED if signal.getsignal(s) == defaults[s]]
    _state.__init__()
    _state.installed = True
    for s in mine:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, defaults[s])
        _state.__init__()  # nothing of this call may decide a later one


@contextlib.contextmanager
def deferred():
    """Signals wait until the block ends; then ``Interrupted`` (unless the commit started)."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if (not _state.deferring and _state.received is not None and not _state.committed
                and not _state.raised):
            _state.raised = True
            raise Interrupted(_state.received)


def check() -> None:
    """Raise ``Interrupted`` if a signal was received (the commit calls this first)."""
    if _state.received is not None and not _state.committed:
        _state.raised = True
        raise Interrupted(_state.received)


def commit_started() -> None:
    """Call inside ``deferred()``, after ``check()``: the output will be put in place."""
    _state.committed = True


def received() -> int | None:
    """The first signal received, if it still decides the outcome (before the commit)."""
    return None if _state.committed else _state.received


def late() -> int | None:
    """A signal received after the commit started (ignored; the run completes)."""
    return _state.received if _state.committed else None
