"""The confirm tier: ImageNet MobileNet embeddings per (image, transform), cosine per pair.

Each image that reaches this tier is embedded once per transform it is needed in (key =
`idx * 8 + transform`, the dihedral transform that aligns it with its partner), in tasks of
`dask.partition_size` keys that write their embeddings to the feature store (one Parquet file per
task, `embedding` = float32 little-endian bytes, L2-normalised). Pair tasks of
`dask.pairs_per_task` then read only the partitions they need and compute cosine.

The model is built once per worker process (module-level cache keyed by the embed config and the
weights file), with TensorFlow's intra-op threads set to `embed.threads` or the worker's thread
count, and called through a `tf.function` traced for one fixed batch shape (the last batch is
padded), which is ~2x faster than `model.predict` per batch (docs/benchmarks.md). With
`embed.runtime: tflite` the same weights are converted once to TensorFlow Lite (cached beside the
Keras weights, keyed by their sha256 and the model settings; converted before any task by a
child process of the driver, so no long-lived process imports TensorFlow for it) and run by the
TFLite interpreter with XNNPACK and the same thread count (`TFLiteEmbedder`: cosines within 1e-3
of Keras, bench/embed.py). On a cluster the keys are split so the number of
tasks is a multiple of the worker threads (`task_size`), so no worker idles through the last task.

Image to model input: `decode.load_image(min_side=input_size)` (JPEG draft decode), uniform
borders and UI frames cut off (`embed.trim_borders`, the screen's detector in `pipeline.borders`:
letterboxed and screenshotted copies score like the original), the dihedral transform, then `embed.resize`: "squash" (whole image to input_size x input_size, aspect ratio
ignored) or "crop" (short side to input_size, centre square). Squash is the default: measured on
the shared photos (bench/confirm.py) it separates true pairs -- crops, letterboxed copies, JPEG
resize -- from unrelated photos at least as well as centre crop, and it never discards content at
the edges that a cropped copy might keep.

Embeddings are deterministic: same input -> bitwise same vector whatever the batch composition,
run, or scheduler (tests/test_confirm.py checks in-process vs a LocalCluster).

TensorFlow is imported lazily (inside `Embedder`), so importing this module is cheap.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import borders, decode, scan, storage, store
from pipeline.config import Config, EmbedConfig
from pipeline.progress import Progress, map_tasks, stage_of, tasks_in_flight
from pipeline.weights import PREPROCESS, check_weights_available, resolve_weights

log = logging.getLogger(__name__)

EMBED_SUBDIR = "confirm_embeddings"  # under the work dir

# The definitions that only send the tier's tasks and collect their cosines: the catalog's
# fingerprint of this module leaves them out (`catalog.source_fingerprint`), so editing them keeps
# every stored embedding and cosine. How keys are cut into tasks stays in it (`embed_keys`,
# `task_size`): a task's batches are what the model sees together. An edit to them that does
# change a stored number (a bug fixed) bumps RESULTS_REVISION, which is in the fingerprint.
NOT_FINGERPRINTED = ("EMBED_SUBDIR", "run_confirm", "_CosineTasks")
RESULTS_REVISION = 1


# ---------------------------------------------------------------------------------------------
# TensorFlow set-up (once per process)

_TF_LOCK = threading.Lock()
_TF_THREADS: int | None = None  # intra-op threads this process's TF runtime was configured with


def worker_threads() -> int:
    """Threads of the Dask worker running this code, else the CPUs this process may use."""
    try:
        if "distributed" not in sys.modules:  # a worker has imported it; a plain process need not (~0.4 s)
            raise ImportError
        from distributed import get_worker
        worker = get_worker()
        n = getattr(worker, "nthreads", None) or getattr(getattr(worker, "state", None), "nthreads", None)
        if n:
            return int(n)
    except (ImportError, ValueError):
        pass
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _configure_tf(threads: int):
    """Import TensorFlow and set its thread pools before the runtime starts (only possible once
    per process; a later different request is logged and ignored)."""
    global _TF_THREADS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    with _TF_LOCK:
        if _TF_THREADS is None:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1 if threads <= 2 else 2)
                _TF_THREADS = threads
            except RuntimeError:  # runtime already initialised by someone else in this process
                _TF_THREADS = tf.config.threading.get_intra_op_parallelism_threads() or -1
                log.info("TensorFlow already initialised; intra-op threads stay %s", _TF_THREADS)
        elif _TF_THREADS != threads:
            log.info("TensorFlow intra-op threads already set to %s in this process (asked %s)",
                     _TF_THREADS, threads)
    return tf


# ---------------------------------------------------------------------------------------------
# Pixels -> model input

def to_input(img: Image.Image, size: int, mode: str = "squash") -> np.ndarray:
    """An RGB image -> uint8 array (size, size, 3): "squash" or centre-"crop" (see module doc)."""
    if mode == "crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return arr


def load_input(path: str | bytes, transform: int, cfg: Config) -> np.ndarray:
    """Decode (draft scale >= input_size), apply the dihedral transform, resize. Raises DecodeError."""
    e = cfg.embed
    img, _, _ = decode.load_image(path, min_side=e.input_size, max_pixels=cfg.screen.max_pixels,
                                  max_decode_bytes=cfg.screen.max_decode_bytes)
    if e.trim_borders:
        img = trim_borders(img, cfg)
    img = decode.dihedral(img, int(transform))
    return to_input(img, e.input_size, e.resize)


def trim_borders(img: Image.Image, cfg: Config) -> Image.Image:
    """The picture inside uniform borders and UI frames (`pipeline.borders.content_box`, run on a
    <= 128 px copy, the size the screen hashes at)."""
    small = img.copy()
    small.thumbnail((borders.PROBE, borders.PROBE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    box = borders.content_box(small, cfg.screen.border_tolerance, frames=cfg.screen.trim_frames)
    if box is None:
        return img
    sx, sy = img.width / small.width, img.height / small.height
    left, top = math.ceil(box[0] * sx), math.ceil(box[1] * sy)
    right, bottom = max(left + 1, math.floor(box[2] * sx)), max(top + 1, math.floor(box[3] * sy))
    return img.crop((left, top, right, bottom))


# ---------------------------------------------------------------------------------------------
# The model

class Embedder:
    """A keras.applications backbone (`embed.backbone`) without classifier top, average-pooled,
    ImageNet weights from `weights_path` (a file checked by pipeline.weights), inputs prepared by
    the backbone's own `preprocess_input`. Use `get_embedder` to share one per process."""

    def __init__(self, cfg: EmbedConfig, weights_path):
        self.cfg = cfg
        self.size = int(cfg.input_size)
        self.batch_size = int(cfg.batch_size)
        self.threads = int(cfg.threads or worker_threads())
        tf = _configure_tf(self.threads)
        import keras
        if cfg.backbone not in PREPROCESS:
            raise ValueError(f"embed.backbone={cfg.backbone!r}: expected one of {', '.join(PREPROCESS)}")
        self._preprocess = getattr(keras.applications, PREPROCESS[cfg.backbone]).preprocess_input
        if weights_path is None or str(weights_path) in ("", "imagenet"):
            raise ValueError("Embedder needs a resolved weights file (pipeline.weights.resolve_weights);"
                             " it never loads random or implicitly downloaded weights")
        self.weights_path = str(weights_path)
        self.runtime = "keras"
        self.model = build_model(cfg, self.weights_path)
        self.dim = int(self.model.output_shape[-1])
        spec = tf.TensorSpec((self.batch_size, self.size, self.size, 3), tf.float32)
        model = self.model
        self._tf = tf
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec],
                               reduce_retracing=False)

    def preprocess(self, arrays: np.ndarray) -> np.ndarray:
        """uint8 (n, s, s, 3) -> float32 in the backbone's input range (its preprocess_input)."""
        return np.asarray(self._preprocess(arrays.astype(np.float32)), dtype=np.float32)

    def raw(self, batch: np.ndarray, use_predict: bool = False) -> np.ndarray:
        """Model outputs (not normalised) for preprocessed float32 (n, s, s, 3), n any size: run in
        fixed-shape batches (the last padded with zeros) through the compiled function, or through
        `model.predict` (only for benchmarking)."""
        n, b = len(batch), self.batch_size
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, b):
            chunk = batch[start:start + b]
            m = len(chunk)
            if m < b:
                chunk = np.concatenate([chunk, np.zeros((b - m,) + chunk.shape[1:], np.float32)])
            if use_predict:
                res = self.model.predict(chunk, batch_size=b, verbose=0)
            else:
                res = self.run_batch(chunk)
            out[start:start + m] = res[:m]
        return out

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """Model outputs for exactly `batch_size` preprocessed float32 images."""
        return self._fn(self._tf.constant(batch)).numpy()

    def embed_arrays(self, arrays: np.ndarray, use_predict: bool = False) -> np.ndarray:
        """uint8 (n, s, s, 3) model-size images -> (n, d) float32 L2-normalised embeddings."""
        if len(arrays) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(self.raw(self.preprocess(arrays), use_predict=use_predict))

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images (any size/mode) -> (n, d) float32 L2-normalised, resized per `embed.resize`."""
        arrays = np.stack([to_input(im, self.size, self.cfg.resize) for im in images]) if images else \
            np.zeros((0, self.size, self.size, 3), np.uint8)
        return self.embed_arrays(arrays)


def build_model(cfg: EmbedConfig, weights_path: str):
    """The Keras backbone, no top, average-pooled, with the ImageNet weights in `weights_path`."""
    import keras
    app = getattr(keras.applications, cfg.backbone)
    extra = {"alpha": float(cfg.alpha)} if cfg.backbone.startswith("MobileNet") else {}
    return app(include_top=False, pooling="avg", input_shape=(int(cfg.input_size), int(cfg.input_size), 3),
               weights=str(weights_path), **extra)


def tf_version() -> str:
    """The installed TensorFlow's version, read without importing it."""
    from importlib import metadata
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "none"


