"""`dedupe query` against a large catalog: one new image, cold (a new process) and warm (in-process).

The catalog: the full cascade (default preset, the CLI on the default local cluster) over
bench/scale.py's folder (the real photos plus --rounds x 31 seeded transformed copies: 100,625
files with --rounds 4), built once into --bench-dir and reused by later runs of this script. The
query images are new content: a photo rotated by 180 degrees and re-encoded (a duplicate of
catalog images), and a synthetic image (no duplicate). Reported: median wall seconds of the cold
query (`python -m pipeline query IMG --catalog DIR --output hits.parquet`, a new process each
time: imports, catalog tables, screen, ORB, TensorFlow when a pair reaches the confirm tier), of
the warm query (`pipeline.query.query` again in one process, the model and catalog tables already
loaded), the query process's peak memory, and the catalog's size per image.

    python -m bench.query_scale [--rounds 4] [--repeats 3] [--bench-dir /tmp/dedupe-bench]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import scale, transforms
from bench.incremental import du
from bench.report import median, stamp, table, update_section

REPO = Path(__file__).resolve().parent.parent

# a child process that times query() cold and warm in itself and reports its peak memory
_PROBE = """
import json, sys, time
t = time.perf_counter()
from pipeline.query import query
hits = query([sys.argv[1]], sys.argv[2])
first = time.perf_counter() - t
warm = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    query([sys.argv[1]], sys.argv[2])
    warm.append(time.perf_counter() - t)
peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] * 1024
print(json.dumps({"first": first, "warm": warm, "peak": peak, "compared": len(hits),
                  "duplicates": int(hits["is_duplicate"].fillna(False).astype(bool).sum())}))
"""


def build_catalog(bench_dir: Path, rounds: int) -> tuple[Path, Path, float | None]:
    """(folder, OUT with its catalog, seconds of the build or None when reused)."""
    data = scale.generate(bench_dir, rounds)
    out = bench_dir / "runs" / f"query-catalog-{data.name}"
    if (out / "catalog" / "manifest.json").is_file() and (out / "run.json").is_file():
        return data, out, None
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(data / "images"), "--out", str(out),
                    "--quiet", "--log-level", "WARNING"], cwd=REPO, check=True)
    return data, out, time.perf_counter() - t


def probes(folder: Path, tmp: Path) -> dict[str, Path]:
    src = sorted(transforms.DEFAULT_PHOTOS.glob("*.jpg"))[7]
    dup = tmp / "rotated.jpg"
    with Image.open(src) as im:
        im.convert("RGB").rotate(180).save(dup, quality=88)
    noise = tmp / "new.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(noise)
    return {"a rotated, re-encoded copy of a photo": dup, "a new synthetic image": noise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the 31 transforms per photo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    parser.add_argument("--out", default=None, help="benchmarks markdown file")
    args = parser.parse_args()
    if not transforms.DEFAULT_PHOTOS.is_dir():
        raise SystemExit(f"{transforms.DEFAULT_PHOTOS} missing: set SHARED to the shared folder")
    data, out, build_s = build_catalog(Path(args.bench_dir), args.rounds)
    manifest = json.loads((out / "run.json").read_text())
    n_images = manifest["counts"]["files"]
    cat = out / "catalog"
    rows = []
    with tempfile.TemporaryDirectory(prefix="dedupe-query-") as tmp_name:
        for what, image in probes(data, Path(tmp_name)).items():
            cold, inproc = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pipeline", "query", str(image), "--catalog", str(cat),
                                "--output", str(Path(tmp_name) / "hits.parquet")], cwd=REPO, check=True,
                               stdout=subprocess.DEVNULL)
                cold.append(time.perf_counter() - t)
                res = json.loads(subprocess.run([sys.executable, "-c", _PROBE, str(image), str(cat), "5"], cwd=REPO,
                                                check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                inproc.append(res)
            rows.append([what, f"{median(cold):.2f}", f"{median([r['first'] for r in inproc]):.2f}",
                         f"{median([x for r in inproc for x in r['warm']]):.3f}",
                         f"{median([r['peak'] for r in inproc]) / 2**30:.2f}",
                         f"{inproc[0]['compared']} / {inproc[0]['duplicates']}"])
            print(rows[-1], flush=True)
    cat_bytes = du(cat)
    parts = {kind: du(cat / "features" / kind) for kind in ("orb", "embed") if (cat / "features" / kind).exists()}
    tables = du(cat / "tables")
    body = stamp() + (
        f"\nA catalog of {n_images:,} images (bench/scale.py's folder, {args.rounds} rounds; the full cascade, "
        "default preset" + (f", built in {build_s:.0f} s" if build_s else ", built by an earlier run of this script")
        + f"). {args.repeats} repeats per query image.\n\n")
    body += table(["query image", "cold s (new process, CLI)", "first call in a process s",
                   "warm s (model and tables loaded)", "query peak GB", "compared / duplicates"], rows)
    body += (f"\nCatalog size: {cat_bytes / 1e9:.2f} GB for {n_images:,} images = {cat_bytes / n_images / 1e3:.1f} kB "
             f"per image (tables {tables / 1e6:.0f} MB; " + ", ".join(f"{k} features {v / 1e9:.2f} GB" for k, v in parts.items())
             + "). A query reads the tables and only the feature parts of the images it is compared with.\n")
    kwargs = {"path": args.out} if args.out else {}
    update_section("query_scale", "dedupe query against a 100k-image catalog", body, **kwargs)
    print(body)


if __name__ == "__main__":
    main()
