"""Where the picture sits inside an image: the box without uniform borders or a UI frame.

The screen hashes this box beside the whole image (hash variant 8) and the confirm tier embeds
it, so a letterboxed, pillarboxed or screenshotted copy meets its original. Both detectors look
at a copy of at most PROBE pixels:

* uniform borders (`uniform_box`): edge rows/columns whose pixels (>= 90 % of them) lie within
  `tolerance` of the line's median colour: bars, mattes, plain margins;
* a UI frame (`frame_box`): the photo shown inside a window (title bar, thumbnail panel, status
  bar, toolbar text...): a rectangle whose four sides are straight edges, the sides ending at the
  corners, with mostly flat surroundings. A uniform test cannot see it: the frame's lines cross
  text, buttons and panels.

`content_box` looks for a frame, then for uniform borders inside it (a letterboxed photo inside
a window, a product shot on white shown in a viewer), so a copy and its original are cut to the
same picture.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PROBE = 128  # the detectors run on a copy at most this large (the size the screen hashes at)

# UI frame detection, calibrated on generated screenshots (light and dark chrome, PNG and JPEG)
# against the unframed photos (docs/design-notes.md, "screenshots").
EDGE_STEP = 20  # a 2-pixel step of more than this (any channel) is an edge pixel
MIN_SIDE = 0.3  # the framed photo spans at least this fraction of the width and of the height
CANDIDATE_SIDE = 0.15  # lines with fewer edge pixels than this fraction are not side candidates
MAX_CANDIDATES = 14  # strongest candidate lines per axis (rectangles tried: at most this ** 4)
MIN_MEAN_COVER = 0.8  # mean over the 4 sides of the fraction of the side lying on an edge
MIN_SIDE_COVER = 0.3  # the weakest side (a light sky against light chrome leaves gaps)
AREA_WEIGHT = 0.2  # score = mean cover + this x area fraction (0.1-0.3 measure alike)
MAX_OVERSHOOT = 0.5  # a side's edge must stop at the corner: coverage just past it
OVERSHOOT_GAP, OVERSHOOT_LEN = 2, 10  # ... measured past the corner's blur, over this many pixels
MIN_FLAT_OUTSIDE = 0.55  # the surroundings are chrome: this fraction of them is flat
MIN_FLAT_RING = 0.5  # ... and so is the outer ring of the image (a cheap first test)
MARGIN = 2  # a frame has chrome on every side: sides this close to the edge are not candidates


def uniform_box(a: np.ndarray, tolerance: int, min_keep: float = 0.3) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of `a` (h, w, 3 int16) inside uniform borders, or None.

    None when there is no border (less than 2 % on every side) or when the image is mostly
    uniform (a blank image has nothing meaningful to trim to).
    """
    h, w = a.shape[:2]
    if h < 8 or w < 8:
        return None
    top = _leading_uniform(a, tolerance)
    if top == h:
        return None
    bottom = h - _leading_uniform(a[::-1], tolerance)
    cols = a.transpose(1, 0, 2)
    left = _leading_uniform(cols, tolerance)
    right = w - _leading_uniform(cols[::-1], tolerance)
    if bottom - top < min_keep * h or right - left < min_keep * w:
        return None
    if max(top, h - bottom) < 0.02 * h and max(left, w - right) < 0.02 * w:
        return None
    return left, top, right, bottom


def _leading_uniform(lines: np.ndarray, tolerance: int) -> int:
    """How many of `lines` (n, length, 3), from the first on, are uniform (most photos: none, so
    the lines are tested in growing chunks rather than all at once)."""
    start, step = 0, 4
    while start < len(lines):
        chunk = lines[start:start + step]
        med = np.median(chunk, axis=1, keepdims=True)
        uniform = (np.abs(chunk - med) <= tolerance).all(axis=2).mean(axis=1) >= 0.9
        if not uniform.all():
            return start + int(np.argmin(uniform))
        start, step = start + step, step * 2
    return len(lines)


