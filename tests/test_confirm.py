"""The confirm tier with the real ImageNet weights: copies score high, unrelated photos low, and
embeddings agree across runs, batch compositions and scheduler kinds.

Tolerance: embeddings are compared with atol EMB_ATOL = 1e-5 (cosines likewise). TensorFlow's CPU
kernels (oneDNN) pick their blocking and summation order by batch size, thread count and the CPU's
instruction set (AVX2 vs AVX-512), so the same image in another batch differs in the last float32
bits (1.4e-7 seen on an AMD EPYC without AVX-512). 1e-5 is ~70x that and ~1000x below the
smallest margin the decision rule cares about (thresholds are set to 0.01)."""
from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline import confirm, decode, weights
from pipeline.config import Config

pytestmark = pytest.mark.slow
EMB_ATOL = 1e-5
V2_05 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"


@pytest.fixture(scope="module")
def cfg(models_dir) -> Config:
    c = Config()
    c.embed.weights = str(models_dir / V2_05)
    c.embed.runtime = "keras"  # the Keras path here; TFLite tests name their runtime
    c.embed.batch_size = 16
    c.dask.partition_size = 8
    c.dask.pairs_per_task = 5
    return c


@pytest.fixture(scope="module")
def embedder(cfg):
    return confirm.get_embedder(cfg.embed)


def _save(img: Image.Image, path, quality=92):
    img.save(path, quality=quality)
    return str(path)


