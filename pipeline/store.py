"""Per-image features kept out of the driver: one Parquet file per partition under the work dir.

A tier computes its per-image features (ORB descriptors, embeddings) in tasks over image
partitions; each task writes one file and returns its path. Pair tasks then read only the
partitions they need, keyed by an integer key (cached per worker process), so no single process
ever holds every descriptor. With a remote Dask cluster the work dir must be on storage that all
workers see (as the images are): a shared folder or a store URL (pipeline/storage.py).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from threading import Lock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

log = logging.getLogger("pipeline")


# Rows per Parquet row group. Parts are written sorted by key, so each row group's key range is
# tight and a reader that wants a few keys fetches and decodes only the row groups holding them
# (an incremental run or a query reads a few images out of many parts). A row of an ORB part is
# ~37 kB: a group of 8 is ~0.3 MB, where one of 32 (before) was ~1.2 MB fetched for one wanted row.
ROW_GROUP_ROWS = 8
# Statistics are written for the key only: a reader needs each row group's key range, and min/max
# of the blob columns (descriptors, thumbnails) made a 12-row-group ORB part's footer 147 kB,
# which a reader on a store fetches before anything else.
STATISTICS = ["key"]


def write_partition(directory: str | Path, part: int, frame: pd.DataFrame | pa.Table) -> str:
    """Write `frame` (must have an int64 `key` column) atomically, sorted by key, in row groups of
    ROW_GROUP_ROWS; returns the file path (or URL: on a store the file is one PUT, atomic by itself).
    Its size and sha256 are kept in this process (`written`) for the catalog's commit."""
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    table = table.sort_by("key")
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, write_statistics=STATISTICS)
    del table
    data = buf.getvalue()
    del buf
    digest = hashlib.sha256(data).hexdigest()
    if storage.is_url(directory):
        final = storage.join(directory, f"part-{part:06d}.parquet")
        storage.write_bytes(final, data)
        # (the object as the store has it now: kept only when it holds these bytes, since a task
        # run twice at once, e.g. on a worker taken for lost, writes the same name)
        now = _stored_state(final, hashlib.md5(data, usedforsecurity=False).digest())
    else:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        final = str(directory / f"part-{part:06d}.parquet")
        tmp = directory / f".part-{part:06d}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            now = _local_state(os.fstat(fh.fileno()))  # (this file's: a rename keeps it)
        os.replace(tmp, final)
    if now is not None and now[0] == len(data):
        with _WRITTEN_LOCK:
            _WRITTEN[final] = (len(data), digest, now[1])
            _WRITTEN.move_to_end(final)
            while len(_WRITTEN) > _WRITTEN_MAX:
                _WRITTEN.popitem(last=False)
    return final


# The parts this process wrote: path -> (bytes, sha256, state). The catalog's commit lists each
# new part by its size and sha256; with the writer's digest it asks only the part's state (one
# HEAD on a store, a stat locally) instead of reading every byte again (a first 2,415-image run
# on a store read ~93 MB of its own parts back for this). A part whose state has changed since
# (or one another process wrote and this one does not know) is hashed, as before.
_WRITTEN: OrderedDict[str, tuple[int, str, str]] = OrderedDict()
_WRITTEN_LOCK = Lock()
_WRITTEN_MAX = 65536  # (~500 B an entry; a 100k-file run writes a few hundred parts)


def _local_state(st: os.stat_result) -> tuple[int, str]:
    # (not the device: a share mounted on several hosts has another st_dev on each)
    return st.st_size, f"{st.st_mtime_ns}:{st.st_ino}"


def _stored_state(url: str, md5: bytes) -> tuple[int, str] | None:
    """(size, entity tag) of the object at `url` when its content digest (S3's single-part ETag,
    GCS's md5Hash, Azure's Content-MD5: `storage.content_tag`) is `md5`; else None (another
    writer's bytes, or a store that gives no such digest: the commit then hashes the part)."""
    import base64
    try:
        info = storage.fresh_info(*storage.filesystem(url))
    except Exception:  # (best effort: a failed HEAD only costs the commit a read)
        return None
    size, tag = storage.size_and_tag_of(info)
    ours = {"etag:" + md5.hex(), "md5:" + base64.b64encode(md5).decode("ascii")}
    return (size, tag) if tag and size is not None and storage.content_tag(info) in ours else None


