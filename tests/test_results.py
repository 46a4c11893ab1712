"""Results API: loading a real run, rule codes, clusters and keeper policies, the README examples."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.results import KEEP_POLICIES, RULE_CODES, derive_rule, keeper_ids, load_run

REPO = Path(__file__).resolve().parent.parent
# what each rule code says about is_duplicate (None: either)
VERDICT = {"exact_bytes": True, "screen_hash_close": True, "screen_hash_far": False, "verify_orb_accept": True,
           "verify_orb_reject": False, "verify_orb_match": True, "verify_inconclusive_hash_close": True,
           "verify_inconclusive_hash_far": False, "confirm_cosine": True, "confirm_cosine_orb": True,
           "confirm_cosine_low": False, "confirm_no_embedding": None}


@pytest.fixture(scope="module")
def tier_runs(review_data, review_run, tmp_path_factory):
    runs = {"confirm": review_run}
    for tiers in ("screen", "verify"):
        out = tmp_path_factory.mktemp(f"results-{tiers}") / "out"
        assert main(["dedupe", str(review_data), "--out", str(out), "--tiers", tiers, "--scheduler", "sync",
                     "--quiet", "--set", "screen.max_distance=16"]) == 0
        runs[tiers] = out
    return runs


def test_load_run(review_run):
    run = load_run(review_run)
    assert run.manifest["counts"]["files"] == len(run.images) == 21
    assert {"rule", "reason", "stage", "is_duplicate"} <= set(run.pairs.columns)
    assert run.images["abs_path"].map(lambda p: Path(p).is_file()).all()
    assert run.images.loc[run.images["error"].notna(), "path"].tolist() == ["edits/broken.jpg"]
    assert len(run.duplicates()) == run.manifest["counts"]["duplicate_pairs"]
    with pytest.raises(FileNotFoundError, match="not the output folder of a finished run"):
        load_run(review_run.parent)


@pytest.mark.parametrize("tiers", ["screen", "verify", "confirm"])
def test_rule_codes_derived_from_the_reasons_agree_with_the_verdicts(tier_runs, tiers):
    pairs = pd.read_parquet(tier_runs[tiers] / "pairs.parquet")
    rule = derive_rule(pairs)
    assert set(rule) <= set(RULE_CODES), set(rule) - set(RULE_CODES)
    for code, dup in zip(rule, pairs["is_duplicate"]):
        assert VERDICT[code] in (None, dup), code
    expected = {"screen": {"exact_bytes", "screen_hash_close", "screen_hash_far"},
                # (no reject left here: the one pair this run used to reject, a 75 % crop whose hash
                # was closest mirrored, is matched unmirrored: verify.check_pair)
                "verify": {"exact_bytes", "verify_orb_match"},
                "confirm": {"exact_bytes", "verify_orb_accept", "verify_orb_reject", "confirm_cosine_orb"}}[tiers]
    assert expected <= set(rule)
    if tiers == "verify":
        unmirrored = pairs[pairs["reason"].str.contains("b unmirrored", regex=False)]
        assert unmirrored["is_duplicate"].all() and len(unmirrored) >= 1
        assert all(a.split("/")[-1].split("_")[0] == b.split("/")[-1].split(".")[0].split("_")[0]
                   for a, b in zip(unmirrored["path_a"], unmirrored["path_b"]))  # copies of one photo


def test_clusters_one_keeper_each(review_run):
    run = load_run(review_run)
    members = run.clusters()
    assert members.groupby("cluster_id")["keeper"].sum().eq(1).all()
    assert (members["cluster_size"] == members.groupby("cluster_id")["image_id"].transform("size")).all()
    assert members["cluster_size"].is_monotonic_decreasing
    assert len(members) == run.manifest["counts"]["images_in_clusters"]



def test_implied_pairs_are_every_pair_within_each_cluster(review_run):
    """DESIGN: pairs.parquet lists evidence edges, not the transitive closure, and "a results
    API should offer" the expansion: every pair within a cluster, once, a before b in path
    order, marked where pairs.parquet has its evidence; refused past max_pairs."""
    run = load_run(review_run)
    implied = run.implied_pairs()
    sizes = run.images["cluster_id"].value_counts()
    assert len(implied) == int((sizes * (sizes - 1) // 2).sum()) > 0
    assert (implied["path_a"] < implied["path_b"]).all()
    assert not implied.duplicated(["path_a", "path_b"]).any()
    cluster_of = run.images.set_index("image_id")["cluster_id"]
    assert (cluster_of.loc[implied["image_id_a"]].to_numpy() == implied["cluster_id"].to_numpy()).all()
    assert (cluster_of.loc[implied["image_id_b"]].to_numpy() == implied["cluster_id"].to_numpy()).all()
    dups = run.duplicates()
    listed = set(zip(implied.loc[implied["in_pairs"], "path_a"], implied.loc[implied["in_pairs"], "path_b"]))
    assert set(zip(dups["path_a"], dups["path_b"])) <= listed  # (every duplicate edge lies in a cluster)
    with pytest.raises(ValueError, match="above max_pairs=1"):
        run.implied_pairs(max_pairs=1)

def _members():
    t = pd.Timestamp
    return pd.DataFrame({
        "cluster_id": [1, 1, 1, 1, 2, 2],
        "image_id": [10, 11, 12, 13, 20, 21],
        "path": ["b/long/name/x.jpg", "a/x.jpg", "keep/x (1).png", "x.jpg", "p.jpg", "q.jpg"],
        "abs_path": ["/d/b/long/name/x.jpg", "/d/a/x.jpg", "/d/keep/x (1).png", "/d/x.jpg", "/d/p.jpg", "/d/q.jpg"],
        "bytes": [900, 100, 100, 50, 5, 5],
        "width": [100, 400, 400, 200, 10, 10], "height": [100, 300, 300, 200, 10, 10],
        "mtime": [t("2020-01-01", tz="UTC"), t("2021-01-01", tz="UTC"), t("2019-01-01", tz="UTC"),
                  t("2022-01-01", tz="UTC"), t("2020-01-01", tz="UTC"), t("2020-01-01", tz="UTC")],
    })


@pytest.mark.parametrize("keep, prefer, want", [
    ("largest_pixels", (), {1: 11, 2: 20}),  # 11 and 12 tie on pixels and bytes: path decides
    ("largest_file", (), {1: 10, 2: 20}),
    ("oldest", (), {1: 12, 2: 20}),
    ("newest", (), {1: 13, 2: 20}),
    ("shortest_path", (), {1: 13, 2: 20}),
    ("preferred_folder", ["keep", "b"], {1: 12, 2: 20}),
    ("preferred_folder", ["/d/b/"], {1: 10, 2: 20}),
    (lambda g: g["image_id"].max(), (), {1: 13, 2: 21}),
    # (a string for prefer: it was a list of its letters, and no folder matched, unsaid)
    ("preferred_folder", "/d/b/", {1: 10, 2: 20}),
    # (the function gets the cluster's rows with their cluster_id)
    (lambda g: int(g["image_id"][g["cluster_id"] == g["cluster_id"].iloc[0]].min()), (), {1: 10, 2: 20}),
])
def test_keeper_policies(keep, prefer, want):
    assert keeper_ids(_members(), keep, prefer).to_dict() == want


def test_keeper_policy_errors():
    with pytest.raises(ValueError, match="unknown keep policy"):
        keeper_ids(_members(), "biggest")
    with pytest.raises(ValueError, match="needs prefer"):
        keeper_ids(_members(), "preferred_folder")
    # a function that names no member of the cluster: that cluster had no keeper, unsaid
    with pytest.raises(ValueError, match="keep function returned 99, not the image_id of a member of cluster 1"):
        keeper_ids(_members(), lambda g: 99)
    assert set(KEEP_POLICIES) == {"largest_pixels", "largest_file", "oldest", "newest", "shortest_path",
                                  "preferred_folder"}


def test_readme_examples_run(review_run, monkeypatch):
    """Every ```python block of the README's "Results API" section runs against a real run in ./out."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Results API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(review_run.parent)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README


def orb_reason(status, inliers):
    """The verify tier's reason texts (pipeline/verify.py `_verify`, `_error_result`)."""
    if status is None:
        return None
    if inliers == 0:  # an error text that happens to contain " with " must not confuse the derivation
        return "orb inconclusive: image a not decoded (broken with bad bytes)"
    return {"match": f"orb: {inliers} inliers of 40 matches",
            "no-match": f"orb: {inliers} inliers of 40 matches (geometry disagrees)",
            "inconclusive": f"orb inconclusive: {inliers} inliers of 40 matches (between 5 and 15)"}[status]


@pytest.mark.parametrize("tiers, rows", [
    ("confirm", [("exact", 0, None, None, None, "exact_bytes"),
                 ("near", 6, "no-match", 2, None, "verify_orb_reject"),
                 ("near", 6, "match", 30, None, "verify_orb_accept"),
                 ("near", 6, "inconclusive", 12, 0.9, "confirm_cosine"),
                 ("near", 6, "inconclusive", 12, 0.7, "confirm_cosine_orb"),
                 ("near", 6, "inconclusive", 3, 0.5, "confirm_cosine_low"),
                 ("near", 6, "inconclusive", 0, None, "confirm_no_embedding"),
                 ("near", 6, "match", 20, None, "confirm_no_embedding")]),
    ("verify", [("near", 2, "match", 20, None, "verify_orb_match"),
                ("near", 2, "no-match", 1, None, "verify_orb_reject"),
                ("near", 2, "inconclusive", 0, None, "verify_inconclusive_hash_close"),
                ("near", 9, "inconclusive", 0, None, "verify_inconclusive_hash_far")]),
    ("screen", [("near", 2, None, None, None, "screen_hash_close"), ("near", 9, None, None, None, "screen_hash_far")]),
])
def test_rule_derivation_covers_every_branch_of_decide(tiers, rows):
    """Reasons as pipeline/decide.py writes them, for every branch of the rule."""
    from pipeline import decide
    from pipeline.config import load_config
    cfg = load_config(None, [f"tiers={tiers}"])
    frame = pd.DataFrame({
        "kind": [r[0] for r in rows], "hash_distance": pd.array([r[1] for r in rows], dtype="int16"),
        "orb_status": pd.Series([r[2] for r in rows], dtype=object),
        "orb_inliers": pd.array([r[3] for r in rows], dtype="Int32"),
        "orb_reason": [orb_reason(r[2], r[3]) for r in rows],
        "cosine": pd.array([r[4] for r in rows], dtype="Float32"),
    })
    decided = decide.decide(frame, cfg)
    assert derive_rule(decided).tolist() == [r[5] for r in rows]


def test_the_runs_own_frame_and_images_parquet_give_the_same_oldest_keeper():
    """mtime to the microsecond in both (images.parquet keeps no more): two byte copies whose
    mtimes differ by 800 ns within one microsecond are a tie broken by path in the run's report
    as in `dedupe plan` (the run's float seconds made the later path the keeper)."""
    from pipeline.results import normalize_images
    from pipeline.write import images_frame
    base = 1_700_000_000.000_000_1
    images = pd.DataFrame({"image_id": [1, 2], "path": ["a-copy.jpg", "z-copy.jpg"], "cluster_id": [1, 1],
                           "bytes": [10, 10], "width": [5, 5], "height": [5, 5],
                           "mtime": [base + 8e-7, base], "error": [None, None]})
    in_memory = normalize_images(images, root="/data")
    from_file = normalize_images(images_frame(images), root="/data")
    assert (in_memory["mtime"] == from_file["mtime"]).all()
    for frame in (in_memory, from_file):
        assert keeper_ids(frame, "oldest").to_dict() == {1: 1}


def test_load_run_reads_one_generation_while_another_run_publishes(review_run, tmp_path, monkeypatch):
    """The three files come from the generation `current` names when load_run starts: through
    OUT's own links each was found anew, and a run publishing meanwhile gave run.json and
    images.parquet of one run and pairs.parquet of the next."""
    import os
    import shutil
    from pipeline import outdir, results
    out = tmp_path / "out"
    shutil.copytree(review_run, out, symlinks=True)
    gen = outdir.current_generation(out)
    other = gen.parent / "gen-next"
    shutil.copytree(gen, other)
    pd.read_parquet(gen / "pairs.parquet").head(1).to_parquet(other / "pairs.parquet")
    real = pd.read_parquet
    swapped = []

    def read_then_publish(path, *args, **kwargs):
        frame = real(path, *args, **kwargs)
        if not swapped:  # another run commits right after the first file was read
            os.symlink(other.name, gen.parent / "next-link")
            os.replace(gen.parent / "next-link", gen.parent / "current")
            swapped.append(path)
        return frame
    monkeypatch.setattr(results.pd, "read_parquet", read_then_publish)
    run = load_run(out)
    assert swapped and outdir.current_generation(out) == other.resolve()
    assert len(run.pairs) == len(real(gen / "pairs.parquet")) > 1


def test_rule_derivation_covers_the_pixel_check_and_files_changed_during_the_run():
    """Outputs without a `rule` column: a pixel-checked pair that was rejected came back as
    "verify_orb_match", a duplicate's code, and a pair of a file changed during the run as its
    stage's (e.g. "exact_bytes"). The derived column is a category, as the written one."""
    from pipeline import decide
    from pipeline.config import load_config
    cfg = load_config(None, ["tiers=confirm"])
    frame = pd.DataFrame({
        "idx_a": [0, 2, 4], "idx_b": [1, 3, 5], "kind": ["near", "near", "exact"],
        "hash_distance": pd.array([3, 3, 0], dtype="int16"),
        "orb_status": pd.Series(["inconclusive", "inconclusive", None], dtype=object),
        "orb_inliers": pd.array([0, 0, None], dtype="Int32"),
        "orb_reason": ["too few keypoints: 3 and 4", "too few keypoints: 3 and 4", None],
        "cosine": pd.array([None, None, None], dtype="Float32"),
        "ssim": pd.array([0.95, 0.2, None], dtype="Float32"), "hist_corr": pd.array([0.9, 0.9, None], dtype="Float32"),
    })
    decided = decide.mark_changed(decide.decide(frame, cfg), np.array([False, False, False, False, True, False]))
    assert decided["rule"].tolist() == ["verify_pixel_match", "verify_pixel_mismatch", "file_changed"]
    derived = derive_rule(decided.drop(columns="rule"))
    assert derived.tolist() == decided["rule"].tolist() and derived.dtype == "category"


def test_the_api_keeps_its_dtypes_with_no_rows(review_run, tmp_path):
    """A run of no files: images.abs_path was float64 (made from an empty list); implied_pairs()
    gave cluster_id as int64 where clusters() gives Int64, and its paths as object when empty."""
    from pipeline.cli import main
    (tmp_path / "empty").mkdir()
    assert main(["dedupe", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--tiers", "screen",
                 "--scheduler", "sync", "--quiet"]) == 0
    full, empty = load_run(review_run), load_run(tmp_path / "out")
    for run in (full, empty):
        assert run.images["abs_path"].dtype == run.images["path"].dtype
        members, implied = run.clusters(), run.implied_pairs()
        assert members["abs_path"].dtype == members["path"].dtype
        assert implied["cluster_id"].dtype == members["cluster_id"].dtype == "Int64"
        assert implied["path_a"].dtype == implied["path_b"].dtype == run.images["path"].dtype
    assert len(empty.implied_pairs()) == 0 and len(full.implied_pairs()) > 0
