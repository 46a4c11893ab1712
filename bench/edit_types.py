"""Recall per kind of edit users make, and the false pairs those edits bring, per preset.

An accuracy audit made one edited copy of each of 150 shared photos for 37 edits people really
make (re-encoded, rescaled, turned a little with or without black corners, padded to 16:9 or 1:1,
framed in a browser screenshot, watermarked, stickered, recoloured, blurred, squashed, skewed, put
into a collage...) and counted, per edit, how often the pipeline pairs the copy with its original.
This benchmark is that audit made reproducible:

    python -m bench.edit_types                        # writes section "edit_types" of docs/benchmarks.md
    python -m bench.edit_types --sources 4 --print    # a quick look
    python -m bench.edit_types --edits-per-run 0      # all edits in one folder: shows the screen's K cap

Generation (seeded, deterministic: the same seed and arguments give the same files, byte for byte):
--sources photos sampled from $SHARED/data/photos, each copied untouched (`original/gNNNN.jpg`) and
edited once per edit type (`EDIT/gNNNN.jpg|png`), into a folder under --bench-dir (never in the
repository), with `labels.csv`: path, group_id, edit, params, source, shows. `shows` lists every
shared photo the image shows (";"-joined): its source, and for a collage also its three other
tiles, which are drawn from photos that are not sources.

Runs, per preset: the real CLI (`python -m pipeline dedupe DIR --out OUT --preset P --no-catalog`;
its pairs.parquet and images.parquet) on batches of edit types, --edits-per-run at a time (default
6): each run's DIR holds all the originals and the copies of those edit types only (hard links to
the set's files, beside the set), so an original has a few copies in a run, as users mostly have,
fewer than the candidates a run keeps per image (screen.max_candidates). With every edit in one
folder (`--edits-per-run 0` or `all`) an original has 37 copies, more than that cap, and the recall
also measures the cap. An edit type's figures come from the run that held it; false pairs are those
of each run (between its edit types' copies and the originals), a pair reported by several runs
(two originals) counted once.

Scoring:

- recall of an edit: the direct pair (original, its copy) is in pairs.parquet with is_duplicate;
  "same cluster" also counts a copy joined to its original only through other duplicates.
- where a missed pair was lost: "screen" (never a candidate: not in pairs.parquet), "verify" or
  "confirm" (rejected there; its `rule`).
- false pairs: duplicate pairs of two images that show no photo in common (a collage and any photo
  among its tiles, or two collages sharing a tile, are true pairs).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from bench import report
from bench.transforms import DEFAULT_BENCH_DIR, DEFAULT_PHOTOS, SHARED, _font, _rng, _rotate_inscribed

SECTION = "edit_types"
TITLE = "Recall per edit type (python -m bench.edit_types)"
SUITE_VERSION = 1  # bump when an edit changes: the cache key includes it
LABEL_COLUMNS = ["path", "group_id", "edit", "params", "source", "shows"]
REPO = Path(__file__).resolve().parent.parent
MODELS = SHARED / "models"  # the shared weights folder, passed as bench/eval.py does
QUALITY = 90  # JPEG quality of every edited copy but jpeg_q30's


def _sign(rng) -> int:
    return 1 if rng.integers(2) else -1


def rotate(deg: int, corners: bool):
    """A small turn by `deg` (seeded sign): the whole picture with black corners (`corners`), or
    cropped to the largest rectangle inside it."""
    def fn(img, rng):
        d = deg * _sign(rng)
        if corners:
            out = img.rotate(d, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
            return out, f"{d:+d} deg, black corners"
        return _rotate_inscribed(img, d), f"{d:+d} deg, cropped inside"
    return fn


def pad(ratio: float, bar: str):
    """The picture centred on a canvas of aspect `ratio` (bars of `bar`: a colour or "blur", the
    picture itself stretched and blurred); a picture already at that ratio gets 20 % bars anyway."""
    colours = {"black": (0, 0, 0), "white": (255, 255, 255)}

    def fn(img, rng):
        w, h = img.size
        cw, ch = (round(h * ratio), h) if w / h < ratio else (w, round(w / ratio))
        if (cw, ch) == (w, h):
            cw, ch = (round(w * 1.2), h) if ratio >= 1 else (w, round(h * 1.2))
        if bar == "blur":
            canvas = img.resize((cw, ch), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(25))
        else:
            canvas = Image.new("RGB", (cw, ch), colours[bar])
        canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
        return canvas, f"{w}x{h} on {cw}x{ch}, {bar} bars"
    return fn


def screenshot(img, rng):
    """A browser-like window (title bar with an address, sidebar, status bar) showing the photo
    over 60-80 % of its area, light or dark theme; saved as PNG."""
    w, h = img.size
    frac = float(rng.uniform(0.6, 0.8))
    top, bot, side = max(40, h // 7), max(14, h // 25), max(30, w // 8)
    s = 1.0
    for _ in range(50):  # the photo's scale s such that its area is `frac` of the window's
        cur = s * s * w * h / ((s * w + side + 8) * (s * h + top + bot + 8))
        s *= (frac / cur) ** 0.5
    s = max(0.3, s)
    pw, ph = round(s * w), round(s * h)
    photo = img.resize((pw, ph), Image.Resampling.LANCZOS)
    cw, ch = pw + side + 8, ph + top + bot + 8
    dark = bool(rng.random() < 0.5)
    bg, chrome, fg = (((32, 33, 36), (53, 54, 58), (220, 220, 220)) if dark
                      else ((255, 255, 255), (222, 225, 230), (30, 30, 30)))
    cv = Image.new("RGB", (cw, ch), bg)
    d = ImageDraw.Draw(cv)
    d.rectangle((0, 0, cw, top), fill=chrome)
    d.rounded_rectangle((top, top // 2 - 8, cw - 40, top // 2 + 8), radius=8, fill=bg)
    d.text((top + 12, top // 2 - 6), "https://photos.example.com/album/%d" % int(rng.integers(1000, 10000)),
           font=_font(11), fill=fg)
    for i, c in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
        d.ellipse((8 + i * 12, top // 2 - 4, 16 + i * 12, top // 2 + 4), fill=c)
    for i in range(8):  # sidebar items
        y = top + 10 + i * 22
        d.rectangle((6, y, side - 6, y + 12), fill=chrome)
    d.rectangle((0, ch - bot, cw, ch), fill=chrome)
    cv.paste(photo, (side + 4, top + 4))
    return cv, f"photo over {frac:.0%} of a {cw}x{ch} {'dark' if dark else 'light'} window", "PNG"


def watermark(img, rng):
    """A tiled, turned '(c) ACME PHOTO' at 47 % opacity over the whole picture and a big 'SAMPLE'."""
    w, h = img.size
    layer = Image.new("RGBA", (w * 2, h * 2), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    f = _font(max(14, w // 14))
    for yy in range(0, h * 2, max(20, h // 5)):
        for xx in range(-w, w * 2, max(60, w // 2)):
            d.text((xx + (yy // 3) % 50, yy), "\u00a9 ACME PHOTO", font=f, fill=(255, 255, 255, 120))
    layer = layer.rotate(30, resample=Image.Resampling.BICUBIC).crop((w // 2, h // 2, w // 2 + w, h // 2 + h))
    out = Image.alpha_composite(img.convert("RGBA"), layer)
    # (drawn onto the composite, the big word replaces its pixels: solid white, not blended)
    ImageDraw.Draw(out).text((w // 2, h // 2), "SAMPLE", font=_font(max(8, w // 5)), fill=(255, 255, 255, 170),
                             anchor="mm")
    return out.convert("RGB"), "tiled text, 30 deg"


def sticker(img, rng):
    """An opaque smiley disc over 10-20 % of the picture, at a seeded place."""
    w, h = img.size
    frac = float(rng.uniform(0.10, 0.20))
    d = min(int(math.sqrt(frac * w * h * 4 / math.pi)), min(w, h) - 2)
    x, y = int(rng.integers(0, w - d + 1)), int(rng.integers(0, h - d + 1))
    out = img.copy()
    dr = ImageDraw.Draw(out)
    dr.ellipse((x, y, x + d, y + d), fill=(255, 204, 0), outline=(200, 140, 0), width=max(2, d // 30))
    dr.ellipse((x + d * 0.28, y + d * 0.3, x + d * 0.38, y + d * 0.45), fill=(60, 40, 0))
    dr.ellipse((x + d * 0.62, y + d * 0.3, x + d * 0.72, y + d * 0.45), fill=(60, 40, 0))
    dr.arc((x + d * 0.25, y + d * 0.35, x + d * 0.75, y + d * 0.8), 20, 160, fill=(60, 40, 0), width=max(2, d // 20))
    return out, f"disc of {d} px over {math.pi * d * d / 4 / (w * h):.0%} at ({x},{y})"


def sepia(img, rng):
    a = np.asarray(img, dtype=np.float32)
    m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
    return Image.fromarray(np.clip(a @ m.T, 0, 255).astype(np.uint8)), "sepia matrix"


def noise(img, rng):
    a = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)), "Gaussian sigma 20"


def insta(img, rng):
    """An Instagram-like filter: warm tint, vignette, contrast x1.15."""
    w, h = img.size
    a = np.asarray(img, dtype=np.float32) * np.array([1.12, 1.0, 0.82]) + np.array([12, 4, 0])
    yy, xx = np.mgrid[0:h, 0:w]
    rr = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    v = np.clip(1 - 0.55 * np.clip(rr - 0.4, 0, None) ** 1.5, 0.25, 1)
    out = Image.fromarray(np.clip(a * v[..., None], 0, 255).astype(np.uint8))
    return ImageEnhance.Contrast(out).enhance(1.15), "warm tint + vignette + contrast x1.15"


def perspective(img, rng):
    """A keystone: the top edge pulled in by 12 % of the width on each side, then cropped to the
    middle 76 % of the width, which leaves no black corner."""
    w, h = img.size
    dx = 0.12 * w
    a, b = [], []
    for (x, y), (X, Y) in zip([(dx, 0), (w - dx, 0), (w, h), (0, h)], [(0, 0), (w, 0), (w, h), (0, h)]):
        a.append([x, y, 1, 0, 0, 0, -X * x, -X * y])
        b.append(X)
        a.append([0, 0, 0, x, y, 1, -Y * x, -Y * y])
        b.append(Y)
    coef = np.linalg.solve(np.array(a, float), np.array(b, float))
    out = img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coef), Image.Resampling.BICUBIC,
                        fillcolor=(0, 0, 0))
    return out.crop((int(dx), 0, int(w - dx), h)), "top edge 76 % wide"


def collage(img, rng, tiles: list[Image.Image]):
    """The photo as one tile of a 2x2 grid (480x320 each, fitted) with three other photos."""
    w, h = 480, 320
    cv = Image.new("RGB", (2 * w + 12, 2 * h + 12), (255, 255, 255))
    pos = int(rng.integers(4))
    others = iter(tiles)
    for i in range(4):
        im = ImageOps.fit(img if i == pos else next(others), (w, h), Image.Resampling.LANCZOS)
        cv.paste(im, (4 + (i % 2) * (w + 4), 4 + (i // 2) * (h + 4)))
    return cv, f"tile {pos} of 4"


def _simple(fn, params=""):
    return lambda img, rng: (fn(img), params)


def _gamma(img, g):
    return img.point([min(255, round(255 * (i / 255) ** g)) for i in range(256)] * 3)


# edit type -> fn(RGB image, numpy Generator) -> (image, params[, "PNG"]); collage is made apart
EDITS = {
    "jpeg_q30": _simple(lambda im: im, "JPEG quality 30"),
    "down20": _simple(lambda im: im.resize((max(1, round(im.width * .2)), max(1, round(im.height * .2))),
                                           Image.Resampling.LANCZOS), "20 % per side"),
    "up2x": _simple(lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC), "200 % per side"),
    "rot2": rotate(2, True),
    "rot5": rotate(5, True),
    "rot10": rotate(10, True),
    "rot2_crop": rotate(2, False),
    "rot5_crop": rotate(5, False),
    "rot10_crop": rotate(10, False),
    "rot90": _simple(lambda im: im.transpose(Image.Transpose.ROTATE_90)),
    "rot180": _simple(lambda im: im.transpose(Image.Transpose.ROTATE_180)),
    "mirror": _simple(ImageOps.mirror),
    "lb169_black": pad(16 / 9, "black"),
    "lb11_black": pad(1.0, "black"),
    "lb169_white": pad(16 / 9, "white"),
    "lb11_white": pad(1.0, "white"),
    "lb169_blur": pad(16 / 9, "blur"),
    "lb11_blur": pad(1.0, "blur"),
    "screenshot": screenshot,
    "watermark": watermark,
    "sticker": sticker,
    "grayscale": _simple(lambda im: im.convert("L")),
    "sepia": sepia,
    "bright_up": _simple(lambda im: ImageEnhance.Brightness(im).enhance(1.6), "x1.6"),
    "bright_down": _simple(lambda im: ImageEnhance.Brightness(im).enhance(0.45), "x0.45"),
    "contrast_up": _simple(lambda im: ImageEnhance.Contrast(im).enhance(2.0), "x2.0"),
    "contrast_down": _simple(lambda im: ImageEnhance.Contrast(im).enhance(0.4), "x0.4"),
    "saturate": _simple(lambda im: ImageEnhance.Color(im).enhance(2.5), "x2.5"),
    "gamma": _simple(lambda im: _gamma(im, 0.5), "gamma 0.5"),
    "blur": _simple(lambda im: im.filter(ImageFilter.GaussianBlur(4)), "Gaussian radius 4"),
    "sharpen": _simple(lambda im: im.filter(ImageFilter.UnsharpMask(3, 200, 2)), "unsharp mask 3/200/2"),
    "noise": noise,
    "insta": insta,
    "border": _simple(lambda im: ImageOps.expand(im, border=max(8, min(im.size) // 12), fill=(250, 250, 250)),
                      "white border 1/12 of the shorter side"),
    "squash": _simple(lambda im: im.resize((round(im.width * 1.3), im.height), Image.Resampling.LANCZOS),
                      "width x1.3"),
    "perspective": perspective,
    "collage": None,
}


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def plan(photos: list[Path], seed: int, sources: int) -> tuple[list[Path], list[list[Path]]]:
    """The sources, and each one's three collage tiles (photos that are not sources)."""
    if sources + 3 > len(photos):
        raise ValueError(f"asked for {sources} sources (+3 collage tiles) but only {len(photos)} photos are available")
    order = _rng("plan", seed).permutation(len(photos))
    src = [photos[i] for i in order[:sources]]
    pool = [photos[i] for i in order[sources:]]
    tiles = [[pool[i] for i in _rng("tiles", seed, gi).choice(len(pool), 3, replace=False)] for gi in range(sources)]
    return src, tiles


