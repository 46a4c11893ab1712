"""Verify tier: ORB (or SIFT) keypoints + 2-NN matching + Lowe ratio test + RANSAC geometric check,
and a pixel check (SSIM + colour histogram) for the pairs whose keypoints cannot settle them.

Work is split in two kinds of task so that no process holds every descriptor:

1. `features_partition` — per image partition: decode once (JPEG draft), bound the size
   (`verify.max_side`), apply the dihedral transform the pair needs (ORB is not mirror-invariant),
   compute at most `verify.n_features` ORB keypoints, write one Parquet file to the feature store.
   Features are computed once per (image, transform) key, never per pair.
2. `verify_partition` — per chunk of pairs: read only the feature partitions the chunk needs
   (`store.read_keys`, cached per worker), match, run RANSAC, return the numbers. Matching is a
   numba kernel (`hamming.match_descriptors`: 2-NN Hamming distances of the descriptors packed as 4 uint64
   words, popcount, ratio test and one-to-one in one compiled call; ~0.15 ms per pair of 500
   keypoints), giving exactly the matches of the earlier cv2 BFMatcher.knnMatch + Python path
   (`_good_matches_reference`, kept for the tests and as the benchmark baseline). The store keeps
   32 bytes per descriptor and 8 per keypoint (xy float32), as OpenCV gives them.

`run_verify` is the thin Dask wrapper the orchestrator calls; with `client=None` it runs the same
functions in-process (and gives the same numbers: everything is deterministic, RANSAC is seeded).

Feature keys are `idx * 8 + transform` (`feature_key`). Pair semantics: `dihedral(image_b, t)`
aligns b with a, so a pair needs keys (idx_a, 0) and (idx_b, 0 or 4: ORB handles the turns, only
the flip changes descriptors; see `pair_feature_keys`); a mirrored pair (t >= 4) also needs (idx_b, 0),
because `check_pair` tries it unmirrored when the mirrored check is not a match.

Score (`orb_score`): inliers / min(n_keypoints_a, n_keypoints_b), in [0, 1] — the fraction of the
poorer image's keypoints that the geometry explains. The raw `orb_inliers` is what the status
thresholds use (`verify.match_inliers`, `verify.reject_inliers`); the score is for ranking and
for analysts comparing pairs of very different keypoint counts. Many matches of which few are
inliers (`verify.min_inlier_share` of at least `verify.chance_min_matches`) are "no-match":
letters of two different pages of text, tiles or a fence match the same shapes elsewhere, and
RANSAC lines up a few of those by chance (a copy's inliers are most of its matches).

`verify.method: sift` swaps ORB for SIFT (cv2.SIFT_create, 128 float32 per descriptor): the same
grid spread, ratio test, one-to-one filter and RANSAC, with an L2 2-NN (`_match_l2`). The output
columns keep their names (orb_matches, orb_inliers, orb_score) and then hold SIFT's numbers.

Pixel check (`verify.pixel_check`): keypoints cannot settle pairs of flat images (logos, UI
screenshots, text on colour): either there are too few of them (ORB inconclusive), or they sit on
a shared layout, so two different logos in the same shapes or two screens of one app with
different text match geometrically (bench/pixel_check.py: ORB "matched" 170 of 200 such negatives).
So when either image has too few keypoints or both are flat (`flat_share` >= FLAT_SHARE), the
tier compares pixels (and when both are mostly flat, >= `verify.semi_flat_share`: charts,
diagrams, maps, and ORB left the pair undecided, a few chance inliers that the confirm tier's "a
chart" cosine would accept, it compares them too, and lets them decide only when they disagree
outright, SSIM < `verify.semi_flat_ssim`): the two images squashed to PIXEL_SIDE x PIXEL_SIDE grey, b aligned on a
with the RANSAC model when the keypoints matched (a crop lines up), else with the pair's dihedral
transform (the screen's alignment; squashing commutes with flips and quarter turns); then
`ssim` = the local SSIM that all but the worst SSIM_TAIL percent of the overlap reaches (a
different word in a button is a small area; a mean over a mostly blank image would hide it), and
`hist_corr` = the correlation of their HSV histograms (cv2.compareHist HISTCMP_CORREL). Each
feature row carries its image's thumbnail, histogram and flatness, so this costs no extra
decode. `pipeline.decide` turns the two numbers into a verdict (thresholds in DecideConfig).
"""
from __future__ import annotations

import functools
import threading
import uuid
from contextlib import contextmanager
import io

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from . import scan, storage, store
from .config import Config, VerifyConfig
from .decode import GRID_DIHEDRAL, DecodeError, dihedral, load_image, open_checked, resize_max_side
from .progress import Progress, map_tasks, stage_of, tasks_in_flight

STATUSES = ("match", "no-match", "inconclusive", "partial")
RESULT_COLUMNS = ["orb_matches", "orb_inliers", "orb_score", "orb_status", "orb_reason", "ssim", "hist_corr"]
RESULT_DTYPES = {"orb_matches": np.int32, "orb_inliers": np.int32, "orb_score": np.float32, "orb_status": object,
                 "orb_reason": object, "ssim": np.float32, "hist_corr": np.float32}
DESCRIPTOR = {"orb": (np.uint8, 32), "sift": (np.float32, 128)}  # method -> (dtype, width)
PIXEL_SIDE = 128  # pixel check: images squashed to this square (grey) before SSIM
HIST_BINS = (16, 4, 4)  # pixel check: H x S x V histogram bins
# Flat: this share of the thumbnail's pixels have a 3x3 neighbourhood within 4 grey levels.
# Generated logos/UI/text: >= 0.87; shared photos: median 0.11, 99th percentile 0.85.
FLAT_SHARE = 0.8
SSIM_TAIL = 1.5  # percent of the overlap allowed to differ (a watermark covers ~1 %)
COVER_GRID = 5  # coverage of a match (`_coverage`): cells per side of the grid over each picture

_local = threading.local()  # cv2 ORB / matcher objects are not shared between threads

# The definitions that only cut, send and collect the tier's tasks. A stored feature or score
# does not depend on them, so the catalog's fingerprint of this module leaves them out
# (`catalog.source_fingerprint`) and editing them keeps every catalog's ORB features and pair
# evidence. What shapes a number (which feature keys a pair is checked with, the checks
# themselves) stays out of this list, the partition functions take no default for what these
# definitions give them (JOB_COLUMNS), and tests/test_verify.py checks that run_verify gives each
# pair what `check_pair` gives its features. An edit to them that does change a stored number
# (a bug fixed) bumps RESULTS_REVISION, which is in the fingerprint: every catalog recomputes.
NOT_FINGERPRINTED = ("TEXT_COLUMNS", "_verify_task", "_features_task", "run_verify", "FeaturesMade",
                     "features_made", "_PairTasks", "_Collected", "pair_evidence")
# The definitions that only judge pairs from stored features (matching, RANSAC, the statuses, the
# pixel check). The per-image features' fingerprint leaves them out too (catalog._SKIP_LISTS):
# an edit to how pairs are judged re-checks the stored pairs, never recomputes every image's
# features. The pair evidence's fingerprint reads them ("orb_check"). The same refusals hold
# (catalog.fingerprinted_syntax): no feature code may use what this list names.
PAIR_CHECK_ONLY = ("STATUSES", "SSIM_TAIL", "COVER_GRID", "ssim_map", "_residual", "_dihedral_maps",
                   "_dihedral_near", "pixel_check", "_coloured", "COLOURED_SHARE", "_ransac", "_good_matches", "_good_matches_reference",
                   "SSIM_C2", "_ssim_window", "_structureless", "DIHEDRAL_NEAR_PX", "_aligned_ssim",
                   "verify_pair", "_geometry", "stored_evidence", "_verify", "_verify_model", "_coverage",
                   "_error_result", "PLAIN_NOTE", "_STATUS_RANK", "check_pair", "needs_pixel_check",
                   "semi_flat_undecided", "_has_pixels", "verify_partition", "BOTH_WAYS_KEY",
                   "evidence_transforms", "evidence_parts", "other_way", "region_mismatch", "_region_mismatch_by", "_ssim_parts", "_matched_thumbnails",
                   "_thumbnail_warp", "_warped_onto_a", "REGION_GRID",
                   "REGION_SSIM", "REGION_MIN_INSIDE", "REGION_MIN_TEXTURED", "REGION_MAX_SCORE", "REGION_BLUR")
RESULTS_REVISION = 1


def feature_key(idx, transform):
    """(image index, dihedral transform 0..7) -> int64 feature key (works on scalars and arrays)."""
    return np.asarray(idx, dtype=np.int64) * 8 + np.asarray(transform, dtype=np.int64)


@contextmanager
def _cv_threads(n: int):
    """Run with OpenCV's own thread pool at `n` threads (Dask provides the parallelism)."""
    if n <= 0:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _orb(cfg: VerifyConfig):
    params = (cfg.n_features, cfg.grid, cfg.oversample, cfg.scale_factor, cfg.n_levels,
              cfg.fast_threshold)
    cached = getattr(_local, "orb", None)
    if cached is None or cached[0] != params:
        detect = cfg.n_features * (max(1, cfg.oversample) if cfg.grid > 1 else 1)
        orb = cv2.ORB_create(nfeatures=detect, scaleFactor=cfg.scale_factor,
                             nlevels=cfg.n_levels, fastThreshold=cfg.fast_threshold)
        _local.orb = cached = (params, orb)
    return cached[1]


def _sift(cfg: VerifyConfig):
    params = (cfg.n_features, cfg.grid, cfg.oversample)
    cached = getattr(_local, "sift", None)
    if cached is None or cached[0] != params:
        detect = cfg.n_features * (max(1, cfg.oversample) if cfg.grid > 1 else 1)
        _local.sift = cached = (params, cv2.SIFT_create(nfeatures=detect))
    return cached[1]


def _matcher(norm: int = cv2.NORM_HAMMING):
    """cv2 brute-force matcher: Hamming for `_good_matches_reference` on ORB (tests, bench), L2
    for SIFT's float descriptors."""
    cache = getattr(_local, "matchers", None)
    if cache is None:
        cache = _local.matchers = {}
    if norm not in cache:
        cache[norm] = cv2.BFMatcher(norm, crossCheck=False)
    return cache[norm]


# ---------------------------------------------------------------------------------------------
# Per image


