"""Cost of the high-recall screen's neighbour search (`screen.mode: hash+embedding`).

    python -m bench.high_recall --n 20000            # flat vs IVF vs blocked numpy top-k

Synthetic L2-normalised 1280-d vectors with near-duplicate structure (groups of 1-5 noisy copies
of a random direction, like MobileNet embeddings of edited copies), written to the feature store
as the pipeline writes them, then searched by `pipeline.candidates.embedding_pairs` ("flat":
exact FAISS inner product; "ivf": inverted lists over float16 vectors) and by a blocked numpy
matmul + argpartition (the no-dependency alternative). Prints seconds, images/s and the IVF
recall of the exact pairs. The embedding cost itself (ms/image) is in the pipeline's run.json
(`timings_s.screen_embed` / `counts.screen_embedded`).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import pandas as pd

from bench.report import stamp, table, update_section
from pipeline import candidates, store
from pipeline.config import ScreenConfig


def make_store(directory: str, n: int, d: int, part_size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=n)
    owner = np.repeat(np.arange(n), sizes)[:n]
    centres = rng.standard_normal((owner.max() + 1, d)).astype(np.float32)
    vecs = centres[owner] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    vecs = np.maximum(vecs, 0)  # ReLU-pooled features are non-negative, as MobileNet's are
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = []
    for p, s in enumerate(range(0, n, part_size)):
        keys = np.arange(s, min(n, s + part_size), dtype=np.int64)
        frame = pd.DataFrame({"key": keys * 8,
                              "embedding": [v.astype("<f4").tobytes() for v in vecs[keys]],
                              "error": pd.Series([None] * len(keys), dtype=object)})
        paths.append(store.write_partition(directory, p, frame))
    return paths


def numpy_topk(parts: list[str], k: int, floor: float, block: int = 2048) -> set:
    idx, vecs = map(np.concatenate, zip(*candidates.iter_embeddings(parts)))
    out = set()
    for s in range(0, len(idx), block):
        sim = vecs[s:s + block] @ vecs.T  # block x N, never N x N
        rows = np.arange(sim.shape[0])
        sim[rows, s + rows] = -np.inf
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        for r, cols in enumerate(top):
            for c in cols:
                if sim[r, c] >= floor:
                    a, b = idx[s + r], idx[c]
                    out.add((min(a, b), max(a, b)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--min-cosine", type=float, default=0.5)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--no-numpy", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each way (after one warm-up round)")
    ap.add_argument("--out", default=None, help="benchmarks markdown file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)
    rows = []
    cfg = dataclasses.replace(ScreenConfig(), mode="hash+embedding", embedding_k=args.k,
                              embedding_min_cosine=args.min_cosine, embedding_nprobe=args.nprobe)
    with tempfile.TemporaryDirectory() as tmp:
        parts = make_store(tmp, args.n, args.d, 256, args.seed)
        print(f"N={args.n} d={args.d} k={args.k} min_cosine={args.min_cosine} "
              f"(flat index {args.n * args.d * 4 / 2**20:.0f} MiB float32, ivf {args.n * args.d * 2 / 2**20:.0f} MiB float16)")
        # each way run --repeats times, the ways taking turns (rotated each round) after one
        # warm-up round: medians, and ratios against the numpy baseline of the same rounds
        ways = {kind: (lambda kind=kind: candidates.embedding_pairs(parts, dataclasses.replace(cfg, embedding_index=kind)))
                for kind in ("flat", "ivf")}
        if not args.no_numpy:
            ways["numpy"] = lambda: numpy_topk(parts, args.k, args.min_cosine)
        times = {w: [] for w in ways}
        results = {}
        names = list(ways)
        for round_no in range(args.repeats + 1):
            for w in names[round_no % len(names):] + names[:round_no % len(names)]:
                t = time.perf_counter()
                got = ways[w]()
                dt = time.perf_counter() - t
                if round_no:  # (round 0: the warm-up)
                    times[w].append(dt)
                results[w] = got if w == "numpy" else set(zip(got["idx_a"].tolist(), got["idx_b"].tolist()))
        med = {w: float(np.median(v)) for w, v in times.items()}
        exact = results["flat"]
        for w in names:
            ratio = f"{med[w] / med['numpy']:.2f}" if "numpy" in med else "–"
            label = w if w != "numpy" else f"blocked numpy top-k (baseline; same pairs as flat: {results[w] == exact})"
            print(f"{w:5s}: median {med[w]:7.2f} s of {args.repeats}  ({args.n / med[w]:8.0f} images/s)  "
                  f"{len(results[w])} pairs, x{ratio} of numpy")
            rows.append([label, f"{med[w]:.2f}", ratio, f"{args.n / med[w]:,.0f}", f"{len(results[w]) / args.n:.2f}"])
        print(f"ivf recall of the exact pairs: {len(results['ivf'] & exact) / max(len(exact), 1):.4f} "
              f"(nprobe {args.nprobe} of {candidates._ivf_nlist(args.n)} lists)")
        ivf_recall = len(results["ivf"] & exact) / max(len(exact), 1)
    body = stamp() + (
        f"\nThe kNN step of `screen.mode: hash+embedding` on {args.n:,} synthetic L2-normalised {args.d}-d vectors "
        f"(clustered, streamed from a Parquet store as in a run), k={args.k}, min cosine {args.min_cosine}. "
        f"IVF (float16, nprobe {args.nprobe}) finds {ivf_recall:.4f} of the exact pairs. `embedding_index: auto` "
        "uses flat up to `embedding_exact_max` images. The embeddings themselves cost what the confirm tier's "
        "embeddings/s says (section above): that is the mode's main extra cost per image. Seconds: the median of "
        f"{args.repeats} runs each, the ways taking turns after a warm-up round; ratio: against the numpy baseline's "
        "median in the same rounds (read the ratios: the machine is shared).\n\n")
    body += table(["index", "median s", "ratio to numpy", "images/s", "pairs per image"], rows)
    kwargs = {"path": args.out} if args.out else {}
    update_section("high_recall", "high-recall screen: embedding kNN", body, **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
