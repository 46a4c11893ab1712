"""Benchmark of the verify tier (ORB): speed and precision/recall on a generated benchmark.

`python -m bench.verify [--photos N] [--repeats R] [--models similarity,affine,homography]`
`python -m bench.verify --stages DIR [--sample 500] [--repeats R]`  (per-image CPU by step)

The benchmark: N real photos from ../shared/data/photos, each with generated edited copies
(crop to 70 %, 50 % resize, 5 degree rotation, JPEG quality 30, text overlay, mirror — the mirror
pair carries transform=4 as the screen would give it) as positives; as negatives, each photo paired
with its nearest *other* photo by 64-bit aHash (the kind of pair the screen sends on, "hard") and
with a random other photo ("random"). Figures: features/s (features_partition, one process, one
OpenCV thread) and pairs/s (verify_partition incl. reading features and RANSAC), median of repeated
runs; per model, the inlier distributions of positives and negatives and precision/recall of
status "match" (decided pairs: status "match" vs the rest).

Baselines measured in the same run, interleaved with the current code (default model): pairs/s
with the previous matcher (cv2 BFMatcher.knnMatch returning DMatch lists + ratio test and
one-to-one in Python: `verify_partition(..., reference=True)`), and features/s with the previous
ORB path (detect -> spread over Python KeyPoint lists -> compute: `_orb_features_previous` below).
Both give the same numbers bit for bit (checked here), so the ratios are pure speed.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from bench.report import median, stamp, table, update_section
from pipeline import verify
from pipeline.config import Config
from pipeline.decode import load_image, resize_max_side

SHARED = Path(os.environ.get("SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))

EDITS = ["crop70", "resize50", "rotate5", "jpeg30", "text", "mirror"]


def edit(img: Image.Image, name: str) -> Image.Image:
    w, h = img.size
    if name == "crop70":
        cw, ch = round(w * 0.7), round(h * 0.7)
        x, y = (w - cw) // 2, (h - ch) // 2
        return img.crop((x, y, x + cw, y + ch))
    if name == "resize50":
        return img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    if name == "rotate5":
        return img.rotate(5, resample=Image.Resampling.BICUBIC)
    if name == "jpeg30":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=30)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if name == "text":
        out = img.copy()
        draw = ImageDraw.Draw(out)
        font = ImageFont.load_default(size=max(12, h // 8))
        draw.text((w // 20, h // 3), "SAMPLE COPY 2024", fill=(255, 255, 255), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
        return out
    if name == "mirror":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raise ValueError(name)


def ahash(path: str) -> int:
    img, _, _ = load_image(path, min_side=64)
    g = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    bits = (g > g.mean()).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def build(n_photos: int, tmp: Path, seed: int = 7):
    """-> images (indexed by idx: abs_path, error), pairs (idx_a, idx_b, transform, label, kind)."""
    photos = sorted(p for p in (SHARED / "data" / "photos").iterdir()
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    rng = random.Random(seed)
    photos = sorted(rng.sample(photos, min(n_photos, len(photos))))
    tmp.mkdir(parents=True, exist_ok=True)
    paths, pairs = [], []
    for p in photos:
        paths.append(str(p))
    for i, p in enumerate(photos):
        img = Image.open(p).convert("RGB")
        for e in EDITS:
            out = tmp / f"{i:04d}-{e}.png"
            edit(img, e).save(out)  # PNG: the only loss is the edit itself (jpeg30 is baked in)
            paths.append(str(out))
            pairs.append((i, len(paths) - 1, 4 if e == "mirror" else 0, True, e))
    hashes = np.array([ahash(str(p)) for p in photos], dtype=np.uint64)
    for i in range(len(photos)):
        d = np.array([bin(int(h) ^ int(hashes[i])).count("1") for h in hashes])
        d[i] = 999
        pairs.append((i, int(np.argmin(d)), 0, False, "hard-neg"))
        j = rng.randrange(len(photos) - 1)
        pairs.append((i, j + (j >= i), 0, False, "random-neg"))
    images = pd.DataFrame({"abs_path": paths, "error": [None] * len(paths)})
    images.index.name = "idx"
    pairs = pd.DataFrame(pairs, columns=["idx_a", "idx_b", "transform", "label", "kind"])
    pairs["transform"] = pairs["transform"].astype("int8")
    pairs = pairs.drop_duplicates(["idx_a", "idx_b", "transform"]).reset_index(drop=True)
    return images, pairs


def _orb_features_previous(img: Image.Image, cfg) -> dict:
    """The verify tier's per-image ORB before the speed-up: KeyPoint objects through Python
    (list comprehensions for xy and responses) — the features/s baseline."""
    small = verify._bounded(img, cfg)
    grey = np.asarray(small.convert("L"))
    orb = verify._orb(cfg)
    kps = orb.detect(grey, None)
    if len(kps) > cfg.n_features:
        pts = np.array([k.pt for k in kps], dtype=np.float32)
        resp = np.array([k.response for k in kps], dtype=np.float32)
        kps = [kps[i] for i in verify._spread(pts, resp, small.size, cfg)]
    kps, desc = orb.compute(grey, kps) if kps else ((), None)
    if desc is None or not kps:
        xy, desc = np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    else:
        xy = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
        desc = np.ascontiguousarray(desc, dtype=np.uint8)
    return {"keypoints": xy, "descriptors": desc, "width": small.size[0], "height": small.size[1],
            "scale": small.size[0] / img.size[0]}


def _flat_share_previous(grey: np.ndarray) -> float:
    kernel = np.ones((3, 3), np.uint8)
    spread = cv2.dilate(grey, kernel).astype(np.int16) - cv2.erode(grey, kernel)
    return float(np.mean(spread <= 4))


def _pixel_features_previous(img: Image.Image) -> tuple[bytes, bytes, float]:
    """The pixel check's per-image data before the speed-up (np.roll soft bins, an RGB copy): the
    baseline of `--stages`."""
    small = img.resize((verify.PIXEL_SIDE, verify.PIXEL_SIDE), Image.Resampling.BOX
                       if min(img.size) >= verify.PIXEL_SIDE else Image.Resampling.BILINEAR)
    hsv = cv2.cvtColor(np.asarray(small.convert("RGB")), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(verify.HIST_BINS), [0, 180, 0, 256, 0, 256])
    for axis in range(3):
        wrap = np.roll(hist, 1, axis), np.roll(hist, -1, axis)
        if axis:
            edge = [slice(None)] * 3
            edge[axis] = slice(0, 1)
            wrap[0][tuple(edge)] = hist[tuple(edge)]
            edge[axis] = slice(-1, None)
            wrap[1][tuple(edge)] = hist[tuple(edge)]
        hist = 0.5 * hist + 0.25 * wrap[0] + 0.25 * wrap[1]
    hist = (hist.ravel() / max(1.0, float(hist.sum()))).astype(np.float32)
    grey = np.asarray(small.convert("L"), np.uint8)
    return grey.tobytes(), hist.tobytes(), _flat_share_previous(grey)


def _bounded_previous(img: Image.Image, cfg) -> Image.Image:
    """The picture ORB sees before the speed-up: Pillow's antialiased bilinear for every shrink."""
    w, h = img.size
    longest = max(w, h)
    if longest > cfg.max_side:
        return resize_max_side(img, cfg.max_side)
    if cfg.upscale_below and longest < cfg.upscale_below:
        s = cfg.max_side / longest
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return img


