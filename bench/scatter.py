"""The driver's memory when `progress.map_tasks` sends its tasks to a cluster: all at once vs
`SCATTER_TASKS` at a time.

    python -m bench.scatter [--pairs 512000] [--rounds 3] [--out docs/benchmarks.md]

Verify-like tasks (the columns `verify.run_verify` sends: keys, part paths, errors; `pairs_per_task`
rows each, as many pairs as a 100k-file run has) mapped on a LocalCluster of 2 workers by a
function that returns a frame like the verify tier's results. Each measurement is its own driver
process (peak RSS after the cluster is up: VmHWM reset, then read), the two ways interleaved each
round; medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from bench.report import median, stamp, table, update_section
from bench.shard import reset_hwm, vm_hwm

REPO = Path(__file__).resolve().parent.parent


def result_like(task: pd.DataFrame) -> pd.DataFrame:
    """A frame shaped like `verify._verify_task`'s (numbers, texts as categories)."""
    n = len(task)
    i = np.arange(n)
    return pd.DataFrame({"orb_matches": pd.array(i % 50, dtype="Int32"), "orb_inliers": pd.array(i % 7, dtype="Int32"),
                         "orb_score": pd.array(np.ones(n), dtype="Float32"),
                         "orb_status": pd.Categorical(np.where(i % 3 == 0, "match", "no-match")),
                         "orb_reason": pd.Categorical([f"reason {k % 40}" for k in i]),
                         "ssim": pd.array([None] * n, dtype="Float32"),
                         "hist_corr": pd.array([None] * n, dtype="Float32")}, index=task.index)


def verify_like_tasks(pairs: int, per_task: int, seed: int = 0) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    parts = np.asarray([f"/work/orb-0123456789ab/part-{i:06d}.parquet" for i in range(max(pairs // 3500, 1))],
                       dtype=object)
    job = pd.DataFrame({"key_a": rng.integers(0, 1 << 40, pairs), "key_b": rng.integers(0, 1 << 40, pairs),
                        "transform": rng.integers(0, 8, pairs),
                        "path_a_part": parts[rng.integers(0, len(parts), pairs)],
                        "path_b_part": parts[rng.integers(0, len(parts), pairs)],
                        "key_b0": np.full(pairs, -1), "path_b0_part": np.full(pairs, None, object),
                        "error_a": np.full(pairs, None, object), "error_b": np.full(pairs, None, object)})
    return [job.iloc[i:i + per_task] for i in range(0, pairs, per_task)]


def measure(pairs: int, at_once: bool) -> dict:
    """In this process: the driver's peak RSS over one map_tasks call (bytes above the RSS before)."""
    import time

    from pipeline import cli, progress, run
    from pipeline.config import load_config
    cli.driver_arrow_pool()  # as the CLI's driver
    cfg = load_config(None, ["dask.dashboard_address="])
    tasks = verify_like_tasks(pairs, cfg.dask.pairs_per_task)
    if at_once:
        progress.SCATTER_TASKS = len(tasks)  # one scatter of every task (as before)
    me = psutil.Process()
    with run.dask_client(cfg, "local") as client:
        client.wait_for_workers(2)
        before = me.memory_info().rss
        reset_hwm()  # VmHWM := VmRSS
        start = time.perf_counter()
        results = progress.map_tasks(client, result_like, tasks)
        seconds = time.perf_counter() - start
        assert sum(len(r) for r in results) == pairs
        return {"peak": vm_hwm() - before, "kept": me.memory_info().rss - before, "seconds": seconds,
                "tasks": len(tasks), "batch": progress.SCATTER_TASKS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", choices=["at-once", "batched"], help=argparse.SUPPRESS)  # (a child's measurement)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.pairs, args.one == "at-once")))
        return 0
    found: dict[str, list[dict]] = {"at-once": [], "batched": []}
    for _ in range(args.rounds):
        for way in found:
            proc = subprocess.run([sys.executable, "-m", "bench.scatter", "--pairs", str(args.pairs), "--one", way],
                                  cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                raise SystemExit(f"bench.scatter --one {way} failed:\n{proc.stderr[-3000:]}")
            found[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(way, found[way][-1], flush=True)
    base = {k: median([r[k] for r in found["at-once"]]) for k in ("peak", "kept", "seconds")}
    rows = []
    for way, label in (("at-once", "every task in one scatter (before)"), ("batched", "SCATTER_TASKS at a time")):
        m = {k: median([r[k] for r in found[way]]) for k in ("peak", "kept", "seconds")}
        rows.append([label, found[way][0]["batch"], f"{m['peak'] / 2**20:.0f}", f"{m['kept'] / 2**20:.0f}",
                     f"{m['peak'] / base['peak']:.2f}", f"{m['seconds'] / base['seconds']:.2f}"])
    body = stamp() + (
        f"\n{args.pairs:,} verify-like pairs in {found['batched'][0]['tasks']} tasks (`dask.pairs_per_task`), "
        "mapped by `progress.map_tasks` on a LocalCluster of 2 workers; driver RSS above its level before "
        f"the call (MiB), medians of {args.rounds} rounds, each measurement a fresh process. Ratios against "
        "the one-scatter way, same run.\n\n")
    body += table(["tasks sent", "tasks per scatter", "driver peak MiB", "kept after MiB", "peak ratio",
                   "time ratio"], rows)
    kwargs = {"path": args.out} if args.out else {}
    update_section("scatter", "driver memory of sending tasks to a cluster", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
