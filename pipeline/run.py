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
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

import pipeline
from pipeline import candidates, decide, scan, screen, write
from pipeline.config import Config, ConfigError

log = logging.getLogger("pipeline")
TIER_ORDER = {"screen": 0, "verify": 1, "confirm": 2}
SCREEN_EMBED_SUBDIR = "screen_embeddings"  # high-recall mode's embeddings, under work_dir/embed


class Progress:
    """tqdm per stage, silent when asked or when stderr is not a terminal."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()

    def bar(self, desc: str, total: int | None = None, unit: str = "it") -> tqdm:
        return tqdm(total=total, desc=f"{desc:<10}", unit=unit, disable=not self.enabled, leave=True,
                    dynamic_ncols=True)


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
                          processes=True, dashboard_address=":0", memory_limit=cfg.dask.memory_limit,
                          silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(target, timeout="15s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {target!r} ({exc}): check --scheduler, "
                          "DASK_SCHEDULER_ADDRESS or dask.scheduler, or use --scheduler local") from None
    try:
        yield client
    finally:
        client.close()


def map_ordered(client, fn: Callable, items: list, *args, bar: tqdm | None = None) -> list:
    """fn(item, *args) for every item, on the cluster (or in-process), results in input order."""
    if client is None:
        results = []
        for item in items:
            results.append(fn(item, *args))
            if bar is not None:
                bar.update(1)
        return results
    from distributed import as_completed
    scattered = [client.scatter(a, broadcast=True) if isinstance(a, (pd.DataFrame, np.ndarray)) else a
                 for a in args]
    futures = client.map(fn, items, *[[a] * len(items) for a in scattered], pure=False)
    for _ in as_completed(futures):
        if bar is not None:
            bar.update(1)
    return client.gather(futures)


def image_ids(paths: Iterable[str]) -> np.ndarray:
    """Stable 63-bit ids from relative paths: the same file keeps its id as the folder grows."""
    ids = np.fromiter((int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "big") >> 1
                       for p in paths), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):  # astronomically unlikely; refuse rather than merge images
        raise RuntimeError("image_id collision between two paths")
    return ids


def run_screen(root: Path, cfg: Config, client, progress: Progress) -> pd.DataFrame:
    batches = scan.batched(scan.iter_files(root, cfg.scan), cfg.dask.partition_size)
    frames: list[pd.DataFrame] = []
    with progress.bar("screen", unit="img") as bar:
        if client is None:
            for batch in batches:
                frames.append(screen.screen_partition(batch, cfg.screen))
                bar.update(len(batch))
        else:
            from distributed import as_completed
            pending = as_completed()
            futures = []
            for batch in batches:  # submit while the walk goes on
                fut = client.submit(screen.screen_partition, batch, cfg.screen, pure=False)
                futures.append(fut)
                pending.add(fut)
            for fut in pending:
                bar.update(len(fut.result()))
            frames = client.gather(futures)
    images = (pd.concat(frames, ignore_index=True) if frames
              else pd.DataFrame({c: pd.Series(dtype="object") for c in screen.COLUMNS}))
    images = images.sort_values("path", kind="stable").reset_index(drop=True)
    images.insert(0, "image_id", image_ids(images["path"]))
    return images


def representatives(images: pd.DataFrame) -> pd.Series:
    """Valid images that are the first of their byte-identical group: only these take part in
    the near search and the later tiers."""
    valid = images["error"].isna() & images["codes"].notna()
    return valid & candidates.exact_representatives(images["sha256"])


def screen_embeddings(images: pd.DataFrame, cfg: Config, work_dir: Path, client) -> pd.DataFrame:
    """High-recall mode: the confirm tier's embedding (transform 0, key idx * 8) of every
    representative image, in the feature store under work_dir/embed/screen_embeddings.
    Returns key, part_path, error; run_confirm reuses them (`precomputed`)."""
    from pipeline import confirm
    idx = np.flatnonzero(representatives(images).to_numpy()).astype(np.int64)
    frame = images.set_index(pd.RangeIndex(len(images)))
    return confirm.embed_keys(idx * 8, frame, cfg, str(work_dir / "embed" / SCREEN_EMBED_SUBDIR),
                              client=client)


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
    """Run the whole cascade; returns the manifest written to OUT/run.json."""
    root = Path(root)
    out = Path(out)
    if not root.is_dir():
        raise ConfigError(f"input folder {str(root)!r} does not exist or is not a folder: pass DATA=<folder of images>")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} exists and is not a folder: choose another --out")
    weights_info = None
    high_recall = cfg.screen.mode == "hash+embedding"
    if TIER_ORDER[cfg.tiers] >= TIER_ORDER["confirm"] or high_recall:
        from pipeline import weights  # fail before any heavy work when the weights are missing
        weights_info = weights.check_weights_available(cfg.embed)
    progress = Progress(quiet)
    started = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(cfg.work_dir) if cfg.work_dir else out / f"_work-{os.getpid()}"

    with dask_client(cfg, scheduler) as client:
        t = time.perf_counter()
        images = run_screen(root, cfg, client, progress)
        timings["scan+screen"] = time.perf_counter() - t
        counts["files"] = len(images)
        counts["errors"] = int(images["error"].notna().sum())
        log.info("screened %d files (%d with errors)", counts["files"], counts["errors"])

        try:
            screen_emb = None
            if high_recall:
                t = time.perf_counter()
                with progress.bar("embed", unit="img") as bar:
                    screen_emb = screen_embeddings(images, cfg, work_dir, client)
                    bar.update(len(screen_emb))
                timings["screen_embed"] = time.perf_counter() - t
                counts["screen_embedded"] = len(screen_emb)
                counts["screen_embed_errors"] = int(screen_emb["error"].notna().sum())
            t = time.perf_counter()
            pairs = build_pairs(images, cfg, client, timings=timings,
                                emb_parts=None if screen_emb is None else screen_emb["part_path"].tolist())
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
                with progress.bar("verify", total=len(near), unit="pair") as bar:
                    scores = verify.run_verify(pairs.loc[near, ["idx_a", "idx_b", "transform"]], frame, cfg,
                                               str(work_dir / "orb"), client=client)
                    bar.update(len(near))
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
                    with progress.bar("confirm", total=len(alive), unit="pair") as bar:
                        reuse = None if screen_emb is None else \
                            pd.Series(screen_emb["part_path"].to_numpy(dtype=object),
                                      index=screen_emb["key"].to_numpy(dtype=np.int64))
                        cos = confirm.run_confirm(pairs.loc[alive, ["idx_a", "idx_b", "transform"]], frame,
                                                  cfg, str(work_dir / "embed"), client=client,
                                                  precomputed=reuse)
                        bar.update(len(alive))
                    counts["confirm_embedded"] = int(cos.attrs.get("embedded_keys", 0))
                    counts["confirm_reused"] = int(cos.attrs.get("reused_keys", 0))
                    pairs.loc[alive, "cosine"] = cos.astype("float32")
                timings["confirm"] = time.perf_counter() - t
                counts["confirmed_pairs"] = len(alive)
        finally:
            if not cfg.work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)

    t = time.perf_counter()
    pairs = decide.decide(pairs, cfg)
    dup = pairs[pairs["is_duplicate"]]
    images["cluster_id"] = decide.clusters(len(images), dup["idx_a"].to_numpy(), dup["idx_b"].to_numpy(),
                                           images["image_id"].to_numpy())
    timings["decide"] = time.perf_counter() - t
    counts["duplicate_pairs"] = int(pairs["is_duplicate"].sum())
    counts["clusters"] = int(images.loc[images["cluster_id"] >= 0, "cluster_id"].nunique())
    counts["images_in_clusters"] = int((images["cluster_id"] >= 0).sum())

    pairs = contract_pairs(pairs, images)
    manifest = {
        "tool": "dedupe-pipeline", "version": pipeline.__version__,
        "root": str(root.resolve()), "out": str(out.resolve()),
        "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
        "scheduler": scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or cfg.dask.scheduler,
        "config": cfg.to_dict(), "counts": counts, "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "weights": weights_info, "versions": versions(),
    }
    t = time.perf_counter()
    write.write_outputs(out, images, pairs, manifest)
    manifest["timings_s"]["write"] = round(time.perf_counter() - t, 3)
    write.write_json(manifest, out / "run.json")
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
        "reason": pairs["reason"].to_numpy(),
        "abs_path_a": a["abs_path"].to_numpy(), "abs_path_b": b["abs_path"].to_numpy(),
    })
    return out.sort_values(["path_a", "path_b"], kind="stable").reset_index(drop=True)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("numpy", "PIL", "pillow_heif", "imagehash", "cv2", "pandas", "pyarrow", "dask", "distributed",
                 "numba", "tensorflow", "keras"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found
