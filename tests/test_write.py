import json

import pandas as pd
import pytest

from pipeline.write import IMAGES_SCHEMA, _atomic, write_json, write_table, write_table_parts


def test_failed_write_keeps_the_last_good_file(tmp_path):
    target = tmp_path / "run.json"
    write_json({"run": 1}, target)

    def crash(tmp):
        tmp.write_text('{"run": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError):
        _atomic(target, crash)
    assert json.loads(target.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left behind


def test_a_part_that_fails_leaves_the_last_good_file(tmp_path):
    """write_table_parts: a part that fails (the decide or the disk) after others were written
    leaves the previous file whole and no temp file; parts write one row group each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("n", pa.int64())])
    target = tmp_path / "pairs.parquet"
    assert write_table_parts([pd.DataFrame({"n": [1, 2]}), pd.DataFrame({"n": [3]})], schema, target) == 3
    assert pq.ParquetFile(target).metadata.num_row_groups == 2

    def failing():
        yield pd.DataFrame({"n": [7]})
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_table_parts(failing(), schema, target)
    assert pd.read_parquet(target)["n"].tolist() == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]
    with pytest.raises(ValueError, match="no part"):
        write_table_parts([], schema, tmp_path / "empty.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]


def test_images_table_types(tmp_path):
    frame = pd.DataFrame({
        "image_id": [1, 2], "path": ["a.jpg", "b.jpg"], "bytes": [10, 20],
        "mtime": pd.to_datetime([1.7e9, 1.7e9], unit="s", utc=True), "width": pd.array([5, None], dtype="Int64"),
        "height": pd.array([5, None], dtype="Int64"), "format": ["JPEG", None], "sha256": ["x", "y"],
        "hash": ["00", None], "error": [None, "empty file"], "cluster_id": pd.array([None, None], dtype="Int64"), "raw_path": [None, b"b\xff.jpg"],
    })
    write_table(frame, IMAGES_SCHEMA, tmp_path / "images.parquet")
    back = pd.read_parquet(tmp_path / "images.parquet")
    assert back["error"].tolist()[1] == "empty file" and pd.isna(back["width"].iloc[1])
    assert back["bytes"].dtype == "int64"
    assert back["raw_path"].tolist() == [None, b"b\xff.jpg"]


@pytest.mark.parametrize("text", ["str", "string[pyarrow]", "object"])
def test_arrow_text_is_written_as_it_is_with_the_contracts_pandas_types(text, tmp_path):
    """Text columns held in Arrow go to the file without a Python string per row, and the file
    is the one a cast to the contract's `object` columns writes: same rows, same pandas metadata
    (so pandas reads the contract's types back)."""
    import pyarrow.parquet as pq

    from pipeline.write import PAIRS_DTYPES, PAIRS_SCHEMA, _table
    n = 5
    frame = pd.DataFrame({
        "path_a": pd.array(["a/1.jpg", "a/2.jpg", "ü/3.jpg", "b/4.jpg", "b/5.jpg"], dtype=text),
        "path_b": pd.array(["c/1.jpg", "c/2.jpg", "c/3.jpg", "c/4.jpg", "c/5.jpg"], dtype=text),
        "image_id_a": range(n), "image_id_b": range(10, 10 + n), "hash_distance": [0, 1, 2, 3, 4],
        **{c: pd.array([1, None, 3, 4, 5], dtype="Int32") for c in ("orb_matches", "orb_inliers")},
        **{c: pd.array([0.5, None, 1, 0, 0.25], dtype="Float32") for c in ("orb_score", "cosine", "ssim", "hist_corr")},
        "stage": pd.Categorical(["screen"] * n, categories=["exact", "screen", "verify", "confirm"]),
        "is_duplicate": [True, False, True, False, True],
        "reason": pd.array(["r1", None, "r3", "r4", "r5"], dtype=text),
        "rule": pd.Categorical(["x"] * n, categories=["x", "y"]),
    })
    as_objects = frame.astype({c: object for c in ("path_a", "path_b", "reason")})
    got, want = _table(frame, PAIRS_SCHEMA, PAIRS_DTYPES), _table(as_objects, PAIRS_SCHEMA, PAIRS_DTYPES)
    assert got.equals(want, check_metadata=True)
    pq.write_table(got, tmp_path / "p.parquet")
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert back["reason"].isna().tolist() == [False, True, False, False, False]
    assert back["path_a"].tolist() == frame["path_a"].tolist()


def test_arrow_text_in_chunks_writes_the_bytes_a_cast_writes():
    """A frame concatenated from the screen's partitions holds its Arrow text in chunks, which
    would page the column otherwise: the file is byte for byte the one the cast to objects wrote
    (run.json lists the outputs' digests)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.write import IMAGES_DTYPES, IMAGES_SCHEMA, _table, images_frame

    def part(n, first):
        names = pd.array([f"folder/{i:07d}.jpg" for i in range(first, first + n)], dtype="str")
        return pd.DataFrame({"image_id": np.arange(first, first + n), "path": names, "bytes": np.ones(n, np.int64),
                             "mtime": np.full(n, 1.7e9), "width": pd.array(np.ones(n), dtype="Int32"),
                             "height": pd.array(np.ones(n), dtype="Int32"),
                             "format": pd.array(["JPEG"] * n, dtype="str"),
                             "sha256": pd.array([f"{i:064x}" for i in range(first, first + n)], dtype="str"),
                             "hash": names, "error": pd.array([None] * n, dtype="str"),
                             "cluster_id": np.full(n, -1, np.int64), "raw_path": [None] * n})
    frame = images_frame(pd.concat([part(7000, 0), part(9001, 7000), part(30000, 16001)], ignore_index=True))
    assert frame["sha256"].array._pa_array.num_chunks == 3
    files = []
    for table in (_table(frame, IMAGES_SCHEMA, IMAGES_DTYPES),
                  _table(frame.astype({c: object for c in ("path", "format", "sha256", "hash", "error")}),
                         IMAGES_SCHEMA, IMAGES_DTYPES)):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        files.append(sink.getvalue().to_pybytes())
    assert files[0] == files[1]


def test_arrow_text_makes_no_python_string_per_row():
    import tracemalloc

    import numpy as np

    from pipeline.write import IMAGES_DTYPES, IMAGES_SCHEMA, _table
    n = 100_000
    names = pd.array([f"folder/{i:07d}.jpg" for i in range(n)], dtype="str")
    frame = pd.DataFrame({"image_id": np.arange(n), "path": names, "bytes": np.ones(n, np.int64),
                          "mtime": pd.to_datetime(np.full(n, 1.7e9), unit="s", utc=True),
                          "width": pd.array(np.ones(n), dtype="Int32"), "height": pd.array(np.ones(n), dtype="Int32"),
                          "format": pd.array(["JPEG"] * n, dtype="str"), "sha256": names, "hash": names,
                          "error": pd.array([None] * n, dtype="str"), "cluster_id": pd.array(np.ones(n), dtype="Int64"),
                          "raw_path": [None] * n})
    tracemalloc.start()
    try:
        _table(frame, IMAGES_SCHEMA, IMAGES_DTYPES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # (a Python string per row and text column: ~25 MB)


def test_publish_fsyncs_what_the_generation_wrote_not_the_links_it_reused(tmp_path, monkeypatch):
    """A generation's new files and folders are fsynced before the commit; a file hard-linked from
    an earlier generation (a reused report thumbnail) was made durable when that one was published."""
    import os

    from pipeline import outdir
    earlier = tmp_path / "earlier.jpg"
    earlier.write_bytes(b"thumb")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(outdir.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))

    def write(folder):
        (folder / "report" / "thumbs").mkdir(parents=True)
        (folder / "pairs.parquet").write_bytes(b"new")
        os.link(earlier, folder / "report" / "thumbs" / "old.jpg")
        (folder / "report" / "thumbs" / "new.jpg").write_bytes(b"made")

    out = tmp_path / "out"
    out.mkdir()
    gen = outdir.publish(out, "r1", write)
    names = {os.path.relpath(p, out / outdir.STATE_DIR) for p in synced}
    tmp = "tmp-r1"
    assert {f"{tmp}/pairs.parquet", f"{tmp}/report/thumbs/new.jpg", f"{tmp}/report/thumbs", f"{tmp}/report",
            tmp} <= names
    assert f"{tmp}/report/thumbs/old.jpg" not in names
    assert (gen / "report" / "thumbs" / "old.jpg").read_bytes() == b"thumb"


def test_publish_fsyncs_every_file_once_then_the_folders_deepest_first(tmp_path, monkeypatch):
    """More files than fsync threads, in nested folders: each file is fsynced once, every folder
    after all the files, deeper folders before their parents, and the pool is handed one job per
    thread, not a future per file; an fsync that fails stops the publish (the previous outputs
    stay)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import outdir
    monkeypatch.setattr(outdir, "FSYNC_THREADS", 4)
    submitted = []
    real_submit = ThreadPoolExecutor.submit
    monkeypatch.setattr(ThreadPoolExecutor, "submit",
                        lambda pool, fn, *a, **k: (submitted.append(fn), real_submit(pool, fn, *a, **k))[1])
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(outdir.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))
    files = [f"d{i % 3}/e{i % 2}/f{i:03d}.bin" for i in range(60)] + ["top.bin", "d0/g.bin"]

    def write(folder):
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(name.encode())

    out = tmp_path / "out"
    out.mkdir()
    outdir.publish(out, "r1", write)
    tmp = out / outdir.STATE_DIR / "tmp-r1"
    names = [os.path.relpath(p, tmp) for p in synced if p.startswith(str(tmp))]
    assert sorted(n for n in names if n.endswith(".bin")) == sorted(files)  # each once
    folders = names[len(files):]
    assert all(not n.endswith(".bin") for n in folders)  # folders after every file
    assert sorted(folders) == sorted({"."} | {os.path.dirname(f) for f in files if "/" in f}
                                     | {f.split("/")[0] for f in files if "/" in f})
    assert [n.count("/") + (n != ".") for n in folders] == sorted((n.count("/") + (n != ".") for n in folders),
                                                                  reverse=True)
    assert len(submitted) == 4

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("f007.bin"):
            raise OSError(5, "Input/output error")
        return real_fsync(fd)
    monkeypatch.setattr(outdir.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        outdir.publish(out, "r2", write)
    assert os.readlink(out / outdir.STATE_DIR / "current") == "gen-r1"
    assert not (out / outdir.STATE_DIR / "tmp-r2").exists()


def test_contract_pairs_are_sorted_by_path_whatever_the_row_order():
    """contract_pairs sorts by row number when the images are in path order (as the screen gives
    them) and by the paths otherwise: the same rows either way."""
    import numpy as np

    from pipeline import run
    from pipeline.report import PAIR_COLUMNS
    names = [f"d/{c}.jpg" for c in "pbxaqc"]
    images = pd.DataFrame({"image_id": np.arange(6, dtype=np.int64) + 100, "path": names,
                           "abs_path": [f"/r/{p}" for p in names]})
    ia, ib = np.array([4, 0, 1, 0, 3, 2]), np.array([5, 2, 2, 4, 5, 5])
    n = len(ia)
    pairs = pd.DataFrame({"idx_a": ia, "idx_b": ib, "hash_distance": np.arange(n, dtype=np.int16),
                          **{c: pd.array([None] * n, dtype="Int32") for c in ("orb_matches", "orb_inliers")},
                          **{c: pd.array([None] * n, dtype="Float32") for c in ("orb_score", "cosine", "ssim", "hist_corr")},
                          "stage": ["screen"] * n, "is_duplicate": [True] * n, "reason": [f"r{i}" for i in range(n)],
                          "rule": ["screen_hash_close"] * n})
    ordered = images.sort_values("path").reset_index(drop=True)
    new_row = {old: new for new, old in enumerate(images.sort_values("path").index)}
    in_order = pairs.assign(idx_a=[new_row[i] for i in ia], idx_b=[new_row[i] for i in ib])
    for imgs, prs in ((images, pairs), (ordered, in_order)):
        out = run.contract_pairs(prs, imgs)
        keys = list(zip(out["path_a"], out["path_b"]))
        assert keys == sorted(keys)
        assert out["hash_distance"].tolist() == [dict(zip(zip(ia, ib), range(n)))[(names.index(a), names.index(b))]
                                                 for a, b in keys]
        assert out["abs_path_a"].tolist() == [f"/r/{a}" for a, _ in keys]
        assert out["image_id_b"].tolist() == [100 + names.index(b) for _, b in keys]
        # the report's columns only (a run hands the report no path texts): the same rows
        few = run.contract_pairs(prs, imgs, columns=PAIR_COLUMNS)
        assert set(few.columns) == set(PAIR_COLUMNS) and "path_a" not in few
        pd.testing.assert_frame_equal(few, out[list(few.columns)])
        assert out["reason"].tolist() == [f"r{h}" for h in out["hash_distance"]]
        # rows handed over in the outputs' order (as a run does, part by part) are not sorted again
        taken = prs.iloc[run.output_order(prs, imgs)].reset_index(drop=True)
        sorting, output_order = [], run.output_order
        run.output_order = lambda *a: sorting.append(1) or output_order(*a)
        try:
            pd.testing.assert_frame_equal(run.contract_pairs(taken, imgs, in_order=True), out)
            pd.testing.assert_frame_equal(run.contract_pairs(taken.iloc[2:5], imgs, in_order=True),
                                          out.iloc[2:5].reset_index(drop=True))
        finally:
            run.output_order = output_order
        assert sorting == []


def test_pairs_written_in_parts_are_the_pairs_written_whole(review_data, review_run, tmp_path, monkeypatch):
    """A run decides and writes pairs.parquet a part at a time (decide.PART_ROWS pairs: the
    reasons of one part in memory): with parts of 7 pairs the files hold the same rows, types
    and categories as the review run's single part, in row groups of 7, and the report shows
    the same pairs, clusters and rejected pairs. images.parquet, written in row groups of 5
    (write.IMAGE_ROWS_PER_GROUP), holds the same rows and types as written whole."""
    import pyarrow.parquet as pq

    from pipeline import decide, write
    from pipeline.cli import main
    monkeypatch.setattr(decide, "PART_ROWS", 7)
    monkeypatch.setattr(write, "IMAGE_ROWS_PER_GROUP", 5)
    out = tmp_path / "out"
    assert main(["dedupe", str(review_data), "--out", str(out), "--scheduler", "sync", "--quiet",
                 "--set", "screen.mode=hash+embedding", "--set", "screen.embedding_min_cosine=0.3"]) == 0
    for name in ("pairs.parquet", "images.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(review_run / name), obj=name)
    whole = pq.ParquetFile(review_run / "pairs.parquet")
    parts = pq.ParquetFile(out / "pairs.parquet")
    assert whole.metadata.num_row_groups == 1
    assert parts.metadata.num_row_groups == -(-whole.metadata.num_rows // 7) > 3
    assert parts.schema_arrow.equals(whole.schema_arrow)  # (pandas metadata aside)
    images_whole, images_parts = (pq.ParquetFile(folder / "images.parquet") for folder in (review_run, out))
    assert images_whole.metadata.num_row_groups == 1
    assert images_parts.metadata.num_row_groups == -(-images_whole.metadata.num_rows // 5) > 3
    assert images_parts.schema_arrow.equals(images_whole.schema_arrow)
    assert pd.read_parquet(out / "pairs.parquet")["rule"].cat.categories.is_monotonic_increasing

    def data(folder):
        text = (folder / "report" / "data.js").read_text(encoding="utf-8")
        found = json.loads(text[text.index("{"):text.rindex("}") + 1])
        return {k: found[k] for k in ("images", "pairs", "clusters", "rejected", "errors")}, \
            found["meta"]["rejected_total"]
    assert data(out) == data(review_run)
