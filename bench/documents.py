"""Different documents of one layout: text pages, slides, receipts, code, tables and charts.

Two pages of different text in the same font and layout look alike to every tier: their aHashes
are a few bits apart (the same blocks of lines), the embedding sees "a page of text" in both
(cosine 0.87-0.98), and ORB matches letters to the same letters elsewhere, which RANSAC lines up
into a handful of inliers by chance. Charts of other figures in one house style are the same
story with fewer letters: mostly flat, a few chance inliers, and an embedding that sees "a
chart". This benchmark generates such documents (no photos needed) and runs the pipeline on them
per preset, each also with the checks that catch them off (`verify.min_inlier_share=0`,
`verify.semi_flat_share=0`, each alone and both) in the same run:

    python -m bench.documents                       # writes section "documents" of docs/benchmarks.md
    python -m bench.documents --sources 4 --print   # a quick look

Per layout and document A (B another text in the same layout): A and B are different documents;
A and A's copy (by turns: resized to 75 % at JPEG quality 70; scanned, turned 1.5 degrees on
grey paper with noise; its top 85 % at JPEG quality 80; a thumbnail a fifth of its size) are
copies. Reported per layout: copies
found (of --sources) and false pairs (pairs of different documents called duplicates).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from bench.templates import _font, bench_main  # (Pillow's own font: the same on every machine)

SECTION = "documents"
TITLE = "Different documents of one layout (python -m bench.documents)"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no what up out "
         "more said about other into some could them time these two may then first any like now my such "
         "make over our even most me state after also made many did must before back see through way "
         "where get much go well your know should down work year because come people just say each those "
         "take day good how long very new great little own old right big high different small large next "
         "early young important few public same able report market order price total account invoice "
         "meeting project budget quarter review number data table value result sales customer service").split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def letter(rng: random.Random) -> Image.Image:
    """A letter-size page: a bold title and paragraphs of black text on white."""
    img = Image.new("RGB", (850, 1100), "white")
    d = ImageDraw.Draw(img)
    d.text((60, 50), _words(rng, 4).title(), font=_font(30), fill="black")
    y = 120
    while y < 1020:
        d.text((60, y), _words(rng, rng.randint(9, 13))[:78], font=_font(18), fill="black")
        y += 56 if rng.random() < 0.15 else 28
    return img


def slide(rng: random.Random) -> Image.Image:
    """A presentation slide: a blue title bar and bullet points."""
    img = Image.new("RGB", (1280, 720), (250, 250, 252))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 1280, 110), fill=(30, 60, 130))
    d.text((50, 30), _words(rng, 5).title(), font=_font(44), fill="white")
    for k in range(rng.randint(5, 7)):
        y = 160 + k * 80
        d.ellipse((60, y + 12, 76, y + 28), fill=(30, 60, 130))
        d.text((100, y), _words(rng, rng.randint(5, 8)).capitalize(), font=_font(34), fill=(30, 30, 30))
    d.text((1150, 680), f"{rng.randint(2, 40)}", font=_font(20), fill=(120, 120, 120))
    return img


def receipt(rng: random.Random) -> Image.Image:
    """A till receipt: a narrow page of item lines and prices."""
    img = Image.new("RGB", (380, 900), (252, 252, 248))
    d = ImageDraw.Draw(img)
    d.text((110, 20), "CORNER STORE", font=_font(26), fill="black")
    d.text((95, 55), f"Till {rng.randint(1, 9)}  #{rng.randint(1000, 9999)}", font=_font(18), fill="black")
    y, total = 100, 0.0
    while y < 760:
        price = rng.randint(50, 2500) / 100
        total += price
        d.text((20, y), _words(rng, 2).upper()[:18], font=_font(18), fill="black")
        d.text((280, y), f"{price:7.2f}", font=_font(18), fill="black")
        y += 26
    d.line((20, 790, 360, 790), fill="black", width=2)
    d.text((20, 805), "TOTAL", font=_font(24), fill="black")
    d.text((250, 805), f"{total:8.2f}", font=_font(24), fill="black")
    return img


def code(rng: random.Random) -> Image.Image:
    """A code editor's screenshot: a dark theme, line numbers and coloured, indented lines."""
    img = Image.new("RGB", (1000, 700), (30, 31, 36))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 1000, 32), fill=(50, 52, 60))
    d.text((12, 6), f"{rng.choice(WORDS)}_{rng.choice(WORDS)}.py", font=_font(16), fill=(220, 220, 220))
    colours = [(86, 156, 214), (206, 145, 120), (220, 220, 170), (200, 200, 200), (106, 153, 85)]
    indent = 0
    for k in range(26):
        y = 44 + k * 24
        d.text((10, y), f"{k + 1:3d}", font=_font(16), fill=(110, 110, 120))
        indent = max(0, min(4, indent + rng.choice((-1, 0, 0, 1))))
        x = 70 + indent * 32
        for w in _words(rng, rng.randint(2, 6)).split():
            d.text((x, y), w, font=_font(16), fill=rng.choice(colours))
            x += 10 * len(w) + 10
    return img


