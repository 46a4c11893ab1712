"""Verify tier (ORB): real photos with generated edits, the labelled bridge edits, the store path,
determinism, errors, and Dask vs in-process equality."""
from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.verify import edit  # the same edits the benchmark scores
from pipeline import store, verify
from pipeline.config import Config


EDITS = ["crop70", "resize50", "rotate5", "jpeg30", "text"]


@pytest.fixture(scope="module")
def few_photos(photo_paths):
    if len(photo_paths) < 4:
        pytest.skip("need at least 4 photos in ../shared/data/photos")
    step = len(photo_paths) // 4
    return [photo_paths[i * step] for i in range(4)]


@pytest.fixture()
def small_set(few_photos, tmp_path):
    """images (idx: abs_path, error) + pairs (idx_a, idx_b, transform): 3 photos, a crop, a mirror,
    a corrupt file; positives, negatives, a mirror pair both with transform 4 and 0."""
    paths = [str(p) for p in few_photos[:3]]
    img = Image.open(few_photos[0]).convert("RGB")
    crop = tmp_path / "crop.png"
    edit(img, "crop70").save(crop)
    mirror = tmp_path / "mirror.png"
    edit(img, "mirror").save(mirror)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(200))
    paths += [str(crop), str(mirror), str(corrupt)]
    images = pd.DataFrame({"abs_path": paths, "error": [None] * len(paths)})
    pairs = pd.DataFrame({"idx_a": [0, 0, 0, 0, 1, 1, 0, 2],
                          "idx_b": [3, 4, 4, 1, 2, 3, 5, 5],
                          "transform": np.array([0, 4, 0, 0, 0, 0, 0, 0], dtype=np.int8)},
                         index=pd.Index([10, 11, 12, 13, 14, 15, 16, 17]))
    return images, pairs


def test_orb_features_contract(few_photos):
    cfg = Config().verify
    img = Image.open(few_photos[0]).convert("RGB")
    big = img.resize((img.width * 3, img.height * 3))
    f = verify.orb_features(big, cfg)
    assert f["keypoints"].dtype == np.float32 and f["keypoints"].shape[1] == 2
    assert f["descriptors"].dtype == np.uint8 and f["descriptors"].shape == (len(f["keypoints"]), 32)
    assert 0 < len(f["keypoints"]) <= cfg.n_features
    assert max(f["width"], f["height"]) == cfg.max_side
    assert f["scale"] == pytest.approx(f["width"] / big.width)
    assert (f["keypoints"][:, 0] < f["width"]).all() and (f["keypoints"][:, 1] < f["height"]).all()


def test_edits_give_clearly_more_inliers_than_different_photos(few_photos):
    cfg = Config().verify
    originals = [Image.open(p).convert("RGB") for p in few_photos[:3]]
    feats = [verify.orb_features(im, cfg) for im in originals]
    positives = {}
    for i, im in enumerate(originals):
        for e in EDITS:
            m, inl, score, status = verify.verify_pair(feats[i], verify.orb_features(edit(im, e), cfg), cfg)
            positives[(i, e)] = inl
            # (a big "SAMPLE COPY" overlay takes most of the copy's keypoints: its inliers then sit
            # in a few cells of the original, "partial", and the confirm tier decides the pair)
            assert status == "match" or (e == "text" and status == "partial"), (few_photos[i].name, e, m, inl)
            assert 0 < score <= 1
    negatives = {}
    for i in range(3):
        for j in range(i + 1, 3):
            m, inl, score, status = verify.verify_pair(feats[i], feats[j], cfg)
            negatives[(i, j)] = inl
            assert status != "match", (i, j, m, inl)
    assert min(positives.values()) >= 3 * max(1, max(negatives.values())), (positives, negatives)


@pytest.mark.parametrize("kind", ["blank", "flat-gradient", "tiny"])
def test_blank_or_flat_image_is_inconclusive(few_photos, kind):
    cfg = Config().verify
    photo = verify.orb_features(Image.open(few_photos[0]).convert("RGB"), cfg)
    if kind == "blank":
        img = Image.new("RGB", (400, 300), (255, 255, 255))
    elif kind == "flat-gradient":
        ramp = np.tile(np.linspace(90, 110, 400, dtype=np.uint8), (300, 1))
        img = Image.fromarray(np.dstack([ramp] * 3))
    else:
        img = Image.new("RGB", (6, 4), (30, 60, 90))
    flat = verify.orb_features(img, cfg)
    assert len(flat["keypoints"]) < cfg.min_keypoints
    for fa, fb, side in ((photo, flat, "b"), (flat, photo, "a")):
        *_, status, reason = verify._verify(fa, fb, cfg)
        assert status == "inconclusive"
        assert "keypoints in image " + side in reason


def test_bridge_edits_verify_against_original(labelled_dir):
    root = labelled_dir / "threatexchange_pdq"
    with open(root / "labels.csv", newline="") as fh:
        files = [r["path"] for r in csv.DictReader(fh)
                 if r["group_id"] == "bridge" and r["path"].startswith("pdq/data/bridge-mods/")]
    assert "pdq/data/bridge-mods/aaa-orig.jpg" in files and len(files) > 5
    paths = [str(root / f) for f in sorted(files)]
    images = pd.DataFrame({"abs_path": paths, "error": [None] * len(paths)})
    orig = sorted(files).index("pdq/data/bridge-mods/aaa-orig.jpg")
    others = [i for i in range(len(paths)) if i != orig]
    pairs = pd.DataFrame({"idx_a": orig, "idx_b": others, "transform": np.zeros(len(others), np.int8)})
    cfg = Config()
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        res = verify.run_verify(pairs, images, cfg, work)
    bad = res[res["orb_status"] != "match"]
    assert bad.empty, [(paths[pairs.loc[i, "idx_b"]], r) for i, r in bad["orb_reason"].items()]


def test_run_verify_store_path_mirror_and_corrupt(small_set, tmp_path):
    images, pairs = small_set
    res = verify.run_verify(pairs, images, Config(), str(tmp_path / "work"))
    assert list(res.index) == list(pairs.index)
    assert list(res.columns) == verify.RESULT_COLUMNS
    assert str(res["orb_inliers"].dtype) == "int32" and str(res["orb_score"].dtype) == "float32"
    st = res["orb_status"]
    assert st[10] == "match"  # crop
    assert st[11] == "match"  # mirrored copy aligned with transform 4
    assert st[12] != "match"  # ... but not without it (ORB is not mirror-invariant)
    assert res.loc[12, "orb_inliers"] * 4 < res.loc[11, "orb_inliers"]
    assert st[13] != "match" and st[14] != "match"  # different photos
    for i in (16, 17):  # corrupt file: an inconclusive row with the decode error, not an exception
        assert st[i] == "inconclusive"
        assert "not decoded" in res.loc[i, "orb_reason"]
    assert res.loc[10, "orb_reason"].startswith("orb: ")
    assert ((res["orb_score"] >= 0) & (res["orb_score"] <= 1)).all()


