"""The one typed configuration object, loaded from YAML and `--set key=value` overrides.

Every knob of every stage lives here, grouped by stage; `configs/default.yaml` mirrors it with a
comment per key. Unknown keys and wrongly typed values are rejected with a message that says what
to fix (the CLI turns `ConfigError` into exit code 2).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration the user must fix (bad file, unknown key, wrong type or range)."""


@dataclass
class ScanConfig:
    follow_symlinks: bool = True  # followed, with loop protection
    skip_hidden: bool = True  # names starting with "." (files and folders)
    # Files with these extensions are reported (with an error) even when their content is not a
    # recognised image; other files are kept only when their content sniffs as an image.
    image_extensions: list[str] = field(default_factory=lambda: [
        ".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pgm",
        ".ppm", ".pbm", ".pnm", ".ico", ".jp2", ".heic", ".heif", ".hif", ".avif", ".apng"])
    max_file_bytes: int = 256 * 1024 * 1024  # larger files are recorded as errors, not read


@dataclass
class ScreenConfig:
    hash: Literal["ahash", "phash", "dhash", "whash"] = "ahash"
    hash_size: int = 8  # bits = hash_size**2 (8 -> 64-bit hash)
    max_pixels: int = 200_000_000  # decompression-bomb guard: larger images are errors
    # memory guard per image: an image whose decoded pixels (at the smallest scale its format can
    # decode: JPEG 1/8, HEIC thumbnails; PNG/TIFF full size) would take more bytes is an error
    max_decode_bytes: int = 512 * 2**20
    decode_size: int = 256  # JPEG draft decodes to the smallest scale >= this (pixels, short side)
    strict_jpeg: bool = True  # a JPEG whose compressed data libjpeg reports damaged is an error row
    dihedral: bool = True  # also hash flips/90-degree rotations so mirrored/rotated copies meet
    dihedral_max_distance: int = 4  # flipped/rotated hashes match only this close (true copies: 0-2)
    trim_borders: bool = True  # also hash the picture inside uniform borders (letterbox, pillarbox)
    trim_frames: bool = True  # ... and inside a UI frame (a screenshot of a viewer window), see pipeline/borders.py
    border_tolerance: int = 12  # max channel difference from the edge colour that counts as border
    # candidate search
    max_distance: int = 10  # Hamming distance <= this makes a near candidate pair
    max_candidates: int = 15  # per image: keep only its K nearest (hub guard)
    backend: Literal["mih", "brute"] = "mih"  # multi-index hash or brute force
    # Search spread over a Dask cluster, the same lists as one index either way. "routed": one
    # multi-index planned for every entry, cut into slices of at most search_shard_size entries
    # (one chunk's table, one range of its values; on a cluster also at most a quarter of a
    # worker's share, at least 256; a value prefix is split on at most 12 bits) held by the
    # workers; a query partition goes to every slice, which probes only the flips landing in it,
    # so the probes are one index's. The brute-force backend, or a threshold too wide for chunks
    # (> 200k probes a query), keeps whole shards. For the embedding kNN "routed" means "sharded".
    # "sharded": whole indexes over search_shard_size entries each, every partition probing every
    # shard (the probes paid once per shard). "auto": with a Dask client the index is built and
    # searched on the workers, routed past search_shard_size images, one index (a copy on each
    # worker) below, so the driver compiles no search kernel; in-process, one index. "sharded" and
    # "routed" apply in-process too; "single": one index built in the driver. A catalog re-run's
    # re-derived lists follow the same switch (`candidates.incremental_neighbours`).
    search_sharding: Literal["auto", "sharded", "routed", "single"] = "auto"
    search_shard_size: int = 5_000_000
    exact_group_pairs: int = 50  # exact-copy groups of more than this + 1 files emit a star, not all pairs
    # High-recall mode. "hash": candidates from the hash search only. "hash+embedding": also embed
    # every representative image with the confirm tier's MobileNet (the embeddings are reused by
    # confirm) and add each image's embedding_k nearest neighbours by cosine (FAISS).
    mode: Literal["hash", "hash+embedding"] = "hash"
    embedding_k: int = 10  # hash+embedding: nearest neighbours per image by cosine (hub guard)
    embedding_min_cosine: float = 0.5  # hash+embedding: neighbours below this cosine are not candidates
    # hash+embedding: "flat" exact inner-product search; "ivf" approximate (inverted lists over
    # float16 vectors: half the memory, ~30x less work at 1M images); "auto" = flat up to
    # embedding_exact_max representative images, ivf above
    embedding_index: Literal["auto", "flat", "ivf"] = "auto"
    embedding_exact_max: int = 200_000  # "auto": largest N searched exactly
    embedding_nprobe: int = 32  # "ivf": inverted lists visited per query (more = closer to exact, slower)
    # hash+embedding with search_sharding (as for the hash search; "auto": a Dask client and more
    # than this many embeddings): FAISS index shards of about this many embeddings, built on the
    # workers; every partition is searched against every shard and the k nearest merged (flat:
    # the same pairs as one index). 1280-d: 2.5 KB (ivf) or 5 KB (flat) per embedding in a shard.
    embedding_shard_size: int = 500_000