def state(path: str) -> tuple[int, str] | None:
    """What identifies a part's bytes now: (size, entity tag) of a stored object, (size,
    "mtime_ns:inode") of a local file; None when the store gives no tag."""
    if storage.is_url(path):
        fs, object_path = storage.filesystem(path)
        size, tag = storage.size_and_tag(fs, object_path)
        return None if size is None or not tag else (size, tag)
    return _local_state(os.stat(path))


def written(under: str) -> dict[str, tuple[int, str, str]]:
    """The parts this process wrote under `under` (a folder or a prefix): path -> (bytes,
    sha256, state as `state` gave it right after the write)."""
    prefix = str(under).rstrip("/") + "/"
    with _WRITTEN_LOCK:
        return {p: v for p, v in _WRITTEN.items() if p.startswith(prefix)}


def written_anywhere(client, under: str) -> dict[str, tuple[int, str, str]]:
    """`written` of this process and of every worker of `client` (None: this process only). A
    worker that does not answer gives nothing: its parts are then read and hashed."""
    found = written(under)
    if client is not None:
        try:
            answers = client.run(written, under, on_error="ignore")
        except Exception as exc:  # (the commit goes on without: it hashes what it is not given)
            log.warning("the workers' part digests could not be gathered (%s); the new parts are read to hash them",
                        exc)
            answers = {}
        for got in answers.values():
            found.update(got)
    return found


# A part on a store is read by byte ranges: its footer once per process, then only the spans of
# the row groups and columns a reader wants. A whole GET per read was ~10x the catalog's bytes in
# GETs during a first 2,415-image run (each ORB part fetched 10-16 times whole by the pair tasks
# and the report).
FOOTER_READ = 64 * 1024  # the first read of a footer (a larger one takes a second read)
# Spans this close are fetched as one range: a request's round trip on a real store (~20-50 ms)
# costs more than reading 64 KiB more, so a pair task's row groups (all columns but the report's
# thumbnails, ~23 kB a group) come in one range per run of neighbouring groups, while the
# report's thumbnails still skip a group's descriptors and pixel thumbnails (~120 kB each).
RANGE_GAP = 64 * 1024


class _Spans(io.RawIOBase):
    """A read-only file of `size` bytes of which only `spans` (start -> bytes) were fetched:
    everything pyarrow reads of a part once its footer is given as metadata. A read outside
    them is an OSError, never made-up bytes."""

    def __init__(self, size: int, spans: dict[int, bytes]):
        super().__init__()
        self._size = size
        self._starts = sorted(spans)
        self._spans = spans
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = offset + (0 if whence == io.SEEK_SET else self._pos if whence == io.SEEK_CUR else self._size)
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        start = self._starts[i] if i >= 0 else None
        if start is None or self._pos + want > start + len(self._spans[start]):
            raise OSError(f"bytes {self._pos}-{self._pos + want} of a part were not fetched")
        at = self._pos - start
        buffer[:want] = self._spans[start][at:at + want]
        self._pos += want
        return want


def read_footer(url: str) -> tuple[bytes, int]:
    """A stored part's footer (its last bytes, ending in the footer's length and magic) and its
    size: the size, then its last FOOTER_READ bytes (two requests; a third when the footer is
    larger). The size is asked afresh: a listing this process made may predate the part."""
    fs, path = storage.filesystem(url)
    with storage.readable_errors(url):
        size, _ = storage.size_and_tag(fs, path)
        if size is None:
            raise OSError(f"{url}: the store gives no size for this object")
        return _footer_from(size, lambda start, end: fs.cat_file(path, start=start, end=end)), size


def _footer_from(size: int, read) -> bytes:
    """The footer of a part of `size` bytes, through `read(start, end)`."""
    tail = read(max(0, size - FOOTER_READ), size)
    need = int.from_bytes(tail[-8:-4], "little") + 8
    if len(tail) < need <= size:  # (the footer's head, before what was read)
        tail = read(size - need, size - len(tail)) + tail
    return tail[-need:]


def _pread(fd: int):
    """`read(start, end)` of an open local file (a short read where the file is shorter)."""
    return lambda start, end: os.pread(fd, end - start, start)


def parse_footer(footer: bytes) -> pq.FileMetaData:
    """The metadata in a footer from `read_footer` (read as a file of its bytes alone: the
    footer's length comes last, and the footer just before it)."""
    return pq.read_metadata(pa.BufferReader(footer))


