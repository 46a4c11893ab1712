"""Sharded candidate search at scale: `python -m bench.shard` (section "sharded candidate search").

10,000,000 synthetic 64-bit hashes (no images) generated on the workers in partitions of 250,000,
with planted near pairs at distances 0..threshold, half inside a partition and half across two
neighbouring partitions (so a pair's images sit in different index shards). The sharded search
(`pipeline.candidates.sharded_neighbours`, defaults: threshold 10, K 15, shards of
`screen.search_shard_size` entries) runs on a local cluster of 2 worker processes; the planted
pairs are checked on the workers, so the driver only ever holds futures and counts. Memory: the
driver's and each worker's peak resident set (VmHWM of /proc/self/status, reset through
/proc/self/clear_refs before the measured run). Same-run baseline: the first 1,000,000 hashes
searched by the one-index search (`directed_neighbours`, index built in the driver and broadcast)
and by the sharded one, with the two results compared row for row. A long benchmark (~15 min on
2 cores); not part of `make bench`.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import stamp, table, update_section
from pipeline.candidates import directed_neighbours, shard_groups, sharded_neighbours
from pipeline.config import ScreenConfig


def _random_codes(p: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, p])
    return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)


def _noise(rng, count: int, weights: np.ndarray) -> np.ndarray:
    """`count` masks of weights[i] distinct set bits."""
    order = np.argsort(rng.random((count, 64)), axis=1)
    keep = np.arange(64)[None, :] < weights[:, None]
    return np.bitwise_or.reduce(np.where(keep, np.uint64(1) << order.astype(np.uint64), np.uint64(0)), axis=1)


def planted(p: int, n: int, n_plant: int, max_d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partition p's planted pairs: (row in p, global id of its partner, distance). Inside: odd row
    2j + 1 copies row 2j; across (p > 0): row n - 1 - 2j copies row 2j of partition p - 1. Even rows
    are never modified, so a partner's code is its random code."""
    half = n_plant // 2
    j = np.arange(half)
    rows = [2 * j + 1]
    partners = [p * n + 2 * j]
    if p > 0:
        rows.append(n - 1 - 2 * j)
        partners.append((p - 1) * n + 2 * j)
    rows, partners = np.concatenate(rows), np.concatenate(partners)
    dist = np.arange(rows.size) % (max_d + 1)
    return rows, partners, dist


def generate(p: int, n: int, n_plant: int, max_d: int, seed: int):
    """Hash partition p (the tuple `sharded_neighbours` takes), made on a worker."""
    codes = _random_codes(p, n, seed)
    rows, partners, dist = planted(p, n, n_plant, max_d)
    source = codes[partners - p * n] if p == 0 else np.where(
        partners >= p * n, codes[np.clip(partners - p * n, 0, n - 1)],
        _random_codes(p - 1, n, seed)[np.clip(partners - (p - 1) * n, 0, n - 1)])
    codes[rows] = source ^ _noise(np.random.default_rng([seed, p, 1]), rows.size, dist)
    img = np.arange(p * n, (p + 1) * n, dtype=np.int64)
    ones = np.ones((n, 1), bool)
    return img, codes[:, None, None], ones, ones.copy()


def check(found: pd.DataFrame, p: int, n: int, n_plant: int, max_d: int) -> dict:
    """Planted pairs of partition p found in the lists of its planted rows (the query side)."""
    rows, partners, _ = planted(p, n, n_plant, max_d)
    want = (p * n + rows) * np.int64(2**31) + partners
    got = found["owner_a"].to_numpy(np.int64) * np.int64(2**31) + found["owner_b"].to_numpy(np.int64)
    return {"planted": int(rows.size), "found": int(np.isin(want, got).sum()), "rows": len(found),
            "images_with_list": int(found["owner_a"].nunique())}