@dataclass
class VerifyConfig:
    # Keypoints: "orb" (binary, fast) or "sift" (128 floats per keypoint, ~19x slower per image);
    # with sift the orb_* output columns hold SIFT's numbers (docs/benchmarks.md compares them).
    method: Literal["orb", "sift"] = "orb"
    # Flat pairs (too few keypoints, or both images flat: logos, UI screenshots, text on colour) are
    # compared by their pixels: SSIM and colour-histogram correlation (thresholds in DecideConfig).
    # On by default: same figures on the photo sets, precision 1.0 vs 0.69 (cosine) on flat graphics
    pixel_check: bool = True
    max_side: int = 384  # ORB runs on the image resized so its longer side is <= this
    upscale_below: int = 192  # images whose longer side is below this are enlarged to max_side (0 = never)
    n_features: int = 500  # ORB keypoints per image (cap)
    grid: int = 4  # keypoints spread over grid x grid cells (1 = plain strongest-N ORB)
    oversample: int = 3  # with grid > 1: detect oversample * n_features candidates, then spread
    scale_factor: float = 1.2  # ORB pyramid scale step
    n_levels: int = 8  # ORB pyramid levels
    fast_threshold: int = 20  # ORB FAST corner threshold (lower finds more keypoints on flat images)
    ratio: float = 0.8  # Lowe's ratio test
    min_keypoints: int = 25  # fewer keypoints on either image -> "inconclusive"
    ransac_threshold: float = 8.0  # reprojection error (pixels, at max_side scale)
    # RANSAC model: "affine" (6-DOF, estimateAffine2D), "similarity" (4-DOF, estimateAffinePartial2D)
    # or "homography" (findHomography); affine measured best (see pipeline/verify.py, _ransac)
    model: Literal["homography", "affine", "similarity"] = "affine"
    ransac_max_iters: int = 2000  # RANSAC iterations cap
    ransac_confidence: float = 0.995  # RANSAC stops early once this confident
    min_good_matches: int = 8  # fewer ratio-test matches -> no RANSAC, zero inliers
    match_inliers: int = 15  # inliers >= this -> status "match"
    reject_inliers: int = 6  # inliers < this (with enough keypoints) -> "no-match"; between: "inconclusive"
    # a match whose inliers hold less than this share of either picture's keypoints (the most
    # covered one's, COVER_GRID cells) -> "partial": a shared layout, banner, frame or logo over
    # different pictures; not accepted on ORB's word (pipeline/verify.py, _coverage). 0 = off
    min_coverage: float = 0.6
    # a match (scoring below verify.REGION_MAX_SCORE) whose aligned pictures disagree on at least
    # this share of their textured cells -> "partial": the same layout over different pictures,
    # where the inliers cover both pictures well enough for min_coverage (pipeline/verify.py,
    # region_mismatch; it compares the pixel check's thumbnails: none with pixel_check off). 0 = off
    region_mismatch: float = 0.2
    # chance matches: two pages of different text (or tiles, brickwork, a fence) give tens of
    # ratio-test matches between repeated shapes, a few of which RANSAC lines up by chance (6-31
    # inliers, 13-32 % of the matches, bench/documents.py); a copy's inliers are most of its matches
    # (photos: >= 55 % at 20+ matches, make eval's sets). With >= chance_min_matches matches and
    # inliers below min_inlier_share of them -> "no-match" (pipeline/verify.py). 0 = off
    min_inlier_share: float = 0.3
    chance_min_matches: int = 20
    # mostly flat pairs (charts, diagrams, maps: both images at least this share flat, below the
    # flat graphics' 0.8) that ORB leaves inconclusive or partial are compared by pixels too, and
    # pixels that disagree outright (SSIM < semi_flat_ssim) make them different: charts of other
    # figures in one style got 6-17 chance inliers and cosines of 0.79-0.97 (SSIM ~0.02; a
    # chart's copy resized to a third 0.47-0.68). 0 = off
    semi_flat_share: float = 0.55
    semi_flat_ssim: float = 0.3
    # blank pictures (skies, walls, fog, blur: no edges, where SSIM reads ~1 for any two): both
    # thumbnails structureless and their mean grey levels more than this apart -> different.
    # Copies (re-encode, resize, 90 % crop, PNG) move it <= 4.8; a 3 % brightness edit ~6, a corner
    # crop of a strong gradient 7; other blank pictures 0.6-77 (bench/blank.py); recoloured logos
    # up to 12, but they have edges, which this never looks at. 0 = off
    blank_max_shift: float = 10.0
    # blank pictures of another colour: both structureless, both coloured (saturation >= 64 on most
    # of them; a grey one's hue is noise) and their HSV histograms correlating below this ->
    # different. Solid red against solid magenta (grey thumbnails 7 levels apart) correlate 0.65;
    # colours a hue, saturation or value bin apart 0.60-0.70, coloured blank copies >= 0.92
    # (bench/blank.py), but a solid colour's JPEG copy moved across a bin edge ~0.63 too (5 % of
    # them). 0 = off
    blank_min_hist_corr: float = 0.8
    seed: int = 12345  # OpenCV RNG seed, so RANSAC is deterministic
    opencv_threads: int = 1  # OpenCV threads inside a verify task (Dask parallelises; 0 = leave as is)
    max_open_partitions: int = 8  # a pair task loads at most this many feature files at a time


