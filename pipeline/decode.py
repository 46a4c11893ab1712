"""Decoding an image file into canonical pixels, shared by every tier.

One function, `load_image`, turns any file Pillow can read into an 8-bit sRGB image with EXIF
orientation applied, at the smallest scale that is still at least `min_side` pixels on its short
side (JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, which is the cost
floor of the screen; HEIC/HEIF files decode an embedded thumbnail instead when one is large
enough). Failures raise `DecodeError` with a short reason that ends up in the output's `error`.

Formats: everything Pillow reads (JPEG, PNG, TIFF, WebP, GIF, BMP, AVIF with Pillow >= 11.2, ...)
plus HEIC/HEIF through pillow-heif (8-, 10- and 12-bit; libheif applies the HEIF rotation/mirror
boxes itself and pillow-heif resets the EXIF orientation to 1). Animated GIF/WebP/APNG and
multi-page TIFF give their first frame. 16-bit images are scaled to 8 bits; float images are read
as 0..1 (or 0..255) when their values fit, else stretched min..max. Colour: an embedded ICC
profile (Adobe RGB, Display P3, a CMYK press profile, ...) is converted to sRGB with LittleCMS
(`to_rgb`, the one conversion every tier uses); CMYK without a profile uses Pillow's plain formula.
TIFFs Pillow cannot open (float RGB) are decoded by OpenCV.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pillow_heif
import simplejpeg
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from pipeline import paths, scan, storage

# Pillow's own bomb check raises only above 2x MAX_IMAGE_PIXELS; we check the size ourselves.
Image.MAX_IMAGE_PIXELS = None

# A PNG's compressed text or profile chunk may decompress to 1 MB (Pillow's default) before the
# file is refused as a whole: a photo with a 3 MB colour profile or Photoshop's XMP history was an
# error row. Still bounded, per chunk and per file.
PngImagePlugin.MAX_TEXT_CHUNK = 32 * 2**20
PngImagePlugin.MAX_TEXT_MEMORY = 64 * 2**20

# Pillow's warning about a damaged EXIF block, raised as a file is opened or its orientation read:
# not fatal (the picture decodes; the orientation is left as it is), and printed without the
# file's name it is noise on a batch job's stderr (a filter set once: catch_warnings around each
# call is not thread-safe)
warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF data", category=UserWarning)

# formats decoded at a reduced DCT scale: a camera JPEG with an MPF preview (Nikon, Canon, Fuji)
# opens as "MPO", a JPEG with a second picture appended; it was decoded at full size by every tier
JPEG_FORMATS = ("JPEG", "MPO")

# HEIC/HEIF opener, registered at import so every process that decodes (the driver, each Dask
# worker: they all import this module before decoding) knows the format. One decode thread: Dask
# already runs one task per core.
pillow_heif.register_heif_opener(decode_threads=1, depth_images=False, aux_images=False)

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
# The same transforms applied to a (rows, cols) array: the screen's hash bit grids, the verify
# tier's pixel check (here, not in screen.py, so that both results' fingerprints cover them)
GRID_DIHEDRAL = [
    lambda a: a,
    lambda a: np.rot90(a, 1),
    lambda a: np.rot90(a, 2),
    lambda a: np.rot90(a, 3),
    lambda a: a[:, ::-1],
    lambda a: a.T,
    lambda a: a[::-1, :],
    lambda a: a[::-1, ::-1].T,
]


class DecodeError(Exception):
    """The file cannot be turned into pixels; `str()` is the reason recorded in the output."""


def dihedral(img: Image.Image, t: int) -> Image.Image:
    return img if t == 0 else img.transpose(DIHEDRAL[t])


def to_8bit(arr: np.ndarray, is_float: bool) -> np.ndarray:
    """A 16/32-bit integer or float array -> uint8. Integers above 255 are taken as 16-bit (/257)
    up to 65535, else stretched by their maximum; floats within 0..1 are scaled by 255, within
    0..255 kept, anything else stretched min..max (NaN/inf -> 0)."""
    arr = np.asarray(arr, dtype=np.float64)
    if is_float:
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if is_float and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif not is_float and lo >= 0 and hi <= 65535:
        arr = arr / 257.0
    elif hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:
        arr = np.zeros_like(arr)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


_SRGB = ImageCms.createProfile("sRGB")
_cms = threading.local()  # LittleCMS transforms keep a per-transform cache: one set per thread
_ICC_INPUT = {"RGB": "RGB ", "CMYK": "CMYK", "L": "GRAY"}  # image mode -> ICC colour space it needs


def _icc_transform(icc: bytes, mode: str):
    """A cached LittleCMS transform `mode` -> sRGB for this ICC profile, or None when the profile
    is sRGB already, broken, or not for this mode (then the plain conversion is used)."""
    cache = getattr(_cms, "transforms", None)
    if cache is None:
        cache = _cms.transforms = {}
    key = (hashlib.blake2b(icc, digest_size=16).digest(), mode)
    if key in cache:
        return cache[key]
    transform = None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
        desc = (profile.profile.profile_description or "").lower()
        # sRGB-tagged files (most camera JPEGs) are already what every tier expects: skip the work
        if space == _ICC_INPUT.get(mode) and "srgb" not in desc:
            transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB",
                                                renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        transform = None  # an unreadable profile: decode the pixels as stored
    if len(cache) >= 64:  # a folder rarely has more profiles than this; bound the memory anyway
        cache.clear()
    cache[key] = transform
    return transform


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit sRGB: palette, alpha (composited on white), 16-bit, float, grey, bilevel,
    CMYK; an embedded ICC profile is converted to sRGB (`_icc_transform`)."""
    icc = img.info.get("icc_profile")
    if img.mode == "RGB" and not icc and "transparency" not in img.info:
        return img
    if "transparency" in img.info and img.mode in ("1", "L", "RGB"):
        # a colour key (PNG tRNS: what optimisers make of an alpha that is only on or off): its
        # pixels are as transparent as an alpha channel's, composited on white below
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        img = Image.fromarray(to_8bit(np.asarray(img), is_float=False), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(to_8bit(np.asarray(img), is_float=True), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    transform = _icc_transform(icc, img.mode) if icc and img.mode in _ICC_INPUT else None
    if transform is not None:
        return ImageCms.applyTransform(img, transform)
    return img.convert("RGB")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _read_bytes(path) -> bytes:
    """A file's, a stream's or a store object's bytes (OSError when they cannot be read)."""
    if isinstance(path, io.BytesIO):
        return path.getvalue()
    if storage.is_url(path):
        return storage.read_bytes(path)
    with paths.open_bytes(path) as fh:
        return fh.read()


def _opencv_tiff(path, max_pixels: int) -> Image.Image | None:
    """A TIFF that Pillow cannot open (float or many-channel samples) decoded by OpenCV, or None
    when the file is not a TIFF or OpenCV cannot read it either."""
    try:
        data = _read_bytes(path)
    except OSError:
        return None
    if data[:4] not in _TIFF_MAGIC:
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim not in (2, 3) or arr.size == 0:
        return None
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise DecodeError(f"image too large: {arr.shape[1]}x{arr.shape[0]} pixels exceeds "
                          f"screen.max_pixels={max_pixels}")
    if arr.ndim == 3:
        arr = arr[..., :3][..., ::-1] if arr.shape[2] >= 3 else arr[..., 0]  # BGR(A) -> RGB
    if arr.dtype != np.uint8:
        arr = to_8bit(arr, is_float=arr.dtype.kind == "f")
    img = Image.fromarray(np.ascontiguousarray(arr))
    img.format = "TIFF"
    return img


DNG_VERSION_TAG = 50706


def _head(path) -> bytes:
    """The first bytes of a file or a stream (nothing when they cannot be read)."""
    try:
        if hasattr(path, "read"):
            path.seek(0)
            return path.read(scan.SNIFF_BYTES)
        with paths.open_bytes(path) as fh:
            return fh.read(scan.SNIFF_BYTES)
    except (OSError, ValueError):
        return b""


_ICON_MAGIC = (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")  # ICO, CUR
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _icon_pictures(path) -> list[tuple[int, int]]:
    """The sizes of the pictures an ICO or CUR file holds, read from their own headers; [] for
    any other file. Pillow decodes an icon's largest picture as it opens the file, before its size
    can be checked, and the directory's byte-sized width and height say 256 at most whatever the
    picture is: a 3.5 MB icon holding a 30000x30000 PNG took 3.6 GB to open."""
    try:
        fh = path if hasattr(path, "read") else paths.open_bytes(path)
    except OSError:
        return []  # (Image.open says why)
    try:
        fh.seek(0)
        head = fh.read(6)
        if len(head) < 6 or head[:4] not in _ICON_MAGIC:
            return []
        sizes = []
        for i in range(struct.unpack("<H", head[4:6])[0]):
            fh.seek(6 + 16 * i)
            entry = fh.read(16)
            if len(entry) < 16:
                break
            fh.seek(struct.unpack("<I", entry[12:16])[0])
            picture = fh.read(24)
            if picture[:8] == _PNG_MAGIC and len(picture) >= 24:
                sizes.append(struct.unpack(">II", picture[16:24]))
            elif len(picture) >= 12:  # a DIB: its height counts the picture and its mask
                if struct.unpack("<I", picture[:4])[0] == 12:  # (the old core header: 16-bit sizes)
                    w, h = struct.unpack("<HH", picture[4:8])
                else:
                    w, h = struct.unpack("<ii", picture[4:12])
                sizes.append((abs(w), abs(h) // 2))
        return sizes
    except (OSError, struct.error):
        return []
    finally:
        if not hasattr(path, "read"):
            fh.close()
        else:
            fh.seek(0)


def open_checked(path: str | Path, max_pixels: int, max_decode_bytes: int | None = None) -> Image.Image:
    """Open (header only) and check the pixel count; raises DecodeError. `max_decode_bytes`: an icon,
    which Pillow decodes as it opens it, is refused first when its picture needs more."""
    try:
        if storage.is_url(path):  # an object in a store: one GET, decoded from memory
            path = io.BytesIO(storage.read_bytes(path))
        elif isinstance(path, (str, bytes, os.PathLike)) and not stat.S_ISREG(paths.stat(path).st_mode):
            # (a named pipe's open waits for a writer: `dedupe report` hung on a file of a run
            # that had become one since)
            raise DecodeError("cannot read: not a regular file (a pipe, socket or device)")
        if isinstance(path, bytes) or (isinstance(path, str) and paths.is_long(path)):
            # a name that is not UTF-8 (Pillow opens str paths only), or beyond PATH_MAX
            with paths.open_bytes(path) as fh:
                path = io.BytesIO(fh.read())
        for w, h in _icon_pictures(path):
            if w * h > max_pixels:
                raise DecodeError(f"image too large: the icon holds a {w}x{h} picture, above "
                                  f"screen.max_pixels={max_pixels}")
            if max_decode_bytes is not None and 4 * w * h > max_decode_bytes:
                raise DecodeError(f"image too large to decode: the icon holds a {w}x{h} picture, which needs "
                                  f"{4 * w * h / 2**20:.0f} MiB, above screen.max_decode_bytes={max_decode_bytes}")
        img = Image.open(path)
    except FileNotFoundError:
        raise DecodeError("file disappeared before it was read") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except Image.UnidentifiedImageError:
        img = _opencv_tiff(path, max_pixels)
        if img is None:
            said = scan.sniff(_head(path))
            if said == "RAW":  # (an object on a store is not sniffed when its name says image)
                raise DecodeError(scan.RAW_ERROR) from None
            if said:  # (a truncated AVIF read as "not a recognised image format", as a text file does)
                raise DecodeError(f"cannot decode: its first bytes say {said}, which its decoder cannot read "
                                  "(corrupt or truncated?)") from None
            raise DecodeError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        if "MAX_TEXT_CHUNK" in str(exc) or "MAX_TEXT_MEMORY" in str(exc):  # (Pillow's words name its constants)
            raise DecodeError(f"PNG text too large: a text or profile chunk decompresses past the limit of "
                              f"{PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MiB a chunk, "
                              f"{PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MiB a file") from None
        said = scan.sniff(_head(path))  # (which format's reader failed, for a reader's bare words:
        # "could not create decoder object" was a truncated WebP)
        where = f" (its first bytes say {said}: corrupt or truncated?)" if said else ""
        raise DecodeError(f"cannot open: {str(exc).strip()}{where}") from None
    if img.format == "TIFF" and DNG_VERSION_TAG in getattr(img, "tag_v2", {}):
        # (a DNG by any name: its first picture is the camera's small preview, not the photo)
        raise DecodeError(scan.RAW_ERROR)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(f"image too large: {w}x{h} pixels exceeds screen.max_pixels={max_pixels}")
    return img


# Memory: what one decoded image may cost (screen.max_decode_bytes), and above which size an image
# whose format has no reduced-scale decode is shrunk right after decoding, before any conversion
# copies it (every later step then works on the small copy).
DEFAULT_MAX_DECODE_BYTES = 512 * 2**20
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "I", "F", "CMYK"}
REDUCE_ABOVE_PIXELS = 24_000_000
_REDUCE_BAND_PIXELS = 1 << 22  # a 16-bit image is reduced a band of about this many pixels at a time


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """Box-reduce by `factor`: Pillow's own for the modes it takes; a 16-bit image (which it
    refuses: such a file above REDUCE_ABOVE_PIXELS was an error row) as 32-bit "I" a band of rows
    at a time (the band's copy, not the whole image's, is the extra memory), the same values;
    any other mode by nearest neighbour."""
    if img.mode in _REDUCIBLE:
        return img.reduce(factor)
    if not img.mode.startswith("I;16"):
        return img.resize((max(1, img.size[0] // factor), max(1, img.size[1] // factor)), Image.Resampling.NEAREST)
    w, h = img.size
    out = Image.new("I", (-(-w // factor), -(-h // factor)))  # (reduce rounds up, as Pillow's)
    step = factor * max(1, _REDUCE_BAND_PIXELS // (w * factor))
    for top in range(0, h, step):
        out.paste(img.crop((0, top, w, min(h, top + step))).convert("I").reduce(factor), (0, top // factor))
    return out


def decoded_bytes(img: Image.Image) -> int:
    """Bytes Pillow holds for `img` decoded at its current (draft) size: 8-bit single-band modes
    take 1 byte a pixel, 16-bit ones 2, every other mode 4 (RGB is stored padded to 4)."""
    mode = img.mode
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return img.size[0] * img.size[1] * per_pixel


def _check_budget(img: Image.Image, max_decode_bytes: int) -> None:
    need = decoded_bytes(img)
    if need > max_decode_bytes:
        raise DecodeError(f"image too large to decode: {img.size[0]}x{img.size[1]} {img.mode} needs "
                          f"{need / 2**20:.0f} MiB even at the smallest scale its format allows, above "
                          f"screen.max_decode_bytes={max_decode_bytes}")


def _progressive(img: Image.Image) -> bool:
    """A progressive JPEG (Pillow says so in either key)."""
    return bool(img.info.get("progressive") or img.info.get("progression"))


def _check_progressive_budget(img: Image.Image, size: tuple[int, int], max_decode_bytes: int) -> None:
    """A progressive JPEG is decoded from all of its DCT coefficients, kept at full size whatever
    the draft scale (two bytes per sample: 3 B a pixel at 4:2:0, 6 at 4:4:4): a 2.3 MB file of
    14000x14000 pixels took 1.26 GB where the draft size said 12 MB."""
    if not _progressive(img):
        return
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
    h_max = max(layer[1] for layer in layers)
    v_max = max(layer[2] for layer in layers)
    samples = sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)
    need = int(2 * samples * size[0] * size[1])
    if need > max_decode_bytes:
        raise DecodeError(f"image too large to decode: a progressive JPEG of {size[0]}x{size[1]} keeps all its "
                          f"coefficients while decoding, {need / 2**20:.0f} MiB, above "
                          f"screen.max_decode_bytes={max_decode_bytes}")


def _scale_grey_key(img: Image.Image) -> None:
    """A 2- or 4-bit grey PNG's colour key (tRNS) in its pixels' 8-bit scale: Pillow scales the
    pixels (1 of 0-3 is 85) and keeps the key as stored, which then matched nothing."""
    rawmode = getattr(getattr(img, "png", None), "im_rawmode", "")
    key = img.info.get("transparency")
    if rawmode in ("L;2", "L;4") and isinstance(key, int):
        img.info["transparency"] = key * 255 // ((1 << int(rawmode[2:])) - 1)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when there is none, or the EXIF block is broken: the pixels
    are then taken as stored)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def _strict_jpeg(img: Image.Image) -> Image.Image | None:
    """The pixels of an opened (and drafted) JPEG, decoded by libjpeg-turbo through simplejpeg,
    which, unlike Pillow, raises on the warnings libjpeg gives for damaged compressed data:
    Pillow drops them and returns the picture with a band of garbage (two bytes changed in a
    backup's copy: no error, still paired with the intact original, and a plan kept the damaged
    file). The same pixels as Pillow's (both are libjpeg-turbo with its default DCT and
    upsampling: 1,904 decodes of the shared photos, full size and drafted, bit for bit), at the
    same cost. None for what it does not decode the same (CMYK: Pillow's path, once this has
    checked its compressed data the same way: a damaged CMYK copy went through as whole)."""
    if img.mode not in ("RGB", "L", "CMYK"):
        return None
    fp = img.fp
    fp.seek(0)
    data = fp.read()
    if _arithmetic_coded(data):  # (Pillow, which the other tiers decode with, cannot read them)
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace={"L": "GRAY", "CMYK": "CMYK"}.get(img.mode, "RGB"),
                                        min_width=img.size[0], min_height=img.size[1], strict=True)
    except ValueError as exc:
        text = str(exc).strip()
        if "premature end of jpeg file" in text.lower():  # (not "... of data segment": damage)
            raise DecodeError(f"truncated file: {text}") from None
        if _damaged_data(text, _progressive(img)):
            raise DecodeError(f"damaged JPEG data: {text} (its picture decodes only in part; "
                              "screen.strict_jpeg: false reads it as far as it goes)") from None
        return None  # a warning about the headers (a JFIF version, a padding byte, an ICC chunk's
        # count: the picture is whole) or an error Pillow may not share: Pillow's path decides
    # (a CMYK picture is only checked here; another scale than Pillow's draft: Pillow's path)
    if img.mode == "CMYK" or pixels.shape[:2] != (img.size[1], img.size[0]):
        return None
    out = Image.fromarray(pixels[..., 0] if img.mode == "L" else pixels, img.mode)
    out.info = dict(img.info)  # (the EXIF orientation and colour profile, read from here on)
    return out


# libjpeg's warnings about the compressed picture itself; its others are about the headers
_DAMAGE_WARNINGS = ("premature end of data segment", "bad huffman code", "bad arithmetic code", "instead of rst",
                    "huffman table")
_EXTRANEOUS = re.compile(r"extraneous bytes before marker 0x([0-9a-f]{2})", re.IGNORECASE)


def _damaged_data(text: str, progressive: bool) -> bool:
    """Does this libjpeg message say the compressed picture is damaged? Stray bytes before a
    restart marker or the end of the picture are left by a scan that went astray (bit rot's usual
    sign), and between a progressive file's scans (before the next scan or its tables) too;
    before a header marker they are padding."""
    low = text.lower()
    if any(w in low for w in _DAMAGE_WARNINGS):
        return True
    stray = _EXTRANEOUS.search(text)
    if stray is None:
        return False
    marker = int(stray.group(1), 16)
    return 0xD0 <= marker <= 0xD9 or (progressive and marker in (0xDA, 0xC4))


def _arithmetic_coded(data: bytes) -> bool:
    """Is the JPEG's frame arithmetic-coded (SOF9-SOF15)? Its header segments walked to the frame."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # (fill byte)
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker >= 0xC9
        if marker == 0xDA:
            return False
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return False


def load_image(path: str | Path, min_side: int | None = None, max_pixels: int = 200_000_000,
               max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
               strict_jpeg: bool = False) -> tuple[Image.Image, tuple[int, int], str]:
    """Decode `path` -> (RGB image, (width, height) of the full image after EXIF rotation, format).

    With `min_side`, JPEGs are decoded in draft mode at the smallest DCT scale whose short side is
    still >= min_side, and HEIC/HEIF files from an embedded thumbnail whose short side is >=
    min_side when they have one (the returned image may be larger than min_side; callers resize).
    Animated images and multi-page TIFFs give their first frame. `strict_jpeg` (the screen, which
    records each file's error): a JPEG whose compressed data libjpeg finds damaged raises.
    """
    img = open_checked(path, max_pixels, max_decode_bytes)
    fmt = img.format or "UNKNOWN"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Possibly corrupt EXIF data": not fatal
            drafts = bool(min_side) and fmt in (*JPEG_FORMATS, "HEIF")  # can decode at a reduced scale
            if not drafts:  # refuse by header, before getexif (a PNG's EXIF may follow its pixels:
                _check_budget(img, max_decode_bytes)  # reading it decodes the whole image)
            if fmt == "PNG":
                _scale_grey_key(img)
                # decoded here, its errors raised: getexif decodes a PNG to find an eXIf chunk past
                # its pixels, and _orientation, which must not fail on a broken EXIF block, swallowed
                # a damaged stream's error; the load below then kept the half-decoded pixels (a
                # damaged copy was paired with its original, and a plan could keep it)
                img.load()
            orientation = _orientation(img)
            w, h = img.size
            full_size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if min_side and fmt in JPEG_FORMATS:
                short = min(w, h)
                scale = max(1, min(8, short // min_side))
                if scale > 1:
                    img.draft("RGB", (w // scale, h // scale))
            elif min_side and fmt == "HEIF" and min(w, h) > min_side:
                # pillow-heif picks the smallest embedded thumbnail at least this large (same
                # orientation and colour profile as the image), or keeps the full image
                short = min(w, h)
                img.draft(img.mode, (-(-w * min_side // short), -(-h * min_side // short)))
            if drafts:
                _check_budget(img, max_decode_bytes)  # at the draft scale chosen above
            if fmt in JPEG_FORMATS:
                _check_progressive_budget(img, (w, h), max_decode_bytes)
            strict = _strict_jpeg(img) if strict_jpeg and fmt in JPEG_FORMATS else None
            if strict is not None:
                img.close()
                img = strict
            img.load()
            if orientation in (5, 6, 7, 8) and _orientation(img) == 1:
                full_size = (w, h)  # (the plugin turned it as it opened it, a TIFF: its size was turned)
            if min_side and img.size[0] * img.size[1] > REDUCE_ABOVE_PIXELS:
                factor = min(img.size) // min_side
                if factor >= 2:  # box-reduce now: conversions below then copy the small image
                    img = _reduce(img, factor)
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError,
            TypeError, KeyError, ZeroDivisionError) as exc:
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, MemoryError):  # (named: a failure for memory is tried again, catalog.tried_again)
            raise DecodeError(f"cannot decode: MemoryError: {text}") from None
        if "truncated" in text.lower():
            raise DecodeError(f"truncated file: {text}") from None
        try:  # (the bytes read again for the wording only: a failure here says nothing new)
            arithmetic = fmt in JPEG_FORMATS and _arithmetic_coded(_read_bytes(path))
        except Exception:
            arithmetic = False
        if arithmetic:
            raise DecodeError(f"cannot decode: {text} (an arithmetic-coded JPEG, a rare variant: corrupt, "
                              "or one its decoder does not read)") from None
        raise DecodeError(f"cannot decode: {text} ({fmt} data: corrupt or truncated?)") from None
    return img, full_size, fmt


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is <= max_side (never upscales)."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                      reducing_gap=2.0)
