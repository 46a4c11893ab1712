"""Stage 7, write: the output contract as Parquet, the run manifest and the HTML report.

Every file is written to a temporary name in the output folder and renamed into place, so a
crashed run never leaves a half-written file where the last good one was.
"""
from __future__ import annotations

import base64
import html
import io
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
    ("ssim", pa.float32()), ("hist_corr", pa.float32()),  # pixel check (verify.pixel_check)
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
    """images/pairs: the run's frames (with abs paths for the report); writes the four files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(images_frame(images), IMAGES_SCHEMA, out_dir / "images.parquet")
    write_table(pairs, PAIRS_SCHEMA, out_dir / "pairs.parquet")
    if report:
        write_report(out_dir / "report.html", images, pairs, manifest)
    write_json(manifest, out_dir / "run.json")  # last: its presence marks a complete run
