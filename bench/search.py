"""Benchmark of the candidate search: `python -m bench.search` (section "candidate search").

1,000,000 random 64-bit hashes with 10,000 planted near pairs (distances 1..10; 1,000 of them
inside the first 100,000 images), threshold 10, K = 30: the whole `near_pairs` stage (index build
+ search) on a 2-worker Dask LocalCluster, multi-index hashing on 1M and, in the same run, brute
force and MIH on the first 100k for a same-run ratio. Each measurement is repeated (default 3x) and
the median reported. Peak memory is the largest sum of RSS over the driver and every worker
process, sampled every 20 ms.
"""
from __future__ import annotations

import argparse
import dataclasses
import threading
import time

import numpy as np
import psutil

from bench.report import median, stamp, table, update_section
from pipeline.candidates import build_index, near_pairs
from pipeline.config import ScreenConfig


def planted_data(n: int, n_pairs: int, n_small: int, small_pairs: int, max_d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    inside = rng.choice(n_small, size=2 * small_pairs, replace=False)
    outside = n_small + rng.choice(n - n_small, size=2 * (n_pairs - small_pairs), replace=False)
    pairs = np.concatenate([inside, outside]).reshape(-1, 2)
    dist = 1 + np.arange(len(pairs)) % max_d
    for (x, y), d in zip(pairs, dist):
        noise = np.uint64(0)
        for bit in rng.choice(64, size=int(d), replace=False):
            noise |= np.uint64(1) << np.uint64(int(bit))
        codes[y] = codes[x] ^ noise
    return codes[:, None, None], np.sort(pairs, axis=1), dist


class PeakRSS:
    """Largest sum of RSS over this process and its descendants (the Dask workers)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def run_once(codes, pairs, cfg: ScreenConfig, client):
    mask = np.ones(codes.shape[:2], bool)
    t0 = time.perf_counter()
    index = build_index(codes, mask, cfg)
    t1 = time.perf_counter()
    out = near_pairs(codes, mask, cfg, client=client, index=index)
    t2 = time.perf_counter()
    n = codes.shape[0]
    found = set((out.idx_a.to_numpy() * n + out.idx_b.to_numpy()).tolist())
    hit = np.array([a * n + b in found for a, b in pairs])
    return {"build": t1 - t0, "total": t2 - t0, "recall": float(hit.mean()) if hit.size else 1.0,
            "pairs": len(out), "per_image": 2 * len(out) / n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--n-small", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=int, default=10)
    ap.add_argument("--k", type=int, default=30)
    ap.add_argument("--out", default=None, help="benchmarks file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster

    codes, pairs, dist = planted_data(args.n, args.pairs, args.n_small, args.pairs // 10, args.threshold)
    small_pairs = pairs[pairs[:, 1] < args.n_small]
    cfg = dataclasses.replace(ScreenConfig(), max_distance=args.threshold, max_candidates=args.k,
                              dihedral=False, trim_borders=False, backend="mih")
    brute_cfg = dataclasses.replace(cfg, backend="brute")
    rows = {"mih_big": [], "mih_small": [], "brute_small": []}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # warm-up: numba kernels loaded/compiled in the driver and in every worker
        warm = codes[:5000]
        near_pairs(warm, np.ones(warm.shape[:2], bool), cfg, client=client, block_rows=1000)
        near_pairs(warm, np.ones(warm.shape[:2], bool), brute_cfg, client=client, block_rows=1000)
        with PeakRSS() as mem:
            idle = mem.peak
            for _ in range(args.repeat):
                rows["mih_big"].append(run_once(codes, pairs, cfg, client))
                print("mih", args.n, rows["mih_big"][-1], flush=True)
        big_peak = mem.peak
        for _ in range(args.repeat):
            small = codes[:args.n_small]
            rows["mih_small"].append(run_once(small, small_pairs, cfg, client))
            rows["brute_small"].append(run_once(small, small_pairs, brute_cfg, client))
            print("small", rows["mih_small"][-1], rows["brute_small"][-1], flush=True)

    def med(name, key):
        return median([r[key] for r in rows[name]])

    ratio = med("brute_small", "total") / med("mih_small", "total")
    extrapolated = med("brute_small", "total") * (args.n / args.n_small) ** 2
    body = stamp() + (
        f"\n{args.n:,} random 64-bit hashes with {args.pairs:,} planted near pairs (distances 1..{args.threshold}"
        f", {len(small_pairs):,} of them inside the first {args.n_small:,}), threshold {args.threshold}, "
        f"K = {args.k}, plain hashes only (no variants). Whole `near_pairs` stage (index build in the "
        f"driver + search in blocks on a {args.workers}-worker Dask LocalCluster, one thread each), "
        f"median of {args.repeat} runs.\n\n")
    body += table(
        ["backend", "images", "build s", "total s", "planted recall", "pairs", "candidates / image"],
        [[name.split("_")[0].replace("mih", "multi-index hash").replace("brute", "brute force"),
          f"{(args.n if name == 'mih_big' else args.n_small):,}", med(name, "build"), med(name, "total"),
          f"{100 * med(name, 'recall'):.2f} %", f"{int(med(name, 'pairs')):,}", med(name, "per_image")]
         for name in ("mih_big", "mih_small", "brute_small")])
    body += (
        f"\n- Same-run ratio at {args.n_small:,}: brute force / multi-index hash = **{ratio:.1f}x**; brute "
        f"force extrapolated to {args.n:,} (quadratic): ~{extrapolated:,.0f} s.\n"
        f"- Peak memory during the {args.n:,} runs (sum of RSS, driver + {args.workers} workers): "
        f"**{big_peak / 2**30:.2f} GiB** (idle cluster before the runs: {idle / 2**30:.2f} GiB).\n"
        f"- Acceptance (issue): recall 100 %, total < 60 s, < 4 GB at {args.n:,} on this 2-core machine: "
        f"{'met' if med('mih_big', 'recall') == 1.0 and med('mih_big', 'total') < 60 and big_peak < 4e9 else 'NOT met'}.\n")
    update_section("candidate-search", "candidate search", body, **({"path": args.out} if args.out else {}))
    print(body)


if __name__ == "__main__":
    main()
