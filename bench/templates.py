"""Different pictures under one template: the hard negatives of keypoint matching.

The same news banner, logo, photo viewer's window or picture frame over two different photos gives
ORB a clean geometric match on the shared part (tens to hundreds of inliers), which the labelled
sets never show. This benchmark builds such a set from the shared photos and runs the pipeline on
it per preset, each also with `verify.min_coverage=0` and `verify.region_mismatch=0` (the checks
that catch them, each off, then both) in the same run:

    python -m bench.templates                       # writes section "templates" of docs/benchmarks.md
    python -m bench.templates --sources 4 --print   # a quick look

Per case and source photo A (B another photo): template(A) and template(B) are different pictures;
template(A) and template(A resized to 80 % and saved at JPEG quality 60) are copies. Reported per
case: copies found (of --sources) and false pairs (pairs of different pictures called duplicates).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from itertools import combinations
from pathlib import Path
from typing import Callable

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from bench import report
from bench.eval import SHARED, run_pipeline

SECTION = "templates"
TITLE = "Different pictures under one template (python -m bench.templates)"
PHOTOS = SHARED / "data" / "photos"


def _font(size: int):
    return ImageFont.load_default(size=size)


def banner(img: Image.Image) -> Image.Image:
    """A white banner with big text over the top 40 % (a news template, a meme caption)."""
    img = img.resize((481, 321))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 481, 128), fill=(250, 250, 250))
    d.text((15, 10), "BREAKING NEWS", font=_font(35), fill=(200, 0, 0))
    d.text((15, 50), "Storm hits the coast tonight", font=_font(18), fill=0)
    d.text((15, 75), "Live updates - more at 11", font=_font(14), fill=(60, 60, 60))
    return img


def logo(img: Image.Image) -> Image.Image:
    """A large opaque logo over the middle of the photo."""
    img = img.resize((481, 321)).convert("RGBA")
    mark = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(mark)
    w, h = img.size
    d.rounded_rectangle((w * 0.15, h * 0.2, w * 0.85, h * 0.8), radius=30, fill=(200, 30, 40, 230))
    d.ellipse((w * 0.2, h * 0.28, w * 0.38, h * 0.72), fill=(255, 255, 255, 255))
    d.text((w * 0.42, h * 0.35), "ACME", font=_font(h // 6), fill=(255, 255, 255, 255))
    d.text((w * 0.42, h * 0.55), "PHOTO CO.", font=_font(h // 12), fill=(255, 230, 0, 255))
    return Image.alpha_composite(img, mark).convert("RGB")


def viewer(img: Image.Image) -> Image.Image:
    """A photo viewer's window (title bar, status bar, thumbnails column) showing the photo small."""
    c = Image.new("RGB", (800, 600), (222, 222, 222))
    d = ImageDraw.Draw(c)
    d.rectangle((0, 0, 800, 40), fill=(60, 63, 70))
    d.text((80, 8), "Photo Viewer - IMG_0001.jpg", font=_font(20), fill=(230, 230, 230))
    d.rectangle((0, 560, 800, 600), fill=(200, 200, 205))
    d.text((10, 566), "1 of 200   100%", font=_font(18), fill=(40, 40, 40))
    for k in range(8):
        d.rectangle((640, 60 + k * 60, 790, 110 + k * 60), fill=(190, 190, 196))
    c.paste(img.resize((240, 160)), (200, 200))
    return c


def frame(img: Image.Image, texture: Image.Image) -> Image.Image:
    """The photo inset into a frame cut from one other photo (the same frame every time)."""
    c = texture.copy()
    c.paste(img.resize((320, 214)), (160, 133))
    return c


def mat(img: Image.Image) -> Image.Image:
    """The photo on a cream mat with a thin brown outline."""
    c = Image.new("RGB", (640, 480), (245, 240, 225))
    ImageDraw.Draw(c).rectangle((150, 123, 490, 357), outline=(120, 90, 40), width=10)
    c.paste(img.resize((320, 214)), (160, 133))
    return c


