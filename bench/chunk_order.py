"""The multi-index's chunks on real hashes: `python -m bench.chunk_order --catalog OUT/catalog`
(section "multi-index chunks on real hashes").

A multi-index cuts each hash into chunks and looks each query's chunk values up in a table per
chunk; every code in a probed bucket is verified. On random codes a bucket holds U / 2^b codes.
An aHash's bits are pixels, row by row, so a chunk of neighbouring bits is a band of the image, and
bands that are uniform in many images (sky, white backgrounds, dark corners) pile codes into a
few buckets. `pipeline.search.interleave` deals each word's bits into the chunks in turn instead
(chunk j holds bits j, j + c, j + 2c, ...; diagonals where those would be columns), so every chunk
samples the whole image. Distances
are unchanged, so the search's result is too; only the verifications change.

The codes are a real collection's, from a catalog (the images table a run commits: every image's
hash variants), with the default screen settings. Two measurements:

- verifications per query: for each chunking (2 to 6 chunks per word; 2, two 32-bit chunks, is
  beyond the planner's 22-bit cap, counted on --sample-32 rows), the codes whose chunk value lies
  within the chunk's radius of a sampled query row's, summed over the chunks (what the search
  verifies before dropping duplicates), with neighbouring bits ("runs") and dealt ("interleaved"),
  and what uniformly random codes would give (U x flips / 2^b per chunk);
- the one-index search (`candidates.directed_neighbours`, in this process) with either order,
  interleaved over --repeats, medians; the lists compared row for row. The "runs" order is the
  previous code's, restored for the measurement by replacing `interleave` with the identity.
"""
from __future__ import annotations

import argparse
import fnmatch

import numpy as np

from bench.report import interleaved_runs, median, stamp, table, update_section
from pipeline import candidates, catalog, screen, search
from pipeline.config import Config


def _runs(codes, chunks_per_word):  # the chunks as runs of neighbouring bits (the order before)
    return search._as_codes(codes)


def verifications(entries: np.ndarray, queries: np.ndarray, own: list[np.ndarray], chunks_per_word: int,
                  T: int) -> float:
    """Codes verified per query row over all chunks (each probed bucket's size), in the current
    order; `entries`: the distinct codes; `own[i]`: the distinct codes of query row i's own image,
    not counted (the random codes' figure has no such match). Chunks of more than 24 bits are
    counted from the sorted distinct values (a table of every value would not fit)."""
    lengths = search.chunk_geometry(chunks_per_word, entries.shape[1])[0]
    radii = search._radii(lengths, T)
    total = 0
    for ci, (b, r) in enumerate(zip(lengths, radii)):
        if r < 0:
            continue
        values = search.chunk_values(entries, chunks_per_word, ci)
        q = search.chunk_values(queries, chunks_per_word, ci)
        masks = search._flip_masks(b, r)
        if b <= 24:
            hist = np.bincount(values.astype(np.int64), minlength=1 << b)
            for mask in masks:
                total += int(hist[(q ^ mask).astype(np.int64)].sum())
        else:
            distinct, counts = np.unique(values, return_counts=True)
            for value in q:
                probe = value ^ masks
                at = np.minimum(np.searchsorted(distinct, probe), distinct.size - 1)
                total += int(counts[at][distinct[at] == probe].sum())
        for value, mine in zip(q, own):  # (a query's own codes: within radius 0 or a few bits)
            apart = search.chunk_values(mine, chunks_per_word, ci) ^ value
            total -= sum(bin(int(x)).count("1") <= r for x in apart)
    return total / max(len(queries), 1)


def code_set(prepared, use, idx_use, images, sample: int, seed: int):
    """(distinct index codes, sampled query rows, each row's own image's distinct codes) of `images` (bool)."""
    e_img, e_var = np.nonzero(idx_use & images[:, None])
    entries = np.unique(prepared[e_img, e_var], axis=0)
    q_img, q_var = np.nonzero(use & images[:, None])
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(q_img.size, size=min(sample, q_img.size), replace=False))
    first = np.searchsorted(e_img, q_img[pick], side="left")
    last = np.searchsorted(e_img, q_img[pick], side="right")
    own = [np.unique(prepared[e_img[a:b], e_var[a:b]], axis=0) for a, b in zip(first, last)]
    return entries, prepared[q_img[pick], q_var[pick]], own


def uniform(U: int, chunks_per_word: int, W: int, T: int) -> float:
    lengths = search.chunk_geometry(chunks_per_word, W)[0]
    return sum(U * search._n_masks(b, r) / 2.0 ** b for b, r in zip(lengths, search._radii(lengths, T)))