# the previous per-image helpers, swapped in for the baseline of --stages
PREVIOUS = {"pixel_features": _pixel_features_previous, "_bounded": _bounded_previous}


def _sample(folder: Path, n: int, seed: int = 0) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in
                   (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".bmp", ".heic", ".avif"))
    random.Random(seed).shuffle(names)
    return [str(folder / name) for name in names[:n]]


def _step_times(path: str, cfg) -> dict[str, float]:
    """CPU seconds of each step of one image's features (transform 0), as features_partition does
    them, plus the pixel check's parts (timed apart, on the same pictures)."""
    vcfg = cfg.verify
    orb = verify._orb(vcfg)
    clock = time.process_time
    out = {}
    t0 = clock()
    img, _, _ = load_image(path, min_side=verify._draft_min_side(path, cfg), max_pixels=cfg.screen.max_pixels)
    t1 = clock()
    out["decode (open + draft decode + to_rgb)"] = t1 - t0
    small = verify._bounded(img, vcfg)
    t2 = clock()
    out["_bounded (resize to max_side)"] = t2 - t1
    _bounded_previous(img, vcfg)
    out["_bounded, previous (Pillow)"] = clock() - t2
    t2 = clock()
    grey = np.asarray(small.convert("L"))
    t3 = clock()
    out["convert L"] = t3 - t2
    kps = orb.detect(grey, None)
    t4 = clock()
    out["ORB detect"] = t4 - t3
    if len(kps) > vcfg.n_features:
        xy = cv2.KeyPoint_convert(kps).reshape(-1, 2)
        resp = np.fromiter((k.response for k in kps), np.float32, len(kps))
        kps = [kps[i] for i in verify._spread(xy, resp, small.size, vcfg)]
    t5 = clock()
    out["grid spread"] = t5 - t4
    if kps:
        orb.compute(grey, kps)
    t6 = clock()
    out["ORB compute"] = t6 - t5
    pixels = verify.pixel_features(small)
    t7 = clock()
    out["pixel_features"] = t7 - t6
    assert _pixel_features_previous(small) == pixels, path  # bit for bit
    out["pixel_features, previous"] = clock() - t7
    # its parts
    t0 = clock()
    thumb = verify.pixel_thumbnail(small)
    t1 = clock()
    rgb = np.asarray(thumb)
    t2 = clock()
    verify.soft_hsv_histogram(rgb)
    t3 = clock()
    tgrey = np.asarray(thumb.convert("L"))
    t4 = clock()
    verify.flat_share(tgrey)
    t5 = clock()
    out.update({"  thumbnail resize": t1 - t0, "  RGB array": t2 - t1, "  HSV soft histogram": t3 - t2,
                "  grey thumbnail": t4 - t3, "  flat share": t5 - t4})
    return out


