"""The candidates stage on a cluster, search and pairs together (`candidates.near_pairs` with a
client): the driver's peak memory above its start, the workers' peaks and the wall time, this tree
against `--baseline DIR` (another source tree, e.g. `git archive COMMIT | tar -x -C DIR`), same
data, same run.

    python -m bench.pair_blocks [--images 2000000] [--rounds 2] [--repeats 2] [--baseline DIR]

Synthetic codes (N images x 9 variants of one 64-bit word, ~60 % of the variants present, the
plain hash always) in groups of 6 near copies placed anywhere in row order (each copy's plain and
trimmed hash within 4 bits of its group's: ~15 directed rows an image, as many as K allows),
default screen settings. Each tree runs in its own
process (PYTHONPATH) with a LocalCluster of 2 workers: a warm-up call (numba compiles on the
workers), then `--repeats` timed calls; the driver's and the largest worker's peak resident set
(VmHWM, reset before each call) are taken above the driver's resident set before the call, which
holds the codes, both by the end of the search and over the whole call. The trees' pairs must be
equal. Rounds alternate the trees.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


# the memory probes of bench/pair_best.py, loaded by its location: this file also runs in a child
# with another tree on the path, whose bench package may differ (functions of a module that is not
# imported go to the workers by value)
_PROBES = runpy.run_path(str(Path(__file__).with_name("pair_best.py")), run_name="bench_pair_best_probes")
_reset_hwm, _status_mib = _PROBES["_reset_hwm"], _PROBES["_status_mib"]


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codes (n, 9, 1) and their variant mask: groups of 6 copies (members anywhere in row order),
    each copy's plain and trimmed hash within 4 bits of its group's, the other variants random."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**63, size=(n, 9, 1), dtype=np.uint64)
    mask = rng.random((n, 9)) < 0.6
    mask[:, 0] = True
    group = rng.permutation(n) // 6
    base = rng.integers(0, 2**63, size=group.max() + 1, dtype=np.uint64)
    for v in (0, 8):
        bits = rng.integers(0, 64, size=(n, 4)).astype(np.uint64)
        flips = np.where(np.arange(4) < rng.integers(0, 5, n)[:, None], np.uint64(1) << bits, np.uint64(0))
        codes[:, v, 0] = base[group] ^ np.bitwise_or.reduce(flips, axis=1)
    return codes, mask


def measure(n: int, repeats: int, out: str) -> dict:
    """In this process (the tree on PYTHONPATH): seconds and peaks of `repeats` calls."""
    import time

    import distributed

    from pipeline import candidates
    from pipeline.config import ScreenConfig
    cfg = ScreenConfig()
    codes, mask = data(n)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        small = data(4000, seed=1)
        candidates.near_pairs(*small, cfg, client=client, block_rows=1000)  # (numba compiles on the workers)
        seconds, driver, search, workers, pairs = [], [], [], [], None
        for _ in range(repeats):
            del pairs  # (the last call's pairs are compared across the trees)
            before = _status_mib("VmRSS")
            _reset_hwm()
            client.run(_reset_hwm)
            start = time.perf_counter()
            # near_pairs' two steps, the driver's peak taken after each: the search, the pairs
            lists = candidates.directed_neighbours(codes, mask, cfg, client=client, gather=False)
            search.append(_status_mib("VmHWM") - before)
            pairs = candidates.pairs_from_neighbours(lists, codes, mask, cfg, client=client)
            del lists
            seconds.append(time.perf_counter() - start)
            driver.append(_status_mib("VmHWM") - before)
            workers.append(max(client.run(_status_mib, "VmHWM").values()))
    np.savez(out, **{c: pairs[c].to_numpy() for c in pairs.columns})
    return {"seconds": float(np.median(seconds)), "driver": max(driver), "search": max(search), "worker": max(workers),
            "pairs": int(len(pairs)), "tree": str(Path(candidates.__file__).parent.parent)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", help="another source tree, run alternately with this one")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # (a child's measurement: its result file)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.images, args.repeats, args.one)))
        return 0
    from bench.report import median, run_script_in_tree, stamp, table, update_section  # (the parent only: a child imports no bench)
    trees = {"this tree": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    found: dict[str, list[dict]] = {t: [] for t in trees}
    results = {}
    for _ in range(args.rounds):
        for tree, root in trees.items():
            result = f"/tmp/bench-pair-blocks-{os.getpid()}-{tree.replace(' ', '-')}.npz"
            out = run_script_in_tree(__file__, root, ["--images", str(args.images), "--repeats", str(args.repeats),
                                                      "--one", result], f"bench.pair_blocks ({tree})")
            found[tree].append(json.loads(out.strip().splitlines()[-1]))
            with np.load(result) as got:
                results[tree] = {k: got[k].copy() for k in got.files}
            os.unlink(result)
            print(tree, found[tree][-1], flush=True)
    if any(not all(np.array_equal(r[k], results["this tree"][k]) for k in r) for r in results.values()):
        raise SystemExit("the trees' pairs differ")
    base = trees.get("baseline") and median([r["seconds"] for r in found["baseline"]])
    rows = []
    for tree in trees:
        secs = median([r["seconds"] for r in found[tree]])
        rows.append([tree, f"{found[tree][0]['pairs']:,}", f"{secs:.1f}", f"{secs / base:.2f}" if base else "-",
                     f"{max(r['driver'] for r in found[tree]):.0f}", f"{max(r['search'] for r in found[tree]):.0f}",
                     f"{max(r['worker'] for r in found[tree]):.0f}"])
    body = stamp() + (
        f"\n`candidates.near_pairs` with a client (the search and the pairs) over {args.images:,} images' "
        "synthetic codes (9 variants of 64 bits, groups of 6 near copies anywhere in row order), default screen "
        "settings, on a LocalCluster of 2 workers (1 thread each): median seconds of "
        f"{args.repeats} calls per process over {args.rounds} processes per tree (rounds alternate the trees), "
        "the time as a ratio to the baseline's in the same run, the driver's peak above its resident set "
        "before the call (which holds the codes), and the largest worker's peak resident set (MiB, VmHWM "
        "reset before each call). The trees' pairs are equal. What the stage's pair-making did, by date: "
        "until 2026-12-05 the driver gathered every directed K-nearest list (18 B a row, up to K rows an "
        "image), made the pairs from them and sent each chunk of pairs with its rows' codes to the workers "
        "(`candidates.pair_best`); from 2026-12-05 the lists stay on the workers and the pairs are made there "
        "(`candidates.Lists`), the driver gathering the blocks, concatenating them and sorting a copy; from "
        "2026-12-06 the pairs are routed once more on the workers, to the block of their idx_a, and sorted "
        "there, and the driver copies the blocks in order into its columns a block at a time, with no sort "
        "of its own; and the hash partitions are sent to the workers one at a time as they are cut "
        "(`candidates.iter_hash_partitions`), not made all at once and scattered in one call. The driver's "
        "peak is also given as it stood when the search had returned (the pairs are made after).\n\n")
    body += table(["tree", "pairs", "seconds", "time ratio", "driver peak above start MiB",
                   "of it, by the end of the search MiB", "worker peak MiB"], rows)
    kwargs = {"path": args.out} if args.out else {}
    update_section("pair_blocks", "candidate pairs made on the workers (candidates stage)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
