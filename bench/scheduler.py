"""Where the in-process run stops paying: dask.scheduler "auto"'s threshold (dask.auto_max_files).

    python -m bench.scheduler [--sizes 805,2000,4000] [--rounds 2] [--preset default]

For each folder size, the CLI with the default preset runs in-process (`--scheduler sync`) and on
a local cluster (`--scheduler local`), alternating within each round, fresh output, no catalog.
Folders: the first N files (sorted) of the generated 10k benchmark (bench/end_to_end.py), linked
into a temporary folder; 805 = the shared real photos themselves. Reports medians and the median
per-round ratio local / sync: below 1 the cluster pays for its start-up.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import end_to_end, transforms
from bench.report import median, stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent


def run_cli(data: Path, out: Path, scheduler: str, preset: str) -> float:
    cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", str(out), "--preset", preset,
           "--scheduler", scheduler, "--no-catalog", "--quiet", "--log-level", "WARNING",
           "--set", "dask.dashboard_address="]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="805,2000,4000")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--out", default=None, help="benchmarks markdown file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    big = end_to_end.generate(Path(args.bench_dir), 12) / "images"
    files = sorted(big.iterdir())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            if size == 805:
                data = transforms.DEFAULT_PHOTOS
            else:
                data = Path(tmp) / f"n{size}"
                data.mkdir()
                for f in files[:size]:
                    os.symlink(f, data / f.name)
            times = {"sync": [], "local": []}
            for r in range(args.rounds):
                for sched in (("sync", "local") if r % 2 == 0 else ("local", "sync")):
                    times[sched].append(run_cli(data, Path(tmp) / "out", sched, args.preset))
                    print(f"{size} files, round {r + 1}, {sched}: {times[sched][-1]:.1f} s", flush=True)
            ratio = median([lo / sy for lo, sy in zip(times["local"], times["sync"])])
            rows.append([f"{size:,}", f"{median(times['sync']):.1f}", f"{median(times['local']):.1f}",
                         f"{ratio:.2f}x"])
    body = (stamp() + f"\nPreset `{args.preset}`, no catalog, {args.rounds} rounds alternating in-process "
            "(`--scheduler sync`) and the local cluster (`--scheduler local`, one worker per core); "
            "folders = the first N files of the generated 10k benchmark (805 = the shared photos). "
            "`dask.scheduler: auto` runs in-process up to `dask.auto_max_files` files to screen: set it "
            "where the ratio crosses 1.\n\n"
            + table(["files", "in-process s", "local cluster s", "local / in-process (median)"], rows))
    print(body)
    kwargs = {"path": args.out} if args.out else {}
    update_section("scheduler", "in-process or local cluster (python -m bench.scheduler)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