_CONVERT_LOCK = threading.Lock()


def tflite_model(cfg: EmbedConfig, weights_path) -> Path:
    """The TensorFlow Lite conversion of the Keras model for `cfg` and these weights, converted on
    first use (in a child process, `_convert_in_child`) and cached (`weights.tflite_path`; written
    to a temporary name then renamed, so a concurrent process sees either no file or a whole one).
    Same input and output as the Keras model (preprocessing stays outside); float32 weights, no
    quantisation."""
    from pipeline.weights import tflite_path
    path = tflite_path(cfg, weights_path, tf_version())
    with _CONVERT_LOCK:
        if path.is_file():
            return path
        _convert_in_child(cfg, weights_path, path, int(cfg.threads or worker_threads()))
        log.info("converted %s to TensorFlow Lite: %s", Path(weights_path).name, path)
    return path


def _convert_in_child(cfg: EmbedConfig, weights_path, path: Path, threads: int) -> None:
    """Run `convert_tflite` in a child Python. Importing TensorFlow and building the Keras model
    leaves ~0.8 GB in a process for good (measured: the driver's RSS 139 -> 934 MB), and neither
    the driver nor a TFLite worker otherwise imports TensorFlow. (A subprocess, not
    multiprocessing: a Dask worker is a daemon process, which may not have multiprocessing
    children.)"""
    import json
    import subprocess
    spec = json.dumps({"embed": dataclasses.asdict(cfg), "weights": str(weights_path), "path": str(path),
                       "threads": threads})
    package_root = str(Path(__file__).resolve().parent.parent)  # the child imports this same `pipeline`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                       if p),
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run([sys.executable, "-c", "import sys; from pipeline.confirm import convert_tflite; "
                           "convert_tflite(sys.argv[1])", spec],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    if done.returncode != 0 or not path.is_file():
        said = (done.stderr or done.stdout or "").strip().splitlines()  # the exception's line is the last
        raise RuntimeError(f"converting {Path(weights_path).name} to TensorFlow Lite failed "
                           f"(exit {done.returncode}): {said[-1] if said else 'no output'}")


def convert_tflite(spec: str) -> None:
    """The conversion itself (`_convert_in_child`'s child): spec = JSON of the embed settings, the
    weights file, the target path and the thread count."""
    import json
    spec = json.loads(spec)
    cfg = EmbedConfig(**spec["embed"])
    path = Path(spec["path"])
    _configure_tf(int(spec["threads"]))
    import tensorflow as tf
    model = build_model(cfg, spec["weights"])
    blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _interpreter(model_path: Path, threads: int):
    """A TFLite interpreter (XNNPACK, TFLite's default CPU delegate, with `threads` threads): from
    the ai-edge-litert package when installed, else TensorFlow's own tf.lite."""
    import warnings
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        _configure_tf(threads)
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice, once per worker
        return Interpreter(model_path=str(model_path), num_threads=threads)


# Keras preprocess_input modules whose function is "tf" mode (x / 127.5 - 1) or the identity (the
# model rescales itself), as Keras computes them on float32 numpy arrays
_TF_MODE = {"mobilenet", "mobilenet_v2", "inception_v3", "inception_resnet_v2", "xception", "resnet_v2", "nasnet"}
_IDENTITY = {"mobilenet_v3", "efficientnet", "efficientnet_v2", "convnext"}


def _tf_mode(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=True)
    x /= 127.5
    x -= 1.0
    return x


def numpy_preprocess(backbone: str):
    """The backbone's `preprocess_input` in plain numpy where it is "tf" mode or the identity (the
    same float32 operations as Keras, so the same bits), which lets a TFLite worker run without
    importing Keras or TensorFlow; Keras's own function otherwise (caffe/torch modes)."""
    module = PREPROCESS[backbone]
    if module in _TF_MODE:
        return _tf_mode
    if module in _IDENTITY:
        return lambda x: np.asarray(x, dtype=np.float32)
    import keras
    return getattr(keras.applications, module).preprocess_input


class TFLiteEmbedder(Embedder):
    """The same backbone and weights as `Embedder`, converted to TensorFlow Lite (`tflite_model`)
    and run by its interpreter with XNNPACK; same preprocessing, fixed batch shape and outputs
    within float rounding (tests/test_confirm.py: cosines within 1e-3 on real photos)."""

    def __init__(self, cfg: EmbedConfig, weights_path):
        if weights_path is None or str(weights_path) in ("", "imagenet"):
            raise ValueError("TFLiteEmbedder needs a resolved weights file (pipeline.weights.resolve_weights)")
        if cfg.backbone not in PREPROCESS:
            raise ValueError(f"embed.backbone={cfg.backbone!r}: expected one of {', '.join(PREPROCESS)}")
        self.cfg = cfg
        self.runtime = "tflite"
        self.size = int(cfg.input_size)
        self.batch_size = int(cfg.batch_size)
        self.threads = int(cfg.threads or worker_threads())
        self.weights_path = str(weights_path)
        self.model_path = tflite_model(cfg, weights_path)
        self._interp = _interpreter(self.model_path, self.threads)
        inp = self._interp.get_input_details()[0]
        self._interp.resize_tensor_input(inp["index"], [self.batch_size, self.size, self.size, 3])
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]["index"]
        out = self._interp.get_output_details()[0]
        self._out, self.dim = out["index"], int(out["shape"][-1])
        self._preprocess = numpy_preprocess(cfg.backbone)
        self._lock = threading.Lock()  # one interpreter, its tensors shared: one batch at a time

    def raw(self, batch: np.ndarray, use_predict: bool = False) -> np.ndarray:
        if use_predict:
            raise ValueError("use_predict is a Keras runtime option")
        return super().raw(batch)

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._interp.set_tensor(self._in, np.ascontiguousarray(batch, dtype=np.float32))
            self._interp.invoke()
            return self._interp.get_tensor(self._out).copy()


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=1, keepdims=True))
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