def vm_hwm() -> int:
    """This process's peak resident set in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def reset_hwm() -> bool:
    """Reset VmHWM to the current resident set (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--part", type=int, default=250_000, help="hashes per partition (even)")
    ap.add_argument("--plant", type=int, default=500, help="planted pairs per partition")
    ap.add_argument("--baseline-n", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=int, default=10)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--shard-size", type=int, default=None, help="default: screen.search_shard_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="benchmarks file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster, wait

    cfg = dataclasses.replace(ScreenConfig(), max_distance=args.threshold, max_candidates=args.k,
                              dihedral=False, trim_borders=False, backend="mih")
    shard_size = args.shard_size or cfg.search_shard_size
    n_parts = args.n // args.part
    n = n_parts * args.part
    gen = dict(n=args.part, n_plant=args.plant, max_d=args.threshold, seed=args.seed)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        # warm-up: numba kernels loaded in every worker, then every peak reset
        warm = [client.submit(generate, p, 20_000, 100, args.threshold, 99, pure=False) for p in range(4)]
        sharded_neighbours(warm, cfg, client=client, shard_size=20_000)
        del warm
        driver_before = vm_hwm()
        reset_hwm()
        client.run(reset_hwm)
        driver_idle = vm_hwm()
        t0 = time.perf_counter()
        parts = [client.submit(generate, p, **gen, pure=False) for p in range(n_parts)]
        wait(parts)
        t1 = time.perf_counter()
        merged = sharded_neighbours(parts, cfg, client=client, shard_size=shard_size, gather=False)
        checks = client.gather([client.submit(check, m, p, args.part, args.plant, args.threshold, pure=False)
                                for p, m in enumerate(merged)])
        t2 = time.perf_counter()
        driver_peak = vm_hwm()
        worker_peak = client.run(vm_hwm)
        del merged
        n_shards = len(shard_groups([args.part] * n_parts, shard_size, args.workers))
        planted_total = sum(c["planted"] for c in checks)
        found_total = sum(c["found"] for c in checks)
        rows_total = sum(c["rows"] for c in checks)
        print("sharded", n, t2 - t1, found_total, planted_total, driver_peak, worker_peak, flush=True)

        # same-run baseline on the first baseline_n hashes: one index vs sharded, same rows?
        nb = max(1, args.baseline_n // args.part)
        base_parts = parts[:nb]
        del parts
        t3 = time.perf_counter()
        sharded_small = sharded_neighbours(base_parts, cfg, client=client, shard_size=shard_size)
        t4 = time.perf_counter()
        local = client.gather(base_parts)
        codes = np.concatenate([p[1] for p in local])
        del local
        t5 = time.perf_counter()
        one_index = directed_neighbours(codes, np.ones(codes.shape[:2], bool),
                                        dataclasses.replace(cfg, search_sharding="single"), client=client)
        t6 = time.perf_counter()
        identical = one_index.equals(sharded_small)
        small_shards = len(shard_groups([args.part] * nb, shard_size, args.workers))
        print("baseline", nb * args.part, t4 - t3, t6 - t5, identical, flush=True)

    recall = found_total / max(planted_total, 1)
    gib = 2**30
    body = stamp() + (
        f"\n{n:,} random 64-bit hashes made on the workers in {n_parts} partitions of {args.part:,}, "
        f"{planted_total:,} planted near pairs at distances 0..{args.threshold} (half across two partitions); "
        f"threshold {args.threshold}, K = {args.k}, plain hashes only. Sharded search "
        f"(`sharded_neighbours`, {n_shards} index shards of ~{n // n_shards:,} entries, every partition "
        f"probes every shard, K-nearest lists merged per partition) on a LocalCluster of {args.workers} "
        f"worker processes x 1 thread. Peak memory = VmHWM (reset before the run); the driver process "
        f"also hosts the scheduler. One run (a long benchmark).\n\n")
    body += table(
        ["search", "hashes", "shards", "search s", "planted recall", "directed rows", "driver peak GiB",
         "worker peaks GiB"],
        [["sharded", f"{n:,}", n_shards, t2 - t1, f"{100 * recall:.2f} %", f"{rows_total:,}",
          driver_peak / gib, ", ".join(f"{v / gib:.2f}" for v in worker_peak.values())],
         ["sharded", f"{nb * args.part:,}", small_shards, t4 - t3, "", f"{len(sharded_small):,}", "", ""],
         ["one index (driver builds, broadcast)", f"{nb * args.part:,}", 1, t6 - t5, "",
          f"{len(one_index):,}", "", ""]])
    body += (
        f"\n- Generating the {n:,} hashes on the workers: {t1 - t0:.1f} s (not in the search time).\n"
        f"- Same-run baseline at {nb * args.part:,}: sharded / one index = "
        f"**{(t4 - t3) / max(t6 - t5, 1e-9):.2f}x** the time; lists identical row for row: **{identical}**.\n"
        f"- Driver peak before the warm-up reset: {driver_before / gib:.2f} GiB; after it: "
        f"{driver_idle / gib:.2f} GiB (an idle driver with its scheduler).\n"
        f"- Goal: planted recall 100 %, driver peak < 1 GB at {n:,}: "
        f"{'met' if recall == 1.0 and driver_peak < 1e9 else 'NOT met'}.\n")
    update_section("shard", "sharded candidate search (10M hashes)", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


if __name__ == "__main__":
    main()
