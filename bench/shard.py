"""Candidate search at scale: `python -m bench.shard` (section "routed candidate search (10M)";
with `--way sharded`, section "sharded candidate search").

10,000,000 synthetic 64-bit hashes (no images) generated on the workers in partitions of 250,000,
with planted near pairs at distances 0..threshold, half inside a partition and half across two
neighbouring partitions (so a pair's images sit in different index shards or slices). The search
spread over the workers (`pipeline.candidates.sharded_neighbours`, defaults: threshold 10, K 15,
slices, or with `--way sharded` shards, of `screen.search_shard_size` entries) runs on a local
cluster of 2 worker processes; the planted
pairs are checked on the workers, so the driver only ever holds futures and counts. Memory: the
driver's and each worker's peak resident set (VmHWM of /proc/self/status, reset through
/proc/self/clear_refs before the measured run). Same-run baseline: the first 1,000,000 hashes
searched by the one-index search (`directed_neighbours`, index built in the driver and broadcast)
and by the sharded one, with the two results compared row for row. A long benchmark (~15 min on
2 cores); not part of `make bench`.

`python -m bench.shard --embeddings` (section "sharded embedding kNN"): the high-recall mode's
kNN instead. N synthetic 1280-d unit vectors written by the workers as feature-store partitions of
256 images (as a run writes its screen embeddings), planted near copies (cosine ~0.96) inside a
partition and across neighbouring ones; the sharded kNN (`candidates.sharded_embedding_pairs`,
index shards built and searched on 2 worker processes) against the one-index search in the driver
(`embedding_pairs`, search_sharding single), both with the kind `embedding_index: auto` picks for
N (IVF above `embedding_exact_max`): time, planted recall, driver and worker peaks. Then the first
`--flat-n` vectors with the exact (flat) index both ways, pairs compared.

`python -m bench.shard --incremental` (section "sharded incremental search"): a catalog re-run's
candidate search on a cluster. N synthetic aHash-like codes (bench/incremental.py's
`ahash_codes`: 8 dihedral variants each), the lists of a first run, then 1 % of the images
added (new codes at random rows) and 0.5 % removed: the re-derivation through
`candidates.incremental_neighbours` on a local cluster of 2 worker processes, three ways, in
the same run: `search_sharding: single` (the whole re-derivation one task on one worker),
`auto` (hash partitions searched on the workers against a copy of one index on each) and
`sharded` (index shards of N / 4 entries), against the search from scratch on the same cluster;
lists checked equal row for row. Time: median of --repeats; memory: each worker's peak (VmHWM,
reset before each way).

`python -m bench.shard --routed` (section "routed candidate search"): N random hashes (default
2,000,000, planted pairs as above) made on the workers, searched three ways on a local cluster of
2 worker processes, interleaved over --repeats: `search_sharding: sharded` (index shards of
--shard-size entries, default N / 8, every partition probing every shard), `routed` (slices of one
multi-index of at most --shard-size entries each, `candidates` "Routed search") and one index (a
copy on each worker, as "auto" below `search_shard_size`). Lists compared row for row; medians,
ratios to the sharded search, each way's largest worker peak. With `--codes-from CATALOG` (section
"routed candidate search on a real collection's hashes"): the same three ways on the hashes of a
real collection instead, a catalog's images table as a run over it committed (default screen: the
dihedral and trimmed variants too), each way as a run with `--shard-size` (default
`screen.search_shard_size`) would make it; ratios to one index.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import stamp, table, update_section
from pipeline import candidates, store
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


def _unit_vectors(p: int, n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, p, 7]).standard_normal((n, d), dtype=np.float32)


def embedding_part(directory: str, p: int, n: int, d: int, n_plant: int, seed: int) -> str:
    """Partition p of the synthetic screen embeddings, written to the feature store by a worker:
    random directions, the planted rows of `planted` replaced by a noisy copy of their partner
    (noise 0.3 x the norm: cosine ~0.96). Keys idx * 8 as a run stores them."""
    vecs = _unit_vectors(p, n, d, seed)
    rows, partners, _ = planted(p, n, n_plant, 0)
    prev = _unit_vectors(p - 1, n, d, seed) if p > 0 else None
    src = np.where((partners >= p * n)[:, None], vecs[np.clip(partners - p * n, 0, n - 1)],
                   prev[np.clip(partners - (p - 1) * n, 0, n - 1)] if prev is not None else 0)
    noise = np.random.default_rng([seed, p, 8]).standard_normal((rows.size, d), dtype=np.float32)
    vecs[rows] = src + 0.3 * noise * (np.linalg.norm(src, axis=1, keepdims=True) / np.sqrt(d))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = (p * n + np.arange(n, dtype=np.int64)) * 8
    frame = pd.DataFrame({"key": keys, "embedding": [v.astype("<f4").tobytes() for v in vecs]})
    return store.write_partition(directory, p, frame)


def planted_embedding_pairs(n_parts: int, n: int, n_plant: int) -> set:
    out = set()
    for p in range(n_parts):
        rows, partners, _ = planted(p, n, n_plant, 0)
        out |= {(int(min(a, b)), int(max(a, b))) for a, b in zip(p * n + rows, partners)}
    return out


def main_embeddings(args) -> None:
    import tempfile
    from distributed import Client, LocalCluster
    cfg = dataclasses.replace(ScreenConfig(), mode="hash+embedding", embedding_k=args.k)
    n_parts = args.n // args.part
    n = n_parts * args.part
    shard_size = args.shard_size or max(1, n // 4)
    on = dataclasses.replace(cfg, search_sharding="sharded", embedding_shard_size=shard_size)
    off = dataclasses.replace(cfg, search_sharding="single")
    kind = candidates._embedding_kind(cfg, n)
    gib = 2**30
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        paths = client.gather([client.submit(embedding_part, tmp, p, args.part, args.d, args.plant, args.seed,
                                             pure=False) for p in range(n_parts)])
        t_gen = time.perf_counter() - t0
        truth = planted_embedding_pairs(n_parts, args.part, args.plant)
        # warm-up (FAISS and the store loaded in every worker), then every peak reset
        candidates.embedding_pairs(paths[:8], dataclasses.replace(on, embedding_shard_size=args.part), client=client)
        client.run(reset_hwm)
        reset_hwm()
        driver_idle = vm_hwm()
        t1 = time.perf_counter()
        sharded = candidates.embedding_pairs(paths, on, client=client)
        t_sharded = time.perf_counter() - t1
        driver_sharded = vm_hwm()
        worker_peak = client.run(vm_hwm)
        counts = client.gather(client.map(candidates._count_part, paths, pure=False))
        n_shards = len(shard_groups(counts, shard_size, args.workers))
        print("sharded", n, kind, n_shards, t_sharded, driver_sharded / gib, worker_peak, flush=True)
        reset_hwm()
        t2 = time.perf_counter()
        single = candidates.embedding_pairs(paths, off, client=client)
        t_single = time.perf_counter() - t2
        driver_single = vm_hwm()
        print("single", t_single, driver_single / gib, flush=True)
        # the exact index both ways on the first flat_n vectors: the same pairs?
        flat_paths = paths[:max(1, args.flat_n // args.part)]
        flat_n = len(flat_paths) * args.part
        t3 = time.perf_counter()
        flat_sharded = candidates.embedding_pairs(
            flat_paths, dataclasses.replace(on, embedding_index="flat", embedding_shard_size=max(1, flat_n // 4)),
            client=client)
        t4 = time.perf_counter()
        flat_single = candidates.embedding_pairs(flat_paths, dataclasses.replace(off, embedding_index="flat"))
        t5 = time.perf_counter()
    as_set = lambda f: set(zip(f["idx_a"].tolist(), f["idx_b"].tolist()))  # noqa: E731
    rec_sharded = len(truth & as_set(sharded)) / len(truth)
    rec_single = len(truth & as_set(single)) / len(truth)
    same_pairs = flat_sharded[["idx_a", "idx_b"]].equals(flat_single[["idx_a", "idx_b"]])
    max_dcos = float("nan")
    if same_pairs and len(flat_single):
        max_dcos = float(np.abs(flat_sharded["cosine"].to_numpy(np.float64)
                                - flat_single["cosine"].to_numpy(np.float64)).max())
    both = len(as_set(sharded) & as_set(single))
    flat_shards = len(shard_groups(counts[:len(flat_paths)], max(1, flat_n // 4), args.workers))
    body = stamp() + (
        f"\n{n:,} synthetic L2-normalised {args.d}-d vectors (random directions) written by the workers as "
        f"feature-store partitions of {args.part} images, {len(truth):,} planted near copies (cosine ~0.96; "
        f"half across two partitions; two copies of one vector make a pair too); k = {args.k}, "
        f"min cosine {cfg.embedding_min_cosine}. Index kind as "
        f"`embedding_index: auto` picks for {n:,} vectors: **{kind}**"
        f"{f' (nprobe {cfg.embedding_nprobe})' if kind == 'ivf' else ''}. Sharded: "
        f"`sharded_embedding_pairs`, {n_shards} FAISS shards of ~{n // n_shards:,} vectors built and searched on a "
        f"LocalCluster of {args.workers} worker processes x 1 thread, every partition against every shard, the "
        f"k + 1 best merged per partition"
        f"{' (IVF: the shards share one coarse quantizer trained on a worker from the sample one index takes, and each partition is assigned to its lists once)' if kind == 'ivf' else ''}"
        f". One index: `embedding_pairs` with `search_sharding: single` "
        f"(the index built in the driver, FAISS on all cores). Peak memory = VmHWM, reset before each search; the "
        f"driver process also hosts the scheduler. One run (a long benchmark).\n\n")
    body += table(
        ["kNN", "vectors", "index", "shards", "seconds", "planted recall", "pairs", "driver peak GiB",
         "worker peaks GiB"],
        [["sharded", f"{n:,}", kind, n_shards, t_sharded, f"{100 * rec_sharded:.2f} %", f"{len(sharded):,}",
          driver_sharded / gib, ", ".join(f"{v / gib:.2f}" for v in worker_peak.values())],
         ["one index (driver)", f"{n:,}", kind, 1, t_single, f"{100 * rec_single:.2f} %", f"{len(single):,}",
          driver_single / gib, ""],
         ["sharded", f"{flat_n:,}", "flat", flat_shards, t4 - t3, "", f"{len(flat_sharded):,}", "", ""],
         ["one index (driver)", f"{flat_n:,}", "flat", 1, t5 - t4, "", f"{len(flat_single):,}", "", ""]])
    body += (
        f"\n- Same-run ratio at {n:,}: sharded / one index = **{t_sharded / max(t_single, 1e-9):.2f}x** the time; "
        f"driver peak {driver_sharded / gib:.2f} vs {driver_single / gib:.2f} GiB (idle driver after the reset: "
        f"{driver_idle / gib:.2f} GiB); {both:,} pairs found by both, {len(sharded) - both:,} only sharded, "
        f"{len(single) - both:,} only one index"
        f"{' (one quantizer: the lists visited are one index’s)' if kind == 'ivf' else ''}.\n"
        f"- Flat (exact) at {flat_n:,}: the same pairs: **{same_pairs}**, largest cosine difference "
        f"{max_dcos:.1e}; sharded / one index = {(t4 - t3) / max(t5 - t4, 1e-9):.2f}x the time.\n"
        f"- Generating the vectors on the workers: {t_gen:.1f} s (not in the search times).\n")
    update_section("shard_embedding", f"sharded embedding kNN ({n:,} vectors)", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


def grown(n: int, seed: int = 0, add: float = 0.01, drop: float = 0.005):
    """A collection of n aHash-like codes after a first run over it, then `add` of new images at
    random rows and `drop` removed: (codes, mask, previous lists in the new row numbers, same)."""
    from bench.incremental import ahash_codes, grown_collection

    rng = np.random.default_rng([seed, 1])
    n_new = int(n * add)
    every, every_mask = ahash_codes(n + n_new, seed)  # (the added images near old ones as often as old ones are)
    previous = directed_neighbours(every[:n], every_mask[:n], ScreenConfig())
    keep = rng.random(n) >= drop
    return grown_collection(every[:n], every_mask[:n], previous, keep, every[n:], every_mask[n:],
                            rng.random(n_new) * n)


def main_incremental(args) -> None:
    from distributed import Client, LocalCluster

    t = time.perf_counter()
    codes, mask, previous, same = grown(args.n, args.seed)
    print(f"made {args.n:,} codes and the first run's lists in {time.perf_counter() - t:.0f} s", flush=True)
    base = ScreenConfig()
    ways = {"single": dataclasses.replace(base, search_sharding="single"),
            "auto": base,
            "sharded": dataclasses.replace(base, search_sharding="sharded",
                                           search_shard_size=max(1, args.shard_size or len(codes) // 4))}
    times: dict[str, list] = {w: [] for w in ["scratch", *ways]}
    peaks: dict[str, list] = {w: [] for w in times}
    stats = None
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        want = directed_neighbours(codes, mask, base, client=client)  # (also the workers' warm-up)
        for r in range(args.repeats):
            for way in times:  # interleaved: the machine's drift falls on every way alike
                client.run(reset_hwm)
                t = time.perf_counter()
                if way == "scratch":
                    got = directed_neighbours(codes, mask, base, client=client)
                else:
                    got, stats = candidates.incremental_neighbours(codes, mask, ways[way], previous, same,
                                                                   client=client)
                times[way].append(time.perf_counter() - t)
                peaks[way].append(max(client.run(vm_hwm).values()))
                if not got.reset_index(drop=True).equals(want):
                    raise SystemExit(f"{way}: the lists differ from the search from scratch")
                print(r, way, f"{times[way][-1]:.2f} s", flush=True)
                del got
    from bench.report import median
    gib = 2**30
    scratch = median(times["scratch"])
    rows = [[way, median(ts), f"{median(ts) / scratch:.2f}x", f"{median(peaks[way]) / gib:.2f}",
             "yes"] for way, ts in times.items()]
    body = stamp() + (
        f"\n{len(codes):,} synthetic aHash-like codes (8 dihedral variants each, `bench.incremental.ahash_codes`); "
        f"the lists of a first run over {args.n:,}, then {stats['added']:,} images added at random rows and "
        f"0.5 % removed. Default screen settings (threshold 10, K 15). The re-derivation "
        f"(`candidates.incremental_neighbours`) on a LocalCluster of {args.workers} worker processes x 1 "
        f"thread, three ways, against the search from scratch on the same cluster; {args.repeats} repeats, "
        f"interleaved, medians. Worker peak: the largest worker's VmHWM, reset before each search. Every "
        f"way's lists equal the search from scratch row for row.\n\n")
    body += table(["search", "median s", "vs scratch", "worker peak GiB", "lists equal"], rows)
    body += (f"\n- Re-derived: {stats['added']:,} added images' lists, "
             f"{stats['rederived_gained_neighbour']:,} with a new image within reach, "
             f"{stats['rederived_lost_neighbour']:,} with a neighbour gone; {stats['lists_reused']:,} reused.\n"
             f"- single: the codes and the last lists sent to one worker, searched there by one thread; "
             f"auto: hash partitions, a copy of one index on each worker; sharded: "
             f"{len(codes) // max(1, args.shard_size or len(codes) // 4)} index shards, every partition probes each.\n")
    update_section("shard_incremental", "sharded incremental search (catalog re-run on a cluster)", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


def main_routed(args) -> None:
    from distributed import Client, LocalCluster, wait

    from bench.report import interleaved_runs, median
    cfg = dataclasses.replace(ScreenConfig(), max_distance=args.threshold, max_candidates=args.k,
                              dihedral=False, trim_borders=False, backend="mih")
    n_parts = args.n // args.part
    n = n_parts * args.part
    shard_size = args.shard_size or max(1, n // 8)
    ways = {"sharded": dataclasses.replace(cfg, search_sharding="sharded"),
            "routed": dataclasses.replace(cfg, search_sharding="routed"),
            "one index": cfg}
    counts = {}
    gen = dict(n=args.part, n_plant=args.plant, max_d=args.threshold, seed=args.seed)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        parts = [client.submit(generate, p, **gen, pure=False) for p in range(n_parts)]
        wait(parts)
        warm = [client.submit(generate, p, 20_000, 100, args.threshold, 99, pure=False) for p in range(4)]
        for c in ways.values():  # every kernel compiled or loaded in every worker
            sharded_neighbours(warm, c, client=client, shard_size=10_000, one_shard=c is cfg)
        del warm
        times, peaks, want = interleaved_runs(
            {way: lambda c=c: sharded_neighbours(parts, c, client=client, shard_size=shard_size, one_shard=c is cfg)
             for way, c in ways.items()},
            args.repeats, before=lambda: client.run(reset_hwm), after=lambda: max(client.run(vm_hwm).values()))
        checks = [check(want[(want["owner_a"] >= p * args.part) & (want["owner_a"] < (p + 1) * args.part)],
                        p, args.part, args.plant, args.threshold) for p in range(n_parts)]
        ents = [args.part] * n_parts
        counts["shards"] = len(shard_groups(ents, shard_size, args.workers))
        counts["chunks"], _, plan, _ = candidates.routed_plan(parts, ways["routed"], client, shard_size)
        counts["slices"] = len(plan)
    gib = 2**30
    base = median(times["sharded"])
    planted_total = sum(c["planted"] for c in checks)
    found_total = sum(c["found"] for c in checks)
    body = stamp() + (
        f"\n{n:,} random 64-bit hashes made on the workers in {n_parts} partitions of {args.part:,}, "
        f"{planted_total:,} planted near pairs at distances 0..{args.threshold}; threshold {args.threshold}, "
        f"K = {args.k}, plain hashes only. Three ways on a LocalCluster of {args.workers} worker processes x 1 "
        f"thread: sharded ({counts['shards']} index shards of ~{n // counts['shards']:,} entries, every partition "
        f"probes each), routed ({counts['slices']} slices of at most {shard_size:,} entries of one multi-index of "
        f"{counts['chunks']} chunks per word) and one index (a copy built on each worker). "
        f"{args.repeats} repeats, interleaved, medians; worker peak: the largest worker's VmHWM, reset before "
        f"each search. Every way's lists equal the sharded search's row for row; planted recall "
        f"{100 * found_total / max(planted_total, 1):.2f} %.\n\n")
    body += table(["search", "median s", "vs sharded", "worker peak GiB", "runs (s)"],
                  [[way, median(ts), f"{median(ts) / base:.2f}x", f"{median(peaks[way]) / gib:.2f}",
                    ", ".join(f"{t:.1f}" for t in ts)] for way, ts in times.items()])
    update_section("shard_routed", f"routed candidate search ({n:,} hashes)", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


def real_partitions(catalog_dir: str, client):
    """The hash partitions of a real collection (a catalog's images table, default screen), sent to
    the workers: (futures, config, images, index entries)."""
    from bench.chunk_order import real_codes
    images, cfg, codes, mask, representatives = real_codes(catalog_dir)
    codes, use, idx_use = candidates._prepare(codes, mask, cfg, representatives)
    n_img = int((use.any(axis=1) | idx_use.any(axis=1)).sum())
    parts = candidates.hash_partitions(codes, use, idx_use, candidates._partition_rows(n_img, client))
    return client.scatter(parts, hash=False), cfg, len(images), int(idx_use.sum())


def main_routed_real(args) -> None:
    """`--routed --codes-from CATALOG`: the three ways on a real collection's hashes (see the docstring)."""
    from distributed import Client, LocalCluster

    from bench.report import interleaved_runs, median
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        parts, cfg, n_images, n_entries = real_partitions(args.codes_from, client)
        shard_size = args.shard_size or cfg.search_shard_size  # (each way as a run would set it)
        ways = {"sharded": dataclasses.replace(cfg, search_sharding="sharded"),
                "routed": dataclasses.replace(cfg, search_sharding="routed"), "one index": cfg}
        for c in ways.values():  # every kernel compiled or loaded in every worker
            sharded_neighbours(parts[:1], c, client=client, shard_size=shard_size, one_shard=c is cfg)
        times, peaks, want = interleaved_runs(
            {way: lambda c=c: sharded_neighbours(parts, c, client=client, shard_size=shard_size, one_shard=c is cfg)[
                ["owner_a", "owner_b", "hash_distance"]] for way, c in ways.items()},
            args.repeats, before=lambda: client.run(reset_hwm), after=lambda: max(client.run(vm_hwm).values()))
        chunks, _, plan, _ = candidates.routed_plan(parts, ways["routed"], client, shard_size)
        n_shards = len(shard_groups(client.gather(client.map(candidates._part_entries, parts)), shard_size,
                                    args.workers))
    base = median(times["one index"])
    body = stamp() + (
        f"\nThe hashes of a real collection ({n_images:,} images of `{args.codes_from}`'s images table, default "
        f"screen: {n_entries:,} index entries, the dihedral and trimmed variants querying, threshold "
        f"{cfg.max_distance}, K = {cfg.max_candidates}) in {len(parts)} partitions on a LocalCluster of "
        f"{args.workers} worker processes x 1 thread, three ways, each as `screen.search_sharding` sets it "
        f"with a shard size of {shard_size:,} entries: sharded ({n_shards} index shard(s) of whole partitions), "
        f"routed ({len(plan)} slices of one multi-index of {chunks} chunks per word, at most a quarter of a "
        "worker's share each) and one index (a copy built on each worker, what \"auto\" does below "
        "`screen.search_shard_size`). "
        f"{args.repeats} repeats, interleaved, medians; worker peak: the largest worker's VmHWM, reset before each "
        f"search. Every way's lists equal row for row ({len(want):,} directed rows).\n\n")
    body += table(["search", "median s", "vs one index", "worker peak GiB", "runs (s)"],
                  [[way, median(ts), f"{median(ts) / base:.2f}x", f"{median(peaks[way]) / 2**30:.2f}",
                    ", ".join(f"{t:.2f}" for t in ts)] for way, ts in times.items()])
    update_section("shard_routed_real", "routed candidate search on a real collection's hashes", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="default 10,000,000 (--embeddings: 300,000)")
    ap.add_argument("--part", type=int, default=None, help="hashes per partition (even; default 250,000, "
                    "--embeddings: 256 vectors)")
    ap.add_argument("--plant", type=int, default=None, help="planted pairs per partition (default 500, "
                    "--embeddings: 8)")
    ap.add_argument("--baseline-n", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=int, default=10)
    ap.add_argument("--k", type=int, default=None, help="default 15 (--embeddings: 10)")
    ap.add_argument("--shard-size", type=int, default=None, help="default: screen.search_shard_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="benchmarks file (default docs/benchmarks.md)")
    ap.add_argument("--embeddings", action="store_true",
                    help="the embedding kNN instead (see the docstring; --shard-size default n / 4)")
    ap.add_argument("--d", type=int, default=1280, help="--embeddings: dimensions")
    ap.add_argument("--flat-n", type=int, default=20_000, help="--embeddings: vectors of the flat comparison")
    ap.add_argument("--tmp", default=None, help="--embeddings: folder for the vectors' partitions")
    ap.add_argument("--incremental", action="store_true",
                    help="a catalog re-run's search instead (see the docstring; --n default 1,000,000)")
    ap.add_argument("--repeats", type=int, default=3, help="--incremental, --routed: repeats (medians)")
    ap.add_argument("--way", choices=["routed", "sharded"], default="routed",
                    help="the 10M search: slices of one multi-index (routed, the default past "
                    "search_shard_size) or whole index shards (section 'sharded candidate search')")
    ap.add_argument("--routed", action="store_true",
                    help="sharded, routed and one-index search compared (see the docstring; --n default 2,000,000)")
    ap.add_argument("--codes-from", default=None, metavar="CATALOG",
                    help="--routed: a real collection's hashes (a catalog folder) instead of random ones")
    args = ap.parse_args(argv)
    defaults = ({"n": 300_000, "part": 256, "plant": 8, "k": 10} if args.embeddings else
                {"n": 1_000_000} if args.incremental else
                {"n": 2_000_000, "part": 250_000, "plant": 500, "k": 15} if args.routed else
                {"n": 10_000_000, "part": 250_000, "plant": 500, "k": 15})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.embeddings:
        return main_embeddings(args)
    if args.incremental:
        return main_incremental(args)
    if args.routed:
        return main_routed_real(args) if args.codes_from else main_routed(args)
    from distributed import Client, LocalCluster, wait

    cfg = dataclasses.replace(ScreenConfig(), max_distance=args.threshold, max_candidates=args.k,
                              dihedral=False, trim_borders=False, backend="mih", search_sharding=args.way)
    shard_size = args.shard_size or cfg.search_shard_size
    n_parts = args.n // args.part
    n = n_parts * args.part
    gen = dict(n=args.part, n_plant=args.plant, max_d=args.threshold, seed=args.seed)
    n_slices = 0
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
        if args.way == "routed":
            n_slices = len(candidates.routed_plan(parts, cfg, client, shard_size)[2])
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
    spread = (f"{n_shards} index shards of ~{n // n_shards:,} entries, every partition probes every shard"
              if args.way == "sharded" else
              f"search_sharding: routed, {n_slices} slices of one multi-index of at most {shard_size:,} entries each")
    body = stamp() + (
        f"\n{n:,} random 64-bit hashes made on the workers in {n_parts} partitions of {args.part:,}, "
        f"{planted_total:,} planted near pairs at distances 0..{args.threshold} (half across two partitions); "
        f"threshold {args.threshold}, K = {args.k}, plain hashes only. Search spread over the workers "
        f"(`sharded_neighbours`, {spread}, K-nearest lists merged per partition) on a LocalCluster of {args.workers} "
        f"worker processes x 1 thread. Peak memory = VmHWM (reset before the run); the driver process "
        f"also hosts the scheduler. One run (a long benchmark).\n\n")
    body += table(
        ["search", "hashes", "shards", "search s", "planted recall", "directed rows", "driver peak GiB",
         "worker peaks GiB"],
        [[args.way, f"{n:,}", n_slices or n_shards, t2 - t1, f"{100 * recall:.2f} %", f"{rows_total:,}",
          driver_peak / gib, ", ".join(f"{v / gib:.2f}" for v in worker_peak.values())],
         [args.way, f"{nb * args.part:,}", "" if n_slices else small_shards, t4 - t3, "", f"{len(sharded_small):,}",
          "", ""],
         ["one index (driver builds, broadcast)", f"{nb * args.part:,}", 1, t6 - t5, "",
          f"{len(one_index):,}", "", ""]])
    body += (
        f"\n- Generating the {n:,} hashes on the workers: {t1 - t0:.1f} s (not in the search time).\n"
        f"- Same-run baseline at {nb * args.part:,}: {args.way} / one index = "
        f"**{(t4 - t3) / max(t6 - t5, 1e-9):.2f}x** the time; lists identical row for row: **{identical}**.\n"
        f"- Driver peak before the warm-up reset: {driver_before / gib:.2f} GiB; after it: "
        f"{driver_idle / gib:.2f} GiB (an idle driver with its scheduler).\n"
        f"- Goal: planted recall 100 %, driver peak < 1 GB at {n:,}: "
        f"{'met' if recall == 1.0 and driver_peak < 1e9 else 'NOT met'}.\n")
    update_section("shard" if args.way == "sharded" else "shard_routed_10m",
                   f"{'sharded' if args.way == 'sharded' else 'routed'} candidate search ({n:,} hashes)", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


if __name__ == "__main__":
    main()
