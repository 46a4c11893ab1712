"""Per-image features kept out of the driver: one Parquet file per partition under the work dir.

A tier computes its per-image features (ORB descriptors, embeddings) in tasks over image
partitions; each task writes one file and returns its path. Pair tasks then read only the
partitions they need, keyed by an integer key (cached per worker process), so no single process
ever holds every descriptor. With a remote Dask cluster the work dir must be on storage that all
workers see (as the images are): a shared folder or a store URL (pipeline/storage.py).
"""
from __future__ import annotations

import io
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from threading import Lock

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage


def write_partition(directory: str | Path, part: int, frame: pd.DataFrame | pa.Table) -> str:
    """Write `frame` (must have an int64 `key` column) atomically; returns the file path (or URL:
    on a store the file is one PUT, atomic by itself)."""
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if storage.is_url(directory):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        final = storage.join(directory, f"part-{part:06d}.parquet")
        storage.write_bytes(final, buf.getvalue())
        return final
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"part-{part:06d}.parquet"
    tmp = directory / f".part-{part:06d}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return str(final)


class _PartitionCache:
    """A small LRU of loaded partitions (DataFrames indexed by key), one per worker process."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._data: OrderedDict[str, pd.DataFrame] = OrderedDict()
        self._lock = Lock()

    def get(self, path: str) -> pd.DataFrame:
        with self._lock:
            if path in self._data:
                self._data.move_to_end(path)
                return self._data[path]
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
        frame = pq.read_table(source).to_pandas().set_index("key")
        with self._lock:
            self._data[path] = frame
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
        return frame


_CACHE = _PartitionCache()


def read_rows(paths: list[str], keys) -> pd.DataFrame:
    """Rows for `keys` (each present in one of `paths`), indexed by key, in the order of `keys`."""
    frames = [_CACHE.get(p) for p in dict.fromkeys(paths)]
    wanted = pd.Index(pd.unique(pd.Series(keys, dtype="int64")))
    pieces = [f.loc[f.index.intersection(wanted)] for f in frames]
    found = pd.concat(pieces) if pieces else pd.DataFrame()
    return found.reindex(wanted)
