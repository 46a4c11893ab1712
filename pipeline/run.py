"""The cascade end to end: scan -> screen -> candidates -> verify -> confirm -> decide -> write.

This module only wires the stages together and owns the Dask client; each stage lives in its own
module as a plain function over one partition. Data flows one way: every stage gets what it needs
as arguments and returns a frame.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

import pipeline
from pipeline import candidates, decide, outdir, paths, scan, screen, write
from pipeline.config import Config, ConfigError, check_scheduler
from pipeline.progress import Progress

log = logging.getLogger("pipeline")
TIER_ORDER = {"screen": 0, "verify": 1, "confirm": 2}
SCREEN_EMBED_SUBDIR = "screen_embeddings"  # high-recall mode's embeddings, under work_dir/embed


@contextlib.contextmanager
def dask_client(cfg: Config, scheduler: str | None) -> Iterator[object | None]:
    """None for "sync" (in-process); a LocalCluster for "local"; else connect to the address."""
    target = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or cfg.dask.scheduler
    if target == "sync":
        yield None
        return
    from distributed import Client, LocalCluster
    if not log.isEnabledFor(logging.DEBUG):  # nannies starting, comms closing: noise for a batch job
        for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if target == "local":
        n_workers = cfg.dask.n_workers or os.cpu_count() or 1
        with LocalCluster(n_workers=n_workers, threads_per_worker=cfg.dask.threads_per_worker,
                          processes=True, dashboard_address=cfg.dask.dashboard_address or None,
                          memory_limit=0 if str(cfg.dask.memory_limit).lower() in ("0", "none", "")
                          else cfg.dask.memory_limit,
                          silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
            if cfg.dask.dashboard_address:
                log.info("Dask dashboard: %s (%d workers x %d threads)", client.dashboard_link, n_workers,
                         cfg.dask.threads_per_worker)
            yield client
        return
    try:
        client = Client(target, timeout="15s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {target!r} ({exc}): check --scheduler, "
                          "DASK_SCHEDULER_ADDRESS or dask.scheduler, or use --scheduler local") from None
    try:
        log.info("connected to the Dask scheduler at %s (dashboard: %s)", target, client.dashboard_link)
        yield client
    finally:
        client.close()


def image_ids(names: Iterable[str | bytes]) -> np.ndarray:
    """Stable 63-bit ids from relative paths (their bytes): the same file keeps its id as the
    folder grows. For a valid UTF-8 name the bytes are its UTF-8 encoding."""
    ids = np.fromiter((int.from_bytes(hashlib.blake2b(p if isinstance(p, bytes) else p.encode("utf-8"),
                                                      digest_size=8).digest(), "big") >> 1
                       for p in names), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):  # astronomically unlikely; refuse rather than merge images
        raise RuntimeError("image_id collision between two paths")
    return ids


def run_screen(root: Path, cfg: Config, client, progress: Progress) -> pd.DataFrame:
    batches = scan.batched(scan.iter_files(root, cfg.scan), cfg.dask.partition_size)
    frames: list[pd.DataFrame] = []
    walked = 0
    with progress.stage("screen", unit="img") as tracker:
        if client is None:  # walk and screen interleave: the total grows until the walk ends
            for batch in batches:
                walked += len(batch)
                tracker.set_total(walked, final=False)
                frames.append(screen.screen_partition(batch, cfg.screen))
                tracker.update(len(batch))
        else:
            from distributed import as_completed
            pending = as_completed()
            futures = []
            for batch in batches:  # submit while the walk goes on, count what finished meanwhile
                futures.append(client.submit(screen.screen_partition, batch, cfg.screen, pure=False))
                pending.add(futures[-1])
                walked += len(batch)
                tracker.set_total(walked, final=False)
                for fut in pending.next_batch(block=False):
                    tracker.update(len(fut.result()))
            for fut in pending:
                tracker.update(len(fut.result()))
            frames = client.gather(futures)
        tracker.set_total(walked)
    images = (pd.concat(frames, ignore_index=True) if frames
              else pd.DataFrame({c: pd.Series(dtype="object") for c in screen.COLUMNS}))
    # names as the filesystem holds them -> the outputs' text form (pipeline/paths.py); the id
    # and the raw bytes come from the exact name, so nothing is lost
    raw = [paths.raw_bytes(p) for p in images["path"]]
    images["raw_path"] = [None if paths.is_utf8(b) else b for b in raw]
    images["image_id"] = image_ids(raw)
    images["path"] = [paths.text_form(p) for p in images["path"]]
    images["error"] = [paths.clean_text(e) if isinstance(e, str) else e for e in images["error"]]
    images = images.sort_values("path", kind="stable").reset_index(drop=True)
    return images[["image_id", *[c for c in images.columns if c != "image_id"]]]


def representatives(images: pd.DataFrame) -> pd.Series:
    """Valid images that are the first of their byte-identical group: only these take part in
    the near search and the later tiers."""
    valid = images["error"].isna() & images["codes"].notna()
    return valid & candidates.exact_representatives(images["sha256"])


def screen_embeddings(images: pd.DataFrame, cfg: Config, work_dir: Path, client,
                      progress: Progress | None = None) -> pd.DataFrame:
    """High-recall mode: the confirm tier's embedding (transform 0, key idx * 8) of every
    representative image, in the feature store under work_dir/embed/screen_embeddings.
    Returns key, part_path, error; run_confirm reuses them (`precomputed`)."""
    from pipeline import confirm
    idx = np.flatnonzero(representatives(images).to_numpy()).astype(np.int64)
    frame = images.set_index(pd.RangeIndex(len(images)))
    return confirm.embed_keys(idx * 8, frame, cfg, str(work_dir / "embed" / SCREEN_EMBED_SUBDIR),
                              client=client, progress=progress, stage_name="screen-embed")


def build_pairs(images: pd.DataFrame, cfg: Config, client, emb_parts: list[str] | None = None,
                timings: dict | None = None) -> pd.DataFrame:
    """Exact pairs + near candidates (hash; plus embedding neighbours when `emb_parts`, the
    screen embeddings' partition files, are given)."""
    exact = candidates.exact_pairs(images["sha256"], cfg.screen.exact_group_pairs)
    exact = exact.assign(hash_distance=np.int16(0), transform=np.int8(0), kind="exact")
    valid = images["error"].isna() & images["codes"].notna()
    representative = representatives(images)
    codes, mask = screen.unpack_codes(images, cfg.screen)
    mask &= valid.to_numpy()[:, None]
    near = candidates.near_pairs(codes, mask, cfg.screen, client=client,
                                 representatives=representative.to_numpy())
    if emb_parts is not None:
        t = time.perf_counter()
        emb = candidates.embedding_pairs(emb_parts, cfg.screen)
        if timings is not None:
            timings["embedding_knn"] = time.perf_counter() - t
        near = candidates.union_pairs(near, emb, codes, mask, cfg.screen,
                                      representatives=representative.to_numpy())
    else:
        near = near.assign(source="hash")
    near = near.assign(kind="near")
    pairs = pd.concat([exact, near], ignore_index=True)
    return pairs.astype({"idx_a": "int64", "idx_b": "int64", "hash_distance": "int16", "transform": "int8"})


def run(root: str | Path, out: str | Path, cfg: Config, scheduler: str | None = None,
        quiet: bool = False) -> dict:
    """Run the whole cascade; returns the manifest written to OUT/run.json.

    Holds OUT's lock for the whole run (a second run into the same OUT stops with ConfigError),
    and removes its work folder however the run ends (an exception, Ctrl-C, SIGTERM turned into an
    exception by the CLI); folders of runs killed outright are removed by the next run.
    """
    root = Path(root)
    out = Path(out)
    if not root.is_dir():
        raise ConfigError(f"input folder {str(root)!r} does not exist or is not a folder: pass DATA=<folder of images>")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} exists and is not a folder: choose another --out")
    check_scheduler(scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or cfg.dask.scheduler,
                    "--scheduler" if scheduler else "DASK_SCHEDULER_ADDRESS"
                    if os.environ.get("DASK_SCHEDULER_ADDRESS") else "dask.scheduler")
    weights_info = None
    if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"] or cfg.screen.mode == "hash+embedding":
        from pipeline import weights  # fail before any heavy work when the weights are missing
        weights_info = weights.check_weights_available(cfg.embed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {str(out)!r} ({exc.strerror}): "
                          "choose another --out") from None
    with outdir.locked(out):
        work_dir = Path(cfg.work_dir) if cfg.work_dir else out / f"{outdir.WORK_PREFIX}{os.getpid()}"
        outdir.remove_stale_work(out, keep=work_dir)
        try:
            return _cascade(root, out, cfg, scheduler, Progress(quiet), work_dir, weights_info)
        finally:
            if not cfg.work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)


