"""Decoding an image file into canonical pixels, shared by every tier.

One function, `load_image`, turns any file Pillow can read into an RGB image with EXIF orientation
applied, at the smallest scale that is still at least `min_side` pixels on its short side (JPEG
draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, which is the cost floor of the
screen). Failures raise `DecodeError` with a short reason that ends up in the output's `error`.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline import paths

# Pillow's own bomb check raises only above 2x MAX_IMAGE_PIXELS; we check the size ourselves.
Image.MAX_IMAGE_PIXELS = None

# Dihedral transforms by index: 0 identity, 1-3 rotations, 4-7 mirrored. `DIHEDRAL_INVERSE[t]`
# undoes `t`. Shared by the screen (hash variants) and the verify tier (aligning a pair).
DIHEDRAL = [
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.TRANSVERSE,
]
DIHEDRAL_INVERSE = [0, 3, 2, 1, 4, 5, 6, 7]
DIHEDRAL_NAMES = ["identity", "rot90", "rot180", "rot270", "flip-lr", "transpose", "flip-tb", "transverse"]


class DecodeError(Exception):
    """The file cannot be turned into pixels; `str()` is the reason recorded in the output."""


def dihedral(img: Image.Image, t: int) -> Image.Image:
    return img if t == 0 else img.transpose(DIHEDRAL[t])


def to_rgb(img: Image.Image) -> Image.Image:
    """Palette, alpha, 16-bit, CMYK, grey, bilevel -> RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        arr = arr * (255.0 / hi) if hi > 255 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def open_checked(path: str | Path, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count; raises DecodeError."""
    try:
        if isinstance(path, bytes) or (isinstance(path, str) and paths.is_long(path)):
            # a name that is not UTF-8 (Pillow opens str paths only), or beyond PATH_MAX
            with paths.open_bytes(path) as fh:
                path = io.BytesIO(fh.read())
        img = Image.open(path)
    except FileNotFoundError:
        raise DecodeError("file disappeared before it was read") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError(f"cannot open: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(f"image too large: {w}x{h} pixels exceeds screen.max_pixels={max_pixels}")
    return img


def load_image(path: str | Path, min_side: int | None = None, max_pixels: int = 200_000_000,
               ) -> tuple[Image.Image, tuple[int, int], str]:
    """Decode `path` -> (RGB image, (width, height) of the full image after EXIF rotation, format).

    With `min_side`, JPEGs are decoded in draft mode at the smallest DCT scale whose short side is
    still >= min_side (the returned image may be larger than that; callers resize). Animated
    images give their first frame.
    """
    img = open_checked(path, max_pixels)
    fmt = img.format or "UNKNOWN"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Possibly corrupt EXIF data": not fatal
            orientation = 1
            try:
                orientation = int(img.getexif().get(0x0112, 1) or 1)
            except Exception:  # broken EXIF block: decode the pixels as stored
                orientation = 1
            w, h = img.size
            full_size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if min_side and fmt == "JPEG":
                short = min(w, h)
                scale = max(1, min(8, short // min_side))
                if scale > 1:
                    img.draft("RGB", (w // scale, h // scale))
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError,
            TypeError, KeyError, ZeroDivisionError) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            raise DecodeError(f"truncated file: {text}") from None
        raise DecodeError(f"cannot decode: {text}") from None
    return img, full_size, fmt


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is <= max_side (never upscales)."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                      reducing_gap=2.0)
