"""Stage 7, write: the output contract as Parquet, the run manifest and the HTML report.

Every file is written to a temporary name in the output folder and renamed into place, so a
crashed run never leaves a half-written file where the last good one was.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("bytes", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")), ("width", pa.int32()), ("height", pa.int32()),
    ("format", pa.string()), ("sha256", pa.string()), ("hash", pa.string()), ("error", pa.string()),
    ("cluster_id", pa.int64()),
])
PAIRS_SCHEMA = pa.schema([
    ("path_a", pa.string()), ("path_b", pa.string()), ("image_id_a", pa.int64()),
    ("image_id_b", pa.int64()), ("hash_distance", pa.int16()), ("orb_matches", pa.int32()),
    ("orb_inliers", pa.int32()), ("orb_score", pa.float32()), ("cosine", pa.float32()),
    ("stage", pa.string()), ("is_duplicate", pa.bool_()), ("reason", pa.string()),
])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_table(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    _atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_json(data: dict, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8"))


def images_frame(images: pd.DataFrame) -> pd.DataFrame:
    out = images.copy()
    out["mtime"] = pd.to_datetime(out["mtime"], unit="s", utc=True).dt.floor("us")
    out["cluster_id"] = out["cluster_id"].where(out["cluster_id"] >= 0).astype("Int64")
    return out


def write_outputs(out_dir: Path, images: pd.DataFrame, pairs: pd.DataFrame, manifest: dict,
                  report: bool = True) -> None:
    """images/pairs: the run's frames (with abs paths for the report); writes the four files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(images_frame(images), IMAGES_SCHEMA, out_dir / "images.parquet")
    write_table(pairs, PAIRS_SCHEMA, out_dir / "pairs.parquet")
    if report:
        from pipeline.report import write_report  # OUT/report/ + OUT/report.html (pixels, jinja2)
        write_report(out_dir, images, pairs, manifest)
    write_json(manifest, out_dir / "run.json")  # last: its presence marks a complete run
