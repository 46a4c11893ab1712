"""Speed of the verify options, per image and per pair, on shared photos: ORB vs SIFT features and
matching, and the pixel check's thumbnail and comparison. One process, one thread (as a Dask
worker runs them); medians.

    python -m bench.options [--photos 60] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from pipeline import decode, verify
from pipeline.config import load_config

SHARED = Path(os.environ.get("SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))


def _median_ms(fn, items) -> float:
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main(argv: list[str] | None = None) -> int:
    from bench.report import stamp, table, update_section
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=60)
    ap.add_argument("--out", default=None, help="benchmarks markdown to update (section 'verify-options-speed')")
    args = ap.parse_args(argv)
    import cv2
    cv2.setNumThreads(1)
    paths = sorted((SHARED / "data" / "photos").glob("*.jpg"))[: args.photos]
    base = load_config().verify
    images = [verify._bounded(decode.load_image(p, min_side=base.max_side)[0], base) for p in paths]
    rows = []
    for method in ("orb", "sift"):
        cfg = load_config(None, [f"verify.method={method}"]).verify
        verify.features(images[0], cfg)  # warm-up (numba compile, detector creation)
        feat_ms = _median_ms(lambda im: verify.features(im, cfg), images)
        feats = [verify.features(im, cfg) for im in images]
        pairs = list(zip(feats[:-1], feats[1:]))  # different photos: the common candidate
        verify._verify(*pairs[0], cfg)
        pair_ms = _median_ms(lambda fp: verify._verify(fp[0], fp[1], cfg), pairs)
        desc = feats[0]["descriptors"]
        rows.append([method, feat_ms, pair_ms, f"{desc.shape[1] * desc.itemsize} B"])
    px = [dict(zip(("thumb", "hist", "flat"), verify.pixel_features(im)), width=im.width, height=im.height,
               transform=0) for im in images]
    thumb_ms = _median_ms(verify.pixel_features, images)
    check_ms = _median_ms(lambda ab: verify.pixel_check(ab[0], ab[1], 0), list(zip(px[:-1], px[1:])))
    body = (stamp() + f"\n{len(images)} shared photos bounded to verify.max_side={base.max_side}; pairs are "
            "consecutive (different) photos. Medians of one call each, one thread.\n\n"
            + table(["keypoints", "features ms / image", "verify ms / pair", "descriptor"], rows)
            + f"\nPixel check: thumbnail + histogram {thumb_ms:.2f} ms per feature row, comparison "
            f"{check_ms:.2f} ms per flat pair.\n")
    print(body)
    if args.out:
        update_section("verify-options-speed", "Verify options: speed (ORB, SIFT, pixel check)", body, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
