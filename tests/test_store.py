"""The per-image feature store (pipeline/store.py): parts sorted by key in small row groups, and
readers that decode only the row groups holding the keys they want."""
import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import storage, store


def _frame(keys, rng):
    return pd.DataFrame({"key": np.asarray(keys, np.int64),
                         "blob": [rng.bytes(64) for _ in keys],
                         "n": np.arange(len(keys), dtype=np.int32)})


def test_parts_are_sorted_by_key_in_row_groups(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.permutation(np.arange(0, 8 * 300, 8))  # written in any order
    path = store.write_partition(tmp_path, 0, _frame(keys, rng))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 300 and meta.num_row_groups == -(-300 // store.ROW_GROUP_ROWS)
    back = pq.read_table(path).column("key").to_numpy()
    assert (np.diff(back) > 0).all()


def test_read_keys_takes_each_key_from_its_own_part_when_another_part_has_it_too(tmp_path):
    """A failure made again: the old part keeps the key's failed row, the new part has the
    features; each key is read from the part given for it, whatever the order of the parts."""
    rng = np.random.default_rng(4)
    old = store.write_partition(tmp_path / "old", 0, _frame([8, 16, 24], rng))
    new = store.write_partition(tmp_path / "new", 0, _frame([16], rng))
    old_rows = pq.read_table(old).to_pandas().set_index("key")
    new_rows = pq.read_table(new).to_pandas().set_index("key")
    got = store.read_keys([8, 16, 24, 16], [old, new, old, new])
    assert got.index.tolist() == [8, 16, 24]
    assert got.loc[16, "blob"] == new_rows.loc[16, "blob"] != old_rows.loc[16, "blob"]
    assert got.loc[8, "blob"] == old_rows.loc[8, "blob"] and got.loc[24, "blob"] == old_rows.loc[24, "blob"]
    # (read_rows takes it from the first part holding it)
    assert store.read_rows([old, new], [8, 16]).loc[16, "blob"] == old_rows.loc[16, "blob"]
    assert store.read_keys([], []).empty and store.read_keys([40], [old]).loc[40].isna().all()


def test_read_rows_decodes_only_the_row_groups_it_needs(tmp_path):
    rng = np.random.default_rng(1)
    frames = [_frame(np.arange(p * 10_000, p * 10_000 + 8 * 200, 8), rng) for p in range(3)]
    paths = [store.write_partition(tmp_path / "parts", p, f) for p, f in enumerate(frames)]
    whole = pd.concat(frames).set_index("key")
    # keys from two parts, in a given order, one repeated, one absent from every part
    keys = np.array([20_008, 8, 1_592, 20_008, 10_000 + 800, 7], dtype=np.int64)
    cache = store._CACHE
    before = {k for k in cache._groups if k[0] in paths}
    assert not before  # fresh paths
    got = store.read_rows(paths, keys)
    assert got.index.tolist() == [20_008, 8, 1_592, 10_800, 7]  # order of first appearance
    pd.testing.assert_frame_equal(got.iloc[:4], whole.loc[[20_008, 8, 1_592, 10_800]], check_dtype=False, check_names=False)
    assert got.iloc[4].isna().all()  # an absent key gives an empty row, as before
    loaded = {k for k in cache._groups if k[0] in paths}
    # 8 and 1_592 are the first and last rows of part 0 (two row groups); 10_800 and 20_008 one each
    assert len(loaded) == 4, loaded
    # every row of a part when every key is asked for (as the from-scratch verify tier does)
    all_keys = frames[1]["key"].to_numpy()
    got = store.read_rows([paths[1]], all_keys)
    pd.testing.assert_frame_equal(got, whole.loc[all_keys], check_dtype=False, check_names=False)


def test_a_parts_rows_are_picked_from_many_wanted_keys_without_hashing_them_all(tmp_path, monkeypatch):
    """A caller asks each part for every key it wants (the high-recall screen from a catalog: one
    per image, from each part): a part picks its rows by binary search in the sorted keys, not by
    hashing all of them once per part (~17 MB and ~50 ms a part at 1M keys); the same rows."""
    import tracemalloc
    monkeypatch.setattr(store, "_CACHE", store._PartitionCache())
    rng = np.random.default_rng(4)
    frame = _frame(np.arange(0, 8 * 40, 8), rng)
    path = store.write_partition(tmp_path, 0, frame)
    wanted = np.union1d(np.arange(8, 8 * 3_000_000, 8 * 3), [0, 312, 8 * 10**8])  # (sorted, unique)
    expected = frame.set_index("key").loc[[k for k in frame["key"] if k in set(wanted[:200].tolist())]]
    store._CACHE.get(path, wanted[:1])  # (the part's footer and first group read outside the count)
    tracemalloc.start()
    got = store._CACHE.get(path, wanted)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got.index.tolist()[:2] == [0, 8] and got.index[-1] == 312
    assert peak < 4_000_000, f"picking a 40-row part's rows traced {peak} bytes"
    assert store._CACHE.get(path, np.array([4, 7], np.int64)).empty  # (keys in the part's range, none of its)


def test_parts_written_in_one_row_group_still_read(tmp_path):
    """A catalog's parts written before row groups (one group per part) read as before."""
    rng = np.random.default_rng(2)
    frame = _frame(np.arange(0, 8 * 100, 8), rng)
    path = str(tmp_path / "old.parquet")
    pq.write_table(__import__("pyarrow").Table.from_pandas(frame, preserve_index=False), path)
    got = store.read_rows([path], np.array([16, 400], np.int64))
    assert got.index.tolist() == [16, 400] and got["n"].tolist() == [2, 50]


def test_part_paths_share_one_string_per_part_file_and_none_where_missing():
    """A pandas `str` Series hands out a new Python string per row; the verify and confirm jobs'
    path columns are made of one string per part file instead (object columns)."""
    part_of = pd.Series(["/w/part-000001.parquet", "/w/part-000000.parquet", "/w/part-000001.parquet"],
                        index=np.array([8, 16, 24], np.int64))
    keys = np.array([24, 8, 40, -1, 16, 8, 24], np.int64)
    got = store.part_paths(part_of, keys)
    assert got.dtype == object and got.index.equals(pd.RangeIndex(len(keys)))
    assert got.tolist() == ["/w/part-000001.parquet", "/w/part-000001.parquet", None, None,
                            "/w/part-000000.parquet", "/w/part-000001.parquet", "/w/part-000001.parquet"]
    assert len({id(p) for p in got if p is not None}) == 2  # one object per part file
    assert store.part_paths(pd.Series([], dtype=object), keys).isna().all()
    assert len(store.part_paths(part_of, np.zeros(0, np.int64))) == 0


def test_range_parts_find_each_keys_part_by_its_images_row():
    """Parts written by tasks over ranges of image rows: a key's part is the task whose range
    holds its image's row (ids in no order: content ids); a key listed in `known` is found there,
    a key of a row in `none`, a key < 0 and a key of a row before the first range have none."""
    ids = pd.Index(np.array([907, 13, 500, 2, 64, 311, 77], np.int64))  # row i has id ids[i]
    parts = store.RangeParts(ids, [1, 3, 5], ["/w/p0", "/w/p1", "/w/p2"],
                             known=pd.Series(["/cat/x"], index=np.array([64 * 8 + 4], np.int64)),
                             none=np.array([False, False, False, False, False, False, True]))
    keys = np.array([13 * 8, 500 * 8 + 4, 2 * 8, 64 * 8, 64 * 8 + 4, 311 * 8, 77 * 8, 907 * 8, -1, 1234 * 8],
                    np.int64)
    got = parts.paths(keys)
    assert got.dtype == object and got.index.equals(pd.RangeIndex(len(keys)))
    assert got.tolist() == ["/w/p0", "/w/p0", "/w/p1", "/w/p1", "/cat/x", "/w/p2", None, None, None, None]
    assert got[0] is got[1]  # (one string per part file)
    assert store.RangeParts(ids, [], []).paths(keys).isna().all()
    with pytest.raises(ValueError, match="ascend"):
        store.RangeParts(ids, [3, 1], ["/w/a", "/w/b"])


class _CountingReads:
    """Bytes and requests a store-like filesystem serves (wraps MemoryFileSystem.cat_file)."""

    def __init__(self, monkeypatch):
        import fsspec.implementations.memory as memory
        self.reads: list[int] = []
        real = memory.MemoryFileSystem.cat_file

        def cat_file(fs, path, start=None, end=None, **kwargs):
            data = real(fs, path, start, end, **kwargs)
            self.reads.append(len(data))
            return data
        monkeypatch.setattr(memory.MemoryFileSystem, "cat_file", cat_file)


def _blob_frame(n, rng, blob=16_000):
    return pd.DataFrame({"key": rng.permutation(n).astype(np.int64) * 8,
                         "descriptors": [rng.bytes(blob) for _ in range(n)],
                         "report_thumb": [rng.bytes(blob // 4) for _ in range(n)],
                         "width": np.arange(n, dtype=np.int32)})


def _with_statistics(n, rng):
    """A part as written before the footer kept the key's statistics only: the keypoints' 4 kB
    values have min/max statistics (pyarrow skips larger ones), ~8 kB a row group."""
    frame = _blob_frame(n, rng).sort_values("key")
    return frame.assign(keypoints=[rng.bytes(4000) for _ in range(n)])


def test_a_part_on_a_store_is_read_by_ranges_with_the_same_rows(tmp_path, monkeypatch):
    """A reader of a stored part fetches its footer once per process, then only the spans of the
    row groups (and, for read_columns, the columns) it wants: not the whole object per read."""
    rng = np.random.default_rng(3)
    frame = _blob_frame(300, rng)
    url = store.write_partition(f"memory://ranges-{tmp_path.name}/feat", 0, frame)
    local = store.write_partition(tmp_path / "feat", 0, frame)
    size = len(storage.read_bytes(url))
    counted = _CountingReads(monkeypatch)
    keys = np.array([5, 77, 200, 201, 9999], np.int64) * 8  # three row groups; one key in none
    got = store.read_rows([url], keys)
    pd.testing.assert_frame_equal(got, store.read_rows([local], keys))
    assert got.index.tolist() == keys.tolist() and got.iloc[-1].isna().all()
    first = sum(counted.reads)
    groups = -(-300 // store.ROW_GROUP_ROWS)
    assert first < size * 4 / groups, (first, size)  # ~3 of 10 row groups, footer included
    # the same keys again: cached rows, nothing fetched; another row group: its span only
    counted.reads.clear()
    store.read_rows([url], keys[:2])
    assert counted.reads == []
    store.read_rows([url], np.array([100 * 8], np.int64))
    assert len(counted.reads) == 1 and sum(counted.reads) < size / groups * 1.1
    # read_columns: the wanted columns of the wanted row groups only (here no descriptors)
    counted.reads.clear()
    cols = ["report_thumb", "width", "not_in_this_part"]
    got = store.read_columns(url, keys, cols)
    pd.testing.assert_frame_equal(got, store.read_columns(local, keys, cols))
    assert got["not_in_this_part"].isna().all()
    assert 0 < sum(counted.reads) < size * 4 / groups / 4, counted.reads  # thumbnails are a fifth of a row


def test_a_stored_part_with_a_large_footer_and_a_checked_part_read_right(monkeypatch):
    """A part written before its footer kept the key's statistics only (blob statistics, a footer
    over store.FOOTER_READ) takes a second footer read; a catalog's part given a check is read
    whole and checked first, and a vanished part is a readable FileNotFoundError."""
    import hashlib

    import pyarrow as pa
    rng = np.random.default_rng(4)
    frame = _with_statistics(300, rng)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf, row_group_size=store.ROW_GROUP_ROWS)
    data = buf.getvalue()
    assert pq.read_metadata(io.BytesIO(data)).serialized_size > store.FOOTER_READ
    url = "memory://ranges-old/feat/part-000000.parquet"
    storage.write_bytes(url, data)
    counted = _CountingReads(monkeypatch)
    keys = np.array([8, 8 * 150], np.int64)
    got = store.read_columns(url, keys, ["width", "descriptors"])
    pd.testing.assert_frame_equal(got, frame.set_index("key").loc[keys, ["width", "descriptors"]], check_names=False)
    footer = pq.read_metadata(io.BytesIO(data)).serialized_size + 8
    assert counted.reads[:2] == [store.FOOTER_READ, footer - store.FOOTER_READ]  # the footer in two reads
    assert sum(counted.reads[2:]) < len(data) / 4  # then two of ten row groups' two columns
    counted.reads.clear()
    check = f"{len(data)}:{hashlib.sha256(data).hexdigest()}"
    store.read_columns(url, keys, ["width"], check=check)
    assert counted.reads == [len(data)]  # checked: the whole part, once
    with pytest.raises(store.PartChecksumError):
        store.read_columns(url, keys, ["width"], check=f"{len(data)}:{'0' * 64}")
    with pytest.raises(FileNotFoundError, match="no such object"):
        store.read_rows(["memory://ranges-old/feat/gone.parquet"], keys)


def test_spans_refuse_a_read_outside_what_was_fetched():
    f = store._Spans(100, {10: b"abcdef", 50: b"xyz"})
    f.seek(12)
    assert f.read(3) == b"cde"
    f.seek(-50, io.SEEK_END)
    assert f.read(3) == b"xyz" and f.tell() == 53
    f.seek(14)
    with pytest.raises(OSError, match="not fetched"):
        f.read(4)
    f.seek(100)
    assert f.read(5) == b""


def test_ranges_read_right_when_no_spans_are_merged(tmp_path, monkeypatch):
    """Every column chunk fetched as its own range (no gap merged): pyarrow reads nothing else
    (its pre-buffering, which would merge reads across small gaps, is off for fetched spans)."""
    monkeypatch.setattr(store, "RANGE_GAP", 0)
    monkeypatch.setattr(store, "_CACHE", store._PartitionCache())
    rng = np.random.default_rng(5)
    frame = _blob_frame(100, rng, blob=300).assign(
        label=lambda f: pd.Categorical(np.where(f["width"] % 3 == 0, "a", "b")),
        error=lambda f: np.where(f["width"] % 7 == 0, "bad", None),
        empty=None)
    url = store.write_partition(f"memory://ranges-nogap-{tmp_path.name}/feat", 0, frame)
    local = store.write_partition(tmp_path / "feat", 0, frame)
    for keys in (np.array([3, 50, 99], np.int64) * 8, np.zeros(0, np.int64), np.array([7], np.int64)):
        pd.testing.assert_frame_equal(store.read_rows([url], keys), store.read_rows([local], keys))
        cols = ["label", "error", "empty", "width"]
        pd.testing.assert_frame_equal(store.read_columns(url, keys, cols), store.read_columns(local, keys, cols))


def test_a_catalog_reads_the_keys_of_a_stored_part_by_ranges(tmp_path, monkeypatch):
    """The parts a run wrote (`catalog.parts_summary`) and a killed run's parts it adopts are
    listed by their key and error columns: on a store those columns' spans, not the part."""
    from pipeline import catalog
    rng = np.random.default_rng(6)
    frame = _blob_frame(150, rng).assign(error=lambda f: np.where(f["width"] % 5 == 0, "bad", None))
    directory = f"memory://ranges-keys-{tmp_path.name}/embed"
    url = store.write_partition(directory, 3, frame)
    size = len(storage.read_bytes(url))
    counted = _CountingReads(monkeypatch)
    got = catalog.parts_summary(directory)
    assert sum(counted.reads) < size / 20, (counted.reads, size)
    want = frame.sort_values("key")[["key", "error"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["key", "error"]], want)
    assert set(got["part_path"]) == {url}


def test_a_local_part_read_for_columns_is_read_by_spans_and_a_shrunk_one_is_an_error(tmp_path, monkeypatch):
    """read_columns reads a local part's footer and wanted spans through one open file, not a
    memory map: a part that shrinks under the reader (a failing share, a replaced file) is an
    OSError the report's fallback takes, not a SIGBUS that kills the process."""
    import os
    rng = np.random.default_rng(6)
    keys = np.arange(0, 8 * 200, 8)
    # (16 kB blobs: a row group's blob span, ~0.5 MB, is wider than the gap merged into one read)
    frame = pd.DataFrame({"key": keys, "blob": [rng.bytes(16_384) for _ in keys], "n": np.arange(200, dtype=np.int32)})
    path = store.write_partition(tmp_path, 0, frame)
    fetched = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: fetched.append(n) or pread(fd, n, at))
    got = store.read_columns(path, [8, 16], ["n"])
    assert got["n"].tolist() == [1, 2]
    size = os.path.getsize(path)
    assert 0 < sum(fetched) < 0.05 * size  # the footer, and the key and n spans of one row group

    footer = store._footer_from

    def then_truncated(*args):
        found = footer(*args)
        with open(path, "r+b") as fh:  # the part shrinks after its footer was read
            fh.truncate(100)
        return found
    monkeypatch.setattr(store, "_footer_from", then_truncated)
    with pytest.raises(OSError, match="shorter than its footer says"):
        store.read_columns(path, [8 * 150], ["blob"])


def test_the_writers_digests_are_kept_per_process_and_a_failed_gather_gives_this_process_s(tmp_path, caplog):
    """`written` lists the parts this process wrote under a folder, with the size and sha256 of
    their bytes; when the workers cannot be asked (`written_anywhere`), the commit still gets
    this process's (and reads the rest to hash them)."""
    import hashlib
    path = store.write_partition(tmp_path / "features" / "orb", 3, _frame([8, 16], np.random.default_rng(7)))
    data = open(path, "rb").read()
    size, digest, state = store.written(str(tmp_path / "features"))[path]
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest()) and (size, state) == store.state(path)
    assert path not in store.written(str(tmp_path / "feat"))  # (a folder, not a name prefix)

    class Unreachable:  # a cluster whose workers cannot be asked
        def run(self, *args, **kwargs):
            raise OSError("timed out")
    with caplog.at_level("WARNING", logger="pipeline"):
        assert path in store.written_anywhere(Unreachable(), str(tmp_path / "features"))
    assert "could not be gathered" in caplog.text