def test_verify_tasks_share_one_path_string_per_part_file(small_set, tmp_path, monkeypatch):
    """The driver's verify job: its part-path columns are object columns holding one string per
    part file (taken out of a pandas `str` column they were a new string per pair: ~300 B a pair,
    +200 MB at 100k files), in runs of the pairs' own order (the (idx_a, idx_b) order of a block of
    pairs: no sort over every pair), and give the same results."""
    images, pairs = small_set
    sent = []
    real = verify.map_tasks

    def spy(client, fn, tasks, *args, **kwargs):
        if fn is verify._verify_task:
            # made as each is sent, a few in flight (not a frame of every pair held for the tier)
            assert isinstance(tasks, verify._PairTasks) and kwargs["in_flight"] >= 1
            sent.extend(tasks)
        return real(client, fn, tasks, *args, **kwargs)

    monkeypatch.setattr(verify, "map_tasks", spy)
    cfg = Config()
    cfg.dask.partition_size = 3  # several part files
    cfg.dask.pairs_per_task = 3  # several tasks (the results below: the same as in one)
    res = verify.run_verify(pairs, images, cfg, str(tmp_path / "w"))
    assert len(sent) == 3
    job = pd.concat(sent)
    paths = pd.concat([job["path_a_part"], job["path_b_part"], job["path_b0_part"]])
    assert all(job[c].dtype == object for c in ("path_a_part", "path_b_part", "path_b0_part"))
    assert paths.notna().any() and paths.dropna().nunique() > 1
    assert len({id(p) for p in paths.dropna()}) == paths.dropna().nunique()
    # every pair once, at its position, the tasks runs of consecutive pairs; its keys, transform
    # and its images' errors
    assert [list(t.index) for t in sent] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    key_a = pairs["idx_a"].to_numpy() * 8
    assert (job["key_a"].to_numpy() == key_a[job.index]).all()
    assert (job["transform"].to_numpy() == pairs["transform"].to_numpy()[job.index]).all()
    assert (job["error_a"].isna().to_numpy() == images["error"].reindex(pairs["idx_a"]).isna().to_numpy()[job.index]).all()
    monkeypatch.undo()
    cfg2 = Config()
    cfg2.dask.partition_size = 3
    pd.testing.assert_frame_equal(res, verify.run_verify(pairs, images, cfg2, str(tmp_path / "w2")))


def test_features_partition_records_decode_error(tmp_path, few_photos):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    missing = tmp_path / "gone.jpg"
    rows = pd.DataFrame({"key": np.array([0, 8, 16, 20], np.int64),
                         "abs_path": [str(bad), str(missing), str(few_photos[0]), str(few_photos[0])],
                         "transform": np.array([0, 0, 0, 4], np.int8)})
    summary = verify.features_partition(rows, Config(), str(tmp_path / "f"), 3)
    assert list(summary.columns) == ["key", "part_path", "n_keypoints", "error"]
    assert summary["error"].iloc[0] and summary["error"].iloc[1]
    assert summary["n_keypoints"].iloc[0] == 0
    assert summary["error"].iloc[2] is None and summary["n_keypoints"].iloc[2] > 100
    stored = pd.read_parquet(summary["part_path"].iloc[0])
    assert list(stored["key"]) == [0, 8, 16, 20]
    assert {"key", "n_keypoints", "keypoints", "descriptors", "width", "height", "error"} <= set(stored)


