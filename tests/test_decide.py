import numpy as np
import pandas as pd

from pipeline.config import Config, load_config
from pipeline.decide import clusters, decide, needs_confirm


def _pairs(rows):
    cols = ["kind", "hash_distance", "orb_status", "orb_inliers", "orb_reason", "cosine"]
    return pd.DataFrame(rows, columns=cols)


def test_confirm_rule():
    cfg = Config()
    d = cfg.decide
    rows = [
        ("exact", 0, None, None, None, np.nan),
        ("near", 3, "match", d.accept_inliers, "orb: many inliers", np.nan),  # accepted at verify
        ("near", 9, "no-match", 1, "orb: 1 inlier", np.nan),  # rejected at verify
        ("near", 9, "inconclusive", 0, "orb inconclusive", d.cosine_threshold - 0.01),
        ("near", 9, "match", d.support_inliers, "orb: some", d.cosine_floor + 0.01),
        ("near", 9, "inconclusive", d.support_inliers - 1, "orb: fewer", d.cosine_floor + 0.01),
        ("near", 2, "inconclusive", 0, "orb inconclusive", d.cosine_threshold + 0.01),
        ("near", 2, "inconclusive", 0, "orb inconclusive", np.nan),  # embedding failed
    ]
    routed = needs_confirm(_pairs(rows), cfg)
    assert routed.tolist() == [False, False, False, True, True, True, True, True]
    p = decide(_pairs(rows), cfg)
    assert p["stage"].tolist() == ["exact", "verify", "verify", "confirm", "confirm", "confirm", "confirm", "verify"]
    assert p["is_duplicate"].tolist() == [True, True, False, False, True, False, True, False]
    assert p["reason"].str.len().gt(0).all()
    assert p["reason"].iloc[-1].endswith("no embedding")


def test_screen_and_verify_only_rules():
    rows = [("near", 2, "inconclusive", 0, "orb inconclusive", np.nan),
            ("near", 9, "inconclusive", 0, "orb inconclusive", np.nan),
            ("near", 9, "match", 50, "orb: 50", np.nan),
            ("near", 1, "no-match", 0, "orb: 0", np.nan)]
    screen = decide(_pairs(rows), load_config(None, ["tiers=screen"]))
    assert screen["stage"].eq("screen").all()
    assert screen["is_duplicate"].tolist() == [True, False, False, True]
    verify = decide(_pairs(rows), load_config(None, ["tiers=verify"]))
    assert verify["stage"].eq("verify").all()
    assert verify["is_duplicate"].tolist() == [True, False, True, False]


def test_clusters_are_components_named_by_first_member():
    ids = np.array([100, 101, 102, 103, 104, 105])
    got = clusters(6, np.array([0, 3, 1]), np.array([4, 5, 4]), ids)
    assert got.tolist() == [100, 100, -1, 103, 100, 103]
    assert clusters(6, np.array([], int), np.array([], int), ids).tolist() == [-1] * 6


def test_pixel_check_decides_flat_pairs_at_verify():
    from pipeline.decide import RULES, pixel_rule
    cfg = Config()
    d = cfg.decide
    rows = [("near", 3, "inconclusive", 0, "orb inconclusive: 4 keypoints", np.nan),
            ("near", 3, "inconclusive", 0, "orb inconclusive: 4 keypoints", np.nan),
            ("near", 3, "inconclusive", 0, "orb inconclusive: 4 keypoints", np.nan),
            ("near", 3, "inconclusive", 0, "orb inconclusive: 4 keypoints", 0.9)]  # not pixel-checked
    pairs = _pairs(rows)
    pairs["ssim"] = pd.array([d.pixel_ssim + 0.01, d.pixel_ssim - 0.01, d.pixel_ssim + 0.01, None], dtype="Float32")
    pairs["hist_corr"] = pd.array([d.pixel_hist_corr + 0.01, 0.99, d.pixel_hist_corr - 0.01, None], dtype="Float32")
    assert needs_confirm(pairs, cfg).tolist() == [False, False, False, True]
    checked, dup, code, _ = pixel_rule(pairs, cfg)
    assert checked.tolist() == [True, True, True, False] and set(code[checked]) <= set(RULES)
    assert code.tolist() == ["verify_pixel_match", "verify_pixel_mismatch", "verify_pixel_mismatch", ""]
    for tiers in ("verify", "confirm"):
        p = decide(pairs, load_config(None, [f"tiers={tiers}"]))
        assert p["is_duplicate"].tolist()[:3] == [True, False, False]
        assert p["stage"].tolist()[:3] == ["verify"] * 3
        assert p["reason"].iloc[0].startswith("duplicate: pixel check")
    assert decide(pairs, cfg)["stage"].iloc[3] == "confirm"


