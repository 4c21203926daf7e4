"""Progress of long work on stderr: a tqdm bar on a terminal, plain lines otherwise.

``Progress(verbosity)``: 0 quiet (nothing), 1 normal, 2 verbose.  A run is a sequence of
stages (``with progress.stage("save") as st: ...; st.done("saved")``), each of which ends
with a summary line and its time; ``progress.note(...)`` is for what the user must know about
the result (an untied head), shown unless quiet.

On a terminal the bar names the running stage and its elapsed time (refreshed every half
second, so a long save does not look frozen); the stage summaries appear above it only with
``-v``.  Elsewhere (CI logs, pipes) each stage prints one plain line when it ends.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from typing import TextIO

PREFIX = "lemon-onnx: "
#: seconds between two progress lines of a long stage in plain (non-terminal) output
PLAIN_EVERY = 10.0


class Stage:
    def __init__(self, name: str):
        self.name = name
        self.summary: str | None = None
        self.seconds = 0.0

    def done(self, summary: str) -> None:
        """The line logged with the stage's time when it ends."""
        self.summary = summary


class Progress:
    def __init__(self, verbosity: int = 1, *, stream: TextIO | None = None,
                 bar: bool | None = None, total: int | None = None):
        self.verbosity = verbosity
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.use_bar = verbosity > 0 and (isatty() if bar is None else bar)
        self.total = total
        self._bar = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_plain: float | None = None  # when advance last wrote a line (plain output)

    # ------------------------------------------------------------------ output
    def _write(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def log(self, message: str, level: int = 1) -> None:
        """A stage's summary: a plain line, or (on a terminal) above the bar with ``-v``."""
        if self.verbosity >= level and (not self.use_bar or self.verbosity >= 2):
            self._write(PREFIX + message)

    def note(self, message: str) -> None:
        """Something the user must know about the result; shown unless quiet."""
        if self.verbosity > 0:
            self._write(PREFIX + "note: " + message)

    # ------------------------------------------------------------------ stages
    @contextlib.contextmanager
    def stage(self, name: str, level: int = 1):
        """One stage: the bar shows ``name``; the summary given to the yielded ``Stage.done`` is logged
        (at ``level``: 2 for verbose only) with the stage's time when it ends without an
        exception."""
        st = Stage(name)
        if self.use_bar:
            self._open_bar()
            self._bar.set_description_str(PREFIX + name, refresh=True)
        t0 = time.perf_counter()
        try:
            yield st
        finally:
            if self._bar is not None:
                self._bar.update(1)
        st.seconds = time.perf_counter() - t0
        if st.summary:
            self.log(f"{st.summary} ({st.seconds:.1f}s)", level)

    def expect(self, total: int) -> None:
        """The number of stages to come, unless the caller gave it."""
        if self.total is None:
            self.total = total

    def advance(self, name: str, done: int, total: int) -> None:
        """How far a long stage has come, in GB: the bar's text on a terminal; elsewhere a
        line at most every ``PLAIN_EVERY`` seconds, none before the first interval (CI logs
        stay short)."""
        text = f"{name} {done / 1e9:.1f}/{total / 1e9:.1f} GB"
        if self._bar is not None:
            self._bar.set_description_str(PREFIX + text, refresh=False)
            return
        now = time.perf_counter()
        if self.verbosity > 0 and not self.use_bar and done < total:
            if self._last_plain is None:
                self._last_plain = now
            elif now - self._last_plain >= PLAIN_EVERY:
                self._write(PREFIX + text)
                self._last_plain = now

    def _open_bar(self) -> None:
        if self._bar is not None:
            return
        from tqdm import tqdm

        # a pty of unknown size (0 x 0) would make tqdm draw nothing at all
        size = shutil.get_terminal_size((80, 24))
        self._bar = tqdm(total=self.total, file=self.stream, leave=False,
                         ncols=min(size.columns or 80, 100), nrows=size.lines or 24,
                         bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}]"
                         if self.total else "{desc} [{elapsed}]")
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the bar (before the final line is printed)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