_MODELS: dict[tuple, Embedder] = {}
_MODELS_LOCK = threading.Lock()


def get_embedder(cfg: EmbedConfig, weights_path=None) -> Embedder:
    """The process-wide Embedder for this embed config (built on first use, then reused by every
    task this worker process runs). Resolves the weights when `weights_path` is not given."""
    if weights_path is None:
        weights_path = resolve_weights(cfg, allow_download=cfg.download)
    runtime = resolve_runtime(cfg, weights_path)
    # "auto" and what it resolved to are one model (the driver resolves it before the tasks)
    key = (dataclasses.astuple(dataclasses.replace(cfg, runtime=runtime)), str(weights_path))
    with _MODELS_LOCK:
        emb = _MODELS.get(key)
        if emb is None:
            emb = _MODELS[key] = (TFLiteEmbedder if runtime == "tflite" else Embedder)(cfg, weights_path)
    return emb


_RUNTIMES: dict[tuple, str] = {}


def resolve_runtime(cfg: EmbedConfig, weights_path=None) -> str:
    """"keras" or "tflite" for `embed.runtime` ("auto": tflite when the model converts here and
    its interpreter loads, else keras, logged once per process)."""
    if cfg.runtime != "auto":
        return cfg.runtime
    if weights_path is None:
        weights_path = resolve_weights(cfg, allow_download=cfg.download)
    key = (dataclasses.astuple(cfg), str(weights_path))
    if key not in _RUNTIMES:
        try:
            _interpreter(tflite_model(cfg, weights_path), int(cfg.threads or worker_threads()))
            _RUNTIMES[key] = "tflite"
        except Exception as exc:  # no tf.lite in this TensorFlow, a backbone it cannot convert, ...
            log.warning("embed.runtime=auto: TensorFlow Lite unavailable here (%s: %s); using Keras",
                        type(exc).__name__, exc)
            _RUNTIMES[key] = "keras"
    return _RUNTIMES[key]


