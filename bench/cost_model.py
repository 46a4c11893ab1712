"""The cost model: `python -m bench.cost_model` writes docs/cost-model.md.

Per stage, seconds per image per core and bytes per image in the store, from the measured points
in docs/benchmarks.md (each constant below names its section); every point is predicted back by
the model with its error; then 10M and 1B images are projected to core-hours, hours on a given
number of cores, and storage. The hash search is modelled by multi-index hashing's own cost units
(`pipeline.search.plan_chunks`: bucket probes + expected verifications per query), so its
superlinear growth is in the model, not a straight line through two points.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.search import _PROBE_COST, _chunk_lengths, _n_masks, _radii, plan_chunks

OUT = Path(__file__).resolve().parent.parent / "docs" / "cost-model.md"

# measured points (docs/benchmarks.md; stage seconds are wall seconds on 2 cores), both at a7f718a
# on the same Intel Xeon, 2026-12-06. `write` is the run's wall time outside its timed stages: the
# outputs, the report (its thumbnails made by the verify tier's feature tasks), the publish and
# start-up (run.json times the decide stage and the catalog commit, not the writing)
E2E_10K = dict(name="10k end-to-end", section="end-to-end run (>= 10,000 images), full cascade row", images=10_465, cores=2,
               screen=25.2, candidates=1.2, verify=88.0, confirm=4.1, write=127.3 - 119.0, pairs=68_655)
SCALE_100K = dict(name="100k scale", section="scale: candidates and screen cost at 100k+ images, full cascade row", images=100_625,
                  cores=2, screen=198.0, candidates=3.0, verify=438.0, confirm=13.0, write=681.0 - 654.0,
                  pairs=397_219)
# earlier measurements, predicted back with the model fitted on the points above, not fitted
# themselves: earlier code (no pixel check, no report thumbnails in the feature tasks; confirm on
# Keras before the TFLite runtime) and, for the last, another machine; their `write` was the
# write stage alone, not comparable (None: left out)
EARLIER = [dict(name="10k end-to-end, 78393d0, Intel", section="end-to-end run (>= 10,000 images), earlier run",
                images=10_465, cores=2, screen=16.0, candidates=0.9, verify=47.2, confirm=9.8, write=None, pairs=67_756),
           dict(name="100k scale, 99d50ea, Intel", section="scale: candidates and screen cost at 100k+ images, last table",
                images=100_625, cores=2, screen=168.0, candidates=2.0, verify=245.0, confirm=26.0, write=None,
                pairs=round(3.95 * 100_625)),
           dict(name="100k scale, 17109dd, AMD", section="scale: candidates and screen cost at 100k+ images, "
                "AMD table", images=100_625, cores=2, screen=174.0, candidates=2.0, verify=345.0,
                confirm=9.0, write=None, pairs=round(3.95 * 100_625))]
SEARCH = [dict(section="candidate search (one index)", n=1_000_000, threshold=10, seconds=11.749, cores=2, shards=1),
          dict(section="candidate search (one index)", n=100_000, threshold=10, seconds=0.468, cores=2, shards=1)]
# "sharded candidate search (10,000,000 hashes)" (bench.shard --way sharded, 2026-12-05, quiet
# machine): each predicted with the unit of the same run's one-index search of the first 1M hashes
_SAME_RUN = dict(n=1_000_000, seconds=15.199)
SHARD = [dict(section="sharded candidate search", n=10_000_000, threshold=10, seconds=1045.6, cores=2, shards=2,
              same_run=_SAME_RUN),
         dict(section="sharded candidate search", n=1_000_000, threshold=10, seconds=13.471, cores=2, shards=2,
              same_run=_SAME_RUN)]
# "routed candidate search (2,000,000 hashes)": slices of one multi-index against shards of 250k
# entries and a copy of one index on each of the 2 workers, same run; each predicted with the unit
# of that run's one-index way (median seconds)
_ROUTED_RUN = dict(n=2_000_000, seconds=77.042)
ROUTED = [dict(section="routed candidate search", n=2_000_000, threshold=10, seconds=31.212, cores=2, shards=1,
               routed=True, same_run=_ROUTED_RUN),
          dict(section="routed candidate search", n=2_000_000, threshold=10, seconds=74.195, cores=2,
               shards=8, same_run=_ROUTED_RUN),
          # "routed candidate search (10,000,000 hashes)", with its run's one-index search of 1M
          dict(section="routed candidate search (10M)", n=10_000_000, threshold=10, seconds=562.935, cores=2,
               shards=1, routed=True, same_run=dict(n=1_000_000, seconds=22.863))]
# "multi-index chunks on real hashes" (bench.chunk_order on the 100k scale folder's catalog):
# verifications per query of real codes over random codes', per (chunks per word, threshold), with
# each chunk a run of neighbouring bits (the order before that section) and with the bits
# interleaved (the order since). The folder's 805 photos alone, without their copies, give the same
# factors within ~15 % (7.8 against 6.9 at (3, 10)): it is how photos look, not the copies.
CHUNK_SKEW = dict(section="multi-index chunks on real hashes", codes=30_565,
                  runs={(2, 4): 4885.67, (2, 10): 151.59, (3, 4): 326.99, (3, 10): 30.33, (4, 4): 92.10, (4, 10): 14.82, (5, 4): 52.38,
                        (5, 10): 6.95, (6, 4): 20.90, (6, 10): 5.99},
                  interleaved={(2, 4): 2212.80, (2, 10): 65.34, (3, 4): 30.45, (3, 10): 6.93, (4, 4): 6.55, (4, 10): 3.42, (5, 4): 3.39,
                               (5, 10): 1.70, (6, 4): 2.21, (6, 10): 1.64})
# "sharded embedding kNN": the high-recall mode's kNN, sharded IVF against one IVF index, same run
EMB_SHARD = dict(section="sharded embedding kNN", n=299_776, shards=4, ratio=0.98)
# the driver's peak RSS (the CLI process, which also hosts a local cluster's scheduler), whole
# cascade, default settings, a catalog in OUT, a local cluster of 2 workers; `fit` marks the two
# points the line is drawn through (the widest span), the others are predicted back
DRIVER = [dict(name="5k end-to-end subset", section="driver memory per image (whole cascade), this tree",
               images=5_005, pairs_per_image=6.06, peak_mb=306, fit=False),
          dict(name="10k end-to-end", section="driver memory per image (whole cascade), this tree",
               images=10_465, pairs_per_image=6.59, peak_mb=328, fit=True),
          dict(name="100k scale folder", section="driver memory at the 100k scale folder",
               images=100_625, pairs_per_image=5.09, peak_mb=525, fit=True)]
# (all three measured at b7e010a on an AMD EPYC, 2026-12-06 09:10-09:39 UTC, each beside
# bab69ee in the same run: 302, 323 and 518 MB, the line through those 300 MB + 2.16 kB per
# image. Earlier: 305, 327 and 555 MB at 7ea7ad0 on an Intel Xeon, 301 MB + 2.53 kB, beside
# 5dbf848's 304, 342 and 577 MB, 315 MB + 2.61 kB; 304, 344 and 584 MB at 4b24569, 316 MB +
# 2.66 kB, beside 71f1d92's 318, 367 and 615 MB, 338 MB + 2.75 kB; 385, 438 and 692 MB at
# 09aeca9 on an Intel Xeon whose driver started ~70 MB higher, 409 MB + 2.82 kB; 319, 371 and
# 627 MB at fd1c776 on an AMD EPYC, 341 MB + 2.84 kB; docs/benchmarks.md, driver_memory_notes)
MODEL_LOAD_S = 2.5  # confirm: model build + weights load once per worker process (confirm section)
# bytes per image in the store (measured; pairs.parquet scaled by the candidates per image)
STORE = {
    "note": "Measured: the catalog on the incremental benchmark (2,427 images, section \"incremental runs "
            "with the catalog\": 44.9 MB, of which ORB features 43.4 MB: they exist only for images in a near "
            "pair, so a collection with fewer near pairs stores less; measured before each feature row also "
            "carried the report's thumbnail, ~3.3 kB against ~34 kB for the rest of the row, so ~10 % more now); images.parquet and pairs.parquet of a "
            "default run on the generated eval set (1,050 images: 85,781 B; 5,650 pairs: 101,231 B = 17.9 B "
            "per pair, times 3.95 pairs per image); report thumbnails from the 100k report section (180 MiB); "
            "the high-recall mode's screen embeddings are 1280 float32 per image.",
    "per_image": {"catalog (ORB features, embeddings, images, K-nearest lists, evidence)": 44.9e6 / 2427,
                  "images.parquet": 85_781 / 1050, "pairs.parquet": 17.9 * 3.95,
                  "report (thumbnails + data)": (180 + 8) * 2**20 / 100_000,
                  "high-recall mode only: screen embeddings": 1280 * 4},
    # items that stop growing: the report lists at most report.max_clusters (20,000) clusters, twice
    # the 100k report section's 10,000 (so about twice its 188 MiB, more for larger clusters)
    "cap": {"report (thumbnails + data)": 2 * (180 + 8) * 2**20},
}


def search_units(n: int, threshold: int, shards: int = 1, shard_entries: int | None = None,
                 skew: dict | None = None) -> float:
    """Cost units of a whole search: every image queries every shard (plan_chunks per shard).
    The routed search is one index's cost: shards=1, shard_entries = every entry. `skew`: real
    codes' verifications per query over random codes' for (chunks per word, threshold)
    (CHUNK_SKEW); without it, random codes (the units of `plan_chunks`)."""
    per_shard = shard_entries or -(-n // shards)
    plan = plan_chunks(per_shard, 1, threshold)
    f = 1.0 if skew is None else skew[(plan["chunks_per_word"], threshold)]
    per_query = sum(_n_masks(b, r) * (_PROBE_COST + f * per_shard / 2.0 ** b) for b, r in zip(plan["lengths"], plan["radii"]))
    return n * shards * per_query


def units_per_image(n: int, chunks_per_word: int, skew: dict) -> float:
    """A one-index search's units per image at `chunks_per_word` (not the planner's choice; 2 is
    beyond its 22-bit cap): the plain and trimmed rows at T = 10, the 7 dihedral rows at T = 4,
    over 2n entries, real codes' verifications (`skew`)."""
    lengths = _chunk_lengths(chunks_per_word)
    out = 0.0
    for rows, t in ((2, 10), (7, 4)):
        out += rows * sum(_n_masks(b, r) * (_PROBE_COST + skew[(chunks_per_word, t)] * 2 * n / 2.0 ** b)
                          for b, r in zip(lengths, _radii(lengths, t)))
    return out