def _strongest_lines(strength: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n strongest local maxima of a line-strength profile, ascending."""
    peak = np.ones(strength.shape, bool)
    peak[1:] &= strength[1:] >= strength[:-1]
    peak[:-1] &= strength[:-1] > strength[1:]
    idx = np.flatnonzero(peak & (strength > 0))
    return np.sort(idx[np.argsort(-strength[idx], kind="stable")][:n])


def _step(planes: np.ndarray, gap: int, axis: int) -> np.ndarray:
    """Largest channel difference between pixels `gap` apart along `axis` of (3, h, w) planes."""
    far = planes[:, gap:] if axis == 1 else planes[:, :, gap:]
    near = planes[:, :-gap] if axis == 1 else planes[:, :, :-gap]
    d = np.abs(far - near)
    return np.maximum(np.maximum(d[0], d[1]), d[2])


def frame_box(a: np.ndarray, tolerance: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of a photo shown inside a UI frame in `a` (h, w, 3 int16), or None.

    Candidate sides are the rows/columns with the most edge pixels; every rectangle of four
    candidates is scored at once from prefix sums (coverage of each side, and of each side's
    continuation past its corners). The valid rectangle with the best coverage and area wins,
    if the pixels around it are mostly flat (steps between neighbours within `tolerance`).
    """
    h, w = a.shape[:2]
    if h < 16 or w < 16:
        return None
    planes = np.ascontiguousarray(a.transpose(2, 0, 1))  # per channel: the steps below are plane ops
    busy = np.zeros((h, w), bool)  # a step to the next pixel beyond `tolerance`: not flat
    busy[:, 1:] |= _step(planes, 1, 2) > tolerance
    busy[1:] |= _step(planes, 1, 1) > tolerance
    ring = np.ones((h, w), bool)
    ring[MARGIN + 1:-MARGIN - 1, MARGIN + 1:-MARGIN - 1] = False
    if 1.0 - busy[ring].mean() < MIN_FLAT_RING:
        return None  # photo texture runs up to the edge: no frame around it (a fifth of photos stop here)
    eh = np.zeros((h, w), bool)  # eh[y, x]: a step across row y (between rows y-1 and y+1)
    eh[1:-1] = _step(planes, 2, 1) > EDGE_STEP
    ev = np.zeros((h, w), bool)
    ev[:, 1:-1] = _step(planes, 2, 2) > EDGE_STEP
    row_strength, col_strength = eh.sum(axis=1), ev.sum(axis=0)
    for s in (row_strength, col_strength):
        s[:MARGIN + 1] = 0
        s[-MARGIN - 1:] = 0
    ys = _strongest_lines(np.where(row_strength >= CANDIDATE_SIDE * w, row_strength, 0), MAX_CANDIDATES)
    xs = _strongest_lines(np.where(col_strength >= CANDIDATE_SIDE * h, col_strength, 0), MAX_CANDIDATES)
    if len(ys) < 2 or len(xs) < 2:
        return None
    # prefix sums along each candidate line: H[i, x] = edge pixels of row ys[i] left of x
    H = np.concatenate([np.zeros((len(ys), 1), np.int32), np.cumsum(eh[ys], axis=1, dtype=np.int32)], axis=1)
    V = np.concatenate([np.zeros((len(xs), 1), np.int32), np.cumsum(ev[:, xs].T, axis=1, dtype=np.int32)], axis=1)
    span_x = (xs[None, :] - xs[:, None]).astype(float)  # [left, right]
    span_y = (ys[None, :] - ys[:, None]).astype(float)  # [top, bottom]
    # (pairs with right <= left or bottom <= top divide by inf: coverage 0, never valid)
    h_cover = (H[:, xs][:, None, :] - H[:, xs][:, :, None]) / np.where(span_x > 0, span_x, np.inf)  # [row, l, r]
    v_cover = (V[:, ys][:, None, :] - V[:, ys][:, :, None]) / np.where(span_y > 0, span_y, np.inf)  # [col, t, b]

    def past(P: np.ndarray, at: np.ndarray, size: int, sign: int) -> np.ndarray:
        """How far each line in P runs on past positions `at` (sign -1: before, +1: after): the
        lower coverage of a near and a far stretch, so a short mark past the corner (a button,
        a field's edge) does not count, a line running on (a horizon through the picture) does."""
        def cover(start: int, stop: int) -> np.ndarray:
            a, b = np.clip(at + sign * start, 0, size), np.clip(at + sign * stop, 0, size)
            return (P[:, np.maximum(a, b)] - P[:, np.minimum(a, b)]) / (stop - start)
        near = OVERSHOOT_GAP + OVERSHOOT_LEN // 2
        return np.minimum(cover(OVERSHOOT_GAP, near), cover(near, OVERSHOOT_GAP + OVERSHOOT_LEN))

    h_before, h_after = past(H, xs, w, -1), past(H, xs, w, 1)  # [row, x]
    v_before, v_after = past(V, ys, h, -1), past(V, ys, h, 1)  # [col, y]
    # rectangles = (top, bottom) pairs tall enough x (left, right) pairs wide enough
    tb, lr = np.argwhere(span_y >= MIN_SIDE * h), np.argwhere(span_x >= MIN_SIDE * w)
    if len(tb) == 0 or len(lr) == 0:
        return None
    t, b, l, r = tb[:, :1], tb[:, 1:], lr[:, 0], lr[:, 1]  # [tb, 1] and [lr]: broadcast to [tb, lr]
    sides = np.stack(np.broadcast_arrays(h_cover[t, l, r], h_cover[b, l, r], v_cover[l, t, b], v_cover[r, t, b]))
    overshoot = np.stack(np.broadcast_arrays(
        h_before[t, l], h_after[t, r], h_before[b, l], h_after[b, r],
        v_before[l, t], v_after[l, b], v_before[r, t], v_after[r, b])).max(axis=0)
    mean_cover = sides.mean(axis=0)
    valid = (mean_cover >= MIN_MEAN_COVER) & (sides.min(axis=0) >= MIN_SIDE_COVER) & (overshoot <= MAX_OVERSHOOT)
    if not valid.any():
        return None
    # the photo is the largest well-covered rectangle: a line through the picture (a horizon, a
    # doorframe) makes a smaller one that may be covered a little better
    score = np.where(valid, mean_cover + AREA_WEIGHT * span_y[t, b] * span_x[l, r] / (h * w), -1.0)
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    (t, b), (l, r) = tb[i], lr[j]
    # each side line sits on the boundary's blur: the photo starts one pixel inside it
    left, top, right, bottom = int(xs[l]) + 1, int(ys[t]) + 1, int(xs[r]), int(ys[b])
    outside = np.ones((h, w), bool)
    outside[top:bottom, left:right] = False
    if 1.0 - busy[outside].mean() < MIN_FLAT_OUTSIDE:
        return None  # more photo around it (a window, a painting on a wall): not a UI frame
    return left, top, right, bottom


def _nest(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    if inner is None:
        return outer
    return outer[0] + inner[0], outer[1] + inner[1], outer[0] + inner[2], outer[1] + inner[3]


def content_box(img: Image.Image, tolerance: int, frames: bool = True) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) in `img`'s pixels of the picture inside borders and frames, or None.

    (with `frames`) a UI frame, then uniform borders inside the frame (or inside the whole image).
    """
    probe = img if img.mode == "RGB" else img.convert("RGB")
    if max(img.size) > PROBE:
        probe = probe.copy()
        probe.thumbnail((PROBE, PROBE), Image.Resampling.BILINEAR)
    a = np.asarray(probe, dtype=np.int16)
    h, w = a.shape[:2]
    frame = frame_box(a, tolerance) if frames else None
    box = (0, 0, w, h) if frame is None else frame
    box = _nest(box, uniform_box(a[box[1]:box[3], box[0]:box[2]], tolerance))
    if box == (0, 0, w, h):
        return None
    sx, sy = img.width / w, img.height / h
    return (int(np.floor(box[0] * sx)), int(np.floor(box[1] * sy)),
            int(np.ceil(box[2] * sx)), int(np.ceil(box[3] * sy)))