def render(src: Path, edit: str, seed: int, group: str, tiles: list[Path]) -> tuple[bytes, str, str]:
    """-> (file bytes, extension, params) of one edited copy."""
    img = _load(src)
    rng = _rng("edit", seed, group, edit)
    if edit == "collage":
        out, params, fmt = *collage(img, rng, [_load(t) for t in tiles]), "JPEG"
        params += ", with " + ", ".join(t.name for t in tiles)
    else:
        out, params, *fmt = EDITS[edit](img, rng)
        fmt = fmt[0] if fmt else "JPEG"
    buf = io.BytesIO()
    if fmt == "PNG":
        out.save(buf, format="PNG", optimize=False)
    else:
        out.save(buf, format="JPEG", quality=30 if edit == "jpeg_q30" else QUALITY)
    return buf.getvalue(), ".png" if fmt == "PNG" else ".jpg", params


def generate(out_dir: str | Path, photos_dir: str | Path = DEFAULT_PHOTOS, seed: int = 0, sources: int = 60,
             quiet: bool = True) -> Path:
    """Write the set into `out_dir` (original/ and one folder per edit) and return its labels.csv."""
    photos_dir, out_dir = Path(photos_dir), Path(out_dir)
    photos = sorted(p for p in photos_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    src, tiles = plan(photos, seed, sources)
    for name in ["original", *EDITS]:
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
        (out_dir / name).mkdir(parents=True)
    rows = []
    for gi, (path, its_tiles) in enumerate(zip(src, tiles)):
        group = f"g{gi:04d}"
        rel = f"original/{group}{path.suffix.lower()}"
        shutil.copyfile(path, out_dir / rel)
        rows.append([rel, group, "original", "byte copy", path.name, path.name])
        for edit in EDITS:
            data, ext, params = render(path, edit, seed, group, its_tiles)
            rel = f"{edit}/{group}{ext}"
            (out_dir / rel).write_bytes(data)
            shows = [path.name] + ([t.name for t in its_tiles] if edit == "collage" else [])
            rows.append([rel, group, edit, params, path.name, ";".join(shows)])
        if not quiet and (gi + 1) % 10 == 0:
            print(f"  generated {gi + 1}/{len(src)} sources", file=sys.stderr, flush=True)
    from bench.transforms import write_labels
    return write_labels(out_dir, LABEL_COLUMNS, rows)


def ensure(bench_dir: str | Path, photos_dir: str | Path, seed: int, sources: int) -> Path:
    """The set's folder for these arguments, generated once and reused (cached by key)."""
    from bench.transforms import cached_set
    want = {"suite_version": SUITE_VERSION, "seed": seed, "sources": sources,
            "photos_dir": str(Path(photos_dir).resolve())}
    return cached_set(Path(bench_dir) / f"edit-types-v{SUITE_VERSION}-seed{seed}-s{sources}", want,
                      lambda out: generate(out, photos_dir, seed, sources, quiet=False))


def batches(edits: list[str], per_run: int) -> list[list[str]]:
    """The edit types split into runs of at most `per_run` (0: all in one run), in order and as
    even as can be (37 by 6: 6, 6, 5, 5, 5, 5, 5), so that no run is left with one lone edit type."""
    edits = list(edits)
    if per_run <= 0 or per_run >= len(edits):
        return [edits]
    n = -(-len(edits) // per_run)
    size, extra = divmod(len(edits), n)
    out, i = [], 0
    for b in range(n):
        j = i + size + (b < extra)
        out.append(edits[i:j])
        i = j
    return out


def link_batch(data: Path, dest: Path, edits: list[str]) -> Path:
    """`dest` holding the set's originals and the copies of `edits` only, at the same relative paths
    as in `data` (so labels.csv names them), as hard links (copies where links fail); made anew."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in ["original", *edits]:
        (dest / name).mkdir(parents=True)
        for f in sorted((data / name).iterdir()):
            try:
                os.link(f, dest / name / f.name)
            except OSError:
                shutil.copyfile(f, dest / name / f.name)
    return dest


# ---------------------------------------------------------------------------------------------
# running and scoring

def run_cli(data: Path, out: Path, preset: str, timeout: float, sets: list[str] = ()) -> dict:
    """`python -m pipeline dedupe DATA --out OUT --preset P --no-catalog --quiet` (+ the shared
    weights folder): bench/eval.py's run -> {"ok", "seconds", "command", "stderr_tail", ...}."""
    from bench.eval import run_pipeline
    return run_pipeline(data, out, list(sets), timeout, preset=preset, no_catalog=True)


def tier(rule: str) -> str:
    """The tier a rejected pair's rule belongs to ("verify", "confirm", else the rule itself)."""
    for t in ("verify", "confirm"):
        if rule.startswith(t + "_"):
            return t
    return rule


def score(pairs: pd.DataFrame, labels: pd.DataFrame, clusters: dict | None = None, hashes: dict | None = None,
          max_distance: int | None = None) -> dict:
    """One run's figures. `pairs`: path_a, path_b, is_duplicate, rule; `labels`: path, group_id,
    edit, shows; `clusters`: path -> cluster id (None or NaN: none); `hashes`: path -> plain 64-bit
    hash (int) and the run's screen.max_distance: a pair never a candidate although its plain hashes
    are within that distance was left out by the screen's K-nearest cap (counted as "capped").

    -> {"edits": {edit: {"n", "found", "cluster", "lost": Counter(tier), "rules": Counter(rule),
                         "capped"}},
        "duplicate_pairs", "false_pairs", "false_by_edits": Counter("editA + editB"),
        "false_rules": Counter(rule), "tile_pairs": true duplicate pairs of two groups (collage tiles),
        and the pairs behind those counts for merge(): "dup" {(a, b)}, "false" {(a, b): (edits, rule)},
        "tiles" {(a, b)}}"""
    shows = {p: frozenset(s.split(";")) for p, s in zip(labels["path"], labels["shows"])}
    edit_of = dict(zip(labels["path"], labels["edit"]))
    group_of = dict(zip(labels["path"], labels["group_id"]))
    unknown = (set(pairs["path_a"]) | set(pairs["path_b"])) - set(shows)
    if unknown:
        raise ValueError(f"pairs.parquet names {len(unknown)} files labels.csv does not, e.g. {sorted(unknown)[0]}")
    decided = {}
    for a, b, dup, rule in zip(pairs["path_a"], pairs["path_b"], pairs["is_duplicate"], pairs["rule"]):
        decided[(a, b) if a <= b else (b, a)] = (bool(dup), str(rule))
    original = {g: p for p, g, e in zip(labels["path"], labels["group_id"], labels["edit"]) if e == "original"}
    clusters = clusters or {}

    def cid(path):
        c = clusters.get(path)
        return None if c is None or c != c else c

    edits = {}
    for path, group, edit in zip(labels["path"], labels["group_id"], labels["edit"]):
        if edit == "original":
            continue
        e = edits.setdefault(edit, {"n": 0, "found": 0, "cluster": 0, "lost": Counter(), "rules": Counter(),
                                    "capped": 0})
        o = original[group]
        e["n"] += 1
        e["cluster"] += cid(o) is not None and cid(o) == cid(path)
        got = decided.get((o, path) if o <= path else (path, o))
        if got is None:
            e["lost"]["screen"] += 1
            if hashes and max_distance is not None and o in hashes and path in hashes:
                e["capped"] += bin(hashes[o] ^ hashes[path]).count("1") <= max_distance
        elif got[0]:
            e["found"] += 1
        else:
            e["lost"][tier(got[1])] += 1
            e["rules"][got[1]] += 1
    dup = {(a, b) if a <= b else (b, a): str(r)
           for a, b, d, r in zip(pairs["path_a"], pairs["path_b"], pairs["is_duplicate"], pairs["rule"]) if d}
    false = {k: (" + ".join(sorted((edit_of[k[0]], edit_of[k[1]]))), r)
             for k, r in dup.items() if not shows[k[0]] & shows[k[1]]}
    tiles = {k for k in dup if group_of[k[0]] != group_of[k[1]] and shows[k[0]] & shows[k[1]]}
    return _tally({"edits": edits, "dup": set(dup), "false": false, "tiles": tiles})


def _tally(r: dict) -> dict:
    """r with its pair counts filled in from its pair sets (dup, false, tiles)."""
    return {**r, "duplicate_pairs": len(r["dup"]), "false_pairs": len(r["false"]),
            "false_by_edits": Counter(e for e, _ in r["false"].values()),
            "false_rules": Counter(rule for _, rule in r["false"].values()), "tile_pairs": len(r["tiles"])}


def merge(parts: list[dict]) -> dict:
    """The score() of several runs (batches of edit types, each with all the originals) as one:
    each edit type's figures come from the one run that held its copies; a pair is counted once
    however many runs reported it (two originals are in every run), with the first run's rule."""
    edits, dup, false, tiles = {}, set(), {}, set()
    for r in parts:
        both = set(edits) & set(r["edits"])
        if both:
            raise ValueError(f"edit types in more than one run: {sorted(both)}")
        edits.update(r["edits"])
        dup |= r["dup"]
        tiles |= r["tiles"]
        for k, v in r["false"].items():
            false.setdefault(k, v)
    out = _tally({"edits": edits, "dup": dup, "false": false, "tiles": tiles})
    if parts and "screen" in parts[0]:
        out["screen"] = parts[0]["screen"]
    return out


def score_out(out: Path, labels: pd.DataFrame) -> dict:
    """score() of a run's OUT (pairs.parquet, images.parquet; the screen settings from run.json)."""
    images = pd.read_parquet(out / "images.parquet", columns=["path", "cluster_id", "hash"])
    clusters = dict(zip(images["path"], images["cluster_id"].astype("Float64").to_numpy(np.float64, na_value=np.nan)))
    hashes = {p: int(h, 16) for p, h in zip(images["path"], images["hash"]) if isinstance(h, str) and h}
    screen = json.loads((out / "run.json").read_text())["config"]["screen"]
    res = score(pd.read_parquet(out / "pairs.parquet", columns=["path_a", "path_b", "is_duplicate", "rule"]),
                labels, clusters, hashes, int(screen["max_distance"]))
    res["screen"] = {k: screen[k] for k in ("hash", "max_distance", "max_candidates", "mode", "embedding_k")}
    return res


# ---------------------------------------------------------------------------------------------
# the section

def _lost(e: dict) -> str:
    """Where the misses were lost: "screen 12, verify 3 (pixel_mismatch 2, orb_reject 1)"."""
    parts = []
    for t in ("screen", "verify", "confirm"):
        if e["lost"][t]:
            rules = sorted(((n, r) for r, n in e["rules"].items() if tier(r) == t), key=lambda x: (-x[0], x[1]))
            detail = ", ".join(f"{r.split('_', 1)[1]} {n}" if len(rules) > 1 else r.split("_", 1)[1] for n, r in rules)
            if t == "screen" and e.get("capped"):
                detail = f"{e['capped']} capped"
            parts.append(f"{t} {e['lost'][t]}" + (f" ({detail})" if detail else ""))
    parts += [f"{r} {n}" for r, n in sorted(e["lost"].items()) if r not in ("screen", "verify", "confirm") and n]
    return ", ".join(parts) or "–"


def _recall(found: int, n: int) -> str:
    return f"{found / n:.3f} ({found}/{n})" if n else "–"


def edit_table(results: dict[str, dict]) -> str:
    presets = list(results)
    head = ["edit"] + [h for p in presets for h in (f"{p}: recall", f"{p}: same cluster", f"{p}: misses lost at")]
    rows = []
    edits = [e for e in EDITS if any(e in r["edits"] for r in results.values())]
    for edit in edits:
        row = [edit]
        for p in presets:
            e = results[p]["edits"].get(edit)
            row += [_recall(e["found"], e["n"]), _recall(e["cluster"], e["n"]), _lost(e)] if e else ["–"] * 3
        rows.append(row)
    row = ["**all edits**"]
    for p in presets:
        es = results[p]["edits"].values()
        n = sum(e["n"] for e in es)
        lost = Counter()
        for e in es:
            lost.update(e["lost"])
        row += [_recall(sum(e["found"] for e in es), n), _recall(sum(e["cluster"] for e in es), n),
                ", ".join(f"{t} {lost[t]}" for t in ("screen", "verify", "confirm") if lost[t]) or "–"]
    rows.append(row)
    return report.table(head, rows)


def false_table(results: dict[str, dict], seconds: dict[str, float], runs: int = 1) -> str:
    rows = []
    for p, r in results.items():
        by = ", ".join(f"{k} {n}" for k, n in sorted(r["false_by_edits"].items(), key=lambda x: (-x[1], x[0]))) or "–"
        rules = ", ".join(f"{k} {n}" for k, n in sorted(r["false_rules"].items(), key=lambda x: (-x[1], x[0]))) or "–"
        rows.append([p, f"{r['duplicate_pairs']:,}", r["false_pairs"], by, rules, r["tile_pairs"],
                     f"{seconds[p]:,.0f}"])
    return report.table(["preset", "duplicate pairs", "false pairs", "false pairs by edit types", "decided by",
                         "collage pairs through a tile (true)",
                         "run wall s" + (f" ({runs} runs)" if runs > 1 else "")], rows)


def reading(results: dict[str, dict]) -> str:
    """A few lines read off the figures (counts only, no explanation)."""
    lines = []
    for p, r in results.items():
        es = r["edits"]
        n, found = sum(e["n"] for e in es.values()), sum(e["found"] for e in es.values())
        perfect = sum(e["found"] == e["n"] for e in es.values())
        low = sorted(((e["found"] / e["n"], k) for k, e in es.items() if e["found"] < 0.9 * e["n"]))
        where = Counter()
        for e in es.values():
            where.update(e["lost"])
        capped = sum(e.get("capped", 0) for e in es.values())
        main = ", ".join(f"{t} {c}" for t, c in where.most_common())
        if capped:
            sc = r.get("screen", {})
            main += (f" (of the screen's, {capped} had plain hashes within screen.max_distance"
                     f"{' = ' + str(sc['max_distance']) if 'max_distance' in sc else ''} but were not among either "
                     f"image's screen.max_candidates{' = ' + str(sc['max_candidates']) if 'max_candidates' in sc else ''}"
                     " nearest)")
        lows = ", ".join(f"{k} {v:.2f}" for v, k in low) or "none"
        lines.append(f"- **{p}**: {found:,} of {n:,} direct pairs found ({found / n:.1%}); {perfect} of {len(es)} "
                     f"edit types at 100 %. Below 0.90: {lows}. Misses lost at: {main or 'none'}. "
                     f"False pairs: {r['false_pairs']}.")
    if len(results) >= 2:
        (p0, r0), (p1, r1) = list(results.items())[:2]
        up = [k for k in r0["edits"] if k in r1["edits"] and r1["edits"][k]["found"] > r0["edits"][k]["found"]]
        down = [k for k in r0["edits"] if k in r1["edits"] and r1["edits"][k]["found"] < r0["edits"][k]["found"]]
        lines.append(f"- {p1} against {p0}: more copies found for {len(up)} edit types, fewer for "
                     f"{len(down)}{' (' + ', '.join(down) + ')' if down else ''}; "
                     f"false pairs {r0['false_pairs']} -> {r1['false_pairs']}.")
    extra = {p: sum(e["cluster"] - e["found"] for e in r["edits"].values()) for p, r in results.items()}
    lines.append("- Copies in their original's cluster but not paired with it directly: "
                 + ", ".join(f"{p} {v:+d}" for p, v in extra.items()) + ".")
    return "\n".join(lines)


def section(results: dict[str, dict], seconds: dict[str, float], labels: pd.DataFrame, args, commands: list[str],
            runs: list[list[str]] | None = None) -> str:
    """The section's text; `runs`: the edit types of each run (None or one run: the whole set in one folder)."""
    n_src = int((labels["edit"] == "original").sum())
    n_edits = labels["edit"].nunique() - 1
    runs = runs or [[e for e in EDITS if e in set(labels["edit"])]]
    per = max(len(r) for r in runs)  # copies of one original in a run's folder
    cmds = "; ".join(f"`{c}`" for c in commands)
    intro = (f"{len(labels):,} files: {n_src} photos sampled from `$SHARED/data/photos` (seed {args.seed}) and one "
             f"edited copy of each for {n_edits} edit types (bench/edit_types.py, edits as in the accuracy audit that "
             "asked for this benchmark). ")
    if len(runs) == 1:
        intro += ("**Mode: one folder** (`--edits-per-run 0`): each preset is one run of the CLI on the whole set, "
                  f"so every original has {per} copies in the folder: {cmds}. ")
    else:
        sizes = sorted({len(r) for r in runs})
        intro += (f"**Mode: batches of edit types** (`--edits-per-run {args.edits_per_run}`): each preset is "
                  f"{len(runs)} runs of the CLI, each on a folder holding the {n_src} originals and the copies of "
                  f"{' or '.join(map(str, sizes))} edit types (hard links to the set's files): {cmds} (DIR: one run's "
                  "folder). The runs, in order: " + " | ".join(", ".join(r) for r in runs) + ". An edit type's "
                  "figures come from the run that held its copies. False pairs are counted within each run, between "
                  "the copies of its edit types and against the originals (copies of edit types in different runs "
                  "are never compared); a pair reported by several runs (two originals, in every run) is counted "
                  "once, as are the duplicate pairs; *run wall s* is the sum of the preset's runs. "
                  "`--edits-per-run 0` runs the whole set as one folder (every original with "
                  f"{n_edits} copies, more than the candidates a run keeps per image: the recall then also measures "
                  "that cap). ")
    intro += ("*recall*: the direct pair (original, copy) reported duplicate; *same cluster*: the copy in its "
              "original's cluster, directly or through other duplicates; *misses lost at*: screen = never a "
              "candidate, verify / confirm = rejected there (its rule). A false pair is a duplicate pair of two "
              "images that show no photo in common (a collage shows its source and 3 other photos; a collage and "
              "any of its tiles are a true pair).")
    screens = {p: r["screen"] for p, r in results.items() if "screen" in r}
    caps = "; ".join(f"{p}: screen.max_candidates = {sc['max_candidates']}"
                     + (f", plus screen.embedding_k = {sc['embedding_k']} neighbours by cosine"
                        if sc["mode"] != "hash" else "")
                     for p, sc in screens.items())
    capped = ("their plain hashes within screen.max_distance, a lower bound, as the trimmed and turned hashes are "
              "not counted")
    if caps and any(per > int(sc["max_candidates"]) for sc in screens.values()):
        intro += (f" Every original has {per} copies in the folder, more than the candidates a run keeps per image "
                  f"({caps}; a pair is kept when either image has the other among its nearest): a direct pair "
                  f"can be left out while both images are within the hash distance (*capped*: {capped}), and *same cluster* "
                  "still counts such a copy when other duplicates join it to its original.")
    elif caps:
        intro += (f" An original has at most {per} copies in a run, as a user with a few copies of a photo has, "
                  "fewer than the candidates a run keeps per image "
                  f"({caps}; a pair is kept when either image has the other among its nearest). *capped*: a direct "
                  f"pair left out while both images are within the hash distance, other images being nearer "
                  f"({capped}).")
    return "\n".join([report.stamp(), intro, "", "Reading (counts read off the tables below):", "",
                       reading(results), "", edit_table(results), "False pairs per preset:", "",
                       false_table(results, seconds, len(runs))])


def _per_run(value: str) -> int:
    if value.strip().lower() == "all":
        return 0
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 (all in one folder), 'all' or a positive count")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=60, help="photos sampled (each edited once per edit type)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", default="default,high-recall")
    ap.add_argument("--edits-per-run", type=_per_run, default=6, metavar="N",
                    help="edit types whose copies share a run's folder with all the originals, so that an original "
                         "has at most N copies in a run (default 6: fewer than the candidates a run keeps per "
                         "image); 0 or 'all': the whole set in one folder (shows that cap)")
    ap.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    ap.add_argument("--bench-dir", default=str(DEFAULT_BENCH_DIR), help="where the set and the runs' outputs go")
    ap.add_argument("--out", default=str(report.DEFAULT_PATH), help="benchmarks markdown to update")
    ap.add_argument("--print", action="store_true", help="print the section instead of writing it")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per pipeline run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override passed to every run (repeatable), e.g. screen.max_candidates=40")
    args = ap.parse_args(argv)
    if not Path(args.photos).is_dir():
        print(f"error: {args.photos} is missing (set SHARED to the folder holding data/photos)", file=sys.stderr)
        return 2
    bench_dir = Path(args.bench_dir).resolve()
    if bench_dir == REPO or REPO in bench_dir.parents:
        print(f"error: --bench-dir {bench_dir} is inside the repository; pick a folder outside it", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    data = ensure(bench_dir, args.photos, args.seed, args.sources)
    labels = pd.read_csv(data / "labels.csv")
    print(f"set: {data} ({len(labels)} files, {time.perf_counter() - t0:.0f} s)", flush=True)
    runs = batches([e for e in EDITS if e in set(labels["edit"])], args.edits_per_run)
    if len(runs) == 1:  # the whole set, in its own folder
        folders = [data]
    else:
        root = data.parent / f"{data.name}-runs{args.edits_per_run}"
        folders = [link_batch(data, root / f"run{i:02d}", r) for i, r in enumerate(runs)]
        print(f"{len(runs)} runs of {'/'.join(str(len(r)) for r in runs)} edit types each: {root}", flush=True)
    results, seconds, commands = {}, {}, []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        tag = "-" + hashlib.sha256("\n".join(args.set).encode()).hexdigest()[:8] if args.set else ""
        base = data.parent / f"{data.name}-out" / f"{preset}{tag}"
        parts, seconds[preset] = [], 0.0
        for i, (folder, edits) in enumerate(zip(folders, runs)):
            out = base if len(runs) == 1 else base.with_name(base.name + f"-e{args.edits_per_run}") / f"run{i:02d}"
            res = run_cli(folder, out, preset, args.timeout, args.set)
            if not res["ok"]:
                print(f"error: the {preset} run on {folder} failed:\n{res['stderr_tail']}", file=sys.stderr)
                return 1
            parts.append(score_out(out, labels[labels["edit"].isin(["original", *edits])]))
            seconds[preset] += res["seconds"]
            if len(runs) > 1:
                p = parts[-1]
                print(f"  [{preset}] run {i + 1}/{len(runs)} ({', '.join(edits)}) {res['seconds']:.0f} s: "
                      f"{sum(e['found'] for e in p['edits'].values())}/{sum(e['n'] for e in p['edits'].values())} "
                      f"direct pairs, {p['false_pairs']} false pairs", flush=True)
        results[preset] = merge(parts)
        commands.append(f"python -m pipeline dedupe DIR --out OUT --preset {preset} --no-catalog --quiet"
                        + (" --set embed.weights=$SHARED/models" if MODELS.is_dir() else "")
                        + "".join(f" --set {kv}" for kv in args.set))
        r = results[preset]
        found = sum(e["found"] for e in r["edits"].values())
        n = sum(e["n"] for e in r["edits"].values())
        print(f"[{preset}] {seconds[preset]:.0f} s: {found}/{n} direct pairs, {r['false_pairs']} false pairs", flush=True)
    body = section(results, seconds, labels, args, commands, runs)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.print:
        print(body)
    else:
        print(f"wrote section '{SECTION}' of {report.update_section(SECTION, TITLE, body, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
