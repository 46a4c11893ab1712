"""The listing of a folder as a catalog re-run makes it: every file's first bytes read for its
image signature (a first run, or before the catalog vouched for its images), against the
catalog's records vouching for the unchanged images (`scan.iter_files(known_images=...)`).

    python -m bench.listing [--folder DIR] [--rounds 5] [--out docs/benchmarks.md]

Then the catalog's look-up of a screen batch (`dask.partition_size` paths; the run asks once per
batch, and the listing once per folder) among 100k and 1M records: `KnownImages.find`, an object
index whose hash table is built once, against an index of the paths as pandas infers it (Arrow
text), which answers objects by making every record's path a Python string and hashing them
all again, per call.

The records are those a run over the folder commits (path, size, mtime_ns, no error, these
screen settings), made from one listing before the clock starts, so the vouched-for listing pays
for its lookups too. The two ways take turns, `--rounds` times each, and must list the same
entries; the figure to read is their median ratio. The page cache is warm (the folder is read
once before): on a network share every sniff is a round trip besides, which this does not show.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import scale, transforms
from bench.report import DEFAULT_PATH, interleaved_runs, median, stamp, table, update_section
from pipeline import catalog, scan
from pipeline.config import Config


def records(folder: Path, cfg) -> catalog.KnownImages:
    """The catalog's image records of `folder` as a run commits them (errors left out)."""
    entries = [e for e in scan.iter_files(folder, cfg.scan) if e.error is None]
    return catalog.KnownImages(pd.DataFrame({
        "path": [e.path for e in entries], "bytes": np.array([e.bytes for e in entries], np.int64),
        "mtime_ns": np.array([e.mtime_ns for e in entries], np.int64), "sha256": [None] * len(entries),
        "etag": [None] * len(entries), "error": [None] * len(entries), "screen_fp": "fp"}), "fp")


def listing(folder: Path, cfg, known_images=None) -> pd.DataFrame:
    return pd.DataFrame([(e.path, e.bytes, e.error) for e in scan.iter_files(folder, cfg.scan,
                                                                             known_images=known_images)],
                        columns=["path", "bytes", "error"])


def lookups(batch: int, rounds: int) -> str:
    """ms per look-up of `batch` paths among 100k and 1M records, both indexes, median of rounds."""
    rows = []
    for n in (100_000, 1_000_000):
        paths = [f"folder{i // 1000:05d}/image_{i:08d}.jpg" for i in range(n)]
        records = pd.DataFrame({"path": pd.array(paths, dtype="str"), "bytes": np.ones(n, np.int64),
                                "mtime_ns": np.ones(n, np.int64), "sha256": [None] * n, "etag": [None] * n,
                                "error": [None] * n, "screen_fp": "fp"})
        known = catalog.KnownImages(records, "fp")
        inferred = pd.Index(records["path"].to_numpy(dtype=object))  # (str: Arrow text)
        ways = {"object index (KnownImages.find)": lambda q: known.find(q),
                f"index as pandas infers it ({inferred.dtype})": lambda q: inferred.get_indexer(pd.Index(q, dtype=object))}
        found = {}
        for name, way in ways.items():
            times = []
            for r in range(rounds + 1):
                q = paths[(r * 7919 * batch) % (n - batch):][:batch]
                t = time.perf_counter()
                found[name] = way(q)
                times.append(time.perf_counter() - t)
            rows.append([f"{n:,}", name, batch, 1e3 * median(times[1:])])  # (the first builds a table)
        a, b = found.values()
        if not np.array_equal(a, b):
            raise SystemExit("the two look-ups differ")
    return ("The catalog's look-up of one screen batch, ms (median; the first call, which builds the "
            "object index's hash table, not counted):\n\n"
            + table(["records", "index", "paths asked", "ms per look-up"], rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=None, help="default: bench/scale.py's 100k folder (4 rounds) under --bench-dir")
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    folder = Path(args.folder) if args.folder else scale.generate(Path(args.bench_dir), 4) / "images"
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no such folder")
    cfg = Config()
    known = records(folder, cfg)  # (also the warm-up: the folder's pages and inodes cached)
    times, _, first = interleaved_runs({
        "every file sniffed": lambda: listing(folder, cfg),
        "catalog vouches for its images": lambda: listing(folder, cfg, known.images_as_they_were),
    }, args.rounds, warm_up=True)
    base = median(times["every file sniffed"])
    rows = [[name, len(first), median(t), median(t) / base, 1e6 * median(t) / max(len(first), 1)]
            for name, t in times.items()]
    body = (stamp() + f"\nThe listing of {len(first):,} files ({folder.name} of {folder.parent.name}), "
            f"page cache warm, median of {args.rounds} rounds taking turns:\n\n"
            + table(["listing", "files", "median s", "time / every file sniffed", "us per file"], rows) + "\n")
    body = body.rstrip() + "\n\n" + lookups(cfg.dask.partition_size, args.rounds)
    update_section("listing", "listing: a catalog re-run's walk, with and without its records vouching for images",
                   body, args.out or DEFAULT_PATH)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