def test_a_partial_match_is_never_accepted_on_orbs_word():
    """ORB "partial" (its inliers on a shared banner, frame or layout, verify.min_coverage): however
    many inliers, the pair goes to the confirm tier and needs cosine >= cosine_threshold (the
    inliers give no support); without an embedding it is different; with tiers=verify the hash
    distance decides, as for an inconclusive pair."""
    from pipeline.decide import RULES
    cfg = Config()
    d = cfg.decide
    why = "orb partial: 202 inliers of 204 matches, but on 50% of the pictures' keypoints"
    rows = [("near", 9, "partial", 202, why, d.cosine_threshold + 0.01),
            ("near", 9, "partial", 202, why, d.cosine_threshold - 0.01),  # (>= cosine_floor: support would pass)
            ("near", 9, "partial", 202, why, np.nan),  # embedding failed
            ("near", 9, "match", 202, "orb: 202 inliers of 204 matches", np.nan)]
    assert d.cosine_threshold - 0.01 >= d.cosine_floor
    assert needs_confirm(_pairs(rows), cfg).tolist() == [True, True, True, False]
    p = decide(_pairs(rows), cfg)
    assert p["is_duplicate"].tolist() == [True, False, False, True]
    assert p["rule"].astype(str).tolist() == ["confirm_cosine", "confirm_cosine_low", "confirm_no_embedding",
                                              "verify_orb_accept"]
    assert all(why in r for r in p["reason"].iloc[:3])
    # tiers=verify: as an inconclusive pair, the screen rule (hash distance 9 > screen_only_distance)
    fast = decide(_pairs(rows + [("near", 2, "partial", 202, why, np.nan)]), load_config(None, ["tiers=verify"]))
    assert fast["is_duplicate"].tolist() == [False, False, False, True, True]
    assert fast["rule"].astype(str).tolist() == ["verify_inconclusive_hash_far"] * 3 + [
        "verify_orb_match", "verify_inconclusive_hash_close"]
    assert fast["reason"].iloc[0].startswith(why) and set(fast["rule"].astype(str)) <= set(RULES)


def test_a_close_hash_with_a_small_clean_geometry_is_a_duplicate_whatever_the_cosine():
    """A heavily blurred copy: its embedding moves far (cosine ~0.57), its hash and a small, clean
    ORB match do not. Hash distance <= decide.hash_orb_distance with inliers >= hash_orb_inliers
    that are >= hash_orb_share of the matches makes it a duplicate at the confirm tier; one of the
    three short, a "partial" match, or the rule turned off (-1, the strict preset) leaves it
    different."""
    cfg = Config()
    d = cfg.decide
    assert (d.hash_orb_distance, d.hash_orb_inliers, d.hash_orb_share) == (2, 8, 0.8)
    cols = ["kind", "hash_distance", "orb_status", "orb_matches", "orb_inliers", "orb_reason", "cosine"]
    rows = [("near", 2, "inconclusive", 10, 8, "orb: 8 of 10", 0.57),       # duplicate
            ("near", 3, "inconclusive", 10, 8, "orb: 8 of 10", 0.57),       # hash a bit further
            ("near", 2, "inconclusive", 10, 7, "orb: 7 of 10", 0.57),       # too few inliers
            ("near", 0, "inconclusive", 11, 8, "orb: 8 of 11", 0.57),       # below the share
            ("near", 0, "partial", 14, 14, "orb partial", 0.57),            # on too little of the pictures
            ("near", 1, "match", 20, 17, "orb: 17 of 20", 0.80),            # the cosine decides first
            ("near", 1, "inconclusive", 10, 9, "orb: 9 of 10", np.nan),     # no embedding: ORB's verdict
            ("near", 1, None, 10, 9, "", 0.57)]                             # (no ORB status: not this rule)
    pairs = pd.DataFrame(rows, columns=cols)
    p = decide(pairs, cfg)
    assert p["is_duplicate"].tolist() == [True, False, False, False, False, True, False, False]
    assert p["rule"].astype(str).tolist() == ["confirm_hash_orb"] + ["confirm_cosine_low"] * 4 + \
        ["confirm_cosine", "confirm_no_embedding", "confirm_cosine_low"]
    assert p["reason"].iloc[0] == ("duplicate: cosine 0.570 < 0.78, but hash distance 2 <= 2 and 8 of 10 ORB "
                                   "matches inliers; orb: 8 of 10")
    strict = decide(pairs, load_config(None, [], preset="strict"))
    assert not strict["is_duplicate"].iloc[0] and strict["rule"].astype(str).iloc[0] == "confirm_cosine_low"