def fit():
    pts = [E2E_10K, SCALE_100K]
    m = {}
    m["screen"] = sum(p["screen"] * p["cores"] for p in pts) / sum(p["images"] for p in pts)
    m["verify_pair"] = sum(p["verify"] * p["cores"] for p in pts) / sum(p["pairs"] for p in pts)
    # confirm: the model load once per worker plus a cost per image, the latter from the larger run
    m["confirm"] = (SCALE_100K["confirm"] * 2 - MODEL_LOAD_S * 2) / SCALE_100K["images"]
    m["write"] = sum(p["write"] * p["cores"] for p in pts) / sum(p["images"] for p in pts)
    one = SEARCH[0]
    m["unit"] = one["seconds"] * one["cores"] / search_units(one["n"], one["threshold"])
    return m


def predict(m, p) -> dict:
    c = p["cores"]
    return {"screen": m["screen"] * p["images"] / c, "verify": m["verify_pair"] * p["pairs"] / c,
            "confirm": (m["confirm"] * p["images"] + MODEL_LOAD_S * c) / c, "write": m["write"] * p["images"] / c}


def pct(pred, meas) -> str:
    return f"{100 * (pred - meas) / meas:+.0f} %"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--pairs-per-image", type=float, default=3.95, help="near candidates per image (100k run: 3.95)")
    ap.add_argument("--cores-10m", type=int, default=64)
    ap.add_argument("--cores-1b", type=int, default=2000)
    args = ap.parse_args(argv)
    m = fit()
    lines = ["# Cost model", "",
             "Written by `python -m bench.cost_model` from the measured points in "
             "[benchmarks.md](benchmarks.md) (2-core machine, shared; each point's section is named). "
             "Per stage: seconds per image per core (core-seconds divided by images), then each measured "
             "point predicted back, then 10M and 1B images projected.", "",
             "## Per stage", "",
             "| stage | model | per image per core | from |", "|---|---|---|---|",
             f"| scan + screen (decode, sha256, 9 hashes) | a x images | {1e3 * m['screen']:.2f} ms | 10k and 100k end-to-end runs (pooled) |",
             f"| candidates: hash search | MIH cost units x {m['unit'] * 1e9:.2f} ns | see below (grows with N) | 1M-hash search |",
             f"| verify (ORB features + match + RANSAC, pixel check) | b x pairs, pairs = {args.pairs_per_image} x images | "
             f"{1e3 * m['verify_pair']:.2f} ms per pair = {1e3 * m['verify_pair'] * args.pairs_per_image:.2f} ms per image | 10k and 100k runs (pooled) |",
             f"| confirm (MobileNet on pairs ORB left open) | {MODEL_LOAD_S} s per worker + c x images | {1e3 * m['confirm']:.2f} ms | 100k run |",
             f"| decide, catalog commit, outputs, report (wall time outside the other stages) | d x images | {1e3 * m['write']:.3f} ms | 10k and 100k runs (pooled) |", ""]
    lines += ["The hash search: one query costs `plan_chunks(U, W, T)['cost_per_query']` units (bucket probes "
              "x 4 + expected verifications; U = index entries), so a one-index search of N codes costs "
              "N x cost(N) units and the sharded search (S shards of N/S) N x S x cost(N/S): the probes are paid "
              "once per shard. Unit = core-seconds of the 1M one-index search / its units. Those units are "
              "random codes'. Real aHash codes crowd some buckets (uniform bands of an image, alike across "
              "photos): the projections multiply the verifications by the factor measured on real codes for "
              f"the chunking and threshold (benchmarks.md, \"{CHUNK_SKEW['section']}\": with the chunks' bits "
              f"interleaved, {CHUNK_SKEW['interleaved'][(3, 10)]:.1f}x random codes' at 3 chunks and T = 10, "
              f"{CHUNK_SKEW['interleaved'][(3, 4)]:.0f}x at T = 4, the dihedral rows' threshold, on a far smaller "
              "base); the measured points below are random codes' (synthetic) or predicted as such.", ""]
    lines += ["## Measured points predicted back", "",
              "| point | stage | measured s | model s | error |", "|---|---|---|---|---|"]
    for p in (E2E_10K, SCALE_100K, *EARLIER):
        pr = predict(m, p)
        for st in ("screen", "verify", "confirm", "write"):
            if p[st] is None:
                continue
            lines.append(f"| {p['images']:,} images ({p['name']}) | {st} | {p[st]:.1f} | {pr[st]:.1f} | {pct(pr[st], p[st])} |")
        # the whole candidates stage of a real run: the hash search (plain + trimmed rows at T = 10,
        # 7 dihedral rows at T = 4, 2 index entries per image) is most of it
        n = p["images"]
        pred = (2 * search_units(n, 10, 1, 2 * n) + 7 * search_units(n, 4, 1, 2 * n)) * m["unit"] / p["cores"]
        lines.append(f"| {n:,} images ({p['name']}) | candidates (real hashes, 9 variants) | {p['candidates']:.1f} | "
                     f"{pred:.1f} | {pct(pred, p['candidates'])} |")
    for s in SEARCH + SHARD + ROUTED:
        unit = m["unit"]
        note = ""
        if "same_run" in s:  # a loaded machine: the unit from the one-index search of the same run
            b = s["same_run"]
            unit = b["seconds"] * s["cores"] / search_units(b["n"], s["threshold"])
            note = f"; unit from the same run's one-index {b['n']:,}: {unit * 1e9:.1f} ns"
        pred = search_units(s["n"], s["threshold"], s["shards"]) * unit / s["cores"]
        what = ("routed: slices of one index" if s.get("routed") else
                "one index" if s["shards"] == 1 else f"sharded, {s['shards']} shards")
        lines.append(f"| {s['n']:,} hashes, T = {s['threshold']} ({what}{note}) | search | {s['seconds']:.1f} | "
                     f"{pred:.1f} | {pct(pred, s['seconds'])} |")
    lines += ["", "Fitted points: the 1M one-index search (the unit) and confirm at 100k are 0 % by "
              "construction; screen, verify and write are pooled over the 10k and 100k runs, so their errors "
              "show how well one per-image (per-pair) figure serves both. Independent checks: the 100k search, "
              "the candidates stage of both runs, confirm at 10k and the sharded and routed searches. Confirm at 10k is "
              "under-predicted: the 2.5 s per worker counts the model load but not importing TensorFlow, "
              "a fixed cost that weighs at 10k and vanishes at scale. Write (the run's wall time outside its "
              "timed stages: the outputs, the report, the publish and the start-up) is under-predicted at 10k "
              "for the same reason: the start-up is a fixed cost. The real candidates stage "
              "also does exact pairs, the pair distances and Python around the search: the model counts the "
              "search only, over random codes and every entry: the 100k folder's entries collapse into "
              f"{CHUNK_SKEW['codes']:,} distinct codes (its copies), which the model does not know, and its real codes "
              "verify more per query than random ones (the projections below count that); at 100k the model is "
              "half the measured stage, at 10k the stage is mostly fixed costs. The 10M searches (sharded, routed) each take the unit of "
              "their own run's one-index search of the first 1M hashes: the sharded 10M search is under-predicted "
              "by 25 % (the shards' table builds and the merge, which the model does not count; its 1M search, "
              "whose two shards fit the caches better than one index, is over-predicted), the routed one "
              "over-predicted. Measured back to back on a quiet machine, routed (each slice then built and "
              "searched in tasks of its own) took 0.49x the sharded search's time at 10M (512 against 1,046 s; "
              "0.43x with each divided by its run's 1M one-index time); the model says 0.68x (its units: one "
              "index's probes and verifications against two shards'). The routed point listed is the later "
              "run, each worker's slices held as one index (563 s on a slower hour: its 1M one-index search "
              "took 22.9 s against 15.2-17.4 s). The earlier points (the model was fitted on the first two "
              "until 2026-12-06; not fitted now) are over-predicted by 30-83 % for verify: that tier did less "
              "per image then (no pixel check, and the report's thumbnails were made by the report for the "
              "images it shows, not by the feature tasks for every image in a near pair), and the machines "
              "differ: on this one, in the same hour, 78393d0 (the 10k point's code) took 64.3 s in the "
              "verify stage against 78.7 s for a7f718a's parent (`--tiers verify`, benchmarks.md, "
              "end_to_end), where the 10k point says 47.2 s, so about half of that gap is the machine (a "
              "per-core rate is the machine's, and so are the projections' core-hours). The 99d50ea point's "
              "confirm ran on Keras, before the TFLite runtime. The 2M-hash points (routed, sharded) take the unit "
              "of the same run's one-index way (a copy of one index on each worker), which ran at about twice "
              "its units' time against the others: one index moves between all its chunks' tables for each query "
              "row, while a slice walks one chunk's table for a whole partition and an index over 250k entries "
              "fits the caches (in-process at 2M: one index 81 s, slices 46-50 s whether one per chunk or of "
              "250k entries); so both are over-predicted there.", ""]
    # projections
    rows = []
    for n, cores in ((10_000_000, args.cores_10m), (1_000_000_000, args.cores_1b)):
        pairs = args.pairs_per_image * n
        shards = max(1, -(-2 * n // 5_000_000))  # plain + trimmed entries per image, default shard size
        # per image: plain + trimmed rows at T = 10, the 7 dihedral rows at T = 4; routed (the default
        # past search_shard_size): one index's probes over all 2n entries; sharded: every shard's
        # (real codes: the interleaved chunks' skew over random codes, CHUNK_SKEW)
        skew = CHUNK_SKEW["interleaved"]
        sharded_cs = (2 * search_units(n, 10, shards, 5_000_000, skew)
                      + 7 * search_units(n, 4, shards, 5_000_000, skew)) * m["unit"]
        search_cs = (2 * search_units(n, 10, 1, 2 * n, skew) + 7 * search_units(n, 4, 1, 2 * n, skew)) * m["unit"]
        random_cs = (2 * search_units(n, 10, 1, 2 * n) + 7 * search_units(n, 4, 1, 2 * n)) * m["unit"]
        runs = CHUNK_SKEW["runs"]  # (the chunks as runs of neighbouring bits, before they were interleaved)
        runs_cs = (2 * search_units(n, 10, 1, 2 * n, runs) + 7 * search_units(n, 4, 1, 2 * n, runs)) * m["unit"]
        stages = {"screen": m["screen"] * n, "candidates (routed)": search_cs,
                  "verify": m["verify_pair"] * pairs, "confirm": m["confirm"] * n, "decide, catalog, outputs, report": m["write"] * n}
        total = sum(stages.values())
        rows.append((n, cores, shards, stages, total, sharded_cs, random_cs, runs_cs))
    lines += ["## Projections", "",
              f"Default settings (aHash with 7 dihedral + 1 trimmed variant, T = 10, K = 15), "
              f"{args.pairs_per_image} near candidates per image (the 100k run's figure; it depends on the "
              "collection), index shards of 5M entries (2 entries per image). Core-hours are at this machine's "
              "per-core speed.", "",
              "| images | stage | core-hours | share |", "|---|---|---|---|"]
    for n, cores, shards, stages, total, *_ in rows:
        for st, cs in stages.items():
            lines.append(f"| {n:,} | {st} | {cs / 3600:,.1f} | {100 * cs / total:.0f} % |")
        lines.append(f"| {n:,} | **total** | **{total / 3600:,.0f}** | on {cores:,} cores: **{total / 3600 / cores:.1f} h** |")
    if STORE:
        lines += ["", "## Storage", "", STORE["note"], "",
                  "| item | bytes per image | 10M images | 1B images |", "|---|---|---|---|"]
        for item, b in STORE["per_image"].items():
            cap = STORE.get("cap", {}).get(item)
            if cap is None:
                lines.append(f"| {item} | {b:,.0f} | {b * 1e7 / 1e9:,.1f} GB | {b * 1e9 / 1e12:,.1f} TB |")
            else:  # grows per image up to its cap
                lines.append(f"| {item}, at most report.max_clusters clusters | {b:,.0f} up to {cap / 1e9:,.1f} GB | "
                             f"≤ {min(b * 1e7, cap) / 1e9:,.1f} GB | ≤ {min(b * 1e9, cap) / 1e9:,.1f} GB |")
    a, b = [p for p in DRIVER if p["fit"]]
    per_image_mb = (b["peak_mb"] - a["peak_mb"]) / (b["images"] - a["images"])  # (MB = 1e6 bytes, as measured)
    fixed_mb = a["peak_mb"] - per_image_mb * a["images"]
    per_image_kb = per_image_mb * 1e3
    lines += ["", "## Driver memory", "",
              "The driver (the `dedupe` process, which also hosts a local cluster's scheduler) still holds a row "
              "per image and per candidate pair (docs/design-notes.md, \"Not done\"), so its peak grows with the "
              "folder: a fixed part (imports, the cluster) plus bytes per image, drawn through "
              f"the {a['images']:,} and {b['images']:,}-image points (peak RSS, default settings, a catalog, a local "
              "cluster of 2 workers; measured on an AMD EPYC, its points each beside the previous code's in the "
              "same run, whose line is 300 MB + 2.16 kB x images: the K-nearest lists a catalog keeps no longer "
              "pass through the driver, which lowers the stages between the search and the commit, not the peak, "
              "docs/benchmarks.md, driver_memory_notes). Bytes per image depend on the candidate pairs per image (each pair's row, "
              "its evidence at the catalog commit), so the points' densities are listed. With the scheduler in "
              "a process of its own (an external `dask scheduler`, as on a cluster) the driver's peak is the "
              "same within the noise (363 and 433 MB against 376 and 426 MB at 5,005 and 10,465 images, same "
              "run; benchmarks.md, driver memory with the scheduler in its own process) and the scheduler "
              "process stays at ~270 MB at both sizes: the per-image bytes are the pipeline's own tables, "
              "not the scheduler's.", "",
              f"Model: **{fixed_mb:,.0f} MB + {per_image_kb:,.2f} kB x images**.", "",
              "| point | pairs / image | measured MB | model MB | error | from |", "|---|---|---|---|---|---|"]
    for p in DRIVER:
        pred = fixed_mb + per_image_mb * p["images"]
        lines.append(f"| {p['images']:,} images ({p['name']}{', fitted' if p['fit'] else ''}) | "
                     f"{p['pairs_per_image']:.2f} | {p['peak_mb']:,} | {pred:,.0f} | {pct(pred, p['peak_mb'])} | "
                     f"benchmarks.md, {p['section']} |")
    lines += ["", "| images | driver peak (model) |", "|---|---|"]
    for n in (1_000_000, 10_000_000, 1_000_000_000):
        lines.append(f"| {n:,} | {(fixed_mb + per_image_mb * n) / 1e3:,.1f} GB |")
    lines += ["", "## What the model says", ""]
    n1, _, s1, st1, t1, sharded1, random1, runs1 = rows[1]
    runs0, search0 = rows[0][7], rows[0][3]["candidates (routed)"]
    lines += [
        f"- Per-image decoding and ORB dominate up to ~10M images: screen + verify are ~{100 * (rows[0][3]['screen'] + rows[0][3]['verify']) / rows[0][4]:.0f} % of the work at 10M.",
        f"- At 1B the hash search is {100 * st1['candidates (routed)'] / t1:.0f} % of the work as routed (slices of "
        f"one multi-index: each probe made once, as in one index, {st1['candidates (routed)'] / 3600:,.0f} core-hours "
        f"on real codes; {random1 / 3600:,.0f} on random codes; {runs1 / 3600:,.0f} with the chunks as runs of "
        f"neighbouring bits, as before they were interleaved, and at 10M {runs0 / 3600:,.1f} against "
        f"{search0 / 3600:,.1f}); "
        f"with whole index shards (`search_sharding: sharded`, every query probing each of {s1:,} shards of 5M "
        f"entries) it would be {sharded1 / 3600:,.0f} core-hours, {100 * sharded1 / (t1 - st1['candidates (routed)'] + sharded1):.0f} % "
        "of the work. What is left at 1B: 64-bit hashes at distance 10 make every query verify millions of codes "
        "(at random ~1 code in 650 is within 2-3 bits of the query on one of its three 21-22-bit chunks, and real "
        "codes crowd the buckets several times more, even with the chunks' bits interleaved); a longer hash "
        "(more bits per chunk at the same threshold) is what would cut that, and chunks are capped at 22 bits "
        "for their offsets tables, a cap the slices could lift (a slice's table covers its prefix's values only): "
        f"two 32-bit chunks would take {units_per_image(n1, 3, CHUNK_SKEW['interleaved']) / units_per_image(n1, 2, CHUNK_SKEW['interleaved']):.1f}x "
        "fewer units per image than three at 1B with their measured factors (real codes crowd long chunks "
        f"more: {CHUNK_SKEW['interleaved'][(2, 10)]:.0f}x random codes' verifications at T = 10; "
        f"{units_per_image(n1, 3, {k: 1 for k in CHUNK_SKEW['interleaved']}) / units_per_image(n1, 2, {k: 1 for k in CHUNK_SKEW['interleaved']}):.1f}x "
        "on random codes), but each query then makes ~284k probes at T = 10, past the multi-index's 200k limit; "
        "not built. The units over-predict the routed search on random codes (the 2M-hash points above): a "
        "slice walks one chunk's table for a whole partition of queries, which stays in the caches, where one "
        "index moves between all its chunks' tables for each query row.",
        "- Storage is dominated by the ORB features kept in the catalog for images in a near pair.",
        "- The `d x images` line for decide, the catalog commit, the outputs and the report holds only while "
        "work done once per part, row group or task looks at that part alone (docs/design-notes.md, \"Work per "
        "part\"). Until 2026-12-06 the catalog's neighbours table turned every image's path into a Python "
        "string for each of its row groups, and a compaction scanned every feature row for each part: "
        "O(images x parts), invisible at the 10k and 100k points the line is drawn through, 31.9 s and 106.8 s "
        "at 1M synthetic images, 3.7 s and 13.0 s since (docs/benchmarks.md, section catalog_commit), so "
        "~100x those at 10M had they stayed.",
        f"- Memory: each worker's needs are bounded by its shard and task sizes (the search and kNN are sharded, the pair distances sent in chunks with their own rows' codes), the "
        f"driver's grow: ~{(fixed_mb + per_image_mb * 1e7) / 1e3:,.0f} GB at 10M images, "
        f"~{(fixed_mb + per_image_mb * 1e9) / 1e6:,.0f} TB at 1B. A 10M-image run needs a driver host with that "
        "much memory; 1B needs the driver's per-image and per-pair rows moved onto the workers (the screen's "
        "partitions kept there, pairs decided in partitions, the catalog partitioned by content hash: "
        "docs/design-notes.md, \"Not done\"); not built yet.",
        f"- Not projected: the high-recall mode (the projection is the default settings'). Its embedding kNN is "
        f"sharded too (section \"{EMB_SHARD['section']}\": {EMB_SHARD['n']:,} vectors in {EMB_SHARD['shards']} IVF "
        f"shards took {EMB_SHARD['ratio']:.2f}x one index's time, the same pairs). The shards share one coarse "
        "quantizer and each query is assigned to its `embedding_nprobe` lists once, so the lists scanned per query "
        "are one index's however many shards there are; what grows with the shard count is one small search call "
        f"and one k + 1 merge per shard and partition: at 1B in shards of 500k ({1_000_000_000 // 500_000:,} "
        "shards) that is 2,000 calls per partition, not measured at that scale."]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