def _chunk_span(meta: pq.FileMetaData, group: int, column: int) -> tuple[int, int]:
    chunk = meta.row_group(group).column(column)
    start = chunk.data_page_offset
    # (pyarrow's own rule: a dictionary page counts when it lies before the data pages)
    if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < start:
        start = chunk.dictionary_page_offset
    return int(start), int(start) + int(chunk.total_compressed_size)


def open_ranges(url: str, meta: pq.FileMetaData, size: int, groups: list[int], columns: list[str],
                fd: int | None = None) -> pq.ParquetFile:
    """The part at `url` as a ParquetFile that holds only the byte spans of `columns` in row
    groups `groups` (neighbouring spans fetched as one range, the ranges fetched together), or,
    with `fd`, read from that open local file. A span that comes back short (the part shrank
    after its footer was read) is an OSError."""
    names = meta.schema.to_arrow_schema().names
    spans = sorted(_chunk_span(meta, g, names.index(c)) for g in groups for c in columns if c in names)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= RANGE_GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if fd is not None:
        read = _pread(fd)
        data = [read(start, end) for start, end in merged]
    else:
        fs, path = storage.filesystem(url)
        with storage.readable_errors(url):
            data = fs.cat_ranges([path] * len(merged), [m[0] for m in merged], [m[1] for m in merged],
                                 on_error="raise") if merged else []
    for (start, end), got in zip(merged, data):
        if len(got) != end - start:
            raise OSError(f"{url}: {len(got)} of bytes {start}-{end} read: the part is shorter than its "
                          "footer says (truncated or replaced while being read)")
    # (pre_buffer off: the bytes are in memory already, and pyarrow's pre-buffering would merge
    # reads across small gaps this did not fetch)
    return pq.ParquetFile(_Spans(size, {m[0]: d for m, d in zip(merged, data)}), metadata=meta, pre_buffer=False)


def _groups_holding(ranges: np.ndarray, wanted: np.ndarray) -> list[int]:
    """The row groups whose key range (`_key_ranges`) holds a key of `wanted` (sorted int64)."""
    return [int(g) for g in np.flatnonzero(np.searchsorted(wanted, ranges[:, 1], side="right")
                                           > np.searchsorted(wanted, ranges[:, 0], side="left"))]


def _key_ranges(meta: pq.FileMetaData) -> np.ndarray:
    """(min, max) key of each row group, from the footer's statistics (any key when absent)."""
    col = meta.schema.to_arrow_schema().get_field_index("key")
    ranges = np.empty((meta.num_row_groups, 2), dtype=np.int64)
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(col).statistics
        ranges[g] = (stats.min, stats.max) if stats is not None and stats.has_min_max else \
            (np.iinfo(np.int64).min, np.iinfo(np.int64).max)
    return ranges


# Columns only a one-off reader wants (the report's thumbnails, `read_columns`): the pair tasks'
# cache leaves them on disk (~10 % of a feature row).
NOT_CACHED = ("report_thumb",)


