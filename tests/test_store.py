"""The per-image feature store (pipeline/store.py): parts sorted by key in small row groups, and
readers that decode only the row groups holding the keys they want."""
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import store


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
