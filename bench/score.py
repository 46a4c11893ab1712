"""Scoring duplicate-detection output against labels (`path,group_id[,transform,category]`).

Definitions (also printed in docs/benchmarks.md):

- Universe: the labelled files. Predicted pairs that involve a file without a label row are
  ignored (counted as `ignored_unlabelled`); labelled files missing from the output still count
  (their true pairs are misses). Files with an empty group_id, or a group_id starting with
  "corrupt" (case-insensitive), are singletons: they never form a true pair.
- True pairs: every unordered pair of files sharing a group_id.
- Exact-copy expansion (pairs and tiers): the pipeline compares only one file of each
  byte-identical group with the others, so rows are expanded first: all pairs inside an exact
  group count as exact duplicates, and a row (A, B) also stands for (A', B') for every A'
  identical to A and B' identical to B (same stage and verdict). Unlabelled files take part in
  the expansion (an unlabelled exact copy can link two labelled files).
- Tiers, for a pipeline output (pairs.parquet, one row per candidate; `stage` = last tier
  reached, exact < screen < verify < confirm):
    * screen: alive = the pair is a row at all, whatever its verdict (candidate recall);
    * verify: alive = is_duplicate, or the pair went on past verify (stage confirm);
      i.e. dropped = rows that stopped at screen or verify with is_duplicate false;
    * confirm / final: alive = is_duplicate.
  Recall at a tier = true pairs alive / true pairs; precision = true alive / alive.
- clusters (pairwise): predicted pairs = all pairs of labelled files sharing a cluster_id in
  images.parquet (for an external pairs file: the connected components of its pairs). This
  credits pairs implied by transitivity, e.g. (A', B) from exact (A, A') + near (A, B).
- B-cubed (over labelled files, singletons included): per file, precision = |own predicted
  cluster ∩ own group| / |own predicted cluster| and recall = |...| / |own group|, averaged.
- Per transform (generated benchmark): a true pair's transform is the transform of its
  non-original member; a pair of two transformed copies is "copy-vs-copy".
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

STAGE_RANK = {"exact": 0, "screen": 1, "verify": 2, "confirm": 3}
TIERS = ("screen", "verify", "confirm")


# ---------------------------------------------------------------------------------------------
# paths and labels

def norm_path(p, root: str | Path | None = None) -> str:
    """Posix, relative, without './' or redundant separators; absolute paths made relative to root."""
    s = str(p).replace("\\", "/")
    if root is not None and os.path.isabs(s):
        s = os.path.relpath(s, str(root)).replace("\\", "/")
    s = os.path.normpath(s).replace("\\", "/") if s else s
    while s.startswith("./"):
        s = s[2:]
    return s


def load_labels(path_or_df, root: str | Path | None = None) -> pd.DataFrame:
    """labels.csv (or a DataFrame) -> DataFrame with normalised `path`, `group` (singletons get a
    unique group), and `transform`/`category` when present."""
    df = pd.read_csv(path_or_df, dtype=str, keep_default_na=False) if not isinstance(
        path_or_df, pd.DataFrame) else path_or_df.copy()
    if root is None and not isinstance(path_or_df, pd.DataFrame):
        root = Path(path_or_df).resolve().parent
    missing = {"path", "group_id"} - set(df.columns)
    if missing:
        raise ValueError(f"labels need columns path,group_id (missing {sorted(missing)})")
    df["path"] = [norm_path(p, root) for p in df["path"]]
    if df["path"].duplicated().any():
        dup = df.loc[df["path"].duplicated(), "path"].tolist()[:3]
        raise ValueError(f"labels list a path twice, e.g. {dup}")
    gid = df["group_id"].fillna("").astype(str).str.strip()
    single = (gid == "") | gid.str.lower().str.startswith("corrupt")
    df["group"] = np.where(single, "__single__:" + df["path"], gid)
    for col in ("transform", "category"):
        if col not in df.columns:
            df[col] = ""
    return df.reset_index(drop=True)


def true_pairs(labels: pd.DataFrame) -> set[tuple[str, str]]:
    out = set()
    for _, paths in labels.groupby("group")["path"]:
        ps = sorted(paths)
        out.update(combinations(ps, 2))
    return out


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def _align(paths: list[str], labelled: set[str]) -> dict[str, str]:
    """Map output paths onto label paths when they differ by a leading folder (the pipeline was
    run on a parent or a child of the labels' folder)."""
    if not paths:
        return {}
    hits = sum(p in labelled for p in paths)
    if hits >= 0.5 * len(paths):
        return {}
    # try stripping a leading prefix from output paths, or adding one
    for p in paths:
        for lab in labelled:
            if p.endswith("/" + lab):
                prefix = p[: -len(lab)]
                mapping = {q: q[len(prefix):] for q in paths if q.startswith(prefix)}
                if sum(v in labelled for v in mapping.values()) > hits:
                    return mapping
            if lab.endswith("/" + p):
                prefix = lab[: -len(p)]
                mapping = {q: prefix + q for q in paths}
                if sum(v in labelled for v in mapping.values()) > hits:
                    return mapping
        break  # only the first path is used to find the prefix
    return {}


# ---------------------------------------------------------------------------------------------
# predictions

def load_prediction(src, root: str | Path | None = None) -> dict:
    """A pipeline output folder (pairs.parquet + images.parquet), a pairs .parquet file, or a CSV
    of `path_a,path_b` (all rows are duplicates unless an is_duplicate column says otherwise).
    -> {"pairs": DataFrame[path_a, path_b, stage, is_duplicate, ...], "images": DataFrame|None}"""
    if isinstance(src, dict):
        return src
    src = Path(src)
    images, tiers = None, None
    if src.is_dir():
        pairs = pd.read_parquet(src / "pairs.parquet")
        if (src / "images.parquet").exists():
            images = pd.read_parquet(src / "images.parquet")
        try:  # the tiers that ran, so a tier that kept no pair still gets its row
            tiers = json.loads((src / "run.json").read_text())["config"]["tiers"]
        except (OSError, ValueError, KeyError, TypeError):
            tiers = None
    elif src.suffix.lower() == ".parquet":
        pairs = pd.read_parquet(src)
        if (src.parent / "images.parquet").exists() and src.name == "pairs.parquet":
            images = pd.read_parquet(src.parent / "images.parquet")
    else:
        pairs = pd.read_csv(src, dtype=str, keep_default_na=False)
        if "path_a" not in pairs.columns:  # no header row
            pairs = pd.read_csv(src, dtype=str, keep_default_na=False, header=None)
            pairs = pairs.rename(columns={0: "path_a", 1: "path_b"})
        if "is_duplicate" in pairs.columns:
            pairs["is_duplicate"] = pairs["is_duplicate"].astype(str).str.lower().isin(
                ["1", "true", "yes", "t"])
    return {"pairs": pairs, "images": images, "root": root, "tiers": tiers}


def _prepare(pred: dict, labels: pd.DataFrame, root=None) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    pairs = pred["pairs"].copy()
    images = pred.get("images")
    root = root if root is not None else pred.get("root")
    labelled = set(labels["path"])
    pairs["path_a"] = [norm_path(p, root) for p in pairs["path_a"]]
    pairs["path_b"] = [norm_path(p, root) for p in pairs["path_b"]]
    all_paths = sorted(set(pairs["path_a"]) | set(pairs["path_b"]))
    img_paths = []
    if images is not None:
        images = images.copy()
        images["path"] = [norm_path(p, root) for p in images["path"]]
        img_paths = list(images["path"])
    mapping = _align(img_paths or all_paths, labelled)
    if mapping:
        pairs["path_a"] = pairs["path_a"].map(lambda p: mapping.get(p, p))
        pairs["path_b"] = pairs["path_b"].map(lambda p: mapping.get(p, p))
        if images is not None:
            images["path"] = images["path"].map(lambda p: mapping.get(p, p))
    if "is_duplicate" not in pairs.columns:
        pairs["is_duplicate"] = True
    pairs["is_duplicate"] = pairs["is_duplicate"].fillna(False).astype(bool)
    info = {"rows": int(len(pairs)), "path_prefix_fixed": bool(mapping), "has_stage": "stage" in pairs.columns}
    if "stage" not in pairs.columns:  # an external list of duplicate pairs: no tiers to report
        pairs["stage"] = "screen"
    def labelled_rows(df):
        return df["path_a"].isin(labelled) & df["path_b"].isin(labelled) & (df["path_a"] != df["path_b"])
    info["ignored_unlabelled"] = int((~labelled_rows(pairs)).sum())  # rows of the output itself
    pairs, info["implied_rows"] = expand_exact(pairs)
    keep = labelled_rows(pairs)
    pairs = pairs[keep].copy()
    a, b = pairs["path_a"].to_numpy(), pairs["path_b"].to_numpy()
    pairs["path_a"], pairs["path_b"] = np.where(a < b, a, b), np.where(a < b, b, a)
    # one row per unordered pair: keep the most advanced / positive evidence
    pairs["_rank"] = pairs["stage"].map(STAGE_RANK).fillna(1)
    pairs = pairs.sort_values(["is_duplicate", "_rank"], ascending=False).drop_duplicates(["path_a", "path_b"])
    if images is not None:
        info["images_in_output"] = int(len(images))
        info["labelled_missing_from_output"] = sorted(labelled - set(images["path"]))
        if "error" in images.columns:
            err = images[images["error"].notna() & images["path"].isin(labelled)]
            info["labelled_with_error"] = dict(zip(err["path"], err["error"].astype(str)))
    return pairs, images, info


def expand_exact(pairs: pd.DataFrame, max_product: int = 10_000) -> tuple[pd.DataFrame, int]:
    """Byte-identical files are interchangeable: the pipeline compares only one file of each exact
    group with the rest (and may list a big group as a star). Add the implied rows: every pair
    inside an exact group (stage exact), and for each other row (A, B) the rows (A', B') for all
    A' identical to A and B' identical to B, with the same stage and verdict.
    -> (pairs with the added rows, number of rows added)."""
    exact = pairs[pairs["stage"] == "exact"]
    if exact.empty:
        return pairs, 0
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in zip(exact["path_a"], exact["path_b"]):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members = defaultdict(list)
    for p in list(parent):
        members[find(p)].append(p)
    group = {p: members[find(p)] for p in parent}
    seen = {_key(a, b) for a, b in zip(pairs["path_a"], pairs["path_b"])}
    added = []
    template = exact.iloc[0].to_dict()
    for ms in members.values():
        for a, b in combinations(sorted(ms), 2):
            if (a, b) not in seen:
                seen.add((a, b))
                added.append({**template, "path_a": a, "path_b": b, "stage": "exact", "is_duplicate": True,
                              "reason": "implied: identical bytes"})
    others = pairs[(pairs["stage"] != "exact")]
    others = others[others["path_a"].isin(group) | others["path_b"].isin(group)]
    for row in others.to_dict("records"):
        ga, gb = group.get(row["path_a"], [row["path_a"]]), group.get(row["path_b"], [row["path_b"]])
        if len(ga) * len(gb) > max_product:
            continue
        for a in ga:
            for b in gb:
                k = _key(a, b)
                if a != b and k not in seen:
                    seen.add(k)
                    added.append({**row, "path_a": k[0], "path_b": k[1], "reason": f"implied via exact copy; {row.get('reason', '')}"})
    if not added:
        return pairs, 0
    return pd.concat([pairs, pd.DataFrame(added)], ignore_index=True), len(added)


def _clusters(pairs: pd.DataFrame, images: pd.DataFrame | None, labelled: set[str]) -> dict[str, str]:
    """path -> cluster label, for labelled files (singletons map to themselves)."""
    if images is not None and "cluster_id" in images.columns:
        sub = images[images["path"].isin(labelled)]
        out = {p: p for p in labelled}
        for p, c in zip(sub["path"], sub["cluster_id"]):
            if c is not None and not (isinstance(c, float) and np.isnan(c)) and not pd.isna(c):
                out[p] = f"__c__{c}"
        return out
    parent = {p: p for p in labelled}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    dup = pairs[pairs["is_duplicate"]]
    for a, b in zip(dup["path_a"], dup["path_b"]):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {p: find(p) for p in labelled}


def prf(predicted: set, truth: set) -> dict:
    tp = len(predicted & truth)
    # (nothing predicted: no precision to state, shown "–", as a baseline with no cut reaching a
    # precision is; 1.0 made a run that found nothing read as perfectly precise)
    p = tp / len(predicted) if predicted else float("nan")
    r = tp / len(truth) if truth else 1.0
    f = 2 * p * r / (p + r) if predicted and p + r > 0 else 0.0 if predicted or truth else float("nan")
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": len(predicted) - tp,
            "fn": len(truth) - tp, "predicted": len(predicted), "true": len(truth)}


