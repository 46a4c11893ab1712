"""End-to-end run on >= 10,000 images: wall time, peak memory and counts per stage.

The data: every real photo plus 12 seeded transformed copies of each (bench/transforms.py, the same
suite as `make eval`), generated once into --bench-dir. The pipeline runs through its real CLI on
the default local Dask cluster; peak memory is the largest sum of RSS over the CLI process and all
its children (the Dask workers), sampled every 0.2 s. Each tier level (screen only, + verify, the
full cascade) is run --repeats times and the medians are reported, so the cost of each tier reads as
a ratio against the screen-only run measured alongside it.

    python -m bench.end_to_end [--repeats 2] [--per-source 12] [--bench-dir /tmp/dedupe-bench]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

from bench import transforms
from bench.report import median, stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent


def render_job(job) -> str:
    """(source, transform, seed, group, file tag, out dir) -> the written file, relative to out dir."""
    src, name, seed, group, tag, out_dir = job
    data, ext, _ = transforms.render(Path(src), name, seed, group)
    rel = f"images/{tag}_{name}{ext}"
    (Path(out_dir) / rel).write_bytes(data)
    return rel


def generate(bench_dir: Path, per_source: int, seed: int = 0) -> Path:
    photos = sorted(p for p in transforms.DEFAULT_PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = bench_dir / f"e2e-v{transforms.SUITE_VERSION}-seed{seed}-n{len(photos)}-k{per_source}"
    done = out / "labels.csv"
    if done.exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    src, chosen, _ = transforms.plan(photos, seed, len(photos), 0, per_source=(per_source, per_source))
    jobs, rows = [], []
    for gi, (path, names) in enumerate(zip(src, chosen)):
        group = f"g{gi:04d}"
        rel = f"images/{group}_original{path.suffix.lower()}"
        (out / rel).write_bytes(path.read_bytes())
        rows.append([rel, group, "original"])
        jobs += [(str(path), name, seed, group, group, str(out)) for name in names]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        for job, rel in zip(jobs, pool.map(render_job, jobs, chunksize=32)):
            rows.append([rel, job[3], job[1]])
    with (out / "labels.tmp").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "group_id", "transform"], *rows])
    os.replace(out / "labels.tmp", done)
    return out


def run_once(data: Path, tiers: str, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="dedupe-e2e-") as out:
        cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", out, "--tiers", tiers, "--quiet",
               "--log-level", "WARNING", *[a for o in overrides for a in ("--set", o)]]
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO)
        peak = driver_peak = 0
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                driver = parent.memory_info().rss
                rss = driver + sum(c.memory_info().rss for c in parent.children(recursive=True))
                peak, driver_peak = max(peak, rss), max(driver_peak, driver)
            except psutil.Error:
                pass
            time.sleep(0.2)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"pipeline failed ({proc.returncode}): {' '.join(cmd)}")
        manifest = json.loads((Path(out) / "run.json").read_text())
    return {"wall": wall, "peak_gb": peak / 1e9, "driver_peak_gb": driver_peak / 1e9, "counts": manifest["counts"], "timings": manifest["timings_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-source", type=int, default=12, help="transformed copies per photo")
    parser.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    parser.add_argument("--tiers", default="screen,verify,confirm")
    parser.add_argument("--out", default=None, help="benchmarks markdown file")
    args = parser.parse_args()
    if not transforms.DEFAULT_PHOTOS.is_dir():
        raise SystemExit(f"{transforms.DEFAULT_PHOTOS} missing: set SHARED to the shared folder")
    data = generate(Path(args.bench_dir), args.per_source)
    n_images = sum(1 for _ in (data / "images").iterdir())
    results = {}
    for tiers in args.tiers.split(","):
        runs = [run_once(data, tiers) for _ in range(args.repeats)]
        results[tiers] = runs
        print(tiers, [round(r["wall"], 1) for r in runs], flush=True)
    base = median([r["wall"] for r in results[args.tiers.split(",")[0]]])
    rows = []
    for tiers, runs in results.items():
        wall = median([r["wall"] for r in runs])
        stages = {k: median([r["timings"].get(k, 0.0) for r in runs]) for k in runs[0]["timings"]}
        rows.append([tiers, f"{wall:.1f}", f"{wall / base:.2f}x", f"{max(r['peak_gb'] for r in runs):.2f}",
                     ", ".join(f"{k} {v:.1f}" for k, v in stages.items())])
    counts = results[args.tiers.split(",")[-1]][0]["counts"]
    body = stamp() + (
        f"\n{n_images:,} images: the {n_images // (args.per_source + 1)} real photos plus {args.per_source} seeded "
        "transformed copies of each (bench/transforms.py). The CLI on the default local cluster (one worker "
        f"per core), median of {args.repeats} runs per tier level; peak memory = largest summed RSS of the CLI "
        "and its Dask workers. Goal: the full cascade in < 90 s on this 2-core machine.\n\n")
    body += table(["last tier", "wall s (median)", "vs screen only", "peak GB", "stage seconds (median)"], rows)
    body += "\nCounts per stage (full cascade): " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + "\n"
    kwargs = {"path": args.out} if args.out else {}
    update_section("end_to_end", "end-to-end run (>= 10,000 images)", body, **kwargs)


if __name__ == "__main__":
    main()
