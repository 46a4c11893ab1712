"""Calibrating the pixel check (verify.pixel_check) on generated flat graphics.

Flat images -- logos, UI screenshots, text on a coloured background -- give ORB too few keypoints,
so ORB calls their pairs inconclusive. This script generates such images (`graphic`), their edited
copies (re-encoded, resized, slightly recoloured, watermarked: `edit`) and hard negatives (a
DIFFERENT logo in the same colours, the same layout with different text), runs the real verify
tier on every pair (`verify.run_verify`, feature store and all), and reports for the pairs ORB
left inconclusive: the precision / recall of the pixel rule over a grid of SSIM and histogram
thresholds, and (unless --no-embeddings) what the confirm tier's cosine rule would have decided
on the same pairs instead. The defaults are chosen for precision >= 0.99 at the highest recall.

    python -m bench.pixel_check [--graphics 60] [--seed 0] [--holdout-seed 1] [--out docs/benchmarks.md]
                                [--no-embeddings]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from pipeline.config import Config, load_config

KINDS = ("logo", "ui", "text")
EDITS = ("jpeg", "resize", "recolour", "watermark")
NEGATIVES = ("other-logo", "other-text")  # other-logo: new shapes, same colours; other-text: same layout
WORDS = ["ACME", "Nordic", "Bakery", "Solar", "Orbit", "Pixel", "Harbor", "Maple", "Vertex", "Lumen",
         "Cobalt", "Summit", "Atlas", "Ember", "Willow", "Quartz", "Falcon", "Cedar", "Nimbus", "Tango",
         "Settings", "Profile", "Inbox", "Billing", "Reports", "Account", "Search", "Upload", "Gallery"]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _palette(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """A background and three ink colours (saturated, distinct)."""
    hues = rng.permutation(12)[:4] * 30
    out = []
    for h, (s, v) in zip(hues, [(0.25, 0.97), (0.85, 0.8), (0.7, 0.55), (0.9, 0.35)]):
        rgb = Image.new("HSV", (1, 1), (int(h * 255 / 360), int(s * 255), int(v * 255))).convert("RGB")
        out.append(rgb.getpixel((0, 0)))
    return out


def graphic(kind: str, palette, layout_seed: int, text: str, size=(480, 320)) -> Image.Image:
    """One flat image. `layout_seed` fixes shapes and positions; `text` the words drawn."""
    rng = np.random.default_rng(layout_seed)
    w, h = size
    bg, ink1, ink2, ink3 = palette
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    if kind == "logo":
        for _ in range(int(rng.integers(2, 4))):
            cx, cy, r = rng.integers(60, w - 60), rng.integers(50, h - 110), int(rng.integers(25, 70))
            colour = [ink1, ink2, ink3][int(rng.integers(0, 3))]
            if rng.random() < 0.5:
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                d.rounded_rectangle((cx - r, cy - r, cx + r, cy + int(r * 0.7)), radius=r // 3, fill=colour)
        d.text((w // 2, h - 50), text, fill=ink3, font=_font(44), anchor="mm")
    elif kind == "ui":
        bar = int(rng.integers(36, 56))
        side = int(rng.integers(90, 150))
        d.rectangle((0, 0, w, bar), fill=ink3)
        d.rectangle((0, bar, side, h), fill=ink1)
        d.text((16, bar // 2), text, fill=bg, font=_font(22), anchor="lm")
        for i, k in enumerate(rng.integers(0, len(WORDS), 4)):  # sidebar menu: part of the layout
            d.text((14, bar + 24 + 34 * i), WORDS[int(k)], fill=bg, font=_font(16))
        bx, by = side + 30, bar + 30 + int(rng.integers(0, 60))
        d.rounded_rectangle((bx, by, bx + 180, by + 44), radius=10, fill=ink2)
        d.text((bx + 90, by + 22), text[:12], fill=bg, font=_font(20), anchor="mm")
    else:  # text on colour
        d.rectangle((0, 0, w, h), fill=ink1 if rng.random() < 0.5 else bg)
        fill = bg if img.getpixel((0, 0)) == ink1 else ink3
        d.text((w // 2, h // 2), text, fill=fill, font=_font(int(rng.integers(48, 72))), anchor="mm")
    return img


def edit(img: Image.Image, name: str) -> Image.Image:
    """An edited copy the way users make them."""
    if name == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=60)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if name == "resize":
        return img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR)
    if name == "recolour":
        return ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(0.85)).enhance(1.06)
    if name == "watermark":
        out = img.convert("RGBA")
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).text((out.width - 12, out.height - 10), "(c) stock", fill=(255, 255, 255, 140),
                                   font=_font(18), anchor="rb")
        return Image.alpha_composite(out, layer).convert("RGB")
    raise ValueError(name)


def build_set(folder: Path, n_graphics: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write originals, edits and negatives as PNG/JPEG files -> (images, pairs with `true`, `what`)."""
    rng = np.random.default_rng(seed)
    paths, rows = [], []

    def add(img: Image.Image, name: str) -> int:
        path = folder / name
        img.save(path, quality=92) if name.endswith(".jpg") else img.save(path)
        paths.append(str(path))
        return len(paths) - 1

    for g in range(n_graphics):
        kind = KINDS[g % len(KINDS)]
        palette = _palette(rng)
        layout = int(rng.integers(1 << 30))
        text, other = rng.choice(WORDS, 2, replace=False).tolist()
        base = graphic(kind, palette, layout, text)
        a = add(base, f"g{g:03d}-{kind}.png")
        for e in EDITS:
            rows.append((a, add(edit(base, e), f"g{g:03d}-{kind}-{e}.jpg" if e == "jpeg" else
                                f"g{g:03d}-{kind}-{e}.png"), True, f"{kind}/{e}"))
        # negatives: a different logo in the same colours; the same layout with other text
        rows.append((a, add(graphic(kind, palette, layout + 1, text if kind == "logo" else other),
                            f"g{g:03d}-{kind}-neg-layout.png"), False, f"{kind}/other-logo"))
        rows.append((a, add(graphic(kind, palette, layout, other), f"g{g:03d}-{kind}-neg-text.png"),
                     False, f"{kind}/other-text"))
    images = pd.DataFrame({"abs_path": paths, "error": [None] * len(paths)})
    pairs = pd.DataFrame(rows, columns=["idx_a", "idx_b", "true", "what"])
    pairs["transform"] = np.zeros(len(pairs), np.int8)
    return images, pairs


