"""High-recall screen (`screen.mode: hash+embedding`): MobileNet neighbours by cosine find the
heavy crops that the 64-bit aHash misses (the screenshot frames the hash finds through its
content-box variant; the kNN finds them too), the candidate count stays bounded
by k per image, confirm reuses the screen's embeddings, and sync == LocalCluster."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageOps

from pipeline import candidates, confirm, run, verify
from pipeline.config import Config, ScreenConfig

pytestmark = pytest.mark.slow
V2_05 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
N_PHOTOS, N_EDITED = 30, 8


def _crop60(img: Image.Image, centre: bool) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * 0.6), round(h * 0.6)
    x, y = ((w - cw) // 2, (h - ch) // 2) if centre else (0, 0)
    return img.crop((x, y, x + cw, y + ch))


def _frame(img: Image.Image, scale: float = 0.7) -> Image.Image:
    """The photo shrunk inside a screenshot-style window (title bar, status bar, side panel)."""
    w, h = img.size
    pw, ph = round(w * scale), round(h * scale)
    title, status, margin = max(18, h // 12), max(12, h // 20), max(8, w // 30)
    cw, ch = pw + 2 * margin + w // 6, ph + title + status + 2 * margin
    canvas = Image.new("RGB", (cw, ch), (222, 222, 222))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, cw, title), fill=(60, 63, 70))
    d.rectangle((0, ch - status, cw, ch), fill=(200, 200, 205))
    for k in range(6):
        y = title + margin + k * (ph // 6)
        d.rectangle((cw - w // 6 + margin // 2, y, cw - margin // 2, y + ph // 6 - 4), fill=(190, 190, 196))
    canvas.paste(img.resize((pw, ph), Image.Resampling.LANCZOS), (margin, title + margin))
    return canvas


@pytest.fixture(scope="module")
def data(photo_paths, tmp_path_factory) -> tuple[Path, set[tuple[str, str]]]:
    """30 real photos; 8 of them also as a 60% crop (JPEG) and inside a window frame (PNG).
    Returns the folder and the 16 (original, edited copy) pairs."""
    if len(photo_paths) < N_PHOTOS:
        pytest.skip(f"need {N_PHOTOS} photos, found {len(photo_paths)}")
    root = tmp_path_factory.mktemp("high-recall-data")
    truth = set()
    for i, p in enumerate(photo_paths[:N_PHOTOS]):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        img.thumbnail((640, 640))
        img.save(root / f"p{i:02d}.jpg", quality=90)
        if i < N_EDITED:
            _crop60(img, centre=i % 2 == 0).save(root / f"p{i:02d}_crop60.jpg", quality=90)
            _frame(img).save(root / f"p{i:02d}_frame.png")
            truth |= {(f"p{i:02d}.jpg", f"p{i:02d}_crop60.jpg"), (f"p{i:02d}.jpg", f"p{i:02d}_frame.png")}
    return root, truth


@pytest.fixture(scope="module")
def base_cfg(models_dir) -> Config:
    c = Config()
    c.embed.weights = str(models_dir / V2_05)
    c.dask.partition_size = 16  # several embedding partitions, so the store has > 1 file
    return c


def _cfg(base: Config, mode: str, work_dir: Path | None = None) -> Config:
    c = copy.deepcopy(base)
    c.screen.mode = mode
    c.catalog = "none"  # the stores of a run without a catalog are inspected (tests/test_catalog.py has the other)
    if work_dir is not None:
        c.work_dir = str(work_dir)  # kept after the run: the stores are inspected below
    return c


def _own(work: Path) -> Path:
    """The run's own folder in a work_dir set in the config (one run per work_dir here)."""
    [folder] = work.glob("run-*")
    return folder


def _pairs(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "pairs.parquet").sort_values(["path_a", "path_b"]).reset_index(drop=True)


def _found(pairs: pd.DataFrame, truth, col=None) -> set:
    rows = pairs if col is None else pairs[pairs[col]]
    return set(zip(rows["path_a"], rows["path_b"])) & truth


def _store_keys(directory: Path) -> np.ndarray:
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        return np.zeros(0, np.int64)
    return np.concatenate([pq.read_table(f, columns=["key"]).column("key").to_numpy() for f in files])


