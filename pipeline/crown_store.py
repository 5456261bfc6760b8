"""Crown polygons kept on disk between stages, so a run's peak memory does not follow its number of trees.

After species and height, a tree's polygon is needed only by the writers. :class:`StoredCrowns` holds the
trees as a plain table in memory (a few hundred bytes a tree) and their polygons in one WKB file (a GEOS
polygon costs about 1 KB in memory even after simplification), with every polygon's bounds in memory for
spatial queries. Writers read the polygons back a chunk at a time (:meth:`StoredCrowns.chunks`) or by index
(:meth:`StoredCrowns.geometries`); :func:`crown_source` gives an in-memory GeoDataFrame the same interface,
so every writer accepts either.

Pickling (Prefect's result cache) embeds the WKB bytes, so a cached result does not depend on the file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio.crs import CRS

WRITE_CHUNK = 5000  # polygons encoded to WKB at a time


class CrownStore:
    """Polygons as concatenated WKB (a file, or bytes in memory) with their offsets and bounds (CRS units)."""

    def __init__(self, offsets: np.ndarray, bounds: np.ndarray, path: Path | None = None,
                 data: bytes | None = None) -> None:
        self.offsets = offsets  # int64 [n + 1]: polygon i is bytes offsets[i]:offsets[i + 1]
        self.bounds = bounds  # float64 [n, 4]: minx, miny, maxx, maxy
        self.path = path
        self._data = data

    @classmethod
    def write(cls, folder: str | os.PathLike, geometries: np.ndarray) -> CrownStore:
        """Encode ``geometries`` into a new file in ``folder`` (created if missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crowns-{uuid.uuid4().hex[:12]}.wkb"
        geometries = np.asarray(geometries, dtype=object)
        offsets = np.zeros(len(geometries) + 1, dtype=np.int64)
        with open(path, "wb") as fh:
            for start in range(0, len(geometries), WRITE_CHUNK):
                part = shapely.to_wkb(geometries[start:start + WRITE_CHUNK])
                lengths = np.fromiter((len(b) for b in part), dtype=np.int64, count=len(part))
                offsets[start + 1:start + 1 + len(part)] = offsets[start] + np.cumsum(lengths)
                fh.write(b"".join(part))
        bounds = shapely.bounds(geometries) if len(geometries) else np.zeros((0, 4))
        return cls(offsets, np.asarray(bounds, dtype=float), path=path)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _read_span(self, lo: int, hi: int) -> bytes:
        """Bytes of polygons lo..hi-1."""
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        if self._data is not None:
            return self._data[a:b]
        if self.path is None or not self.path.exists():
            raise FileNotFoundError(f"{self.path}: the crown polygons of this run are gone; run it again")
        with open(self.path, "rb") as fh:
            fh.seek(a)
            return fh.read(b - a)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Polygons start..stop-1."""
        stop = min(stop, len(self))
        if stop <= start:
            return np.empty(0, dtype=object)
        blob = self._read_span(start, stop)
        cuts = self.offsets[start:stop + 1] - self.offsets[start]
        return shapely.from_wkb([blob[cuts[i]:cuts[i + 1]] for i in range(stop - start)])

    def read(self, index: np.ndarray) -> np.ndarray:
        """Polygons at ``index`` (in that order), read in runs of neighbouring indices."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty(len(index), dtype=object)
        if not len(index):
            return out
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        breaks = np.flatnonzero(np.diff(sorted_index) > 256) + 1  # gaps of over 256 polygons: a new read
        for run in np.split(np.arange(len(index)), breaks):
            lo, hi = int(sorted_index[run[0]]), int(sorted_index[run[-1]]) + 1
            polys = self.read_range(lo, hi)
            out[order[run]] = polys[sorted_index[run] - lo]
        return out

    def remove(self) -> None:
        """Delete the file (the store is unusable afterwards unless it holds its bytes in memory)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __reduce__(self) -> tuple[Any, ...]:
        data = self._data if self._data is not None else self._read_span(0, len(self))
        return (CrownStore, (self.offsets, self.bounds, None, data))


class StoredCrowns:
    """Trees as a table in memory (``table``: no geometry) and their polygons in a :class:`CrownStore`, in
    the same order; ``crs`` is the polygons' CRS (the run's working CRS)."""

    def __init__(self, table: pd.DataFrame, store: CrownStore, crs: Any) -> None:
        if len(table) != len(store):
            raise ValueError(f"{len(table)} rows but {len(store)} polygons")
        self.table = _positional(table)
        self.store = store
        self.crs = CRS.from_user_input(crs) if crs is not None else None

    @classmethod
    def spill(cls, crowns: gpd.GeoDataFrame, folder: str | os.PathLike) -> StoredCrowns:
        """Move ``crowns``' polygons to a file in ``folder``; the table keeps every other column and attrs."""
        store = CrownStore.write(folder, crowns.geometry.to_numpy())
        table = pd.DataFrame(crowns.drop(columns=crowns.geometry.name))
        table.attrs = dict(crowns.attrs)
        return cls(table, store, crowns.crs)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def columns(self) -> pd.Index:
        return self.table.columns

    @property
    def bounds(self) -> np.ndarray:
        return self.store.bounds

    def geometries(self, index: np.ndarray) -> np.ndarray:
        return self.store.read(index)

    def chunks(self, size: int) -> Iterator[gpd.GeoDataFrame]:
        """The trees ``size`` at a time as GeoDataFrames (working CRS)."""
        for start in range(0, len(self), size):
            part = self.table.iloc[start:start + size]
            yield gpd.GeoDataFrame(part, geometry=self.store.read_range(start, start + len(part)),
                                   crs=self.crs)

    def to_geodataframe(self) -> gpd.GeoDataFrame:
        """Everything in memory (for small runs and tests)."""
        return gpd.GeoDataFrame(self.table, geometry=self.store.read_range(0, len(self)), crs=self.crs)


class InMemoryCrowns:
    """A GeoDataFrame behind the :class:`StoredCrowns` interface."""

    def __init__(self, crowns: gpd.GeoDataFrame) -> None:
        self.frame = _positional(crowns)
        self.crs = crowns.crs

    def __len__(self) -> int:
        return len(self.frame)

    @cached_property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.frame.drop(columns=self.frame.geometry.name))

    @property
    def columns(self) -> pd.Index:
        return self.frame.columns.drop(self.frame.geometry.name)

    @property
    def bounds(self) -> np.ndarray:
        return np.asarray(shapely.bounds(self.frame.geometry.to_numpy()), dtype=float).reshape(-1, 4)

    def geometries(self, index: np.ndarray) -> np.ndarray:
        return self.frame.geometry.to_numpy()[np.asarray(index, dtype=np.int64)]

    def chunks(self, size: int) -> Iterator[gpd.GeoDataFrame]:
        for start in range(0, len(self), size):
            yield self.frame.iloc[start:start + size]

    def to_geodataframe(self) -> gpd.GeoDataFrame:
        return self.frame


def _positional(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` indexed 0..n-1 (a copy only when its index is something else)."""
    return frame if frame.index.equals(pd.RangeIndex(len(frame))) else frame.reset_index(drop=True)


def crown_source(crowns: Any) -> StoredCrowns | InMemoryCrowns:
    """``crowns`` (a GeoDataFrame or :class:`StoredCrowns`) behind one interface for the writers."""
    if isinstance(crowns, StoredCrowns | InMemoryCrowns):
        return crowns
    if isinstance(crowns, gpd.GeoDataFrame):
        return InMemoryCrowns(crowns)
    raise TypeError(f"expected a GeoDataFrame or StoredCrowns, got {type(crowns).__name__}")