def score(pairs: pd.DataFrame, images: pd.DataFrame, cfg: Config, work: str) -> pd.DataFrame:
    """The real verify tier (pixel check on) over the pairs: adds orb_* and ssim, hist_corr."""
    from pipeline import verify
    res = verify.run_verify(pairs[["idx_a", "idx_b", "transform"]], images, cfg, work)
    return pairs.join(res)


def pr(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, int]:
    tp = int((true & pred).sum())
    fp = int((~true & pred).sum())
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / true.sum() if true.sum() else 0.0), fp


def cosines(pairs: pd.DataFrame, images: pd.DataFrame, cfg: Config, work: str) -> np.ndarray:
    """The confirm tier's cosine on the same pairs (what decides them without the pixel check)."""
    from pipeline import confirm
    cos = confirm.run_confirm(pairs[["idx_a", "idx_b", "transform"]], images, cfg, work)
    return cos.to_numpy(np.float64)


def main(argv: list[str] | None = None) -> int:
    from bench.report import stamp, table, update_section
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphics", type=int, default=60, help="generated originals (x4 edits, x2 negatives)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout-seed", type=int, default=1, help="a second generated set, scored at the defaults")
    ap.add_argument("--out", default=None, help="benchmarks markdown to update (section 'pixel-check')")
    ap.add_argument("--no-embeddings", action="store_true", help="skip the confirm-tier comparison")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(None, ["verify.pixel_check=true", *args.overrides])
    d = cfg.decide
    with tempfile.TemporaryDirectory(prefix="dedupe-pixel-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        images, pairs = build_set(folder, args.graphics, args.seed)
        t = time.perf_counter()
        p = score(pairs, images, cfg, str(Path(tmp) / "work"))
        verify_s = time.perf_counter() - t
        checked = p["ssim"].notna().to_numpy()
        cos = None if args.no_embeddings else cosines(p[checked], images, cfg, str(Path(tmp) / "embed"))
        hold = None
        if args.holdout_seed is not None:
            folder = Path(tmp) / "holdout"
            folder.mkdir()
            h_images, h_pairs = build_set(folder, args.graphics, args.holdout_seed)
            hold = score(h_pairs, h_images, cfg, str(Path(tmp) / "work-holdout"))
    true = p["true"].to_numpy()
    lines = [f"{len(p)} pairs from {args.graphics} generated graphics ({', '.join(KINDS)}; seed {args.seed}): "
             f"{int(true.sum())} edited copies ({', '.join(EDITS)}), {int((~true).sum())} negatives "
             f"(a different logo in the same colours; the same layout with different text). Verify tier "
             f"with the pixel check: {verify_s:.1f} s. {int(checked.sum())} pairs were pixel-checked "
             f"(too few keypoints, or both images flat: {int(true[checked].sum())} true, "
             f"{int((~true[checked]).sum())} negatives). What ORB alone said about them:\n"]
    orb_rows = []
    for status in ("match", "partial", "no-match", "inconclusive"):
        m = (p["orb_status"].to_numpy() == status) & checked
        orb_rows.append([status, int((true & m).sum()), int((~true & m).sum())])
    lines.append(table(["ORB status (pixel-checked pairs)", "true pairs", "negatives"], orb_rows))
    sub_true = true[checked]
    ssim, hist = p.loc[checked, "ssim"].to_numpy(), p.loc[checked, "hist_corr"].to_numpy()
    rows = []
    for s_thr in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9):
        for h_thr in (0.0, 0.5, 0.8):
            prec, rec, fp = pr(sub_true, (ssim >= s_thr) & (hist >= h_thr))
            mark = " (default)" if (s_thr, h_thr) == (d.pixel_ssim, d.pixel_hist_corr) else ""
            rows.append([f"{s_thr}{mark}", h_thr, prec, rec, fp])
    lines.append("\nPixel rule on the pixel-checked pairs (duplicate when SSIM >= s and histogram "
                 "correlation >= h):\n")
    lines.append(table(["SSIM >= s", "hist_corr >= h", "precision", "recall", "false pairs"], rows))
    per = []
    pred = (ssim >= d.pixel_ssim) & (hist >= d.pixel_hist_corr)
    what = p.loc[checked, "what"].to_numpy()
    for w in sorted(set(what)):
        m = what == w
        per.append([w, int(m.sum()), float(pred[m].mean()), float(np.median(ssim[m])), float(np.median(hist[m]))])
    lines.append("\nPer kind at the defaults (share called duplicate; medians):\n")
    lines.append(table(["kind/edit", "pairs", "called duplicate", "median SSIM", "median hist_corr"], per))
    if cos is not None:
        by_cos = cos >= d.cosine_threshold
        c_prec, c_rec, c_fp = pr(sub_true, by_cos)
        p_prec, p_rec, p_fp = pr(sub_true, pred)
        lines.append("\nThe same pixel-checked pairs decided without the pixel check (confirm tier, "
                     f"{cfg.embed.backbone} alpha {cfg.embed.alpha}, cosine >= {d.cosine_threshold}) and with it:\n")
        lines.append(table(["rule", "precision", "recall", "false pairs"],
                           [["confirm cosine", c_prec, c_rec, c_fp], ["pixel check (defaults)", p_prec, p_rec, p_fp]]))
    if hold is not None:
        h_checked = hold["ssim"].notna().to_numpy()
        h_true = hold["true"].to_numpy()[h_checked]
        h_pred = ((hold["ssim"] >= d.pixel_ssim) & (hold["hist_corr"] >= d.pixel_hist_corr)).to_numpy()[h_checked]
        h_prec, h_rec, h_fp = pr(h_true, h_pred)
        lines.append(f"\nHeld-out set (seed {args.holdout_seed}, {len(hold)} pairs, {int(h_checked.sum())} "
                     f"pixel-checked) at the defaults: precision {h_prec:.3f}, recall {h_rec:.3f}, "
                     f"{h_fp} false pairs.\n")
    body = stamp() + "\n" + "\n".join(lines)
    print(body)
    if args.out:
        update_section("pixel-check", "Pixel check calibration (flat graphics)", body, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