def prepare_runtime(cfg: Config) -> Config:
    """In the driver, before any embedding task: `cfg` with `embed.runtime` resolved ("auto" ->
    keras or tflite) and, for tflite, the model converted and cached once here rather than by
    every worker at once."""
    if cfg.embed.runtime == "keras":
        return cfg
    weights_path = resolve_weights(cfg.embed, allow_download=cfg.embed.download)
    runtime = resolve_runtime(cfg.embed, weights_path)
    if runtime == "tflite":
        tflite_model(cfg.embed, weights_path)
    out = copy.copy(cfg)
    out.embed = dataclasses.replace(cfg.embed, runtime=runtime)
    return out


# ---------------------------------------------------------------------------------------------
# Tasks

def encode(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype="<f4").tobytes()


def decode_embedding(blob) -> np.ndarray | None:
    if blob is None or (isinstance(blob, float) and np.isnan(blob)):
        return None
    return np.frombuffer(blob, dtype="<f4")


def _prepare_chunk(items: list[tuple], cfg: Config) -> list[tuple[int, np.ndarray | None, str | None]]:
    """(position, path, transform, seen) -> (position, model-size uint8 array or None, error or
    None). A path is str, or bytes for a name that is not UTF-8 (`paths.internal`); `seen` the
    file's bytes and mtime_ns as the screen saw them, or None: a local file rewritten since is an
    error (`scan.rewritten`: its embedding would be filed under the sha256 of other bytes)."""
    out = []
    for pos, path, t, seen in items:
        if not isinstance(path, (str, bytes)) or not path:
            out.append((pos, None, "no path for this image"))
            continue
        try:
            arr, error = load_input(path, int(t), cfg), None
        except decode.DecodeError as exc:
            arr, error = None, str(exc)
        except Exception as exc:  # never let one bad file kill the partition
            arr, error = None, f"cannot prepare image: {type(exc).__name__}: {exc}"
        if seen is not None and not storage.is_url(path) and scan.rewritten(path, *seen):
            arr, error = None, scan.CHANGED_SINCE_SCREEN  # (a failed decode too: a half-written file)
        out.append((pos, arr, error))
    return out


