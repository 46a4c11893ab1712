"""Stage 2, screen: per image, one read and one decode -> sha256, size, format and perceptual hashes.

`screen_partition` is a plain function over one partition of scanned files; `run.py` maps it over
Dask. Each file is read once: the sha256 is taken of those bytes and Pillow decodes the same
bytes (JPEGs in draft mode at the smallest DCT scale that still has `screen.decode_size` pixels on
the short side). Besides the plain hash, the screen hashes the 7 other dihedral orientations
(so a mirrored or rotated copy meets its original in the candidate search) and the picture
inside uniform borders or a UI frame (letterbox, pillarbox, a screenshot of a viewer window:
`pipeline.borders`). A file that cannot be read or
decoded gets its reason in `error`; nothing is raised.
"""
from __future__ import annotations

import hashlib
import io
from typing import Callable

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from pipeline import paths, scan, storage
from pipeline.borders import content_box
from pipeline.config import ScreenConfig
from pipeline.decode import GRID_DIHEDRAL, DecodeError, dihedral, load_image
from pipeline.scan import FileEntry

N_VARIANTS = 9  # 0 plain, 1..7 the other dihedral orientations, 8 the content box (borders, frames cut)
TRIMMED = 8
HASH_SIZE_WORK = 128  # hashes are computed from a copy at most this large (cheap transposes)

HASHERS: dict[str, Callable[..., imagehash.ImageHash]] = {
    "ahash": imagehash.average_hash,
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
}

COLUMNS = ["path", "abs_path", "bytes", "mtime", "width", "height", "format", "sha256", "hash",
           "error", "codes", "variant_mask", "mtime_ns"]


def hash_words(h: imagehash.ImageHash) -> np.ndarray:
    """ImageHash -> uint64 words, most significant bit first (same bit order as its hex string)."""
    return np.frombuffer(np.packbits(h.hash.flatten()).tobytes(), dtype=">u8").astype(np.uint64)


def words_to_hex(words: np.ndarray) -> str:
    return "".join(f"{int(w):016x}" for w in words)


def _words(bits: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.packbits(bits.flatten()).tobytes(), dtype=">u8").astype(np.uint64)


def image_hashes(img: Image.Image, cfg: ScreenConfig) -> tuple[np.ndarray, int]:
    """(codes (N_VARIANTS, W) uint64, variant bitmask) for a decoded RGB image."""
    hasher = HASHERS[cfg.hash]
    words = cfg.hash_size * cfg.hash_size // 64
    codes = np.zeros((N_VARIANTS, words), dtype=np.uint64)
    small = img.copy()
    small.thumbnail((max(HASH_SIZE_WORK, 4 * cfg.hash_size),) * 2, Image.Resampling.BILINEAR, reducing_gap=2.0)
    grey = small.convert("L")
    mask = 0
    turns = 8 if cfg.dihedral else 1
    if cfg.hash == "ahash":
        # aHash thresholds a symmetric downscale: flipping the image flips its bit grid, so the
        # variants are exact permutations of one hash (no 7 more resizes)
        bits = hasher(grey, hash_size=cfg.hash_size).hash
        for t in range(turns):
            codes[t] = _words(GRID_DIHEDRAL[t](bits))
    else:  # pHash/dHash/wHash are not flip-equivariant: hash each orientation
        for t in range(turns):
            codes[t] = hash_words(hasher(dihedral(grey, t), hash_size=cfg.hash_size))
    mask |= (1 << turns) - 1
    if cfg.trim_borders:
        box = content_box(small, cfg.border_tolerance, frames=cfg.trim_frames)
        if box is not None:
            trimmed = hash_words(hasher(grey.crop(box), hash_size=cfg.hash_size))
            if not np.array_equal(trimmed, codes[0]):
                codes[TRIMMED] = trimmed
                mask |= 1 << TRIMMED
    return codes, mask


def screen_file(entry: FileEntry, cfg: ScreenConfig) -> dict:
    row = _screen_file(entry, cfg)
    row["error"] = paths.clean_text(row["error"])  # a message may quote a name that is not UTF-8
    return row


def _screen_file(entry: FileEntry, cfg: ScreenConfig) -> dict:
    row = {"path": paths.internal(entry.path), "abs_path": paths.internal(entry.abs_path),
           "bytes": entry.bytes, "mtime": entry.mtime,
           "width": None, "height": None, "format": None, "sha256": None, "hash": None,
           "error": entry.error, "codes": None, "variant_mask": 0, "mtime_ns": entry.mtime_ns}
    if entry.error:
        return row
    try:
        with storage.open_input(entry.abs_path) as fh:
            data = fh.read()
    except OSError as exc:
        row["error"] = f"cannot read: {exc.strerror or exc}"
        return row
    if data and storage.is_url(entry.abs_path) and not scan.sniff(data[:scan.SNIFF_BYTES]):
        row["error"] = "not an image: content matches no known image format"  # as scan says of a local file
        return row
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        row["error"] = "empty file"
        return row
    try:
        img, (width, height), fmt = load_image(io.BytesIO(data), min_side=cfg.decode_size,
                                               max_pixels=cfg.max_pixels, max_decode_bytes=cfg.max_decode_bytes,
                                               strict_jpeg=cfg.strict_jpeg)
        row.update(width=width, height=height, format=fmt)
        codes, mask = image_hashes(img, cfg)
    except DecodeError as exc:
        row["error"] = str(exc)
        return row
    except Exception as exc:  # a decoder bug on one hostile file must not stop the run
        row["error"] = f"cannot decode: {type(exc).__name__}: {exc}"
        return row
    row["hash"] = words_to_hex(codes[0])
    row["codes"] = codes.tobytes()
    row["variant_mask"] = mask
    return row


def screen_partition(entries: list[FileEntry], cfg: ScreenConfig) -> pd.DataFrame:
    """Screen one partition of files -> one row per file (see COLUMNS)."""
    frame = pd.DataFrame([screen_file(e, cfg) for e in entries], columns=COLUMNS)
    return frame.astype({"bytes": "int64", "mtime": "float64", "width": "Int64", "height": "Int64",
                         "variant_mask": "int64", "mtime_ns": "int64"})


def unpack_codes(frame: pd.DataFrame, cfg: ScreenConfig) -> tuple[np.ndarray, np.ndarray]:
    """Screen rows -> (codes (N, N_VARIANTS, W) uint64, variant_mask (N, N_VARIANTS) bool)."""
    words = cfg.hash_size * cfg.hash_size // 64
    codes = np.zeros((len(frame), N_VARIANTS, words), dtype=np.uint64)
    for i, blob in enumerate(frame["codes"].to_numpy()):
        if blob is not None:
            codes[i] = np.frombuffer(blob, dtype=np.uint64).reshape(N_VARIANTS, words)
    bits = frame["variant_mask"].to_numpy(dtype=np.int64)
    mask = ((bits[:, None] >> np.arange(N_VARIANTS)) & 1).astype(bool)
    return codes, mask
