"""Atomic file writes: write to a temp file in the destination folder, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; rename it into place only if the block succeeds.

    The temp name keeps the final suffix (GDAL picks drivers by extension) and starts with a dot so that
    half-written files are hidden. On any exception the temp file (and GDAL side files) are removed.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        for leftover in tmp.parent.glob(tmp.name + "*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