# keras.applications models usable as the confirm tier's backbone (pipeline/weights.py holds their
# weight files; a test keeps the two lists equal)
BACKBONES = (
    "MobileNetV2", "MobileNet", "MobileNetV3Small", "MobileNetV3Large",
    "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3", "EfficientNetB4", "EfficientNetB5",
    "EfficientNetB6", "EfficientNetB7", "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2",
    "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L",
    "ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2", "ResNet152V2", "VGG16", "VGG19",
    "DenseNet121", "DenseNet169", "DenseNet201", "ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase",
    "ConvNeXtLarge", "ConvNeXtXLarge", "InceptionV3", "InceptionResNetV2", "Xception", "NASNetMobile",
    "NASNetLarge",
)


@dataclass
class EmbedConfig:
    # MobileNet = v1. Only MobileNetV2 0.5/0.35 and MobileNet 0.25 weights ship in ../shared/models;
    # the others need their Keras weight file (the run stops first and names it)
    backbone: Literal[BACKBONES] = "MobileNetV2"
    # width multiplier of MobileNet/V2/V3 (must have ImageNet weights, pipeline/weights.py); others ignore it
    alpha: float = 0.5
    input_size: int = 224  # square model input (pixels); 96-224 have their own Keras weights
    weights: str = "imagenet"  # "imagenet" (Keras cache, $KERAS_HOME/models) or a path to .h5
    # When the imagenet file is not in the Keras cache: download it once (as Keras does) if the
    # download host answers within seconds. false (or env DEDUPE_OFFLINE=1) = never download.
    download: bool = True
    # How an image becomes input_size x input_size: "squash" resizes the whole image ignoring the
    # aspect ratio; "crop" resizes the short side then takes the centre square (drops the edges).
    resize: Literal["squash", "crop"] = "squash"
    # Embed the picture inside uniform borders and UI frames (letterbox bars, a viewer window),
    # as the screen's trimmed hash does (same detector, screen.border_tolerance / trim_frames).
    trim_borders: bool = True
    batch_size: int = 32  # images per inference call (the last batch is padded: one traced shape); 32 measured fastest
    threads: int = 0  # inference threads per worker process (TF intra-op / TFLite); 0 = the worker's thread count
    # keras: the Keras model through a compiled tf.function. tflite: the same weights converted
    # once to TensorFlow Lite (cached beside the weights, keyed by their sha256) and run with
    # XNNPACK (measured 2.2x Keras's images/s at 1 thread, as each Dask worker runs, 1.2x at 2;
    # cosines within 4e-6: docs/benchmarks.md "embed").
    # auto: tflite when this TensorFlow can convert and run it, else keras.
    runtime: Literal["keras", "tflite", "auto"] = "auto"