def _bounded(img: Image.Image, cfg: VerifyConfig) -> Image.Image:
    """Longer side <= max_side; images whose longer side is below `upscale_below` are enlarged to
    max_side (ORB ignores a 31 px border, so a 160x100 thumbnail would have almost no keypoints,
    and matching works best when both images sit at the same pyramid scale)."""
    w, h = img.size
    longest = max(w, h)
    if cfg.max_side < longest < 2 * cfg.max_side and img.mode == "RGB":
        # shrinking by less than 2x (most JPEGs: the draft decode already took the rest): OpenCV's
        # plain bilinear still weighs every source pixel, at ~1/3 of the CPU of Pillow's
        # antialiased one (bench.verify --stages; make eval: the same final precision and recall)
        s = cfg.max_side / longest
        size = (max(1, round(w * s)), max(1, round(h * s)))
        return Image.fromarray(cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_LINEAR))
    if longest > cfg.max_side:
        return resize_max_side(img, cfg.max_side)
    if cfg.upscale_below and longest < cfg.upscale_below:
        s = cfg.max_side / longest
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    return img


def _spread(pts: np.ndarray, resp: np.ndarray, size: tuple[int, int], cfg: VerifyConfig) -> np.ndarray:
    """Indices (ascending) of the n_features detected keypoints to keep, spread over a grid x grid
    layout: each cell keeps its strongest (up to an equal share), the rest of the budget goes to
    the strongest left over. Without this, a text overlay or a logo (dense strong corners) takes
    nearly all keypoints and an overlaid copy of a photo has nothing left to match (measured: 9 of
    30 text-overlay copies below 15 inliers with plain top-N ORB). Vectorised over arrays of the
    keypoints' xy (`pts`, n x 2) and `resp` (ORB responses); ties break on the detection order."""
    n = len(pts)
    if n <= cfg.n_features:
        return np.arange(n)
    w, h = size
    g = cfg.grid
    cell = (np.minimum((pts[:, 1] * g / h).astype(np.int64), g - 1) * g
            + np.minimum((pts[:, 0] * g / w).astype(np.int64), g - 1))
    order = np.lexsort((np.arange(n), -resp, cell))  # by cell, strongest first, stable
    sorted_cell = cell[order]
    start = np.searchsorted(sorted_cell, sorted_cell, side="left")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - start
    quota = -(-cfg.n_features // (g * g))
    chosen = rank < quota
    if chosen.sum() > cfg.n_features:  # cannot happen with ceil quota unless all cells full
        idx = np.flatnonzero(chosen)
        idx = idx[np.lexsort((idx, -resp[idx]))][:cfg.n_features]
        chosen[:] = False
        chosen[idx] = True
    room = cfg.n_features - int(chosen.sum())
    if room > 0:
        rest = np.flatnonzero(~chosen)
        rest = rest[np.lexsort((rest, -resp[rest]))][:room]
        chosen[rest] = True
    return np.flatnonzero(chosen)


def features(img: Image.Image, cfg: VerifyConfig) -> dict:
    """Keypoint features of `img` with the configured `verify.method` (orb or sift)."""
    return sift_features(img, cfg) if cfg.method == "sift" else orb_features(img, cfg)


def sift_features(img: Image.Image, cfg: VerifyConfig) -> dict:
    """As `orb_features`, with SIFT: descriptors (n,128 float32). The same grid spread keeps a
    text overlay from taking every keypoint."""
    return _keypoint_features(img, cfg, _sift(cfg), DESCRIPTOR["sift"])


def orb_features(img: Image.Image, cfg: VerifyConfig) -> dict:
    """ORB on `img` bounded to `cfg.max_side` -> keypoints (n,2 float32, xy in the bounded frame),
    descriptors (n,32 uint8), width/height of the bounded frame, scale (bounded / given width).

    detect (oversample * n_features candidates) -> grid spread on arrays (xy via
    cv2.KeyPoint_convert, responses in one pass) -> compute on the kept keypoints. Measured
    (bench/verify.py, same keypoints and descriptors bit for bit): 14 % less ORB time than the
    earlier per-KeyPoint Python lists, and faster than one detectAndCompute over all candidates
    (descriptors for 3x the keypoints cost more than the second pyramid build)."""
    return _keypoint_features(img, cfg, _orb(cfg), DESCRIPTOR["orb"])


def _keypoint_features(img: Image.Image, cfg: VerifyConfig, orb, descriptor: tuple) -> dict:
    dtype, width = descriptor
    small = _bounded(img, cfg)
    grey = np.asarray(small.convert("L"))
    if min(grey.shape) < 2:
        # (a one-pixel sliver: ORB raises on it, and finds no keypoint below 63 px anyway; a row
        # with an error had no pixel-check data, so its pairs skipped the check meant for them)
        kps, desc = (), None
    elif cfg.grid > 1:
        kps = orb.detect(grey, None)
        if len(kps) > cfg.n_features:
            xy = cv2.KeyPoint_convert(kps).reshape(-1, 2)
            resp = np.fromiter((k.response for k in kps), np.float32, len(kps))
            kps = [kps[i] for i in _spread(xy, resp, small.size, cfg)]
        kps, desc = orb.compute(grey, kps) if kps else ((), None)
    else:
        kps, desc = orb.detectAndCompute(grey, None)
    if desc is None or not kps:
        xy = np.zeros((0, 2), np.float32)
        desc = np.zeros((0, width), dtype)
    else:
        xy = np.ascontiguousarray(cv2.KeyPoint_convert(kps).reshape(-1, 2), dtype=np.float32)
        desc = np.ascontiguousarray(desc, dtype=dtype)
    return {"keypoints": xy, "descriptors": desc, "width": small.size[0], "height": small.size[1],
            "scale": small.size[0] / img.size[0]}


_KERNEL_3X3 = np.ones((3, 3), np.uint8)
# soft histogram bins: the neighbours of each bin along H (wraps), S and V (edge bins repeat)
_SOFT_NEIGHBOURS = [((np.arange(n) - 1) % n, (np.arange(n) + 1) % n) if axis == 0 else
                    (np.maximum(np.arange(n) - 1, 0), np.minimum(np.arange(n) + 1, n - 1))
                    for axis, n in enumerate(HIST_BINS)]


def flat_share(grey: np.ndarray) -> float:
    """Share of pixels whose 3x3 neighbourhood spans <= 4 grey levels (flat graphics: most)."""
    # morphological gradient = dilate - erode (never negative, so uint8 cannot wrap)
    spread = cv2.morphologyEx(grey, cv2.MORPH_GRADIENT, _KERNEL_3X3)
    return np.count_nonzero(spread <= 4) / spread.size


def pixel_thumbnail(img: Image.Image) -> Image.Image:
    """`img` squashed to PIXEL_SIDE x PIXEL_SIDE (box filter when shrinking on both sides)."""
    return img.resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BOX if min(img.size) >= PIXEL_SIDE
                      else Image.Resampling.BILINEAR)


def soft_hsv_histogram(rgb: np.ndarray) -> np.ndarray:
    """Normalised HSV histogram (HIST_BINS, flattened float32) of an RGB uint8 array, soft-binned:
    1/4, 1/2, 1/4 over each bin and its neighbours (hue wraps), so a flat colour near a bin edge
    that a re-encode moves across it does not drop the correlation to ~0 (measured: 0.004 -> 0.46).
    Counts times quarters stay exact in float32 (below 2^24 / 64), so the sums' order is free."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(HIST_BINS), [0, 180, 0, 256, 0, 256])
    for axis, (before, after) in enumerate(_SOFT_NEIGHBOURS):
        hist = 0.5 * hist + 0.25 * hist.take(before, axis) + 0.25 * hist.take(after, axis)
    return (hist.ravel() / max(1.0, float(hist.sum()))).astype(np.float32)


def pixel_features(img: Image.Image) -> tuple[bytes, bytes, float]:
    """The pixel check's per-image data: PIXEL_SIDE^2 grey uint8 thumbnail (squashed), normalised
    HSV histogram (float32 bytes), flat share. One resize; the RGB array is read once."""
    small = pixel_thumbnail(img)
    hist = soft_hsv_histogram(np.asarray(small if small.mode == "RGB" else small.convert("RGB")))
    grey = np.asarray(small.convert("L"))
    return grey.tobytes(), hist.tobytes(), flat_share(grey)


def ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Local structural similarity (Wang et al. 2004: Gaussian window 7 px, sigma 1.5, K1 0.01,
    K2 0.03, 8-bit range) of two grey images of the same shape, per pixel."""
    return _ssim_parts(x, y)[0]


def _ssim_parts(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`ssim_map` and the two images' local variances it is made from (SSIM's window)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    c1 = (0.01 * 255) ** 2
    mx, my = _ssim_window(x), _ssim_window(y)
    vx, vy, cxy = _ssim_window(x * x) - mx * mx, _ssim_window(y * y) - my * my, _ssim_window(x * y) - mx * my
    return (2 * mx * my + c1) * (2 * cxy + SSIM_C2) / ((mx * mx + my * my + c1) * (vx + vy + SSIM_C2)), vx, vy


SSIM_C2 = 58.522499999999994  # SSIM's contrast/structure constant, (0.03 * 255) ** 2 (K2 0.03, 8-bit range)


def _ssim_window(a: np.ndarray) -> np.ndarray:
    """SSIM's local mean: a Gaussian window of 7 px, sigma 1.5."""
    return cv2.GaussianBlur(a, (7, 7), 1.5, borderType=cv2.BORDER_REFLECT)


def _structureless(t: np.ndarray, valid: np.ndarray) -> bool:
    """No edges for SSIM to compare: over all but SSIM_TAIL percent of `valid`, the local variance
    (`ssim_map`'s window) stays below SSIM's own C2, where its structure term reads ~1 whatever the
    two pictures are (and its luminance term forgives 95 against 130 grey: 0.95)."""
    x = t.astype(np.float64)
    var = _ssim_window(x * x) - _ssim_window(x) ** 2
    return float(np.percentile(var[valid], 100 - SSIM_TAIL)) < SSIM_C2


def _residual(t_have: int, t_want: int) -> int:
    """r such that turning an image already turned by `t_have` by r gives `t_want`."""
    probe = np.arange(6).reshape(2, 3)
    base = GRID_DIHEDRAL[t_have](probe)
    want = GRID_DIHEDRAL[t_want](probe)
    return next(r for r in range(8) if np.array_equal(GRID_DIHEDRAL[r](base), want))