def stages(folder: Path, n: int, repeats: int, out: str | None) -> int:
    """Per-image CPU of each step of the verify tier's feature stage on a sample of `folder`, and
    features_partition as a whole, current vs the previous helpers (interleaved, identical rows
    asserted)."""
    cv2.setNumThreads(1)
    cfg = Config()
    files = _sample(folder, n)
    if not files:
        print(f"no images in {folder}", file=sys.stderr)
        return 1
    for path in files[:20]:  # warm: ORB object, LittleCMS, page cache
        _step_times(path, cfg)
    per_step: dict[str, list[list[float]]] = {}
    for _ in range(repeats):
        for i, path in enumerate(files):
            for step, sec in _step_times(path, cfg).items():
                per_step.setdefault(step, [[] for _ in files])[i].append(sec)
    rows = []
    for step, by_file in per_step.items():
        med = np.array([np.median(x) for x in by_file]) * 1e3  # per image: median over repeats
        rows.append([step, float(np.median(med)), float(med.mean())])

    # features_partition as a whole: every file with transform 0, one in five also mirrored (4)
    sizes = [Image.open(p).size for p in files]
    keys = [(i * 8 + t, p, t, w, h) for i, (p, (w, h)) in enumerate(zip(files, sizes))
            for t in ((0, 4) if i % 5 == 0 else (0,))]
    task = pd.DataFrame(keys, columns=["key", "abs_path", "transform", "width", "height"])
    task["transform"] = task["transform"].astype("int8")
    cur_cpu, prev_cpu = [], []
    with tempfile.TemporaryDirectory(prefix="bench-verify-stages-") as tmp:
        current = {name: getattr(verify, name) for name in PREVIOUS}
        for rep in range(repeats + 1):  # the first of each is a warm-up
            t0 = time.process_time()
            summ = verify.features_partition(task, cfg, f"{tmp}/current", rep)
            if rep:
                cur_cpu.append(time.process_time() - t0)
            for name, fn in PREVIOUS.items():
                setattr(verify, name, fn)
            try:
                t0 = time.process_time()
                prev = verify.features_partition(task, cfg, f"{tmp}/previous", rep)
                if rep:
                    prev_cpu.append(time.process_time() - t0)
            finally:
                for name, fn in current.items():
                    setattr(verify, name, fn)
        new_rows = pd.read_parquet(summ["part_path"].iloc[0])
        old_rows = pd.read_parquet(prev["part_path"].iloc[0])
    n_img = len(files)
    whole = [["previous helpers", 1e3 * median(prev_cpu) / n_img],
             ["current", 1e3 * median(cur_cpu) / n_img],
             ["current / previous", median(cur_cpu) / median(prev_cpu)]]
    # how far the pictures ORB sees moved (OpenCV's bilinear for shrinks below 2x)
    same = {col: float((new_rows[col] == old_rows[col]).mean()) for col in ("keypoints", "descriptors", "thumb")}
    agree = [["keys with identical keypoints / descriptors / thumbnail",
              f"{same['keypoints']:.3f} / {same['descriptors']:.3f} / {same['thumb']:.3f}"],
             ["mean keypoints per key, previous / current",
              f"{old_rows['n_keypoints'].mean():.1f} / {new_rows['n_keypoints'].mean():.1f}"],
             ["mean flat share, previous / current", f"{old_rows['flat'].mean():.4f} / {new_rows['flat'].mean():.4f}"]]
    fmts = pd.Series([Image.open(p).format for p in files]).value_counts()
    body = stamp() + (
        f"\nPer-image CPU (time.process_time, one thread, OpenCV at one thread) of the verify tier's "
        f"feature stage on {n_img} files sampled (seed 0) from `{folder}` "
        f"({', '.join(f'{k} {v}' for k, v in fmts.items())}), default config (ORB, max_side "
        f"{cfg.verify.max_side}, {cfg.verify.n_features} keypoints, pixel check on). Each step "
        f"timed per image, median of {repeats} repeats per image, then the median and mean over "
        f"images (ms). Steps as `features_partition` runs them for one (image, transform 0) key; "
        f"the pixel check's parts are timed apart on the same pictures.\n\n"
        + table(["step", "median ms / image", "mean ms / image"], rows)
        + f"\n`features_partition` on the sample ({len(task)} keys: every file plain, one in five also "
        f"mirrored; decode, features, pixel data and the Parquet write), CPU ms per image, median of "
        f"{repeats} interleaved runs, previous helpers (`PREVIOUS` in bench/verify.py: Pillow's "
        f"antialiased bilinear for every shrink, the np.roll soft bins) vs current. pixel_features is "
        f"asserted equal to the previous one bit for bit on every image; the shrink below 2x by "
        f"OpenCV's bilinear moves pixels, so the rows' agreement is shown instead:\n\n"
        + table(["helpers", "CPU ms / image"], whole) + "\n" + table(["rows, current vs previous", ""], agree))
    kwargs = {"path": out} if out else {}
    path = update_section("verify-stages", "verify tier: per-image CPU by step (bench.verify --stages)",
                          body, **kwargs)
    print(body)
    print(f"wrote section 'verify-stages' to {path}")
    return 0