def embed_partition(rows: pd.DataFrame, cfg: Config, out_dir: str, part: int) -> pd.DataFrame:
    """Embed `rows` (key, abs_path, transform; optional bytes, mtime_ns: the file as the screen saw
    it) into `out_dir/part-<part>.parquet` (key, embedding, error). Decode errors, and files
    rewritten since the screen, are recorded per row, never raised. Returns key, part_path, error.

    The next batch is decoded in a helper thread while TensorFlow embeds the current one (Pillow
    and TF both release the GIL; measured +3 % (busy machine) to +14 % (quiet) images/s in one
    process on 2 cores)."""
    from concurrent.futures import ThreadPoolExecutor

    embedder = get_embedder(cfg.embed)
    keys = rows["key"].to_numpy(dtype=np.int64)
    seen = (list(zip(rows["bytes"].tolist(), rows["mtime_ns"].tolist())) if "mtime_ns" in rows
            else [None] * len(rows))
    items = list(zip(range(len(rows)), rows["abs_path"].tolist(), rows["transform"].tolist(), seen))
    errors: list[str | None] = [None] * len(rows)
    blobs: list[bytes | None] = [None] * len(rows)
    b = embedder.batch_size
    chunks = [items[i:i + b] for i in range(0, len(items), b)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="confirm-decode") as pool:
        future = pool.submit(_prepare_chunk, chunks[0], cfg) if chunks else None
        for i in range(len(chunks)):
            prepared = future.result()
            if i + 1 < len(chunks):
                future = pool.submit(_prepare_chunk, chunks[i + 1], cfg)
            ok = [(pos, arr) for pos, arr, err in prepared if err is None]
            for pos, _, err in prepared:
                errors[pos] = err
            if ok:
                vecs = embedder.embed_arrays(np.stack([arr for _, arr in ok]))
                for (pos, _), vec in zip(ok, vecs):
                    blobs[pos] = encode(vec)
    frame = pd.DataFrame({"key": keys, "embedding": pd.Series(blobs, dtype=object),
                          "error": pd.Series(errors, dtype=object)})
    part_path = store.write_partition(out_dir, part, frame)
    return pd.DataFrame({"key": keys, "part_path": part_path, "error": pd.Series(errors, dtype=object)})


