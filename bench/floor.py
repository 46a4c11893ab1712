"""The floor under the default cascade's wall time: the per-image work no run can skip, timed
alone on every image of a folder, against fastdup's whole run in the same round.

    python -m bench.floor [--sizes 10k] [--rounds 3] [--out docs/benchmarks.md]

The default cascade confirms an edited copy by ORB keypoints, so every image that has a copy
must at least be read, decoded (JPEG draft, to verify.max_side) and have its ORB features
computed once; the screen must also hash every image. Each floor below is that work and nothing
else: a pool of one process per core, started and warmed up before the clock starts, mapping
one function over the folder's files (no Dask, no outputs, no pairs, no start-up):

- decode: read + draft decode at the scale ORB needs (verify._draft_min_side);
- decode + ORB (OpenCV defaults): + resize to verify.max_side, grey, one `detectAndCompute` with
  n_features keypoints and OpenCV's default pyramid (the cheapest ORB any verify tier could run);
- decode + verify features: + the verify tier's own `orb_features` (grid spread, oversampling);
- screen: the screen's whole per-file work (`screen.screen_file`: read, sha256, decode, hashes);
- one decode, screen + verify: read, sha256, one decode at ORB's scale, the screen's hashes and the
  verify tier's features from that one picture (the least per-file work a default run could do);
- embed: the high-recall screen's per-file work: decode at the model's input size and the confirm
  tier's model (its resolved runtime, one inference thread per process) in batches of
  embed.batch_size.

fastdup (its defaults, in its own virtualenv, `make fastdup`) runs as in bench/fastdup.py: a fresh
process, start-up included. The ratio floor / fastdup per round, median over rounds, is the figure
to read: a floor above a target ratio means no engineering of the rest of the run reaches it
while every image still goes through ORB.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench import fastdup as fastdup_bench
from bench import transforms
from bench.report import median, stamp, table, update_section
from pipeline import confirm, scan, screen, verify
from pipeline.config import Config
from pipeline.decode import load_image

FLOORS = ["decode", "decode + ORB (OpenCV defaults)", "decode + verify features", "screen",
          "one decode, screen + verify", "embed"]
_CFG = None


def _init(cfg) -> None:
    """Worker set-up outside the clock: the config, one OpenCV thread and one inference thread
    per process (as the tiers run them), the model built."""
    global _CFG
    cv2.setNumThreads(1)
    _CFG = cfg
    confirm.get_embedder(cfg.embed)


def _embed(paths: list[str]) -> int:
    arrays = []
    for path in paths:
        try:
            arrays.append(confirm.load_input(path, 0, _CFG))
        except Exception:
            pass
    return len(confirm.get_embedder(_CFG.embed).embed_arrays(np.stack(arrays))) if arrays else 0


def _decode(path: str, source=None):
    """The picture ORB needs: draft-decoded at the scale that keeps verify.max_side (from
    `source`, the file's bytes already read, when given)."""
    img, _, _ = load_image(path if source is None else source, min_side=verify._draft_min_side(path, _CFG),
                           max_pixels=_CFG.screen.max_pixels, max_decode_bytes=_CFG.screen.max_decode_bytes)
    return img


def _floor(task: tuple[str, str]) -> int:
    """One file's floor work; returns a count so nothing is optimised away (keypoints, or 1)."""
    kind, path = task
    try:
        if kind == "screen":
            st = os.stat(path)
            row = screen.screen_file(scan.FileEntry(os.path.basename(path), path, st.st_size, st.st_mtime,
                                                    None, st.st_mtime_ns), _CFG.screen)
            return int(row["error"] is None)
        if kind == "one decode, screen + verify":
            with open(path, "rb") as fh:
                data = fh.read()
            hashlib.sha256(data).hexdigest()
            img = _decode(path, io.BytesIO(data))
            screen.image_hashes(img, _CFG.screen)
            return len(verify.orb_features(img, _CFG.verify)["keypoints"])
        img = _decode(path)
        if kind == "decode":
            return img.size[0] > 0
        if kind == "decode + verify features":
            return len(verify.orb_features(img, _CFG.verify)["keypoints"])
        grey = np.asarray(verify._bounded(img, _CFG.verify).convert("L"))
        kps, _ = cv2.ORB_create(nfeatures=_CFG.verify.n_features).detectAndCompute(grey, None)
        return len(kps)
    except Exception:  # a file the pipeline would record as an error: still counted as work done
        return 0


def files_of(folder: Path) -> list[str]:
    return [e.abs_path for e in scan.iter_files(folder, Config().scan) if e.error is None]


def time_floor(pool, kind: str, files: list[str], batch: int) -> float:
    if kind == "embed":  # batches of the model's batch size, as the tier sends them
        fn, tasks = _embed, [files[i:i + batch] for i in range(0, len(files), batch)]
        warm = [files[:batch]] * (2 * os.cpu_count())
    else:
        fn, tasks = _floor, [(kind, f) for f in files]
        warm = tasks[:2 * os.cpu_count()]
    pool.map(fn, warm, chunksize=1)  # warm: the decoders' and the model's first calls
    t = time.perf_counter()
    for _ in pool.imap_unordered(fn, tasks, chunksize=1 if kind == "embed" else 32):
        pass
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10k", help="comma-separated: small (the shared photos) and/or 10k")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bench-dir", default=str(transforms.DEFAULT_BENCH_DIR))
    ap.add_argument("--out", default="docs/benchmarks.md", help="'-' to print only")
    args = ap.parse_args(argv)
    py = fastdup_bench.fastdup_python()
    if py is None:
        print(f"fastdup is not installed in {fastdup_bench.FASTDUP_VENV} (make fastdup): nothing measured",
              file=sys.stderr)
        return 0
    cores = len(os.sched_getaffinity(0))
    cfg = Config()
    cfg.embed = dataclasses.replace(cfg.embed, threads=1)
    cfg = confirm.prepare_runtime(cfg)  # the runtime resolved (and a TFLite model converted) once, here
    sections = []
    for size in args.sizes.split(","):
        data = fastdup_bench.folder(size, Path(args.bench_dir))
        files = files_of(data)
        walls: dict[str, list[float]] = {k: [] for k in ["fastdup", *FLOORS]}
        ratios: dict[str, list[float]] = {k: [] for k in FLOORS}
        ctx = multiprocessing.get_context("spawn")  # fresh processes, as a cluster's workers are
        with ctx.Pool(cores, initializer=_init, initargs=(cfg,)) as pool:
            for r in range(args.rounds):
                with tempfile.TemporaryDirectory() as work:
                    walls["fastdup"].append(fastdup_bench.run_fastdup(py, data, Path(work))["wall"])
                for kind in FLOORS:
                    walls[kind].append(time_floor(pool, kind, files, cfg.embed.batch_size))
                    ratios[kind].append(walls[kind][-1] / walls["fastdup"][-1])
                print(f"{size} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()),
                      flush=True)
        rows = [["fastdup (whole run, start-up included)", f"{median(walls['fastdup']):.1f}", "1.00"]]
        rows += [[k, f"{median(walls[k]):.1f}", f"{median(ratios[k]):.2f}"] for k in FLOORS]
        sections.append(f"**{size}**: {len(files):,} files, {cores} processes, {args.rounds} rounds\n\n"
                        + table(["work, every file once", "median s", "median ratio to fastdup"], rows))
    body = (stamp(f"python -m bench.floor --sizes {args.sizes} --rounds {args.rounds}")
            + f"\nfastdup {fastdup_bench.fastdup_version(py)}. The floors are the per-file work alone "
            "(bench/floor.py), timed in a warmed pool with no start-up, so each is below what any "
            "full run doing that work can take.\n\n" + "\n\n".join(sections) + "\n")
    print(body)
    if args.out != "-":
        update_section("floor", "Floor: the work every image must get, against fastdup", body, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