def table(rng: random.Random) -> Image.Image:
    """A spreadsheet: a header row, a grid and figures in every cell."""
    img = Image.new("RGB", (1000, 640), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 1000, 30), fill=(225, 230, 240))
    for c in range(6):
        d.text((12 + c * 165, 6), rng.choice(WORDS).title(), font=_font(16), fill="black")
    for r in range(1, 21):
        for c in range(6):
            text = rng.choice(WORDS) if c == 0 else f"{rng.randint(0, 99999):,}"
            d.text((12 + c * 165, 6 + r * 30), text, font=_font(16), fill="black")
    for r in range(22):
        d.line((0, r * 30, 1000, r * 30), fill=(200, 200, 200))
    for c in range(7):
        d.line((c * 165, 0, c * 165, 630), fill=(200, 200, 200))
    return img


def _axes() -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, int, int, int], float]:
    """A chart's frame in one house style: title, grid lines, axis labels, months."""
    img = Image.new("RGB", (640, 400), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 12), "Monthly revenue (k$)", font=_font(20), fill=(30,) * 3)
    box = x0, y0, x1, y1 = 60, 50, 620, 360
    for i in range(6):
        y = y1 - i * (y1 - y0) / 5
        d.line((x0, y, x1, y), fill=(225,) * 3)
        d.text((20, y - 7), f"{i * 20}", font=_font(12), fill=(90,) * 3)
    d.line((x0, y0, x0, y1), fill=(60,) * 3)
    d.line((x0, y1, x1, y1), fill=(60,) * 3)
    step = (x1 - x0) / 12
    for i, month in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()):
        d.text((x0 + i * step + 10, y1 + 8), month, font=_font(12), fill=(90,) * 3)
    return img, d, box, step


def bar_chart(rng: random.Random) -> Image.Image:
    """Twelve blue bars of other figures on the same axes (a dashboard's, a report's charts)."""
    img, d, (x0, y0, x1, y1), step = _axes()
    for i in range(12):
        top = y1 - rng.uniform(0.1, 0.95) * (y1 - y0)
        d.rectangle((x0 + i * step + 8, top, x0 + (i + 1) * step - 8, y1 - 1), fill=(66, 133, 244))
    return img


def line_chart(rng: random.Random) -> Image.Image:
    """A red line with markers through twelve other figures on the same axes."""
    img, d, (x0, y0, x1, y1), step = _axes()
    v, points = rng.uniform(0.3, 0.7), []
    for i in range(12):
        v = min(0.95, max(0.05, v + rng.uniform(-0.15, 0.15)))
        points.append((x0 + i * step + step / 2, y1 - v * (y1 - y0)))
    d.line(points, fill=(219, 68, 55), width=3)
    for x, y in points:
        d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(219, 68, 55))
    return img


LAYOUTS = {"letter": letter, "slide": slide, "receipt": receipt, "code": code, "table": table,
           "bar_chart": bar_chart, "line_chart": line_chart}


def copy_of(img: Image.Image, kind: int, rng: random.Random) -> tuple[Image.Image, int]:
    """An edited copy and the JPEG quality to save it at (kind 0: resized, 1: scanned, 2: cropped,
    3: a thumbnail a fifth of its size)."""
    w, h = img.size
    if kind == 0:
        return img.resize((w * 3 // 4, h * 3 // 4), Image.LANCZOS), 70
    if kind == 1:
        paper = img.convert("L").rotate(1.5, resample=Image.BICUBIC, expand=True, fillcolor=200)
        arr = np.asarray(paper, dtype=np.float32) * 0.9 + 12
        arr += np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)), 85
    if kind == 2:
        return img.crop((0, 0, w, h * 85 // 100)), 80
    return img.resize((max(1, w // 5), max(1, h // 5)), Image.LANCZOS), 85


def make_set(root: Path, sources: int, seed: int = 11) -> pd.DataFrame:
    """The set under `root` and its labels (path, group_id, case)."""
    rng = random.Random(seed)
    rows = []
    for case, layout in LAYOUTS.items():
        (root / case).mkdir(parents=True, exist_ok=True)
        for s in range(sources):
            a, b = layout(rng), layout(rng)
            edited, quality = copy_of(a, s % 4, rng)
            for name, img, group, q in (("a", a, "a", None), ("b", b, "b", None), ("a_copy", edited, "a", quality)):
                path = root / case / f"{case}_{s}_{name}.{'png' if q is None else 'jpg'}"
                img.save(path) if q is None else img.save(path, quality=q)
                rows.append((f"{case}/{path.name}", f"{case}_{s}_{group}", case))
    labels = pd.DataFrame(rows, columns=["path", "group_id", "case"])
    labels.to_csv(root / "labels.csv", index=False)
    return labels


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, doc=__doc__, section=SECTION, title=TITLE, make=make_set,
                      check="verify.min_inlier_share,verify.semi_flat_share", default="defaults (0.3, 0.55)",
                      describe=lambda labels, sources: (
        f"{len(labels)} files: {labels['case'].nunique()} layouts x {sources} documents; per document A (B "
        "another text in the same layout): A, B, and A's copy (by turns resized to 75 % at JPEG quality 70, "
        "scanned: turned 1.5 degrees on grey paper with noise, its top 85 % at JPEG quality 80, or a thumbnail "
        "a fifth of its size). A "
        "true pair is a document and its copy; every other pair is different documents. \"copies\": "
        "true pairs found; \"false\": pairs of different documents called duplicates. Each preset is "
        "run with the two checks that catch them at their defaults, each off (0) alone, and both off, in the same "
        "run: verify.min_inlier_share (chance matches between letters) and verify.semi_flat_share (mostly flat "
        "pairs that ORB leaves undecided, such as charts, different when their pixels disagree outright)."))


if __name__ == "__main__":
    raise SystemExit(main())
