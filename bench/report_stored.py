"""The report of a real run from the verify tier's feature rows vs decoding the files again.

    python -m bench.report_stored [--run OUT] [--repeats 3] [--out docs/benchmarks.md]

OUT: a finished default run with its catalog (`dedupe DATA --out OUT`); without --run, a default
run is made first on bench/end_to_end.py's generated folder (10,465 images with --per-source 12,
generated when missing). `pipeline.report.write_report` writes the same report
twice per repeat, alternating: with `stored_features` (what a run passes: thumbnails taken from the
feature rows, drawings matched from their keypoints) and without (every thumbnail decoded with
`make_thumb`, every drawing's ORB recomputed with `verify.pair_evidence`: what a run did before,
and what `dedupe report` still does). Nothing is reused from an earlier report. Both reports'
data.js must be equal. Also the per-image cost the feature task now pays for the thumbnail
(`thumb_from_decoded` on the picture it already decoded) against `make_thumb`. Writes the
"report_stored" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import transforms
from bench.end_to_end import generate
from bench.report import median, stamp, table, update_section
from pipeline import catalog, report, verify
from pipeline.config import config_from_dict
from pipeline.decode import load_image
from pipeline.results import load_run
from pipeline.run import stored_features


def features_of(out: Path, images: pd.DataFrame, cfg) -> pd.DataFrame:
    """What the run passed to the report: its catalog's ORB feature rows, by sha256."""
    cat = catalog.Catalog.load(out / "catalog")
    fp = catalog.fingerprints(cfg)["orb_features"]
    sha = images["sha256"].dropna().unique()
    part_of, _ = cat.feature_parts("orb", fp, np.concatenate([sha, sha]),
                                   np.concatenate([np.zeros(len(sha), np.int64), np.full(len(sha), 4)]))
    cids = catalog.content_ids(sha)
    return stored_features(part_of, pd.Series(sha, index=cids))


def data_of(report_dir: Path) -> dict:
    text = (report_dir / "data.js").read_text(encoding="utf-8")
    data = json.loads(text[text.index("{"):text.rstrip().rstrip(";").rindex("}") + 1])
    data["meta"].pop("generated", None)
    return data


