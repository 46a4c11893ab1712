"""Per-partition steps of the candidate search at a size no real folder here reaches, against
another source tree in the same run: work done once per partition (or per wave, or per shard)
must look at that partition's rows only, or it grows as collection x partitions.

    python -m bench.worker_steps --baseline DIR [--rounds 3] [--out docs/benchmarks.md]

Steps, each on synthetic data shaped as a run's and called as the workers call them:
- `route_rows`: one hash partition's 200,000 K-nearest rows routed to 64 pair blocks in 8 waves
  (`candidates._route_rows`, once per wave, as `Lists.pairs` does);
- `part_redo`: a 20,000-image partition of a 10M-image collection marking its images among
  1,000,000 gained ids (`candidates._part_redo`, once per partition in a re-run);
- `owner_reach`: a re-run's incremental search with `screen.hash=phash` over 218k images in 109
  partitions, 20,000 added (`candidates.sharded_incremental_neighbours`, in-process).
Each measurement is a fresh process (the tree given by `--baseline`, e.g. `git archive COMMIT |
tar -x -C DIR`, or this one), the two alternating each round: wall seconds (of the steps under a
second, the median of REPEATS calls in the process), medians over rounds;
both trees must give the same results (a digest of each step's output).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STEPS = ("route_rows", "part_redo", "owner_reach")
REPEATS = 7  # calls per process of the steps that take well under a second (their median)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _timed(step, repeats: int = REPEATS):
    """(median wall seconds over `repeats` calls, the last call's result)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def route_rows() -> tuple[float, str]:
    import pandas as pd

    from pipeline import candidates
    rng = np.random.default_rng(0)
    img = np.sort(rng.choice(10_000_000, 20_000, replace=False)).astype(np.int64)
    part = (img, rng.integers(0, 2**62, (img.size, 9, 1)).astype(np.uint64), np.ones((img.size, 9), bool),
            np.zeros(img.size, np.int64))
    o = np.repeat(img, 10)
    rows = pd.DataFrame({"owner_a": o, "owner_b": rng.integers(0, 10_000_000, o.size).astype(np.int64)})
    starts = np.linspace(0, 10_000_000, 65)[:-1].astype(np.int64)
    seconds, out = _timed(lambda: [candidates._route_rows(part, rows, starts, int(w[0]), int(w[-1]) + 1)
                                   for w in np.array_split(np.arange(64), 8)])
    pieces = [x for wave in out for x in wave if x is not None]
    return seconds, _digest(*[a for x in pieces for a in x])


def part_redo() -> tuple[float, str]:
    import pandas as pd

    from pipeline import candidates
    rng = np.random.default_rng(1)
    img = np.sort(rng.choice(10_000_000, 20_000, replace=False)).astype(np.int64)
    same = rng.random(img.size) < 0.95
    previous = pd.DataFrame({"owner_a": img, "owner_b": np.roll(img, 1), "nb_same": rng.random(img.size) < 0.99})
    gained = np.unique(rng.integers(0, 10_000_000, 1_000_000))
    seconds, got = _timed(lambda: candidates._part_redo((img, None, None, None), (same, ~same), previous, gained))
    return seconds, _digest(got["redo"], got["lost"], got["gained"])


def _clustered(rng, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash codes of noisy copies of some centres: 9 variants of 64 bits (any hash's layout)."""
    bits = centres[rng.integers(0, len(centres), n)][:, None, :] ^ (rng.random((n, 9, 64)) < 0.06)
    codes = np.packbits(bits, axis=2).view(">u8").astype(np.uint64)
    mask = np.ones((n, 9), bool)
    mask[:, 8] = rng.random(n) < 0.3
    return codes, mask


def owner_reach() -> tuple[float, str]:
    from bench.incremental import grown_collection
    from pipeline import candidates
    from pipeline.config import ScreenConfig
    rng = np.random.default_rng(3)
    n0, n_new = 200_000, 20_000
    centres = rng.random((n0 // 4, 64)) < 0.5
    cfg = dataclasses.replace(ScreenConfig(), max_candidates=5, max_distance=10, hash="phash")
    codes0, mask0 = _clustered(rng, n0, centres)
    prev = candidates.directed_neighbours(codes0, mask0, cfg)
    new_codes, new_mask = _clustered(rng, n_new, centres)
    codes, mask, previous, same = grown_collection(codes0, mask0, prev, rng.random(n0) > 0.01, new_codes,
                                                   new_mask, rng.random(n_new) * n0)
    p_codes, use, idx_use = candidates._prepare(codes, mask, cfg, None)
    parts = candidates.hash_partitions(p_codes, use, idx_use, 2000)
    split = candidates.split_previous(previous, parts, same & use[:, 0])
    t = time.perf_counter()
    got, stats = candidates.sharded_incremental_neighbours(parts, split, [same[p[0]] for p in parts], cfg)
    seconds = time.perf_counter() - t
    return seconds, _digest(got.to_numpy(np.int64), np.array(sorted(stats.items()), dtype=object).astype(str))


def measure() -> dict:
    out = {}
    for name in STEPS:
        seconds, digest = globals()[name]()
        out[name] = {"seconds": seconds, "digest": digest}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another source tree (e.g. a git archive of a commit)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child's measurement)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure()))
        return 0
    from bench.report import median, run_script_in_tree, stamp, table, update_section
    trees = {"baseline": Path(args.baseline).resolve(), "this tree": REPO}
    found: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            # (this file run with the tree's `pipeline` and `bench` packages)
            out = run_script_in_tree(__file__, tree, ["--baseline", str(tree), "--one"],
                                     f"bench.worker_steps --one ({label})")
            found[label].append(json.loads(out.strip().splitlines()[-1]))
            print(label, found[label][-1], flush=True)
    for name in STEPS:
        digests = {r[name]["digest"] for rs in found.values() for r in rs}
        if len(digests) != 1:
            raise SystemExit(f"{name}: the trees' results differ: {sorted(digests)}")
    rows = []
    for name in STEPS:
        base = median([r[name]["seconds"] for r in found["baseline"]])
        for label in trees:
            m = median([r[name]["seconds"] for r in found[label]])
            rows.append([name, label, f"{m:.4f}", f"{m / base:.2f}" if m >= base / 100 else f"{m / base:.4f}"])
    body = stamp() + (
        f"\n`python -m bench.worker_steps --baseline <tree> --rounds {args.rounds}`. Per-partition steps "
        "of the candidate search on synthetic data (bench/worker_steps.py says what each is); each "
        f"measurement a fresh process (the steps but owner_reach: the median of {REPEATS} calls in it), "
        f"the trees alternating, medians of {args.rounds} rounds. Both trees "
        "gave the same results (a digest of each step's output).\n\n")
    body += table(["step", "tree", "seconds", "time / baseline's"], rows)
    kwargs = {"path": args.out} if args.out else {}
    update_section("worker_steps", "per-partition steps of the candidate search at 10M-image shapes", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
