"""The catalog commit's per-image work on the driver at a size no real folder here reaches: the
neighbours table (K-nearest lists by path) and the images table, made and written as
`Catalog.commit` makes and writes them, and a compaction of the feature parts (`Catalog.compact`),
against another source tree in the same run.

    python -m bench.catalog_commit --baseline DIR [--images 1000000] [--rows-per-image 5]
                                   [--rounds 3] [--out docs/benchmarks.md]

Synthetic rows shaped as a run's: the images' paths, sha256 and formats as pandas 3 `str` (Arrow)
columns, a 105-byte hash code per image, `--rows-per-image` list rows per image (a 100,625-file run
has 5.1) written first as the workers write them (`candidates.SavedLists`, one file per 64k rows),
then `catalog.neighbours_table` of those files and `catalog.images_table` of the frame, each
written by `catalog._Files.write_table` into a temporary folder; then one feature row per two
images in parts of FEATURE_PART_ROWS rows (small parts, as nightly runs leave them: past
`catalog.COMPACT_MAX_PARTS` of them a commit compacts), compacted. Each measurement is a fresh
process (the tree given by `--baseline`, e.g. `git archive COMMIT | tar -x -C DIR`, or this one),
the two alternating each round: wall seconds and the process's peak RSS above its level before
the step (VmHWM reset), medians over rounds; the files made must be the same for both trees.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
LIST_FILE_ROWS = 65_536
FEATURE_PART_ROWS = 100  # (a small part: under catalog.COMPACT_ROWS_PER_PART // 2)


def synthetic_images(n: int, seed: int = 0) -> pd.DataFrame:
    """An images frame with the columns and dtypes the commit's `images_table` reads in a run."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return pd.DataFrame({
        "path": pd.Series([f"folder-{k % 997:03d}/sub {k % 13}/image-{k:09d}.jpg" for k in i], dtype="str"),
        "bytes": rng.integers(10_000, 5_000_000, n), "mtime_ns": rng.integers(1 << 60, 1 << 61, n),
        "etag": pd.Series(np.full(n, None, dtype=object), dtype=object),
        "sha256": pd.Series([hashlib.sha256(int(k).to_bytes(8, "little")).hexdigest() for k in i], dtype="str"),
        "width": pd.array(rng.integers(64, 4096, n), dtype="Int64"),
        "height": pd.array(rng.integers(64, 4096, n), dtype="Int64"),
        "format": pd.Series(np.where(i % 5 == 0, "PNG", "JPEG"), dtype="str"),
        "hash": pd.Series(np.full(n, "ahash", dtype=object), dtype="str"),
        "error": pd.Series(np.full(n, None, dtype=object), dtype=object),
        "codes": pd.Series([rng.bytes(105) for _ in range(n)], dtype=object),
        "variant_mask": np.full(n, 8191, dtype=np.int64)})


def synthetic_lists(n: int, per_image: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n, dtype=np.int64), per_image)
    return pd.DataFrame({"owner_a": owner, "owner_b": rng.integers(0, n, owner.size),
                         "hash_distance": rng.integers(0, 11, owner.size).astype(np.int16)})


