"""Calibrating the decision rule (pipeline/decide.py) on labelled candidate pairs.

Runs the real pipeline once on a labelled folder (default: the 10k-image end-to-end benchmark, in
high-recall mode so the candidates include hard negatives: different photos that look alike) with
`decide.accept_inliers` set out of reach, so every pair that ORB did not reject gets a cosine. Then
it replays the rule over a grid of thresholds and reports precision / recall of the candidate pairs,
marking the defaults. The goal the defaults are chosen for: precision >= 0.99 at the highest recall.

    python -m bench.calibrate [--data DIR --labels DIR/labels.csv] [--mode hash+embedding]
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report import stamp, table, update_section
from pipeline.config import Config

REPO = Path(__file__).resolve().parent.parent


def replay(p: pd.DataFrame, accept: int, cos_thr: float, support: int, floor: float,
           hash_orb: tuple[int, int, float] | None = None) -> np.ndarray:
    """The decide rule over scored pairs (columns orb_inliers, cosine, rejected; with `hash_orb`,
    (distance, inliers, share) of decide.hash_orb_*: hash_distance, orb_matches and partial too)."""
    inl = p["orb_inliers"].fillna(0).to_numpy()
    cos = p["cosine"].fillna(-1).to_numpy()
    alive = ~p["rejected"].to_numpy()
    dup = (inl >= accept) | (cos >= cos_thr) | ((inl >= support) & (cos >= floor))
    if hash_orb is not None:
        distance, inliers, share = hash_orb
        matches = p["orb_matches"].astype("Float64").fillna(np.inf).to_numpy(np.float64)
        dup |= ((p["hash_distance"].to_numpy() <= distance) & (inl >= inliers) & (inl >= share * matches)
                & ~p["partial"].to_numpy())
    return alive & dup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="labelled folder (default: the end-to-end benchmark)")
    parser.add_argument("--labels", default=None, help="labels.csv (path,group_id); default DATA/labels.csv")
    parser.add_argument("--mode", default="hash+embedding", choices=["hash", "hash+embedding"])
    parser.add_argument("--out", default=None, help="benchmarks markdown file")
    args = parser.parse_args()
    if args.data is None:
        from bench.end_to_end import generate
        from bench.transforms import DEFAULT_BENCH_DIR
        data = generate(Path(DEFAULT_BENCH_DIR), 12)
    else:
        data = Path(args.data)
    labels = pd.read_csv(args.labels or data / "labels.csv").set_index("path")["group_id"]
    with tempfile.TemporaryDirectory(prefix="dedupe-calibrate-") as out:
        cmd = [sys.executable, "-m", "pipeline", "dedupe", str(data), "--out", out, "--quiet", "--log-level",
               "WARNING", "--set", f"screen.mode={args.mode}", "--set", "decide.accept_inliers=1000000"]
        subprocess.run(cmd, check=True, cwd=REPO)
        pairs = pd.read_parquet(Path(out) / "pairs.parquet")
    pairs = pairs[pairs["stage"] != "exact"].copy()
    pairs["true"] = pairs["path_a"].map(labels).to_numpy() == pairs["path_b"].map(labels).to_numpy()
    # with accept_inliers out of reach, a near pair left at the verify tier was rejected by ORB
    pairs["rejected"] = pairs["stage"].eq("verify") & ~pairs["is_duplicate"]
    # (ORB "partial": its inliers give no support, decide.py; with accept_inliers out of reach its
    # reason says so)
    pairs["partial"] = pairs["reason"].astype(str).str.contains("partial", regex=False)
    n_true = int(pairs["true"].sum())
    d = Config().decide
    grid = list(itertools.product([15, 20, 25, 30, 40], [0.72, 0.75, 0.78, 0.80, 0.85], [8, 10, 15], [0.55, 0.6, 0.65, 0.7]))
    rows = []
    for accept, cos_thr, support, floor in grid:
        if support > accept or floor > cos_thr:
            continue
        dup = replay(pairs, accept, cos_thr, support, floor)
        tp = int((dup & pairs["true"]).sum())
        fp = int((dup & ~pairs["true"]).sum())
        rows.append({"accept_inliers": accept, "cosine_threshold": cos_thr, "support_inliers": support,
                     "cosine_floor": floor, "precision": tp / max(tp + fp, 1), "recall": tp / max(n_true, 1),
                     "fp": fp, "default": (accept, cos_thr, support, floor) ==
                     (d.accept_inliers, d.cosine_threshold, d.support_inliers, d.cosine_floor)})
    grid_df = pd.DataFrame(rows)
    ok = grid_df[grid_df["precision"] >= 0.99].sort_values(["recall", "precision"], ascending=False)
    shown = pd.concat([grid_df[grid_df["default"]], ok.head(8)]).drop_duplicates()
    false = pairs[~pairs["true"]]
    body = stamp() + (
        f"\nCandidate pairs of `{data.name}` (`screen.mode={args.mode}`): {len(pairs):,} near pairs, "
        f"{n_true:,} true, {len(false):,} false. ORB inliers of false pairs: max "
        f"{int(false['orb_inliers'].max()) if len(false) else 0}, 99.9th percentile "
        f"{false['orb_inliers'].quantile(0.999) if len(false) else 0:.0f}; cosine of false pairs (where computed): "
        f"99th percentile {false['cosine'].quantile(0.99):.3f}, max {false['cosine'].max():.3f}. Recall is over the "
        "true pairs among the candidates (the screen's misses are in the accuracy section). The rule replayed: "
        "duplicate when not rejected by ORB and (inliers >= accept_inliers, or cosine >= cosine_threshold, or "
        "inliers >= support_inliers and cosine >= cosine_floor). First row: the defaults; then the settings "
        "with precision >= 0.99 and the highest recall.\n\n")
    body += table(["default", "accept_inliers", "cosine_threshold", "support_inliers", "cosine_floor", "precision",
                   "recall", "false positives"],
                  [["**yes**" if r.default else "", r.accept_inliers, r.cosine_threshold, r.support_inliers,
                    r.cosine_floor, r.precision, r.recall, r.fp] for r in shown.itertuples()])
    # the hash + clean-geometry rule (decide.hash_orb_*) on top of the default thresholds: what it adds
    base = replay(pairs, d.accept_inliers, d.cosine_threshold, d.support_inliers, d.cosine_floor)
    added = []
    for distance, inliers, share in [(d.hash_orb_distance, d.hash_orb_inliers, d.hash_orb_share),
                                     (2, 6, 0.8), (4, 8, 0.8), (2, 8, 0.6), (10, 8, 0.8), (10, 6, 0.6)]:
        more = replay(pairs, d.accept_inliers, d.cosine_threshold, d.support_inliers, d.cosine_floor,
                      (distance, inliers, share)) & ~base
        added.append(["**yes**" if (distance, inliers, share) == (d.hash_orb_distance, d.hash_orb_inliers,
                                                                   d.hash_orb_share) else "",
                      distance, inliers, share, int((more & pairs["true"]).sum()), int((more & ~pairs["true"]).sum())])
    body += ("\nThe hash + clean geometry rule (`decide.hash_orb_distance`, `hash_orb_inliers`, `hash_orb_share`: "
             "duplicate whatever the cosine when the hash distance, the inliers and their share of ORB's matches "
             "all reach it, not partial) on top of the default thresholds above: the pairs it adds.\n\n")
    body += table(["default", "hash distance <=", "inliers >=", "share >=", "true pairs added", "false pairs added"],
                  added)
    kwargs = {"path": args.out} if args.out else {}
    update_section("calibration", "decision rule calibration", body, **kwargs)
    print(shown.to_string())


if __name__ == "__main__":
    main()