class _PartitionCache:
    """A small LRU of loaded row groups (DataFrames indexed by key) and of each part's row-group
    key ranges, one per worker process; for a part on a store also its footer (metadata and
    size), so a later read fetches only the row groups it lacks. Parts are immutable once
    written (every writer makes a new path), so entries never go stale."""

    def __init__(self, capacity_rows: int = 4096, capacity_parts: int = 4096,
                 capacity_footer_bytes: int = 32 << 20):
        self.capacity_rows = capacity_rows  # ~ 16 partitions of 256 images, as before row groups
        self.capacity_parts = capacity_parts
        # footers kept as their bytes (~15 kB a part), parsed when used: a parsed one holds ~10x
        # its bytes (~145 kB for 12 row groups of 12 columns)
        self.capacity_footer_bytes = capacity_footer_bytes
        self._groups: OrderedDict[tuple[str, int], pd.DataFrame] = OrderedDict()
        self._rows = 0
        self._ranges: OrderedDict[str, np.ndarray] = OrderedDict()
        self._footers: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._footer_bytes = 0
        self._lock = Lock()

    def _footer(self, path: str) -> tuple[pq.FileMetaData, int]:
        """A stored part's metadata and size (its footer fetched once, `read_footer`)."""
        with self._lock:
            found = self._footers.get(path)
            if found is not None:
                self._footers.move_to_end(path)
        if found is None:
            found = read_footer(path)
            with self._lock:
                if path not in self._footers:
                    self._footers[path] = found
                    self._footer_bytes += len(found[0])
                while self._footer_bytes > self.capacity_footer_bytes and len(self._footers) > 1:
                    self._footer_bytes -= len(self._footers.popitem(last=False)[1][0])
        return parse_footer(found[0]), found[1]

    def get(self, path: str, wanted: np.ndarray) -> pd.DataFrame:
        """The part's rows whose key is in `wanted` (sorted int64)."""
        remote = storage.is_url(path)
        with self._lock:
            ranges = self._ranges.get(path)
        pf = meta = None
        if ranges is None:
            if remote:
                meta, size = self._footer(path)
            else:
                pf = pq.ParquetFile(path)
                meta = pf.metadata
            ranges = _key_ranges(meta)
            with self._lock:
                self._ranges[path] = ranges
                while len(self._ranges) > self.capacity_parts:
                    self._ranges.popitem(last=False)
        need = _groups_holding(ranges, wanted)
        with self._lock:
            have = {g: self._groups[(path, g)] for g in need if (path, g) in self._groups}
            for g in have:
                self._groups.move_to_end((path, g))
        missing = [g for g in need if g not in have]
        if missing:
            if remote:
                if meta is None:  # (not parsed above)
                    meta, size = self._footer(path)
                columns = [c for c in meta.schema.to_arrow_schema().names if c not in NOT_CACHED]
                pf = open_ranges(path, meta, size, missing, columns)
            else:
                pf = pf or pq.ParquetFile(path)
                columns = [c for c in pf.schema_arrow.names if c not in NOT_CACHED]
            frame = pf.read_row_groups(missing, columns=columns).to_pandas().set_index("key")
            sizes = [pf.metadata.row_group(g).num_rows for g in missing]
            bounds = np.cumsum([0, *sizes])
            with self._lock:
                for g, lo, hi in zip(missing, bounds[:-1], bounds[1:]):
                    have[g] = self._groups[(path, g)] = frame.iloc[lo:hi]
                    self._rows += hi - lo
                while self._rows > self.capacity_rows and len(self._groups) > 1:
                    self._rows -= len(self._groups.popitem(last=False)[1])
        if not have:
            return pd.DataFrame()
        found = pd.concat([have[g] for g in sorted(have)]) if len(have) > 1 else next(iter(have.values()))
        # (by binary search in `wanted`: `isin` hashed all of it for every part, and a caller asks
        # each of its parts for every key it wants, e.g. one per image, ~50 ms a part at 1M)
        keys = found.index.to_numpy(np.int64)
        at = np.minimum(np.searchsorted(wanted, keys), len(wanted) - 1)
        return found.loc[wanted[at] == keys]


_CACHE = _PartitionCache()


def read_rows(paths: list[str], keys) -> pd.DataFrame:
    """Rows for `keys` (each present in one of `paths`), indexed by key, in the order of `keys`.
    Only the row groups holding wanted keys are read (ROW_GROUP_ROWS)."""
    wanted = pd.Index(pd.unique(pd.Series(keys, dtype="int64")))
    sorted_wanted = np.sort(wanted.to_numpy())
    pieces = [_CACHE.get(p, sorted_wanted) for p in dict.fromkeys(paths)]
    pieces = [f for f in pieces if len(f)]
    found = pd.concat(pieces) if pieces else pd.DataFrame()
    found = found[~found.index.duplicated()]
    return found.reindex(wanted)


def read_keys(keys, paths) -> pd.DataFrame:
    """Rows for `keys`, each read from its own part file (`paths[i]` holds `keys[i]`), indexed by
    key, in the order the distinct keys first come. A key may be in more than one part (a stored
    failure made again is in its old part too): it is read from the part given for it only,
    where `read_rows` takes it from whichever of its parts holds it first."""
    keys = np.asarray(keys, dtype=np.int64)
    codes, distinct = pd.factorize(np.asarray(paths, dtype=object))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(distinct) + 1))
    pieces = [_CACHE.get(path, np.unique(keys[order[bounds[c]:bounds[c + 1]]])) for c, path in enumerate(distinct)]
    pieces = [f for f in pieces if len(f)]
    found = pd.concat(pieces) if pieces else pd.DataFrame()
    found = found[~found.index.duplicated()]
    return found.reindex(pd.Index(pd.unique(keys)))


