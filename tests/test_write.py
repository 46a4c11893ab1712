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