@functools.lru_cache(maxsize=4)
def _dihedral_maps(side: int) -> list[np.ndarray]:
    """Per GRID_DIHEDRAL turn t: the 2x3 map x -> the pixel of the array that turn t of a side x
    side array shows at x ((col, row) coordinates), read off the turned coordinate grids."""
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64)
    maps = []
    for turn in GRID_DIHEDRAL:
        tc, tr = turn(cols), turn(rows)  # source column / row shown at each (row, col)
        # affine from three points: (0, 0), (1, 0) and (0, 1) in (x=col, y=row)
        origin = np.array([tc[0, 0], tr[0, 0]])
        ex = np.array([tc[0, 1], tr[0, 1]]) - origin
        ey = np.array([tc[1, 0], tr[1, 0]]) - origin
        maps.append(np.column_stack([ex, ey, origin]))
    return maps


# a model this close to an exact turn (thumbnail pixels) is also scored as that turn (`pixel_check`)
DIHEDRAL_NEAR_PX = 4.0


def _dihedral_near(warp: np.ndarray, side: int, shift: float = 1.5) -> int | None:
    """The GRID_DIHEDRAL turn whose map is within 3 % and `shift` px of `warp` (thumbnail a ->
    thumbnail b, 3x3), or None."""
    if np.abs(warp[2, :2]).max() > 1e-4:  # (a homography's perspective part)
        return None
    for turn, m in enumerate(_dihedral_maps(side)):
        if np.abs(warp[:2, :2] - m[:, :2]).max() <= 0.03 and np.abs(warp[:2, 2] - m[:, 2]).max() <= shift:
            return turn
    return None


# a histogram with at least this share of its (soft-binned) mass at saturation bins 2-3 (S >= 128:
# every pixel of saturation >= 64 puts a quarter there or more) is of a coloured picture, whose
# hue means something; a grey one's hue is noise (copies of a grey field: correlation 0.48-0.73)
COLOURED_SHARE = 0.2


def _coloured(hist: np.ndarray) -> bool:
    """A coloured picture (COLOURED_SHARE of its HSV histogram at high saturation), not a grey one."""
    return float(hist.reshape(HIST_BINS)[:, 2:, :].sum()) >= COLOURED_SHARE


def _aligned_ssim(ta: np.ndarray, tb: np.ndarray, valid: np.ndarray, max_shift: float,
                  recoloured: bool = False) -> float:
    """The pixel check's score of two aligned thumbnails over `valid`: SSIM's low tail (0 when
    they hardly overlap, or are two blank pictures of another brightness, or, `recoloured`: the
    colours disagree, of another colour)."""
    side = ta.shape[0]
    inside = valid.astype(bool)
    local = ssim_map(ta, tb)[inside]
    if local.size < side * side // 10:  # the model puts b mostly outside a: not the same picture
        return 0.0
    shifted = max_shift > 0 and abs(float(ta[inside].mean()) - float(tb[inside].mean())) > max_shift
    if (shifted or recoloured) and _structureless(ta, inside) and _structureless(tb, inside):
        return 0.0  # two blank pictures of another brightness or colour: SSIM cannot tell them apart
    return float(np.percentile(local, SSIM_TAIL))


def _matched_thumbnails(fa: dict, fb: dict) -> tuple[np.ndarray, np.ndarray]:
    """a's and b's pixel-check thumbnails (PIXEL_SIDE square, grey), the one made from a larger
    source blurred to the other's detail: it is sharper (text edges), and every resized copy of a
    graphic with text would lose SSIM at its edges."""
    side = PIXEL_SIDE
    ta = np.frombuffer(fa["thumb"], np.uint8).reshape(side, side)
    tb = np.frombuffer(fb["thumb"], np.uint8).reshape(side, side)
    ratio = max(fa["width"], fa["height"]) / max(1, max(fb["width"], fb["height"]))
    if ratio > 1.2:
        ta = cv2.GaussianBlur(ta, (0, 0), 0.5 * np.sqrt(ratio * ratio - 1))
    elif ratio < 1 / 1.2:
        tb = cv2.GaussianBlur(tb, (0, 0), 0.5 * np.sqrt(1 / (ratio * ratio) - 1))
    return ta, tb


def _thumbnail_warp(fa: dict, fb: dict, model: np.ndarray) -> np.ndarray:
    """A map from a's keypoint frame to b's (2 x 3 or 3 x 3) as a 3 x 3 map between their
    thumbnails: thumb a -> a's frame -> (model) b's frame -> thumb b."""
    side = PIXEL_SIDE
    m = np.vstack([model, [0, 0, 1]]) if model.shape == (2, 3) else model
    to_a = np.diag([fa["width"] / side, fa["height"] / side, 1.0])
    to_thumb_b = np.diag([side / fb["width"], side / fb["height"], 1.0])
    return to_thumb_b @ m @ to_a


