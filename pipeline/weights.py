"""Finding, checking and seeding the ImageNet weights of the confirm tier's backbone.

Backbones (`embed.backbone`): MobileNetV2 and MobileNet (v1) with their alpha/input-size weight
files, MobileNetV3Small/Large (alpha 0.75 or 1.0), and every other keras.applications model with
an average-pooled head (`KERAS_BACKBONES`: EfficientNet B0-B7 and V2, ResNet/ResNetV2, VGG,
DenseNet, ConvNeXt, Inception, Xception, NASNet), each with the `preprocess_input` of its own
Keras module (`PREPROCESS`).

`embed.weights: imagenet` means the standard Keras cache, `$KERAS_HOME/models/<keras file name>`
(`KERAS_HOME` defaults to `~/.keras`), exactly where `keras.applications.MobileNetV2(weights=
"imagenet")` would download and look; any other value is a path to a `.h5` weights file. Either way
the file's sha256 is checked against `PINNED_SHA256` (a mismatch is an error; a file name we could
not pin is accepted with a logged warning). Keras itself is only ever handed a checked file path,
never `"imagenet"` (it would download inside a worker, possibly hanging) and never `None` (random
weights give cosine ~0.98 for everything, i.e. every pair a "duplicate").

The orchestrator calls `check_weights_available(cfg)` before any heavy work: when the file is
missing and cannot be downloaded it raises `WeightsError` (a `ConfigError`, so the CLI exits 2)
saying which file to put where. Downloads happen only when `embed.download` is true, the
environment variable `DEDUPE_OFFLINE` is not set, and an HTTPS request to the Keras download host
gets an answer within `NETWORK_PROBE_TIMEOUT` seconds (DNS and TLS included; a bare TCP connect is
not enough, sandboxes accept those), so an offline machine fails in seconds instead of hanging.

`seed_cache(from_dir)` / `weights_command(from_dir)` (`make weights`, `python -m pipeline weights
--from DIR`) copy the known weight files of a folder into the Keras cache after checking them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from pipeline.config import ConfigError, EmbedConfig

log = logging.getLogger(__name__)

# What finds, fetches and checks the weights file: the embeddings are keyed on the file's sha256
# and on the rest of this module (each backbone's preprocessing and input size), so the catalog's
# fingerprint leaves these out (`catalog.source_fingerprint`): editing them re-embeds nothing.
NOT_FINGERPRINTED = ("OFFLINE_ENV", "NETWORK_PROBE_TIMEOUT", "DOWNLOAD_TIMEOUT", "offline", "network_available",
                     "seed_command", "_instructions", "_download", "seed_cache", "weights_command", "_read_sums",
                     "check_weights_available", "resolve_weights", "verify_file", "weights_url",
                     "BASE_URLS", "V3_URL")

OFFLINE_ENV = "DEDUPE_OFFLINE"  # set to 1/true/yes: never try to download weights
DOWNLOAD_HOST = "storage.googleapis.com"  # where Keras downloads its application weights
DOWNLOAD_PROBE_URL = f"https://{DOWNLOAD_HOST}/tensorflow/keras-applications/"
NETWORK_PROBE_TIMEOUT = 2.5  # seconds for DNS + connect + TLS + an HTTP answer from the probe URL
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned

BASE_URLS = {
    "MobileNetV2": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/",
    "MobileNet": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/",
}
# The alphas and sizes Keras publishes ImageNet weights for (other sizes load the 224 file).
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
V2_SIZES = (96, 128, 160, 192, 224)
V1_ALPHAS = (0.25, 0.5, 0.75, 1.0)
V1_SIZES = (128, 160, 192, 224)
_V1_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}

# sha256 of the no-top Keras weight files, pinned from files verified on this project's machines
# (../shared/models/SHA256SUMS). Keras publishes no hashes for the MobileNet files and there is no
# network here, so the other 26 (alpha, size) files are known by name but NOT pinned (None): they
# are accepted with a logged warning. Pin a file by adding its sha256 here once verified from an
# independent download.
PINNED_SHA256: dict[str, str | None] = {}
for _a in V2_ALPHAS:
    for _s in V2_SIZES:
        PINNED_SHA256[f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(_a)}_{_s}_no_top.h5"] = None
for _a in V1_ALPHAS:
    for _s in V1_SIZES:
        PINNED_SHA256[f"mobilenet_{_V1_ALPHA_TEXT[_a]}_{_s}_tf_no_top.h5"] = None
PINNED_SHA256.update({
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5":
        "279052de2cfa801003aa6cc25cc4d007d35dd0b76f06935268c79788b7642d05",
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5":
        "df1c3db1d0d9193719c4c70f707c56f7021f999f825bdc57454c275cf6def19f",
    "mobilenet_2_5_224_tf_no_top.h5":
        "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
})
# The other keras.applications backbones with an average-pooled head, as Keras names and fetches
# their no-top ImageNet weights (read from the installed Keras: keras/src/applications/*.py,
# `file_utils.get_file(file_name, origin, file_hash=...)`): backbone -> (cache file name, URL,
# the hash Keras pins, default input size). Keras pins sha256 for ConvNeXt and md5 for all the
# others; both are checked (md5 only proves the download is the file Keras expects, not more).
KERAS_BACKBONES: dict[str, tuple[str, str, str, int]] = {
    "EfficientNetB0": ("efficientnetb0_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
                      "50bc09e76180e00e4465e1a485ddc09d", 224),
    "EfficientNetB1": ("efficientnetb1_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb1_notop.h5",
                      "74c4e6b3e1f6a1eea24c589628592432", 224),
    "EfficientNetB2": ("efficientnetb2_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb2_notop.h5",
                      "111f8e2ac8aa800a7a99e3239f7bfb39", 224),
    "EfficientNetB3": ("efficientnetb3_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb3_notop.h5",
                      "af6d107764bb5b1abb91932881670226", 224),
    "EfficientNetB4": ("efficientnetb4_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb4_notop.h5",
                      "ebc24e6d6c33eaebbd558eafbeedf1ba", 224),
    "EfficientNetB5": ("efficientnetb5_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb5_notop.h5",
                      "38879255a25d3c92d5e44e04ae6cec6f", 224),
    "EfficientNetB6": ("efficientnetb6_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb6_notop.h5",
                      "9ecce42647a20130c1f39a5d4cb75743", 224),
    "EfficientNetB7": ("efficientnetb7_notop.h5",
                      "https://storage.googleapis.com/keras-applications/efficientnetb7_notop.h5",
                      "cbcfe4450ddf6f3ad90b1b398090fe4a", 224),
    "EfficientNetV2B0": ("efficientnetv2-b0_notop.h5",
                        "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-b0_notop.h5",
                        "893217f2bb855e2983157299931e43ff", 224),
    "EfficientNetV2B1": ("efficientnetv2-b1_notop.h5",
                        "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-b1_notop.h5",
                        "0e80663031ca32d657f9caa404b6ec37", 224),
    "EfficientNetV2B2": ("efficientnetv2-b2_notop.h5",
                        "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-b2_notop.h5",
                        "1dfe2e7a5d45b6632553a8961ea609eb", 224),
    "EfficientNetV2B3": ("efficientnetv2-b3_notop.h5",
                        "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-b3_notop.h5",
                        "f6abf7b5849ac99a89b50dd3fd532856", 224),
    "EfficientNetV2S": ("efficientnetv2-s_notop.h5",
                       "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-s_notop.h5",
                       "af0682fb74e8c54910f2d4393339c070", 224),
    "EfficientNetV2M": ("efficientnetv2-m_notop.h5",
                       "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-m_notop.h5",
                       "1b8dc055df72dde80d614482840fe342", 224),
    "EfficientNetV2L": ("efficientnetv2-l_notop.h5",
                       "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-l_notop.h5",
                       "b0b66b5c863aef5b46e8608fe1711615", 224),
    "ResNet50": ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "4d473c1dd8becc155b73f8504c6f6626", 224),
    "ResNet101": ("resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "88cf7a10940856eca736dc7b7e228a21", 224),
    "ResNet152": ("resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "ee4c566cf9a93f14d82f913c2dc6dd0c", 224),
    "ResNet50V2": ("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "fac2f116257151a9d068a22e544a4917", 224),
    "ResNet101V2": ("resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "c0ed64b8031c3730f411d2eb4eea35b5", 224),
    "ResNet152V2": ("resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "ed17cf2e0169df9d443503ef94b23b33", 224),
    "VGG16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "6d6bbae143d832006294945121d1f1fc", 224),
    "VGG19": ("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "253f8cb515780f3b799900260a226db6", 224),
    "DenseNet121": ("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "30ee3e1110167f948a6b9946edeeb738", 224),
    "DenseNet169": ("densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "b8c4d4c20dd625c148057b9ff1c1176b", 224),
    "DenseNet201": ("densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/densenet/densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "c13680b51ded0fb44dff2d8f86ac8bb1", 224),
    "ConvNeXtTiny": ("convnext_tiny_notop.h5",
                    "https://storage.googleapis.com/tensorflow/keras-applications/convnext/convnext_tiny_notop.h5",
                    "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1", 224),
    "ConvNeXtSmall": ("convnext_small_notop.h5",
                     "https://storage.googleapis.com/tensorflow/keras-applications/convnext/convnext_small_notop.h5",
                     "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab", 224),
    "ConvNeXtBase": ("convnext_base_notop.h5",
                    "https://storage.googleapis.com/tensorflow/keras-applications/convnext/convnext_base_notop.h5",
                    "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45", 224),
    "ConvNeXtLarge": ("convnext_large_notop.h5",
                     "https://storage.googleapis.com/tensorflow/keras-applications/convnext/convnext_large_notop.h5",
                     "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd", 224),
    "ConvNeXtXLarge": ("convnext_xlarge_notop.h5",
                      "https://storage.googleapis.com/tensorflow/keras-applications/convnext/convnext_xlarge_notop.h5",
                      "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05", 224),
    "InceptionV3": ("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "bcbd6486424b2319ff4ef7d526e38f63", 299),
    "InceptionResNetV2": ("inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "https://storage.googleapis.com/tensorflow/keras-applications/inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "d19885ff4a710c122648d3b5c3b684e4", 299),
    "Xception": ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "https://storage.googleapis.com/tensorflow/keras-applications/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "b0042744bf5b25fce3cb969f33bebb97", 299),
    "NASNetMobile": ("nasnet_mobile_no_top.h5",
                    "https://storage.googleapis.com/tensorflow/keras-applications/nasnet/NASNet-mobile-no-top.h5",
                    "1ed92395b5b598bdda52abe5c0dbfd63", 224),
    "NASNetLarge": ("nasnet_large_no_top.h5",
                   "https://storage.googleapis.com/tensorflow/keras-applications/nasnet/NASNet-large-no-top.h5",
                   "d81d89dc07e6e56530c4e77faddd61b5", 331),
}

# MobileNetV3: one file per (size, alpha); Keras publishes 224 px weights for alpha 0.75 and 1.0
V3_ALPHAS = (0.75, 1.0)
V3_MD5 = {("small", 0.75): "ebdb5cc8e0b497cd13a7c275d475c819", ("small", 1.0): "d3e8ec802a04aa4fc771ee12a9a9b836",
          ("large", 0.75): "40af19a13ebea4e2ee0c676887f69a2e", ("large", 1.0): "07fb09a5933dd0c8eaafa16978110389"}
V3_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"

# keras.applications module whose preprocess_input each backbone needs
PREPROCESS = {"MobileNetV2": "mobilenet_v2", "MobileNet": "mobilenet", "MobileNetV3Small": "mobilenet_v3",
              "MobileNetV3Large": "mobilenet_v3", "VGG16": "vgg16", "VGG19": "vgg19",
              "InceptionV3": "inception_v3", "InceptionResNetV2": "inception_resnet_v2",
              "Xception": "xception"}
for _name in KERAS_BACKBONES:
    PREPROCESS.setdefault(_name, "efficientnet_v2" if _name.startswith("EfficientNetV2") else
                          "efficientnet" if _name.startswith("EfficientNet") else
                          "resnet_v2" if _name.startswith("ResNet") and _name.endswith("V2") else
                          "resnet" if _name.startswith("ResNet") else
                          "densenet" if _name.startswith("DenseNet") else
                          "convnext" if _name.startswith("ConvNeXt") else
                          "nasnet" if _name.startswith("NASNet") else "")
BACKBONES = tuple(PREPROCESS)  # every backbone embed.backbone accepts
FIXED_INPUT = {"NASNetMobile": 224, "NASNetLarge": 331}  # Keras loads their weights only at this size
MIN_INPUT = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}

# Hashes Keras itself pins: sha256 where it pins sha256 (ConvNeXt, checked like ours), md5 for
# the rest (checked as md5).
PINNED_MD5: dict[str, str] = {}
for _name, (_file, _url, _hash, _size) in KERAS_BACKBONES.items():
    if len(_hash) == 64:
        PINNED_SHA256[_file] = _hash
    else:
        PINNED_MD5[_file] = _hash
for (_kind, _a), _hash in V3_MD5.items():
    PINNED_MD5[f"weights_mobilenet_v3_{_kind}_224_{_a}_float_no_top_v2.h5"] = _hash
_NAME_BY_SHA = {sha: name for name, sha in PINNED_SHA256.items() if sha}


def known_file(name: str) -> bool:
    """A weight file name this module can check (pinned or known unpinned)."""
    return name in PINNED_SHA256 or name in PINNED_MD5


class WeightsError(ConfigError):
    """The weights file is missing, cannot be fetched, or is not the expected file."""


def _embed_cfg(cfg) -> EmbedConfig:
    """Accept the whole Config or its `embed` section."""
    return getattr(cfg, "embed", cfg)


def weights_file_name(cfg: EmbedConfig) -> str:
    """The Keras file name `weights="imagenet"` resolves to for this backbone/alpha/input size."""
    cfg = _embed_cfg(cfg)
    alpha, size = float(cfg.alpha), int(cfg.input_size)
    if cfg.backbone == "MobileNetV2":
        if alpha not in V2_ALPHAS:
            raise WeightsError(f"embed.alpha={cfg.alpha}: ImageNet weights for MobileNetV2 exist only "
                               f"for alpha in {list(V2_ALPHAS)}")
        rows = size if size in V2_SIZES else 224  # as Keras does (with a warning)
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"
    if cfg.backbone == "MobileNet":
        if alpha not in V1_ALPHAS:
            raise WeightsError(f"embed.alpha={cfg.alpha}: ImageNet weights for MobileNet (v1) exist only "
                               f"for alpha in {list(V1_ALPHAS)}")
        rows = size if size in V1_SIZES else 224
        return f"mobilenet_{_V1_ALPHA_TEXT[alpha]}_{rows}_tf_no_top.h5"
    if cfg.backbone in ("MobileNetV3Small", "MobileNetV3Large"):
        if alpha not in V3_ALPHAS:
            raise WeightsError(f"embed.alpha={cfg.alpha}: ImageNet weights for {cfg.backbone} exist only "
                               f"for alpha in {list(V3_ALPHAS)}")
        kind = "small" if cfg.backbone.endswith("Small") else "large"
        return f"weights_mobilenet_v3_{kind}_224_{alpha}_float_no_top_v2.h5"
    if cfg.backbone in KERAS_BACKBONES:
        if cfg.backbone in FIXED_INPUT and size != FIXED_INPUT[cfg.backbone]:
            raise WeightsError(f"embed.input_size={size}: {cfg.backbone}'s ImageNet weights load only at "
                               f"{FIXED_INPUT[cfg.backbone]} px; set embed.input_size={FIXED_INPUT[cfg.backbone]}")
        if size < MIN_INPUT.get(cfg.backbone, 32):
            raise WeightsError(f"embed.input_size={size}: {cfg.backbone} needs at least "
                               f"{MIN_INPUT[cfg.backbone]} px")
        return KERAS_BACKBONES[cfg.backbone][0]
    raise WeightsError(f"embed.backbone={cfg.backbone!r}: expected one of {', '.join(BACKBONES)}")


def weights_url(cfg: EmbedConfig) -> str:
    cfg = _embed_cfg(cfg)
    if cfg.backbone in KERAS_BACKBONES:
        return KERAS_BACKBONES[cfg.backbone][1]
    if cfg.backbone.startswith("MobileNetV3"):
        return V3_URL + weights_file_name(cfg)
    return BASE_URLS[cfg.backbone] + weights_file_name(cfg)


def keras_home() -> Path:
    """`$KERAS_HOME`, else `~/.keras` (read at call time, so tests can monkeypatch it)."""
    home = os.environ.get("KERAS_HOME")
    if home:
        return Path(home).expanduser()
    base = Path("~").expanduser()
    return (base if os.access(base, os.W_OK) else Path("/tmp")) / ".keras"


def cache_dirs(home: Path | None = None) -> list[Path]:
    """Where Keras keeps downloaded weights: `<home>/models`, plus `/tmp/.keras/models`, which
    Keras's `get_file` uses when `<home>` is not writable."""
    home = Path(home) if home else keras_home()
    dirs = [home / "models"]
    fallback = Path(tempfile.gettempdir()) / ".keras" / "models"
    if not os.access(home, os.W_OK) and fallback not in dirs:
        dirs.append(fallback)
    return dirs


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """sha256 hex of a file, cached per process by (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    with open(path, "rb") as fh:
        value = hashlib.file_digest(fh, "sha256").hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = value
    return value


def md5_file(path: str | Path) -> str:
    """md5 hex of a file (the hash Keras pins for most of its weights), cached like sha256_file."""
    st = os.stat(path)
    key = ("md5:" + os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    with open(path, "rb") as fh:
        value = hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = value
    return value


def verify_file(path: str | Path, expected_name: str | None = None) -> str:
    """Check a weights file against the pinned table; returns its sha256.

    The file is identified by its name when it is a known Keras name, else by its sha256. Errors:
    a known name whose content has another pinned hash (corrupt or truncated download), or a file
    that is identified as the weights of another alpha/size/backbone than `expected_name`.
    A file that cannot be identified (unpinned name, unknown hash) is accepted with a warning.
    """
    path = Path(path)
    sha = sha256_file(path)
    name = path.name if known_file(path.name) else _NAME_BY_SHA.get(sha)
    if name is None:
        log.warning("weights file %s (sha256 %s) is not a known Keras weights file; using it "
                    "unchecked", path, sha)
        return sha
    if expected_name and name != expected_name:
        raise WeightsError(f"weights file {path} is {name}, but the embed config (backbone, alpha, "
                           f"input_size) needs {expected_name}: fix embed.weights or embed.alpha")
    pinned = PINNED_SHA256.get(name)
    if pinned is None and name in PINNED_MD5:
        md5 = md5_file(path)
        if md5 != PINNED_MD5[name]:
            raise WeightsError(f"weights file {path} has md5 {md5}, expected {PINNED_MD5[name]} (the hash "
                               f"Keras pins) for {name}: the file is corrupt or truncated; delete it and "
                               f"copy a good one")
    elif pinned is None:
        log.warning("weights file %s: no pinned sha256 for %s (cannot be verified here), "
                    "sha256 is %s; using it unchecked", path, name, sha)
    elif sha != pinned:
        raise WeightsError(f"weights file {path} has sha256 {sha}, expected {pinned} for {name}: the "
                           f"file is corrupt or truncated; delete it and copy a good one (`{seed_command()}`)")
    return sha


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def network_available(url: str = DOWNLOAD_PROBE_URL, timeout: float = NETWORK_PROBE_TIMEOUT) -> bool:
    """True when an HTTPS HEAD request to `url` gets any HTTP answer within `timeout` seconds.

    A bare TCP connect is not enough: sandboxes and proxies accept connections to any address and
    then fail at TLS, and DNS lookups have no timeout of their own, so the request runs in a daemon
    thread that is abandoned when late."""
    result: list[bool] = []

    def probe():
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:  # the server answered (403/404...): the network works
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="weights-network-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def seed_command(folder: str = "FOLDER") -> str:
    """The command that seeds the cache, in the words of the tool the user ran (the CLI and the
    Makefile set DEDUPE_PROG): `make weights`, `python -m pipeline weights` or `dedupe weights`."""
    prog = os.environ.get("DEDUPE_PROG", "dedupe")
    if prog == "make":
        return f"make weights WEIGHTS_DIR={folder}"
    return f"{prog} weights --from {folder}"


def _instructions(name: str, dirs: list[Path]) -> str:
    return (f"put {name} into {dirs[0]}/ (`{seed_command()}` copies and checks it from a FOLDER that "
            f"holds it), or point the run at the file with --set embed.weights=/path/to/{name}")


def _download(url: str, dest: Path, expected_name: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp, open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh, 1 << 20)
        sha = sha256_file(tmp)
        pinned = PINNED_SHA256.get(expected_name)
        if pinned and sha != pinned:
            raise WeightsError(f"downloaded {url} has sha256 {sha}, expected {pinned}")
        md5 = PINNED_MD5.get(expected_name)
        if md5 and md5_file(tmp) != md5:
            raise WeightsError(f"downloaded {url} does not have the md5 Keras pins ({md5})")
        os.replace(tmp, dest)
    except WeightsError:
        raise
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot download {url}: {exc}; {_instructions(expected_name, [dest.parent])}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def resolve_weights(cfg: EmbedConfig, allow_download: bool) -> Path:
    """The checked weights file for `cfg` (EmbedConfig or the whole Config).

    `weights: imagenet` -> `$KERAS_HOME/models/<keras name>`, downloaded there (once, like Keras
    does) when missing and `allow_download`; a path -> that file. Raises `WeightsError`.
    """
    cfg = _embed_cfg(cfg)
    expected = weights_file_name(cfg)
    if cfg.weights and cfg.weights != "imagenet":
        path = Path(cfg.weights).expanduser()
        if path.is_dir():
            path = path / expected
        if not path.is_file():
            raise WeightsError(f"embed.weights={cfg.weights!r}: no such file; point it at {expected} "
                               f"(or set embed.weights: imagenet to use the Keras cache)")
        if path.suffix.lower() not in (".h5", ".hdf5"):
            raise WeightsError(f"embed.weights={cfg.weights!r}: Keras loads these weights only from a "
                               f".h5 file")
        verify_file(path, expected)
        return path.resolve()
    dirs = cache_dirs()
    for d in dirs:
        candidate = d / expected
        if candidate.is_file():
            verify_file(candidate, expected)
            return candidate
    if not allow_download:
        raise WeightsError(f"ImageNet weights {expected} not found in {', '.join(map(str, dirs))} and "
                           f"downloading is off: {_instructions(expected, dirs)}")
    if offline():
        raise WeightsError(f"ImageNet weights {expected} not found in {', '.join(map(str, dirs))} and "
                           f"{OFFLINE_ENV} is set (no download): {_instructions(expected, dirs)}")
    if not network_available():
        raise WeightsError(f"ImageNet weights {expected} not found in {', '.join(map(str, dirs))} and "
                           f"{DOWNLOAD_HOST} is unreachable (no network): {_instructions(expected, dirs)}")
    target_dir = dirs[0] if _writable_dir(dirs[0]) else dirs[-1]
    return _download(weights_url(cfg), target_dir / expected, expected)


def _writable_dir(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK)


# Bumped when the conversion itself changes (what the .tflite file contains for given weights).
TFLITE_FORMAT = 1


def tflite_path(cfg, weights_path: str | Path, tf_version: str) -> Path:
    """Where the TensorFlow Lite conversion of these weights is cached: beside the Keras weights
    cache (`<cache dir>/dedupe-tflite/`), named by everything that shapes it (backbone, alpha,
    input size, the weights' sha256, the converting TensorFlow's version): a different file or
    setting gets its own conversion, never a stale one. The first writable cache dir is used."""
    embed = _embed_cfg(cfg)
    sha = sha256_file(weights_path)
    name = (f"{embed.backbone}-a{float(embed.alpha):g}-{int(embed.input_size)}-{sha[:20]}"
            f"-tf{tf_version}-v{TFLITE_FORMAT}.tflite")
    dirs = cache_dirs()
    for d in dirs:
        if (d / "dedupe-tflite" / name).is_file():
            return d / "dedupe-tflite" / name
    target = next((d for d in dirs if _writable_dir(d)), dirs[-1])
    return target / "dedupe-tflite" / name


def check_weights_available(cfg) -> dict:
    """Called by the orchestrator before any heavy work when the confirm tier will run: resolves
    (downloading once if allowed and online) and checks the weights; raises `WeightsError`.
    Returns what run.json records: {"path", "file", "sha256", "pinned"}."""
    embed = _embed_cfg(cfg)
    path = resolve_weights(embed, allow_download=bool(getattr(embed, "download", True)))
    sha = sha256_file(path)
    name = weights_file_name(embed)
    return {"path": str(path), "file": name, "sha256": sha,
            "pinned": PINNED_SHA256.get(name) == sha or name in PINNED_MD5}


def _read_sums(from_dir: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    f = from_dir / "SHA256SUMS"
    if f.is_file():
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and len(parts[0]) == 64:
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def seed_cache(from_dir: str | Path, keras_home: str | Path | None = None) -> list[Path]:
    """Copy the known Keras MobileNet weight files found in `from_dir` into `<keras_home>/models`
    (default `$KERAS_HOME` or `~/.keras`) after checking their sha256 against the pinned table (and
    against `from_dir/SHA256SUMS` when present). Files already in place with the right content are
    left alone. Returns the cache paths; raises `WeightsError`."""
    src = Path(from_dir).expanduser()
    if not src.is_dir():
        raise WeightsError(f"weights folder {src} does not exist: pass the folder holding the .h5 files "
                           f"({seed_command('FOLDER')})")
    target = Path(keras_home).expanduser() / "models" if keras_home else cache_dirs()[0]
    sums = _read_sums(src)
    found = sorted(p for p in src.iterdir() if p.is_file() and known_file(p.name))
    if not found:
        raise WeightsError(f"no known Keras weight files in {src} (expected names like "
                           f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5)")
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for path in found:
        sha = verify_file(path)
        if path.name in sums and sums[path.name] != sha:
            raise WeightsError(f"{path}: sha256 {sha} does not match {src / 'SHA256SUMS'} ({sums[path.name]})")
        dest = target / path.name
        if dest.is_file() and sha256_file(dest) == sha:
            out.append(dest)
            continue
        tmp = target / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        out.append(dest)
    return out


def weights_command(from_dir: str | Path, keras_home: str | Path | None = None) -> int:
    """`python -m pipeline weights --from DIR`: seed the Keras cache; 0 on success, 2 on error."""
    try:
        paths = seed_cache(from_dir, keras_home)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        pinned = ("verified" if PINNED_SHA256.get(p.name) else "verified (md5 pinned by Keras)"
                  if p.name in PINNED_MD5 else "NOT pinned (unverified)")
        print(f"{p}  sha256 {sha256_file(p)[:16]}...  {pinned}")
    print(f"{len(paths)} weight file(s) in {paths[0].parent}")
    return 0
