"""Embedding throughput: the pipeline's embedding vs a bare inference loop of the same model.

    python -m bench.embed [--photos 512] [--repeats 3] [--runtimes keras,tflite] [--out docs/benchmarks.md]

One run times, on the same real photos (../shared/data/photos, sampled with seed 0), interleaved
and rotated per repeat (medians):

- bare: a batched inference loop of exactly the model the pipeline builds (`confirm.get_embedder`:
  same weights, input size, preprocessing, batch size), on pre-decoded model-size arrays, in this
  process with TensorFlow using every core: the machine's limit for this model;
- bare + decode: the same loop with decode + trim + resize (`confirm.load_input`) in line;
- pipeline in-process: `confirm.embed_keys(client=None)`, the real code path (decode prefetch,
  batching, Parquet parts);
- pipeline on a LocalCluster of one single-threaded worker per core (what `dedupe` starts), warm
  (models already built); its cold start (cluster + TensorFlow import + model build or load in
  each worker, first batch) is timed once.

Each runtime (`embed.runtime`: keras, tflite) gets its own rows; ratios are pipeline / bare of the
same runtime and tflite / keras. The last part checks the TFLite embeddings against Keras on the
labelled sets: max |cos_tflite - cos_keras| over every labelled pair (tolerance 1e-3).

Writes section "embed" of docs/benchmarks.md. Needs ../shared (or $SHARED).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench import report  # noqa: E402
from bench import transforms as suite  # noqa: E402
from pipeline import confirm  # noqa: E402
from pipeline.config import Config  # noqa: E402

WEIGHTS = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
LABELLED = suite.SHARED / "data" / "labelled"


THREADS = 0  # --threads: inference threads in this process (0 = every core)


def base_config(runtime: str) -> Config:
    cfg = Config()
    cfg.embed.weights = str(suite.SHARED / "models" / WEIGHTS)
    cfg.embed.runtime = runtime
    cfg.embed.threads = THREADS
    return cfg


def bare_loop(emb, batches: list[np.ndarray]) -> np.ndarray:
    """The model on preprocessed fixed-size batches, nothing else (no padding, no normalising)."""
    return np.concatenate([emb.run_batch(b) for b in batches])


def images_frame(photos: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"abs_path": [str(p) for p in photos]})


def start_cluster(workers: int):
    from distributed import Client, LocalCluster
    import logging
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    return cluster, Client(cluster)


def throughput(photos: list[Path], runtimes: list[str], repeats: int, workers: int,
               split_compare: bool = True, paths: tuple[str, ...] = ("bare", "decode", "inproc", "cluster")) -> tuple[str, dict]:
    n = len(photos)
    images = images_frame(photos)
    keys = np.arange(n, dtype=np.int64) * 8
    tmp = tempfile.mkdtemp(prefix="bench-embed-")
    runs, embs, cold = {}, {}, {}
    arrays = None
    clusters = []
    try:
        for rt in runtimes:
            cfg = base_config(rt)
            t = time.perf_counter()
            emb = embs[rt] = confirm.get_embedder(cfg.embed)
            build_s = time.perf_counter() - t
            if arrays is None:
                arrays = np.stack([confirm.load_input(str(p), 0, cfg) for p in photos])
                b = emb.batch_size
                whole = (n // b) * b  # bare loop: whole batches only (no padding)
            x = emb.preprocess(arrays[:whole])
            batches = [x[i:i + emb.batch_size] for i in range(0, whole, emb.batch_size)]
            bare_loop(emb, batches[:1])  # trace / allocate

            def bare(emb=emb, batches=batches):
                return bare_loop(emb, batches)

            def bare_decode(emb=emb, cfg=cfg):
                out = []
                for i in range(0, whole, emb.batch_size):
                    arr = np.stack([confirm.load_input(str(p), 0, cfg) for p in photos[i:i + emb.batch_size]])
                    out.append(emb.run_batch(emb.preprocess(arr)))
                return np.concatenate(out)

            def inproc(cfg=cfg, rt=rt):
                d = Path(tmp) / f"in-{rt}"
                shutil.rmtree(d, ignore_errors=True)
                return confirm.embed_keys(keys, images, cfg, str(d), client=None)

            client = None
            if "cluster" in paths:
                t = time.perf_counter()
                cluster, client = start_cluster(workers)
                clusters.append((cluster, client))
                d0 = Path(tmp) / f"cold-{rt}"
                confirm.prepare_runtime(cfg)
                confirm.embed_keys(keys[: workers * emb.batch_size], images, cfg, str(d0), client=client)
                cold[rt] = (time.perf_counter() - t, build_s)

            def dask(cfg=cfg, rt=rt, client=client):
                d = Path(tmp) / f"dask-{rt}"
                shutil.rmtree(d, ignore_errors=True)
                return confirm.embed_keys(keys, images, cfg, str(d), client=client)

            def dask_fixed(cfg=cfg, rt=rt, client=client):  # tasks of dask.partition_size, unbalanced
                d = Path(tmp) / f"dask-fixed-{rt}"
                shutil.rmtree(d, ignore_errors=True)
                saved = confirm.task_size
                confirm.task_size = lambda n, c, slots: c.dask.partition_size
                try:
                    return confirm.embed_keys(keys, images, cfg, str(d), client=client)
                finally:
                    confirm.task_size = saved

            runs[f"bare {rt}"] = (bare, whole)
            if "decode" in paths:
                runs[f"bare+decode {rt}"] = (bare_decode, whole)
            if "inproc" in paths:
                runs[f"pipeline in-process {rt}"] = (inproc, n)
            if "cluster" in paths:
                runs[f"pipeline {workers}-worker cluster {rt}"] = (dask, n)
            if split_compare and "cluster" in paths:
                runs[f"pipeline {workers}-worker cluster, tasks of partition_size {rt}"] = (dask_fixed, n)
        times: dict[str, list[float]] = {k: [] for k in runs}
        load_before = os.getloadavg()[0]
        names = list(runs)
        for r in range(repeats):  # interleaved, rotating the order: load drift hits all alike
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                runs[name][0]()
                times[name].append(time.perf_counter() - t)
                print(f"  {name}: {runs[name][1] / times[name][-1]:.1f} img/s", file=sys.stderr)
        load_after = os.getloadavg()[0]
    finally:
        for cluster, client in clusters:
            client.close()
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = {k: runs[k][1] / report.median(v) for k, v in times.items()}
    rows = []
    for rt in runtimes:
        bare_rate = rate[f"bare {rt}"]
        for k in runs:
            if k.endswith(" " + rt):
                rows.append([k, f"{rate[k]:.1f}", f"{report.median(times[k]):.2f}", f"{rate[k] / bare_rate:.2f}"])
    emb0 = embs[runtimes[0]]
    text = (f"{n} real photos (../shared/data/photos, 321-960 px JPEG), batch {emb0.batch_size}, bare loop "
            f"with {emb0.threads} threads in one process, cluster {workers} workers x 1 thread; median of "
            f"{repeats} interleaved repeats (machine shared with other jobs: 1-min load average "
            f"{load_before:.1f} before, {load_after:.1f} after).\n\n"
            + report.table(["path", "images/s", "seconds", "/ bare (same runtime)"], rows))
    if len(runtimes) > 1 and "keras" in runtimes:
        others = [rt for rt in runtimes if rt != "keras"]
        text += "\n" + "; ".join(
            f"{rt} / keras: " + ", ".join(f"{k.replace(' keras', '')} **{rate[k.replace('keras', rt)] / rate[k]:.2f}x**"
                                          for k in rate if k.endswith(" keras") and k.replace("keras", rt) in rate)
            for rt in others) + ".\n"
        pairs = [times["bare keras"], times[f"bare {others[0]}"]]
        per = [a / b for a, b in zip(*pairs)]  # keras seconds / tflite seconds = tflite / keras images/s
        text += (f"Per repeat, bare {others[0]} / bare keras images/s: " + ", ".join(f"{x:.2f}" for x in per) + ".\n")
    if cold:
        text += ("\nCold start (cluster start + per-worker import and model build/load + one batch per worker, "
             "once): " + ", ".join(f"{rt} {c:.1f} s (model ready in this process: {b:.1f} s)"
                                    for rt, (c, b) in cold.items()) + ".\n")
    return text, rate


def labelled_pairs() -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """Per labelled set (a folder with labels.csv: path, group_id): its files and every pair of
    them (true pairs share a group_id, the rest are false pairs), as file indices."""
    out = []
    for labels in sorted(LABELLED.glob("*/labels.csv")):
        with labels.open(newline="", encoding="utf-8") as f:
            files = sorted({r["path"] for r in csv.DictReader(f)})
        a, b = np.triu_indices(len(files), 1)
        out.append((labels.parent.name, [str(labels.parent / p) for p in files], a, b))
    return out


def cosine_check(runtimes: list[str]) -> tuple[str, float]:
    sets = labelled_pairs()
    rows, worst = [], 0.0
    for name, files, a, b in sets:
        vecs = {}
        for rt in ("keras", "tflite"):
            cfg = base_config(rt)
            emb = confirm.get_embedder(cfg.embed)
            ok, arrs = [], []
            for i, p in enumerate(files):
                try:
                    arrs.append(confirm.load_input(p, 0, cfg))
                    ok.append(i)
                except Exception:  # an undecodable labelled file: skipped by both runtimes alike
                    pass
            v = np.full((len(files), emb.dim), np.nan, np.float32)
            v[ok] = emb.embed_arrays(np.stack(arrs))
            vecs[rt] = v
        ck = np.sum(vecs["keras"][a] * vecs["keras"][b], axis=1)
        ct = np.sum(vecs["tflite"][a] * vecs["tflite"][b], axis=1)
        good = ~np.isnan(ck)
        d = float(np.max(np.abs(ck[good] - ct[good]))) if good.any() else 0.0
        worst = max(worst, d)
        rows.append([name, len(files), int(good.sum()), f"{d:.2e}"])
    text = ("\nTFLite vs Keras embeddings on the labelled sets (../shared/data/labelled, every labelled pair, "
            "same decoded inputs):\n\n" + report.table(["set", "files", "pairs", "max |cos tflite - cos keras|"], rows)
            + f"\nWorst: {worst:.2e} (tolerance 1e-3).\n")
    return text, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runtimes", default="keras,tflite")
    ap.add_argument("--threads", type=int, default=0, help="inference threads in this process (0 = all cores)")
    ap.add_argument("--paths", default="bare,decode,inproc,cluster", help="which contenders to time")
    ap.add_argument("--no-cosine", action="store_true", help="skip the TFLite vs Keras cosine check")
    ap.add_argument("--out", default=str(report.DEFAULT_PATH))
    args = ap.parse_args(argv)
    if not (suite.SHARED / "models" / WEIGHTS).exists():
        print(f"skip: {suite.SHARED / 'models' / WEIGHTS} is missing (set $SHARED)", file=sys.stderr)
        return 0
    photos = sorted(p for p in suite.DEFAULT_PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = np.random.default_rng(0)
    photos = [photos[i] for i in sorted(rng.choice(len(photos), min(args.photos, len(photos)), replace=False))]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    global THREADS
    THREADS = args.threads
    text, _ = throughput(photos, runtimes, args.repeats, args.workers,
                         paths=tuple(p.strip() for p in args.paths.split(",")))
    if not args.no_cosine and "tflite" in runtimes:
        more, _ = cosine_check(runtimes)
        text += more
    print(text)
    if args.paths == "bare,decode,inproc,cluster" and not args.threads:
        name, title = "embed", "embedding throughput (pipeline vs bare loop)"
    else:  # a focused comparison keeps its own section beside the full one
        name = f"embed-{args.paths.replace(',', '-')}-t{args.threads}"
        title = f"embedding throughput: {args.paths}, {args.threads or 'all'} thread(s)"
    report.update_section(name, title, report.stamp() + "\n" + text, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
