"""Give freed heap memory back to the operating system between the engine's stages.

glibc's allocator keeps memory that Python, numpy, GEOS and GDAL have freed in its arenas (one per thread
that allocated), so a process's resident size only ever rises: every stage that briefly needs memory in
proportion to the number of trees leaves that much resident for the rest of the run, and the next stage's
peak sits on top of it. ``malloc_trim(0)`` returns the free pages of every arena to the kernel, so a
stage's peak is its own working set, not the sum of what all earlier stages once touched.

On a C library without ``malloc_trim`` (macOS, Windows, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); True when any memory was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_mb() -> float | None:
    """The process's current resident set size in MB (Linux ``/proc/self/status``), None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def compact_labels(frame, max_unique: int = 256):
    """``frame`` with every text column of at most ``max_unique`` distinct values stored as a pandas
    categorical (one small integer code per row instead of one string per row: about 70 B less per tree
    and column). Values, order and missing entries are unchanged; returns the same object."""
    import pandas as pd

    for col in frame.columns:
        series = frame[col]
        # is_string_dtype is False for object columns holding anything but strings (and missing values)
        if pd.api.types.is_string_dtype(series) and not isinstance(series.dtype, pd.CategoricalDtype) \
                and series.nunique() <= max_unique:
            frame[col] = series.astype("category")
    return frame