def cosine_partition(pairs: pd.DataFrame, cfg: Config) -> pd.Series:
    """Cosine (float32, in [-1, 1]) for pairs (key_a, key_b, part_a, part_b); NaN when either
    embedding is missing. Indexed like `pairs`."""
    if len(pairs) == 0:
        return pd.Series(np.zeros(0, np.float32), index=pairs.index, name="cosine")
    ka = pairs["key_a"].to_numpy(dtype=np.int64)
    kb = pairs["key_b"].to_numpy(dtype=np.int64)
    parts = pd.concat([pairs["part_a"], pairs["part_b"]]).to_numpy(dtype=object)
    keys = np.concatenate([ka, kb])
    stored = np.fromiter((isinstance(p, str) and bool(p) for p in parts), bool, count=len(parts))
    vectors: dict[int, np.ndarray] = {}
    if stored.any():
        # (each key from its own part: a failure made again is in its old part too)
        found = store.read_keys(keys[stored], parts[stored])
        if "embedding" in found.columns:
            for key, blob in found["embedding"].items():
                vec = decode_embedding(blob)
                if vec is not None:
                    vectors[int(key)] = vec
    dim = next((len(v) for v in vectors.values()), 1)
    nan = np.full(dim, np.nan, np.float32)
    a = np.stack([vectors.get(int(k), nan) for k in ka]).astype(np.float64)
    b = np.stack([vectors.get(int(k), nan) for k in kb]).astype(np.float64)
    cos = np.clip(np.sum(a * b, axis=1), -1.0, 1.0).astype(np.float32)
    return pd.Series(cos, index=pairs.index, name="cosine")