@dataclass
class DecideConfig:
    # The rule (pipeline/decide.py): ORB inliers >= accept_inliers -> duplicate at the verify tier
    # (no embedding needed); ORB "no-match" -> different; the rest goes to confirm, where it is a
    # duplicate when cosine >= cosine_threshold, or inliers >= support_inliers and cosine >= cosine_floor.
    accept_inliers: int = 25  # geometry this clear needs no confirmation (false pairs: max 17 of 108k)
    cosine_threshold: float = 0.78  # cosine alone at or above this: duplicate
    support_inliers: int = 10  # with this much geometry ...
    cosine_floor: float = 0.65  # ... a cosine at or above this suffices
    # ... or, whatever the cosine, a hash this close and ORB inliers this many, making this share
    # of its matches (blurred and contrast-changed copies: the embedding moves, the hash and the
    # geometry do not; no different photos measured so; -1 turns it off)
    hash_orb_distance: int = 2
    hash_orb_inliers: int = 8
    hash_orb_share: float = 0.8
    screen_only_distance: int = 4  # with tiers=screen: duplicates are pairs at <= this distance
    # verify.pixel_check: a flat pair is a duplicate when SSIM >= pixel_ssim and
    # hist_corr >= pixel_hist_corr, different otherwise (calibrated with bench/pixel_check.py)
    pixel_ssim: float = 0.8
    pixel_hist_corr: float = 0.5


@dataclass
class DaskConfig:
    # "auto": in-process for small work, else a LocalCluster started while the walk goes on;
    # "local" (a LocalCluster sized to the machine), "sync" (in-process), or a scheduler address
    scheduler: str = "auto"
    # "auto": at most this many files to screen -> in-process on one thread per core (below it a
    # cluster's start-up, worker imports and one model build per worker cost more than separate
    # processes save; `python -m bench.scheduler` measures the crossover on a machine)
    auto_max_files: int = 2000
    n_workers: int = 0  # local cluster: 0 = one per core
    threads_per_worker: int = 1
    partition_size: int = 256  # images per screen/feature task
    pairs_per_task: int = 2000  # candidate pairs per verify/confirm task
    memory_limit: str = "auto"
    # local cluster: where the Dask dashboard listens (logged at start); "" = no dashboard. When
    # the port is taken, Dask picks a free one and the log says which.
    dashboard_address: str = ":8787"


# which member of a cluster to keep (pipeline/results.py): the report's suggestion, `dedupe plan --keep`
KeepPolicy = Literal["largest_pixels", "largest_file", "oldest", "newest", "shortest_path", "preferred_folder"]
KEEP_POLICIES: tuple[str, ...] = get_args(KeepPolicy)


@dataclass
class ReportConfig:
    # OUT/report/ (pipeline/report.py): the largest clusters, paged; thumbnails made once per shown image
    keep: KeepPolicy = "largest_pixels"  # suggested keeper (pipeline/results.py)
    prefer: list[str] = field(default_factory=list)  # keep=preferred_folder: path prefixes, best first
    page_size: int = 20  # clusters per page
    thumb_size: int = 160  # thumbnail longer side (pixels)
    draw_pairs: int = 200  # duplicate pairs drawn with their ORB matches (one per cluster in page order first)
    draw_rejected: int = 50  # ... and the closest rejected pairs drawn
    rejected_pairs: int = 500  # closest rejected pairs listed
    # duplicate pairs listed per cluster: the closest link of each member always (members - 1 pairs),
    # then the closest others up to this many (report.cluster_links); pairs.parquet has them all
    pairs_per_cluster: int = 100
    # the largest clusters listed (and files with errors, first by path): the report's data, its
    # thumbnails and the driver's work stay bounded on any folder; every cluster and error is in
    # the Parquet outputs, and `dedupe plan` acts on all of them
    max_clusters: int = 20000
    max_errors: int = 20000