def make_set(root: Path, sources: int, seed: int = 7) -> pd.DataFrame:
    """The set under `root` and its labels (path, group_id, case)."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                    and not p.name.startswith("pixabay"))
    random.Random(seed).shuffle(photos)
    load = lambda p: ImageOps.exif_transpose(Image.open(p)).convert("RGB")  # noqa: E731
    texture = load(photos.pop()).resize((640, 480))
    cases = {"banner": banner, "logo": logo, "viewer": viewer, "frame": lambda im: frame(im, texture),
             "mat": mat}
    rows = []
    for case, template in cases.items():
        (root / case).mkdir(parents=True, exist_ok=True)
        for s in range(sources):
            a, b = load(photos.pop()), load(photos.pop())
            w, h = a.size
            edited = a.resize((max(1, w * 4 // 5), max(1, h * 4 // 5)))
            for name, img, group, quality in (("a", a, "a", 92), ("b", b, "b", 92), ("a_copy", edited, "a", 60)):
                path = root / case / f"{case}_{s}_{name}.jpg"
                template(img).save(path, quality=quality)
                rows.append((f"{case}/{path.name}", f"{case}_{s}_{group}", case))
    labels = pd.DataFrame(rows, columns=["path", "group_id", "case"])
    labels.to_csv(root / "labels.csv", index=False)
    return labels


def score_run(out: Path, labels: pd.DataFrame) -> dict:
    """Per case: copies found and false pairs; overall precision and recall of the duplicates."""
    pairs = pd.read_parquet(out / "pairs.parquet")
    group = dict(zip(labels["path"], labels["group_id"]))
    case = dict(zip(labels["path"], labels["case"]))
    dup = pairs[pairs["is_duplicate"]]
    found = {(a, b) for a, b in zip(dup["path_a"], dup["path_b"])}
    truth = set()
    for g, paths in labels.groupby("group_id")["path"]:
        truth.update(combinations(sorted(paths), 2))
    per = {}
    for c in labels["case"].unique():
        per[c] = {"copies": sum(1 for p in truth if case[p[0]] == c and p in found),
                  "false_pairs": sum(1 for p in found if group[p[0]] != group[p[1]] and c in (case[p[0]], case[p[1]]))}
    tp = len(found & truth)
    return {"per_case": per, "precision": tp / len(found) if found else float("nan"),
            "recall": tp / len(truth) if truth else float("nan"), "pairs": len(found),
            "false_pairs": len(found - truth)}


def run_presets(data: Path, labels: pd.DataFrame, presets: str, check: str, timeout: float) -> list | None:
    """Each preset run on `data` with the check (a config key, or several joined by commas) at its
    default and at 0 (several: each off alone, then all), in the same run: [(preset, "on" or the
    settings turned off, score_run's dict)], or None when a run failed (said on stderr)."""
    keys = check.split(",")
    variants = [("on", [])] + [(f"{key}=0", [f"{key}=0"]) for key in keys]
    if len(keys) > 1:
        variants.append((", ".join(f"{key}=0" for key in keys), [f"{key}=0" for key in keys]))
    runs = []
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        for label, sets in variants:
            out = data.parent / f"out-{preset}-{len(runs)}"
            res = run_pipeline(data, out, ["catalog=none", *sets], timeout, preset=preset)
            if not res["ok"]:
                print(f"error: the {preset} run failed:\n{res['stderr_tail']}", file=sys.stderr)
                return None
            runs.append((preset, label, score_run(out, labels)))
            print(f"[{preset}, {check} {label}] {runs[-1][2]['pairs']} pairs, {runs[-1][2]['false_pairs']} false",
                  flush=True)
    return runs


def preset_table(runs: list, labels: pd.DataFrame, sources: int, check: str, default: str) -> str:
    """The runs as a markdown table: per preset and setting of the check, overall and per case."""
    cases = list(labels["case"].unique())
    sizes = labels.groupby(["case", "group_id"]).size()
    true_pairs = (sizes * (sizes - 1) // 2).groupby(level="case").sum()  # (one a source, here and in documents)
    head = ["preset", check.replace(",", ", "), "duplicate pairs", "false pairs", "precision", "recall"] + \
        [f"{c}: copies / false" for c in cases]
    rows = [[preset, default if label == "on" else ("0 (off)" if "," not in check else label), r["pairs"], r["false_pairs"],
             f"{r['precision']:.3f}", f"{r['recall']:.3f}"]
            + [f"{r['per_case'][c]['copies']}/{int(true_pairs[c])} / {r['per_case'][c]['false_pairs']}" for c in cases]
            for preset, label, r in runs]
    return report.table(head, rows)


def bench_main(argv: list[str] | None, *, doc: str, section: str, title: str, make: Callable,
               check: str, default: str, describe: Callable[[pd.DataFrame, int], str]) -> int:
    """The command line of a hard-negatives benchmark (this one, bench/documents.py): make the set
    with `make(root, sources)`, run each preset with `check` on and off, write or print the table."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=6, help="source pictures per case")
    ap.add_argument("--presets", default="default,fast,strict,high-recall")
    ap.add_argument("--out", default=str(report.DEFAULT_PATH), help="benchmarks markdown to update")
    ap.add_argument("--print", action="store_true", help="print the section instead of writing it")
    ap.add_argument("--keep", help="make the set and the outputs in this folder and keep them")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=f"dedupe-{section}-"))
    try:
        labels = make(work / "data", args.sources)
        runs = run_presets(work / "data", labels, args.presets, check, args.timeout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if runs is None:
        return 1
    body = "\n".join([report.stamp(), describe(labels, args.sources), "",
                      preset_table(runs, labels, args.sources, check, default), ""])
    if args.print:
        print(body)
    else:
        print(f"wrote section '{section}' of {report.update_section(section, title, body, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if not PHOTOS.is_dir():
        print(f"error: {PHOTOS} is missing (set SHARED to the folder holding data/photos)", file=sys.stderr)
        return 2
    return bench_main(argv, doc=__doc__, section=SECTION, title=TITLE, make=make_set,
                      check="verify.min_coverage,verify.region_mismatch", default="defaults (0.6, 0.2)",
                      describe=lambda labels, sources: (
        f"{len(labels)} files: {labels['case'].nunique()} templates x {sources} source photos; per photo A (B "
        "another photo): template(A), template(B), and template(A resized to 80 % at JPEG quality 60), which is "
        "A's copy. A true pair is a photo and its copy under the same template; every other pair is "
        "different pictures. \"copies\": true pairs found; \"false\": pairs of different pictures "
        "called duplicates (a pair between two templates counts in both). Each preset is run with "
        "the two checks that catch them at their defaults, each off (0) alone, and both off, in the same "
        "run: verify.min_coverage (inliers on too small a part of the pictures) and "
        "verify.region_mismatch (aligned pictures that disagree on a region)."))


if __name__ == "__main__":
    raise SystemExit(main())