def _chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[i:i + size] for i in range(0, len(frame), size)]


def embed_keys(keys: np.ndarray, images: pd.DataFrame, cfg: Config, out_dir: str, client=None,
               progress: Progress | None = None, stage_name: str = "embed") -> pd.DataFrame:
    """Embed each key (idx * 8 + transform) into `out_dir`, in tasks of `dask.partition_size` sorted
    keys (Dask when `client`, else in-process). Returns key, part_path, error (one row per key)."""
    keys = np.unique(np.asarray(keys, dtype=np.int64))
    if keys.size == 0:
        return pd.DataFrame({"key": np.zeros(0, np.int64), "part_path": pd.Series(dtype=object),
                             "error": pd.Series(dtype=object)})
    cfg = prepare_runtime(cfg)
    idx = keys // 8
    # (the images' own array: `to_numpy` made a Python string per key, each image's in high-recall mode)
    rows = pd.DataFrame({"key": keys, "abs_path": images["abs_path"].reindex(idx).array,
                         "transform": (keys % 8).astype(np.int8)})
    if "mtime_ns" in images and "bytes" in images:  # the files as the screen saw them (`_prepare_chunk`)
        size, mtime_ns = images["bytes"].reindex(idx), images["mtime_ns"].reindex(idx)
        if size.notna().all() and mtime_ns.notna().all():
            rows["bytes"], rows["mtime_ns"] = size.to_numpy(np.int64), mtime_ns.to_numpy(np.int64)
    chunks = _chunks(rows, task_size(len(rows), cfg, cluster_slots(client)))
    with stage_of(progress)(stage_name, total=len(rows), unit="img") as tracker:
        summaries = map_tasks(client, _embed_task, list(enumerate(chunks)), cfg, out_dir, star=True,
                              tracker=tracker, weight=lambda task: len(task[1]))
    return pd.concat(summaries, ignore_index=True)


def cluster_slots(client) -> int:
    """Tasks the cluster runs at once (its worker threads); 1 in-process."""
    if client is None:
        return 1
    try:
        return max(1, int(sum(client.nthreads().values())))
    except Exception:  # a client without workers yet, or not a distributed Client
        return 1