@dataclass
class StorageConfig:
    # keyword arguments of the fsspec filesystem for DATA, OUT, work_dir and catalog URLs (s3://, gs://,
    # az://, ...), e.g. {endpoint_url: "http://minio:9000"} for an S3-compatible server; the same
    # options go to every Dask worker (pipeline/storage.py). Credentials: prefer the backend's
    # environment variables; secret-looking keys are masked in run.json.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    tiers: Literal["screen", "verify", "confirm"] = "confirm"  # last tier to run
    work_dir: str = ""  # features of a run without catalog, in a folder run-<pid>-<id>-<host> of each run's own (kept until the next run); "" = OUT/_work-<pid> (removed when the run ends)
    # The persistent catalog that makes re-runs incremental (pipeline/catalog.py): "" = OUT/catalog,
    # "none" = no catalog (every run starts from nothing), else a folder or a store URL (s3://...).
    catalog: str = ""
    scan: ScanConfig = field(default_factory=ScanConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    decide: DecideConfig = field(default_factory=DecideConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (key: value), got {value!r}")
        return dict(value)
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_check_type(f"{key}[]", v, item_tp) for v in value]
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}{_exponent_hint(value, whole=True)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}{_exponent_hint(value)}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (list, dict, bool)):  # (str() of a list made a folder named "['a', 'b']")
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return str(value)
    return value