def test_a_file_rewritten_since_the_screen_gets_no_features(tmp_path, few_photos):
    """The feature task checks the file against the screen's bytes and mtime_ns after decoding
    it: features of a file rewritten in between would be of other bytes than its sha256 names, and
    a catalog kept them under it (adopted from a killed run's part, or from a part a compaction
    unlisted, they gave the file's byte copy a wrong verdict at a later run). The error is one a
    catalog tries again."""
    import os
    import shutil
    from pipeline import catalog, scan
    path = tmp_path / "p.jpg"
    shutil.copyfile(few_photos[0], path)
    st = os.stat(path)
    rows = pd.DataFrame({"key": np.array([0, 4], np.int64), "abs_path": [str(path)] * 2,
                         "transform": np.array([0, 4], np.int8), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    same = verify.features_partition(rows, Config(), str(tmp_path / "same"), 0)
    assert same["error"].isna().all() and (same["n_keypoints"] > 100).all()
    moved = verify.features_partition(rows.assign(mtime_ns=st.st_mtime_ns - 10**9), Config(), str(tmp_path / "m"), 0)
    resized = verify.features_partition(rows.assign(bytes=st.st_size + 1), Config(), str(tmp_path / "r"), 0)
    # caught half-written: its decode fails, and that failure is not the bytes' the screen read
    # (kept as "truncated file", it was adopted from a killed run's part for good)
    half = tmp_path / "half.jpg"
    half.write_bytes(path.read_bytes()[:2000])
    cut = verify.features_partition(rows.assign(abs_path=str(half)), Config(), str(tmp_path / "h"), 0)
    for out in (moved, resized, cut):
        assert (out["error"] == scan.CHANGED_SINCE_SCREEN).all() and (out["n_keypoints"] == 0).all()
        assert catalog.tried_again(out["error"]).all()


def test_features_once_per_image_transform(small_set, tmp_path, monkeypatch):
    images, pairs = small_set
    seen = []
    real = verify.features_partition

    def spy(rows, cfg, out_dir, part):
        seen.extend(rows["key"].tolist())
        return real(rows, cfg, out_dir, part)

    monkeypatch.setattr(verify, "features_partition", spy)
    cfg = Config()
    cfg.dask.partition_size = 2
    verify.run_verify(pairs, images, cfg, str(tmp_path))
    mirrored = pairs["transform"] >= 4  # b plain too: a mirrored pair is also checked unmirrored
    need = (set(verify.feature_key(pairs["idx_a"], 0)) | set(verify.feature_key(pairs["idx_b"], pairs["transform"]))
            | set(verify.feature_key(pairs["idx_b"][mirrored], 0)))
    assert sorted(seen) == sorted(int(k) for k in need)  # each needed key exactly once


def test_feature_tasks_take_the_images_in_their_rows_order(small_set, tmp_path, monkeypatch):
    """Each feature task covers the next `dask.partition_size` needed images in the order of the
    `images` frame (path order), whatever their ids (content ids with a catalog, in no order):
    the grouping a task per block of image rows can make (docs/design-notes.md, step 2)."""
    images, pairs = small_set
    ids = np.array([907, 13, 500, 2, 64, 311])  # row i of `images` has id ids[i]
    images = images.set_axis(pd.Index(ids))
    pairs = pairs.assign(idx_a=ids[pairs["idx_a"]], idx_b=ids[pairs["idx_b"]])
    tasks = {}
    real = verify.features_partition

    def spy(rows, cfg, out_dir, part):
        tasks[part] = sorted(rows["key"].floordiv(8).unique().tolist())
        return real(rows, cfg, out_dir, part)

    monkeypatch.setattr(verify, "features_partition", spy)
    cfg = Config()
    cfg.dask.partition_size = 2
    verify.run_verify(pairs, images, cfg, str(tmp_path))
    assert [tasks[p] for p in sorted(tasks)] == [sorted(ids[:2]), sorted(ids[2:4]), sorted(ids[4:])]


def test_pair_tasks_find_each_features_part_from_the_feature_tasks_ranges(small_set, tmp_path, monkeypatch):
    """The pair tasks look up a key's part file by the feature task whose range of image rows
    holds its image (store.RangeParts: a number and a path per task); that is the part the key's
    row was written to, for every key a pair needs: ids in no order, several tasks, features
    given as precomputed (found there), and an image failed upstream (no part)."""
    images, pairs = small_set
    ids = np.array([907, 13, 500, 2, 64, 311])
    images = images.set_axis(pd.Index(ids))
    pairs = pairs.assign(idx_a=ids[pairs["idx_a"]], idx_b=ids[pairs["idx_b"]])
    made_maps = []
    real = store.RangeParts

    def spy(*args, **kwargs):
        made_maps.append(real(*args, **kwargs))
        return made_maps[-1]

    monkeypatch.setattr(store, "RangeParts", spy)
    cfg = Config()
    cfg.dask.partition_size = 2
    need = np.unique(verify.feature_key(*verify.needed_features(pairs["idx_a"], pairs["idx_b"], pairs["transform"])))
    first = verify.run_verify(pairs, images, cfg, str(tmp_path / "a"))
    made = verify.features_made(first)
    where = store.part_of_keys(made["key"], made["part_path"])
    assert sorted(where.index) == sorted(need) and where.nunique() == 3
    assert made_maps[0].paths(need).tolist() == where.reindex(need).tolist()

    # half the keys precomputed (their rows elsewhere), one image failed upstream
    given = where.iloc[::2].copy()  # (the first run's parts, copied elsewhere)
    (tmp_path / "catalog").mkdir()
    given[:] = [shutil.copy(p, tmp_path / "catalog" / f"{k}-{Path(p).name}") for k, p in given.items()]
    given = given.astype(str).astype(object)
    images.loc[500, "error"] = "cannot decode: planted"
    second = verify.run_verify(pairs, images, cfg, str(tmp_path / "b"), precomputed=given)
    made = verify.features_made(second)
    want = pd.concat([given[given.index // 8 != 500], store.part_of_keys(made["key"], made["part_path"])])
    assert not (made["key"] // 8 == 500).any() and not want.index.duplicated().any()
    got = made_maps[1].paths(need)
    assert got.tolist() == want.reindex(need).astype(object).where(lambda w: w.notna(), None).tolist()
    assert got[need // 8 == 500].isna().all() and got[need // 8 != 500].notna().all()


def test_deterministic_and_chunking_invariant(small_set, tmp_path):
    images, pairs = small_set
    first = verify.run_verify(pairs, images, Config(), str(tmp_path / "a"))
    again = verify.run_verify(pairs, images, Config(), str(tmp_path / "a"))
    cfg = Config()
    cfg.dask.partition_size = 1
    cfg.dask.pairs_per_task = 3
    cfg.verify.max_open_partitions = 2
    chunked = verify.run_verify(pairs, images, cfg, str(tmp_path / "b"))
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(first, chunked)


def test_empty_pairs(tmp_path):
    pairs = pd.DataFrame({"idx_a": [], "idx_b": [], "transform": []})
    images = pd.DataFrame({"abs_path": [], "error": []})
    res = verify.run_verify(pairs, images, Config(), str(tmp_path))
    assert len(res) == 0 and list(res.columns) == verify.RESULT_COLUMNS


@pytest.mark.slow
def test_dask_cluster_equals_in_process(small_set, tmp_path):
    distributed = pytest.importorskip("distributed")
    images, pairs = small_set
    cfg = Config()
    cfg.dask.partition_size = 2
    cfg.dask.pairs_per_task = 3
    local = verify.run_verify(pairs, images, cfg, str(tmp_path / "local"))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = verify.run_verify(pairs, images, cfg, str(tmp_path / "dask"), client=client)
    pd.testing.assert_frame_equal(local, remote)


def test_numba_matcher_equals_bfmatcher_reference(few_photos):
    """The numba kernel gives the cv2 BFMatcher.knnMatch path's matches, in the same order, on
    real pairs (edits, mirror, different photos) and on hand-made ties and degenerate sizes."""
    cfg = Config().verify
    originals = [Image.open(p).convert("RGB") for p in few_photos[:3]]
    feats = [verify.orb_features(im, cfg) for im in originals]
    feats += [verify.orb_features(edit(originals[0], e), cfg) for e in EDITS + ["mirror"]]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (60, 32), dtype=np.uint8)
    ties = np.concatenate([base, base[:20]])  # exact duplicates: d1 == d2 for those rows
    near = base.copy()
    near[:, 0] ^= 1  # every descriptor one bit away from its twin
    for d in (base, ties, near, base[:1], base[:2], np.zeros((0, 32), np.uint8)):
        feats.append({"keypoints": np.zeros((len(d), 2), np.float32), "descriptors": d})
    for ratio in (0.8, 0.7, 1.0):
        for fa in feats:
            for fb in feats:
                q, t = verify._good_matches(fa, fb, ratio)
                rq, rt = verify._good_matches_reference(fa, fb, ratio)
                assert q.dtype == np.int64 and t.dtype == np.int64
                np.testing.assert_array_equal(q, rq)
                np.testing.assert_array_equal(t, rt)


def _verify_job(small_set, tmp_path, cfg: Config) -> pd.DataFrame:
    """verify_partition's input for the small set's pairs, over feature files a run wrote."""
    images, pairs = small_set
    verify.run_verify(pairs, images, cfg, str(tmp_path))
    part = {int(k): str(p) for p in sorted(tmp_path.glob("orb-*/part-*.parquet"))
            for k in pd.read_parquet(p, columns=["key"])["key"]}
    assert part
    return verify.pair_job(pairs, part)


def test_the_partition_function_takes_no_default_for_what_the_tasks_give_it(small_set, tmp_path):
    """A column missing from a verify task's frame is an error, not a default: the code that makes
    the frames is not in the stored scores' fingerprint (verify.NOT_FINGERPRINTED)."""
    cfg = Config()
    job = _verify_job(small_set, tmp_path, cfg)
    assert list(job.columns) == list(verify.JOB_COLUMNS)
    for column in ("transform", "key_b0", "error_b"):
        with pytest.raises(ValueError, match=f"lack.*{column}"):
            verify.verify_partition(job.drop(columns=column), cfg)


def test_run_verify_gives_each_pair_what_check_pair_gives_its_features(small_set, tmp_path):
    """The tier's task plumbing (verify.NOT_FINGERPRINTED: which task a pair goes in, the frames
    sent, the results collected) is not in the stored scores' fingerprint, so it must not shape
    them: with tasks of 3 pairs, each pair's numbers are those `check_pair` gives on its features
    made straight from its files, with the keys `pair_feature_keys` names (rotated and mirrored
    pairs, and a corrupt file, included)."""
    images, pairs = small_set
    paths = list(images["abs_path"])
    turned = tmp_path / "turned.png"
    Image.open(paths[3]).rotate(90, expand=True).save(turned)
    images = pd.DataFrame({"abs_path": paths + [str(turned)], "error": [None] * (len(paths) + 1)})
    more = pd.DataFrame({"idx_a": [0, 0, 3], "idx_b": [6, 6, 4], "transform": np.array([1, 5, 6], np.int8)},
                        index=pd.Index([18, 19, 20]))
    pairs = pd.concat([pairs, more])
    cfg = Config()
    cfg.dask.pairs_per_task = 3
    res = verify.run_verify(pairs, images, cfg, str(tmp_path / "work"))
    ka, kb, kb0 = verify.pair_feature_keys(pairs["idx_a"], pairs["idx_b"], pairs["transform"])
    checked = 0
    for i, label in enumerate(pairs.index):
        got = res.loc[label, verify.RESULT_COLUMNS].tolist()
        a, b, t = int(pairs.at[label, "idx_a"]), int(pairs.at[label, "idx_b"]), int(pairs.at[label, "transform"])
        if paths[b:b + 1] == [paths[5]]:  # the corrupt file: inconclusive with its decode error
            assert got[3] == "inconclusive" and "image b not decoded" in got[4], got
            continue
        fb0 = _feature_dict(images.at[b, "abs_path"], 0, cfg) if kb0[i] >= 0 else None
        want = verify.check_pair(_feature_dict(images.at[a, "abs_path"], 0, cfg),
                                 _feature_dict(images.at[b, "abs_path"], int(kb[i]) % 8, cfg), t, cfg.verify, fb0)
        assert got[:2] == list(want[:2]) and got[3:5] == list(want[3:5]), (label, got, want)
        np.testing.assert_allclose(np.array([got[2], got[5], got[6]], float),
                                   np.array([want[2], want[5], want[6]], float), rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked == len(pairs) - 2 and (pairs["transform"] >= 4).sum() == 3


def test_reference_matcher_gives_the_same_results(small_set, tmp_path):
    cfg = Config()
    job = _verify_job(small_set, tmp_path, cfg)
    pd.testing.assert_frame_equal(verify.verify_partition(job, cfg),
                                  verify.verify_partition(job, cfg, reference=True))


def test_a_verify_task_sends_its_texts_as_categories_and_the_driver_gets_the_same_frame(small_set, tmp_path):
    """What a Dask task returns carries each distinct status and reason once (categories); the
    driver copies each task's result into its columns as the task ends, in any order
    (`verify._Collected`), and gets verify_partition's frame (texts as objects, None for none),
    rows with the same text sharing one string across the tasks."""
    cfg = Config()
    job = _verify_job(small_set, tmp_path, cfg)
    job.loc[job.index[0], "path_a_part"] = None  # an image with no features: an inconclusive row
    plain = verify.verify_partition(job, cfg)
    positions = job.reset_index(drop=True)  # (run_verify's job: rows numbered by position)
    half = len(positions) // 2
    sent = [verify._verify_task(positions.iloc[half:], cfg), verify._verify_task(positions.iloc[:half], cfg)]
    assert all(isinstance(task[c].dtype, pd.CategoricalDtype) for task in sent for c in verify.TEXT_COLUMNS)
    assert len(sent[0]["orb_status"].cat.categories) < len(sent[0])
    sent[0].loc[sent[0].index[0], "orb_reason"] = None  # (a row with no text: None, not NaN)
    plain.loc[plain.index[half], "orb_reason"] = None
    collected = verify._Collected(len(job))
    for task in sent:  # (the second half ends first)
        collected.add(task)
    back = collected.frame(job.index)
    pd.testing.assert_frame_equal(back, plain)
    assert back["orb_status"].dtype == object and back["orb_status"].iloc[0] == "inconclusive"
    assert back["orb_reason"].iloc[half] is None
    assert len({id(s) for s in back["orb_status"]}) == back["orb_status"].nunique()
    assert len({id(s) for s in back["orb_reason"].dropna()}) == back["orb_reason"].nunique()


def test_pair_evidence_reproduces_the_tier(small_set, tmp_path):
    """The report's drawings: same matches and inliers as run_verify, b tried plain and mirrored."""
    images, pairs = small_set
    res = verify.run_verify(pairs, images, Config(), str(tmp_path / "work"))
    paths = images["abs_path"]
    for label in (10, 11, 13):  # crop (plain), mirror (transform 4), a different photo
        a, b = paths[pairs.loc[label, "idx_a"]], paths[pairs.loc[label, "idx_b"]]
        ev = verify.pair_evidence(a, b, Config())
        assert (ev["matches"], ev["inliers"]) == (res.loc[label, "orb_matches"], res.loc[label, "orb_inliers"])
        assert ev["inlier"].dtype == bool and len(ev["inlier"]) == ev["matches"]
        assert ev["keypoints_a"].shape == ev["keypoints_b"].shape == (ev["matches"], 2)
        assert ev["mirrored"] == (label == 11)
    # mirror copy: after mapping b back to its own frame, an inlier at x in a sits at width - x in b
    ev = verify.pair_evidence(paths[0], paths[4], Config())
    inl = ev["inlier"]
    wa, wb = ev["size_a"][0], ev["size_b"][0]
    xa = ev["keypoints_a"][inl, 0] / wa
    xb = ev["keypoints_b"][inl, 0] / wb
    assert np.median(np.abs((1 - xa) - xb)) < 0.02
    assert ev["inliers"] >= Config().verify.match_inliers
    with pytest.raises(verify.DecodeError):
        verify.pair_evidence(paths[0], paths[5], Config())


# -- SIFT (verify.method: sift)

def _sift_cfg() -> Config:
    from pipeline.config import load_config
    return load_config(None, ["verify.method=sift"])


def test_sift_features_contract(few_photos):
    cfg = _sift_cfg().verify
    f = verify.features(Image.open(few_photos[0]).convert("RGB"), cfg)
    assert f["descriptors"].dtype == np.float32 and f["descriptors"].shape == (len(f["keypoints"]), 128)
    assert 0 < len(f["keypoints"]) <= cfg.n_features


def test_sift_accepts_edits_and_rejects_different_photos(few_photos):
    cfg = _sift_cfg().verify
    originals = [Image.open(p).convert("RGB") for p in few_photos[:3]]
    feats = [verify.features(im, cfg) for im in originals]
    positives, negatives = {}, {}
    for i, im in enumerate(originals):
        for e in EDITS:
            m, inl, score, status = verify.verify_pair(feats[i], verify.features(edit(im, e), cfg), cfg)
            positives[(i, e)] = inl
            # (a big "SAMPLE COPY" overlay takes most of the copy's keypoints: its inliers then sit
            # in a few cells of the original, "partial", and the confirm tier decides the pair)
            assert status == "match" or (e == "text" and status == "partial"), (few_photos[i].name, e, m, inl)
    for i in range(3):
        for j in range(i + 1, 3):
            m, inl, score, status = verify.verify_pair(feats[i], feats[j], cfg)
            negatives[(i, j)] = inl
            assert status == "no-match", (i, j, m, inl)
    assert min(positives.values()) >= 3 * max(1, max(negatives.values())), (positives, negatives)


def test_sift_matcher_equals_opencv_knn(few_photos):
    # the L2 2-NN + ratio + one-to-one on float descriptors gives what cv2's knnMatch gives
    import cv2
    cfg = _sift_cfg().verify
    img = Image.open(few_photos[1]).convert("RGB")
    fa, fb = verify.features(img, cfg), verify.features(edit(img, "crop70"), cfg)
    q, t = verify._good_matches(fa, fb, cfg.ratio)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(fa["descriptors"], fb["descriptors"], k=2)
    ratio_ok = {(p[0].queryIdx, p[0].trainIdx) for p in knn if p[0].distance < cfg.ratio * p[1].distance}
    got = set(zip(q.tolist(), t.tolist()))
    assert got <= ratio_ok and len(got) >= 0.9 * len(ratio_ok) and len(set(t.tolist())) == len(t)


def test_sift_through_the_feature_store(small_set, tmp_path):
    # float descriptors written to and read back from the per-partition Parquet store
    images, pairs = small_set
    res = verify.run_verify(pairs, images, _sift_cfg(), str(tmp_path / "work"))
    st = res["orb_status"]
    assert st[10] == "match" and st[11] == "match"  # crop; mirrored copy with transform 4
    assert st[13] == "no-match" and st[14] == "no-match"  # different photos
    assert res.loc[10, "orb_reason"].startswith("sift: ")
    assert st[16] == "inconclusive" and "not decoded" in res.loc[16, "orb_reason"]
    assert res["ssim"].isna().all()  # photos have keypoints: no pixel check


def test_options_speed_script(tmp_path, photo_paths):
    from bench import options
    out = tmp_path / "benchmarks.md"
    assert options.main(["--photos", "4", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| orb |" in text and "| sift |" in text and "Pixel check" in text


def test_known_sizes_save_the_second_open_and_change_nothing(small_set, tmp_path, monkeypatch, labelled_dir):
    """With the screen's width/height passed along, a feature task opens each file once (for
    the decode) instead of twice; the features are the same bytes. EXIF-turned photos included
    (the screen's size is after the turn: min/max do not change)."""
    from pipeline.decode import load_image
    images, pairs = small_set
    turned = sorted((labelled_dir / "threatexchange_pdq").rglob("exif-rotn-[68].jpg"))  # stored turned
    assert len(turned) == 2
    paths = list(images["abs_path"]) + [str(p) for p in turned]
    sizes = []
    for p in paths:
        try:
            sizes.append(load_image(p)[1])
        except Exception:
            sizes.append((None, None))
    rows = pd.DataFrame({"key": np.arange(len(paths), dtype=np.int64) * 8, "abs_path": paths,
                         "transform": np.zeros(len(paths), np.int8)})
    plain = verify.features_partition(rows, Config(), str(tmp_path / "plain"), 0)
    opened = []
    real = verify.open_checked

    def spy(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verify, "open_checked", spy)
    sized = rows.assign(width=pd.array([w for w, _ in sizes], dtype="Int64"),
                        height=pd.array([h for _, h in sizes], dtype="Int64"))
    known = verify.features_partition(sized, Config(), str(tmp_path / "sized"), 0)
    assert opened == [p for p, (w, _) in zip(paths, sizes) if w is None]  # only the undecodable one
    a = pd.read_parquet(plain["part_path"].iloc[0])
    b = pd.read_parquet(known["part_path"].iloc[0])
    report_thumb = ["report_thumb", "report_thumb_size"]  # made only when the size is known
    pd.testing.assert_frame_equal(a.drop(columns=report_thumb), b.drop(columns=report_thumb))
    assert (a["n_keypoints"] > 0).sum() >= len(paths) - 1
    assert (a["report_thumb_size"] == 0).all() and (b["report_thumb_size"] > 0).sum() == (b["n_keypoints"] > 0).sum()


def test_shrink_below_2x_stays_close_to_pillows_filter(few_photos):
    """`_bounded` shrinks by less than 2x with OpenCV's plain bilinear (faster than Pillow's
    antialiased one): same size as `resize_max_side`, pixels within a few grey levels (measured:
    mean 0.2-2.6 on the shared photos, most at ~2x), and the two pictures match each other."""
    from pipeline.decode import resize_max_side
    cfg = Config().verify
    for path in few_photos:
        img = Image.open(path).convert("RGB")
        for longest in (cfg.max_side + 6, int(cfg.max_side * 1.25), 2 * cfg.max_side - 1):
            s = longest / max(img.size)
            src = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
            fast, pillow = verify._bounded(src, cfg), resize_max_side(src, cfg.max_side)
            assert fast.size == pillow.size and fast.mode == "RGB"
            diff = np.abs(np.asarray(fast, np.int16) - np.asarray(pillow, np.int16))
            assert diff.mean() < 4.0
            assert verify.verify_pair(verify.orb_features(fast, cfg), verify.orb_features(pillow, cfg),
                                      cfg)[3] == "match"
    # 2x and more: Pillow's filter as before (bit for bit)
    big = Image.open(few_photos[0]).convert("RGB").resize((2 * cfg.max_side, cfg.max_side + 10))
    assert verify._bounded(big, cfg).tobytes() == resize_max_side(big, cfg.max_side).tobytes()


# -- a mirrored transform from the screen that is not a mirror: checked unmirrored too

# A photo whose blurred copy and 8-degree rotated copy (the benchmark's "blur" and "rotate_8"
# edits) hash closest with b mirrored: aHash 4 bits flipped against 6 plain.
LOOKALIKE = "inet5__n03761084_13411_microwave.jpg"


def _feature_dict(path, t: int, cfg: Config) -> dict:
    """A feature row as verify_partition sees it, made straight from the file (b turned by t)."""
    turned = verify.dihedral(verify._load_bounded(str(path), cfg), t)
    f = verify.features(turned, cfg.verify)
    thumb, hist, flat = verify.pixel_features(turned)
    f.update(thumb=thumb, hist=hist, flat=flat, error=None, transform=t)
    f["d64"], f["d64t"] = verify._packed(f["descriptors"])
    return f


@pytest.fixture(scope="module")
def lookalike(photos_dir, tmp_path_factory):
    src = photos_dir / LOOKALIKE
    if not src.exists():
        pytest.skip(f"{src} is missing")
    from PIL import ImageFilter
    from bench.transforms import _rotate_inscribed  # the benchmark's rotate_8 edit
    img = Image.open(src).convert("RGB")
    d = tmp_path_factory.mktemp("lookalike")
    paths = [d / "blur.jpg", d / "rotate_8.jpg", d / "mirror.jpg"]
    img.filter(ImageFilter.GaussianBlur(2.0)).save(paths[0], quality=92)
    _rotate_inscribed(img, -8).save(paths[1], quality=92)
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[2], quality=92)
    return paths


def _screen_transform(path_a, path_b, cfg: Config) -> tuple[int, list[int]]:
    """The dihedral variant of b whose aHash is closest to a's plain one (the screen's pick)."""
    from pipeline.decode import load_image
    from pipeline.screen import image_hashes
    ha, hb = (image_hashes(load_image(str(p))[0], cfg.screen)[0] for p in (path_a, path_b))
    dist = [int(sum(bin(int(w)).count("1") for w in ha[0] ^ hb[t])) for t in range(8)]
    return int(np.argmin(dist)), dist


def test_mirrored_hash_on_an_unmirrored_copy_is_checked_plain(lookalike, tmp_path):
    cfg = Config()
    blur, rotated, mirror = lookalike
    t, dist = _screen_transform(blur, rotated, cfg)
    assert t >= 4 and dist[t] <= cfg.screen.dihedral_max_distance < dist[0], dist  # the case itself
    # the mirrored check alone (what the tier did before) cannot accept it
    fa = _feature_dict(blur, 0, cfg)
    alone = verify.check_pair(fa, _feature_dict(rotated, 4, cfg), t, cfg.verify)
    assert alone[3] != "match" and alone[1] < cfg.verify.match_inliers
    images = pd.DataFrame({"abs_path": [str(p) for p in lookalike], "error": [None] * 3})
    pairs = pd.DataFrame({"idx_a": [0, 0], "idx_b": [1, 2], "transform": np.array([t, 4], np.int8)})
    res = verify.run_verify(pairs, images, cfg, str(tmp_path / "work"))
    assert res.loc[0, "orb_status"] == "match"
    assert res.loc[0, "orb_inliers"] >= cfg.verify.match_inliers > alone[1]
    assert res.loc[0, "orb_reason"].endswith(verify.PLAIN_NOTE)
    # a real mirror copy is still accepted by its mirrored features, with no second check
    assert res.loc[1, "orb_status"] == "match" and verify.PLAIN_NOTE not in res.loc[1, "orb_reason"]
    # the summary rides in attrs uncopied: a column taken from the result shares it (pandas
    # deep-copies attrs; lists of every feature row were copied per column taken)
    assert res["orb_status"].attrs["features"] is res.attrs["features"]
    summary = verify.features_made(res)
    assert "features" not in res.attrs and list(summary.columns) == ["key", "part_path", "n_keypoints", "error"]
    made = set(summary["key"])
    assert {int(verify.feature_key(1, 0)), int(verify.feature_key(1, 4)), int(verify.feature_key(2, 0))} <= made
    assert int(verify.feature_key(2, 4)) in made


def test_a_plain_check_that_is_inconclusive_beats_a_mirrored_no_match_both_ways_only(lookalike):
    """A pair checked both ways round (high-recall mode's embedding-only pairs, checked mirrored
    first on purpose: verify.checked_transforms) keeps its plain check when its verdict is
    better, not only when it is a match: here inconclusive (sent on to the confirm tier) against
    the mirrored check's no-match (rejected for good), so an unmirrored copy that ORB cannot
    settle keeps its way to the cosine. A hash pair keeps the screen's mirrored guess unless the
    plain check is a match: a few noise inliers unmirrored (6 of 14) made a false pair of the
    fast preset, which accepts an inconclusive pair on its hash distance."""
    cfg = Config()
    cfg.verify.reject_inliers, cfg.verify.match_inliers = 20, 10 ** 4  # (no match; no-match below 20)
    blur, rotated, _ = lookalike
    fa = _feature_dict(blur, 0, cfg)
    fb, fb0 = _feature_dict(rotated, 4, cfg), _feature_dict(rotated, 0, cfg)
    mirrored = verify.check_pair(fa, fb, 4, cfg.verify)
    assert mirrored[3] == "no-match", mirrored
    kept = verify.check_pair(fa, fb, 4, cfg.verify, fb0, both_ways=True)
    assert kept[3] == "inconclusive" and kept[1] >= 20 and kept[4].endswith(verify.PLAIN_NOTE)
    assert verify.check_pair(fa, fb, 4, cfg.verify, fb0) == mirrored  # (a hash pair: the screen's guess)


def test_mirrored_turn_is_flip_then_turn_minus_4():
    """decode.DIHEDRAL numbering: t >= 4 is the left-right flip followed by rotation t - 4, so a
    pair kept unmirrored is aligned for the pixel check by turn t - 4 of b's plain picture."""
    from pipeline.decode import GRID_DIHEDRAL
    probe = np.arange(12).reshape(3, 4)
    for t in range(4, 8):
        assert np.array_equal(GRID_DIHEDRAL[t](probe), GRID_DIHEDRAL[t - 4](GRID_DIHEDRAL[4](probe)))
        assert verify._residual(4, t) == t - 4


@pytest.mark.parametrize("flip", [False, True])
def test_no_match_either_way_keeps_the_screens_orientation(few_photos, tmp_path, flip):
    """A pair the keypoints cannot settle (min_keypoints above any count: "inconclusive" both
    ways, as on flat graphics) is not unmirrored on a few more inliers: the pixel check aligns b
    by the screen's transform 5 (flip, then 90 degrees), which lines up a b that really is a's
    transpose; a b that is a turned by 270 degrees is then not aligned (SSIM low), as before the
    unmirrored retry: that case needs keypoints."""
    cfg = Config()
    cfg.verify.min_keypoints = 10 ** 6
    img = Image.open(few_photos[1]).convert("RGB")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    img.save(a)
    (verify.dihedral(img, 5) if flip else img.transpose(Image.Transpose.ROTATE_270)).save(b)
    fa = _feature_dict(a, 0, cfg)
    fb, fb0 = _feature_dict(b, 4, cfg), _feature_dict(b, 0, cfg)
    kept = verify.check_pair(fa, fb, 5, cfg.verify, fb0)
    assert kept[3] == "inconclusive" and verify.PLAIN_NOTE not in kept[4]
    assert kept == verify.check_pair(fa, fb, 5, cfg.verify)  # the same as with no plain features
    assert (kept[5] > 0.9) == flip  # SSIM of b aligned by the screen's transform



# -- a match on a shared part only ("partial", verify.min_coverage)

def _banner(img: Image.Image) -> Image.Image:
    """The same white banner with big text over the top 40 % (a news template, a meme caption)."""
    from PIL import ImageDraw, ImageFont
    img = img.convert("RGB").resize((481, 321))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 481, 128), fill=(250, 250, 250))
    draw.text((15, 10), "BREAKING NEWS", font=ImageFont.load_default(size=35), fill=(200, 0, 0))
    draw.text((15, 50), "Storm hits the coast tonight", font=ImageFont.load_default(size=18), fill=0)
    return img


def _viewer(img: Image.Image) -> Image.Image:
    """A photo viewer's window (title bar, status bar, a column of thumbnails) showing `img` small."""
    from PIL import ImageDraw, ImageFont
    canvas = Image.new("RGB", (800, 600), (222, 222, 222))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, 800, 40), fill=(60, 63, 70))
    draw.text((80, 8), "Photo Viewer - IMG_0001.jpg", font=ImageFont.load_default(size=20), fill=(230,) * 3)
    draw.rectangle((0, 560, 800, 600), fill=(200, 200, 205))
    draw.text((10, 566), "1 of 200   100%", font=ImageFont.load_default(size=18), fill=(40,) * 3)
    for k in range(8):
        draw.rectangle((640, 60 + k * 60, 790, 110 + k * 60), fill=(190, 190, 196))
    canvas.paste(img.convert("RGB").resize((240, 160)), (200, 200))
    return canvas


@pytest.mark.parametrize("template", [_banner, _viewer])
def test_different_pictures_under_one_template_are_a_partial_match_not_a_match(photos_dir, tmp_path, template):
    """Two different photos under the same banner, or shown in the same viewer window: ORB's
    inliers (29 and 274) all sit on the shared part, which made them duplicates at the verify
    tier. The same template over one photo and its edited copy stays a match."""
    cfg = Config()
    a, b = (Image.open(photos_dir / n) for n in ("bsds__test_100099.jpg", "bsds__test_100007.jpg"))
    paths = {}
    for name, img in (("a", template(a)), ("b", template(b)),
                      ("a_copy", template(a.convert("RGB").resize((400, 267)))),
                      ("a_grey", template(a.convert("L").convert("RGB")))):
        paths[name] = tmp_path / f"{name}.jpg"
        img.save(paths[name], quality=92)  # (coverage 0.55 under the banner, 0.45 in the viewer)
    fa, fb = (_feature_dict(paths[n], 0, cfg) for n in ("a", "b"))
    different = verify.check_pair(fa, fb, 0, cfg.verify)
    assert different[1] >= cfg.verify.match_inliers  # (the geometry of the shared part is there)
    assert different[3] == "partial", different[4]
    assert "partial" in different[4] and "min_coverage" in different[4]
    for copy in ("a_copy", "a_grey"):
        same = verify.check_pair(fa, _feature_dict(paths[copy], 0, cfg), 0, cfg.verify)
        assert same[3] == "match", (copy, same[4])
    # verify.min_coverage 0 turns the check off (and verify.region_mismatch 0 the other check that
    # catches such pairs, pipeline/verify.py region_mismatch)
    off = Config(verify=dataclasses.replace(cfg.verify, min_coverage=0.0, region_mismatch=0.0))
    assert verify.check_pair(fa, fb, 0, off.verify)[3] == "match"


def test_a_logo_over_different_photos_is_partial_by_its_disagreeing_region(photos_dir, tmp_path):
    """A large logo over two different photos: ORB's 156 inliers sit on the logo, spread enough
    over both pictures for verify.min_coverage, so the pair was a match. Aligned by those inliers,
    the photos around the logo disagree (34 % of the textured cells): "partial", left to the
    confirm tier (`verify.region_mismatch`). The logo over one photo and over its resized or
    greyed copy stays a match: the aligned pixels agree."""
    from bench.templates import logo
    cfg = Config()
    a, b = (Image.open(photos_dir / n) for n in ("bsds__test_100039.jpg", "bsds__test_103029.jpg"))
    paths = {}
    for name, img in (("a", logo(a)), ("b", logo(b)), ("a_copy", logo(a.convert("RGB").resize((400, 267)))),
                      ("a_grey", logo(a.convert("L").convert("RGB")))):
        paths[name] = tmp_path / f"{name}.jpg"
        img.save(paths[name], quality=60 if name == "a_copy" else 92)
    fa, fb = (_feature_dict(paths[n], 0, cfg) for n in ("a", "b"))
    off = dataclasses.replace(cfg.verify, region_mismatch=0.0)
    assert verify.check_pair(fa, fb, 0, off)[3] == "match"  # (min_coverage alone lets it through)
    different = verify.check_pair(fa, fb, 0, cfg.verify)
    assert different[3] == "partial", different[4]
    assert "region_mismatch" in different[4] and different[1] >= cfg.decide.accept_inliers
    for copy in ("a_copy", "a_grey"):
        same = verify.check_pair(fa, _feature_dict(paths[copy], 0, cfg), 0, cfg.verify)
        assert same[3] == "match", (copy, same[4])
    # the measure itself: a picture against itself disagrees nowhere, b on a third of the cells
    # (0.34; asserted against the setting, with room for a cell read otherwise on another CPU)
    inl = fa["keypoints"][:50]
    assert verify.region_mismatch(fa, fa, inl, inl) == 0.0
    qi, ti, mask, model = verify._geometry(fa, fb, cfg.verify)
    assert verify.region_mismatch(fa, fb, fa["keypoints"][qi[mask]], fb["keypoints"][ti[mask]], model) >= cfg.verify.region_mismatch
    # without the pixel check's thumbnails there is nothing to compare: the check stands aside
    bare = {**fb, "thumb": b""}  # (as a feature row made with verify.pixel_check off)
    assert verify.check_pair(fa, bare, 0, cfg.verify)[3] == "match"


@pytest.mark.parametrize("seed", [0, 3, 16])
def test_a_scanned_chart_copy_is_not_a_region_mismatch(tmp_path, seed):
    """A line chart and its scanned copy (turned 1.5 degrees on grey paper): the inliers sit on the
    plotted lines, a narrow band, and a homography fitted to them alone invents a tilt that puts
    the rest of the chart off (0.4-0.75 of the cells disagreeing), which made the copy "partial".
    RANSAC's own affine map aligns it (0 disagreeing): the lower of the two alignments counts."""
    import random
    from bench import documents
    cfg = Config()
    rng = random.Random(seed)
    a = documents.LAYOUTS["line_chart"](rng)
    copy, quality = documents.copy_of(a, 1, rng)
    a.save(tmp_path / "a.png")
    copy.save(tmp_path / "copy.jpg", quality=quality)
    fa, fc = _feature_dict(tmp_path / "a.png", 0, cfg), _feature_dict(tmp_path / "copy.jpg", 0, cfg)
    qi, ti, mask, model = verify._geometry(fa, fc, cfg.verify)
    src, dst = fa["keypoints"][qi[mask]], fc["keypoints"][ti[mask]]
    # (the refitted homography alone: 0.4-0.75 here; the bound is the setting's, so that a cell
    # or two read otherwise on another CPU does not fail the test)
    assert verify.region_mismatch(fa, fc, src, dst) >= cfg.verify.region_mismatch
    assert verify.region_mismatch(fa, fc, src, dst, model) < cfg.verify.region_mismatch
    assert verify.check_pair(fa, fc, 0, cfg.verify)[3] == "match"


# -- chance matches between repeated shapes (text pages, verify.min_inlier_share)

@pytest.mark.parametrize("layout", ["letter", "code", "receipt"])
def test_different_documents_of_one_layout_are_no_match_and_their_copies_match(tmp_path, layout):
    """Two pages of different text in one font and layout: ORB matches letters to the same letters
    elsewhere and RANSAC lines a handful of them up by chance (6 inliers of 66 matches), which
    left the pair to the confirm tier, where every page of text has a cosine of 0.87-0.98 with
    every other: 445 false pairs among 90 documents (bench/documents.py). Many matches of which
    few agree are chance: "no-match". A page and its copies (resized and re-encoded, scanned
    askew on grey paper, cropped) stay a match."""
    import random
    from bench import documents
    cfg = Config()
    rng = random.Random(5)
    make = documents.LAYOUTS[layout]
    a, b = make(rng), make(rng)
    paths = {"a": tmp_path / "a.png", "b": tmp_path / "b.png"}
    a.save(paths["a"]), b.save(paths["b"])
    for kind in range(3):
        copy, quality = documents.copy_of(a, kind, rng)
        paths[f"copy{kind}"] = tmp_path / f"copy{kind}.jpg"
        copy.save(paths[f"copy{kind}"], quality=quality)
    fa, fb = (_feature_dict(paths[n], 0, cfg) for n in ("a", "b"))
    different = verify.check_pair(fa, fb, 0, cfg.verify)
    assert different[0] >= cfg.verify.chance_min_matches, different[4]  # (many matches: letters)
    assert different[3] == "no-match", different[4]
    assert "min_inlier_share" in different[4] and different[1] < cfg.verify.min_inlier_share * different[0]
    for kind in range(3):
        same = verify.check_pair(fa, _feature_dict(paths[f"copy{kind}"], 0, cfg), 0, cfg.verify)
        assert same[3] in ("match", "partial"), (kind, same[4])  # (a crop may cover < min_coverage)
        assert same[1] >= cfg.verify.min_inlier_share * same[0], (kind, same[4])
    # verify.min_inlier_share 0 turns the check off: the chance inliers decide as before
    off = dataclasses.replace(cfg.verify, min_inlier_share=0.0)
    assert "min_inlier_share" not in verify.check_pair(fa, fb, 0, off)[4]


@pytest.mark.parametrize("layout, seed", [("bar_chart", 3), ("line_chart", 5)])
def test_different_charts_of_one_style_are_decided_by_their_pixels(tmp_path, layout, seed):
    """Charts of other figures on the same axes are mostly flat (56-75 % of their thumbnails),
    just under the flat graphics' FLAT_SHARE: ORB found a few chance inliers (inconclusive or
    partial) and the confirm tier's cosine, 0.79-0.97 ("a chart"), called 36 of 28 charts' pairs
    duplicates. Pairs that mostly flat which ORB leaves undecided are now compared by pixels
    (`verify.semi_flat_share`), and pixels that disagree outright (SSIM ~0.02 <
    `verify.semi_flat_ssim`) decide them; a chart's copy is still a match."""
    import random
    from bench import documents
    cfg = Config()
    rng = random.Random(seed)
    make = documents.LAYOUTS[layout]
    paths = {}
    for name in ("a", "b"):
        paths[name] = tmp_path / f"{name}.png"
        make(rng).save(paths[name])
    copy, _ = documents.copy_of(Image.open(paths["a"]).convert("RGB"), 0, rng)
    paths["copy"] = tmp_path / "copy.jpg"
    copy.save(paths["copy"], quality=70)
    fa, fb, fc = (_feature_dict(paths[n], 0, cfg) for n in ("a", "b", "copy"))
    assert cfg.verify.semi_flat_share <= min(fa["flat"], fb["flat"]) < verify.FLAT_SHARE
    different = verify.check_pair(fa, fb, 0, cfg.verify)
    assert different[3] == "inconclusive", different[4]  # (9 and 7 chance inliers)
    assert different[5] < cfg.verify.semi_flat_ssim, different  # pixel-checked: SSIM ~0.02
    assert verify.check_pair(fa, fc, 0, cfg.verify)[3] == "match"
    # verify.semi_flat_share 0 turns it off: no pixel check for them
    off = dataclasses.replace(cfg.verify, semi_flat_share=0.0)
    assert np.isnan(verify.check_pair(fa, fb, 0, off)[5])


def test_a_small_copy_of_a_chart_is_not_decided_by_its_pixels(tmp_path):
    """A line chart and its copy at a fifth of its size: ORB is inconclusive (8 inliers of 13) and
    the thin lines' blur costs SSIM (0.47): pixels that do not disagree outright leave the pair
    to the cascade (the hash rule, the confirm tier) as before; as a verdict they had made
    14 of 18 such copies in the fast preset 2 (a review of the semi-flat check)."""
    import random
    from bench import documents
    cfg = Config()
    chart = documents.LAYOUTS["line_chart"](random.Random(3))
    chart.save(tmp_path / "a.png")
    chart.resize((chart.width // 5, chart.height // 5), Image.LANCZOS).save(tmp_path / "small.jpg", quality=85)
    fa, fb = (_feature_dict(tmp_path / n, 0, cfg) for n in ("a.png", "small.jpg"))
    assert verify.semi_flat_undecided(fa, fb, cfg.verify, "inconclusive")
    result = verify.check_pair(fa, fb, 0, cfg.verify)
    assert result[3] == "inconclusive", result[4]
    assert cfg.verify.semi_flat_ssim < verify.pixel_check(fa, fb, 0)[0] < cfg.decide.pixel_ssim
    assert np.isnan(result[5]), result  # not a pixel verdict


@pytest.mark.parametrize("turn", [Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90])
def test_a_turned_flat_graphic_is_aligned_exactly_by_the_pixel_check(tmp_path, turn):
    """A slide (flat: the pixels decide) and its copy turned a quarter or half turn, paired with
    transform 0 (a screen's wrong guess, or a high-recall embedding pair): ORB matches it and its
    model turns b, but warping the thumbnail by a model that is a turn up to a fraction of a pixel
    blurred the text's edges (SSIM 0.48, "different"). The exact turn is applied instead."""
    import random
    from bench import documents
    cfg = Config()
    slide = documents.LAYOUTS["slide"](random.Random(1))
    slide.save(tmp_path / "a.png")
    copy = slide.transpose(turn)
    copy.resize((copy.width * 3 // 4, copy.height * 3 // 4)).save(tmp_path / "b.jpg", quality=80)
    fa, fb = (_feature_dict(tmp_path / n, 0, cfg) for n in ("a.png", "b.jpg"))
    assert min(fa["flat"], fb["flat"]) >= verify.FLAT_SHARE  # (so the pixel check decides)
    result = verify.check_pair(fa, fb, 0, cfg.verify)
    assert result[3] == "match", result[4]
    assert result[5] >= cfg.decide.pixel_ssim, result  # 0.87 and 0.98 (0.48 and 0.61 warped)


# -- blank pictures (verify.blank_max_shift)

def test_different_blank_pictures_are_different_and_their_copies_are_not(photos_dir, tmp_path):
    """bench/blank.py's pictures (plain fields and one wall in other light: no edges): ORB finds
    no keypoints there and SSIM reads ~1 for any two, so different ones were pixel matches. With
    their mean grey levels too far apart they are different now; every copy still matches, and
    with verify.blank_max_shift 0 (off) different ones match again."""
    from bench import blank
    cfg = Config()
    labels = blank.make_set(tmp_path / "set", sources=3)
    kinds = labels[labels["case"].isin(["field", "wall"])]
    feats = {p: _feature_dict(tmp_path / "set" / p, 0, cfg) for p in kinds["path"]}
    group = dict(zip(kinds["path"], kinds["group_id"]))
    off = dataclasses.replace(cfg.verify, blank_max_shift=0.0)

    def pixel_match(result) -> bool:  # (decide's pixel rule: both numbers at their bars)
        return result[5] >= cfg.decide.pixel_ssim and result[6] >= cfg.decide.pixel_hist_corr

    different = matched_when_off = copies = 0
    for i, a in enumerate(sorted(feats)):
        for b in sorted(feats)[i + 1:]:
            result = verify.check_pair(feats[a], feats[b], 0, cfg.verify)
            if group[a] == group[b]:
                copies += pixel_match(result)
                assert pixel_match(verify.check_pair(feats[a], feats[b], 0, off)) == pixel_match(result)
            else:
                different += 1
                assert not pixel_match(result), (a, b, result)
                matched_when_off += pixel_match(verify.check_pair(feats[a], feats[b], 0, off))
    # (38 of the 40 copy pairs match, the check on or off: two half-size copies of a noisy grey
    # field lose its hue noise, the histogram's correlation; 31 of 191 different pairs match off)
    assert copies >= 36 and different > 150 and matched_when_off >= 20
