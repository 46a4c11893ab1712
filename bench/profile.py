"""Where the seconds go: a profile of each stage of one run on the generated 10k benchmark.

    python -m bench.profile [--preset default] [--bench-dir /tmp/dedupe-bench] [--out docs/benchmarks.md]

The pipeline runs in this process (`pipeline.run.run`, as the CLI does) against a local cluster
started here the way the pipeline starts its own (one single-threaded worker process per core), so
the cluster's start-up is timed on its own. Three sources, one run:

- the run's stage timings (run.json): the driver's wall time per stage;
- Dask's task stream: per kind of task (its function), the number of tasks, the seconds the
  workers computed, and the stage's share of worker time spent computing (the rest: scheduling,
  serialisation between driver and workers, waiting for the driver or for the last task);
- Dask's statistical profiler (every worker samples its task thread every 10 ms): inside the
  tasks, the share of samples per activity (decode, resize, hash, ORB, matching, RANSAC, pixel
  check, model, Parquet/serialisation, other), by the innermost matching frame of each sample.
  Threads a task starts itself (confirm's decode-ahead thread, TensorFlow's pool) are not sampled:
  their time shows as the task thread waiting inside the model call.

The verify tier's per-core rates inside the run are set against bench.verify's, measured in this
process right after the run, both per second of task time and per CPU second (the workers' CPU
during each verify stage, `StageCPU`): on a shared machine the first also counts waiting for a core.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

from bench import end_to_end, transforms
from bench.report import stamp, table, update_section

# (category, test on (filename, function name)); the first match, innermost frame first, wins
CATEGORIES = [
    ("matching", lambda f, n: n in ("match_descriptors", "_good_matches", "_good_matches_reference")),
    ("RANSAC", lambda f, n: n == "_ransac"),
    ("pixel check", lambda f, n: n in ("pixel_features", "pixel_thumbnail", "soft_hsv_histogram", "pixel_check",
                                      "ssim_map", "flat_share")),
    ("ORB features", lambda f, n: n in ("_keypoint_features", "_spread")),
    ("model", lambda f, n: "tensorflow" in f or "/keras/" in f or n in ("raw", "embed_arrays", "_configure_tf")),
    ("resize", lambda f, n: n in ("resize", "reduce", "thumbnail", "_bounded", "resize_max_side", "to_input",
                                  "dihedral", "transpose")),
    ("decode", lambda f, n: "/PIL/" in f or n in ("load_image", "open_checked", "_draft_min_side")),
    ("file read + sha256", lambda f, n: n in ("file_digest", "read_bytes", "open_bytes")),
    ("hash + borders", lambda f, n: f.endswith(("pipeline/screen.py", "pipeline/borders.py")) or "imagehash" in f),
    ("Parquet / serialisation", lambda f, n: f.endswith("pipeline/store.py") or "pyarrow" in f),
]


def categorise(tree: dict) -> dict[str, int]:
    """Samples per category: each sample goes to the innermost categorised frame on its stack."""
    out: dict[str, int] = defaultdict(int)

    def walk(node, current):
        desc = node.get("description") or {}
        fname, name = str(desc.get("filename", "")), str(desc.get("name", ""))
        for cat, test in CATEGORIES:
            if test(fname, name):
                current = cat
                break
        children = node.get("children", {}).values()
        own = node.get("count", 0) - sum(c.get("count", 0) for c in children)
        if own > 0:
            out[current] += own
        for child in children:
            walk(child, current)

    walk(tree, "other (pandas, numpy glue, task set-up)")
    return dict(out)


def bench_verify_rates(n_photos: int, cfg) -> dict:
    """bench.verify's per-core figures, measured now in this process (one thread): features/s of
    features_partition and pairs/s of verify_partition on its generated photo benchmark, per
    second of wall time and per CPU second of this process (`*_cpu`)."""
    import cv2

    from bench import verify as bverify
    from pipeline import verify
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="bench-profile-verify-") as tmp:
        images, pairs = bverify.build(n_photos, Path(tmp) / "img")
        need_idx, need_t = verify.needed_features(pairs["idx_a"], pairs["idx_b"], pairs["transform"])
        keys = pd.DataFrame({"idx": need_idx, "transform": need_t}).drop_duplicates()
        rows = pd.DataFrame({"key": verify.feature_key(keys["idx"], keys["transform"]),
                             "abs_path": images.loc[keys["idx"], "abs_path"].to_numpy(),
                             "transform": keys["transform"].astype("int8").to_numpy()})
        t, c = time.perf_counter(), time.process_time()
        summ = verify.features_partition(rows, cfg, tmp, 0)
        f_rate, f_cpu = len(rows) / (time.perf_counter() - t), len(rows) / (time.process_time() - c)
        part = dict(zip(summ["key"], summ["part_path"]))
        job = verify.pair_job(pairs, part)
        verify.verify_partition(job.iloc[:2], cfg)  # compiled kernel loaded before timing
        t, c = time.perf_counter(), time.process_time()
        verify.verify_partition(job, cfg)
        p_rate, p_cpu = len(job) / (time.perf_counter() - t), len(job) / (time.process_time() - c)
    return {"features": f_rate, "pairs": p_rate, "features_cpu": f_cpu, "pairs_cpu": p_cpu, "photos": n_photos}


class StageCPU:
    """The workers' CPU seconds (all their threads) during each of the verify tier's two task
    maps: `verify.map_tasks` wrapped in the driver, worker `time.process_time` read before and
    after. Per CPU second the rates do not depend on how much of the cores other jobs took."""

    def __init__(self, client):
        self.client, self.cpu = client, {}

    def __enter__(self):
        from pipeline import verify
        self._orig = orig = verify.map_tasks

        def timed(client, fn, tasks, *args, **kwargs):
            before = sum(self.client.run(time.process_time).values())
            out = orig(client, fn, tasks, *args, **kwargs)
            name = getattr(fn, "__name__", str(fn))
            self.cpu[name] = self.cpu.get(name, 0.0) + sum(self.client.run(time.process_time).values()) - before
            return out

        verify.map_tasks = timed
        return self

    def __exit__(self, *exc):
        from pipeline import verify
        verify.map_tasks = self._orig


def verify_rates_table(by_prefix: dict, counts: dict, rates: dict | None, cpu: dict | None = None) -> str:
    """Per-core rates of the verify tier inside the run vs bench.verify's: per second of task
    compute (wall) and per CPU second of the workers (`cpu`: StageCPU.cpu)."""
    feats, pairs = by_prefix.get("features_task"), by_prefix.get("verify_partition")
    if not feats or not pairs:
        return ""
    cpu = cpu or {}
    rows = []

    def add(label, n, compute, bare, cpu_s, bare_cpu):
        rows.append([label, f"{n / compute:,.0f}", f"{bare:,.0f}" if rates else "",
                     f"{n / compute / bare:.2f}" if rates else "",
                     f"{n / cpu_s:,.0f}" if cpu_s else "", f"{bare_cpu:,.0f}" if rates else "",
                     f"{n / cpu_s / bare_cpu:.2f}" if rates and cpu_s else ""])

    n_feat = counts.get("verify_features", 0)
    if n_feat:
        add("features/s per core", n_feat, feats["compute"], rates and rates["features"],
            cpu.get("_features_task"), rates and rates["features_cpu"])
    add("pairs/s per core", counts.get("verified_pairs", 0), pairs["compute"], rates and rates["pairs"],
        cpu.get("verify_partition"), rates and rates["pairs_cpu"])
    return ("\nVerify tier: per-core rates inside the run vs bench.verify's in-process figures measured right "
            f"after it ({rates['photos'] if rates else 0} photos and their edited copies, one thread). *wall*: "
            "features or pairs / task compute seconds (Dask's task stream; a task waiting for a core other "
            "jobs hold counts); *CPU*: / the workers' CPU seconds during the stage (all their threads), "
            "against bench.verify's per CPU second of its process:\n\n"
            + table(["rate", "run, wall", "bench.verify, wall", "run / bench", "run, CPU", "bench.verify, CPU",
                     "run / bench (CPU)"], rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--per-source", type=int, default=12)
    ap.add_argument("--verify-photos", type=int, default=40,
                    help="photos for the same-run bench.verify per-core rates (0 = skip)")
    ap.add_argument("--out", default=None, help="benchmarks markdown file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from dask.utils import key_split
    from distributed import Client, LocalCluster

    from pipeline import run as prun
    from pipeline.config import load_config

    data = end_to_end.generate(Path(args.bench_dir), args.per_source) / "images"
    n_files = sum(1 for _ in data.iterdir())
    cfg = load_config(preset=args.preset, overrides=["catalog=none"])
    n_workers = cfg.dask.n_workers or os.cpu_count() or 1
    t = time.perf_counter()
    with prun.worker_environ(), \
            LocalCluster(n_workers=n_workers, threads_per_worker=cfg.dask.threads_per_worker, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        cluster_start = time.perf_counter() - t
        from distributed import get_task_stream
        t0 = time.time()
        # the scheduler records the task stream only while someone listens: from before the run
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as out, \
                get_task_stream(client=client) as recorded, StageCPU(client) as stage_cpu:
            t = time.perf_counter()
            manifest = prun.run(data, out, cfg, scheduler=cluster.scheduler_address, quiet=True)
            wall = time.perf_counter() - t
        stream = recorded.data
        by_prefix: dict[str, dict] = {}
        for task in stream:
            prefix = key_split(task["key"])  # "verify_partition-<uuid>" -> "verify_partition"
            rec = by_prefix.setdefault(prefix, {"tasks": 0, "compute": 0.0, "other": 0.0,
                                                "start": float("inf"), "stop": 0.0})
            rec["tasks"] += 1
            for ss in task["startstops"]:
                span = ss["stop"] - ss["start"]
                rec["compute" if ss["action"] == "compute" else "other"] += span
                rec["start"], rec["stop"] = min(rec["start"], ss["start"]), max(rec["stop"], ss["stop"])
        profiles = {p: categorise(client.profile(start=t0, key=p)) for p in by_prefix}

    rates = bench_verify_rates(args.verify_photos, cfg) if args.verify_photos else None
    timings = manifest["timings_s"]
    rows = []
    for prefix, rec in sorted(by_prefix.items(), key=lambda kv: kv[1]["start"]):
        span = rec["stop"] - rec["start"]
        busy = rec["compute"] / (n_workers * span) if span > 0 else 0.0
        rows.append([prefix, rec["tasks"], f"{rec['compute']:.1f}", f"{rec['compute'] / rec['tasks']:.2f}",
                     f"{span:.1f}", f"{100 * busy:.0f} %", f"{rec['other']:.1f}"])
    inside = []
    for prefix, cats in profiles.items():
        total = sum(cats.values()) or 1
        top = sorted(cats.items(), key=lambda kv: -kv[1])
        inside.append([prefix, ", ".join(f"{c} {100 * v / total:.0f} %" for c, v in top if v / total >= 0.01)])
    body = (stamp() + f"\n`{data}` ({n_files:,} files), preset `{args.preset}`, no catalog, "
            f"{n_workers} worker processes x {cfg.dask.threads_per_worker} thread. Local cluster start "
            f"(timed apart): {cluster_start:.1f} s. Run wall time (driver, cluster already up): {wall:.1f} s.\n\n"
            "Driver stage timings (run.json): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + "\n\n"
            "Tasks (Dask task stream): compute = seconds the workers spent inside the task function; span = "
            "first start to last stop of that kind of task; busy = compute / (workers x span), the rest of "
            "the span is scheduling, transfers and idle workers; transfer etc. = the task stream's other "
            "actions (fetching inputs, disk).\n\n"
            + table(["task", "tasks", "compute s", "s / task", "span s", "busy", "transfer etc. s"], rows)
            + "\nInside the tasks (Dask's sampling profiler, share of the task thread's samples):\n\n"
            + table(["task", "where the time goes"], inside)
            + verify_rates_table(by_prefix, manifest["counts"], rates, stage_cpu.cpu)
            + "\nCounts: " + ", ".join(f"{k} {v:,}" for k, v in manifest["counts"].items()) + "\n")
    print(body)
    kwargs = {"path": args.out} if args.out else {}
    update_section("profile", "profile of one run on the 10k benchmark (python -m bench.profile)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