def per_image_cost(images: pd.DataFrame, cfg, n: int = 200) -> tuple[float, float, int]:
    """Median ms per image (of `n` spread over the run): the feature task's thumbnail from its
    decode, and make_thumb; and how many images were timed."""
    rows = images[images["error"].isna()].iloc[:: max(1, len(images) // n)][:n]
    paths = [str(p) for p in rows["abs_path"]]
    bases = [(verify._load_bounded(p, cfg), load_image(p, min_side=cfg.report.thumb_size)[1]) for p in paths]
    t_stored, t_make = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            t = time.perf_counter()
            for base, full in bases:
                report.thumb_from_decoded(base, full, cfg.report.thumb_size)
            t_stored.append((time.perf_counter() - t) / len(bases) * 1e3)
            t = time.perf_counter()
            for p in paths:
                report.make_thumb(p, Path(tmp) / "t.jpg", cfg.report.thumb_size)
            t_make.append((time.perf_counter() - t) / len(paths) * 1e3)
    return median(t_stored), median(t_make), len(paths)


def feature_task_cost(images: pd.DataFrame, cfg, n: int = 200, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of `verify.features_partition` over `n` images with the report's thumbnail
    (report.thumb_size as configured) and without (a thumb_size no picture reaches: none made)."""
    import dataclasses
    rows = images[images["error"].isna()].iloc[:: max(1, len(images) // n)][:n]
    task = pd.DataFrame({"key": np.arange(len(rows), dtype=np.int64) * 8, "abs_path": rows["abs_path"].to_numpy(),
                         "transform": np.zeros(len(rows), np.int8), "width": rows["width"].to_numpy(),
                         "height": rows["height"].to_numpy()})
    without = dataclasses.replace(cfg, report=dataclasses.replace(cfg.report, thumb_size=1_000_000))
    times: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for c in (cfg, without):  # warm up (imports, OpenCV, numba) outside the timing
            verify.features_partition(task.iloc[:4], c, tmp, 99)
        for rep in range(repeats):
            for how in ("with", "without") if rep % 2 == 0 else ("without", "with"):
                t = time.perf_counter()
                verify.features_partition(task, cfg if how == "with" else without, tmp, rep)
                times[how].append(time.perf_counter() - t)
    return median(times["with"]), median(times["without"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="OUT of a finished default run (with its catalog); "
                    "default: make one on bench/end_to_end.py's generated folder")
    ap.add_argument("--per-source", type=int, default=12, help="without --run: transformed copies per photo")
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="benchmarks markdown file")
    args = ap.parse_args()
    if args.run is None:
        data = generate(Path(args.bench_dir), args.per_source) / "images"
        out = Path(args.bench_dir) / "report-stored-out"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out), "--quiet"],
                       check=True)
    else:
        out = Path(args.run)
    load_start = os.getloadavg()[0]
    run = load_run(out)
    cfg = config_from_dict(run.manifest["config"])
    images = run.images.copy()
    images["abs_path"] = [str(Path(run.manifest["root"]) / p) for p in images["path"]]
    stored = features_of(out, images, cfg)
    times: dict[str, list[float]] = {"stored": [], "decode": []}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        empty = Path(tmp) / "no-earlier-report"
        empty.mkdir()
        for rep in range(args.repeats):
            for how in ("decode", "stored") if rep % 2 else ("stored", "decode"):
                dest = Path(tmp) / how
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                t = time.perf_counter()
                report.write_report(dest, run.images, run.pairs, run.manifest, cfg=cfg, reuse_from=empty,
                                    stored_features=stored if how == "stored" else None)
                times[how].append(time.perf_counter() - t)
                print(f"{how}: {times[how][-1]:.1f} s", flush=True)
        same = data_of(Path(tmp) / "stored" / "report") == data_of(Path(tmp) / "decode" / "report")
        shown = len(data_of(Path(tmp) / "stored" / "report")["images"])
        drawn = len(list((Path(tmp) / "stored" / "report" / "pairs").iterdir()))
    ms_stored, ms_make, n_timed = per_image_cost(images, cfg)
    task_with, task_without = feature_task_cost(images, cfg)
    s, d = median(times["stored"]), median(times["decode"])
    body = stamp() + (
        f"\nRun: `{run.manifest['root']}` ({len(run.images):,} images; {shown:,} shown in the report, "
        f"{drawn} pairs drawn). `write_report` of that run, {args.repeats} times each way, alternating, no "
        "earlier report to reuse: with the verify tier's feature rows (`stored_features`, what a run passes) "
        "and decoding every file again (`make_thumb` + `verify.pair_evidence`: what a run did before, and what "
        "`dedupe report` does). data.js of the two: " + ("equal" if same else "DIFFERENT") + ".\n\n"
        + table(["report from", "write_report median (s)", "ratio to decoding"],
                [["feature rows (stored_features)", s, f"{s / d:.2f}x"], ["decoding again", d, "1.00x"]])
        + "\nThe thumbnail's cost moves to the feature task, which already has the picture decoded "
        f"(ms per image, median of 3 passes over {n_timed} images): "
        f"`thumb_from_decoded` {ms_stored:.2f} ms vs `make_thumb` {ms_make:.2f} ms "
        f"({ms_stored / ms_make:.2f}x). The feature task (decode, ORB, pixel-check data) over the same "
        f"{n_timed} images, alternating, median of 5: {task_with:.2f} s with the thumbnail, {task_without:.2f} s "
        f"without ({task_with / task_without:.2f}x). 1-min load average at the start / end: "
        f"{load_start:.1f} / {os.getloadavg()[0]:.1f} (2 cores).\n")
    update_section("report_stored", "Report from the verify tier's feature rows", body,
                   **({"path": args.out} if args.out else {}))
    print(body)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
