"""Stage 7, write: the output contract as Parquet, the run manifest and the HTML report.

The files of one run are written into a fresh generation folder that pipeline/outdir.py then
publishes in one atomic step, so readers see the previous run's set or this one's, never a mix.

Contract version 2 (README "Output"): the v1 columns keep their names and meaning; v2 adds the
`rule` code to pairs, stores `stage`/`rule` as dictionary columns (pandas `category`), writes
nullable integers so pandas reads them back as `Int32`/`Int64` (never float64), and puts the run's
provenance (contract version, run id, config, versions) in each Parquet file's schema metadata.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import uuid
from pathlib import Path

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
])
# What `pd.read_parquet` gives back for each column (the pandas side of the contract); the frame
# is cast to these before writing so the file's pandas metadata records them.
IMAGES_DTYPES = {"image_id": "int64", "path": "object", "bytes": "int64", "width": "Int32",
                 "height": "Int32", "format": "object", "sha256": "object", "hash": "object",
                 "error": "object", "cluster_id": "Int64", "raw_path": "object"}
PAIRS_DTYPES = {"path_a": "object", "path_b": "object", "image_id_a": "int64", "image_id_b": "int64",
                "hash_distance": "int16", "orb_matches": "Int32", "orb_inliers": "Int32",
                "orb_score": "Float32", "cosine": "Float32", "stage": "category", "is_duplicate": "bool",
                "reason": "object", "rule": "category"}
STAGES = ["exact", "screen", "verify", "confirm"]


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
    frame = frame[schema.names]
    if dtypes:
        frame = frame.astype(dtypes)
    for field in schema:  # a file name quoted in a message may hold undecodable bytes (paths.py)
        if pa.types.is_string(field.type) or (pa.types.is_dictionary(field.type)
                                              and pa.types.is_string(field.type.value_type)):
            col = frame[field.name]
            if col.dtype == object and not all(paths.is_utf8(v) for v in col if isinstance(v, str)):
                frame = frame.assign(**{field.name: [paths.clean_text(v) if isinstance(v, str) else v
                                                     for v in col]})
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    _atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_json(data: dict, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8"))


def images_frame(images: pd.DataFrame) -> pd.DataFrame:
    out = images.copy()
    out["mtime"] = pd.to_datetime(out["mtime"], unit="s", utc=True).dt.floor("us")
    # -1 (singleton) -> null without a float64 detour: ids are 63-bit and float64 keeps 53
    ids = out["cluster_id"].to_numpy(dtype=np.int64)
    out["cluster_id"] = pd.arrays.IntegerArray(ids, ids < 0)
    return out


def pairs_frame(pairs: pd.DataFrame) -> pd.DataFrame:
    out = pairs.copy()
    out["stage"] = pd.Categorical(out["stage"], categories=STAGES)
    return out


def _thumb(abs_path: str, size: int = 120) -> str:
    """A small inline JPEG (data URI) for the report; empty when the file cannot be shown."""
    from pipeline.decode import DecodeError, load_image  # local: only the report needs pixels
    try:
        img, _, _ = load_image(abs_path, min_side=size)
    except (DecodeError, OSError):
        return ""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(path: Path, images: pd.DataFrame, pairs: pd.DataFrame, manifest: dict,
                 max_clusters: int = 60, max_members: int = 8, max_pairs: int = 40) -> None:
    """A self-contained HTML page: counts, the largest clusters, borderline rejections, errors."""
    esc = html.escape
    counts = manifest.get("counts", {})
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Duplicate report</title><style>",
             "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}",
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}",
             ".cl{border:1px solid #ccc;margin:1em 0;padding:.5em}.cl figure{display:inline-block;",
             "margin:4px;width:130px;font-size:11px;word-break:break-all}img{max-width:120px;max-height:120px}",
             "</style></head><body>", f"<h1>Duplicate report</h1><p>Root: <code>{esc(str(manifest.get('root')))}</code>"
             f" — run {esc(str(manifest.get('finished')))}</p>", "<h2>Counts</h2><table>"]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in counts.items()]
    parts.append("</table>")

    clustered = images[images["cluster_id"] >= 0]
    sizes = clustered.groupby("cluster_id").size().sort_values(ascending=False, kind="stable")
    parts.append(f"<h2>Clusters ({len(sizes)}; largest {min(len(sizes), max_clusters)} shown)</h2>")
    for cid, size in sizes.head(max_clusters).items():
        members = clustered[clustered["cluster_id"] == cid].head(max_members)
        parts.append(f"<div class='cl'><b>cluster {cid}</b> — {size} images<br>")
        for m in members.itertuples():
            parts.append(f"<figure><img src='{_thumb(m.abs_path)}' alt=''><figcaption>{esc(m.path)}"
                         "</figcaption></figure>")
        parts.append("</div>")

    near_miss = pairs[~pairs["is_duplicate"] & pairs["stage"].isin(["verify", "confirm"])]
    if "cosine" in near_miss and near_miss["cosine"].notna().any():
        near_miss = near_miss.sort_values("cosine", ascending=False, na_position="last")
    parts.append(f"<h2>Closest rejected pairs ({min(len(near_miss), max_pairs)} of {len(near_miss)})</h2><table>"
                 "<tr><th>a</th><th>b</th><th>distance</th><th>ORB inliers</th><th>cosine</th><th>reason</th></tr>")
    for p in near_miss.head(max_pairs).itertuples():
        parts.append(f"<tr><td><img src='{_thumb(p.abs_path_a, 90)}' alt=''><br>{esc(p.path_a)}</td>"
                     f"<td><img src='{_thumb(p.abs_path_b, 90)}' alt=''><br>{esc(p.path_b)}</td>"
                     f"<td>{p.hash_distance}</td><td>{p.orb_inliers}</td><td>{p.cosine}</td>"
                     f"<td>{esc(str(p.reason))}</td></tr>")
    parts.append("</table>")

    errors = images[images["error"].notna()]
    parts.append(f"<h2>Files with errors ({len(errors)})</h2><table><tr><th>path</th><th>error</th></tr>")
    parts += [f"<tr><td>{esc(r.path)}</td><td>{esc(str(r.error))}</td></tr>" for r in errors.head(500).itertuples()]
    parts.append("</table></body></html>")
    text = "\n".join(parts)
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_outputs(out_dir: Path, images: pd.DataFrame, pairs: pd.DataFrame, manifest: dict,
                  report: bool = True) -> None:
    """images/pairs: the run's frames (with abs paths for the report); writes the files into
    `out_dir` (a new generation folder, see pipeline/outdir.py), `run.json` last, listing the
    sha256 of its siblings so a reader can check it holds one run's set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = provenance(manifest)
    write_table(images_frame(images), IMAGES_SCHEMA, out_dir / "images.parquet", IMAGES_DTYPES, meta)
    write_table(pairs_frame(pairs), PAIRS_SCHEMA, out_dir / "pairs.parquet", PAIRS_DTYPES, meta)
    if report:
        write_report(out_dir / "report.html", images, pairs, manifest)
    manifest["files"] = {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    write_json(manifest, out_dir / "run.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