@pytest.fixture(scope="module")
def hash_run(data, base_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("hash-only")
    run.run(data[0], out, _cfg(base_cfg, "hash"), scheduler="sync", quiet=True)
    return out


@pytest.fixture(scope="module")
def sync_run(data, base_cfg, tmp_path_factory):
    """hash+embedding in-process, with a spy on every embedding task (which keys, which store)."""
    out = tmp_path_factory.mktemp("hr-sync")
    calls: list[tuple[str, np.ndarray]] = []
    real = confirm.embed_partition

    def spy(rows, cfg, out_dir, part):
        calls.append((out_dir, rows["key"].to_numpy().copy()))
        return real(rows, cfg, out_dir, part)

    mp = pytest.MonkeyPatch()
    mp.setattr(confirm, "embed_partition", spy)
    try:
        manifest = run.run(data[0], out, _cfg(base_cfg, "hash+embedding", out / "work"), scheduler="sync",
                           quiet=True)
    finally:
        mp.undo()
    return out, manifest, calls


def test_hash_only_misses_heavy_crops_but_finds_frames(data, hash_run):
    _, truth = data
    found = _found(_pairs(hash_run), truth)
    crops = {p for p in found if "crop60" in p[1]}
    frames = {p for p in found if "frame" in p[1]}
    assert len(crops) <= 2, f"aHash unexpectedly found {sorted(crops)}"
    assert len(frames) >= N_EDITED - 2, f"the content-box hash found only {sorted(frames)}"


def test_embedding_neighbours_find_them(data, sync_run, hash_run):
    _, truth = data
    out, manifest, _ = sync_run
    pairs = _pairs(out)
    assert _found(pairs, truth) == truth  # every (original, edited copy) is a candidate
    dups = _found(pairs, truth, "is_duplicate")
    assert len(dups) >= len(truth) - 2, f"only {len(dups)} of {len(truth)} confirmed: {sorted(truth - dups)}"
    # the decide rule is unchanged: no unrelated photos become duplicates
    group = pairs["path_a"].str[:3] == pairs["path_b"].str[:3]
    assert not (pairs["is_duplicate"] & ~group).any()
    # hash pairs keep their rows (same distance as in hash mode)
    hp = _pairs(hash_run)
    merged = hp.merge(pairs, on=["path_a", "path_b"], suffixes=("_h", "_e"))
    assert len(merged) == len(hp)
    assert (merged["hash_distance_h"] == merged["hash_distance_e"]).all()
    # embedding-only pairs carry their (large) min hash distance over the variants
    new = pairs[~pairs.set_index(["path_a", "path_b"]).index.isin(hp.set_index(["path_a", "path_b"]).index)]
    assert len(new) and (new["hash_distance"] > ScreenConfig().max_distance).all()


def test_candidates_bounded_by_k_per_image(data, sync_run, hash_run):
    out, manifest, _ = sync_run
    counts = manifest["counts"]
    n = counts["screen_embedded"]
    assert n == N_PHOTOS + 2 * N_EDITED
    k = ScreenConfig().embedding_k
    hash_only = json.loads((hash_run / "run.json").read_text())["counts"]["near_candidates"]
    assert counts["embedding_only_candidates"] + counts["hash_and_embedding_candidates"] <= k * n
    assert counts["near_candidates"] <= hash_only + k * n
    # the neighbour search itself against brute force on the same stored embeddings
    parts = sorted(str(p) for p in (_own(out / "work") / "embed" / run.SCREEN_EMBED_SUBDIR).glob("part-*.parquet"))
    idx, vecs = map(np.concatenate, zip(*candidates.iter_embeddings(parts)))
    sim = vecs @ vecs.T
    np.fill_diagonal(sim, -np.inf)
    for k, floor in ((1, -1.0), (3, 0.5), (10, 0.6)):
        cfg = dataclasses.replace(ScreenConfig(), mode="hash+embedding", embedding_k=k,
                                  embedding_min_cosine=floor, embedding_index="flat")
        got = candidates.embedding_pairs(parts, cfg)
        assert len(got) <= k * len(idx)
        expect = set()
        for r in range(len(idx)):
            for c in np.argsort(-sim[r], kind="stable")[:k]:
                if sim[r, c] >= floor:
                    expect.add((min(idx[r], idx[c]), max(idx[r], idx[c])))
        assert set(zip(got["idx_a"], got["idx_b"])) == expect
        # IVF (float16 vectors) visiting every list: the same neighbours
        ivf = candidates.embedding_pairs(parts, dataclasses.replace(cfg, embedding_index="ivf",
                                                                    embedding_nprobe=1000))
        assert set(zip(ivf["idx_a"], ivf["idx_b"])) == expect
        assert np.allclose(ivf["cosine"], got["cosine"], atol=2e-3)


def test_confirm_reuses_the_screen_embeddings(sync_run):
    out, manifest, calls = sync_run
    screen_dir = str(_own(out / "work") / "embed" / run.SCREEN_EMBED_SUBDIR)
    screen_keys = np.concatenate([k for d, k in calls if d == screen_dir])
    confirm_keys = [k for d, k in calls if d != screen_dir]
    confirm_keys = np.concatenate(confirm_keys) if confirm_keys else np.zeros(0, np.int64)
    assert (screen_keys % 8 == 0).all() and len(np.unique(screen_keys)) == len(screen_keys)
    # no second inference: confirm embedded only dihedral-transformed keys (hash pairs), never idx*8+0
    assert not (confirm_keys % 8 == 0).any()
    assert not np.isin(confirm_keys, screen_keys).any()
    counts = manifest["counts"]
    assert counts["confirm_reused"] > 0 and counts["confirm_embedded"] == len(confirm_keys)
    assert (confirm_keys.size == 0) or not (_store_keys(_own(out / "work") / "embed" / confirm.EMBED_SUBDIR) % 8 == 0).any()


def test_same_result_on_a_local_cluster(data, base_cfg, sync_run, tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "local"
    cfg = _cfg(base_cfg, "hash+embedding", tmp_path / "work")
    cfg.dask.n_workers = 2
    cfg.dask.memory_limit = "2GiB"
    manifest = run.run(data[0], out, cfg, scheduler="local", quiet=True)
    pd.testing.assert_frame_equal(_pairs(sync_run[0]), _pairs(out))
    a = pd.read_parquet(sync_run[0] / "images.parquet").drop(columns=["mtime"])
    b = pd.read_parquet(out / "images.parquet").drop(columns=["mtime"])
    pd.testing.assert_frame_equal(a, b)
    assert manifest["counts"]["confirm_reused"] == sync_run[1]["counts"]["confirm_reused"]
    # the confirm tier on the cluster did not embed any untransformed image again
    assert not (_store_keys(_own(tmp_path / "work") / "embed" / confirm.EMBED_SUBDIR) % 8 == 0).any()


def test_union_keeps_hash_rows_and_fills_distances():
    rng = np.random.default_rng(3)
    N, V = 6, 9
    codes = rng.integers(0, 2**63, size=(N, V, 1), dtype=np.int64).astype(np.uint64)
    mask = np.ones((N, V), bool)
    cfg = ScreenConfig()
    hash_pairs = pd.DataFrame({"idx_a": [0, 1], "idx_b": [1, 2], "hash_distance": np.int16([3, 5]),
                               "transform": np.int8([2, 0])})
    emb = pd.DataFrame({"idx_a": [0, 3], "idx_b": [1, 5], "cosine": np.float32([0.9, 0.7])})
    out = candidates.union_pairs(hash_pairs, emb, codes, mask, cfg)
    assert list(zip(out.idx_a, out.idx_b)) == [(0, 1), (1, 2), (3, 5)]
    assert out.loc[0, "hash_distance"] == 3 and out.loc[0, "transform"] == 2 and out.loc[0, "source"] == "both"
    assert out.loc[1, "source"] == "hash" and np.isnan(out.loc[1, "embedding_cosine"])
    row = out.loc[2]
    # (transform 0, as the kNN compared the pictures; the verify tier checks it both ways round)
    assert row["source"] == "embedding" and row["transform"] == 0
    assert list(verify.checked_transforms(out["transform"], out["source"] == "embedding")) == [2, 0, 4]
    # expected: min popcount over a's query variants (0..8) vs b's index variants (0, 8), both ways
    pop = lambda x: bin(int(x)).count("1")  # noqa: E731
    expect = min(min(pop(codes[3, v, 0] ^ codes[5, e, 0]), pop(codes[5, v, 0] ^ codes[3, e, 0]))
                 for v in range(V) for e in (0, 8))
    assert row["hash_distance"] == expect


def test_mirrored_heavy_crops_found_by_the_embeddings_are_checked_mirrored(photo_paths, base_cfg, tmp_path):
    """12 photos and a mirrored 60 % crop of each: the hash misses most (distances 11-32), the
    embeddings find 11, and the verify tier checks each both ways round (verify.checked_transforms):
    all 11 are duplicates here (none was, all checked unmirrored, where ORB descriptors do not
    match: 0-5 inliers); no false pair; the confirm tier scores them as the kNN compared them
    (transform 0: the cosine of a mirrored and turned picture was 0.05-0.15 lower)."""
    if len(photo_paths) < 52:
        pytest.skip(f"need 52 photos, found {len(photo_paths)}")
    data = tmp_path / "data"
    data.mkdir()
    for i, p in enumerate(photo_paths[40:52]):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        img.thumbnail((640, 640))
        img.save(data / f"p{i:02d}.jpg", quality=90)
        w, h = img.size
        ImageOps.mirror(img.crop((w // 5, h // 5, w * 4 // 5, h * 4 // 5))).save(data / f"p{i:02d}_mcrop.jpg",
                                                                                  quality=90)
    out = tmp_path / "out"
    run.run(data, out, _cfg(base_cfg, "hash+embedding"), scheduler="sync", quiet=True)
    pairs = _pairs(out)
    same = pairs["path_a"].str[:3] == pairs["path_b"].str[:3]
    assert not (pairs["is_duplicate"] & ~same).any()
    assert int((pairs["is_duplicate"] & same).sum()) >= 10, pairs[same].to_string()


def test_runs_sharing_a_work_dir_each_write_into_a_folder_of_their_own(data, base_cfg, tmp_path, caplog):
    """A work_dir set in the config, shared by two runs without a catalog (two cron jobs, two
    collections): each run's embeddings went to the same part names, filed by its own image rows,
    and a run read the other's vectors as its own (exit 0, other pairs). Each run now writes into
    a folder of its own there, kept after the run until the next one: a run marks its folder
    when it ends, and the next run, on any host, removes the marked ones (a container's host
    name is new at each run: its folders were never removed)."""
    import logging
    import socket
    from pipeline import outdir
    work = tmp_path / "work"
    host = socket.gethostname()
    dead, elsewhere = work / f"run-4194305-0badc0de-{host}", work / "run-1-0badc0de-another-host"
    ended_elsewhere = work / "run-2-0badc0de-another-host"
    for folder in (dead, elsewhere, ended_elsewhere):  # (a run no longer running on this host; others)
        (folder / "embed").mkdir(parents=True)
    outdir.mark_run_ended(ended_elsewhere)
    caplog.set_level(logging.INFO, logger="pipeline")
    run.run(data[0], tmp_path / "first", _cfg(base_cfg, "hash+embedding", work), scheduler="sync", quiet=True)
    assert not dead.exists() and not ended_elsewhere.exists()  # (ended runs' folders removed)
    assert elsewhere.exists() and elsewhere.name in caplog.text  # (one that may run: kept, named)
    [first] = [f for f in work.glob("run-*") if f != elsewhere]
    assert (first / outdir.RUN_ENDED).exists()
    assert list((first / "embed" / run.SCREEN_EMBED_SUBDIR).glob("part-*.parquet"))
    run.run(data[0], tmp_path / "second", _cfg(base_cfg, "hash+embedding", work), scheduler="sync", quiet=True)
    [second] = [f for f in work.glob("run-*") if f != elsewhere]
    assert second != first and not (work / "embed").exists()  # (the first run's folder went)
    assert list((second / "embed" / run.SCREEN_EMBED_SUBDIR).glob("part-*.parquet"))
    pd.testing.assert_frame_equal(_pairs(tmp_path / "first"), _pairs(tmp_path / "second"))