def bcubed(cluster_of: dict[str, str], group_of: dict[str, str]) -> dict:
    by_c, by_g = defaultdict(set), defaultdict(set)
    for p, c in cluster_of.items():
        by_c[c].add(p)
    for p, g in group_of.items():
        by_g[g].add(p)
    ps, rs = [], []
    for p in group_of:
        c, g = by_c[cluster_of[p]], by_g[group_of[p]]
        inter = len(c & g)
        ps.append(inter / len(c))
        rs.append(inter / len(g))
    P, R = float(np.mean(ps)) if ps else 1.0, float(np.mean(rs)) if rs else 1.0
    return {"precision": P, "recall": R, "f1": 2 * P * R / (P + R) if P + R else 0.0}


def pair_transform(a: str, b: str, tf: dict[str, str], cat: dict[str, str]) -> tuple[str, str]:
    ta, tb = tf.get(a, ""), tf.get(b, "")
    if ta == "original" and tb != "original":
        return tb, cat.get(b, "")
    if tb == "original" and ta != "original":
        return ta, cat.get(a, "")
    return "copy-vs-copy", "copy-vs-copy"


def score(pred, labels, root: str | Path | None = None) -> dict:
    """Score one prediction (see load_prediction) against labels (see load_labels)."""
    labels = labels if isinstance(labels, pd.DataFrame) and "group" in labels.columns else load_labels(labels, root)
    pred = load_prediction(pred, root)
    pairs, images, info = _prepare(pred, labels, root)
    labelled = set(labels["path"])
    truth = true_pairs(labels)
    keys = list(zip(pairs["path_a"], pairs["path_b"]))
    rank = pairs["_rank"].to_numpy()
    dup = pairs["is_duplicate"].to_numpy()
    stages = set(pairs["stage"].dropna().astype(str))
    ran = ["screen"] + [t for t in ("verify", "confirm") if t in stages]
    if "confirm" in ran and "verify" not in ran:
        ran.insert(1, "verify")
    if pred.get("tiers") in STAGE_RANK and pred["tiers"] != "exact":
        ran = list(TIERS[: TIERS.index(pred["tiers"]) + 1])
    if not info["has_stage"]:
        ran = []
    alive = {"screen": set(keys)}
    if "verify" in ran:
        alive["verify"] = {k for k, d, r in zip(keys, dup, rank) if d or r > STAGE_RANK["verify"]}
    if "confirm" in ran:
        alive["confirm"] = {k for k, d in zip(keys, dup) if d}
    final = {k for k, d in zip(keys, dup) if d}
    cluster_of = _clusters(pairs, images, labelled)
    members = defaultdict(list)
    for p, c in cluster_of.items():
        members[c].append(p)
    cluster_pairs = set()
    for ps in members.values():
        if len(ps) > 1:
            cluster_pairs.update(combinations(sorted(ps), 2))
    group_of = dict(zip(labels["path"], labels["group"]))
    result = {
        "files": len(labelled), "true_pairs": len(truth), "info": info,
        "tiers": {t: prf(alive[t], truth) for t in ran},
        "final": prf(final, truth),
        "clusters": prf(cluster_pairs, truth),
        "bcubed": bcubed(cluster_of, group_of),
    }
    # per transform / category (only when the labels carry transforms)
    tf = dict(zip(labels["path"], labels["transform"]))
    cat = dict(zip(labels["path"], labels["category"]))
    if any(v not in ("", None) for v in tf.values()):
        per_t = defaultdict(lambda: defaultdict(int))
        per_c = defaultdict(lambda: defaultdict(int))
        for k in truth:
            t, c = pair_transform(k[0], k[1], tf, cat)
            for d, name in ((per_t, t), (per_c, c)):
                d[name]["n"] += 1
                for tier in ran:
                    d[name][tier] += k in alive[tier]
                d[name]["final"] += k in final
                d[name]["clusters"] += k in cluster_pairs
        cat_of = {t: c for t, c in zip(labels["transform"], labels["category"])}
        result["per_transform"] = {t: {"category": cat_of.get(t, t), **_recalls(v, ran)}
                                   for t, v in sorted(per_t.items())}
        result["per_category"] = {c: _recalls(v, ran) for c, v in sorted(per_c.items())}
    # what went wrong, for reading (a few examples)
    result["false_negatives"] = sorted(truth - final)[:50]
    result["false_positives"] = sorted(final - truth)[:50]
    return result


