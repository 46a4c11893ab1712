"""A seeded, deterministic near-duplicate benchmark built from real photos.

`generate(photos_dir, out_dir, seed, sources, distractors)` samples `sources` photos, copies each
one untouched (the group's "original") and writes 4-6 transformed copies of it, plus `distractors`
untouched other photos (singleton groups). `out_dir/labels.csv` has one row per image:
`path,group_id,transform,category,params` with `path` relative to `out_dir` (the folder the
pipeline scans), the same convention as the labelled sets in ../shared/data/labelled.

Same seed + same arguments -> the same files, byte for byte (Pillow's encoders are
deterministic; every random choice comes from a generator seeded by (seed, group, transform)).

Categories (what a plain 64-bit aHash at distance <= 10 is expected to do, and what a good
pipeline must do; `make eval` prints the measured numbers per category and per transform):

- easy:   codec and scale changes and mild global photometric edits; the image content and
          framing are unchanged, so any perceptual hash finds them (measured: aHash and pHash
          <= 10 find all of them) (exact copy, JPEG q90/q50/q20, PNG, WebP, resize 50%/25%,
          128 px thumbnail, brightness, contrast, saturation, greyscale, Gaussian blur)
- medium: edits a plain hash often misses but that keep (nearly) all of the picture: dihedral
          transforms (flips, 90/180/270 rotations), 90% crops, 3 degree rotation,
          text/watermark overlays, letterbox/pillarbox bars
- hard:   large geometric changes: 75% and 60% crops (centre and off-centre), 8 degree rotation,
          the photo shrunk inside a screenshot-style UI frame

Crops keep the given fraction of each side (a 60% crop keeps 36% of the area). Off-centre crops
are anchored at a seeded random corner. Rotations by 3/8 degrees (seeded sign) are cropped to the
largest axis-aligned rectangle inside the rotated picture, so there are no black corners.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

SUITE_VERSION = 2  # bump when a transform changes: the cache key includes it
REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()
DEFAULT_PHOTOS = SHARED / "data" / "photos"
DEFAULT_BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/tmp/dedupe-bench"))
SAVE_QUALITY = 92  # JPEG quality for transformed copies whose transform is not a codec change
LABEL_COLUMNS = ["path", "group_id", "transform", "category", "params"]


@dataclass(frozen=True)
class Transform:
    name: str
    category: str
    fn: Callable  # (img: RGB Image, rng) -> (Image, params: str, fmt: str, save kwargs)


def _jpeg(img, quality):
    return img, f"q={quality}", "JPEG", {"quality": quality}


def _save_default(img, params=""):
    return img, params, "JPEG", {"quality": SAVE_QUALITY}


def _resize(img, frac):
    w, h = img.size
    return img.resize((max(1, round(w * frac)), max(1, round(h * frac))), Image.Resampling.LANCZOS)


def _crop(img, frac, rng, centre):
    w, h = img.size
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    if centre:
        x, y, where = (w - cw) // 2, (h - ch) // 2, "centre"
    else:
        corner = int(rng.integers(4))
        x = 0 if corner in (0, 2) else w - cw
        y = 0 if corner in (0, 1) else h - ch
        where = ["top-left", "top-right", "bottom-left", "bottom-right"][corner]
    return img.crop((x, y, x + cw, y + ch)), f"{where} {frac:.0%} of each side"


def _rotate_inscribed(img, degrees):
    """Rotate and crop to the largest axis-aligned rectangle inside the rotated image."""
    w, h = img.size
    rot = img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
    a = math.radians(abs(degrees))
    sin_a, cos_a = math.sin(a), math.cos(a)
    long_side, short_side = max(w, h), min(w, h)
    if short_side <= 2 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * short_side
        wr, hr = (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr, hr = (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a
    rw, rh = rot.size
    wr, hr = int(wr) - 2, int(hr) - 2  # stay clear of interpolated edge pixels
    left, top = (rw - wr) // 2, (rh - hr) // 2
    return rot.crop((left, top, left + wr, top + hr))


def t_rotate(deg):
    def fn(img, rng):
        signed = deg if rng.integers(2) else -deg
        return _save_default(_rotate_inscribed(img, signed), f"{signed:+d} deg, cropped inside")
    return fn


def t_crop(frac, centre):
    def fn(img, rng):
        out, where = _crop(img, frac, rng, centre)
        return _save_default(out, where)
    return fn


def _font(size):
    return ImageFont.load_default(size=size)  # Pillow's bundled font: same glyphs everywhere


def t_text_overlay(img, rng):
    w, h = img.size
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    # caption band at the bottom
    band = max(16, h // 8)
    d.rectangle((0, h - band, w, h), fill=(0, 0, 0, 150))
    words = ["Holiday 2019", "SALE -50%", "photo: J. Doe", "#travel #nature", "Breaking news"]
    caption = words[int(rng.integers(len(words)))]
    d.text((band // 3, h - band + band // 6), caption, font=_font(int(band * 0.6)), fill=(255, 255, 255, 255))
    # semi-transparent watermark across the middle
    mark = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    md = ImageDraw.Draw(mark)
    md.text((w // 2, h // 2), "\u00a9 SAMPLE", font=_font(max(12, w // 8)), fill=(255, 255, 255, 110), anchor="mm")
    mark = mark.rotate(20, resample=Image.Resampling.BICUBIC)
    out = Image.alpha_composite(Image.alpha_composite(base, layer), mark).convert("RGB")
    return _save_default(out, f"caption '{caption}' + diagonal watermark")


def t_bars(kind):
    def fn(img, rng):
        w, h = img.size
        colour = [(0, 0, 0), (255, 255, 255), (24, 24, 24)][int(rng.integers(3))]
        if kind == "letterbox":  # bars above and below: the canvas becomes 1:1 (or taller)
            cw, ch = w, max(h + 2, round(max(w, h * 1.25)))
        else:  # pillarbox: bars left and right, canvas 2:1 (or wider)
            cw, ch = max(w + 2, round(max(2 * h, w * 1.25))), h
        canvas = Image.new("RGB", (cw, ch), colour)
        canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
        return _save_default(canvas, f"{kind} to {cw}x{ch}, bars {colour}")
    return fn


def t_screenshot(img, rng):
    """The photo shown shrunk inside a window: grey frame, title bar with buttons, status bar."""
    w, h = img.size
    scale = 0.7 + 0.1 * float(rng.random())
    pw, ph = round(w * scale), round(h * scale)
    photo = img.resize((pw, ph), Image.Resampling.LANCZOS)
    margin, title, status = max(8, w // 30), max(18, h // 12), max(12, h // 20)
    cw, ch = pw + 2 * margin + w // 6, ph + title + status + 2 * margin  # side panel on the right
    canvas = Image.new("RGB", (cw, ch), (222, 222, 222))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, cw, title), fill=(60, 63, 70))
    for i, c in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
        r = title // 4
        cx = title // 2 + i * (3 * r)
        d.ellipse((cx - r, title // 2 - r, cx + r, title // 2 + r), fill=c)
    d.text((title * 2, title // 5), "IMG_%04d.jpg - Viewer" % int(rng.integers(10000)),
           font=_font(max(9, title // 2)), fill=(230, 230, 230))
    d.rectangle((0, ch - status, cw, ch), fill=(200, 200, 205))
    d.text((margin, ch - status + 1), f"{w} x {h}  100%", font=_font(max(8, status - 4)), fill=(40, 40, 40))
    px = cw - w // 6 + margin // 2
    for i in range(6):  # side panel: thumbnail placeholders
        y = title + margin + i * (ph // 6)
        d.rectangle((px, y, cw - margin // 2, y + ph // 6 - 4), fill=(190 + 8 * (i % 2), 190, 196))
    canvas.paste(photo, (margin, title + margin))
    return canvas, f"photo at {scale:.0%} in a {cw}x{ch} window frame", "PNG", {"optimize": False}


def _enhance(cls, name, choices):
    def fn(img, rng):
        f = choices[int(rng.integers(len(choices)))]
        return _save_default(cls(img).enhance(f), f"{name} x{f}")
    return fn


TRANSFORMS: list[Transform] = [
    Transform("exact_copy", "easy", None),  # byte-for-byte copy (handled by the writer)
    Transform("jpeg_q90", "easy", lambda im, r: _jpeg(im, 90)),
    Transform("jpeg_q50", "easy", lambda im, r: _jpeg(im, 50)),
    Transform("jpeg_q20", "easy", lambda im, r: _jpeg(im, 20)),
    Transform("png", "easy", lambda im, r: (im, "lossless", "PNG", {"optimize": False})),
    Transform("webp", "easy", lambda im, r: (im, "q=80", "WEBP", {"quality": 80, "method": 4})),
    Transform("resize_50", "easy", lambda im, r: _save_default(_resize(im, 0.5), "50% per side")),
    Transform("resize_25", "easy", lambda im, r: _save_default(_resize(im, 0.25), "25% per side")),
    Transform("thumb_128", "easy", lambda im, r: _save_default(
        ImageOps.contain(im, (128, 128), Image.Resampling.LANCZOS), "longer side 128 px")),
    Transform("crop_90_centre", "medium", t_crop(0.90, True)),
    Transform("crop_90_offset", "medium", t_crop(0.90, False)),
    Transform("crop_75_centre", "hard", t_crop(0.75, True)),
    Transform("crop_75_offset", "hard", t_crop(0.75, False)),
    Transform("crop_60_centre", "hard", t_crop(0.60, True)),
    Transform("crop_60_offset", "hard", t_crop(0.60, False)),
    Transform("rotate_3", "medium", t_rotate(3)),
    Transform("rotate_8", "hard", t_rotate(8)),
    Transform("hflip", "medium", lambda im, r: _save_default(ImageOps.mirror(im))),
    Transform("vflip", "medium", lambda im, r: _save_default(ImageOps.flip(im))),
    Transform("rot90", "medium", lambda im, r: _save_default(im.transpose(Image.Transpose.ROTATE_90))),
    Transform("rot180", "medium", lambda im, r: _save_default(im.transpose(Image.Transpose.ROTATE_180))),
    Transform("rot270", "medium", lambda im, r: _save_default(im.transpose(Image.Transpose.ROTATE_270))),
    Transform("brightness", "easy", _enhance(ImageEnhance.Brightness, "brightness", [0.7, 1.3])),
    Transform("contrast", "easy", _enhance(ImageEnhance.Contrast, "contrast", [0.6, 1.5])),
    Transform("saturation", "easy", _enhance(ImageEnhance.Color, "saturation", [0.3, 1.8])),
    Transform("greyscale", "easy", lambda im, r: _save_default(im.convert("L"))),
    Transform("blur", "easy", lambda im, r: _save_default(im.filter(ImageFilter.GaussianBlur(2.0)), "radius 2")),
    Transform("text_overlay", "medium", t_text_overlay),
    Transform("letterbox", "medium", t_bars("letterbox")),
    Transform("pillarbox", "medium", t_bars("pillarbox")),
    Transform("screenshot", "hard", t_screenshot),
]
BY_NAME = {t.name: t for t in TRANSFORMS}
CATEGORIES = ("easy", "medium", "hard")
EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


def plan(photos: list[Path], seed: int, sources: int, distractors: int,
         per_source: tuple[int, int] = (4, 6)) -> tuple[list[Path], list[list[str]], list[Path]]:
    """Choose sources, distractors and each source's transforms (a balanced deck: every transform
    is dealt equally often, each source gets distinct ones)."""
    if sources + distractors > len(photos):
        raise ValueError(f"asked for {sources} sources + {distractors} distractors but only "
                         f"{len(photos)} photos are available")
    rng = _rng("plan", seed)
    order = rng.permutation(len(photos))
    src = [photos[i] for i in order[:sources]]
    dis = [photos[i] for i in order[sources:sources + distractors]]
    names = [t.name for t in TRANSFORMS]
    deck: list[str] = []
    chosen: list[list[str]] = []
    for _ in src:
        k = int(rng.integers(per_source[0], per_source[1] + 1))
        picked: list[str] = []
        while len(picked) < k:
            if not deck:
                deck = [names[i] for i in rng.permutation(len(names))]
            # take the first card not already picked for this source
            for j, name in enumerate(deck):
                if name not in picked:
                    picked.append(deck.pop(j))
                    break
            else:  # every remaining card is a repeat: start a fresh deck
                deck = []
        chosen.append(picked)
    return src, chosen, dis


def render(src_path: Path, transform: str, seed: int, group: str) -> tuple[bytes, str, str]:
    """-> (file bytes, extension, params) of one transformed copy."""
    if transform == "exact_copy":
        return src_path.read_bytes(), src_path.suffix.lower(), "byte-identical copy"
    t = BY_NAME[transform]
    with Image.open(src_path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        out, params, fmt, kwargs = t.fn(im, _rng("render", seed, group, transform))
    buf = io.BytesIO()
    out.save(buf, format=fmt, **kwargs)
    return buf.getvalue(), EXT[fmt], params


def generate(out_dir: str | Path, photos_dir: str | Path = DEFAULT_PHOTOS, seed: int = 0,
             sources: int = 150, distractors: int = 150, quiet: bool = True) -> Path:
    """Write the benchmark into `out_dir` (images under out_dir/images/) and return labels.csv."""
    photos_dir, out_dir = Path(photos_dir), Path(out_dir)
    photos = sorted(p for p in photos_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    src, chosen, dis = plan(photos, seed, sources, distractors)
    img_dir = out_dir / "images"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    img_dir.mkdir(parents=True)
    rows = []
    for gi, (path, names) in enumerate(zip(src, chosen)):
        group = f"g{gi:04d}"
        rel = f"images/{group}_original{path.suffix.lower()}"
        shutil.copyfile(path, out_dir / rel)
        rows.append([rel, group, "original", "original", path.name])
        for name in names:
            data, ext, params = render(path, name, seed, group)
            rel = f"images/{group}_{name}{ext}"
            (out_dir / rel).write_bytes(data)
            rows.append([rel, group, name, BY_NAME[name].category, params])
        if not quiet and (gi + 1) % 25 == 0:
            print(f"  generated {gi + 1}/{len(src)} sources", file=sys.stderr)
    for di, path in enumerate(dis):
        group = f"d{di:04d}"
        rel = f"images/{group}_distractor{path.suffix.lower()}"
        shutil.copyfile(path, out_dir / rel)
        rows.append([rel, group, "distractor", "distractor", path.name])
    return write_labels(out_dir, LABEL_COLUMNS, rows)


def write_labels(out_dir: Path, columns: list[str], rows: list[list]) -> Path:
    """`out_dir`/labels.csv, written whole or not at all."""
    tmp = out_dir / "labels.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    os.replace(tmp, out_dir / "labels.csv")
    return out_dir / "labels.csv"


def cache_key(seed: int, sources: int, distractors: int) -> str:
    return f"generated-v{SUITE_VERSION}-seed{seed}-s{sources}-d{distractors}"


def ensure(bench_dir: str | Path = DEFAULT_BENCH_DIR, photos_dir: str | Path = DEFAULT_PHOTOS,
           seed: int = 0, sources: int = 150, distractors: int = 150, quiet: bool = True) -> Path:
    """The benchmark folder for these arguments, generated once and reused (cached by key)."""
    want = {"suite_version": SUITE_VERSION, "seed": seed, "sources": sources,
            "distractors": distractors, "photos_dir": str(Path(photos_dir).resolve())}
    return cached_set(Path(bench_dir) / cache_key(seed, sources, distractors), want,
                      lambda out: generate(out, photos_dir, seed, sources, distractors, quiet=quiet))


def cached_set(out: Path, want: dict, make) -> Path:
    """`out`, a generated set made by `make(out)` (which returns its labels.csv) once for the
    arguments `want` and reused while its manifest.json records the same ones."""
    stamp = out / "manifest.json"
    if stamp.exists() and (out / "labels.csv").exists():
        try:
            if json.loads(stamp.read_text())["args"] == want:
                return out
        except (ValueError, KeyError):
            pass
    if stamp.exists():
        stamp.unlink()
    labels = make(out)
    digest = hashlib.sha256(labels.read_bytes()).hexdigest()
    stamp.write_text(json.dumps({"args": want, "labels_sha256": digest}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write (images/ + labels.csv)")
    ap.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", type=int, default=150)
    ap.add_argument("--distractors", type=int, default=150)
    a = ap.parse_args(argv)
    labels = generate(a.out, a.photos, a.seed, a.sources, a.distractors, quiet=False)
    print(labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