def make_copies(src: Image.Image) -> dict[str, tuple[Image.Image, int, int]]:
    """name -> (edited copy, jpeg quality, transform aligning the copy with the original)."""
    w, h = src.size
    small = src.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BILINEAR)
    cw, ch = int(w * 0.8), int(h * 0.8)
    crop = src.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    text = src.copy()
    draw = ImageDraw.Draw(text)
    for i in range(3):
        draw.text((10, 10 + i * h // 4), "(c) 2024 SAMPLE WATERMARK", fill=(255, 255, 255))
    draw.rectangle((0, h - h // 8, w, h), fill=(0, 0, 0))
    mirrored = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {"jpeg30_resize75": (small, 30, 0), "crop80": (crop, 90, 0), "text": (text, 90, 0),
            "mirrored": (mirrored, 90, 4)}


@pytest.fixture(scope="module")
def dataset(photo_paths, tmp_path_factory):
    """4 photos from different sources, their 4 copies each, and one corrupt file."""
    root = tmp_path_factory.mktemp("confirm_images")
    chosen = []
    for prefix in ("bsds__", "pixabay__", "inet5__"):
        chosen += [p for p in photo_paths if p.name.startswith(prefix)][:2]
    chosen = chosen[:1] + chosen[2:3] + chosen[4:5] + chosen[1:2]  # bsds, pixabay, inet5, bsds
    paths, pairs = [], []
    for i, p in enumerate(chosen):
        img, _, _ = decode.load_image(p)
        orig_idx = len(paths)
        paths.append(_save(img, root / f"orig{i}.jpg"))
        for name, (edited, quality, t) in make_copies(img).items():
            pairs.append((orig_idx, len(paths), t, True, name))
            paths.append(_save(edited, root / f"orig{i}_{name}.jpg", quality))
    origs = [0, 5, 10, 15]
    for a in origs:
        for b in origs:
            if a < b:
                pairs.append((a, b, 0, False, "unrelated"))
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    pairs.append((0, len(paths), 0, False, "corrupt"))
    paths.append(str(corrupt))
    # idx values need not be 0..n-1
    images = pd.DataFrame({"abs_path": paths}, index=pd.Index(np.arange(len(paths)) * 3 + 7, name="idx"))
    frame = pd.DataFrame(pairs, columns=["idx_a", "idx_b", "transform", "same", "kind"])
    frame[["idx_a", "idx_b"]] = frame[["idx_a", "idx_b"]] * 3 + 7
    frame["transform"] = frame["transform"].astype(np.int8)
    frame.index = frame.index + 100
    return images, frame


def _embeddings(work_dir) -> pd.DataFrame:
    files = sorted((work_dir / confirm.EMBED_SUBDIR).glob("part-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files]).set_index("key").sort_index()


@pytest.fixture(scope="module")
def inprocess_run(dataset, cfg, embedder, tmp_path_factory):
    images, pairs = dataset
    work = tmp_path_factory.mktemp("work_inproc")
    cos = confirm.run_confirm(pairs, images, cfg, str(work))
    return cos, _embeddings(work)


def test_copies_high_unrelated_low(dataset, inprocess_run):
    images, pairs = dataset
    cos, _ = inprocess_run
    assert cos.dtype == np.float32 and cos.index.equals(pairs.index)
    result = pairs.assign(cosine=cos)
    print(result.to_string(), file=sys.stderr)
    true = result[result.same]
    assert (true.cosine > 0.8).all(), true
    unrelated = result[result.kind == "unrelated"]
    assert (unrelated.cosine < 0.65).all(), unrelated
    assert true.cosine.min() - unrelated.cosine.max() > 0.2
    assert np.isnan(result.loc[result.kind == "corrupt", "cosine"]).all()


def test_mirrored_needs_alignment(dataset, cfg, embedder):
    images, pairs = dataset
    row = pairs[pairs.kind == "mirrored"].iloc[0]
    a = Image.open(images.abs_path[row.idx_a])
    b = Image.open(images.abs_path[row.idx_b])
    aligned = decode.dihedral(b, int(row["transform"]))
    va, vb, vb_aligned = embedder.embed([a, b, aligned])
    assert float(va @ vb_aligned) > float(va @ vb)


def test_embeddings_normalised_and_batch_independent(photo_paths, embedder, cfg):
    imgs = [decode.load_image(p, min_side=224)[0] for p in photo_paths[:20]]
    full = embedder.embed(imgs)
    assert full.dtype == np.float32 and full.shape == (20, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)
    # alone (padded batch), in another composition, and across batch boundaries: equal within EMB_ATOL
    np.testing.assert_allclose(embedder.embed(imgs[7:8])[0], full[7], rtol=0, atol=EMB_ATOL)
    np.testing.assert_allclose(embedder.embed(imgs[::-1]), full[::-1], rtol=0, atol=EMB_ATOL)
    assert embedder.embed([]).shape == (0, embedder.dim)
    assert confirm.get_embedder(cfg.embed) is embedder  # one model per process


def _same_embeddings(emb1: pd.DataFrame, emb2: pd.DataFrame) -> None:
    assert emb1.index.equals(emb2.index)
    a = [confirm.decode_embedding(b) for b in emb1.embedding]
    b = [confirm.decode_embedding(b) for b in emb2.embedding]
    assert [v is None for v in a] == [v is None for v in b]  # the same images failed
    np.testing.assert_allclose(np.stack([v for v in a if v is not None]),
                               np.stack([v for v in b if v is not None]), rtol=0, atol=EMB_ATOL)


def _same_cosines(cos1: pd.Series, cos2: pd.Series) -> None:
    assert np.array_equal(np.isnan(cos1.to_numpy()), np.isnan(cos2.to_numpy()))
    np.testing.assert_allclose(cos1.to_numpy(), cos2.to_numpy(), rtol=0, atol=EMB_ATOL)


def test_cosine_tasks_are_made_as_they_are_sent(dataset, cfg, inprocess_run, tmp_path, monkeypatch):
    """The cosine tasks are made as map_tasks sends them (`_CosineTasks`), at most `in_flight`
    made and unfinished at a time, and each cosine lands at its own pair: the same cosines as the
    first run's, where tasks of 5 pairs split the pairs in five and the pairs' labels are not
    their positions."""
    images, pairs = dataset
    cos1, _ = inprocess_run
    import threading

    from pipeline.progress import in_process_threads
    made, finished, most = [], [0], [0]
    built = confirm._CosineTasks.__getitem__
    cosine_partition = confirm.cosine_partition

    def getitem(self, n):
        made.append(n)
        most[0] = max(most[0], len(made) - finished[0])
        job = built(self, n)
        # positions of the pairs, each key with its own part file, one string per part file
        assert list(job.index) == list(range(n * 5, min(n * 5 + 5, len(pairs))))
        assert (job["key_a"].to_numpy() // 8 == pairs["idx_a"].to_numpy()[job.index]).all()
        assert len({id(p) for p in job["part_a"].dropna()}) == job["part_a"].dropna().nunique()
        return job

    lock = threading.Lock()

    def counted(job, cfg):
        result = cosine_partition(job, cfg)
        with lock:
            finished[0] += 1
        return result

    monkeypatch.setattr(confirm._CosineTasks, "__getitem__", getitem)
    monkeypatch.setattr(confirm, "cosine_partition", counted)
    monkeypatch.setattr(confirm, "tasks_in_flight", lambda client: 2)
    with in_process_threads(2):  # (one at a time, tasks are made one at a time anyway)
        cos2 = confirm.run_confirm(pairs, images, cfg, str(tmp_path))
    assert len(pairs) > 20 and sorted(made) == list(range(-(-len(pairs) // 5)))
    assert 1 <= most[0] <= 2
    assert cos2.index.equals(pairs.index) and cos2.dtype == np.float32
    _same_cosines(cos1, cos2)


def test_rerun_identical(dataset, cfg, inprocess_run, tmp_path):
    images, pairs = dataset
    cos1, emb1 = inprocess_run
    cos2 = confirm.run_confirm(pairs, images, cfg, str(tmp_path))
    _same_embeddings(emb1, _embeddings(tmp_path))
    _same_cosines(cos1, cos2)


def test_embed_partition_records_errors(dataset, cfg, embedder, tmp_path):
    images, _ = dataset
    rows = pd.DataFrame({"key": np.array([8 * 7, 8 * 7 + 4, 8 * 999, 8 * 1000], np.int64),
                         "abs_path": [images.abs_path.iloc[0], images.abs_path.iloc[0],
                                      images.abs_path.iloc[-1], None],
                         "transform": np.array([0, 4, 0, 0], np.int8)})
    summary = confirm.embed_partition(rows, cfg, str(tmp_path), 3)
    assert list(summary.columns) == ["key", "part_path", "error"]
    assert summary.part_path.iloc[0].endswith("part-000003.parquet")
    assert summary.error.iloc[:2].isna().all() and summary.error.iloc[2:].notna().all()
    stored = pq.read_table(summary.part_path.iloc[0]).to_pandas()
    assert list(stored.columns) == ["key", "embedding", "error"]
    assert stored.embedding.iloc[2] is None
    pairs = pd.DataFrame({"key_a": [56, 56, 56], "key_b": [60, 7992, 123456],
                          "part_a": summary.part_path.iloc[0], "part_b": [summary.part_path.iloc[0]] * 2 + [None]},
                         index=[5, 6, 7])
    cos = confirm.cosine_partition(pairs, cfg)
    assert cos.index.tolist() == [5, 6, 7]
    assert 0.3 < cos[5] < 1.0  # flip-lr of the same photo: related, not identical
    assert np.isnan(cos[6]) and np.isnan(cos[7])


def test_a_name_that_is_not_utf8_is_embedded(dataset, cfg, embedder, tmp_path):
    """Such a name travels as bytes (`paths.internal`); it was refused as "no path for this image",
    so each of its pairs reached the confirm tier without a cosine and was rejected."""
    import os
    import shutil
    images, _ = dataset
    odd = os.path.join(os.fsencode(tmp_path), b"copy-\xc3-\xff.jpg")
    shutil.copyfile(images.abs_path.iloc[0], odd)
    rows = pd.DataFrame({"key": np.array([8, 16], np.int64), "abs_path": [images.abs_path.iloc[0], odd],
                         "transform": np.array([0, 0], np.int8)})
    summary = confirm.embed_partition(rows, cfg, str(tmp_path / "emb"), 0)
    assert summary.error.isna().all(), summary.error.tolist()
    pairs = pd.DataFrame({"key_a": [8], "key_b": [16], "part_a": summary.part_path.iloc[0],
                          "part_b": summary.part_path.iloc[0]})
    assert confirm.cosine_partition(pairs, cfg).iloc[0] == pytest.approx(1.0, abs=1e-5)  # the same bytes


def test_a_file_rewritten_since_the_screen_is_not_embedded(dataset, cfg, embedder, tmp_path):
    """As the verify tier's feature task: an embedding of a file rewritten after the screen would be
    filed under the sha256 of the bytes the screen read."""
    import os
    from pipeline import scan
    images, _ = dataset
    path = images.abs_path.iloc[0]
    st = os.stat(path)
    rows = pd.DataFrame({"key": np.array([8, 12], np.int64), "abs_path": [path, path],
                         "transform": np.array([0, 4], np.int8), "bytes": [st.st_size, st.st_size],
                         "mtime_ns": [st.st_mtime_ns, st.st_mtime_ns - 1]})
    summary = confirm.embed_partition(rows, cfg, str(tmp_path / "emb"), 0)
    assert summary.error.iloc[0] is None and summary.error.iloc[1] == scan.CHANGED_SINCE_SCREEN
    half = tmp_path / "half.jpg"  # caught half-written: the failed decode is not the screen's bytes'
    with open(path, "rb") as fh:
        half.write_bytes(fh.read()[:2000])
    cut = confirm.embed_partition(rows.assign(abs_path=str(half)), cfg, str(tmp_path / "emb2"), 1)
    assert (cut.error == scan.CHANGED_SINCE_SCREEN).all()


def test_centre_crop_mode_shape():
    img = Image.new("RGB", (300, 100), (10, 20, 30))
    assert confirm.to_input(img, 224, "crop").shape == (224, 224, 3)
    assert confirm.to_input(img, 224, "squash").shape == (224, 224, 3)


@pytest.mark.parametrize("backbone, alpha, file, dim", [
    ("MobileNet", 0.25, "mobilenet_2_5_224_tf_no_top.h5", 256),
    ("MobileNetV2", 0.35, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5", 1280),
])
def test_other_backbones_with_real_weights(models_dir, photo_paths, backbone, alpha, file, dim):
    c = Config().embed
    c.backbone, c.alpha, c.batch_size = backbone, alpha, 4
    c.weights = str(models_dir / file)
    emb = confirm.get_embedder(c)
    imgs = [decode.load_image(p, min_side=224)[0] for p in photo_paths[:2]]
    vecs = emb.embed(imgs + [imgs[0].resize((200, 140))])
    assert vecs.shape == (3, dim)
    assert float(vecs[0] @ vecs[2]) > float(vecs[0] @ vecs[1])


def test_embedder_never_builds_without_a_weights_file():
    c = Config().embed
    c.backbone = "ResNet50"
    with pytest.raises(ValueError, match="never loads random"):
        confirm.Embedder(c, None)


def _models_loaded() -> int:
    mod = sys.modules.get("pipeline.confirm")
    return len(mod._MODELS) if mod else 0


def test_same_embeddings_on_local_cluster(dataset, cfg, inprocess_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    images, pairs = dataset
    cos1, emb1 = inprocess_run
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", memory_limit="2GiB") as cluster, \
            distributed.Client(cluster) as client:
        cos2 = confirm.run_confirm(pairs, images, copy.deepcopy(cfg), str(tmp_path), client=client)
        models = client.run(_models_loaded)  # worker address -> models built in that process
    emb2 = _embeddings(tmp_path)
    assert sum(models.values()) >= 1 and max(models.values()) == 1, models
    _same_embeddings(emb1, emb2)  # workers use 1 TF thread, this process more: sums differ in order
    _same_cosines(cos1, cos2)


# --- runtimes and task split ----------------------------------------------------------------

COS_TOL = 1e-3  # TFLite vs Keras: same float32 weights, other kernels (XNNPACK): cosines within this


def _labelled_set(labelled_dir):
    import csv
    folder = labelled_dir / "fastneardup_caltech101_rand_resize"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"{folder}/labels.csv is missing")
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [str(folder / r["path"]) for r in rows], [r["group_id"] for r in rows]


def test_tflite_cosines_match_keras_on_labelled_photos(labelled_dir, cfg, embedder):
    """The TFLite conversion of the real weights gives the Keras model's cosines within COS_TOL
    over every pair of a real labelled set (true copies and unrelated photos alike)."""
    paths, groups = _labelled_set(labelled_dir)
    arrays = np.stack([confirm.load_input(p, 0, cfg) for p in paths])
    lite = confirm.get_embedder(dataclasses.replace(cfg.embed, runtime="tflite"))
    assert lite.runtime == "tflite" and embedder.runtime == "keras"
    assert lite.model_path.is_file() and lite.model_path.suffix == ".tflite"
    vk, vt = embedder.embed_arrays(arrays), lite.embed_arrays(arrays)
    np.testing.assert_allclose(np.linalg.norm(vt, axis=1), 1.0, rtol=1e-5)
    diff = np.abs(vk @ vk.T - vt @ vt.T)
    assert diff.max() <= COS_TOL, diff.max()
    # and still a duplicate detector: same-group pairs above different-group pairs on average
    same = np.equal.outer(np.array(groups), np.array(groups))
    off = ~np.eye(len(paths), dtype=bool)
    cos = vt @ vt.T
    assert cos[same & off].mean() > cos[~same].mean() + 0.2
    # batch composition does not matter beyond float rounding
    np.testing.assert_allclose(lite.embed_arrays(arrays[5:6])[0], vt[5], rtol=0, atol=EMB_ATOL)


def test_tflite_conversion_cached_once(cfg, tmp_path, monkeypatch):
    """Converted once into the Keras cache under a name keyed by the weights' sha256 and model
    settings; later embedders (any process) load that file instead of converting again."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    e = dataclasses.replace(cfg.embed, runtime="tflite", batch_size=4)

    def in_this_process(*a):
        raise AssertionError("the Keras model was built in the calling process")
    # the conversion runs in a child process (which this patch does not reach): the caller never
    # imports TensorFlow nor builds the Keras model for it
    monkeypatch.setattr(confirm, "build_model", in_this_process)
    path = confirm.tflite_model(e, e.weights)
    assert path.parent.parent == tmp_path / "keras" / "models" and path.is_file()
    assert "MobileNetV2-a0.5-224-" in path.name and weights.sha256_file(e.weights)[:20] in path.name
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically
    stamp = path.stat().st_mtime_ns
    converted = []
    monkeypatch.setattr(confirm, "_convert_in_child", lambda *a: converted.append(a))
    assert confirm.tflite_model(e, e.weights) == path and path.stat().st_mtime_ns == stamp
    emb = confirm.TFLiteEmbedder(e, e.weights)  # loads the cached file, converts nothing
    assert converted == [] and emb.model_path == path and emb.dim == 1280
    other = weights.tflite_path(dataclasses.replace(e, alpha=0.35), e.weights, confirm.tf_version())
    assert other != path


def test_tflite_conversion_failure_is_reported(cfg, tmp_path, monkeypatch, caplog):
    """A conversion that fails in its child process raises with the child's last words, leaves no
    file (nor a temporary one), and `auto` falls back to Keras with that reason in the log."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    bad = tmp_path / "not-weights.h5"
    bad.write_bytes(b"this is not an HDF5 file" * 100)
    e = dataclasses.replace(cfg.embed, runtime="tflite", weights=str(bad))
    with pytest.raises(RuntimeError, match=r"converting not-weights.h5 to TensorFlow Lite failed \(exit [1-9]"):
        confirm.tflite_model(e, bad)
    folder = tmp_path / "keras" / "models" / "dedupe-tflite"
    assert not folder.exists() or not list(folder.iterdir())
    monkeypatch.setattr(confirm, "_RUNTIMES", {})
    assert confirm.resolve_runtime(dataclasses.replace(e, runtime="auto"), bad) == "keras"
    assert "TensorFlow Lite unavailable here" in caplog.text and "not-weights.h5" in caplog.text


def test_auto_runtime_falls_back_to_keras(cfg, monkeypatch, caplog):
    e = dataclasses.replace(cfg.embed, runtime="auto", batch_size=3)

    def broken(*a):
        raise RuntimeError("converter unavailable")
    monkeypatch.setattr(confirm, "tflite_model", broken)
    monkeypatch.setattr(confirm, "_RUNTIMES", {})
    assert confirm.resolve_runtime(e, e.weights) == "keras"
    assert "converter unavailable" in caplog.text
    c = copy.deepcopy(cfg)
    c.embed = e
    assert confirm.prepare_runtime(c).embed.runtime == "keras"
    assert confirm.prepare_runtime(cfg) is cfg  # keras: nothing to resolve


@pytest.mark.parametrize("n, slots, size, tasks", [
    (737, 1, 256, 3),   # in-process: tasks of dask.partition_size
    (737, 2, 192, 4),   # 2 workers: 4 tasks of whole batches, not 256 + 256 + 225 (one worker idle)
    (100, 2, 64, 2),
    (33, 4, 32, 2),     # never below one batch
    (10_000, 2, 256, 40),
])
def test_task_size_keeps_every_worker_busy(n, slots, size, tasks):
    c = Config()
    assert confirm.task_size(n, c, slots) == size
    assert -(-n // size) == tasks


def test_tflite_on_local_cluster_matches_in_process(dataset, cfg, inprocess_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    images, pairs = dataset
    cos_keras, _ = inprocess_run
    c = copy.deepcopy(cfg)
    c.embed.runtime = "tflite"
    cos1 = confirm.run_confirm(pairs, images, c, str(tmp_path / "in"))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", memory_limit="2GiB") as cluster, \
            distributed.Client(cluster) as client:
        cos2 = confirm.run_confirm(pairs, images, c, str(tmp_path / "dask"), client=client)
    _same_embeddings(_embeddings(tmp_path / "in"), _embeddings(tmp_path / "dask"))
    _same_cosines(cos1, cos2)
    ok = ~np.isnan(cos_keras.to_numpy())
    assert np.array_equal(ok, ~np.isnan(cos1.to_numpy()))
    assert np.abs(cos1.to_numpy()[ok] - cos_keras.to_numpy()[ok]).max() <= COS_TOL


@pytest.mark.parametrize("backbone", ["MobileNetV2", "MobileNet", "MobileNetV3Small", "EfficientNetB0",
                                      "ResNet50V2", "Xception"])
def test_numpy_preprocess_is_keras_preprocess(backbone):
    import keras
    from pipeline.weights import PREPROCESS
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    ref = getattr(keras.applications, PREPROCESS[backbone]).preprocess_input(x.astype(np.float32))
    out = confirm.numpy_preprocess(backbone)(x.astype(np.float32))
    assert out.dtype == np.float32 and np.array_equal(out, np.asarray(ref))  # same operations, same bits


def test_tflite_interpreter_falls_back_to_tf_lite(cfg, monkeypatch):
    """Without the ai-edge-litert package, TensorFlow's own tf.lite interpreter runs the same file
    with the same outputs."""
    e = dataclasses.replace(cfg.embed, runtime="tflite", batch_size=2)
    path = confirm.tflite_model(e, e.weights)
    x = confirm._tf_mode(np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3)).astype(np.float32))

    def run(interp):
        interp.resize_tensor_input(interp.get_input_details()[0]["index"], [2, 224, 224, 3])
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()
    first = run(confirm._interpreter(path, 1))
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import now fails
    fallback = confirm._interpreter(path, 1)
    assert type(fallback).__module__.startswith("tensorflow")
    np.testing.assert_allclose(run(fallback), first, rtol=0, atol=EMB_ATOL)