def _recalls(counts: dict, ran: list[str]) -> dict:
    n = counts["n"]
    out = {"n": n}
    for tier in [*ran, "final", "clusters"]:
        out[f"{tier}_recall"] = counts[tier] / n if n else 1.0
    return out


# ---------------------------------------------------------------------------------------------
# scores for a ranked predictor over all pairs (baselines)

def threshold_sweep(scores: np.ndarray, is_true: np.ndarray, total_true: int, higher_is_closer: bool = True):
    """For a score per candidate pair (all pairs), precision/recall at every cut.
    -> (thresholds, precision, recall) in order of decreasing closeness."""
    s = scores if higher_is_closer else -scores
    if len(s) == 0:  # (a set of fewer than two readable files: no pair, no cut)
        return np.zeros(0, float), np.zeros(0, float), np.zeros(0, float)
    order = np.argsort(-s, kind="stable")
    s_sorted, t_sorted = s[order], is_true[order].astype(np.int64)
    tp = np.cumsum(t_sorted)
    n = np.arange(1, len(s_sorted) + 1)
    # only cut between different score values
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, n, th = tp[last], n[last], s_sorted[last]
    precision = tp / n
    recall = tp / total_true if total_true else np.ones_like(precision)
    return (th if higher_is_closer else -th), precision, recall


def best_f1(th, precision, recall) -> dict:
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    i = int(np.argmax(f1)) if len(f1) else 0
    if not len(f1):
        return {"threshold": float("nan"), "precision": float("nan"), "recall": 0.0, "f1": 0.0}
    return {"threshold": float(th[i]), "precision": float(precision[i]), "recall": float(recall[i]),
            "f1": float(f1[i])}


def at_precision(th, precision, recall, target: float = 0.99) -> dict:
    ok = np.nonzero(precision >= target)[0]
    if not len(ok):
        return {"threshold": float("nan"), "precision": float("nan"), "recall": 0.0, "f1": 0.0}
    i = int(ok[np.argmax(recall[ok])])
    p, r = float(precision[i]), float(recall[i])
    return {"threshold": float(th[i]), "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
