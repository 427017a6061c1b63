"""Replacing a report file in one step, so a reader (or a Ctrl-C) never meets a
half-written one: write a temporary file beside it, then rename it over the old."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields the temporary path to write; on success it replaces `path`, on an error
    (or an interrupt) it is removed and `path` stays as it was."""
    # Same folder (a rename across file systems is not atomic), same suffix (matplotlib
    # picks the image format from it).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