def _exponent_hint(value: Any, whole: bool = False) -> str:
    """How to write a number YAML 1.1 read as text (`1e3`, `2E8`: PyYAML takes an exponent only
    after a dot and with a sign), or "" for other values."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if whole:
        return f" (write it as {int(number)}: YAML reads {value} as text)" if number.is_integer() else ""
    return f" (write it as {number!r}: YAML reads {value} as text)"


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            # (a section whose keys are all commented out reads as null: nothing in it changes)
            _apply(current, {} if value is None else value, prefix=f"{full}.")
        else:
            setattr(obj, key, _check_type(full, value, hints[key]))


def _validate(cfg: Config) -> None:
    s = cfg.screen
    bits = s.hash_size * s.hash_size
    checks = [
        (s.hash_size >= 8 and s.hash_size % 8 == 0,
         "screen.hash_size must be a multiple of 8 (8 -> 64-bit hash, 16 -> 256-bit)"),
        (0 <= s.max_distance < bits, f"screen.max_distance must be in [0, {bits - 1}]"),
        (s.max_candidates >= 1, "screen.max_candidates must be >= 1"),
        (s.search_shard_size >= 1, "screen.search_shard_size must be >= 1"),
        (s.dihedral_max_distance >= 0, "screen.dihedral_max_distance must be >= 0"),
        (s.exact_group_pairs >= 1, "screen.exact_group_pairs must be >= 1"),
        (s.embedding_k >= 1, "screen.embedding_k must be >= 1"),
        (-1 <= s.embedding_min_cosine <= 1, "screen.embedding_min_cosine must be in [-1, 1]"),
        (s.embedding_exact_max >= 1, "screen.embedding_exact_max must be >= 1"),
        (s.embedding_nprobe >= 1, "screen.embedding_nprobe must be >= 1"),
        (s.embedding_shard_size >= 1, "screen.embedding_shard_size must be >= 1"),
        (s.decode_size >= 32, "screen.decode_size must be >= 32"),
        (s.max_pixels > 0, "screen.max_pixels must be > 0"),
        (s.max_decode_bytes >= 2**20, "screen.max_decode_bytes must be >= 1048576 (1 MiB)"),
        (cfg.verify.max_side >= 64, "verify.max_side must be >= 64"),
        (cfg.verify.n_features >= 10, "verify.n_features must be >= 10"),
        (0 < cfg.verify.ratio < 1, "verify.ratio must be in (0, 1)"),
        (cfg.verify.grid >= 1 and cfg.verify.oversample >= 1, "verify.grid and verify.oversample must be >= 1"),
        (0 < cfg.verify.reject_inliers <= cfg.verify.match_inliers,
         "verify: need 0 < reject_inliers <= match_inliers"),
        (0 <= cfg.verify.min_coverage <= 1, "verify.min_coverage must be in [0, 1] (0 = off)"),
        (0 <= cfg.verify.region_mismatch <= 1, "verify.region_mismatch must be in [0, 1] (0 = off)"),
        (0 <= cfg.verify.min_inlier_share < 1, "verify.min_inlier_share must be in [0, 1) (0 = off)"),
        (0 <= cfg.verify.blank_max_shift <= 255, "verify.blank_max_shift must be in [0, 255] grey levels (0 = off)"),
        (0 <= cfg.verify.blank_min_hist_corr <= 1, "verify.blank_min_hist_corr must be in [0, 1] (0 = off)"),
        (cfg.verify.chance_min_matches >= 1, "verify.chance_min_matches must be >= 1"),
        (0 <= cfg.verify.semi_flat_share < 0.8,
         "verify.semi_flat_share must be in [0, 0.8) (0 = off; from 0.8 the pixel check decides every pair)"),
        (-1 <= cfg.verify.semi_flat_ssim <= cfg.decide.pixel_ssim,
         "verify.semi_flat_ssim must be in [-1, decide.pixel_ssim] (pixels that disagree that clearly are different)"),
        (cfg.verify.upscale_below <= cfg.verify.max_side, "verify.upscale_below must be <= verify.max_side"),
        (cfg.verify.ransac_max_iters >= 1, "verify.ransac_max_iters must be >= 1"),
        (0 < cfg.verify.ransac_confidence < 1, "verify.ransac_confidence must be in (0, 1)"),
        (cfg.verify.max_open_partitions >= 2, "verify.max_open_partitions must be >= 2"),
        (cfg.embed.batch_size >= 1, "embed.batch_size must be >= 1"),
        (cfg.embed.input_size >= 32, "embed.input_size must be >= 32"),
        (-1 <= cfg.decide.cosine_floor <= cfg.decide.cosine_threshold <= 1,
         "decide: need -1 <= cosine_floor <= cosine_threshold <= 1"),
        (-1 <= cfg.decide.pixel_ssim <= 1 and -1 <= cfg.decide.pixel_hist_corr <= 1,
         "decide: pixel_ssim and pixel_hist_corr must be in [-1, 1]"),
        (0 <= cfg.decide.support_inliers <= cfg.decide.accept_inliers,
         "decide: need 0 <= support_inliers <= accept_inliers"),
        (cfg.decide.hash_orb_distance >= -1, "decide.hash_orb_distance must be >= -1 (-1: off)"),
        (cfg.decide.hash_orb_inliers >= 1, "decide.hash_orb_inliers must be >= 1"),
        (0 <= cfg.decide.hash_orb_share <= 1, "decide.hash_orb_share must be within [0, 1]"),
        # (a pair with inliers between them was "no-match" at the verify tier, and rejected: a resized
        # copy with 76 of 76 matches as inliers, under accept_inliers 25 and reject_inliers 200)
        (cfg.verify.reject_inliers <= cfg.decide.accept_inliers,
         f"verify.reject_inliers ({cfg.verify.reject_inliers}) is above decide.accept_inliers "
         f"({cfg.decide.accept_inliers}): a pair with inliers between them would be rejected as well as "
         "accepted; lower reject_inliers or raise accept_inliers"),
        (cfg.dask.partition_size >= 1, "dask.partition_size must be >= 1"),
        (cfg.dask.pairs_per_task >= 1, "dask.pairs_per_task must be >= 1"),
        (cfg.dask.n_workers >= 0, "dask.n_workers must be >= 0"),
        (cfg.dask.auto_max_files >= 0, "dask.auto_max_files must be >= 0"),
        (cfg.dask.threads_per_worker >= 1, "dask.threads_per_worker must be >= 1"),
        (cfg.report.page_size >= 1, "report.page_size must be >= 1"),
        (cfg.report.thumb_size >= 16, "report.thumb_size must be >= 16"),
        (min(cfg.report.draw_pairs, cfg.report.draw_rejected, cfg.report.rejected_pairs,
             cfg.report.pairs_per_cluster) >= 0,
         "report.draw_pairs, draw_rejected, rejected_pairs and pairs_per_cluster must be >= 0"),
        (min(cfg.report.max_clusters, cfg.report.max_errors) >= 1,
         "report.max_clusters and report.max_errors must be >= 1"),
        (cfg.report.keep != "preferred_folder" or bool(cfg.report.prefer),
         "report.keep=preferred_folder needs report.prefer: a list of path prefixes"),
    ]
    v, e, d = cfg.verify, cfg.embed, cfg.decide
    checks += [
        (cfg.scan.max_file_bytes > 0, "scan.max_file_bytes must be > 0 (bytes; files larger are recorded as errors)"),
        (all(isinstance(x, str) and x.startswith(".") and len(x) > 1 for x in cfg.scan.image_extensions),
         "scan.image_extensions: each entry must be an extension with its dot, e.g. .jpg"),
        (0 <= s.border_tolerance <= 255, "screen.border_tolerance must be in [0, 255] (a channel difference)"),
        (1.0 < v.scale_factor <= 2.0, "verify.scale_factor must be in (1.0, 2.0]: ORB's pyramid step "
                                      "(1.0 finds no keypoints at all; the default is 1.2)"),
        (1 <= v.n_levels <= 16, "verify.n_levels must be in [1, 16]"),
        (0 <= v.fast_threshold <= 255, "verify.fast_threshold must be in [0, 255]"),
        (v.min_keypoints >= 1, "verify.min_keypoints must be >= 1"),
        (v.ransac_threshold > 0, "verify.ransac_threshold must be > 0 (pixels)"),
        (v.min_good_matches >= 3, "verify.min_good_matches must be >= 3 (RANSAC needs 3 points for a model)"),
        # (settings that contradict each other: every image, or every pair, would fail the same way)
        (v.n_features >= v.min_keypoints, f"verify.n_features ({v.n_features}) is below verify.min_keypoints "
                                          f"({v.min_keypoints}): every image would count as having too few "
                                          "keypoints; raise n_features or lower min_keypoints"),
        (v.min_good_matches <= v.n_features, f"verify.min_good_matches ({v.min_good_matches}) is above "
                                             f"verify.n_features ({v.n_features}): no pair could ever be checked"),
        (s.hash != "whash" or (s.hash_size & (s.hash_size - 1)) == 0,
         f"screen.hash whash needs a power of 2 for screen.hash_size (8, 16, 32, ...), not {s.hash_size}"),
        (v.opencv_threads >= 0, "verify.opencv_threads must be >= 0"),
        (v.upscale_below >= 0, "verify.upscale_below must be >= 0"),
        (0 < e.alpha <= 1.4, "embed.alpha must be in (0, 1.4] (a MobileNet width multiplier)"),
        (e.threads >= 0, "embed.threads must be >= 0"),
        (d.accept_inliers >= 1, "decide.accept_inliers must be >= 1"),
        (d.screen_only_distance >= 0, "decide.screen_only_distance must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if s.mode == "hash+embedding" and cfg.tiers == "screen":
        raise ConfigError("screen.mode hash+embedding (the high-recall preset) finds candidates the hash "
                          "misses, which only the verify and confirm tiers can accept: use tiers verify or "
                          "confirm with it, or screen.mode hash")
    _check_int_range(cfg)
    check_memory_limit(cfg.dask.memory_limit)
    check_scheduler(cfg.dask.scheduler, "dask.scheduler")
    check_dashboard(cfg.dask.dashboard_address)


# whole-number settings that are byte or pixel counts (64-bit); every other one is handed to C or
# numba code as a 32-bit int (OpenCV's seed, feature and iteration counts, threads, K), where a
# larger value failed with a traceback after the screen
WIDE_INTS = {"scan.max_file_bytes", "screen.max_decode_bytes", "screen.max_pixels"}
INT32_MAX = 2**31 - 1


def _check_int_range(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            value, key = getattr(sub, f.name), f"{section.name}.{f.name}"
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            limit = 2**63 - 1 if key in WIDE_INTS else INT32_MAX
            if abs(value) > limit:
                raise ConfigError(f"{key}: {value} is too large (at most {limit})")
    v = cfg.verify
    if v.n_features * max(1, v.oversample) > INT32_MAX:
        raise ConfigError(f"verify.n_features x verify.oversample is too large (at most {INT32_MAX})")


def check_dashboard(address: str) -> None:
    """dask.dashboard_address: "" or "none" (no dashboard), ":PORT" or "HOST:PORT"."""
    text = str(address).strip()
    if text.lower() in ("", "none", "null"):
        return
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or " " in host:
        raise ConfigError(f"dask.dashboard_address: {address!r} is not ':PORT' or 'HOST:PORT' (e.g. :8787), "
                          "or empty for no dashboard")


SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


def check_scheduler(target: str, where: str = "--scheduler") -> None:
    """"auto", "local", "sync" or a Dask scheduler address (scheme://host:port or host:port)."""
    if target in ("auto", "local", "sync"):
        return
    if "://" in target:
        rest = target.split("://", 1)[1]
        host, _, port = rest.rpartition(":")
        ok = target.startswith(SCHEDULER_SCHEMES) and len(rest) > 0 and not (port.isdigit() and not 0 < int(port) <= 65535)
        if target.startswith("tcp://"):  # (no port: the client failed with "invalid literal for int()")
            ok = ok and bool(host) and port.isdigit()
    else:
        host, _, port = target.rpartition(":")
        ok = bool(host) and port.isdigit() and 0 < int(port) <= 65535
    if not ok:
        raise ConfigError(f"{where}: {target!r} is not 'auto', 'local', 'sync' or a Dask scheduler address such as "
                          f"tcp://127.0.0.1:8786 (schemes: {', '.join(s[:-3] for s in SCHEDULER_SCHEMES)})")


def check_memory_limit(value: str) -> None:
    """Dask's memory_limit: "auto", "0"/"none" (no limit), or a size such as 4GB, 3.5GiB, 2e9."""
    if str(value).strip().lower() in ("auto", "0", "none", ""):
        return
    from dask.utils import parse_bytes
    try:
        ok = parse_bytes(str(value)) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"dask.memory_limit: {value!r} is not a size: use auto, 0 (no limit) or e.g. 4GB, 3.5GiB")