def _cascade(root: Path, out: Path, cfg: Config, scheduler: str | None, progress: Progress,
             work_dir: Path, weights_info: dict | None) -> dict:
    high_recall = cfg.screen.mode == "hash+embedding"
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}

    with dask_client(cfg, scheduler) as client:
        t = time.perf_counter()
        images = run_screen(root, cfg, client, progress)
        timings["scan+screen"] = time.perf_counter() - t
        counts["files"] = len(images)
        counts["errors"] = int(images["error"].notna().sum())
        log.info("screened %d files (%d with errors)", counts["files"], counts["errors"])

        screen_emb = None
        if high_recall:
            t = time.perf_counter()
            screen_emb = screen_embeddings(images, cfg, work_dir, client, progress)
            timings["screen_embed"] = time.perf_counter() - t
            counts["screen_embedded"] = len(screen_emb)
            counts["screen_embed_errors"] = int(screen_emb["error"].notna().sum())
        t = time.perf_counter()
        with progress.stage("candidates", unit="img") as tracker:
            pairs = build_pairs(images, cfg, client, timings=timings,
                                emb_parts=None if screen_emb is None else screen_emb["part_path"].tolist())
            tracker.update(len(images))
        timings["candidates"] = time.perf_counter() - t
        counts["exact_pairs"] = int((pairs["kind"] == "exact").sum())
        counts["near_candidates"] = int((pairs["kind"] == "near").sum())
        if high_recall:
            counts["embedding_only_candidates"] = int((pairs["source"] == "embedding").sum())
            counts["hash_and_embedding_candidates"] = int((pairs["source"] == "both").sum())
        log.info("%d exact pairs, %d near candidates", counts["exact_pairs"], counts["near_candidates"])

        frame = images.set_index(pd.RangeIndex(len(images)))
        for col, dtype in (("orb_matches", "Int32"), ("orb_inliers", "Int32"), ("orb_score", "Float32"),
                           ("orb_status", "object"), ("orb_reason", "object"), ("cosine", "Float32"),
                           ("ssim", "Float32"), ("hist_corr", "Float32")):
            pairs[col] = pd.Series(pd.NA, index=pairs.index, dtype=dtype)
        near = pairs.index[pairs["kind"] == "near"]
        if TIER_ORDER[cfg.tiers] >= TIER_ORDER["verify"] and len(near):
            from pipeline import verify
            t = time.perf_counter()
            scores = verify.run_verify(pairs.loc[near, ["idx_a", "idx_b", "transform"]], frame, cfg,
                                       str(work_dir / "orb"), client=client, progress=progress)
            pairs.loc[near, scores.columns] = scores
            timings["verify"] = time.perf_counter() - t
            counts["verified_pairs"] = len(near)
            counts["verify_rejected"] = int((pairs["orb_status"] == "no-match").sum())
            counts["pixel_checked"] = int(pairs["ssim"].notna().sum())
            counts["verify_accepted"] = int(((pairs["kind"] == "near") & (pairs["orb_status"] != "no-match")
                                             & (pairs["orb_inliers"].fillna(0) >= cfg.decide.accept_inliers)).sum())
        if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"]:
            from pipeline import confirm
            # only what the verify tier neither rejected nor accepted outright (pipeline/decide.py)
            alive = pairs.index[decide.needs_confirm(pairs, cfg)]
            t = time.perf_counter()
            if len(alive):
                reuse = None if screen_emb is None else \
                    pd.Series(screen_emb["part_path"].to_numpy(dtype=object),
                              index=screen_emb["key"].to_numpy(dtype=np.int64))
                cos = confirm.run_confirm(pairs.loc[alive, ["idx_a", "idx_b", "transform"]], frame,
                                          cfg, str(work_dir / "embed"), client=client,
                                          precomputed=reuse, progress=progress)
                counts["confirm_embedded"] = int(cos.attrs.get("embedded_keys", 0))
                counts["confirm_reused"] = int(cos.attrs.get("reused_keys", 0))
                pairs.loc[alive, "cosine"] = cos.astype("float32")
            timings["confirm"] = time.perf_counter() - t
            counts["confirmed_pairs"] = len(alive)

    # a file rewritten while the tiers ran is marked, not silently mixed (its hash is from before)
    changed = np.asarray(scan.changed_since(images["abs_path"], images["bytes"], images["mtime"]), dtype=bool)
    changed &= images["error"].isna().to_numpy()
    images.loc[changed, "error"] = decide.CHANGED_ERROR
    counts["changed_during_run"] = int(changed.sum())
    counts["errors"] = int(images["error"].notna().sum())
    if changed.any():
        log.warning("%d file(s) changed during the run; they are marked and left undecided", int(changed.sum()))

    t = time.perf_counter()
    pairs = decide.mark_changed(decide.decide(pairs, cfg), changed)
    dup = pairs[pairs["is_duplicate"]]
    images["cluster_id"] = decide.clusters(len(images), dup["idx_a"].to_numpy(), dup["idx_b"].to_numpy(),
                                           images["image_id"].to_numpy())
    timings["decide"] = time.perf_counter() - t
    counts["duplicate_pairs"] = int(pairs["is_duplicate"].sum())
    counts["clusters"] = int(images.loc[images["cluster_id"] >= 0, "cluster_id"].nunique())
    counts["images_in_clusters"] = int((images["cluster_id"] >= 0).sum())

    pairs = contract_pairs(pairs, images)
    manifest = {
        "tool": "dedupe-pipeline", "version": pipeline.__version__, "run_id": run_id,
        "contract_version": write.CONTRACT_VERSION,
        "root": paths.text_form(str(root.resolve())), "out": paths.text_form(str(out.resolve())),
        "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
        "scheduler": scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or cfg.dask.scheduler,
        "config": cfg.to_dict(), "counts": counts, "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "weights": weights_info, "versions": versions(),
    }
    with progress.stage("write", total=len(images) + len(pairs), unit="row") as tracker:
        outdir.publish(out, run_id, lambda folder: write.write_outputs(folder, images, pairs, manifest))
        tracker.update(len(images) + len(pairs))
    return manifest


def contract_pairs(pairs: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Internal pair rows -> the output contract's columns (plus abs paths for the report)."""
    a = images.iloc[pairs["idx_a"].to_numpy()]
    b = images.iloc[pairs["idx_b"].to_numpy()]
    out = pd.DataFrame({
        "path_a": a["path"].to_numpy(), "path_b": b["path"].to_numpy(),
        "image_id_a": a["image_id"].to_numpy(), "image_id_b": b["image_id"].to_numpy(),
        "hash_distance": pairs["hash_distance"].to_numpy(),
        "orb_matches": pairs["orb_matches"].to_numpy(), "orb_inliers": pairs["orb_inliers"].to_numpy(),
        "orb_score": pairs["orb_score"].to_numpy(), "cosine": pairs["cosine"].to_numpy(),
        "ssim": pairs["ssim"].to_numpy(), "hist_corr": pairs["hist_corr"].to_numpy(),
        "stage": pairs["stage"].to_numpy(), "is_duplicate": pairs["is_duplicate"].to_numpy(),
        "reason": [paths.clean_text(r) for r in pairs["reason"]], "rule": pairs["rule"].to_numpy(),
        "abs_path_a": a["abs_path"].to_numpy(), "abs_path_b": b["abs_path"].to_numpy(),
    })
    return out.sort_values(["path_a", "path_b"], kind="stable").reset_index(drop=True)


# distribution names whose versions shape the results (read from package metadata: nothing is
# imported, so the driver does not pay for TensorFlow just to name its version)
VERSIONED = {"numpy": ["numpy"], "pillow": ["pillow"], "imagehash": ["imagehash"],
             "opencv": ["opencv-python-headless", "opencv-python"], "pandas": ["pandas"],
             "pyarrow": ["pyarrow"], "dask": ["dask"], "distributed": ["distributed"], "numba": ["numba"],
             "tensorflow": ["tensorflow-cpu", "tensorflow"], "keras": ["keras"],
             "faiss": ["faiss-cpu", "faiss"], "scipy": ["scipy"]}


def versions() -> dict:
    from importlib import metadata
    found = {"python": platform.python_version(), "dedupe-pipeline": pipeline.__version__}
    for name, dists in VERSIONED.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            found[name] = None  # not installed
    return found