def task_size(n: int, cfg: Config, slots: int) -> int:
    """Keys per embedding task: at most `dask.partition_size`, and enough tasks to keep every
    slot busy to the end (a multiple of `slots`: 737 keys in tasks of 256 on 2 workers left one
    worker idle for a whole task), in whole batches (the last batch of a task is padded)."""
    size = max(1, int(cfg.dask.partition_size))
    if slots <= 1 or n <= 0:
        return size
    tasks = -(-n // size)
    tasks = -(-tasks // slots) * slots
    b = max(1, int(cfg.embed.batch_size))
    per = -(-n // tasks)
    return min(size, max(b, -(-per // b) * b)) if size >= b else size


def pair_embedding_keys(idx_a, idx_b, transform) -> tuple[np.ndarray, np.ndarray]:
    """The embedding keys each pair is compared with: a plain, b turned by the pair's transform
    (`dihedral(image_b, transform)` aligns b with a)."""
    return (np.asarray(idx_a, dtype=np.int64) * 8,
            np.asarray(idx_b, dtype=np.int64) * 8 + np.asarray(transform, dtype=np.int64))


def _embed_task(part: int, rows: pd.DataFrame, cfg: Config, out_dir: str) -> pd.DataFrame:
    return embed_partition(rows, cfg, out_dir, part)


def run_confirm(pairs: pd.DataFrame, images: pd.DataFrame, cfg: Config, work_dir: str,
                client=None, precomputed=None, progress: Progress | None = None) -> pd.Series:
    """Cosine for each pair (idx_a, idx_b, transform: dihedral(image_b, transform) aligns b with a),
    aligned with `pairs.index` (float32, NaN where an image could not be embedded).

    `images` is indexed by idx with an `abs_path` column. Each needed (image, transform) is embedded
    once, in tasks of `dask.partition_size` keys (sorted, so the task split and batch composition
    are the same on every run), then cosine runs in tasks of `dask.pairs_per_task` pairs; with
    `client` the tasks go to the Dask cluster, otherwise they run in this process.

    `precomputed`: embeddings already in the feature store (e.g. the screen's high-recall mode
    embedded every image with transform 0), a mapping or Series key -> part_path (a key whose
    embedding failed may map to its part too: its cosine is NaN, it is not retried). Those keys
    are not embedded again. The result's `attrs` say how many keys were embedded here and reused.
    """
    if len(pairs) == 0:
        return pd.Series(np.zeros(0, np.float32), index=pairs.index, name="cosine")
    check_weights_available(cfg)  # fail fast (and download once, in the driver) before any task
    ka, kb = pair_embedding_keys(pairs["idx_a"].to_numpy(), pairs["idx_b"].to_numpy(), pairs["transform"].to_numpy())
    keys = np.unique(np.concatenate([ka, kb]))
    known = pd.Series(dtype=object)
    if precomputed is not None and len(precomputed):
        known = pd.Series(precomputed, dtype=object) if not isinstance(precomputed, pd.Series) \
            else precomputed.astype(object)
        known.index = known.index.astype(np.int64)
        known = known[known.index.isin(keys)]
    todo = keys[~np.isin(keys, known.index.to_numpy())]
    out_dir = storage.join(work_dir, EMBED_SUBDIR)
    summary = embed_keys(todo, images, cfg, out_dir, client=client, progress=progress)
    part_of = pd.concat([known, store.part_of_keys(summary["key"], summary["part_path"])])
    failed = int(summary["error"].notna().sum())
    if failed:
        log.info("confirm: %d of %d (image, transform) embeddings failed", failed, len(summary))
    tasks = _CosineTasks(ka, kb, part_of, cfg.dask.pairs_per_task)
    cosine = np.full(len(pairs), np.nan, np.float32)

    def collect(_, result: pd.Series) -> None:  # (indexed by the pairs' positions)
        cosine[result.index.to_numpy(np.int64)] = result.to_numpy(np.float32)

    with stage_of(progress)("confirm", total=len(pairs), unit="pair") as tracker:
        map_tasks(client, cosine_partition, tasks, cfg, tracker=tracker, weight=len, each=collect,
                  in_flight=tasks_in_flight(client))
    cosine = pd.Series(cosine, index=pairs.index, name="cosine")
    cosine.attrs = {"embedded_keys": int(len(summary)), "reused_keys": int(len(known))}
    return cosine


class _CosineTasks:
    """The confirm tier's tasks, each a frame of `step` pairs (key_a, key_b and the part files
    of their embeddings; indexed by the pairs' positions), in the pairs' order, made when indexed:
    `map_tasks(in_flight=...)` indexes each as it is sent, so the driver holds the frames of the
    tasks in flight only, not a frame of every pair with its part paths (~40 B a pair)."""

    def __init__(self, key_a: np.ndarray, key_b: np.ndarray, part_of: pd.Series, step: int):
        self.key_a, self.key_b, self.step = key_a, key_b, max(1, int(step))
        self.parts = store.PartPaths(part_of)  # (one string per part file)

    def __len__(self) -> int:
        return -(-len(self.key_a) // self.step)

    def __getitem__(self, n: int) -> pd.DataFrame:
        if not 0 <= n < len(self):
            raise IndexError(n)
        rows = np.arange(n * self.step, min((n + 1) * self.step, len(self.key_a)), dtype=np.int64)
        ka, kb = self.key_a[rows], self.key_b[rows]
        job = pd.DataFrame({"key_a": ka, "key_b": kb, "part_a": self.parts.paths(ka), "part_b": self.parts.paths(kb)})
        job.index = rows  # (the pairs' positions: run_confirm puts the cosines there)
        return job