def pr(res: pd.DataFrame, label: pd.Series) -> tuple[float, float]:
    pred = res["orb_status"].eq("match")
    tp = int((pred & label).sum())
    fp = int((pred & ~label).sum())
    fn = int((~pred & label).sum())
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="similarity,affine,homography")
    ap.add_argument("--out", default=None, help="benchmarks file (default docs/benchmarks.md)")
    ap.add_argument("--stages", default=None, metavar="DIR",
                    help="instead: per-image CPU of each feature step on a sample of the images in DIR")
    ap.add_argument("--sample", type=int, default=500, help="with --stages: files sampled")
    args = ap.parse_args(argv)
    if args.stages:
        return stages(Path(args.stages), args.sample, args.repeats, args.out)
    if not (SHARED / "data" / "photos").is_dir():
        print(f"{SHARED}/data/photos missing: nothing to benchmark", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        tmp = Path(tmp)
        images, pairs = build(args.photos, tmp / "img")
        label = pairs["label"]
        rows_model, rows_kind, speed, versus = [], [], [], []
        default_model = Config().verify.model
        for model in args.models.split(","):
            cfg = Config()
            cfg.verify.model = model
            work = tmp / f"work-{model}"
            res = verify.run_verify(pairs, images, cfg, str(work))
            p, r = pr(res, label)
            pos, neg = res["orb_inliers"][label], res["orb_inliers"][~label]
            hard = res["orb_inliers"][pairs["kind"].eq("hard-neg")]
            rows_model.append([model, p, r, int(pos.min()), float(pos.quantile(0.05)), float(pos.median()),
                               float(hard.quantile(0.95)), int(neg.max())])

            # speed: the same feature/pair tasks the orchestrator would run, timed in-process
            need_idx, need_t = verify.needed_features(pairs["idx_a"], pairs["idx_b"], pairs["transform"])
            keys = pd.DataFrame({"idx": need_idx, "transform": need_t}).drop_duplicates()
            rows = pd.DataFrame({"key": verify.feature_key(keys["idx"], keys["transform"]),
                                 "abs_path": images.loc[keys["idx"], "abs_path"].to_numpy(),
                                 "transform": keys["transform"].astype("int8").to_numpy()})
            f_times, p_times, f_prev, p_prev = [], [], [], []
            baseline = model == default_model
            current = verify.orb_features
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                summ = verify.features_partition(rows, cfg, str(tmp / f"speed-{model}"), rep)
                f_times.append(time.perf_counter() - t0)
                if baseline:  # the previous per-image path, interleaved (same machine load)
                    verify.orb_features = _orb_features_previous
                    try:
                        t0 = time.perf_counter()
                        prev = verify.features_partition(rows, cfg, str(tmp / "speed-previous"), rep)
                        f_prev.append(time.perf_counter() - t0)
                    finally:
                        verify.orb_features = current
            if baseline:
                new_rows = pd.read_parquet(summ["part_path"].iloc[0])
                old_rows = pd.read_parquet(prev["part_path"].iloc[0])
                assert new_rows.equals(old_rows), "features differ from the previous path"
            part_of = dict(zip(summ["key"], summ["part_path"]))
            job = verify.pair_job(pairs, part_of)
            verify.verify_partition(job.iloc[:2], cfg)  # numba kernel loaded (cache) before timing
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                again = verify.verify_partition(job, cfg)
                p_times.append(time.perf_counter() - t0)
                if baseline:
                    t0 = time.perf_counter()
                    ref = verify.verify_partition(job, cfg, reference=True)
                    p_prev.append(time.perf_counter() - t0)
            assert again["orb_inliers"].tolist() == res["orb_inliers"].tolist(), "not deterministic"
            speed.append([model, len(rows) / median(f_times), len(job) / median(p_times)])
            if baseline:
                pd.testing.assert_frame_equal(again, ref)  # same numbers as the previous matcher
                prev_speed = [len(rows) / median(f_prev), len(job) / median(p_prev)]
                versus = [["previous (KeyPoint lists; BFMatcher.knnMatch + Python)", *prev_speed],
                          ["current (array spread; numba matcher)", *speed[-1][1:]],
                          ["current / previous", speed[-1][1] / prev_speed[0],
                           speed[-1][2] / prev_speed[1]]]
            if model == default_model:
                for kind, g in res.groupby(pairs["kind"]):
                    st = g["orb_status"].value_counts()
                    rows_kind.append([kind, len(g), int(g["orb_inliers"].min()),
                                      float(g["orb_inliers"].median()), int(g["orb_inliers"].max()),
                                      int(st.get("match", 0)), int(st.get("partial", 0)),
                                      int(st.get("inconclusive", 0)), int(st.get("no-match", 0))])
            print(model, rows_model[-1], speed[-1], flush=True)

    cfg = Config().verify
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    body = stamp() + (
        f"\nGenerated benchmark: {args.photos} photos from `../shared/data/photos`, {n_pos} positive pairs "
        f"(edited copies: {', '.join(EDITS)}; mirror with transform=4) and {n_neg} negative pairs "
        f"(each photo with its nearest other photo by aHash, and with a random other photo). "
        f"ORB on images bounded to {cfg.max_side} px, {cfg.n_features} keypoints, ratio {cfg.ratio}, "
        f"RANSAC threshold {cfg.ransac_threshold} px; status \"match\" at >= {cfg.match_inliers} inliers "
        f"(\"partial\" when they cover less than {cfg.min_coverage} of the pictures' keypoints), "
        f"\"no-match\" below {cfg.reject_inliers}. Speed: one process, one OpenCV thread (= per core), "
        f"median of {args.repeats} runs; pairs/s includes reading the features from the store and RANSAC, "
        f"features are computed once per (image, transform).\n\n"
        "Geometric model comparison (precision/recall of status \"match\"; inlier counts):\n\n"
        + table(["model", "precision", "recall", "min inliers pos", "p5 pos", "median pos",
                 "p95 hard neg", "max neg"], rows_model)
        + "\nSpeed per core:\n\n"
        + table(["model", "features/s", "pairs/s"], speed)
        + (f"\nCurrent code vs the previous implementation, same run, interleaved repeats, model "
           f"`{default_model}` (identical features and results, asserted):\n\n"
           + table(["implementation", "features/s", "pairs/s"], versus) if versus else "")
        + f"\nPer kind of pair (default model `{default_model}`):\n\n"
        + table(["kind", "pairs", "min inliers", "median", "max", "match", "partial", "inconclusive", "no-match"],
                rows_kind))
    kwargs = {"path": args.out} if args.out else {}
    path = update_section("verify", "verify tier (ORB)", body, **kwargs)
    print(f"wrote section 'verify tier (ORB)' to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
