"""The candidates stage's pair distances on a cluster (`candidates.pair_best`): wall time and the
workers' peak memory, this tree against `--baseline DIR` (another source tree, e.g.
`git archive COMMIT | tar -x -C DIR`), same data, same run.

    python -m bench.pair_best [--images 2000000] [--pairs-per-image 5] [--rounds 2] [--repeats 3]
                              [--baseline DIR]

Synthetic codes (N images x 9 variants of one 64-bit word, the default screen's layout) and
unordered pairs of two kinds: "near rows" (each image's partner within 1,000 rows, as copies named
alike sit side by side in path order) and "any rows" (partners anywhere). Each tree runs in its own
process (PYTHONPATH) with a LocalCluster of 2 workers: a warm-up on each worker (numba compiles), then
`--repeats` timed calls; the workers' peak resident set (VmHWM, reset before each call) and the
results are compared across the trees (they must be equal). Rounds alternate the trees.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SPREADS = {"near rows": 1_000, "any rows": None}


def _reset_hwm(dask_worker=None) -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _status_mib(field: str, dask_worker=None) -> float:
    """VmHWM or VmRSS of this process (MiB)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _warm_up(dask_worker=None) -> None:
    """Compile the kernel in this worker (a warm-up call's one task would reach one worker only)."""
    from pipeline import candidates
    z = np.zeros((2, 9, 1), np.uint64)
    candidates._best_over_variants(z, np.ones((2, 9), bool), np.ones((2, 9), bool), np.array([0]), np.array([1]))


def data(n: int, per_image: int, spread: int | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**63, size=(n, 9, 1), dtype=np.uint64)
    use = np.ones((n, 9), bool)
    use[:, 8] = False
    idx_use = np.zeros((n, 9), bool)
    idx_use[:, 0] = True
    m = n * per_image
    a = rng.integers(0, n - 1, m)
    b = np.minimum(a + 1 + rng.integers(0, spread, m), n - 1) if spread else rng.integers(0, n, m)
    a, b = np.minimum(a, b), np.maximum(a, b)
    key = np.unique((a * n + b)[a != b])  # (as pairs_from_neighbours makes them: by a, then b)
    return codes, use, idx_use, key // n, key % n


def measure(n: int, per_image: int, spread: int | None, repeats: int, out: str) -> dict:
    """In this process (the tree on PYTHONPATH): seconds and worker peaks of `repeats` calls."""
    import time

    import distributed

    from pipeline import candidates
    codes, use, idx_use, a, b = data(n, per_image, spread)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.run(_warm_up)
        seconds, peaks = [], []
        idle = max(client.run(_status_mib, "VmRSS").values())  # (after the warm-up: numba and the kernel loaded)
        for _ in range(repeats):
            client.run(_reset_hwm)
            start = time.perf_counter()
            dist, trans = candidates.pair_best(codes, use, idx_use, a, b, client=client)
            seconds.append(time.perf_counter() - start)
            peaks.append(max(client.run(_status_mib, "VmHWM").values()))
    np.savez(out, dist=dist, trans=trans)
    return {"seconds": float(np.median(seconds)), "peak": max(peaks), "idle": idle, "pairs": int(a.size),
            "tree": str(Path(candidates.__file__).parent.parent)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2_000_000)
    ap.add_argument("--pairs-per-image", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="another source tree, run alternately with this one")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # (a child's measurement: spread, result file)
    args = ap.parse_args(argv)
    if args.one:
        spread = None if args.one[0] == "any" else int(args.one[0])
        print(json.dumps(measure(args.images, args.pairs_per_image, spread, args.repeats, args.one[1])))
        return 0
    from bench.report import median, run_script_in_tree, stamp, table, update_section  # (the parent only: a child imports no bench)
    trees = {"this tree": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    rows = []
    for label, spread in SPREADS.items():
        found: dict[str, list[dict]] = {t: [] for t in trees}
        results = {}
        for _ in range(args.rounds):
            for tree, root in trees.items():
                result = f"/tmp/bench-pair-best-{os.getpid()}-{tree.replace(' ', '-')}.npz"
                out = run_script_in_tree(__file__, root, [
                    "--images", str(args.images), "--pairs-per-image", str(args.pairs_per_image), "--repeats",
                    str(args.repeats), "--one", "any" if spread is None else str(spread), result],
                    f"bench.pair_best ({tree})")
                found[tree].append(json.loads(out.strip().splitlines()[-1]))
                with np.load(result) as got:
                    results[tree] = (got["dist"].copy(), got["trans"].copy())
                os.unlink(result)
                print(label, tree, found[tree][-1], flush=True)
        same = all(np.array_equal(results[t][k], results["this tree"][k]) for t in results for k in (0, 1))
        if not same:
            raise SystemExit(f"{label}: the trees' distances or transforms differ")
        base = trees.get("baseline") and median([r["seconds"] for r in found["baseline"]])
        for tree in trees:
            secs = median([r["seconds"] for r in found[tree]])
            rows.append([label, tree, f"{found[tree][0]['pairs']:,}", f"{secs:.2f}",
                         f"{secs / base:.2f}" if base else "-", f"{max(r['peak'] for r in found[tree]):.0f}",
                         f"{max(r['idle'] for r in found[tree]):.0f}"])
    body = stamp() + (
        f"\n`candidates.pair_best` over {args.images:,} images' synthetic codes (9 variants of 64 bits) and "
        f"about {args.pairs_per_image} pairs per image, on a LocalCluster of 2 workers (1 thread each): "
        f"median seconds of {args.repeats} calls per process over {args.rounds} processes per tree (rounds "
        "alternate the trees), the time as a ratio to the baseline's in the same run, and the largest "
        "worker's peak resident set (MiB, VmHWM reset before each call) beside the largest worker's "
        "resident set before the timed calls (numba and the kernel loaded). The trees' results are equal. "
        "Up to ffada85, pair_best scattered every image's codes and masks once (~90 B an image) and each "
        "worker fetched them all; since 09aeca9 each task gets the codes of its pairs' rows only, so what a worker "
        "holds follows its task, and what moves follows the pairs (two rows a pair at most) instead of "
        "images times workers: more bytes than one copy per worker on 2 workers when partners lie anywhere, "
        "fewer on a cluster of many.\n\n")
    body += table(["partners", "tree", "pairs", "seconds", "time ratio", "worker peak MiB", "worker before MiB"], rows)
    kwargs = {"path": args.out} if args.out else {}
    update_section("pair_best", "pair distances on a cluster (candidates stage)", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
