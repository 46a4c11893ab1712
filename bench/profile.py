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
    ("matching", lambda f, n: n in ("_match_kernel", "_good_matches", "_good_matches_reference")),
    ("RANSAC", lambda f, n: n == "_ransac"),
    ("pixel check", lambda f, n: n in ("pixel_features", "pixel_check", "ssim_map", "flat_share")),
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
    features_partition and pairs/s of verify_partition on its generated photo benchmark."""
    import cv2

    from bench import verify as bverify
    from pipeline import verify
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="bench-profile-verify-") as tmp:
        images, pairs = bverify.build(n_photos, Path(tmp) / "img")
        keys = pairs[["idx_a"]].rename(columns={"idx_a": "idx"}).assign(transform=0)
        keys = pd.concat([keys, pairs[["idx_b", "transform"]].rename(columns={"idx_b": "idx"})]).drop_duplicates()
        rows = pd.DataFrame({"key": verify.feature_key(keys["idx"], keys["transform"]),
                             "abs_path": images.loc[keys["idx"], "abs_path"].to_numpy(),
                             "transform": keys["transform"].astype("int8").to_numpy()})
        t = time.perf_counter()
        summ = verify.features_partition(rows, cfg, tmp, 0)
        f_rate = len(rows) / (time.perf_counter() - t)
        part = dict(zip(summ["key"], summ["part_path"]))
        job = pd.DataFrame({"key_a": verify.feature_key(pairs["idx_a"], 0),
                            "key_b": verify.feature_key(pairs["idx_b"], pairs["transform"])})
        job["path_a_part"], job["path_b_part"] = job["key_a"].map(part), job["key_b"].map(part)
        verify.verify_partition(job.iloc[:2], cfg)  # compiled kernel loaded before timing
        t = time.perf_counter()
        verify.verify_partition(job, cfg)
        p_rate = len(job) / (time.perf_counter() - t)
    return {"features": f_rate, "pairs": p_rate, "photos": n_photos}


def verify_rates_table(by_prefix: dict, counts: dict, rates: dict | None) -> str:
    """Per-core rates of the verify tier inside the run (task compute seconds) vs bench.verify's."""
    feats, pairs = by_prefix.get("features_task"), by_prefix.get("verify_partition")
    if not feats or not pairs:
        return ""
    n_feat = counts.get("verify_features", 0)
    rows = []
    if n_feat:
        rows.append(["features/s per core", f"{n_feat / feats['compute']:.0f}",
                     f"{rates['features']:.0f}" if rates else "", f"{n_feat / feats['compute'] / rates['features']:.2f}"
                     if rates else ""])
    n_pairs = counts.get("verified_pairs", 0)
    rows.append(["pairs/s per core", f"{n_pairs / pairs['compute']:,.0f}", f"{rates['pairs']:,.0f}" if rates else "",
                 f"{n_pairs / pairs['compute'] / rates['pairs']:.2f}" if rates else ""])
    return ("\nVerify tier: per-core rates inside the run (features or pairs / task compute seconds) vs "
            f"bench.verify's in-process figures measured right after it ({rates['photos'] if rates else 0} "
            "photos and their edited copies, one thread):\n\n"
            + table(["rate", "in the run", "bench.verify", "run / bench"], rows))


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
    with LocalCluster(n_workers=n_workers, threads_per_worker=cfg.dask.threads_per_worker, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        cluster_start = time.perf_counter() - t
        from distributed import get_task_stream
        t0 = time.time()
        # the scheduler records the task stream only while someone listens: from before the run
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as out, \
                get_task_stream(client=client) as recorded:
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
            + verify_rates_table(by_prefix, manifest["counts"], rates)
            + "\nCounts: " + ", ".join(f"{k} {v:,}" for k, v in manifest["counts"].items()) + "\n")
    print(body)
    kwargs = {"path": args.out} if args.out else {}
    update_section("profile", "profile of one run on the 10k benchmark (python -m bench.profile)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
