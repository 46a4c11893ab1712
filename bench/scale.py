"""Candidate counts and screen cost at 100k+ images, for each screen option.

The data: every real photo plus `--rounds` x 31 seeded transformed copies (bench/transforms.py; each
round draws new random parameters for the random transforms, while the deterministic ones repeat
byte for byte, so the folder also holds exact copies, as real folders do). Generated once into
--bench-dir. Each option runs through the real CLI with `--tiers screen` (scan, screen, and for
the high-recall mode the embeddings + kNN), and optionally the full cascade for the default mode:
wall time, peak memory (summed RSS of the CLI and its Dask workers) and candidates per image.

    python -m bench.scale [--rounds 4] [--full] [--options full,high-recall-full] [--bench-dir /tmp/dedupe-bench]

`--options` picks rows by name (default: default, plain, high-recall, plus full with --full):
default, plain, high-recall (screen only), full, high-recall-full (the whole cascade).
"""
from __future__ import annotations

import argparse
import csv
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import transforms
from bench.end_to_end import render_job, run_once
from bench.report import stamp, table, update_section


def generate(bench_dir: Path, rounds: int, seed: int = 0) -> Path:
    photos = sorted(p for p in transforms.DEFAULT_PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    names = [t.name for t in transforms.TRANSFORMS]
    out = bench_dir / f"scale-v{transforms.SUITE_VERSION}-seed{seed}-n{len(photos)}-r{rounds}"
    if (out / "labels.csv").exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for gi, path in enumerate(photos):
        group = f"g{gi:04d}"
        rel = f"images/{group}_original{path.suffix.lower()}"
        (out / rel).write_bytes(path.read_bytes())
        rows.append([rel, group, "original"])
        for r in range(rounds):
            jobs += [(str(path), name, seed, f"{group}-r{r}", f"{group}_r{r}", str(out)) for name in names]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        for job, rel in zip(jobs, pool.map(render_job, jobs, chunksize=64)):
            rows.append([rel, job[3].split("-")[0], job[1]])
    with (out / "labels.tmp").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "group_id", "transform"], *rows])
    os.replace(out / "labels.tmp", out / "labels.csv")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the 31 transforms per photo")
    parser.add_argument("--full", action="store_true", help="also the full cascade in the default mode")
    parser.add_argument("--options", default=None,
                        help="comma-separated rows: default, plain, high-recall, full, high-recall-full")
    parser.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    parser.add_argument("--out", default=None, help="benchmarks markdown file")
    args = parser.parse_args()
    known = {"default": ("hash (default)", "screen", []),
             "plain": ("hash, no dihedral/trim variants", "screen", ["screen.dihedral=false", "screen.trim_borders=false"]),
             "high-recall": ("hash+embedding (high-recall)", "screen", ["screen.mode=hash+embedding"]),
             "full": ("hash (default), full cascade", "confirm", []),
             "high-recall-full": ("hash+embedding (high-recall), full cascade", "confirm", ["screen.mode=hash+embedding"])}
    names = [o.strip() for o in args.options.split(",") if o.strip()] if args.options else \
        ["default", "plain", "high-recall"] + (["full"] if args.full else [])
    unknown = [o for o in names if o not in known]
    if unknown:
        raise SystemExit(f"unknown --options {unknown}: choose from {', '.join(known)}")
    options = [known[o] for o in names]
    data = generate(Path(args.bench_dir), args.rounds)
    n = sum(1 for _ in (data / "images").iterdir())
    rows = []
    kwargs = {"path": args.out} if args.out else {}
    for label, tiers, sets in options:
        r = run_once(data, tiers, sets)
        c, t = r["counts"], r["timings"]
        rows.append([label, tiers, f"{r['wall']:.0f}", f"{r['peak_gb']:.2f}", f"{r['driver_peak_gb']:.2f}",
                     f"{c['near_candidates'] / n:.2f}",
                     f"{c.get('embedding_only_candidates', 0) / n:.2f}",
                     ", ".join(f"{k} {v:.0f}" for k, v in t.items())])
        print(rows[-1], flush=True)
        body = stamp() + (
            f"\n{n:,} images: the real photos and {args.rounds} rounds of the 31 transforms of each "
            "(random transforms drawn anew each round; deterministic ones repeat as byte-identical copies). "
            "One run per option (a long benchmark); candidates per image = near candidate pairs / images. "
            "The default screen does the same work in the first, third and fourth rows: their scan+screen "
            "seconds show the run-to-run noise (the first run also fills the page cache).\n\n")
        body += table(["option", "tiers", "wall s", "peak GB (all processes)", "driver peak GB", "candidates / image",
                       "of which from embeddings / image", "stage seconds"], rows)
        update_section("scale", "scale: candidates and screen cost at 100k+ images", body, **kwargs)  # after each run


if __name__ == "__main__":
    main()