def _warped_onto_a(tb: np.ndarray, warp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """b's thumbnail warped onto a's by `warp` (`_thumbnail_warp`, applied inverse), and where it
    lies (uint8 1/0), eroded so that SSIM's window does not see the edge."""
    side = tb.shape[0]
    warped = cv2.warpPerspective(tb, warp, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderValue=0)
    valid = cv2.warpPerspective(np.ones((side, side), np.uint8), warp, (side, side),
                                flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0)
    return warped, cv2.erode(valid, np.ones((7, 7), np.uint8))


def pixel_check(fa: dict, fb: dict, transform: int, model: np.ndarray | None = None,
                blank_max_shift: float = VerifyConfig.blank_max_shift,
                blank_min_hist_corr: float = VerifyConfig.blank_min_hist_corr) -> tuple[float, float]:
    """(ssim, hist_corr) of a and b aligned on a. The thumbnails are of the feature rows' images
    (a plain, b turned by fb["transform"]); `model` (a RANSAC 2x3 or 3x3 map from a's keypoint
    frame to b's) aligns them when given, else the rest of the dihedral `transform`. Two blank
    (structureless) pictures score 0 when their mean grey levels differ by more than
    `blank_max_shift`, or when both are coloured (`_coloured`) and their histograms correlate
    below `blank_min_hist_corr` (solid red against solid magenta: grey thumbnails alike)."""
    side = PIXEL_SIDE
    ta, tb = _matched_thumbnails(fa, fb)
    valid = np.ones((side, side), np.uint8)
    exact = None  # (b turned exactly, when the model is a little further from a turn: scored too)
    if model is not None:
        warp = _thumbnail_warp(fa, fb, model)
        # near the identity (re-encode, resize: the squash aligns them already) or a quarter turn
        # or flip of it (the model turned b, whatever the screen's transform said) a sub-pixel
        # warp would only blur text edges (measured: SSIM 0.90 -> 0.18 on a resized copy; a
        # slide turned 180 degrees, 0.98 -> 0.48): the exact turn is applied instead
        turn = _dihedral_near(warp, side)
        if turn is not None:
            tb = np.ascontiguousarray(GRID_DIHEDRAL[turn](tb))
        else:
            unwarped = tb
            tb, valid = _warped_onto_a(tb, warp)
            # a turned copy whose model missed the exact turn by a few pixels (a flat logo's 22
            # inliers, 2 px off: warped 0.37, turned 0.975): both are scored, the better kept
            near = _dihedral_near(warp, side, DIHEDRAL_NEAR_PX)
            if near is not None:
                exact = np.ascontiguousarray(GRID_DIHEDRAL[near](unwarped))
    elif fb["transform"] != transform:
        tb = np.ascontiguousarray(GRID_DIHEDRAL[_residual(fb["transform"], int(transform))](tb))
    ha, hb = np.frombuffer(fa["hist"], np.float32), np.frombuffer(fb["hist"], np.float32)
    hist = float(cv2.compareHist(ha, hb, cv2.HISTCMP_CORREL))  # flips and turns do not change it
    recoloured = bool(blank_min_hist_corr > 0 and hist < blank_min_hist_corr and _coloured(ha) and _coloured(hb))
    score = _aligned_ssim(ta, tb, valid, blank_max_shift, recoloured)
    if exact is not None:
        score = max(score, _aligned_ssim(ta, exact, np.ones((side, side), np.uint8), blank_max_shift, recoloured))
    return score, hist


def _draft_min_side(path: str, cfg: Config, size: tuple[int, int] | None = None) -> int:
    """Short side the JPEG draft decode must keep so that the longer side stays >= max_side.
    `size`: the image's (width, height) when already known (the screen recorded it; EXIF turns do
    not change min/max), which saves opening the file a second time."""
    if size is None:
        with open_checked(path, cfg.screen.max_pixels) as im:
            size = im.size
    w, h = size
    return max(1, -(-cfg.verify.max_side * min(w, h) // max(w, h)))


def _load_bounded(path: str, cfg: Config, size: tuple[int, int] | None = None) -> Image.Image:
    """The picture ORB sees: decoded at the smallest draft scale that keeps max_side, bounded."""
    if storage.is_url(path):  # one GET for the header look and the decode
        try:
            path = io.BytesIO(storage.read_bytes(path))
        except FileNotFoundError:
            raise DecodeError("file disappeared before it was read") from None
        except OSError as exc:
            raise DecodeError(f"cannot read: {exc.strerror or exc}") from None
    img, _, _ = load_image(path, min_side=_draft_min_side(path, cfg, size), max_pixels=cfg.screen.max_pixels,
                          max_decode_bytes=cfg.screen.max_decode_bytes)
    return _bounded(img, cfg.verify)


def _known_size(group: pd.DataFrame) -> tuple[int, int] | None:
    """(width, height) from a feature task's rows, when the caller passed valid ones."""
    if "width" not in group or "height" not in group:
        return None
    w, h = group["width"].iloc[0], group["height"].iloc[0]
    if pd.isna(w) or pd.isna(h) or int(w) < 1 or int(h) < 1:
        return None
    return int(w), int(h)


def _report_thumb(base: Image.Image | None, group: pd.DataFrame, cfg: Config) -> tuple[bytes, int]:
    """The report's thumbnail of a file from the picture decoded for its features, so the report
    need not decode the file again (pipeline/report.py `thumbs_from_store`): (JPEG bytes,
    report.thumb_size it was made for), or (b"", 0) when the picture cannot give it."""
    if base is None:
        return b"", 0
    from .report import thumb_from_decoded  # (jinja2 and the rest of the report on first use only)
    data = thumb_from_decoded(base, _known_size(group), cfg.report.thumb_size)
    return data, (cfg.report.thumb_size if data else 0)


def rewritten_since_screen(path, rows: pd.DataFrame) -> bool:
    """Was the local file `path` rewritten since the screen read it (`scan.rewritten`; the
    screen's bytes and mtime_ns on `rows`, when they carry them)? An object on a store is not
    asked again (a request per object)."""
    if "mtime_ns" not in rows or storage.is_url(path):
        return False
    return scan.rewritten(path, rows["bytes"].iat[0], rows["mtime_ns"].iat[0])


def features_partition(rows: pd.DataFrame, cfg: Config, out_dir: str, part: int) -> pd.DataFrame:
    """ORB/SIFT features for `rows` (key, abs_path, transform; optional width, height: the image's
    size as the screen recorded it; optional bytes, mtime_ns: the file as the screen saw it) ->
    one feature-store file.

    Each distinct file is decoded once, however many transforms of it are wanted. A decode failure
    is recorded in `error` (no keypoints), never raised; so is a file rewritten since the screen
    read it (`rewritten_since_screen`: its features would be filed under the sha256 of other
    bytes, and a catalog would keep them, or adopt them from a killed run's parts). With `verify.pixel_check` each row also
    carries the image's thumbnail and histogram (`pixel_features`). Each row also carries the
    report's thumbnail of the file (`report_thumb`, `report_thumb_size`: `_report_thumb`, made
    once per file). Returns the small summary key, part_path, n_keypoints, error.
    """
    vcfg = cfg.verify
    out = []
    with _cv_threads(vcfg.opencv_threads):
        for path, group in rows.groupby("abs_path", sort=False):
            base, error = None, None
            try:
                base = _load_bounded(path, cfg, _known_size(group))
            except DecodeError as exc:
                error = str(exc)
            except Exception as exc:  # never let one file kill the partition
                error = f"cannot decode: {type(exc).__name__}: {exc}"
            if rewritten_since_screen(path, group):  # (a failed decode too: a half-written file)
                base, error = None, scan.CHANGED_SINCE_SCREEN
            shown = _report_thumb(base, group, cfg)  # (bytes, size), on each row of the file
            for key, t in zip(group["key"].to_numpy(), group["transform"].to_numpy()):
                if base is None:
                    out.append((int(key), 0, b"", b"", 0, 0, error, b"", b"", 0.0, b"", 0))
                    continue
                turned = dihedral(base, int(t))
                try:
                    f = features(turned, vcfg)
                except cv2.error as exc:  # e.g. a 1 x 4000 sliver: OpenCV's pyramid cannot shrink it
                    out.append((int(key), 0, b"", b"", 0, 0, f"no features: OpenCV: {str(exc).strip()[-120:]}",
                                b"", b"", 0.0, *shown))
                    continue
                pixels = pixel_features(turned) if vcfg.pixel_check else (b"", b"", 0.0)
                out.append((int(key), len(f["keypoints"]), f["keypoints"].tobytes(),
                            f["descriptors"].tobytes(), f["width"], f["height"], None, *pixels, *shown))
    frame = pd.DataFrame(out, columns=["key", "n_keypoints", "keypoints", "descriptors", "width",
                                       "height", "error", "thumb", "hist", "flat", "report_thumb",
                                       "report_thumb_size"])
    frame = frame.astype({"key": "int64", "n_keypoints": "int32", "width": "int32", "height": "int32",
                          "flat": "float32", "report_thumb_size": "int32"})
    # explicit object column: None (not NaN, not pandas' string dtype) where the decode worked
    frame["error"] = pd.Series([r[6] for r in out], index=frame.index, dtype=object)
    part_path = store.write_partition(out_dir, part, frame)
    summary = frame[["key", "n_keypoints", "error"]].copy()
    summary.insert(1, "part_path", part_path)
    return summary


# ---------------------------------------------------------------------------------------------
# Per pair


def _packed(desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ORB descriptors (n,32 uint8) -> the matcher's layouts: (n,4) uint64 rows (query side) and
    the (4,n) uint64 transpose (train side, so the distance loop reads each word contiguously and
    vectorises). 32 bytes per descriptor either way; made once per feature row, not per pair."""
    rows = np.ascontiguousarray(desc, dtype=np.uint8).reshape(-1, 32).view(np.uint64)
    rows = np.require(rows, np.uint64, ["C", "A"])
    return rows, np.ascontiguousarray(rows.T)


def _unpack(row, method: str = "orb") -> dict:
    """A feature-store row -> feature dict; `method` says how the descriptor bytes are laid out
    (ORB: 32 uint8, SIFT: 128 float32 little-endian, as OpenCV gives them)."""
    n = int(row["n_keypoints"]) if pd.notna(row["n_keypoints"]) else 0
    kp = row["keypoints"]
    desc = row["descriptors"]
    dtype, width = DESCRIPTOR[method]
    f = {
        "keypoints": np.frombuffer(kp, np.float32).reshape(-1, 2) if n else np.zeros((0, 2), np.float32),
        "descriptors": np.frombuffer(desc, dtype).reshape(-1, width) if n else np.zeros((0, width), dtype),
        "error": row["error"] if isinstance(row["error"], str) else None,
        # the pixel check's thumbnail, histogram, flatness (empty when verify.pixel_check is off)
        "thumb": row.get("thumb") if isinstance(row.get("thumb"), bytes) else b"",
        "hist": row.get("hist") if isinstance(row.get("hist"), bytes) else b"",
        "flat": float(row.get("flat") or 0.0),
        "width": int(row.get("width") or 0), "height": int(row.get("height") or 0),
    }
    if method == "orb":
        f["d64"], f["d64t"] = _packed(f["descriptors"])
    return f


def _ransac(src: np.ndarray, dst: np.ndarray, cfg: VerifyConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(inlier mask: bool per match, model or None) of the configured geometric model, seeded so
    the result is reproducible.

    Default "affine" (estimateAffine2D), chosen by measurement: inlier separation and pairs/s on
    the generated benchmark (bench/verify.py, all three models side by side in docs/benchmarks.md),
    plus RANSAC alone timed on 30 random pairs of different photos and on the bridge edits
    (one core, OpenCV 5.0):
      - homography: different photos get the most spurious inliers (max 7 vs 5 over 198
        negatives; 8 DOF fit any 4 random matches), and RANSAC on such pairs never reaches its
        confidence, so it runs all iterations: 2.3 ms per negative pair, more than the matching
        itself (1.7 ms) — a candidate set that is mostly negatives would halve pairs/s.
      - similarity (estimateAffinePartial2D): fewest spurious inliers (2-3), 0.05 ms, but it
        cannot model a non-uniform resize: the bridge photo squashed to a square
        (square-128/256/512) falls to 12-14 inliers vs 29-53 with affine/homography.
      - affine: 3-4 spurious inliers, 0.06 ms, and keeps the squashed copies (29-53 inliers).
    Edited copies (crop, resize, small rotation, re-encode, overlay) are affine maps, so the
    homography's extra perspective freedom buys nothing on positives.
    """
    cv2.setRNGSeed(cfg.seed)
    if cfg.model == "homography":
        model, mask = cv2.findHomography(src, dst, cv2.RANSAC, cfg.ransac_threshold,
                                     maxIters=cfg.ransac_max_iters, confidence=cfg.ransac_confidence)
    elif cfg.model == "affine":
        model, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                       ransacReprojThreshold=cfg.ransac_threshold,
                                       maxIters=cfg.ransac_max_iters, confidence=cfg.ransac_confidence)
    else:  # "similarity"
        model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                              ransacReprojThreshold=cfg.ransac_threshold,
                                              maxIters=cfg.ransac_max_iters,
                                              confidence=cfg.ransac_confidence)
    if mask is None:
        return np.zeros(len(src), bool), None
    return mask.reshape(-1).astype(bool), model


def _good_matches(fa: dict, fb: dict, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """2-NN a->b + Lowe ratio test, one-to-one: (query idx, train idx) arrays.

    ORB: a numba Hamming kernel on packed descriptors, ~10x faster than cv2 BFMatcher.knnMatch +
    the Python loop (`_good_matches_reference`, kept as the reference and the benchmark
    baseline), same result. SIFT (float descriptors): cv2 BFMatcher(NORM_L2).knnMatch with the
    same ratio test and one-to-one filter (`_good_matches_reference`; measured 1.2 ms per pair of
    ~300 keypoints, faster than a numpy float64 distance matrix at 4.6 ms)."""
    na, nb = len(fa["descriptors"]), len(fb["descriptors"])
    if na == 0 or nb < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if fa["descriptors"].dtype != np.uint8:
        return _good_matches_reference(fa, fb, ratio)
    a = fa["d64"] if "d64" in fa else _packed(fa["descriptors"])[0]
    bt = fb["d64t"] if "d64t" in fb else _packed(fb["descriptors"])[1]
    from pipeline import hamming
    return hamming.match_descriptors(a, bt, float(ratio))


def _good_matches_reference(fa: dict, fb: dict, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """cv2 BFMatcher.knnMatch (k=2) returning DMatch lists, ratio test and one-to-one in Python:
    the previous ORB matcher (~1.7 ms per pair; tests check `_good_matches` against it) and the
    SIFT matcher (L2 on float descriptors)."""
    da, db = fa["descriptors"], fb["descriptors"]
    if len(da) == 0 or len(db) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    knn = _matcher(cv2.NORM_HAMMING if da.dtype == np.uint8 else cv2.NORM_L2).knnMatch(da, db, k=2)
    q, t, d = [], [], []
    for pair in knn:
        if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance:
            m = pair[0]
            q.append(m.queryIdx)
            t.append(m.trainIdx)
            d.append(m.distance)
    if not q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q, t, d = np.asarray(q), np.asarray(t), np.asarray(d)
    # several a-keypoints may pick the same b-keypoint: keep the closest one (stable: ties keep
    # the lower query index), so a repeated texture cannot inflate the inlier count
    order = np.lexsort((q, d))
    _, first = np.unique(t[order], return_index=True)
    keep = np.sort(order[first])
    return q[keep], t[keep]


def verify_pair(fa: dict, fb: dict, cfg: VerifyConfig) -> tuple[int, int, float, str]:
    """(orb_matches, orb_inliers, orb_score, status) for two feature dicts (`orb_features`)."""
    return _verify(fa, fb, cfg)[:4]


def _geometry(fa: dict, fb: dict, cfg: VerifyConfig, matcher=None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Matches (query idx into a, train idx into b), their RANSAC inlier mask and model."""
    qi, ti = (matcher or _good_matches)(fa, fb, cfg.ratio)
    if len(qi) >= max(cfg.min_good_matches, 4):
        return (qi, ti, *_ransac(fa["keypoints"][qi], fb["keypoints"][ti], cfg))
    return qi, ti, np.zeros(len(qi), bool), None


def pair_evidence(path_a: str, path_b: str, cfg: Config, expect: tuple[int, int] | None = None) -> dict:
    """The verify tier's evidence for one pair of files, recomputed (for the report's drawings).

    Same decode, ORB features, matching and seeded RANSAC as the run, so the counts can equal the
    run's `orb_matches`/`orb_inliers`. The run knows which orientation it matched (a against b
    plain or mirrored, or b against a mirrored); the output does not keep it, so each is tried
    as `stored_evidence` does, the one giving `expect` (the run's numbers) winning, else the one
    with the most inliers (without a's mirrored features, a drawing could show another
    orientation's matches than the numbers beside it). Returns sizes (w, h) of the two pictures
    ORB saw, `keypoints_a`/`keypoints_b` (m x 2 float32, xy of the matched keypoints in those
    pictures, each mapped back to its unmirrored frame), `inlier` (m bool), `matches`,
    `inliers`, `mirrored`. Raises DecodeError when a file cannot be decoded.
    """
    vcfg = cfg.verify
    with _cv_threads(vcfg.opencv_threads):
        base_a, base_b = _load_bounded(path_a, cfg), _load_bounded(path_b, cfg)
        fas = {t: features(dihedral(base_a, t), vcfg) for t in (0, 4)}
        fbs = {t: features(dihedral(base_b, t), vcfg) for t in (0, 4)}
    return stored_evidence(fas, fbs, cfg, expect=expect)


def stored_evidence(fas: dict[int, dict], fbs: dict[int, dict], cfg: Config,
                    expect: tuple[int, int] | None = None) -> dict:
    """`pair_evidence` from features already computed, e.g. the verify tier's own feature rows
    (`_unpack`), so the report draws the run's matches without decoding for ORB again. `fas`,
    `fbs`: each image's features by transform (0 plain, 4 mirrored; what is at hand). Tried: a
    plain against b plain and mirrored, and b plain against a mirrored (the tier pairs images in
    its own order, so the mirrored row may be either one's, and matching is not symmetric). The
    one giving `expect` (the run's orb_matches, orb_inliers: the tier's own orientation) wins,
    else the most inliers. Raises ValueError when no plain row is at hand for either image."""
    vcfg = cfg.verify
    tries = [(fas[0], fbs[t], t, False) for t in (0, 4) if 0 in fas and t in fbs]
    if 0 in fbs and 4 in fas:
        tries.append((fbs[0], fas[4], 4, True))
    if not tries:
        raise ValueError("no plain feature row for either image")
    best = None
    with _cv_threads(vcfg.opencv_threads):
        for fq, ft, t, swapped in tries:
            qi, ti, mask, _ = _geometry(fq, ft, vcfg)
            if expect is not None and (len(qi), int(mask.sum())) == tuple(expect):
                best = (fq, ft, t, swapped, qi, ti, mask)
                break
            if best is None or mask.sum() > best[-1].sum():
                best = (fq, ft, t, swapped, qi, ti, mask)
    fq, ft, t, swapped, qi, ti, mask = best
    xy_q, xy_t = fq["keypoints"][qi], ft["keypoints"][ti].copy()
    if t == 4:  # left-right flip: x -> width - x (keypoint xy are pixel-centre coordinates)
        xy_t[:, 0] = ft["width"] - 1 - xy_t[:, 0]
    if swapped:  # matched b -> mirrored a: back to a on the left
        (fq, xy_q), (ft, xy_t) = (ft, xy_t), (fq, xy_q)
    return {"size_a": (fq["width"], fq["height"]), "size_b": (ft["width"], ft["height"]),
            "keypoints_a": xy_q, "keypoints_b": xy_t, "inlier": mask, "matches": len(qi),
            "inliers": int(mask.sum()), "mirrored": t == 4}


def _verify(fa: dict, fb: dict, cfg: VerifyConfig, matcher=None) -> tuple[int, int, float, str, str]:
    return _verify_model(fa, fb, cfg, matcher)[0]


def _verify_model(fa: dict, fb: dict, cfg: VerifyConfig, matcher=None) -> tuple[tuple, np.ndarray | None]:
    """(orb_matches, orb_inliers, orb_score, status, reason), RANSAC model (None without one)."""
    name = cfg.method  # "orb" or "sift": the reasons say which keypoints spoke
    na, nb = len(fa["keypoints"]), len(fb["keypoints"])
    qi, ti, mask, model = _geometry(fa, fb, cfg, matcher)
    matches = len(qi)
    inliers = int(np.count_nonzero(mask))
    score = float(min(1.0, inliers / min(na, nb))) if min(na, nb) else 0.0
    if min(na, nb) < cfg.min_keypoints:
        which = "a" if na < nb else "b"
        status = "inconclusive"
        reason = (f"{name} inconclusive: {min(na, nb)} keypoints in image {which} (flat or tiny); "
                  f"{inliers} inliers of {matches} matches")
    elif matches >= cfg.chance_min_matches and inliers < cfg.min_inlier_share * matches:
        # many matches, few of them agreeing: repeated shapes (letters, tiles) matched by chance
        status = "no-match"
        reason = (f"{name}: {inliers} inliers of {matches} matches, {inliers / matches:.0%} < verify.min_inlier_share "
                  f"{cfg.min_inlier_share} (chance matches between repeated shapes: text, tiles, patterns)")
    elif inliers >= cfg.match_inliers:
        status, reason = "match", f"{name}: {inliers} inliers of {matches} matches"
        covered = _coverage(fa, fb, qi, ti, mask, model) if cfg.min_coverage > 0 else 1.0
        if covered < cfg.min_coverage:
            status = "partial"
            reason = (f"{name} partial: {inliers} inliers of {matches} matches, but on {covered:.0%} of the "
                      f"pictures' keypoints (< verify.min_coverage {cfg.min_coverage}): a shared banner, frame, "
                      "logo or layout over different pictures?")
        elif cfg.region_mismatch > 0 and score < REGION_MAX_SCORE and fa.get("thumb") and fb.get("thumb"):
            differ = region_mismatch(fa, fb, fa["keypoints"][qi[mask]], fb["keypoints"][ti[mask]], model)
            if differ >= cfg.region_mismatch:
                status = "partial"
                reason = (f"{name} partial: {inliers} inliers of {matches} matches, but {differ:.0%} of the aligned "
                          f"pictures' textured cells disagree (>= verify.region_mismatch {cfg.region_mismatch}): "
                          "a shared banner, frame, logo or layout over different pictures?")
    elif inliers < cfg.reject_inliers:
        status, reason = "no-match", f"{name}: {inliers} inliers of {matches} matches (geometry disagrees)"
    else:
        status = "inconclusive"
        reason = (f"{name} inconclusive: {inliers} inliers of {matches} matches "
                  f"(between {cfg.reject_inliers} and {cfg.match_inliers})")
    return (matches, inliers, score, status, reason), (model if status in ("match", "partial") else None)


def _coverage(fa: dict, fb: dict, qi: np.ndarray, ti: np.ndarray, mask: np.ndarray,
              model: np.ndarray | None) -> float:
    """How much of the pictures a match's geometry explains: on each side, the share of its
    keypoints that fall (through the model) inside the other picture and lie in a cell of a
    COVER_GRID x COVER_GRID grid holding an inlier; the larger of the two sides.

    An edited copy adds things to one side only (a caption, a watermark, a border, a crop's
    missing part), so the other side is covered nearly whole. Two different pictures under the
    same banner, frame, logo or app layout have their own keypoints on both sides, far from the
    inliers on the shared part. Measured on the matches of >= 15 inliers (make eval's sets with
    high-recall candidates; hard negatives built from the photos, bench/templates.py): below 0.6
    (verify.min_coverage) 4 of 2,492 copies, and 306 of 561 template negatives (docs/design-notes.md)."""
    if model is None or not mask.any():
        return 1.0
    m = np.vstack([model, [0, 0, 1]]) if model.shape == (2, 3) else np.asarray(model, np.float64)
    try:
        back = np.linalg.inv(m)
    except np.linalg.LinAlgError:
        return 1.0
    shares = []
    for f, other, to_other, inl in ((fa, fb, m, qi[mask]), (fb, fa, back, ti[mask])):
        xy = f["keypoints"].astype(np.float64)
        mapped = cv2.perspectiveTransform(xy.reshape(-1, 1, 2), to_other).reshape(-1, 2)
        inside = ((mapped[:, 0] >= 0) & (mapped[:, 0] < other["width"]) & (mapped[:, 1] >= 0)
                  & (mapped[:, 1] < other["height"]))
        g = COVER_GRID
        cell = (np.minimum((xy[:, 1] * g / max(1, f["height"])).astype(np.int64), g - 1) * g
                + np.minimum((xy[:, 0] * g / max(1, f["width"])).astype(np.int64), g - 1))
        held = np.zeros(g * g, bool)
        held[cell[inl]] = True
        shares.append(float(held[cell[inside]].mean()) if inside.any() else 0.0)
    return max(shares)


# the region check (`region_mismatch`): cells per side of the grid over the aligned thumbnails, the
# local SSIM below which a pixel disagrees, and the share of a cell that must be inside the overlap
# and textured for the cell to count
REGION_GRID = 8
REGION_SSIM = 0.3
REGION_MIN_INSIDE = 0.5
REGION_MIN_TEXTURED = 0.2
# matches scoring at least this (inliers / the poorer picture's keypoints) are not region-checked:
# the geometry explains most of both pictures (a re-encoded or resized copy scores 0.7-0.9; the
# template negatives measured scored at most 0.57, bench/templates.py), and the check costs ~0.8 ms
# a pair (a homography fit, two warps and SSIM on 128 x 128 thumbnails, AMD EPYC)
REGION_MAX_SCORE = 0.65
REGION_BLUR = 2.0  # (thumbnail pixels: the Gaussian's sigma)


def region_mismatch(fa: dict, fb: dict, src: np.ndarray, dst: np.ndarray, model: np.ndarray | None = None) -> float:
    """Share of the aligned pictures' textured cells whose pixels disagree: a and b's pixel-check
    thumbnails aligned by RANSAC's `model` (a's frame -> b's) and by a homography fitted (least
    squares) to the match's inliers `src` (a's keypoints) -> `dst` (b's), the lower of the two
    kept; local SSIM (`ssim_map`) per pixel, REGION_GRID x REGION_GRID
    cells of a, counted where REGION_MIN_INSIDE of the cell is inside b and REGION_MIN_TEXTURED
    of it has texture on either side (local variance above SSIM's C2); a cell disagrees when its
    mean SSIM is below REGION_SSIM.

    Two different pictures under one banner, logo, frame or app window match on the shared part,
    often with inliers spread enough for `_coverage`, but once aligned the pictures' own part
    disagrees as a whole region. Measured (2026-12-08; ORB matches of >= 15 inliers; bench/
    templates.py's 255 matched negatives, and 448 matched copies of 12 edit kinds of
    bench/edit_types.py: watermarks, stickers, blur, perspective, letterbox, screenshots, collage
    tiles...): negatives median 0.27 (0-0.72; 175 of 255 at >= 0.2), copies 444 of 448 below 0.2
    (a few stickers and collage tiles 0.22-0.26). SSIM is of the thumbnails blurred a little
    (REGION_BLUR), texture too. The homography is refitted to the inliers, not
    taken from RANSAC's affine model alone, which left a skewed copy's corners a few thumbnail
    pixels off (its cells then read as disagreeing: up to 0.64); nor from the homography alone:
    inliers in a narrow band (a chart's plotted lines) let it invent a tilt that misaligns the
    rest (a scanned chart's copy read 0.50 with it, 0.00 with the affine model)."""
    found = []
    if model is not None:  # (a copy aligned by either map agrees: the other is not needed)
        found.append(_region_mismatch_by(fa, fb, model))
        if found[-1] == 0.0:
            return 0.0
    if len(src) >= 4:
        h, _ = cv2.findHomography(src.astype(np.float64), dst.astype(np.float64), 0)
        if h is not None:
            found.append(_region_mismatch_by(fa, fb, h))
    return min(found, default=0.0)


def _region_mismatch_by(fa: dict, fb: dict, h: np.ndarray) -> float:
    """`region_mismatch` of the thumbnails aligned by `h` (2 x 3 or 3 x 3, a's frame -> b's); 0 for a map
    that cannot be used."""
    h = np.asarray(h, np.float64)
    if not np.isfinite(h).all() or (h.shape == (3, 3) and abs(h[2, 2]) < 1e-12):
        return 0.0
    ta, tb = _matched_thumbnails(fa, fb)
    tb, inside = _warped_onto_a(tb, _thumbnail_warp(fa, fb, h))
    inside = inside.astype(bool)
    # SSIM of the thumbnails blurred a little (REGION_BLUR): a pixel or two of misalignment on thin lines
    # (a resized chart, a skewed copy) is then no difference, where the two pictures' own textures
    # still differ (a chart's copy resized to 75 % read as 0.2-0.3 of its cells disagreeing unblurred)
    local, vx, vy = _ssim_parts(cv2.GaussianBlur(ta.astype(np.float64), (0, 0), REGION_BLUR),
                                cv2.GaussianBlur(tb.astype(np.float64), (0, 0), REGION_BLUR))
    textured = (vx > SSIM_C2) | (vy > SSIM_C2)
    side = PIXEL_SIDE
    c = side // REGION_GRID
    shape = (REGION_GRID, c, REGION_GRID, c)
    inside_share = inside.reshape(shape).mean(axis=(1, 3))
    textured_share = (textured & inside).reshape(shape).sum(axis=(1, 3)) / (c * c)
    ssim_sum = np.where(inside, local, 0.0).reshape(shape).sum(axis=(1, 3))
    counted = (inside_share >= REGION_MIN_INSIDE) & (textured_share >= REGION_MIN_TEXTURED)
    if not counted.any():
        return 0.0
    cell_ssim = ssim_sum[counted] / (inside_share[counted] * c * c)
    return float(np.mean(cell_ssim < REGION_SSIM))


def _error_result(side: str, error: str, method: str = "orb") -> tuple:
    return 0, 0, 0.0, "inconclusive", f"{method} inconclusive: image {side} not decoded ({error})", np.nan, np.nan


PLAIN_NOTE = "; b unmirrored (the hash's orientation was mirrored)"
_STATUS_RANK = {"no-match": 0, "inconclusive": 1, "partial": 2, "match": 3}


def check_pair(fa: dict, fb: dict, transform: int, cfg: VerifyConfig, fb_plain: dict | None = None,
               matcher=None, both_ways: bool = False) -> tuple:
    """RESULT_COLUMNS for one pair: keypoints of a (plain) against b turned for `transform`
    (`fb`), then the pixel check when the keypoints cannot settle the pair.

    A mirrored transform (>= 4) is the screen's guess: the hash of b's flipped picture was the
    closest, which a nearly symmetric picture can give by chance, and ORB descriptors do not match
    across a mirror. So when that check is not a match and b's plain features (`fb_plain`) are
    given, a plain against b plain is tried too, and kept only when it is a match (with
    `both_ways`, a pair checked mirrored first on purpose, `checked_transforms`: when its verdict
    is better, inconclusive against no-match too); the reason then says b was unmirrored. Only a
    match: on the 10k benchmark ~600 mirrored pairs found a few more noise inliers unmirrored
    (3-4 against 0-1) and none of those changed a verdict, while a flat mirrored logo (no match
    either way, the pixel check decides) must keep the screen's alignment. The pixel check uses
    the orientation kept: its RANSAC model when there is one, else its turn; in decode.DIHEDRAL's
    numbering every mirrored t is the left-right flip followed by the rotation t - 4 (4 = flip,
    5 = flip then rot90, ...), so dropping the flip leaves turn t - 4 of b's plain picture."""
    result, model = _verify_model(fa, fb, cfg, matcher)
    turn = int(transform)
    if (fb_plain is not None and not fb_plain["error"] and turn >= 4 and result[3] != "match"):
        plain, plain_model = _verify_model(fa, fb_plain, cfg, matcher)
        # (a pair checked `both_ways`, whose mirrored check is no screen's guess, keeps a better
        # plain verdict, inconclusive against no-match too, which sends it on to the confirm tier;
        # a hash pair only a match: a few noise inliers unmirrored, 6 of 14, made a false pair of
        # the fast preset, which accepts an inconclusive pair on its hash distance)
        if plain[3] == "match" or (both_ways and _STATUS_RANK[plain[3]] > _STATUS_RANK[result[3]]):
            result, model, fb, turn = plain[:4] + (plain[4] + PLAIN_NOTE,), plain_model, fb_plain, turn - 4
    pixels = (np.nan, np.nan)
    if needs_pixel_check(fa, fb, cfg):
        pixels = pixel_check(fa, fb, turn, model, cfg.blank_max_shift, cfg.blank_min_hist_corr)
    elif semi_flat_undecided(fa, fb, cfg, result[3]):
        # only pixels that disagree outright decide (different); a copy resized to a third
        # blurs a line chart's thin lines (SSIM 0.47-0.68) and stays with the cascade
        ssim, hist = pixel_check(fa, fb, turn, model, cfg.blank_max_shift, cfg.blank_min_hist_corr)
        if ssim < cfg.semi_flat_ssim:
            pixels = ssim, hist
    return result + pixels


def needs_pixel_check(fa: dict, fb: dict, cfg: VerifyConfig) -> bool:
    """The keypoints cannot settle this pair: too few of them on either image, or both images
    flat (their keypoints sit on shared shapes and layout, see the module doc)."""
    if not _has_pixels(fa, fb, cfg):
        return False
    few = min(len(fa["keypoints"]), len(fb["keypoints"])) < cfg.min_keypoints
    return few or min(fa["flat"], fb["flat"]) >= FLAT_SHARE


def _has_pixels(fa: dict, fb: dict, cfg: VerifyConfig) -> bool:
    """The pixel check is on and both feature rows carry its thumbnail."""
    return bool(cfg.pixel_check and fa["thumb"] and fb["thumb"])


def semi_flat_undecided(fa: dict, fb: dict, cfg: VerifyConfig, status: str) -> bool:
    """Both images mostly flat (`verify.semi_flat_share`: charts, diagrams, maps) and ORB left the
    pair undecided (inconclusive or partial: a few chance inliers), which would leave it to an
    embedding that sees "a chart" in both: their pixels are compared, and decide when they
    disagree outright (SSIM < `verify.semi_flat_ssim`)."""
    return (cfg.semi_flat_share > 0 and status in ("inconclusive", "partial") and _has_pixels(fa, fb, cfg)
            and min(fa["flat"], fb["flat"]) >= cfg.semi_flat_share)


def _result_frame(results: list[tuple], index) -> pd.DataFrame:
    frame = pd.DataFrame(results, columns=RESULT_COLUMNS, index=index)
    return frame.astype(RESULT_DTYPES)


def _sub_batches(paths_a: np.ndarray, paths_b: np.ndarray, max_parts: int,
                 paths_b0: np.ndarray | None = None) -> list[np.ndarray]:
    """Positions of the pairs grouped so each group touches at most `max_parts` feature files
    (pairs sorted by their file pair first), so a task never loads every partition at once.
    `paths_b0`: the file of b's plain row for the mirrored pairs ("" when not needed; it is
    almost always b's own file: an image's transforms are computed in one task)."""
    order = np.lexsort((paths_b, paths_a))
    groups, current, parts = [], [], set()
    for i in order:
        wanted = {paths_a[i], paths_b[i]} | ({paths_b0[i]} if paths_b0 is not None and paths_b0[i] else set())
        need = wanted - parts
        if current and len(parts) + len(need) > max_parts:
            groups.append(np.asarray(current))
            current, parts = [], set()
            need = wanted
        current.append(i)
        parts |= need
    if current:
        groups.append(np.asarray(current))
    return groups


def _features_task(part: int, rows: pd.DataFrame, cfg: Config, out_dir: str) -> pd.DataFrame:
    return features_partition(rows, cfg, out_dir, part)


def _both_ways(pairs: pd.DataFrame) -> np.ndarray:
    """The pairs' optional `both_ways` column (`checked_transforms`), False where it is absent."""
    return pairs["both_ways"].to_numpy(bool) if "both_ways" in pairs else np.zeros(len(pairs), bool)


def checked_transforms(transform, both_ways=None) -> np.ndarray:
    """The transform each pair is checked with (int64): its own, or for a pair marked `both_ways`
    (high-recall mode's embedding-only pairs, whose hash says nothing of a mirror: its distances
    are large every way round) its rotation mirrored, t % 4 + 4, which `check_pair` checks
    mirrored, then plain, keeping the better verdict. Mirrored 60 % crops of 20 photos: 1 found
    when checked plain only, 19 both ways; their 20 unmirrored crops 20 either way. The pair's
    own transform stays what the later tiers and the catalog key it by."""
    t = np.asarray(transform, dtype=np.int64)
    if both_ways is None:
        return t
    return np.where(np.asarray(both_ways, dtype=bool), t % 4 + 4, t)


# A pair's stored ORB evidence is keyed by how it was checked, not only by its transform: a pair
# checked both ways (mirrored, then plain) and one checked plain only can share transform 0, and
# a high-recall run's embedding-only pair is a hash pair at the next run once its K nearest move.
BOTH_WAYS_KEY = 8


def evidence_transforms(transform, both_ways=None) -> np.ndarray:
    """The catalog's key for each pair's evidence (int64): its transform, + BOTH_WAYS_KEY for a
    pair checked both ways (`checked_transforms`)."""
    t = np.asarray(transform, dtype=np.int64)
    if both_ways is None:
        return t
    return t + BOTH_WAYS_KEY * np.asarray(both_ways, dtype=bool)


def evidence_parts(key) -> tuple[np.ndarray, np.ndarray]:
    """`evidence_transforms` undone: (transform, both_ways) per stored key."""
    key = np.asarray(key, dtype=np.int64)
    return key % BOTH_WAYS_KEY, key >= BOTH_WAYS_KEY


def other_way(key) -> np.ndarray:
    """The key of the same pair and transform checked the other way (both ways <-> plain)."""
    transform, both_ways = evidence_parts(key)
    return evidence_transforms(transform, ~both_ways)


def _feature_transform_b(transform) -> np.ndarray:
    """The transform of b's features a pair is checked with: 0 or 4 (flipped). ORB descriptors are
    steered to each keypoint's orientation and the affine RANSAC model rotates, so a rotated copy
    (t = 1-3) matches the plain features; only mirroring changes the descriptors, and every
    mirrored transform (4-7) is a left-right flip plus a rotation. So at most two feature sets per
    image: plain and flipped."""
    return np.where(np.asarray(transform, dtype=np.int64) >= 4, 4, 0)


def pair_feature_keys(idx_a, idx_b, transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The feature keys each pair (image indices, the pair's transform) is checked with: a plain,
    b as `_feature_transform_b` says, and b plain for a mirrored pair (`check_pair` also tries it
    unmirrored; -1 for the others)."""
    t_b = _feature_transform_b(transform)
    return (feature_key(idx_a, 0), feature_key(idx_b, t_b),
            np.where(t_b == 4, feature_key(idx_b, 0), -1))


def needed_features(ids_a, ids_b, transform) -> tuple[np.ndarray, np.ndarray]:
    """(image id, feature transform) of every feature row the pairs need, repeats included:
    a plain, b plain or flipped (4) as the pair's transform says, and b plain again for the
    mirrored pairs (`check_pair` also tries them unmirrored). Ids may be indices or sha256s."""
    t_b = _feature_transform_b(transform)
    ids_b = np.asarray(ids_b)
    mirrored = ids_b[t_b == 4]
    return (np.concatenate([np.asarray(ids_a), ids_b, mirrored]),
            np.concatenate([np.zeros(len(t_b), np.int64), t_b, np.zeros(len(mirrored), np.int64)]))


# verify_partition's input: a pair's feature keys (`pair_feature_keys`) and their part files, its
# transform, each image's upstream error (None when it has none), and whether it is checked both
# ways round (`checked_transforms`)
JOB_COLUMNS = ("key_a", "key_b", "transform", "path_a_part", "path_b_part", "key_b0", "path_b0_part",
               "error_a", "error_b", "both_ways")


def job_frame(key_a, key_b, key_b0, transform, parts, error_a, error_b, index, both_ways) -> pd.DataFrame:
    """`verify_partition`'s input (JOB_COLUMNS) from the pairs' feature keys (`pair_feature_keys`),
    `parts` (keys -> each key's part file, None where it has none) and each side's upstream error,
    indexed by `index` (the values are taken in order, not aligned on their own indexes)."""
    frame = pd.DataFrame({"key_a": key_a, "key_b": key_b, "transform": transform,
                          "path_a_part": parts(key_a), "path_b_part": parts(key_b), "key_b0": key_b0,
                          "path_b0_part": parts(key_b0), "error_a": error_a, "error_b": error_b,
                          "both_ways": np.asarray(both_ways, dtype=bool)})
    frame.index = index
    return frame


def pair_job(pairs: pd.DataFrame, part_of, error_a=None, error_b=None) -> pd.DataFrame:
    """`verify_partition`'s input for pairs (idx_a, idx_b, transform; optional both_ways) whose
    feature rows are in the part files `part_of` names (a mapping key -> part file; a key it lacks
    has none), indexed like `pairs`. For callers of the partition function itself (tests,
    benchmarks); `run_verify` makes the same frames for its tasks (`_PairTasks`)."""
    both_ways = _both_ways(pairs)
    transform = checked_transforms(pairs["transform"], both_ways)
    ka, kb, kb0 = pair_feature_keys(pairs["idx_a"].to_numpy(np.int64), pairs["idx_b"].to_numpy(np.int64), transform)

    def parts(keys) -> np.ndarray:
        return np.array([part_of.get(int(k)) if k >= 0 else None for k in keys], dtype=object)
    none = np.full(len(pairs), None, dtype=object)
    return job_frame(ka, kb, kb0, transform, parts,
                     none if error_a is None else np.asarray(error_a, dtype=object),
                     none if error_b is None else np.asarray(error_b, dtype=object), pairs.index, both_ways)


def verify_partition(pairs: pd.DataFrame, cfg: Config, reference: bool = False) -> pd.DataFrame:
    """Verify pairs (JOB_COLUMNS, e.g. `pair_job`) -> RESULT_COLUMNS, same row order
    (`transform`: the pixel check's alignment and, when >= 4, the unmirrored retry with b's plain
    row, key_b0 and path_b0_part: -1 / null for the other pairs, see `check_pair`).

    A key whose path is empty/null (image not decoded upstream: its error_a / error_b says why) or
    whose feature row carries an error gives an "inconclusive" row with the reason.
    `reference=True` matches with the previous cv2 BFMatcher path (`_good_matches_reference`; same
    numbers, slower: benchmark baseline).
    """
    # every column is required: a default filled in here (no transform, no plain row for a
    # mirrored pair, no upstream error) would change the numbers stored for the pairs, and the
    # code that makes these frames is not in the stored results' fingerprint (NOT_FINGERPRINTED)
    missing = [c for c in JOB_COLUMNS if c not in pairs]
    if missing:
        raise ValueError(f"verify_partition: the pairs lack {missing} (see pair_job)")
    matcher = _good_matches_reference if reference else _good_matches
    vcfg = cfg.verify
    n = len(pairs)
    results: list[tuple | None] = [None] * n
    ka = pairs["key_a"].to_numpy(np.int64)
    kb = pairs["key_b"].to_numpy(np.int64)
    pa = pairs["path_a_part"].fillna("").astype(str).to_numpy()
    pb = pairs["path_b_part"].fillna("").astype(str).to_numpy()
    err_a = pairs["error_a"].to_numpy()
    err_b = pairs["error_b"].to_numpy()
    tr = pairs["transform"].to_numpy(np.int64)
    both = pairs["both_ways"].to_numpy(bool)
    # b's plain row for the mirrored pairs (-1 / "" for the others)
    kb0 = pairs["key_b0"].to_numpy(np.int64)
    pb0 = np.where(kb0 >= 0, pairs["path_b0_part"].fillna("").astype(str).to_numpy(), "")
    todo = []
    for i in range(n):
        if not pa[i] or not pb[i]:
            side, e = ("a", err_a[i]) if not pa[i] else ("b", err_b[i])
            results[i] = _error_result(side, e if isinstance(e, str) else "no features", vcfg.method)
        else:
            todo.append(i)
    todo = np.asarray(todo, dtype=np.int64)
    with _cv_threads(vcfg.opencv_threads):
        if len(todo):
            for group in _sub_batches(pa[todo], pb[todo], max(2, vcfg.max_open_partitions), pb0[todo]):
                idx = todo[group]
                plain = idx[pb0[idx] != ""]
                # (each key from its own part: a failure made again is in its old part too)
                rows = store.read_keys(np.concatenate([ka[idx], kb[idx], kb0[plain]]),
                                       np.concatenate([pa[idx], pb[idx], pb0[plain]]))
                feats = {}
                for key, row in zip(rows.index.to_numpy(), rows.to_dict("records")):
                    feats[int(key)] = _unpack(row, vcfg.method)
                    feats[int(key)]["transform"] = int(key) % 8  # the turn this row's image has
                for i in idx:
                    fa, fb = feats[int(ka[i])], feats[int(kb[i])]
                    if fa["error"] or fb["error"]:
                        side, e = ("a", fa["error"]) if fa["error"] else ("b", fb["error"])
                        results[i] = _error_result(side, e, vcfg.method)
                    else:
                        fb0 = feats.get(int(kb0[i])) if pb0[i] else None
                        results[i] = check_pair(fa, fb, tr[i], vcfg, fb0, matcher, both_ways=both[i])
    return _result_frame(results, pairs.index)


# the result columns sent back as categories (codes and the distinct texts) by `_verify_task`
TEXT_COLUMNS = ("orb_status", "orb_reason")


def _verify_task(pairs: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """`verify_partition` as a Dask task: its status and reason texts travel as categories, so
    the driver unpickles a few thousand distinct strings, not one per pair (~170 B a pair, ~85 MB
    at 100k files; freed at once, most of it stayed in the driver's RSS)."""
    out = verify_partition(pairs, cfg)
    for column in TEXT_COLUMNS:
        out[column] = out[column].astype("category")
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration





def run_verify(pairs: pd.DataFrame, images: pd.DataFrame, cfg: Config, work_dir: str,
               client=None, progress: Progress | None = None, precomputed=None) -> pd.DataFrame:
    """ORB-verify candidate pairs (idx_a, idx_b, transform; optional both_ways, `checked_transforms`)
    -> RESULT_COLUMNS aligned with `pairs`.

    `images` is indexed by idx with abs_path and error. Features are computed once per needed
    (image, transform) key in tasks of `dask.partition_size` images, then pairs are verified in tasks of `dask.pairs_per_task`. With `client`
    (a dask.distributed Client) tasks run on the cluster, else in this process. Feature files go
    to a new folder `work_dir/orb-<random>` (removed with the work dir by the caller). `progress`
    shows two stages: "features" (images) and "verify" (pairs), advanced per finished task.

    `precomputed`: features already in a store (a Series key -> part_path, e.g. the catalog's);
    those keys are not computed again. `features_made(result)` gives the summary (key, part_path,
    n_keypoints, error) of the features computed by this call.
    """
    if len(pairs) == 0:
        return _result_frame([], pairs.index)
    # a fresh folder per call: the worker-side partition cache is keyed by file path, so a second
    # run in the same process must never see the previous run's part-000000.parquet
    out_dir = storage.join(work_dir, f"orb-{uuid.uuid4().hex[:12]}")
    idx_a = pairs["idx_a"].to_numpy(np.int64)
    idx_b = pairs["idx_b"].to_numpy(np.int64)
    both_ways = _both_ways(pairs)
    transform = checked_transforms(pairs["transform"], both_ways)
    key_a, key_b, key_b0 = pair_feature_keys(idx_a, idx_b, transform)

    # which (image, transform) keys are needed, skipping images that failed upstream
    err = images["error"] if "error" in images else pd.Series(None, index=images.index, dtype=object)
    bad = set(images.index[err.notna()].tolist())
    need_idx, need_t = needed_features(idx_a, idx_b, transform)
    keys = pd.DataFrame({"idx": need_idx, "transform": need_t}).drop_duplicates()
    keys = keys[~keys["idx"].isin(bad)]
    keys["key"] = feature_key(keys["idx"], keys["transform"])
    # (as the images' own arrays: `to_numpy()` made a Python string per key, ~0.1 kB each, and of
    # nullable sizes a Python int, held through the features stage as the tasks' results came in)
    keys["abs_path"] = images.loc[keys["idx"], "abs_path"].array
    # the screen's sizes (the feature task need not open the file for them) and the file as it saw it
    for col in ("width", "height", "bytes", "mtime_ns"):
        if col in images:
            keys[col] = images.loc[keys["idx"], col].array
    keys["transform"] = keys["transform"].astype("int8")
    known = pd.Series(dtype=object)
    if precomputed is not None and len(precomputed):
        known = pd.Series(precomputed, dtype=object)
        known.index = known.index.astype(np.int64)
        known = known[known.index.isin(keys["key"].to_numpy())]
        keys = keys[~keys["key"].isin(known.index)]

    # feature tasks: partition_size images each (all transforms of an image in the same task), the
    # images in the order of `images` (path order), so each task covers a range of its rows: the
    # grouping a task per block of image rows can make without seeing the whole pair graph
    # (docs/design-notes.md, the plan's step 2). Grouping by connected components of the pair
    # graph instead saved <1 % of the verify tasks' part-file reads at 100k files (9,738 against
    # 9,827) and 9 % at 10k (625 against 687), for a label propagation over every pair here.
    rows, rank = np.unique(images.index.get_indexer(keys["idx"].to_numpy()), return_inverse=True)
    keys["chunk"] = rank // cfg.dask.partition_size  # (rank: the image's among the needed, by row)
    firsts = rows[::cfg.dask.partition_size]  # (each task's first image row)
    keys = keys.sort_values(["chunk", "idx", "transform"], kind="stable")
    columns = [c for c in ("key", "abs_path", "transform", "width", "height", "bytes", "mtime_ns") if c in keys]
    chunks = [g[columns].reset_index(drop=True) for _, g in keys.groupby("chunk", sort=True)]
    stage = stage_of(progress)
    with stage("features", total=int(keys["idx"].nunique()), unit="img") as tracker:
        summaries = map_tasks(client, _features_task, list(enumerate(chunks)), cfg, out_dir, star=True,
                              tracker=tracker, weight=lambda task: int(task[1]["key"].floordiv(8).nunique()))
    # each key's part: the task whose range of rows holds its image (a number and a path per
    # task, not an entry per key; the ids' rows come from the images' index, which a task made
    # from a pair block, whose pairs are rows already, would not need)
    part_of = store.RangeParts(images.index, firsts, [s["part_path"].iat[0] for s in summaries], known,
                               none=err.notna().to_numpy())
    summary = (pd.concat(summaries, ignore_index=True) if summaries
               else pd.DataFrame(columns=["key", "part_path", "n_keypoints", "error"]))
    del keys, chunks, summaries, rank, rows  # (the feature tasks' file lists: not needed past here)

    # pair tasks, runs of the pairs in their own order, each made only as it is sent (`_PairTasks`)
    tasks = _PairTasks(transform, key_a, key_b, key_b0, part_of, err,
                       cfg.dask.pairs_per_task, both_ways)
    collected = _Collected(len(pairs))
    with stage("verify", total=len(pairs), unit="pair") as tracker:
        map_tasks(client, _verify_task, tasks, cfg, tracker=tracker, weight=len,
                  each=lambda _, result: collected.add(result), in_flight=tasks_in_flight(client))
    del tasks
    result = collected.frame(pairs.index)
    result.attrs["features"] = FeaturesMade(summary)
    return result


class FeaturesMade:
    """The features a `run_verify` call computed (a frame: key, part_path, n_keypoints, error), in
    its result's attrs["features"]: take it with `features_made`. pandas deep-copies attrs into
    every frame or column made from the result (a column taken from a 100k-file run's scores
    copied lists of every feature row, ~0.3 s each time) and compares them by value; this holder
    is neither copied nor compared by value."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    def __deepcopy__(self, memo) -> "FeaturesMade":
        return self


def features_made(result: pd.DataFrame) -> pd.DataFrame:
    """The features `run_verify` computed for `result` (taken out of its attrs), or none."""
    made = result.attrs.pop("features", None)
    return made.frame if made is not None else pd.DataFrame({"key": np.zeros(0, np.int64),
                                                             "part_path": pd.Series(dtype=object),
                                                             "n_keypoints": np.zeros(0, np.int32),
                                                             "error": pd.Series(dtype=object)})


class _PairTasks:
    """The verify tier's tasks, each a frame of `step` pairs (key_a, key_b, transform, the part
    files of their feature rows, key_b0 and its part, error_a, error_b; indexed by the pairs'
    positions), runs of the pairs in their own order ((idx_a, idx_b) from the candidate search),
    made when indexed. As the feature tasks take images in row order, a run of pairs reads the
    parts of its consecutive a's and of its b's wherever they are, as a task over one block of
    pairs would (docs/design-notes.md, step 2); tasks of the pairs sorted by their part files
    loaded 7 % more row groups (simulated over the 10k and 100k runs' pairs, each worker's cache
    included). `map_tasks(in_flight=...)` indexes each as it is sent, so the driver holds the
    frames of the tasks in flight only: a frame of every pair and its sorted copy were ~90 B a pair
    each, the verify stage's largest item (+~70 MB at 100k files). A task's parts and errors come
    from what is O(feature tasks + failed images), not a map per key or image: the feature tasks'
    ranges (`store.RangeParts`) and the upstream errors. Here the ids' rows are found through the
    images' index (O(images)); a task built on a worker from a pair block has its pairs' rows
    already, and with a catalog would need each row's content id too (docs/design-notes.md,
    step 2)."""

    def __init__(self, transform: np.ndarray, key_a: np.ndarray, key_b: np.ndarray, key_b0: np.ndarray,
                 parts: store.RangeParts, error: pd.Series, step: int, both_ways: np.ndarray):
        self.transform, self.key_a, self.key_b, self.key_b0 = transform, key_a, key_b, key_b0
        self.both_ways = both_ways
        self.step, self.parts = max(1, int(step)), parts
        self.error = error[error.notna()]  # (the images that failed upstream only: few)
        # (their texts, then None for a key not among them: made once, not for each task)
        self._error_texts = np.append(self.error.to_numpy(dtype=object), None)

    def __len__(self) -> int:
        return -(-len(self.key_a) // self.step)

    def _errors(self, keys: np.ndarray) -> pd.Series:
        """The upstream error of each key's image (None where it has none)."""
        found = self.error.index.get_indexer(keys // 8)
        return pd.Series(self._error_texts.take(found), dtype=object)

    def __getitem__(self, n: int) -> pd.DataFrame:
        if not 0 <= n < len(self):
            raise IndexError(n)
        rows = slice(n * self.step, (n + 1) * self.step)
        ka, kb, kb0 = self.key_a[rows], self.key_b[rows], self.key_b0[rows]
        # (indexed by the pairs' positions: _Collected puts the results there)
        return job_frame(ka, kb, kb0, self.transform[rows], self.parts.paths, self._errors(ka), self._errors(kb),
                         np.arange(rows.start, rows.start + len(ka), dtype=np.int64), self.both_ways[rows])


class _Collected:
    """The verify tasks' results copied into one array per column, at their pairs' positions, as
    each task ends: the driver never holds the tasks' own frames all at once, nor their
    concatenation and its sorted copy (~60 B a pair each). The status and reason texts, which
    come as categories (`_verify_task`), point at one Python string per distinct text over all
    tasks."""

    NUMBERS = [c for c in RESULT_COLUMNS if c not in TEXT_COLUMNS]

    def __init__(self, n: int):
        self.columns = {c: np.zeros(n, RESULT_DTYPES[c]) for c in self.NUMBERS}
        self.columns.update({c: np.full(n, None, dtype=object) for c in TEXT_COLUMNS})
        self._texts: dict[str, str] = {}

    def add(self, result: pd.DataFrame) -> None:
        at = result.index.to_numpy(np.int64)  # (rows of the job: positions of the pairs)
        for column in self.NUMBERS:
            self.columns[column][at] = result[column].to_numpy()
        for column in TEXT_COLUMNS:
            texts = result[column].array
            shared = np.array([self._texts.setdefault(t, t) for t in texts.categories] + [None], dtype=object)
            self.columns[column][at] = shared.take(texts.codes)  # (code -1, none: the last, None)

    def frame(self, index) -> pd.DataFrame:
        # (texts as object columns: pandas would make Arrow text of an object array of strings)
        return pd.DataFrame({c: pd.Series(self.columns[c], index=index, dtype=object, copy=False)
                             if c in TEXT_COLUMNS else self.columns[c] for c in RESULT_COLUMNS}, index=index, copy=False)