class PartChecksumError(ValueError):
    """A part whose bytes are not those its catalog listed (changed or corrupt): not used."""


# (path, check) pairs this process has checked and found right: the report's drawing tasks open
# the same parts again and again (a part is ~13 MB to hash), and parts never change in place
_CHECKED: set[tuple[str, str]] = set()
_CHECKED_LOCK = Lock()
_CHECKED_MAX = 65536


def read_columns(path: str, keys, columns: list[str], check: str | None = None) -> pd.DataFrame:
    """`columns` of the rows for `keys` in one part, indexed by key, reading only the row groups
    that hold them and only those columns (the report's thumbnails without the descriptors); a
    column the part does not have (written before it existed) comes back as nulls. Not cached:
    for a one-off reader such as the report, not the pair tasks.

    `check`: "<bytes>:<sha256>" the part must have (a catalog's part: `Catalog.part_checks`);
    then the whole file is read and checked first, once per process (PartChecksumError when it
    differs; a local file a MiB at a time, then only the row groups and columns wanted are read
    from it). With ":<entity tag>" after it (a part on a store whose catalog lists its tag) the
    object's size and tag are compared instead, and the part is read and hashed only when they
    differ (`Catalog.verify_file`). A part on a store is otherwise read by ranges: its footer
    (kept per process, as the pair tasks' cache keeps it) and the spans of the wanted row groups
    and columns."""
    remote = storage.is_url(path)
    # a local part is read through one open file, its check included: a part replaced by a
    # rename meanwhile cannot mix two files' bytes
    with (contextlib.nullcontext() if remote else open(path, "rb")) as local:
        data = None
        if check is not None and (path, check) not in _CHECKED:
            size, digest, *tag = check.split(":", 2)
            same = False
            if remote and tag:  # the object the catalog hashed: same size and entity tag (one HEAD)
                with storage.readable_errors(path):
                    same = state(path) == (int(size), tag[0])
            if remote and not same:  # (another tag, e.g. after a copy: the bytes decide)
                data = storage.read_bytes(path)
                same = len(data) == int(size) and hashlib.sha256(data).hexdigest() == digest
            elif not remote:
                h, n = hashlib.sha256(), 0
                while block := local.read(1 << 20):
                    h.update(block)
                    n += len(block)
                same = n == int(size) and h.hexdigest() == digest
            if not same:
                raise PartChecksumError(f"{path}: not the bytes its catalog lists (changed or corrupt)")
            with _CHECKED_LOCK:
                if len(_CHECKED) >= _CHECKED_MAX:
                    _CHECKED.clear()
                _CHECKED.add((path, check))
        # only the spans of the wanted columns and row groups are read, a local part as a stored
        # one: not mapped (a read error on a mapped file, e.g. a network share failing, is a
        # SIGBUS that kills the process; a read is an OSError the report's fallback takes), and
        # not read through pyarrow's buffers (the report's threads reading a 100k run's parts so
        # held ~65 MB more)
        pf = None
        if data is not None:
            pf = pq.ParquetFile(io.BytesIO(data))
            meta, file_size = pf.metadata, None
        elif remote:
            meta, file_size = _CACHE._footer(path)
        else:
            file_size = os.fstat(local.fileno()).st_size
            meta = parse_footer(_footer_from(file_size, _pread(local.fileno())))
        have = set(meta.schema.to_arrow_schema().names)
        wanted = np.sort(pd.unique(pd.Series(keys, dtype="int64")).astype(np.int64))
        groups = _groups_holding(_key_ranges(meta), wanted)
        if pf is None:
            pf = open_ranges(path, meta, file_size, groups, ["key", *[c for c in columns if c in have]],
                             fd=None if remote else local.fileno())
        table = pf.read_row_groups(groups, columns=["key", *[c for c in columns if c in have]])
    # only the wanted rows become Python objects (a row group's keypoints and descriptors, made
    # into objects whole for a few of its rows, were the driver's largest item drawing the report)
    table = table.filter(pc.is_in(table["key"], value_set=pa.array(wanted, pa.int64())))
    frame = table.to_pandas().set_index("key")
    del table
    for c in columns:
        if c not in frame:
            frame[c] = None
    return frame[columns]


