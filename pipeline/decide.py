"""Stage 6, decide + cluster: turn tier scores into `is_duplicate`, `stage`, `reason`; group into clusters.

The rule (thresholds in `DecideConfig` and `VerifyConfig`, calibrated in docs/benchmarks.md):

* exact: byte-identical files are duplicates (no further tier runs).
* tiers=screen: a near pair is a duplicate when its hash distance <= `screen_only_distance`.
* verify: ORB "no-match" (enough keypoints, fewer than `verify.reject_inliers` inliers, or many
  matches of which fewer than `verify.min_inlier_share` agree: letters or tiles matched by chance)
  rejects the pair; ORB inliers >= `accept_inliers` accept it (geometry that clear was never seen between
  different photos). Only the pairs in between (and the inconclusive ones: too few keypoints) go on
  to the confirm tier (`needs_confirm`). With tiers=verify, "match" (>= `verify.match_inliers`)
  accepts and an inconclusive pair falls back to the screen rule.
* a "partial" match (inliers on too small a share of the pictures, `verify.min_coverage`, or
  aligned pictures that disagree on a region, `verify.region_mismatch`: a shared banner, frame,
  logo or app layout over different pictures) is never accepted on ORB's
  word: it goes to the confirm tier however many inliers it has, and needs cosine >=
  `cosine_threshold` there (its inliers give no support); with tiers=verify it falls back to the
  screen rule as an inconclusive pair does.
* confirm: a duplicate when cosine >= `cosine_threshold`, or when ORB found some geometry
  (>= `support_inliers`) and cosine >= `cosine_floor` (heavy crops and recolouring lower the
  cosine; the keypoints still agree), or, whatever the cosine, when the hashes are within
  `hash_orb_distance` and ORB's inliers are >= `hash_orb_inliers` and >= `hash_orb_share` of
  its matches (a blurred copy: the embedding moves far, cosine ~0.57, the hash and a small but
  clean geometry do not; "partial" matches excluded, as above).
* pixel check (`verify.pixel_check`): a flat pair (too few keypoints, or both images flat: logos,
  UI screenshots, text on colour; or both mostly flat, `verify.semi_flat_share`, ORB undecided
  and the pixels clearly different, `verify.semi_flat_ssim`: charts, diagrams) whose pixels were
  compared is decided at the verify tier, over
  ORB's verdict (keypoints on a shared layout match between different graphics): a duplicate
  when SSIM >= `pixel_ssim` and the colour-histogram correlation >= `pixel_hist_corr`,
  different otherwise; it is not embedded.

Every pair also gets a machine-readable `rule` code (the keys of `RULES`) beside the human
`reason`, so analysts can filter on why a pair was decided without parsing text.

Clusters are connected components of the duplicate pairs; `cluster_id` is the `image_id` of the
member whose path sorts first, so the same input always gives the same ids.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import Config

# rule code -> what it means. Part of the output contract (pairs.parquet `rule`): codes are only
# ever added, never renamed.
RULES = {
    "exact_bytes": "byte-identical files (same sha256): duplicate",
    "screen_hash_close": "tiers=screen: hash distance <= decide.screen_only_distance: duplicate",
    "screen_hash_far": "tiers=screen: hash distance > decide.screen_only_distance: different",
    "verify_orb_accept": "ORB inliers >= decide.accept_inliers: duplicate without an embedding",
    "verify_orb_reject": "ORB found enough keypoints but fewer than verify.reject_inliers inliers, or fewer than "
                         "verify.min_inlier_share of its matches with >= verify.chance_min_matches of them "
                         "(repeated shapes matched by chance): different",
    "verify_orb_match": "tiers=verify: ORB inliers >= verify.match_inliers: duplicate",
    "verify_inconclusive_hash_close": "tiers=verify: ORB inconclusive (or partial), hash distance <= "
                                      "decide.screen_only_distance: duplicate",
    "verify_inconclusive_hash_far": "tiers=verify: ORB inconclusive (or partial), hash distance > "
                                    "decide.screen_only_distance: different",
    "confirm_cosine": "cosine >= decide.cosine_threshold: duplicate",
    "confirm_cosine_orb": "cosine >= decide.cosine_floor with ORB inliers >= decide.support_inliers: duplicate",
    "confirm_cosine_low": "cosine below the thresholds: different",
    "confirm_no_embedding": "an embedding could not be made: ORB's verdict stands (match: duplicate)",
    "verify_pixel_match": "flat pair (pixel check): SSIM >= decide.pixel_ssim and colour-histogram "
                          "correlation >= decide.pixel_hist_corr: duplicate",
    "verify_pixel_mismatch": "flat (or mostly flat, ORB undecided, verify.semi_flat_ssim) pair (pixel check): SSIM < decide.pixel_ssim or colour-histogram "
                             "correlation < decide.pixel_hist_corr: different",
    "file_changed": "a file was rewritten or removed during the run: not decided (different); the next run includes it",
    "confirm_hash_orb": "cosine below the thresholds, but hash distance <= decide.hash_orb_distance and ORB inliers >= "
                        "decide.hash_orb_inliers making >= decide.hash_orb_share of its matches (blurred copies): "
                        "duplicate",
}
CHANGED_ERROR = ("changed during the run (size, mtime or ETag differ from the screen): not compared; the next run "
                 "includes it")


def _texts(mask: np.ndarray, yes, no) -> np.ndarray:
    """`yes` where `mask`, else `no` (texts, or object arrays as long as the mask), as an object
    array sharing the texts: np.where makes a fixed-width unicode array of its own (4 B a
    character, ~11 MB for a part of 65,536 pairs' pixel rule codes)."""
    out = np.empty(len(mask), dtype=object)
    out[:] = no if isinstance(no, str) else np.asarray(no, dtype=object)
    out[mask] = yes if isinstance(yes, str) else np.asarray(yes, dtype=object)[mask]
    return out


def _status(pairs: pd.DataFrame) -> np.ndarray:
    return pairs["orb_status"].astype(object).fillna("").to_numpy(dtype=object)


def _inliers(pairs: pd.DataFrame) -> np.ndarray:
    return pairs["orb_inliers"].astype("Float64").fillna(0).to_numpy(dtype=np.int64)


def pixel_checked(pairs: pd.DataFrame) -> np.ndarray:
    """Near pairs the verify tier compared by pixels (`ssim` set: verify.pixel_check)."""
    if "ssim" not in pairs:
        return np.zeros(len(pairs), dtype=bool)
    return (pairs["kind"] == "near").to_numpy() & pairs["ssim"].notna().to_numpy()


def pixel_rule(pairs: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pixel check's verdicts: (checked mask, is_duplicate, rule code, reason), one per pair
    (code and reason empty where not checked)."""
    d = cfg.decide
    checked = pixel_checked(pairs)
    n = len(pairs)
    ssim = pairs["ssim"].astype("Float64").to_numpy(np.float64, na_value=np.nan) if n and "ssim" in pairs \
        else np.full(n, np.nan)
    hist = pairs["hist_corr"].astype("Float64").to_numpy(np.float64, na_value=np.nan) if n and "hist_corr" in pairs \
        else np.full(n, np.nan)
    dup = checked & (ssim >= d.pixel_ssim) & (hist >= d.pixel_hist_corr)
    code = _texts(checked, _texts(dup, "verify_pixel_match", "verify_pixel_mismatch"), "")
    reason = np.full(n, "", dtype=object)
    for i in np.flatnonzero(checked):
        verdict = "duplicate" if dup[i] else "different"
        s_op = ">=" if ssim[i] >= d.pixel_ssim else "<"
        h_op = ">=" if hist[i] >= d.pixel_hist_corr else "<"
        reason[i] = (f"{verdict}: pixel check SSIM {ssim[i]:.3f} {s_op} {d.pixel_ssim}, colour histogram "
                     f"correlation {hist[i]:.3f} {h_op} {d.pixel_hist_corr}")
    return checked, dup, code, reason


def needs_confirm(pairs: pd.DataFrame, cfg: Config) -> np.ndarray:
    """Near pairs that the verify tier neither rejected nor accepted outright (nor decided by
    the pixel check)."""
    near = (pairs["kind"] == "near").to_numpy()
    status = _status(pairs)
    return (near & (status != "no-match")
            & ((_inliers(pairs) < cfg.decide.accept_inliers) | (status == "partial")) & ~pixel_checked(pairs))


def decide(pairs: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Add `stage`, `is_duplicate`, `reason` to candidate pairs (columns from earlier tiers).

    Expects `kind` ("exact"/"near"), `hash_distance`, and when those tiers ran `orb_status`,
    `orb_inliers`, `orb_reason`, `cosine`.
    """
    d = cfg.decide
    out = pairs.copy(deep=False)  # whole columns are replaced below, never written into
    n = len(out)
    stage = np.full(n, "screen", dtype=object)
    dup = np.zeros(n, dtype=bool)
    reason = np.full(n, "", dtype=object)
    rule = np.full(n, "", dtype=object)

    exact = (out["kind"] == "exact").to_numpy()
    dist = out["hash_distance"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    stage[exact] = "exact"
    dup[exact] = True
    reason[exact] = "identical bytes (sha256)"
    rule[exact] = "exact_bytes"

    near = ~exact
    screen_ok = dist <= d.screen_only_distance
    if cfg.tiers == "screen":
        dup[near] = screen_ok[near]
        reason[near] = _texts(screen_ok[near], f"hash distance <= {d.screen_only_distance}",
                              f"hash distance > {d.screen_only_distance}")
        rule[near] = _texts(screen_ok[near], "screen_hash_close", "screen_hash_far")
        return _assign(out, stage, dup, reason, rule)

    status = _status(out)
    inliers = _inliers(out)
    orb_reason = out["orb_reason"].astype(object).fillna("").to_numpy(dtype=object)
    stage[near] = "verify"
    reason[near] = orb_reason[near]
    rule[near & (status == "no-match")] = "verify_orb_reject"
    pixel, pixel_dup, _, pixel_reason = pixel_rule(out, cfg)
    if cfg.tiers == "verify":
        match = near & (status == "match")
        inconclusive = near & (status != "no-match") & ~match & ~pixel  # ("partial" too)
        dup[match] = True
        dup[inconclusive] = screen_ok[inconclusive]
        reason[inconclusive] = [f"{r}; hash distance {int(x)} vs screen_only_distance {d.screen_only_distance}"
                                for r, x in zip(orb_reason[inconclusive], dist[inconclusive])]
        rule[match] = "verify_orb_match"
        rule[inconclusive] = _texts(screen_ok[inconclusive], "verify_inconclusive_hash_close",
                                      "verify_inconclusive_hash_far")
        _assign_pixel(dup, reason, rule, pixel, pixel_dup, pixel_reason, orb_reason)
        return _assign(out, stage, dup, reason, rule)

    accepted = near & (status != "no-match") & (status != "partial") & (inliers >= d.accept_inliers)
    dup[accepted] = True
    reason[accepted] = [f"duplicate: {r} (>= accept_inliers {d.accept_inliers})" for r in orb_reason[accepted]]
    rule[accepted] = "verify_orb_accept"
    cosine = out["cosine"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    routed = needs_confirm(out, cfg)
    confirmed = routed & ~np.isnan(cosine)
    stage[confirmed] = "confirm"
    by_cosine = cosine >= d.cosine_threshold
    by_support = (inliers >= d.support_inliers) & (cosine >= d.cosine_floor) & (status != "partial")
    matches = out["orb_matches"].astype("Float64").to_numpy(np.float64, na_value=np.nan) if "orb_matches" in out \
        else np.full(n, np.nan)
    by_hash_orb = ((dist <= d.hash_orb_distance) & (inliers >= d.hash_orb_inliers)
                   & (inliers >= d.hash_orb_share * matches) & np.isin(status, ("match", "inconclusive")))
    dup[confirmed] = (by_cosine | by_support | by_hash_orb)[confirmed]
    for i in np.flatnonzero(confirmed):
        if by_cosine[i]:
            text, rule[i] = f"duplicate: cosine {cosine[i]:.3f} >= {d.cosine_threshold}", "confirm_cosine"
        elif by_support[i]:
            text = f"duplicate: cosine {cosine[i]:.3f} >= {d.cosine_floor} with {inliers[i]} ORB inliers"
            rule[i] = "confirm_cosine_orb"
        elif by_hash_orb[i]:
            text = (f"duplicate: cosine {cosine[i]:.3f} < {d.cosine_threshold}, but hash distance {int(dist[i])} "
                    f"<= {d.hash_orb_distance} and {inliers[i]} of {int(matches[i])} ORB matches inliers")
            rule[i] = "confirm_hash_orb"
        else:
            text, rule[i] = f"different: cosine {cosine[i]:.3f} < {d.cosine_threshold}", "confirm_cosine_low"
        reason[i] = f"{text}; {orb_reason[i]}"
    lost = routed & np.isnan(cosine)  # an embedding failed: ORB's verdict stands
    dup[lost] = status[lost] == "match"
    reason[lost] = [f"{r}; no embedding" for r in orb_reason[lost]]
    rule[lost] = "confirm_no_embedding"
    _assign_pixel(dup, reason, rule, pixel, pixel_dup, pixel_reason, orb_reason)
    return _assign(out, stage, dup, reason, rule)


def _assign_pixel(dup, reason, rule, pixel, pixel_dup, pixel_reason, orb_reason) -> None:
    """Pixel-checked pairs (stage stays "verify"): the pixel check's verdict, ORB's reason after it."""
    dup[pixel] = pixel_dup[pixel]
    reason[pixel] = [f"{p}; {r}" for p, r in zip(pixel_reason[pixel], orb_reason[pixel])]
    rule[pixel] = _texts(pixel_dup[pixel], "verify_pixel_match", "verify_pixel_mismatch")


def _assign(out: pd.DataFrame, stage, dup, reason, rule) -> pd.DataFrame:
    if (rule == "").any():  # every verdict must name its rule (a new branch above forgot to)
        raise AssertionError("decide: a pair was decided without a rule code")
    out["stage"] = stage
    out["is_duplicate"] = dup
    out["reason"] = reason
    out["rule"] = rule
    return out


# pairs decided at a time by a run (`decide_rows`): the verdicts' reasons, a string per pair,
# exist for one part only (the run keeps `is_duplicate` and writes pairs.parquet part by part,
# each part a row group). A part of the contract's rows is ~0.4 kB a pair (paths included):
# 16,384 pairs keep it near 6 MB (a part of 65,536 was +15-18 MB on the driver as it was decided
# and written, RSS probe of a 100k-file run)
PART_ROWS = 16_384


def decide_rows(pairs: pd.DataFrame, cfg: Config, changed: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
    """`decide` and `mark_changed` of the pairs at positions `rows`, in that order. A pair's
    verdict depends on its own columns only, so deciding in parts gives the rows deciding the
    whole frame gives."""
    return mark_changed(decide(pairs.iloc[rows], cfg), changed)


CHANGED_REASON = "a file changed during the run: not decided; the next run includes it"


def mark_changed(pairs: pd.DataFrame, changed: np.ndarray, reason: str = CHANGED_REASON) -> pd.DataFrame:
    """Pairs touching an image that changed during the run (`changed`: bool per image row) are
    not duplicates, whatever their scores: the tiers may have seen two versions of the file."""
    hit = changed[pairs["idx_a"].to_numpy()] | changed[pairs["idx_b"].to_numpy()]
    if not hit.any():
        return pairs
    out = pairs.copy()
    out.loc[hit, "is_duplicate"] = False
    out.loc[hit, "rule"] = "file_changed"
    out.loc[hit, "reason"] = reason
    return out


def clusters(n_images: int, idx_a: np.ndarray, idx_b: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Cluster id per image (rows in path order) from duplicate edges; -1 for singletons."""
    result = np.full(n_images, -1, dtype=np.int64)
    if n_images == 0 or len(idx_a) == 0:
        return result
    graph = coo_matrix((np.ones(len(idx_a), dtype=np.int8), (idx_a, idx_b)), shape=(n_images, n_images))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    # first member (lowest row = first path) of each component names the cluster
    first = np.full(labels.max() + 1, n_images, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n_images))
    in_cluster = sizes[labels] > 1
    result[in_cluster] = image_ids[first[labels[in_cluster]]]
    return result
