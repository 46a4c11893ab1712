import json

import pandas as pd
import pytest

from pipeline.write import IMAGES_SCHEMA, _atomic, write_json, write_table


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