def parse_override(item: str) -> tuple[str, Any]:
    """`screen.max_distance=12` -> ("screen.max_distance", 12); values are parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set screen.max_distance=12")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:  # (one line: the whole text of exc was 5, with a "<unicode string>")
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({problem}); quote a text value, "
                          "e.g. --set 'work_dir=\"/a b\"'") from None
    return key.strip(), value


# Named presets (`--preset NAME`): YAML files shipped with the package (the repository's configs/).
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return path


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error: the later one
    won silently (a second `screen:` section dropped the first's settings)."""

    def flatten_mapping(self, node):
        # (checked here, before merge keys put their mapping's keys in with the node's own, and
        # once per node: an anchored mapping is flattened again wherever it is merged)
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):  # (not hashable: left to PyYAML)
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice in one "
                                                            "mapping", key_node.start_mark)
                seen.add(key)
        super().flatten_mapping(node)


def read_yaml(p: Path) -> dict:
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a folder: pass a YAML file to --config")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found: pass an existing YAML file to --config")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:  # (one line, at the file's line and column, not "<unicode string>")
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {exc.problem or exc}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read as YAML: {exc}") from None
    if data is None:  # (an empty file)
        return {}
    if not isinstance(data, dict):  # (0, false or [] read as "no settings" before)
        raise ConfigError(f"config file {str(p)!r} holds {data!r}: expected a mapping of settings (e.g. screen: ...)")
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """A Config from a stored `to_dict()` (e.g. the settings a catalog was built with), then
    `key=value` overrides, then validation."""
    cfg = Config()
    _apply(cfg, data or {})
    _apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def _apply_overrides(cfg: Config, overrides: list[str] | None) -> None:
    """Each `key=value` in turn. A key that goes on below a mapping setting changes one entry of
    it (`storage.options.endpoint_url=...` keeps the other options, as from a config file); the
    mapping's own key replaces it whole (`storage.options={...}`)."""
    for item in overrides or []:
        key, value = parse_override(item)
        parts = key.split(".")
        obj, i = cfg, 0
        while i < len(parts) - 1 and dataclasses.is_dataclass(getattr(obj, parts[i], None)):
            obj, i = getattr(obj, parts[i]), i + 1
        if i < len(parts) - 1 and isinstance(getattr(obj, parts[i], None), dict):
            merged = copy.deepcopy(getattr(obj, parts[i]))
            entry = merged
            for part in parts[i + 1:-1]:
                if not isinstance(entry.get(part), dict):
                    entry[part] = {}
                entry = entry[part]
            entry[parts[-1]] = value
            parts, value = parts[:i + 1], merged
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _apply(cfg, nested)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None, base: Config | None = None) -> Config:
    """Defaults (or a copy of `base`), then the preset (if named), then the YAML file (if given),
    then each `key=value` override, then validation."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if preset:
        _apply(cfg, read_yaml(preset_path(preset)))
    if path:
        _apply(cfg, read_yaml(Path(path)))
    _apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg
