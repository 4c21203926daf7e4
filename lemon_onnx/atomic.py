"""Outputs that appear whole or not at all: a file written beside its destination and renamed
over it, and a finished folder renamed into place (an earlier one moved aside first, put back
if the rename fails).  Signals wait while a rename runs (``signals.deferred``)."""

from __future__ import annotations

import os
from pathlib import Path

from . import signals

__all__ = ["write_text", "replace_file", "commit_folder"]


def replace_file(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` over ``dest`` (same folder); ``tmp`` is gone either way."""
    try:
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> None:
    """``dest`` holds ``text`` whole, or is as it was."""
    dest = Path(dest)
    with signals.deferred():
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(text)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        replace_file(tmp, dest)


def commit_folder(new: Path, dest: Path, aside: Path) -> Path | None:
    """Rename the finished folder ``new`` to ``dest``: an existing ``dest`` is moved to
    ``aside`` first and put back if the rename fails.  A signal received before the commit
    stops it (``signals.check``); one received during it waits.  Returns ``aside`` when an
    earlier folder was moved there (the caller removes it), else None."""
    with signals.deferred():
        signals.check()
        signals.commit_started()
        moved = None
        if dest.exists():
            os.replace(dest, aside)
            moved = aside
        try:
            os.replace(new, dest)
        except OSError:
            if moved is not None:
                os.replace(moved, dest)
            raise
        return moved