def measure(n: int, per_image: int) -> dict:
    """In this process (the tree first on sys.path): each table's seconds, peak RSS above its
    start, and the file's sha256."""
    import pyarrow.parquet as pq

    from bench.shard import reset_hwm, vm_hwm
    from pipeline import candidates, catalog, cli
    cli.driver_arrow_pool()  # (as the CLI's driver)
    images = synthetic_images(n)
    lists = synthetic_lists(n, per_image)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="dedupe-bench-commit-") as tmp:
        paths, rows = [], []
        for j, start in enumerate(range(0, len(lists), LIST_FILE_ROWS)):
            paths.append(str(Path(tmp) / "lists" / f"lists-{j:06d}.parquet"))
            rows.append(candidates._write_lists(lists.iloc[start:start + LIST_FILE_ROWS], paths[-1]))
        del lists
        saved = candidates.SavedLists(str(Path(tmp) / "lists"), paths, rows)
        files = catalog._Files(Path(tmp) / "catalog")
        for name, make in (("neighbours", lambda: catalog.neighbours_table(saved, images)),
                           ("images", lambda: catalog.images_table(images, {"screen": "0123456789abcdef"}))):
            if not reset_hwm():
                raise SystemExit("cannot reset VmHWM (/proc/self/clear_refs): Linux only")
            start_rss, started = vm_hwm(), time.perf_counter()
            entry = files.write_table(f"tables/{name}.parquet", make())
            out[name] = {"seconds": time.perf_counter() - started, "peak": vm_hwm() - start_rss,
                         "sha256": entry["sha256"],
                         "rows": pq.ParquetFile(Path(tmp) / "catalog" / entry["file"]).metadata.num_rows}
        saved = images = None  # (let go of before the compaction)
        out["compaction"] = compaction(catalog.Catalog(Path(tmp) / "catalog"), n // 2, reset_hwm, vm_hwm)
    return out


def compaction(cat, n_rows: int, reset_hwm, vm_hwm) -> dict:
    """`cat.compact` of n_rows feature rows in parts of FEATURE_PART_ROWS: seconds, peak, and a
    digest of what it made (each row's key and new part, the new parts' bytes)."""
    from pipeline import store
    rng = np.random.default_rng(2)
    keys = np.arange(n_rows, dtype=np.int64) * 8
    parts = []
    for j, start in enumerate(range(0, n_rows, FEATURE_PART_ROWS)):
        chunk = keys[start:start + FEATURE_PART_ROWS]
        path = store.write_partition(cat.feature_dir("orb", "f1", f"run-{j // 64:05d}"), j % 64,
                                     pd.DataFrame({"key": chunk, "blob": [rng.bytes(32) for _ in chunk]}))
        parts += [cat.files.rel(path)] * len(chunk)
    features = pd.DataFrame({"kind": "orb", "fp": "f1",
                             "sha256": pd.Series([f"{k:064x}" for k in keys], dtype="str"),
                             "transform": np.zeros(n_rows, np.int8), "key": keys,
                             "part": pd.Series(parts, dtype=object),  # (object: a run's, with new rows)
                             "error": pd.Series(np.full(n_rows, None, dtype=object), dtype=object)})
    del parts
    if not reset_hwm():
        raise SystemExit("cannot reset VmHWM (/proc/self/clear_refs): Linux only")
    start_rss, started = vm_hwm(), time.perf_counter()
    kept, done = cat.compact(features, "t")
    seconds, peak = time.perf_counter() - started, vm_hwm() - start_rss
    digest = hashlib.sha256(kept[["key", "part"]].sort_values("key").to_csv(index=False).encode())
    for rel in sorted(set(kept["part"])):
        digest.update(cat.files.read(rel))
    return {"seconds": seconds, "peak": peak, "sha256": digest.hexdigest(), "rows": n_rows,
            "parts": f"{done[0]['parts_before']:,} -> {done[0]['parts_after']:,}" if done else "not compacted"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another source tree (e.g. a git archive of a commit)")
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--rows-per-image", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child's measurement)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.images, args.rows_per_image)))
        return 0
    from bench.report import median, run_script_in_tree, stamp, table, update_section
    trees = {"baseline": Path(args.baseline).resolve(), "this tree": REPO}
    found: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            # (this file run with the tree's `pipeline` package)
            out = run_script_in_tree(__file__, tree, ["--baseline", str(tree), "--one", "--images", str(args.images),
                                                      "--rows-per-image", str(args.rows_per_image)],
                                     f"bench.catalog_commit --one ({label})")
            found[label].append(json.loads(out.strip().splitlines()[-1]))
            print(label, found[label][-1], flush=True)
    steps = ("neighbours", "images", "compaction")
    for name in steps:
        digests = {r[name]["sha256"] for rs in found.values() for r in rs}
        if len(digests) != 1:
            raise SystemExit(f"the {name} tables differ between the trees: {sorted(digests)}")
    rows = []
    for name in steps:
        base = {k: median([r[name][k] for r in found["baseline"]]) for k in ("seconds", "peak")}
        for label in trees:
            m = {k: median([r[name][k] for r in found[label]]) for k in ("seconds", "peak")}
            what = f"{found[label][0][name]['rows']:,}" + (f" ({found[label][0][name]['parts']} parts)"
                                                            if name == "compaction" else "")
            rows.append([name, label, what, f"{m['seconds']:.2f}",
                         f"{m['seconds'] / base['seconds']:.2f}", f"{m['peak'] / 2**20:.0f}"])
    body = stamp() + (
        f"\n`python -m bench.catalog_commit --baseline <tree> --images {args.images} --rows-per-image "
        f"{args.rows_per_image} --rounds {args.rounds}`. Synthetic tables of {args.images:,} images "
        f"({args.rows_per_image} K-nearest rows each, read back from the list files the workers write), "
        f"made and written as the catalog commit does, and {args.images // 2:,} feature rows in parts of "
        f"{FEATURE_PART_ROWS} compacted (`Catalog.compact`); each measurement a fresh process, the trees "
        f"alternating, medians of {args.rounds} rounds; peak = the process's RSS above its level before "
        "the step (VmHWM). Both trees made the same files (same sha256).\n\n")
    body += table(["step", "tree", "rows", "seconds", "time / baseline's", "peak MiB"], rows)
    kwargs = {"path": args.out} if args.out else {}
    update_section("catalog_commit", "catalog commit at 1M images: the per-image tables and a compaction", body,
                   **kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