def real_codes(catalog_dir: str):
    """A real collection's hashes from a catalog (the images table a run commits), those the
    default screen made: (images, screen config, codes (N, V, W), variant mask, representatives)."""
    images = catalog.Catalog.load(catalog_dir).images
    if images.empty:
        raise SystemExit(f"{catalog_dir}: no catalog images table there (run `dedupe` over a collection first)")
    config = Config()
    # (the codes the default screen made: another hash size or variant set would not be comparable)
    images = images[(images["screen_fp"] == catalog.fingerprints(config)["screen"])
                    & images["codes"].notna()].reset_index(drop=True)
    if images.empty:
        raise SystemExit(f"{catalog_dir}: no images screened with the default settings there")
    codes, mask = screen.unpack_codes(images, config.screen)
    return images, config.screen, codes, mask, candidates.exact_representatives(images["sha256"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True, help="a catalog folder (OUT/catalog of a run over a real collection)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=3000, help="query rows sampled for the verification counts")
    ap.add_argument("--sample-32", type=int, default=100,
                    help="query rows counted for two 32-bit chunks (each probes up to ~284k values)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", default=None,
                    help="also count over the images whose catalog path matches this pattern alone "
                         "(e.g. '*_original.jpg': the scale folder's photos without their copies)")
    ap.add_argument("--out", default=None, help="benchmarks file (default docs/benchmarks.md)")
    args = ap.parse_args(argv)

    images, cfg, codes, mask, rep = real_codes(args.catalog)
    prepared, use, idx_use = candidates._prepare(codes, mask, cfg, rep)
    sets = {"all": np.ones(len(images), bool)}
    if args.subset:
        sets[args.subset] = np.array([fnmatch.fnmatch(p, args.subset) for p in images["path"]], bool)
        if not sets[args.subset].any():
            raise SystemExit(f"--subset {args.subset!r}: no image's path matches")
    sets = {name: code_set(prepared, use, idx_use, chosen, args.sample, args.seed) for name, chosen in sets.items()}
    W, T = prepared.shape[2], cfg.max_distance
    planned = search.plan_chunks(sets["all"][0].shape[0], W, T)["chunks_per_word"]

    original = search.interleave
    orders = {"runs": _runs, "interleaved": original}

    def use_order(name):
        search.interleave = candidates.interleave = orders[name]

    rows = []
    factors = {name: {} for name in orders}  # (chunks per word, threshold) -> verifications / random codes
    try:
        for which, (entries, queries, own) in sets.items():
            U = entries.shape[0]
            # 3 to 6: what the planner picks from ~10k to 1B codes; 2 (32-bit chunks, beyond the
            # planner's 22-bit cap): what the cost model weighs for 1B, counted on fewer rows
            for c in sorted({planned, 2, 3, 4, 5, 6}):
                for t in (T, cfg.dihedral_max_distance):  # (the plain rows' threshold, the dihedral rows')
                    rows_used = min(len(queries), args.sample_32 if c == 2 else len(queries))
                    got = {}
                    for name in orders:
                        use_order(name)
                        got[name] = verifications(entries, queries[:rows_used], own[:rows_used], c, t)
                    flat = uniform(U, c, W, t)
                    if which == "all":
                        for name in orders:
                            factors[name][(c, t)] = got[name] / flat
                    bits = f"{64 // c}" if 64 % c == 0 else f"{64 // c}-{-(-64 // c)}"
                    rows.append([f"{which}: {U:,} codes, {rows_used:,} query rows",
                                 f"{c} x {bits} bits" + (" (planned)" if c == planned else ""), t,
                                 f"{got['runs']:,.1f}", f"{got['interleaved']:,.1f}", f"{flat:,.2f}",
                                 f"{got['runs'] / flat:.1f}x", f"{got['interleaved'] / flat:.1f}x",
                                 f"{got['interleaved'] / got['runs']:.2f}x" if got["runs"] else "-"])
        def search_in(name):  # the one-index search with that order of bits
            use_order(name)
            return candidates.directed_neighbours(codes, mask, cfg, representatives=rep)[
                ["owner_a", "owner_b", "hash_distance"]]

        # (the warm-up round compiles the kernels: not counted)
        times, _, want = interleaved_runs({name: lambda name=name: search_in(name) for name in orders},
                                          args.repeats, warm_up=True)
    finally:
        search.interleave = candidates.interleave = original

    base = median(times["runs"])
    body = stamp() + (
        f"\nThe hash codes of a real collection ({len(images):,} images of `{args.catalog}`'s images table; "
        f"default screen: {sets['all'][0].shape[0]:,} distinct index codes, {int(use.sum()):,} query rows with the "
        f"variants), threshold {T} (the dihedral variants' {cfg.dihedral_max_distance})"
        + (f"; and the images whose path matches `{args.subset}` alone" if args.subset else "") + ". "
        "*Runs*: each chunk a run of neighbouring bits (a band of the image), the order before; "
        "*interleaved*: each word's bits dealt into the chunks in turn, or in diagonals where turns would be "
        "columns of the image (at 4 chunks; `pipeline.search.interleave`). "
        f"Verifications per query row: over up to {args.sample:,} sampled query rows, the distinct codes in "
        "every probed bucket, summed over the chunks, the row's own image's codes left out, against uniformly "
        "random codes (U x flips / 2^b per chunk, U the distinct codes).\n\n")
    body += table(["codes", "chunks per word", "threshold", "runs", "interleaved", "random codes", "runs / random", "interleaved / random",
                   "interleaved / runs"], rows)
    body += ("\n\nThe one-index search (`candidates.directed_neighbours`, this process, "
             f"{planned} chunks per word as planned), {args.repeats} repeats interleaved, medians; "
             f"the lists equal row for row ({len(want):,} directed rows):\n\n")
    body += table(["order", "median s", "vs runs", "runs (s)"],
                  [[name, median(ts), f"{median(ts) / base:.2f}x", ", ".join(f"{t:.2f}" for t in ts)]
                   for name, ts in times.items()])
    body += ("\n\nThe verification counts grow with U at a fixed share of codes per bucket, so the factors over "
             "random codes carry to larger collections of the same kind; the cost model "
             "(`python -m bench.cost_model`) applies the interleaved order's factor for the chunking it plans to "
             "its projections on real codes.")
    body += "\n\nFactors for bench/cost_model.py (`CHUNK_SKEW`, (chunks per word, threshold): factor): " + "; ".join(
        f"{name} " + ", ".join(f"({c}, {t}): {f:.2f}" for (c, t), f in sorted(fs.items())) for name, fs in factors.items()) + "."
    update_section("chunk_order", "multi-index chunks on real hashes", body,
                   **({"path": args.out} if args.out else {}))
    print(body)


if __name__ == "__main__":
    main()
