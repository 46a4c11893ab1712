"""Stage 7, write: the output contract as Parquet, the run manifest and the HTML report.

The files of one run are written into a fresh generation folder that pipeline/outdir.py then
publishes in one atomic step, so readers see the previous run's set or this one's, never a mix.

Contract version 2 (README "Output"): the v1 columns keep their names and meaning; v2 adds the
`rule` code to pairs, stores `stage`/`rule` as dictionary columns (pandas `category`), writes
nullable integers so pandas reads them back as `Int32`/`Int64` (never float64), and puts the run's
provenance (contract version, run id, config, versions) in each Parquet file's schema metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import paths

CONTRACT_VERSION = 2
_DICT = pa.dictionary(pa.int8(), pa.string())

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("bytes", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")), ("width", pa.int32()), ("height", pa.int32()),
    ("format", pa.string()), ("sha256", pa.string()), ("hash", pa.string()), ("error", pa.string()),
    ("cluster_id", pa.int64()), ("raw_path", pa.binary()),
])
PAIRS_SCHEMA = pa.schema([
    ("path_a", pa.string()), ("path_b", pa.string()), ("image_id_a", pa.int64()),
    ("image_id_b", pa.int64()), ("hash_distance", pa.int16()), ("orb_matches", pa.int32()),
    ("orb_inliers", pa.int32()), ("orb_score", pa.float32()), ("cosine", pa.float32()),
    ("stage", _DICT), ("is_duplicate", pa.bool_()), ("reason", pa.string()), ("rule", _DICT),
    ("ssim", pa.float32()), ("hist_corr", pa.float32()),  # pixel check (verify.pixel_check)
])
# What `pd.read_parquet` gives back for each column (the pandas side of the contract); the file's
# pandas metadata records them (the frame is cast to them before writing, but for text kept in
# Arrow, handed over as it is: `_table`).
IMAGES_DTYPES = {"image_id": "int64", "path": "object", "bytes": "int64", "width": "Int32",
                 "height": "Int32", "format": "object", "sha256": "object", "hash": "object",
                 "error": "object", "cluster_id": "Int64", "raw_path": "object"}
PAIRS_DTYPES = {"path_a": "object", "path_b": "object", "image_id_a": "int64", "image_id_b": "int64",
                "hash_distance": "int16", "orb_matches": "Int32", "orb_inliers": "Int32",
                "orb_score": "Float32", "cosine": "Float32", "stage": "category", "is_duplicate": "bool",
                "reason": "object", "rule": "category", "ssim": "Float32", "hist_corr": "Float32"}
STAGES = ["exact", "screen", "verify", "confirm"]
# images.parquet is converted and written this many rows at a time (a group of 65,536 was +32 MB
# on the driver, the write stage's peak at 100k files, RSS probe)
IMAGE_ROWS_PER_GROUP = 16_384


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def provenance(manifest: dict) -> dict[bytes, bytes]:
    """The run's identity for a Parquet file's schema metadata (keys `dedupe.*`, JSON values)."""
    return {f"dedupe.{k}".encode(): json.dumps(v, default=str).encode() for k, v in {
        "contract_version": CONTRACT_VERSION, "run_id": manifest.get("run_id"),
        "tool_version": manifest.get("version"), "started": manifest.get("started"),
        "root": manifest.get("root"), "config": manifest.get("config"),
        "versions": manifest.get("versions"), "weights": manifest.get("weights"),
    }.items()}


def write_table(frame: pd.DataFrame, schema: pa.Schema, path: Path, dtypes: dict | None = None,
                metadata: dict[bytes, bytes] | None = None) -> None:
    _atomic(path, lambda tmp: pq.write_table(_table(frame, schema, dtypes, metadata), tmp, compression="zstd"))
    _release_arrow_memory()


def _release_arrow_memory() -> None:
    """Arrow's allocator keeps what a written table freed; give it back, so one file's conversion
    does not sit under the next one's in the driver's peak."""
    pa.default_memory_pool().release_unused()


def write_table_parts(parts: Iterable[pd.DataFrame], schema: pa.Schema, path: Path, dtypes: dict | None = None,
                      metadata: dict[bytes, bytes] | None = None) -> int:
    """`write_table` of a frame that comes in parts, in row order (at least one, possibly empty):
    each part becomes a row group, so only one part is in memory. The parts must agree on their
    categories (the file's pandas metadata is the first part's). Returns the rows written."""
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        writer = None
        try:
            for frame in parts:
                table = _table(frame, schema, dtypes, metadata)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
                rows += len(frame)
                del table, frame
                _release_arrow_memory()
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"{path.name}: no part to write")
    _atomic(path, write)
    return rows


def _arrow_text(dtype) -> bool:
    """Text kept in Arrow by pandas (pandas 3's `str`, `string[pyarrow]`, `ArrowDtype(string)`)."""
    if isinstance(dtype, pd.StringDtype):
        return dtype.storage == "pyarrow"
    return isinstance(dtype, pd.ArrowDtype) and (pa.types.is_string(dtype.pyarrow_dtype)
                                                 or pa.types.is_large_string(dtype.pyarrow_dtype))


def _table(frame: pd.DataFrame, schema: pa.Schema, dtypes: dict | None = None,
           metadata: dict[bytes, bytes] | None = None) -> pa.Table:
    frame = frame[schema.names]
    # Arrow text is handed to Arrow as it is: the cast to the contract's `object` made a Python
    # string per row and text column (~20 MB a part of pairs.parquet, at the driver's peak); the
    # file still records the contract's dtypes (its pandas metadata, made from no rows, below)
    as_is = [c for c, d in (dtypes or {}).items() if d == "object" and c in frame and _arrow_text(frame[c].dtype)]
    if dtypes:
        frame = frame.astype({c: d for c, d in dtypes.items() if c not in as_is})
    for field in schema:  # a file name quoted in a message may hold undecodable bytes (paths.py)
        if pa.types.is_string(field.type) or (pa.types.is_dictionary(field.type)
                                              and pa.types.is_string(field.type.value_type)):
            col = frame[field.name]
            if col.dtype == object and not all(paths.is_utf8(v) for v in col if isinstance(v, str)):
                frame = frame.assign(**{field.name: [paths.clean_text(v) if isinstance(v, str) else v
                                                     for v in col]})
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    if as_is:
        table = table.combine_chunks()  # (a concatenated frame's chunks: the bytes a cast's table writes)
        empty = frame.iloc[:0].astype(dict.fromkeys(as_is, object))
        pandas_meta = pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata[b"pandas"]
        table = table.replace_schema_metadata({**table.schema.metadata, b"pandas": pandas_meta})
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return table


def write_json(data: dict, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8"))


def utc_mtimes(images: pd.DataFrame) -> pd.Series:
    """images.parquet's mtime: UTC, floored to the microsecond; from the integer nanoseconds where
    the frame has them (the seconds, a float, put some files 1 us off `os.stat`) and they are the
    file's own (`scan.mtime_ns_exact`), else from the seconds. Never through nanosecond
    timestamps, which end in 2262 (a file dated later failed the run)."""
    from pipeline import scan
    us = np.floor(images["mtime"].to_numpy(np.float64) * 1e6).astype(np.int64)
    if "mtime_ns" in images:
        ns = images["mtime_ns"].to_numpy(np.int64)
        exact = scan.mtime_ns_exact(ns)
        us[exact] = ns[exact] // 1000
    return pd.Series(pd.DatetimeIndex(us.view("datetime64[us]")).tz_localize("UTC"), index=images.index)


def images_frame(images: pd.DataFrame) -> pd.DataFrame:
    out = images.copy(deep=False)  # whole columns are replaced below, never written into
    out["mtime"] = utc_mtimes(out)
    # -1 (singleton) -> null without a float64 detour: ids are 63-bit and float64 keeps 53
    ids = out["cluster_id"].to_numpy(dtype=np.int64)
    out["cluster_id"] = pd.arrays.IntegerArray(ids, ids < 0)
    return out


def pairs_frame(pairs: pd.DataFrame, rules: list[str] | None = None) -> pd.DataFrame:
    """`rules`: the rule codes of the whole file, as the categories of every part's `rule`
    (the categories a single write gives: the codes present, sorted)."""
    out = pairs.copy(deep=False)  # (as above)
    out["stage"] = pd.Categorical(out["stage"], categories=STAGES)
    if rules is not None:
        out["rule"] = pd.Categorical(out["rule"], categories=sorted(rules))
    return out


def write_outputs(out_dir: Path, images: pd.DataFrame, pairs: pd.DataFrame | Iterable[pd.DataFrame], manifest: dict,
                  report: bool = True, previous_report=None,
                  stored_features: pd.DataFrame | None = None, client=None,
                  report_pairs: pd.DataFrame | None = None, rejected_total: int | None = None,
                  rules: list[str] | None = None, cluster_pairs: pd.Series | None = None) -> None:
    """images/pairs: the run's rows (with abs paths for the report); writes the files into
    `out_dir` (a new generation folder, see pipeline/outdir.py), `run.json` last, listing the
    sha256 of its siblings so a reader can check it holds one run's set. `previous_report`: the
    last generation's report (a folder, or storage.LastReport on a store), whose thumbnails and
    drawings of unchanged files are reused.
    `stored_features`: the verify tier's feature rows, for the report's thumbnails and drawings;
    `client`: a Dask client whose workers make them (report.write_report).

    `pairs` may come in parts (an iterable of frames in row order, written one at a time; `rules`:
    every rule code in them); then `report_pairs` holds the pairs the report shows
    (report.shown_pairs), `rejected_total` how many were rejected in all and `cluster_pairs` how
    many duplicate pairs each cluster has (report.duplicate_pairs_per_cluster)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = provenance(manifest)
    # a row group at a time: the conversion to Arrow holds a copy of the rows converted (the
    # cast of its text to Python strings was ~40 MB at once for 100k files, before `_table` kept
    # Arrow text as it is)
    write_table_parts((images_frame(images.iloc[start:start + IMAGE_ROWS_PER_GROUP])
                       for start in range(0, max(len(images), 1), IMAGE_ROWS_PER_GROUP)),
                      IMAGES_SCHEMA, out_dir / "images.parquet", IMAGES_DTYPES, meta)
    if isinstance(pairs, pd.DataFrame):
        write_table(pairs_frame(pairs), PAIRS_SCHEMA, out_dir / "pairs.parquet", PAIRS_DTYPES, meta)
        report_pairs = pairs
    else:
        write_table_parts((pairs_frame(part, rules) for part in pairs), PAIRS_SCHEMA, out_dir / "pairs.parquet",
                          PAIRS_DTYPES, meta)
    if report:
        from pipeline.report import write_report  # OUT/report/ + OUT/report.html (pixels, jinja2)
        write_report(out_dir, images, report_pairs, manifest, reuse_from=previous_report,
                     stored_features=stored_features, client=client, rejected_total=rejected_total,
                     cluster_pairs=cluster_pairs)
    manifest["files"] = {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    write_json(manifest, out_dir / "run.json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