def shared_text(values) -> np.ndarray:
    """Text values as an object array holding one Python string per distinct value (None for
    missing): a stored table's column read back, or a `str` column's `to_numpy()`, makes a new
    string per row, and the evidence's sha256, fingerprints and statuses, or the feature rows'
    part files, repeat on many rows."""
    codes, uniques = pd.factorize(pd.Series(values) if not isinstance(values, pd.Series) else values)
    if not len(uniques):
        return np.full(len(codes), None, dtype=object)
    out = np.asarray(uniques, dtype=object).take(codes)  # (a code of -1, missing, is set below)
    out[codes < 0] = None
    return out


def part_of_keys(keys, parts) -> pd.Series:
    """key -> part path (object, one Python string per part file), from a summary's columns."""
    return pd.Series(shared_text(parts), index=pd.Index(np.asarray(keys, dtype=np.int64)), dtype=object)


class PartPaths:
    """Keys -> their part files (`part_of`: key -> part path), looked up many times: each part
    path once as a code over the sorted distinct paths (-1: none), and once as a Python string.
    A pandas `str` column (pandas 3's default for text) makes a new Python string per row when
    its values are taken out: a verify job's three path columns were ~3 x 100 B per pair in the
    driver (+200 MB at 100k files), and a frame built from those values turned them into `str`
    columns again."""

    def __init__(self, part_of: pd.Series):
        codes, paths = pd.factorize(part_of, sort=True, use_na_sentinel=True)
        self.code_of = pd.Series(codes, index=pd.Index(part_of.index, dtype=np.int64))
        self.shared = np.append(np.asarray(paths, dtype=object), None)  # (code -1 takes the last: None)

    def codes(self, keys) -> np.ndarray:
        """Each key's part file as its code (ordered as the paths sort; -1 where it has none)."""
        return self.code_of.reindex(np.asarray(keys, dtype=np.int64), fill_value=-1).to_numpy(np.int64)

    def paths(self, keys) -> pd.Series:
        """Each key's part file (None where it has none), an object column sharing one Python
        string per part file."""
        return pd.Series(self.shared.take(self.codes(keys)), dtype=object)


class RangeParts:
    """Keys (id * 8 + transform) -> their part files, where each part was written by a task over
    a range of image rows (verify's feature tasks: the needed images in row order, a run of them
    each): the tasks' first rows and part files, a number and a string per task, not an entry per
    key. A key's part is the one whose range holds its image's row (`rows`: the images' ids in
    row order, an Index; its hash table, which the caller's frame has already, finds the rows).

    `known`: keys whose rows are elsewhere (a catalog's), key -> part path, looked up first.
    `none`: image rows with no feature rows (failed upstream): their keys have no part (None).
    Every other key of a row in a task's range must be one that task was given: that holds for
    the keys a pair needs, which are the keys the tasks were cut from (`verify.run_verify`)."""

    def __init__(self, rows: pd.Index, firsts, paths, known: pd.Series | None = None,
                 none: np.ndarray | None = None):
        self.rows = rows
        self.firsts = np.asarray(firsts, dtype=np.int64)
        if len(self.firsts) and (np.diff(self.firsts) <= 0).any():
            raise ValueError("RangeParts: the tasks' first rows must ascend")
        self.tasks = np.append(shared_text(list(paths)), None)
        if len(self.tasks) != len(self.firsts) + 1:
            raise ValueError("RangeParts: one part path per task")
        self.known = PartPaths(known) if known is not None and len(known) else None
        self.none = none

    def paths(self, keys) -> pd.Series:
        """Each key's part file (None where it has none: a key < 0, or of a row in `none` or in
        no task's range), an object column sharing one Python string per part file."""
        keys = np.asarray(keys, dtype=np.int64)
        row = np.where(keys >= 0, self.rows.get_indexer(keys // 8), -1)
        task = np.searchsorted(self.firsts, row, side="right") - 1
        task[(row < 0) | (task < 0)] = -1  # (-1 takes the last: None)
        if self.none is not None:
            task[(row >= 0) & self.none[np.maximum(row, 0)]] = -1
        out = self.tasks.take(task)
        if self.known is not None:
            code = self.known.codes(keys)
            out = np.where(code >= 0, self.known.shared.take(code), out)
        return pd.Series(out, dtype=object)


def part_paths(part_of: pd.Series, keys) -> pd.Series:
    """The part file of each key (`part_of`: key -> part path; None where it has none), as an
    object column sharing one Python string per part file (`PartPaths`)."""
    return PartPaths(part_of).paths(keys)
