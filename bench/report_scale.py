"""Report generation at scale: a synthetic run of N images / K clusters fed to the report writer.

    python -m bench.report_scale [--images 100000] [--clusters 10000] [--out /tmp/dedupe-report-scale]

The images and pairs frames have the pipeline's columns; every image points at one of the real
photos in ../shared/data/photos (cycled), so thumbnails and pair drawings are real decodes and real
ORB. Measures the wall time and peak memory of `pipeline.report.write_report` (default report
settings), the size of what it writes, and, when Chromium is installed, the time the index page
takes to render its first page in headless Chromium (median of 5 loads). Writes the "report"
section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import report as bench_report
from bench.transforms import DEFAULT_PHOTOS
from pipeline.run import image_ids


def synthetic_run(n_images: int, n_clusters: int, photos: list[Path], seed: int = 0,
                  rejected: int = 50_000) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    paths = [f"folder{i // 1000:03d}/img{i:06d}.jpg" for i in range(n_images)]
    ids = image_ids(paths)
    sizes = rng.integers(2, 6, n_clusters)  # 2-5 members: ~35k images in 10k clusters
    members = rng.permutation(n_images)[:sizes.sum()]
    cluster_of = np.full(n_images, -1, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    src = [str(photos[i % len(photos)]) for i in range(n_images)]
    for s, k in zip(starts, sizes):
        group = np.sort(members[s:s + k])
        cluster_of[group] = ids[group[0]]
        for g in group[1:]:  # members look alike: copies of the first member's photo
            src[g] = src[group[0]]
    error = np.where(rng.random(n_images) < 0.005, "cannot decode: truncated file", None)
    error[cluster_of >= 0] = None
    images = pd.DataFrame({
        "image_id": ids, "path": paths, "abs_path": src,
        "bytes": rng.integers(20_000, 5_000_000, n_images), "mtime": 1.7e9 + rng.random(n_images) * 1e7,
        "width": pd.array(rng.integers(300, 4000, n_images), dtype="Int64"),
        "height": pd.array(rng.integers(300, 3000, n_images), dtype="Int64"),
        "format": "JPEG", "sha256": [f"{x:064x}" for x in rng.integers(0, 2**62, n_images)],
        "hash": "0" * 16, "error": error, "cluster_id": cluster_of,
    })
    rows = []
    for s, k in zip(starts, sizes):  # a star per cluster: the first member with each other one
        group = np.sort(members[s:s + k])
        for g in group[1:]:
            rows.append((group[0], g, True))
    a = rng.integers(0, n_images, rejected)
    b = rng.integers(0, n_images, rejected)
    keep = (a != b) & (cluster_of[a] != cluster_of[b]) | (cluster_of[a] < 0)
    rows += [(x, y, False) for x, y in zip(a[keep & (a != b)], b[keep & (a != b)])]
    ia = np.array([min(r[0], r[1]) for r in rows])
    ib = np.array([max(r[0], r[1]) for r in rows])
    dup = np.array([r[2] for r in rows])
    n = len(rows)
    reached = rng.random(n)
    cosine = np.where(reached < 0.2, rng.random(n), np.nan)
    inliers = rng.integers(0, 400, n)
    stage = np.where(~np.isnan(cosine), "confirm", "verify")
    pairs = pd.DataFrame({
        "path_a": np.array(paths)[ia], "path_b": np.array(paths)[ib], "image_id_a": ids[ia], "image_id_b": ids[ib],
        "hash_distance": rng.integers(0, 11, n).astype(np.int16),
        "orb_matches": pd.array(inliers + rng.integers(0, 50, n), dtype="Int32"),
        "orb_inliers": pd.array(inliers, dtype="Int32"), "orb_score": pd.array(rng.random(n), dtype="Float32"),
        "cosine": pd.array(cosine, dtype="Float32"), "stage": stage, "is_duplicate": dup,
        "reason": np.where(dup, "duplicate: orb: 120 inliers of 130 matches (>= accept_inliers 25)",
                           "orb: 3 inliers of 40 matches (geometry disagrees)"),
        "abs_path_a": np.array(src, dtype=object)[ia], "abs_path_b": np.array(src, dtype=object)[ib],
    })
    pairs["rule"] = np.where(dup, np.where(stage == "confirm", "confirm_cosine", "verify_orb_accept"),
                             np.where(stage == "confirm", "confirm_cosine_low", "verify_orb_reject"))
    counts = {"files": n_images, "errors": int(pd.notna(error).sum()), "duplicate_pairs": int(dup.sum()),
              "clusters": n_clusters, "images_in_clusters": int((cluster_of >= 0).sum())}
    manifest = {"root": "/synthetic", "finished": "synthetic", "counts": counts}
    return images, pairs.sort_values(["path_a", "path_b"]).reset_index(drop=True), manifest


def du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--out", default="/tmp/dedupe-report-scale")
    ap.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    ap.add_argument("--doc", default=str(bench_report.DEFAULT_PATH), help="benchmarks file ('' = do not write)")
    args = ap.parse_args(argv)
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        print(f"no photos in {args.photos}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, pairs, manifest = synthetic_run(args.images, args.clusters, photos)
    from pipeline.config import Config
    from pipeline.report import write_report
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    index = write_report(out, images, pairs, manifest, Config())
    seconds = time.perf_counter() - t
    load_avg = os.getloadavg()[0]  # the machine is shared: say how busy it was
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_thumbs, thumb_bytes = du(out / "report" / "thumbs")
    n_draw, draw_bytes = du(out / "report" / "pairs")
    data_bytes = (out / "report" / "data.js").stat().st_size
    print(f"write_report: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB (before {rss_before / 1024:.0f} MB); "
          f"{n_thumbs} thumbnails ({thumb_bytes / 2**20:.0f} MiB), {n_draw} drawings ({draw_bytes / 2**20:.1f} MiB), "
          f"data.js {data_bytes / 2**20:.1f} MiB")
    load = None
    from bench.browser import Browser, find_chromium, load_ms
    if find_chromium():
        with Browser() as b:
            times = [load_ms(b, index.resolve().as_uri()) for _ in range(5)]
            errors = b.errors()
        load = statistics.median(times)
        print(f"index.html first page rendered in headless Chromium: median {load:.0f} ms "
              f"({', '.join(f'{x:.0f}' for x in times)}){'; errors: ' + str(errors) if errors else ''}")
    if args.doc:
        n_pairs = len(pairs)
        rows = [
            ["images / clusters / images in clusters", f"{args.images:,} / {args.clusters:,} / "
                                                        f"{manifest['counts']['images_in_clusters']:,}"],
            ["pairs given (duplicate + rejected)", f"{n_pairs:,} ({int(pairs['is_duplicate'].sum()):,} + "
                                                   f"{int((~pairs['is_duplicate']).sum()):,})"],
            ["write_report wall time", f"{seconds:.1f} s (1-min load average at the end: {load_avg:.1f} "
                                       f"on {os.cpu_count()} cores)"],
            ["peak RSS of the process (frames included)", f"{peak_mb:,.0f} MB"],
            ["thumbnails", f"{n_thumbs:,} files, {thumb_bytes / 2**20:.0f} MiB"],
            ["pair drawings (ORB re-run)", f"{n_draw} files, {draw_bytes / 2**20:.1f} MiB"],
            ["data.js", f"{data_bytes / 2**20:.1f} MiB"],
            ["index.html to first page rendered, headless Chromium", "not measured (no chromium)" if load is None
             else f"{load:.0f} ms (median of 5 loads)"],
        ]
        body = (bench_report.stamp() + "\n" +
                "A synthetic run (`bench/report_scale.py`: the pipeline's columns, every image pointing at one "
                "of the real photos so thumbnails and drawings are real decodes and real ORB) fed to "
                "`pipeline.report.write_report` with the default report settings (200 + 50 pairs to draw, "
                "500 closest rejected pairs listed, 20 clusters per page). Thumbnails are made with one "
                "thread per core. The pairs' ORB numbers are made up, so ORB is run again for each pair to "
                "draw but few drawings are written: a drawing is made only when the matches found are the "
                "pair's numbers.\n\n" + bench_report.table(["what", "figure"], rows))
        bench_report.update_section("report", "Report generation (100k images, 10k clusters)", body, args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
