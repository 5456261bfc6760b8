"""pipeline.memory: freed heap goes back to the OS between stages (glibc), a no-op elsewhere."""

import platform

import numpy as np
import pytest

from pipeline.memory import _malloc_trim, release_free_heap, resident_mb

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and _malloc_trim() is not None


@pytest.mark.skipif(not glibc, reason="malloc_trim is glibc's")
def test_freed_heap_is_returned_to_the_os():
    # 2,000 blocks of 64 kB sit below glibc's mmap threshold, so they live in the heap; a block allocated
    # after them pins the heap top, so free() alone cannot shrink it.
    blocks = [np.ones(64 * 1024 // 8) for _ in range(2000)]
    pin = np.ones(1000)
    before = resident_mb()
    del blocks
    freed_only = resident_mb()
    assert isinstance(release_free_heap(), bool)
    trimmed = resident_mb()
    # most of the 131 MB is back with the OS: by free() where glibc could shrink the heap itself, by the
    # trim where the pinned top kept it (which of the two depends on the arena the blocks landed in)
    assert before - trimmed > 80
    assert trimmed <= freed_only + 1
    assert pin.sum() == 1000


def test_resident_size_is_reported_on_linux():
    rss = resident_mb()
    if platform.system() == "Linux":
        assert rss is not None and 10 < rss < 100_000
    else:
        assert rss is None


def test_compact_labels_keeps_values_and_stores_codes():
    import pandas as pd

    from pipeline.memory import compact_labels

    n = 5000
    df = pd.DataFrame({"species": ["Pinus palustris", "Quercus laevis"] * (n // 2),
                       "tree_id": range(n), "note": [f"t{i}" for i in range(n)],
                       "mixed": [1, "a"] * (n // 2), "level": ["genus", None] * (n // 2)})
    before = df.copy()
    deep = df.memory_usage(deep=True)
    compact_labels(df, max_unique=256)
    assert isinstance(df["species"].dtype, pd.CategoricalDtype)
    assert isinstance(df["level"].dtype, pd.CategoricalDtype) and df["level"].isna().sum() == n // 2
    assert not isinstance(df["note"].dtype, pd.CategoricalDtype)  # 5,000 distinct values: left as text
    assert df["mixed"].dtype == object and df["tree_id"].dtype == before["tree_id"].dtype
    assert df.astype(object).where(df.notna(), None).equals(before.astype(object).where(before.notna(), None))
    assert df.memory_usage(deep=True)["species"] < deep["species"] / 10
