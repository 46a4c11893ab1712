"""Different blank pictures: skies, walls, fog, blank paper, dark frames, blur and gradients.

Pictures with no edges look alike to every tier: ORB finds too few keypoints to decide, so the
pixel check does, and SSIM, its measure, reads ~1 for any two edgeless pictures whatever their
brightness (grey 95 against grey 130: 0.94). This benchmark makes such pictures from the shared
photos and from scratch, with copies of some of them, and runs the pipeline per preset, each also
with the check that catches them off (`verify.blank_max_shift=0`) in the same run:

    python -m bench.blank                     # writes section "blank" of docs/benchmarks.md
    python -m bench.blank --print             # prints it instead

The pictures, each its own: the smoothest half of real photos (sky, wall, paper); real photos
under a heavy blur (out of focus); real photos darkened to near black with sensor noise (pocket
shots); gradients of other colours and directions; plain fields with noise and vignetting (greys,
paper, snow, fog, near black); one plain wall shot with another tint, exposure or light falloff.
Copies of some (JPEG quality 60, half size, a 90 % centre crop, PNG), and ordinary photos as
distractors. Reported per kind: copies found (of the copied pictures' four copies) and false
pairs (pairs of different pictures called duplicates; a pair between two kinds counts in both).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from bench.templates import PHOTOS, bench_main

SECTION = "blank"
TITLE = "Different blank pictures (python -m bench.blank)"
COPIES = 4  # per copied picture: JPEG q60, half size, 90 % centre crop, PNG


def _noisy(arr: np.ndarray, sigma: float, rng: np.random.Generator) -> Image.Image:
    a = arr.astype(np.float32) + rng.normal(0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _smoothest_half(img: Image.Image) -> Image.Image:
    """The half-size window of `img` with the least gradient (a sky, a wall, paper)."""
    w, h = img.size
    g = np.asarray(img.convert("L"), np.float32)
    grad = np.abs(np.diff(g, axis=1))[:-1, :] + np.abs(np.diff(g, axis=0))[:, :-1]
    cw, ch = w // 2, h // 2
    best = min((grad[y:y + ch - 1, x:x + cw - 1].mean(), x, y)
               for y in range(0, h - ch, max(1, ch // 4)) for x in range(0, w - cw, max(1, cw // 4)))
    return img.crop((best[1], best[2], best[1] + cw, best[2] + ch))


def make_set(root: Path, sources: int, seed: int = 7) -> pd.DataFrame:
    """The set under `root` and its labels (path, group_id, case): `sources` pictures of each
    kind (made from the sorted shared photos, a stride apart), copies of the first two of each,
    and `sources` ordinary photos."""
    rng = np.random.default_rng(seed)
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    stride = max(1, len(photos) // (4 * sources + 1))
    pick = iter(photos[::stride])
    W, H = 640, 427
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    made: dict[str, list[Image.Image]] = {k: [] for k in ("crop", "blur", "dark", "gradient", "field", "wall")}
    for i in range(sources):
        made["crop"].append(_smoothest_half(Image.open(next(pick)).convert("RGB")))
        with Image.open(next(pick)) as im:
            im = im.convert("RGB")
            made["blur"].append(_noisy(np.asarray(im.filter(ImageFilter.GaussianBlur(max(im.size) / 18))), 1.5, rng))
        with Image.open(next(pick)) as im:
            a = np.asarray(im.convert("RGB"), np.float32) / 255
        level = (0.03, 0.05, 0.07, 0.09, 0.11, 0.04)[i % 6]
        made["dark"].append(_noisy(255 * level * a ** 1.3 / max(1e-3, float((a ** 1.3).mean())), 2.0, rng))
        c0, c1 = rng.integers(20, 240, 3).astype(np.float32), rng.integers(20, 240, 3).astype(np.float32)
        t = (yy / H, xx / W, (xx / W + yy / H) / 2)[i % 3][..., None]
        made["gradient"].append(_noisy(c0 * (1 - t) + c1 * t, 2.0, rng))
        vignette = 1 - 0.24 * (((xx - W / 2) / W) ** 2 + ((yy - H / 2) / H) ** 2)[..., None]
        level = (95, 130, 240, 200, 22, 165)[i % 6]
        tint = np.array([level, level + (i % 3) - 1, level + 2 * (i % 2)], np.float32)
        made["field"].append(_noisy(tint * vignette, 3.0, rng))
        cx, cy = rng.uniform(0.2, 0.8, 2)
        light = 1 - 0.25 * np.sqrt((xx / W - cx) ** 2 + (yy / H - cy) ** 2)[..., None]
        wall = np.array((200, 190, 170), np.float32) * rng.uniform(0.6, 1.05) + rng.normal(0, 8, 3)
        made["wall"].append(_noisy(wall * light, 2.5, rng))
    rows = []
    for case, pictures in made.items():
        (root / case).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(pictures):
            group = f"{case}_{i}"
            img.save(root / case / f"{group}.jpg", quality=90)
            rows.append((f"{case}/{group}.jpg", group, case))
            if i >= 2:
                continue
            w, h = img.size
            dx, dy = w // 20, h // 20
            for name, copy, fmt in ((f"{group}_q60.jpg", img, 60), (f"{group}_half.jpg", img.resize(
                    (w // 2, h // 2), Image.LANCZOS), 90), (f"{group}_crop90.jpg", img.crop(
                    (dx, dy, w - dx, h - dy)), 90), (f"{group}.png", img, None)):
                copy.save(root / case / name) if fmt is None else copy.save(root / case / name, quality=fmt)
                rows.append((f"{case}/{name}", group, case))
    (root / "photo").mkdir(parents=True, exist_ok=True)
    for i in range(sources):
        src = next(pick)
        (root / "photo" / src.name).write_bytes(src.read_bytes())
        rows.append((f"photo/{src.name}", f"photo_{i}", "photo"))
    labels = pd.DataFrame(rows, columns=["path", "group_id", "case"])
    labels.to_csv(root / "labels.csv", index=False)
    return labels


def main(argv: list[str] | None = None) -> int:
    if not PHOTOS.is_dir():
        print(f"error: {PHOTOS} is missing (set SHARED to the folder holding data/photos)", file=sys.stderr)
        return 2
    return bench_main(argv, doc=__doc__, section=SECTION, title=TITLE, make=make_set, check="verify.blank_max_shift",
                      default="default (10)",
                      describe=lambda labels, sources: (
        f"{len(labels)} files: {sources} pictures of each of {labels['case'].nunique() - 1} kinds of blank picture "
        f"(each its own), {COPIES} copies of two of each kind (JPEG quality 60, half size, a 90 % centre crop, "
        f"PNG), and {sources} ordinary photos. A true pair is two files of one picture; every other pair is "
        "different pictures. \"copies\": true pairs found, of the kind's true pairs; \"false\": pairs of "
        "different pictures called duplicates (a pair between two kinds counts in both). Each preset is run "
        "with verify.blank_max_shift at its default and at 0 (the check off), in the same run."))


if __name__ == "__main__":
    raise SystemExit(main())
