"""The catalog: a re-run after changes equals a run from scratch, settings changes redo only what
they affect, and the catalog survives what a scheduler does (locks, kills, corrupt files)."""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench import transforms
from conftest import kill_when_logged
from pipeline import catalog, outdir, paths, store
from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
# enough pairs reach the confirm tier to exercise the stored embeddings and cosines
COMMON = ["--scheduler", "sync", "--quiet", "--set", "decide.accept_inliers=60"]
FLOAT_ATOL = 1e-5  # orb_score and cosine are float32; stored values are the same numbers


def run(data: Path, out: Path, *args: str) -> dict:
    assert main(["dedupe", str(data), "--out", str(out), *COMMON, *args]) == 0
    return json.loads((out / "run.json").read_text())


def assert_same_outputs(a: Path, b: Path) -> None:
    """pairs.parquet and images.parquet equal up to row order, floats within FLOAT_ATOL."""
    for name, key in (("pairs", ["path_a", "path_b"]), ("images", ["path"])):
        x = pd.read_parquet(a / f"{name}.parquet").sort_values(key).reset_index(drop=True)
        y = pd.read_parquet(b / f"{name}.parquet").sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(x, y, check_exact=False, atol=FLOAT_ATOL, rtol=0)


@pytest.fixture(scope="module")
def generated(photos_dir, tmp_path_factory) -> dict[str, Path]:
    """Set A (8 photos with 4-6 edited copies each + 10 other photos) and set B (2 + 2 more,
    drawn from the same photos, so some of B are byte copies of A's files)."""
    base = tmp_path_factory.mktemp("catalog-sets")
    transforms.generate(base / "A", photos_dir, seed=1, sources=8, distractors=10)
    transforms.generate(base / "B", photos_dir, seed=2, sources=2, distractors=2)
    return {"A": base / "A" / "images", "B": base / "B" / "images"}


@pytest.fixture(scope="module")
def grown(generated, tmp_path_factory):
    """Run on A with the catalog; then add B, a resized copy of an A photo, move one file,
    delete some of A and run again into the same OUT (incremental) and into a new OUT (scratch)."""
    base = tmp_path_factory.mktemp("catalog-runs")
    data = base / "data"
    shutil.copytree(generated["A"], data / "a")
    first = run(data, base / "out")
    shutil.copytree(generated["B"], data / "b")
    src = data / "a" / "g0001_original.jpg"
    with Image.open(src) as im:
        im.convert("RGB").resize((im.width // 2, im.height // 2)).save(data / "b" / "g0001_half.jpg", quality=85)
    (data / "moved").mkdir()
    os.replace(data / "a" / "d0004_distractor.jpg", data / "moved" / "renamed.jpg")
    removed = ["g0000_original.jpg", "d0002_distractor.jpg", "g0003_original.jpg"]
    for name in removed:
        (data / "a" / name).unlink()
    second = run(data, base / "out")
    scratch = run(data, base / "scratch", "--no-catalog")
    return {"data": data, "out": base / "out", "scratch": base / "scratch", "first": first,
            "second": second, "fresh": scratch, "n_added": sum(1 for _ in generated["B"].iterdir()) + 1}


def test_rerun_after_adding_and_deleting_equals_a_run_from_scratch(grown):
    assert_same_outputs(grown["out"], grown["scratch"])
    reuse = grown["second"]["reuse"]
    assert grown["fresh"]["reuse"]["catalog"] is None
    files = grown["second"]["counts"]["files"]
    # only the added files and the moved one were read
    assert reuse["screen"]["screened"] == grown["n_added"] + 1
    assert reuse["screen"]["reused"] == files - grown["n_added"] - 1
    assert reuse["candidates"]["added"] >= 1 and reuse["candidates"]["lists_reused"] > 0
    assert reuse["verify"]["pairs_reused"] > 0 and reuse["verify"]["pairs_verified"] > 0
    assert reuse["problems"] == []
    pairs = pd.read_parquet(grown["out"] / "pairs.parquet")
    gone = {"a/g0000_original.jpg", "a/d0002_distractor.jpg", "a/g0003_original.jpg", "a/d0004_distractor.jpg"}
    assert not (set(pairs["path_a"]) | set(pairs["path_b"])) & gone
    assert "b/g0001_half.jpg" in set(pairs.loc[pairs["is_duplicate"], "path_a"]) | \
        set(pairs.loc[pairs["is_duplicate"], "path_b"])


def test_a_moved_file_costs_no_feature_work(grown):
    cat = catalog.Catalog.load(grown["out"] / "catalog")
    images = cat.images.set_index("path")
    assert "moved/renamed.jpg" in images.index and "a/d0004_distractor.jpg" not in images.index
    # no feature of the moved file's content was computed twice (one row per content + transform)
    feats = cat.features
    assert not feats.duplicated(["kind", "fp", "sha256", "transform"]).any()
    # and nothing of the deleted files' contents is kept unless another file has the same bytes
    present = set(images["sha256"].dropna())
    assert set(feats["sha256"]) <= present
    assert set(cat.evidence["sha_a"]) <= present and set(cat.evidence["sha_b"]) <= present



def test_run_json_has_a_confirm_reuse_entry_when_no_pair_reached_the_tier(photo_paths, tmp_path):
    """reuse.confirm was missing when no pair reached the confirm tier, and a script reading
    reuse["confirm"] as the README shows it failed with a KeyError."""
    data = tmp_path / "data"
    data.mkdir()
    for p in photo_paths[:2]:
        shutil.copyfile(p, data / p.name)
    shutil.copyfile(photo_paths[0], data / "copy.jpg")  # (an exact pair: decided without a tier)
    reuse = run(data, tmp_path / "out")["reuse"]
    assert reuse["confirm"] == {"pairs_reused": 0, "pairs_embedded": 0}

def test_unchanged_rerun_reuses_everything(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    manifest = run(grown["data"], out)
    reuse = manifest["reuse"]
    assert reuse["screen"]["screened"] == 0
    assert reuse["candidates"]["added"] == 0
    assert reuse["candidates"]["rederived_lost_neighbour"] == reuse["candidates"]["rederived_gained_neighbour"] == 0
    assert reuse["verify"]["pairs_verified"] == 0
    assert reuse.get("confirm", {}).get("pairs_embedded", 0) == 0
    assert_same_outputs(out, grown["scratch"])


def test_repeated_texts_of_the_evidence_and_neighbour_tables_are_read_once_per_value(grown, tmp_path):
    """A re-run reads the evidence and neighbour tables whole; their contents, paths, settings and
    reasons repeat on many rows and are read as categoricals (one string per distinct value),
    while the files keep plain text columns, so a catalog stays readable as before. A re-run on
    the loaded tables finds the same lists and evidence (test_unchanged_rerun_reuses_everything)."""
    import pyarrow.parquet as pq
    cat = catalog.Catalog.load(grown["out"] / "catalog")
    for table, columns in catalog.DICTIONARY_COLUMNS.items():
        frame = getattr(cat, table)
        assert len(frame) > 0
        for column in columns:
            assert isinstance(frame[column].dtype, pd.CategoricalDtype), (table, column)
        plain = pq.read_table(grown["out"] / "catalog" / cat.manifest["tables"][table]["file"]).to_pandas()
        for column in columns:  # the same values, the file's type plain text
            assert frame[column].astype(object).where(frame[column].notna(), None).tolist() == \
                plain[column].astype(object).where(plain[column].notna(), None).tolist()
            assert not isinstance(plain[column].dtype, pd.CategoricalDtype)
        assert frame.memory_usage(deep=True).sum() < plain.memory_usage(deep=True).sum()
    # the lists in row numbers through the categoricals' distinct paths
    images = cat.images.sort_values("path").reset_index(drop=True)
    row_of = pd.Series(np.arange(len(images)), index=images["path"].to_numpy(dtype=object))
    got = catalog._rows_of_paths(cat.neighbours["owner"], row_of)
    want = row_of.reindex(cat.neighbours["owner"].astype(object).to_numpy()).fillna(-1).to_numpy(np.int64)
    assert got.tolist() == want.tolist() and (got >= 0).all()
    assert catalog._rows_of_paths(pd.Series(["nowhere", None], dtype="category"), row_of).tolist() == [-1, -1]


def test_rehash_reads_every_file_and_still_reuses_unchanged_content(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    target = grown["data"] / "a" / "g0001_original.jpg"
    before = target.stat()
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # touched, same bytes
    try:
        manifest = run(grown["data"], out, "--rehash")
    finally:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert manifest["reuse"]["screen"]["screened"] == 0  # every sha256 matched
    assert manifest["reuse"]["screen"]["reused"] == manifest["counts"]["files"]


def test_rehash_screens_a_file_whose_content_changed(grown, tmp_path):
    """--rehash finds the file whose bytes differ from the catalog's and screens it again (the run
    failed on it: its error column, empty, had been read back as floats)."""
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    target = grown["data"] / "a" / "g0001_original.jpg"
    original, before = target.read_bytes(), target.stat()
    target.write_bytes(original + b"\0" * 16)  # trailing bytes: the same picture, another sha256
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    try:
        manifest = run(grown["data"], out, "--rehash")
    finally:
        target.write_bytes(original)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert manifest["reuse"]["screen"]["screened"] == 1
    assert manifest["reuse"]["screen"]["why_screened"] == {"content_changed": 1}
    assert manifest["counts"]["changed_during_run"] == 0
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert images.loc["a/g0001_original.jpg", "bytes"] == len(original) + 16
    assert images["error"].isna().all()


def test_decide_change_redecides_from_stored_scores(grown, tmp_path, monkeypatch):
    from pipeline import confirm
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    parts_before = sorted((out / "catalog" / "features").rglob("part-*.parquet"))
    change = ["--set", "decide.cosine_threshold=0.9", "--set", "decide.support_inliers=20"]
    models: dict = {}
    monkeypatch.setattr(confirm, "_MODELS", models)  # (the models this process builds)
    # ("auto": in-process on a pool of threads, where the model is built ahead of the tiers)
    manifest = run(grown["data"], out, *change, "--scheduler", "auto")
    assert models == {}  # no model was built, not even ahead of the tiers (it was, for nothing)
    reuse = manifest["reuse"]
    assert reuse["screen"]["screened"] == 0 and reuse["verify"]["pairs_verified"] == 0
    assert reuse["confirm"]["pairs_embedded"] == 0 and reuse["confirm"]["pairs_reused"] > 0
    assert sorted((out / "catalog" / "features").rglob("part-*.parquet")) == parts_before  # no ORB, no model
    fresh = tmp_path / "fresh"
    run(grown["data"], fresh, "--no-catalog", *change)
    assert_same_outputs(out, fresh)


def _failing(module, name: str, broken: str):
    """`module.name` made to fail for files named `broken` (a read that fails once)."""
    from pipeline.decode import DecodeError
    real = getattr(module, name)

    def fails(path, *a, **k):
        if str(path).endswith(broken):
            raise DecodeError(f"cannot read: {path}: a read that failed once")
        return real(path, *a, **k)
    return fails


def test_features_that_failed_are_made_again_and_their_pairs_scored_again(generated, tmp_path, monkeypatch):
    """A stored failure whose cause may be gone is not a result: an image the screen decoded
    whose ORB features or embedding failed at the last run for a read (or memory) has them made
    again, and its pairs (inconclusive, or with no cosine) are scored again, so the re-run's
    outputs equal a run from scratch (before, the failure was reused for as long as the bytes
    were unchanged). A failure that is the bytes' own is reused."""
    from pipeline import confirm, verify
    from pipeline.decode import DecodeError
    real_bounded = verify._load_bounded
    data = tmp_path / "data"
    shutil.copytree(generated["A"], data)
    run(data, tmp_path / "fresh", "--no-catalog")
    fresh = pd.read_parquet(tmp_path / "fresh" / "pairs.parquet")
    # ORB: a file's features fail
    broken = "g0001_original.jpg"
    with monkeypatch.context() as m:
        m.setattr(verify, "_load_bounded", _failing(verify, "_load_bounded", broken))
        run(data, tmp_path / "orb")
    pairs = pd.read_parquet(tmp_path / "orb" / "pairs.parquet")
    failed = pairs[(pairs["path_a"] == broken) | (pairs["path_b"] == broken)]
    assert len(failed) and failed["reason"].str.contains("a read that failed once").all()
    reuse = run(data, tmp_path / "orb")["reuse"]
    assert reuse["verify"]["features_redone_failed_last_time"] >= 1
    assert reuse["verify"]["why_verified"]["failed_last_time"] == reuse["verify"]["pairs_verified"] == len(failed)
    assert reuse["verify"]["pairs_reused"] > 0
    assert_same_outputs(tmp_path / "orb", tmp_path / "fresh")
    again = run(data, tmp_path / "orb")["reuse"]  # what was made again is reused
    assert again["verify"]["pairs_verified"] == 0 and again["verify"].get("features_redone_failed_last_time", 0) == 0

    # a failure that is the bytes' own (here a decoder's) is kept like a result: not tried again
    def corrupt(path, *a, **k):
        raise DecodeError("cannot decode: broken data stream")
    with monkeypatch.context() as m:
        m.setattr(verify, "_load_bounded", lambda path, *a, **k: corrupt(path) if str(path).endswith(broken)
                  else real_bounded(path, *a, **k))
        run(data, tmp_path / "lasting")
    reuse = run(data, tmp_path / "lasting")["reuse"]
    assert reuse["verify"]["pairs_verified"] == 0 and reuse["verify"].get("features_redone_failed_last_time", 0) == 0

    # the model: the embedding of a file whose pairs reach the confirm tier fails (most pairs
    # do, with ORB's bar for accepting raised)
    confirming = ("--set", "decide.accept_inliers=400")
    run(data, tmp_path / "fresh_model", "--no-catalog", *confirming)
    fresh = pd.read_parquet(tmp_path / "fresh_model" / "pairs.parquet")
    broken = fresh.loc[fresh["cosine"].notna(), "path_a"].iloc[0]
    with monkeypatch.context() as m:
        m.setattr(confirm, "load_input", _failing(confirm, "load_input", broken))
        run(data, tmp_path / "model", *confirming)
    pairs = pd.read_parquet(tmp_path / "model" / "pairs.parquet")
    assert pairs.loc[(pairs["path_a"] == broken) & (pairs["stage"] == "confirm"), "cosine"].isna().all()
    reuse = run(data, tmp_path / "model", *confirming)["reuse"]
    assert reuse["confirm"]["embeddings_redone_failed_last_time"] >= 1 and reuse["confirm"]["pairs_embedded"] > 0
    assert reuse["confirm"]["pairs_reused"] > 0 and reuse["verify"]["pairs_verified"] == 0
    assert_same_outputs(tmp_path / "model", tmp_path / "fresh_model")


def test_nothing_made_of_a_file_rewritten_during_the_run_is_kept(generated, tmp_path, monkeypatch):
    """The tiers of a file rewritten while the run went on may have read its new bytes, which the
    catalog would keep under the sha256 of the old: no feature and no evidence of that content is
    kept, and the next run reads the file again and scores its pairs, equal to a fresh run."""
    from pipeline import decide, scan
    data = tmp_path / "data"
    shutil.copytree(generated["A"], data)
    changed = "g0001_original.jpg"
    real = scan.changed_since
    with monkeypatch.context() as m:
        m.setattr(scan, "changed_since", lambda paths, sizes, mtimes: [
            str(p).endswith(changed) or c for p, c in zip(list(paths), real(paths, sizes, mtimes))])
        first = run(data, tmp_path / "out")
    assert first["counts"]["changed_during_run"] == 1
    images = pd.read_parquet(tmp_path / "out" / "images.parquet").set_index("path")
    assert images.loc[changed, "error"] == decide.CHANGED_ERROR
    sha = images.loc[changed, "sha256"]
    cat = catalog.Catalog.load(tmp_path / "out" / "catalog")
    assert len(cat.features) and not (cat.features["sha256"] == sha).any()
    assert len(cat.evidence) and not ((cat.evidence["sha_a"] == sha) | (cat.evidence["sha_b"] == sha)).any()
    reuse = run(data, tmp_path / "out")["reuse"]
    assert reuse["screen"]["why_screened"] == {"failed_last_time": 1}
    assert reuse["verify"]["pairs_verified"] > 0 and reuse["verify"]["pairs_reused"] > 0
    run(data, tmp_path / "fresh", "--no-catalog")
    assert_same_outputs(tmp_path / "out", tmp_path / "fresh")


def test_which_failures_are_tried_again():
    """Reads, permissions, memory and limits in no fingerprint are tried again; a corrupt or
    unsupported file's failure is its bytes' own. Each text tried again is still made by the
    module that makes it (a reworded message would silently stop its retry)."""
    errors = pd.Series(["cannot read: Connection reset by peer", None, "not a recognised image format",
                        "cannot decode: MemoryError: ", "file too large: 9 bytes exceeds scan.max_file_bytes=1",
                        "no features: OpenCV: (-215) ...", "cannot decode: broken data stream", None,
                        "permission denied"], dtype="category")
    assert catalog.tried_again(errors).tolist() == [True, False, False, True, True, False, False, False, True]
    # the screen reads the bytes before decoding them (its "cannot open" is a corrupt header) and
    # its fingerprint holds the decode budget
    screen = pd.Series(["cannot open: Truncated File Read", "image too large to decode: 9x9 RGB needs 1 bytes",
                        "cannot read: Connection reset by peer"])
    assert catalog.tried_again(screen, screen=True).tolist() == [False, False, True]
    assert catalog.tried_again(screen).tolist() == [True, True, True]
    sources = "".join((Path(catalog.__file__).parent / name).read_text()
                      for name in ("scan.py", "screen.py", "decode.py", "verify.py", "confirm.py", "decide.py"))
    for text in catalog.TRIED_AGAIN:
        assert f'"{text}' in sources or f'f"{text}' in sources or f'("{text}' in sources, text


def test_a_decode_that_runs_out_of_memory_says_so_and_is_tried_again(tmp_path, monkeypatch):
    """numpy's allocation error has a message of its own ("Unable to allocate ..."): the decode
    failure names MemoryError, so the record and features are made again at the next run."""
    from pipeline import decode
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    def short_of_memory(img):
        raise MemoryError("Unable to allocate 2.00 PiB for an array")
    monkeypatch.setattr(decode, "to_rgb", short_of_memory)
    with pytest.raises(decode.DecodeError) as failed:
        decode.load_image(str(path))
    assert "MemoryError" in str(failed.value) and catalog.tried_again([str(failed.value)], screen=True).all()


def test_scores_made_from_failed_features_are_dropped_key_by_key():
    """`without_failed_scores`: a row scored with a failed ORB feature key goes, one whose
    embedding key failed loses its cosine only; a failed key no pair of a row uses (B's flipped
    features, for a plain pair) leaves it as it was, so a failure no pair needs again does not
    make its content's pairs be scored at every run."""
    from pipeline import confirm, verify
    sha = {c: (c * 15) + "0" * 49 for c in "ABCD"}  # (content ids from the first 15 hex digits)
    cid = {c: catalog.content_ids([sha[c]])[0] for c in sha}
    evidence = pd.DataFrame({
        "sha_a": [sha["A"], sha["A"], sha["C"], sha["A"]], "sha_b": [sha["B"], sha["B"], sha["B"], sha["D"]],
        "transform": pd.array([0, 4, 0, 0], dtype="int8"), "orb_fp": ["o"] * 4,
        "orb_matches": pd.array([0, 0, 7, 9], dtype="Int32"), "cosine": pd.array([0.9, 0.8, None, 0.7], dtype="Float32"),
        "embed_fp": ["e", "e", None, "e"]})
    for column in ("sha_a", "sha_b", "orb_fp", "embed_fp"):
        evidence[column] = evidence[column].astype("category")
    keys = {"orb": verify.pair_feature_keys, "embed": confirm.pair_embedding_keys}
    failed = {"orb": pd.DataFrame({"sha256": [sha["B"]], "key": [cid["B"] * 8 + 4]}),  # B flipped
              "embed": pd.DataFrame({"sha256": [sha["D"]], "key": [cid["D"] * 8]})}  # D plain
    out = catalog.without_failed_scores(evidence, failed, keys)
    # A-B and C-B, plain, use B plain: kept; A-B mirrored uses B flipped: gone; A-D's cosine used D
    assert out.index.tolist() == [0, 2, 3]
    assert pd.isna(out.loc[3, "cosine"]) and pd.isna(out.loc[3, "embed_fp"]) and out.loc[3, "orb_matches"] == 9
    assert out.loc[0, "cosine"] == np.float32(0.9) and out.loc[0, "embed_fp"] == "e"
    assert catalog.without_failed_scores(evidence, {"orb": failed["orb"].iloc[:0]}, keys) is evidence
    pd.testing.assert_frame_equal(evidence.iloc[[0, 1, 2, 3]], evidence)  # (the input is left as it was)


def test_scores_made_from_features_that_failed_under_other_settings_are_dropped_too(tmp_path):
    """`run.drop_failed_scores` looks at the failures of every stored setting: a run under other
    settings forgets the feature rows of the old ones (`features_table`) but keeps the scores of
    pairs it did not score again, and a return to the old settings would have reused a score made
    from a failure with nothing left to say so. It returns the pairs whose ORB scores it dropped
    (for run.json's why_verified.failed_last_time)."""
    from pipeline.run import drop_failed_scores
    sha = {c: (c * 15) + "0" * 49 for c in "ABCD"}
    cid = {c: catalog.content_ids([sha[c]])[0] for c in sha}
    features = pd.DataFrame({"kind": ["orb", "orb", "orb"], "fp": ["OLD", "NEW", "NEW"],
                             "sha256": [sha["B"], sha["D"], sha["A"]], "transform": [0, 0, 0],
                             "key": [cid["B"] * 8, cid["D"] * 8, cid["A"] * 8], "part": ["p0", "p1", "p1"],
                             "error": ["cannot read: a read that failed", "cannot read: gone", None]})
    evidence = pd.DataFrame({
        "sha_a": [sha["A"], sha["A"], sha["A"]], "sha_b": [sha["B"], sha["C"], sha["D"]],
        "transform": pd.array([0, 0, 0], dtype="int8"), "orb_fp": ["old", "old", "new"],
        "orb_matches": pd.array([0, 12, 0], dtype="Int32"), "cosine": pd.array([None, None, None], dtype="Float32"),
        "embed_fp": [None, None, None]})
    cat = catalog.Catalog(tmp_path, features=features)
    cat.evidence = evidence
    dropped = drop_failed_scores(cat, {"orb_features": "NEW", "embed": "E"})
    assert sorted(dropped.tolist()) == sorted([(cid["A"], cid["B"], 0), (cid["A"], cid["D"], 0)])
    # A-B was scored from B's features that failed under the old settings, A-D from D's under the new
    assert cat.evidence["sha_b"].tolist() == [sha["C"]]


def test_verify_change_recomputes_orb_only(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    manifest = run(grown["data"], out, "--set", "verify.n_features=400")
    reuse = manifest["reuse"]
    assert reuse["screen"]["screened"] == 0
    assert reuse["verify"]["pairs_reused"] == 0
    assert reuse["verify"]["why_verified"]["settings_changed"] == reuse["verify"]["pairs_verified"] > 0
    assert reuse["verify"]["features_redone_settings_changed"] > 0
    assert reuse["confirm"].get("embeddings_redone_settings_changed", 0) == 0
    # a setting that only affects matching keeps the features
    manifest = run(grown["data"], out, "--set", "verify.n_features=400", "--set", "verify.ratio=0.75")
    assert manifest["reuse"]["verify"]["features_computed"] == 0
    assert manifest["reuse"]["verify"]["features_reused"] > 0


def test_embed_change_recomputes_embeddings_only(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    manifest = run(grown["data"], out, "--set", "embed.resize=crop")
    reuse = manifest["reuse"]
    assert reuse["screen"]["screened"] == 0 and reuse["verify"]["pairs_verified"] == 0
    assert reuse["confirm"]["pairs_reused"] == 0 and reuse["confirm"]["embeddings_computed"] > 0
    assert reuse["confirm"]["embeddings_redone_settings_changed"] > 0


def test_screen_change_rehashes(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    manifest = run(grown["data"], out, "--tiers", "screen", "--set", "screen.border_tolerance=10")
    assert manifest["reuse"]["screen"]["reused"] == 0
    assert manifest["reuse"]["screen"]["why_screened"]["screen_settings_changed"] == manifest["counts"]["files"]
    assert manifest["reuse"]["candidates"]["searched_all_because"] == "screen or search settings, or the search code, changed"


def test_corrupt_catalog_files_are_reported_and_rebuilt(grown, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    cat_dir = out / "catalog"
    manifest = json.loads((cat_dir / catalog.MANIFEST).read_text())
    evidence = cat_dir / manifest["tables"]["evidence"]["file"]
    evidence.write_bytes(evidence.read_bytes()[:-50] + b"\0" * 50)  # same size, other bytes
    part = cat_dir / sorted(manifest["parts"])[0]
    part.write_bytes(b"not parquet")
    result = run(grown["data"], out)
    problems = result["reuse"]["problems"]
    assert any("evidence" in p and "checksum" in p for p in problems)
    assert any(p.startswith(str(part.relative_to(cat_dir))) for p in problems) or \
        any("features" in p for p in problems)
    assert "checksum mismatch" in caplog.text
    assert result["reuse"]["verify"]["pairs_verified"] > 0  # evidence lost: pairs scored again
    assert_same_outputs(out, grown["scratch"])
    again = run(grown["data"], out)  # the rebuilt catalog is whole again
    assert again["reuse"]["problems"] == [] and again["reuse"]["verify"]["pairs_verified"] == 0


def test_a_corrupt_manifest_means_a_rebuild_and_query_refuses_a_damaged_catalog(grown, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    cat_dir = out / "catalog"
    manifest = json.loads((cat_dir / catalog.MANIFEST).read_text())
    images_table = cat_dir / manifest["tables"]["images"]["file"]
    images_table.write_bytes(images_table.read_bytes()[:100])  # truncated
    image = str(grown["data"] / "b" / "g0001_half.jpg")
    assert main(["query", image, "--catalog", str(cat_dir)]) == 2
    assert "damaged" in capsys.readouterr().err
    (cat_dir / catalog.MANIFEST).write_text("{not json")
    result = run(grown["data"], out)
    assert any("manifest" in p for p in result["reuse"]["problems"])
    assert result["reuse"]["screen"]["reused"] == 0  # nothing trusted
    assert_same_outputs(out, grown["scratch"])
    assert main(["query", image, "--catalog", str(cat_dir)]) == 0  # rebuilt


def test_a_second_run_on_the_same_catalog_exits_2_naming_the_holder(grown, tmp_path, capsys):
    cat_dir = tmp_path / "shared-catalog"
    cat_dir.mkdir()
    with outdir.locked(cat_dir, name=catalog.LOCK_NAME, what="catalog", option="--catalog"):
        code = main(["dedupe", str(grown["data"]), "--out", str(tmp_path / "o"), "--catalog", str(cat_dir),
                     *COMMON])
    assert code == 2
    err = capsys.readouterr().err
    assert f"the catalog {str(cat_dir)!r} is in use" in err and f"pid {os.getpid()}" in err
    assert "another --catalog" in err  # the option that fixes it, not --out
    assert main(["dedupe", str(grown["data"]), "--out", str(tmp_path / "o"), "--catalog", "x", "--no-catalog",
                 *COMMON]) == 2


def test_kill_9_mid_run_leaves_a_usable_catalog(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    manifest_before = (out / "catalog" / catalog.MANIFEST).read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    changed = ["--set", "verify.n_features=450"]  # so the run has ORB work to be killed in
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(grown["data"]), "--out", str(out),
                             *COMMON, *changed], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    kill_when_logged(proc, "verify: started")  # the features are written, no pair is scored yet
    assert proc.returncode == -signal.SIGKILL
    assert (out / "catalog" / catalog.MANIFEST).read_bytes() == manifest_before
    # the last good catalog is used as it was
    result = run(grown["data"], out)
    assert result["reuse"]["problems"] == []
    assert result["reuse"]["verify"]["pairs_verified"] == 0
    assert_same_outputs(out, grown["scratch"])


def test_features_a_killed_run_finished_are_adopted(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    changed = ["--set", "verify.n_features=450"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(grown["data"]), "--out", str(out),
                             *COMMON, *changed], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    kill_when_logged(proc, "verify: started")
    result = run(grown["data"], out, *changed)
    verify = result["reuse"]["verify"]
    assert verify["features_adopted_from_killed_run"] > 0 and verify["features_computed"] == 0
    fresh = tmp_path / "fresh"
    run(grown["data"], fresh, "--no-catalog", *changed)
    assert_same_outputs(out, fresh)


def test_screen_embeddings_a_killed_run_finished_are_counted_apart(grown, tmp_path):
    """High-recall: the screen's embeddings a killed run wrote are adopted by the next run, and
    run.json counted them among the reused too (the tiers count them apart): reused, computed and
    adopted now add up to the images embedded."""
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(grown["data"]), "--out", str(out),
                             *COMMON, "--preset", "high-recall"], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    kill_when_logged(proc, "candidates: started")  # (every screen embedding written, nothing committed)
    info = run(grown["data"], out, "--preset", "high-recall")["reuse"]["screen_embed"]
    assert info["embeddings_adopted_from_killed_run"] > 0, info
    assert info["embeddings_reused"] + info["embeddings_computed"] + info["embeddings_adopted_from_killed_run"] \
        == info["images"], info


def test_a_killed_runs_features_of_a_damaged_part_are_adopted(grown, tmp_path):
    """A listed part that fails its check has its features made again; when that run is killed,
    the next adopts them, though the catalog still lists their keys (under the damaged part): the
    parts a compaction replaced, whose keys are listed elsewhere, are the ones not adopted."""
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    parts = sorted(p for p in json.loads((out / "catalog" / catalog.MANIFEST).read_text())["parts"]
                   if p.startswith("features/orb/"))
    victim = out / "catalog" / parts[0]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:-40] + bytes(40))  # (the same size, other bytes: fails its checksum)
    changed = ["--set", "verify.ratio=0.76"]  # (the pairs scored again from the stored features)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dedupe", str(grown["data"]), "--out", str(out),
                             *COMMON, *changed], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    kill_when_logged(proc, "verify: started")
    verify = run(grown["data"], out, *changed)["reuse"]["verify"]
    assert verify["features_adopted_from_killed_run"] > 0 and verify["features_computed"] == 0


# ---------------------------------------------------------------------------------------------
# dedupe query


def _batch_rows(out: Path, path: str) -> pd.DataFrame:
    """The batch job's pairs of `path`, as (other path, evidence, verdict) rows."""
    pairs = pd.read_parquet(out / "pairs.parquet")
    mine = pairs[(pairs["path_a"] == path) | (pairs["path_b"] == path)]
    other = mine["path_a"].where(mine["path_b"] == path, mine["path_b"])
    return mine.assign(path=other.to_numpy())


COMPARED = ["path", "hash_distance", "orb_matches", "orb_inliers", "orb_score", "cosine", "is_duplicate", "rule"]


def _same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The query's rows are the batch job's pairs of the file; a file with none has one row
    saying so (no path, not a duplicate, "no candidate")."""
    alone = got["path"].isna()
    if alone.any():
        assert alone.sum() == len(got) == 1 and not len(want) and got["reason"].iloc[0].startswith("no candidate")
        return
    got = got[COMPARED].sort_values("path").reset_index(drop=True)
    want = want[COMPARED].sort_values("path").reset_index(drop=True)
    for frame in (got, want):
        frame["rule"] = frame["rule"].astype(str)
        frame["hash_distance"] = frame["hash_distance"].astype("int64")
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=FLOAT_ATOL, rtol=0, check_dtype=False)


def test_query_of_a_catalog_image_gives_the_batch_pairs(grown):
    from pipeline.query import query
    cat_dir = grown["out"] / "catalog"
    manifest = (cat_dir / catalog.MANIFEST).read_bytes()
    asked = ("b/g0001_half.jpg", "a/g0001_original.jpg", "moved/renamed.jpg")
    for rel in asked:
        got = query([grown["data"] / rel], cat_dir)
        want = _batch_rows(grown["out"], rel)
        assert (got["query"] == str(grown["data"] / rel)).all()
        _same_rows(got, want)
    together = query([grown["data"] / rel for rel in asked], cat_dir)  # (one call: each its own rows)
    for rel in asked:
        _same_rows(together[together["query"] == str(grown["data"] / rel)], _batch_rows(grown["out"], rel))
    assert (cat_dir / catalog.MANIFEST).read_bytes() == manifest  # nothing added without add=True


def test_query_of_a_new_image_equals_adding_it_to_the_folder(grown, tmp_path):
    from pipeline.query import query
    new = tmp_path / "new.jpg"
    with Image.open(grown["data"] / "a" / "g0002_original.jpg") as im:
        im.convert("RGB").resize((im.width * 2 // 3, im.height * 2 // 3)).save(new, quality=80)
    got = query([new], grown["out"] / "catalog")
    assert got["is_duplicate"].any() and "a/g0002_original.jpg" in set(got.loc[got["is_duplicate"], "path"])
    # the batch job on the folder with this image added (its path sorts last, as the query's side does)
    data = tmp_path / "data"
    shutil.copytree(grown["data"], data)
    (data / "zz").mkdir()
    shutil.copyfile(new, data / "zz" / "new.jpg")
    out = tmp_path / "out"
    run(data, out, "--no-catalog")
    _same_rows(got, _batch_rows(out, "zz/new.jpg"))


def test_query_cli_outputs_and_errors(grown, tmp_path, capsys):
    cat_dir = str(grown["out"] / "catalog")
    image = str(grown["data"] / "b" / "g0001_half.jpg")
    for ext in ("parquet", "csv", "json"):
        target = tmp_path / f"hits.{ext}"
        assert main(["query", image, "--catalog", cat_dir, "--output", str(target)]) == 0
        frame = {"parquet": pd.read_parquet, "csv": pd.read_csv, "json": pd.read_json}[ext](target)
        assert len(frame) and frame["is_duplicate"].any() and "rule" in frame
    # an --output in a folder that does not exist: refused before any work
    assert main(["query", image, "--catalog", cat_dir, "--output", str(tmp_path / "no" / "such" / "h.csv")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    copy = tmp_path / "copy.jpg"  # a byte copy of a catalog image, outside the folder
    shutil.copyfile(grown["data"] / "a" / "g0001_original.jpg", copy)
    assert main(["query", image, str(copy), "--catalog", cat_dir]) == 0
    table = capsys.readouterr().out
    assert "a/g0001_original.jpg" in table and "exact_bytes" in table
    assert main(["query", image, "--catalog", cat_dir, "--output", str(tmp_path / "x.txt")]) == 2
    assert "extension" in capsys.readouterr().err
    assert main(["query", image, "--catalog", str(tmp_path / "nothing")]) == 2
    assert "no catalog" in capsys.readouterr().err
    assert main(["query", str(tmp_path / "missing.jpg"), "--catalog", cat_dir]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["query", "s3://bucket/data/photo.jpg", "--catalog", cat_dir]) == 2  # (said so, not "does not exist")
    assert "is a URL: query images are local files" in capsys.readouterr().err
    assert main(["query", image, "--catalog", cat_dir, "--set", "screen.hash=phash"]) == 2
    assert "screen settings" in capsys.readouterr().err
    for other in ("dask.scheduler=tcp://127.0.0.1:1", "catalog=none", "work_dir=/tmp/x", "report.keep=oldest"):
        assert main(["query", image, "--catalog", cat_dir, "--set", other]) == 2  # (accepted and ignored)
        assert "settings apply to `query`" in capsys.readouterr().err
    assert main(["query", image, "--catalog", cat_dir, "--set", "decide.accept_inliers=30", "--set",
                 "tiers=verify"]) == 0


def test_query_files_are_listed_as_the_batch_job_lists_them(grown, tmp_path, monkeypatch):
    """A query file is classified as the batch job's listing classifies it (`scan.classify`, with
    the catalog's scan settings): an unreadable one is a row saying so (it was a traceback, and
    no answer for the other query files), an empty one "empty file" (it was "not an image")."""
    from pipeline import paths as paths_mod, query
    image = str(grown["data"] / "b" / "g0001_half.jpg")
    locked, empty = tmp_path / "locked.jpg", tmp_path / "empty.jpg"
    shutil.copyfile(image, locked)
    empty.write_bytes(b"")
    real_open = paths_mod.open_bytes

    def open_bytes(path, *a, **k):  # (chmod does not stop root, who may run the tests)
        if os.fsdecode(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)
    monkeypatch.setattr(paths_mod, "open_bytes", open_bytes)
    hits = query.query([image, str(locked), str(empty)], grown["out"] / "catalog")
    errors = hits.groupby("query")["query_error"].first()
    assert errors[str(locked)] == "cannot read: Permission denied" and errors[str(empty)] == "empty file"
    assert pd.isna(errors[image]) and hits.loc[hits["query"] == image, "is_duplicate"].any()


def test_query_add_records_the_image_for_the_next_run(grown, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(grown["data"], data)
    out = tmp_path / "out"
    run(data, out)  # a catalog of this copy of the folder
    with Image.open(data / "a" / "g0002_original.jpg") as im:
        im.convert("RGB").rotate(90, expand=True).save(data / "b" / "added.jpg", quality=88)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copyfile(data / "b" / "added.jpg", outside)
    assert main(["query", str(outside), "--catalog", str(out / "catalog"), "--add"]) == 2  # not in the folder
    assert main(["query", str(data / "b" / "added.jpg"), "--catalog", str(out / "catalog"), "--add"]) == 0
    cat = catalog.Catalog.load(out / "catalog")
    assert "b/added.jpg" in set(cat.images["path"])
    manifest = run(data, out)
    reuse = manifest["reuse"]
    assert reuse["screen"]["screened"] == 0  # the added image was already known
    assert reuse["candidates"]["added"] == 0
    fresh = tmp_path / "fresh"
    run(data, fresh, "--no-catalog")
    assert_same_outputs(out, fresh)



def test_query_of_catalog_files_changed_since_and_mistakes_refused_before_any_work(grown, tmp_path, capsys):
    """A catalog file removed or rewritten since the catalog's run: a query still called an edited
    copy a duplicate of it (its stored hashes and features are of the old bytes), and the reason
    said a run had seen it change. Now such a pair is not decided, rule file_changed, saying
    why. And refused at once, exit 2, before the catalog is touched: an --output folder that
    cannot be written (a traceback after --add had written the catalog), and --add of a file the
    batch job does not list (not an image by content or name; inside a run's OUT in DATA)."""
    from pipeline import query
    data = tmp_path / "data"
    shutil.copytree(grown["data"], data)
    out = tmp_path / "out"
    run(data, out)
    cat_dir = out / "catalog"
    edited = tmp_path / "edited.jpg"
    with Image.open(data / "a" / "g0001_original.jpg") as im:
        im.convert("RGB").resize((im.width * 2 // 3, im.height * 2 // 3)).save(edited, quality=80)
    hits = query.query([str(edited)], cat_dir)
    dups = sorted(hits.loc[hits["is_duplicate"].astype(bool), "path"])
    assert "a/g0001_original.jpg" in dups and (hits["rule"] != "file_changed").all()
    other = next(p for p in sorted((data / "a").iterdir()) if p.name.startswith("d"))
    (data / dups[0]).unlink()
    for name in dups[1:]:
        (data / name).write_bytes(other.read_bytes())  # (rewritten with another picture)
    again = query.query([str(edited)], cat_dir).set_index("path")
    assert (~again.loc[dups, "is_duplicate"].astype(bool)).all()
    assert (again.loc[dups, "rule"] == "file_changed").all()
    assert (again.loc[dups, "reason"] == query.CHANGED_SINCE_CATALOG).all()

    image = str(data / "b" / "g0001_half.jpg")
    before = (cat_dir / catalog.MANIFEST).read_bytes()
    assert main(["query", image, "--catalog", str(cat_dir), "--add", "--output", "/proc/hits.csv"]) == 2
    assert "its folder cannot be written" in capsys.readouterr().err
    notes = data / "notes.txt"
    notes.write_text("not a picture")
    held = data / "old-out"
    held.mkdir()
    (held / outdir.LOCK_NAME).write_text("")
    shutil.copyfile(image, held / "thumb.jpg")
    for path, why in ((notes, "is not an image"), (held / "thumb.jpg", "output or catalog folder")):
        assert main(["query", str(path), "--catalog", str(cat_dir), "--add"]) == 2
        assert why in capsys.readouterr().err
    assert (cat_dir / catalog.MANIFEST).read_bytes() == before



def test_a_catalog_file_whose_name_is_not_utf8_is_not_taken_for_a_changed_one(photo_paths, tmp_path):
    """A catalog file whose name is not UTF-8 was looked for by its text form (`caf\\xe9.jpg`):
    its features, made at query time, said "changed during the run", and the check for files
    changed since the catalog's run called it removed. Its own name is used now."""
    from pipeline import query
    data = tmp_path / "data"
    data.mkdir()
    odd = os.fsdecode(bytes(data) + b"/caf\xe9.jpg")
    shutil.copyfile(photo_paths[0], odd)
    for p in photo_paths[1:4]:
        shutil.copyfile(p, data / p.name)
    run(data, tmp_path / "out")
    copy = tmp_path / "copy.jpg"
    with Image.open(photo_paths[0]) as im:
        im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4)).save(copy, quality=85)
    hits = query.query([str(copy)], tmp_path / "out" / "catalog")
    row = hits[hits["path"] == "caf\\xe9.jpg"]
    assert len(row) == 1 and row["is_duplicate"].iloc[0] and row["rule"].iloc[0] != "file_changed", row[["is_duplicate", "rule", "reason"]].iloc[0].tolist()
    os.unlink(odd)  # (gone, it is not a duplicate)
    again = query.query([str(copy)], tmp_path / "out" / "catalog")
    assert not again.loc[again["path"] == "caf\\xe9.jpg", "is_duplicate"].astype(bool).any()

def test_a_query_image_compared_with_nothing_has_a_row_saying_so(grown, tmp_path):
    """An image with no candidate gave no row at all: in an --output file it could not be told
    from an image never asked about."""
    from pipeline import query
    rng = np.random.default_rng(3)
    lonely = tmp_path / "lonely.png"
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(lonely)
    image = str(grown["data"] / "b" / "g0001_half.jpg")
    hits = query.query([image, str(lonely)], grown["out"] / "catalog")
    row = hits[hits["query"] == str(lonely)]
    assert len(row) == 1 and pd.isna(row["path"].iloc[0]) and not row["is_duplicate"].iloc[0]
    assert row["reason"].iloc[0].startswith("no candidate") and pd.isna(row["query_error"].iloc[0])
    assert hits.loc[hits["query"] == image, "is_duplicate"].any()

def test_query_pairs_byte_copies_as_the_batch_job_does_past_the_group_limit(photo_paths, tmp_path):
    """Past screen.exact_group_pairs, a group of byte copies is paired as a star from its first
    file (`candidates.exact_pairs`); a query gave each query every copy in the group (4 exact
    rows where the batch job has 1), whether the query was the group's first file or not."""
    from pipeline.query import query
    data, out, fresh = tmp_path / "data", tmp_path / "out", tmp_path / "fresh"
    data.mkdir()
    for i in range(4):
        shutil.copyfile(photo_paths[0], data / f"copy_{i}.jpg")
    shutil.copyfile(photo_paths[1], data / "other.jpg")
    star = ("--set", "screen.exact_group_pairs=2")
    run(data, out, *star)
    for name in ("a_first.jpg", "zz_last.jpg"):  # (before the group's first file, after it)
        shutil.copyfile(photo_paths[0], data / name)
    asked = ["a_first.jpg", "zz_last.jpg", "copy_2.jpg"]
    got = query([data / name for name in asked], out / "catalog")
    run(data, fresh, "--no-catalog", *star)
    for name in asked:
        mine = got[got["query"] == str(data / name)]
        _same_rows(mine, _batch_rows(fresh, name))
    assert len(got[got["query"] == str(data / "zz_last.jpg")]) == 1  # (one exact pair: with a_first.jpg)


def test_query_answers_for_new_files_in_the_folder_as_the_batch_job_would(grown, tmp_path, capsys):
    """Query files inside the catalog's folder that it does not know yet get the pairs the batch
    job gives them with those files in the folder: each pair in path order (ORB's numbers depend
    on which image is first; a query whose path sorted before its partner's was scored the other
    way round, and its verdict could differ), the queries compared with each other too (near and
    byte-identical), a file named twice asked about once, a link a file of its own. With --add
    they are recorded as the batch job would (the next run scores nothing again); --add refuses
    settings other than the catalog's; a catalog file rewritten since is not its own duplicate."""
    from pipeline.query import query
    data, out, fresh = tmp_path / "data", tmp_path / "out", tmp_path / "fresh"
    shutil.copytree(grown["data"], data)
    run(data, out)
    with Image.open(data / "a" / "g0002_original.jpg") as im:
        small = im.convert("RGB").resize((im.width * 2 // 3, im.height * 2 // 3))
    small.save(data / "a" / "0000_new.jpg", quality=80)  # (sorts before the photo it copies)
    small.save(data / "b" / "new_q60.jpg", quality=60)  # near the first: two new files
    shutil.copyfile(data / "a" / "0000_new.jpg", data / "zz_copy.jpg")  # a byte copy of a new file
    shutil.copyfile(data / "a" / "g0002_original.jpg", data / "a" / "0001_copy.jpg")  # before its original
    (data / "zz_link.jpg").symlink_to(data / "a" / "g0001_original.jpg")
    undecodable = os.fsdecode(b"b/caf\xe9.jpg")  # (a name that is not UTF-8)
    with Image.open(data / "a" / "g0001_original.jpg") as im:
        im.convert("RGB").save(data / undecodable, quality=70)
    asked = ["a/0000_new.jpg", "b/new_q60.jpg", "a/0001_copy.jpg", undecodable, "zz_copy.jpg", "zz_link.jpg",
             "a/g0001_original.jpg"]  # (a catalog file too: compared as it is now, not with its record)
    files = [data / r for r in asked]
    got = query(files + [files[0]], out / "catalog")
    assert not got.duplicated(["query", "path"]).any()
    run(data, fresh, "--no-catalog")
    batch = pd.read_parquet(fresh / "pairs.parquet")
    for rel in asked[:4]:
        named = paths.text_form(rel)
        mine = got[got["query"] == paths.text_form(str(data / rel))]
        _same_rows(mine, _batch_rows(fresh, named))
    # the image_id of a query file in the folder is of its name there, as the batch job's
    ids = pd.concat([batch[["path_a", "image_id_a"]].set_axis(["path", "id"], axis=1),
                     batch[["path_b", "image_id_b"]].set_axis(["path", "id"], axis=1)]).drop_duplicates().set_index("path")
    assert (got["image_id"].to_numpy() == ids["id"].reindex(got["path"]).to_numpy()).all()
    new_pair = got[(got["query"] == str(files[0])) & (got["path"] == "b/new_q60.jpg")]
    assert len(new_pair) == 1 and new_pair["is_duplicate"].all()
    for rel, original in (("zz_copy.jpg", "a/0000_new.jpg"), ("zz_link.jpg", "a/g0001_original.jpg")):
        exact = got[(got["query"] == str(data / rel)) & (got["rule"] == "exact_bytes")]
        assert exact["path"].tolist() == [original]
        assert ((batch["path_a"] == original) & (batch["path_b"] == rel) & (batch["rule"] == "exact_bytes")).sum() == 1
    # a byte copy stands behind the file it copies, for the other queries' pairs too
    assert ((got["query"] == str(data / "zz_copy.jpg")) & (got["path"] == "b/new_q60.jpg")).sum() == 1

    cat_dir = str(out / "catalog")
    assert main(["query", *map(str, files), "--catalog", cat_dir, "--add", "--set", "verify.max_side=256"]) == 2
    assert "catalog's settings" in capsys.readouterr().err
    assert main(["query", *map(str, files), str(files[0]), "--catalog", cat_dir, "--add"]) == 0
    assert {paths.text_form(p) for p in asked} <= set(catalog.Catalog.load(out / "catalog").images["path"])
    reuse = run(data, out)["reuse"]
    assert reuse["screen"]["screened"] == 0 and reuse["candidates"]["added"] == 0
    assert reuse["verify"]["pairs_verified"] == 0 and reuse["confirm"].get("pairs_embedded", 0) == 0
    assert_same_outputs(out, fresh)

    # a file the batch job does not list (hidden) is not added: its next run would drop it
    shutil.copyfile(data / "a" / "0000_new.jpg", data / "a" / ".hidden.jpg")
    capsys.readouterr()
    assert main(["query", str(data / "a" / ".hidden.jpg"), "--catalog", cat_dir, "--add"]) == 2
    assert "does not list" in capsys.readouterr().err
    assert ".hidden.jpg" not in "".join(catalog.Catalog.load(out / "catalog").images["path"])
    # a catalog file rewritten since (here recompressed) is not compared with its own old record
    with Image.open(data / "moved" / "renamed.jpg") as im:
        im.convert("RGB").save(data / "moved" / "renamed.jpg", quality=50)
    again = query([data / "moved" / "renamed.jpg"], out / "catalog")
    assert "moved/renamed.jpg" not in set(again["path"])


def test_the_airflow_example_calls_the_cli_with_valid_arguments():
    import ast
    import subprocess

    from pipeline.cli import build_parser
    source = (REPO / "examples" / "airflow_dedupe_dag.py").read_text()
    tree = ast.parse(source)
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and any(kw.arg == "bash_command" for kw in node.keywords))
    keywords = {kw.arg: ast.unparse(kw.value) for kw in call.keywords}
    assert keywords["bash_command"] == "COMMAND" and keywords["env"] == "PATHS"
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("COMMAND", "PATHS")}
    # the paths are templates read when the task runs (no Variable.get when the file is parsed)
    assert all("{{ var.value.get(" in v for v in assigned["PATHS"].values())
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "get"
                and getattr(node.value, "id", None) == "Variable"]
    # what bash runs, with paths that hold spaces (a DATA with a space was two arguments: exit 2)
    env = {name: f"/x y/{name.lower()}" for name in assigned["PATHS"]}
    argv = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + assigned["COMMAND"]], env=env, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert argv[0] == env["DEDUPE_BIN"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "dedupe" and args.data == env["DEDUPE_DATA"] and args.out == env["DEDUPE_OUT"]
    assert not args.no_catalog


@pytest.mark.parametrize("kind", ["orb_features", "orb_match", "orb_check"])
def test_a_new_version_of_the_orb_code_recomputes_orb_only(kind, grown, tmp_path, monkeypatch):
    """New feature code (verify.py) recomputes the ORB features and the pair scores; a new
    kernel module (pipeline/hamming.py, the descriptor matcher's) or new pair checks (verify.py's
    PAIR_CHECK_ONLY) the pair scores only; neither the screen nor the embeddings."""
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    real = catalog.code_fingerprint
    monkeypatch.setattr(catalog, "code_fingerprint", lambda code: real(code) + ("-new" if code == kind else ""))
    reuse = run(grown["data"], out)["reuse"]
    assert reuse["screen"]["screened"] == 0 and reuse["verify"]["pairs_reused"] == 0
    if kind == "orb_features":
        assert reuse["verify"]["features_redone_settings_changed"] > 0
    else:
        assert reuse["verify"]["features_reused"] > 0 and reuse["verify"]["features_computed"] == 0
    assert reuse["confirm"].get("embeddings_computed", 0) == 0
    assert_same_outputs(out, grown["scratch"])


def _spy_hashed_entries(monkeypatch) -> list[str]:
    """The files the catalog's commit reads to hash (`catalog._hashed_entry`), as they happen."""
    hashed: list[str] = []
    real = catalog._hashed_entry
    monkeypatch.setattr(catalog, "_hashed_entry", lambda files, rel: hashed.append(rel) or real(files, rel))
    return hashed


def test_a_new_part_is_listed_by_its_writers_digest_while_it_is_as_written(tmp_path, monkeypatch):
    """The commit lists a part this process wrote by the size and sha256 its writer took
    (`store.written`) while the part's state (size, mtime, inode) is still the one after the
    write; a part replaced since, or one another process wrote, is read and hashed."""
    files = catalog._Files(tmp_path / "cat")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"key": np.arange(0, 800, 8, dtype=np.int64), "blob": [rng.bytes(100) for _ in range(100)]})
    path = store.write_partition(files.full("features/orb/fp/run"), 0, frame)
    rel = files.rel(path)
    by_writer = store.written(files.full("features"))[path]
    hashed = _spy_hashed_entries(monkeypatch)
    data = Path(path).read_bytes()

    def right(body: bytes) -> dict:
        return {"file": rel, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert catalog._entry(files, rel, by_writer) == right(data) and hashed == []
    assert store.written(files.full("tables")) == {}  # (only what is under the folder asked)
    other = bytearray(data)
    other[len(data) // 2] ^= 0x01
    tmp = Path(path).with_name("replacement.tmp")
    tmp.write_bytes(bytes(other))
    os.replace(tmp, path)  # same size, other bytes, a new file: not what the writer hashed
    assert catalog._entry(files, rel, by_writer) == right(bytes(other)) and hashed == [rel]
    assert catalog._entry(files, rel) == right(bytes(other)) and hashed == [rel, rel]  # (none from a writer)


def test_a_catalog_reached_through_a_link_lists_its_new_parts_by_their_writers_digests(generated, tmp_path,
                                                                                        monkeypatch):
    """A first run whose --catalog is a symlink to the folder: the parts written under the link's
    path are matched to the catalog's names (resolved), listed without a read, and their
    sizes and sha256 are their bytes'."""
    real_folder = tmp_path / "catalogs" / "main"
    real_folder.mkdir(parents=True)
    link = tmp_path / "catalog-link"
    link.symlink_to(real_folder, target_is_directory=True)
    hashed = _spy_hashed_entries(monkeypatch)
    run(generated["A"], tmp_path / "out", "--catalog", str(link), "--tiers", "verify")
    parts = json.loads((real_folder / catalog.MANIFEST).read_text())["parts"]
    assert parts and not [rel for rel in hashed if rel.startswith("features/")], hashed
    for rel, entry in parts.items():
        body = (real_folder / rel).read_bytes()
        assert (entry["bytes"], entry["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


@pytest.mark.slow
def test_incremental_run_on_a_local_cluster_equals_a_run_from_scratch(grown, tmp_path, monkeypatch):
    # a copy of the folder (the catalog's records are per folder: all files are read again, but
    # features and pair scores are found by content) plus a new image, on a real LocalCluster
    data = tmp_path / "data"
    shutil.copytree(grown["data"], data)
    with Image.open(data / "a" / "g0002_original.jpg") as im:
        im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4)).save(data / "b" / "new.jpg", quality=80)
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    args = ["dedupe", str(data), "--out", str(out), "--scheduler", "local", "--quiet",
            "--set", "decide.accept_inliers=60", "--set", "dask.n_workers=2", "--set", "dask.dashboard_address=",
            "--set", f"work_dir={tmp_path / 'work'}"]  # (kept after the run: what is left in it is seen)
    hashed = _spy_hashed_entries(monkeypatch)
    before = set(json.loads((out / "catalog" / catalog.MANIFEST).read_text())["parts"])
    from pipeline import candidates
    read_back = []
    monkeypatch.setattr(candidates.Lists, "gather", lambda self: pytest.fail("the driver gathered the lists"))
    real_frames = candidates.SavedLists.frames
    monkeypatch.setattr(candidates.SavedLists, "frames",
                        lambda self: read_back.append(self.directory) or real_frames(self))
    assert main(args) == 0
    # the lists were written by the workers and read back by the commit, their files then removed
    assert len(read_back) == 1 and not Path(read_back[0]).exists()
    # the workers' parts are listed by their writers' digests (gathered from the workers), not read again
    parts = json.loads((out / "catalog" / catalog.MANIFEST).read_text())["parts"]
    assert set(parts) - before and not [rel for rel in hashed if rel.startswith("features/")], hashed
    for rel in set(parts) - before:
        data_ = (out / "catalog" / rel).read_bytes()
        assert (parts[rel]["bytes"], parts[rel]["sha256"]) == (len(data_), hashlib.sha256(data_).hexdigest())
    reuse = json.loads((out / "run.json").read_text())["reuse"]
    assert "another folder" in reuse["screen"]["not_reused"] and reuse["screen"]["reused"] == 0
    assert reuse["candidates"]["added"] == 1 and reuse["candidates"]["lists_reused"] > 0
    assert reuse["verify"]["pairs_reused"] > 0 and reuse["verify"]["pairs_verified"] > 0
    fresh = tmp_path / "fresh"
    run(data, fresh, "--no-catalog")
    assert_same_outputs(out, fresh)


def test_a_run_stopped_after_its_commit_keeps_the_new_catalog(grown, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    generation = json.loads((out / "catalog" / catalog.MANIFEST).read_text())["generation"]
    from pipeline import write
    real = write.write_json
    calls = []

    def stop_at_the_final_run_json(data, path):  # run.json is written after the commit: Ctrl-C there
        calls.append(Path(path).name)
        if calls.count("run.json") == 1:
            raise KeyboardInterrupt
        return real(data, path)

    monkeypatch.setattr(write, "write_json", stop_at_the_final_run_json)
    assert main(["dedupe", str(grown["data"]), "--out", str(out), *COMMON, "--set", "verify.ratio=0.75"]) == 1
    monkeypatch.setattr(write, "write_json", real)
    cat = catalog.Catalog.load(out / "catalog")
    assert cat.manifest["generation"] == generation + 1  # the commit happened
    assert cat.problems == []
    for rel in cat.manifest["parts"]:
        assert cat.verify_file(rel)


def test_a_threshold_change_starts_no_cluster(grown, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    caplog.set_level(logging.INFO, logger="pipeline")
    assert main(["dedupe", str(grown["data"]), "--out", str(out), "--scheduler", "local", "--quiet",
                 "--set", "decide.accept_inliers=60", "--set", "decide.cosine_threshold=0.9",
                 "--set", "dask.dashboard_address=127.0.0.1:0"]) == 0
    assert "Dask dashboard" not in caplog.text  # everything came from the catalog: no cluster started
    reuse = json.loads((out / "run.json").read_text())["reuse"]
    assert reuse["screen"]["screened"] == 0 and reuse["verify"]["pairs_verified"] == 0
    # and a run with work to do does start it (the check above can fail)
    caplog.clear()
    assert main(["dedupe", str(grown["data"]), "--out", str(out), "--scheduler", "local", "--quiet",
                 "--set", "decide.accept_inliers=60", "--set", "verify.ratio=0.7",
                 "--set", "dask.dashboard_address=127.0.0.1:0"]) == 0
    assert "Dask dashboard" in caplog.text


def test_high_recall_rerun_embeds_only_new_content_and_equals_a_run_from_scratch(generated, tmp_path, monkeypatch):
    """screen.mode hash+embedding with the catalog: the screen embeddings are stored per content,
    a re-run embeds only new contents, and its outputs equal a run from scratch."""
    from pipeline import confirm
    data = tmp_path / "data"
    shutil.copytree(generated["A"], data / "a")
    first = run(data, tmp_path / "out", "--preset", "high-recall")
    assert first["reuse"]["screen_embed"]["embeddings_computed"] == first["counts"]["screen_embedded"] > 0
    shutil.copytree(generated["B"], data / "b")
    for name in ["g0000_original.jpg", "d0002_distractor.jpg"]:
        (data / "a" / name).unlink()
    calls: list[tuple[str, list[int]]] = []
    real = confirm.embed_partition
    monkeypatch.setattr(confirm, "embed_partition",
                        lambda rows, cfg, out_dir, part: calls.append((out_dir, rows["key"].tolist()))
                        or real(rows, cfg, out_dir, part))
    second = run(data, tmp_path / "out", "--preset", "high-recall")
    monkeypatch.undo()
    # the confirm tier took the untransformed images' embeddings from the screen's (no second inference)
    confirm_keys = [k for d, keys in calls if not d.endswith("-screen") for k in keys]
    assert calls and not [k for k in confirm_keys if k % 8 == 0]
    scratch = run(data, tmp_path / "scratch", "--preset", "high-recall", "--no-catalog")
    assert_same_outputs(tmp_path / "out", tmp_path / "scratch")
    info = second["reuse"]["screen_embed"]
    assert info["images"] == scratch["counts"]["screen_embedded"]
    # B's files are new contents (or byte copies of A's, which are not representatives)
    assert 0 < info["embeddings_computed"] <= sum(1 for _ in generated["B"].iterdir())
    assert info["embeddings_reused"] == info["images"] - info["embeddings_computed"] > 0
    assert info["embeddings_adopted_from_killed_run"] == 0
    assert second["counts"]["embedding_only_candidates"] == scratch["counts"]["embedding_only_candidates"]
    # an unchanged re-run embeds nothing and still gives the same outputs
    third = run(data, tmp_path / "out", "--preset", "high-recall")
    assert third["reuse"]["screen_embed"]["embeddings_computed"] == 0
    assert third["reuse"].get("confirm", {}).get("pairs_embedded", 0) == 0
    assert_same_outputs(tmp_path / "out", tmp_path / "scratch")


def test_a_pair_found_another_way_at_the_next_run_is_not_given_the_other_ways_scores(photos_dir, tmp_path):
    """High-recall mode: a pair found only by its embeddings is checked mirrored, then plain; a
    hash pair of the same transform plain only. When the K nearest change between runs a pair moves
    from one kind to the other, and its stored scores (keyed by how it was checked:
    verify.evidence_transforms) must not be reused for the other kind: the re-run equals a run
    from scratch (it gave another stage, rule and ORB figures for 15 of 30 pairs here)."""
    from PIL import ImageEnhance
    data = tmp_path / "data"
    data.mkdir()
    for n, src in enumerate(sorted(photos_dir.glob("*.jpg"))[:3]):  # a photo and four copies, thrice
        im = Image.open(src).convert("RGB")
        w, h = im.size
        shutil.copyfile(src, data / f"p{n}_0orig.jpg")
        im.save(data / f"p{n}_1q60.jpg", quality=60)
        im.resize((w // 2, h // 2)).save(data / f"p{n}_2half.jpg", quality=85)
        ImageEnhance.Color(im).enhance(0.3).save(data / f"p{n}_3desat.jpg", quality=85)
        im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(data / f"p{n}_4crop.png")
    run(data, tmp_path / "out", "--preset", "high-recall")
    fewer = ("--preset", "high-recall", "--set", "screen.max_candidates=1")  # (most pairs now embedding-only)
    second = run(data, tmp_path / "out", *fewer)
    assert second["reuse"]["verify"]["pairs_reused"] > 0  # (the stored scores of the pairs found the same way)
    why = second["reuse"]["verify"]["why_verified"]
    assert why["checked_another_way"] == second["reuse"]["verify"]["pairs_verified"] > 0 and why["new_pair"] == 0
    run(data, tmp_path / "scratch", *fewer, "--no-catalog")
    assert_same_outputs(tmp_path / "out", tmp_path / "scratch")


def test_a_failed_embedding_the_high_recall_screen_makes_again_is_counted_once(generated, tmp_path, monkeypatch):
    """High-recall mode with the catalog: an untransformed embedding that failed at the last run
    is made again by the screen (counted in reuse.screen_embed) and taken from there by the
    confirm tier, which does not count it again."""
    from pipeline import confirm
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(generated["A"], data / "a")
    confirming = ("--preset", "high-recall", "--set", "decide.accept_inliers=400")  # (pairs reach confirm)
    run(data, tmp_path / "fresh", *confirming, "--no-catalog")
    pairs = pd.read_parquet(tmp_path / "fresh" / "pairs.parquet")
    broken = pairs.loc[pairs["cosine"].notna(), "path_a"].iloc[0]
    with monkeypatch.context() as m:
        m.setattr(confirm, "load_input", _failing(confirm, "load_input", broken))
        run(data, out, *confirming)
    again = run(data, out, *confirming)["reuse"]
    assert again["screen_embed"]["embeddings_redone_failed_last_time"] == 1
    assert again["confirm"]["pairs_embedded"] > 0
    assert again["confirm"].get("embeddings_redone_failed_last_time", 0) == 0


def test_feature_parts_are_compacted_and_still_give_the_same_results(grown, tmp_path, monkeypatch):
    """Compaction rewrites only the referenced rows (the deleted files' features go), one part at a
    time, and a re-run reading every feature from the new parts equals a run from scratch."""
    import pyarrow.parquet as pq
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    before = catalog.Catalog.load(out / "catalog")
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 0)  # compact whatever there is
    compacted = run(grown["data"], out)["reuse"]["catalog_compacted"]
    assert {c["kind"] for c in compacted} == set(before.features["kind"])
    assert sum(c["rows_kept"] for c in compacted) == len(before.features)
    # the grown folder lost files that had features: their rows are not carried over
    assert sum(c["rows_kept"] for c in compacted) < sum(c["rows_stored_before"] for c in compacted)
    cat = catalog.Catalog.load(out / "catalog")
    assert cat.problems == []
    for part, rows in cat.features.groupby("part"):
        assert "/compact-" in part
        assert sorted(pq.read_table(out / "catalog" / part, columns=["key"])["key"].to_pylist()) == sorted(rows["key"])
        assert cat.manifest["parts"][part]["rows"] == len(rows)  # (as written: no footer read later)
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 64)
    # a matching setting changed: every pair is verified again from the compacted ORB features
    again = run(grown["data"], out, "--set", "verify.ratio=0.7")
    assert again["reuse"]["verify"]["features_reused"] > 0
    assert again["reuse"]["verify"]["features_computed"] == 0
    run(grown["data"], tmp_path / "scratch", "--no-catalog", "--set", "verify.ratio=0.7")
    assert_same_outputs(out, tmp_path / "scratch")


def test_the_parts_a_compaction_replaced_are_not_taken_for_a_killed_runs(grown, tmp_path, monkeypatch):
    """The parts a compaction replaced stay on disk a generation, named by no manifest, as the
    parts of a killed run are. The next runs must not adopt them: adopted, their rows took the
    compacted rows' place, the next commit listed the old parts again and compacted again, every
    night, keeping every old part too (a helper's month of nightly runs: the catalog tripled)."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(grown["data"], data)
    shutil.copytree(grown["out"], out)
    with monkeypatch.context() as m:
        m.setattr(catalog, "COMPACT_MAX_PARTS", 0)  # compact whatever there is
        assert run(data, out)["reuse"]["catalog_compacted"]
    features = catalog.Catalog.load(out / "catalog").features
    compacted = dict(zip(zip(features["kind"], features["key"]), features["part"]))
    assert all("/compact-" in part for part in compacted.values())
    for src in sorted((data / "a").glob("g*_original.jpg"))[:2]:  # a new copy each night: pairs to verify
        with Image.open(src) as im:
            im.convert("RGB").resize((im.width * 2 // 3, im.height * 2 // 3)).save(data / f"{src.stem}_new.jpg")
        night = run(data, out)["reuse"]
        assert night["verify"]["pairs_verified"] > 0
        assert night["verify"]["features_adopted_from_killed_run"] == 0
        assert night["catalog_compacted"] == []
    features = catalog.Catalog.load(out / "catalog").features
    kept = [(part, compacted[kind, key]) for kind, key, part in zip(features["kind"], features["key"], features["part"])
            if (kind, key) in compacted]
    assert kept and all(part == before for part, before in kept)  # (the old keys still in the compacted parts)


def test_part_entries_list_their_rows_so_a_commit_reads_no_footer(grown, tmp_path, monkeypatch):
    """Each feature part's manifest entry lists its rows (the compaction check's input): a commit
    reads the footer only of parts it has no count of (its own new ones; every part of a catalog
    written before counts were listed, once), not of every part every time, a request per part on
    a store."""
    import pyarrow.parquet as pq
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    path = out / "catalog" / catalog.MANIFEST

    def parts() -> dict:
        return json.loads(path.read_text())["parts"]
    assert parts() and all(e["rows"] == pq.ParquetFile(out / "catalog" / rel).metadata.num_rows
                           for rel, e in parts().items())
    read = []
    real = catalog._Files.num_rows
    monkeypatch.setattr(catalog._Files, "num_rows", lambda self, rel: read.append(rel) or real(self, rel))
    run(grown["data"], out, "--set", "decide.accept_inliers=61")  # (a new decision: nothing new stored)
    assert read == []
    manifest = json.loads(path.read_text())
    for entry in manifest["parts"].values():  # an older catalog's entries: no counts
        del entry["rows"]
    odd = sorted(manifest["parts"])[0]  # and one whose file is not the size listed (replaced)
    manifest["parts"][odd]["bytes"] += 1
    path.write_text(json.dumps(manifest))
    run(grown["data"], out, "--set", "decide.accept_inliers=62")
    assert sorted(read) == sorted(manifest["parts"])  # each read once, and listed again
    assert all(e["rows"] == pq.ParquetFile(out / "catalog" / rel).metadata.num_rows
               for rel, e in parts().items() if rel != odd)
    assert "rows" not in parts()[odd]  # (its file's count is not listed beside another file's sha256)
    read.clear()
    run(grown["data"], out, "--set", "decide.accept_inliers=63")
    assert read == [odd]


def test_only_small_parts_count_towards_compaction(tmp_path, monkeypatch):
    """Many full parts (a large first run's) are left as written: rewriting them would copy every
    descriptor into as many parts again. Many small parts (nightly runs') are merged."""
    from pipeline import store
    cat = catalog.Catalog(tmp_path / "catalog")
    rows = []
    for p in range(3):  # 3 parts of 4 rows each
        keys = np.arange(p * 4, p * 4 + 4, dtype=np.int64) * 8
        path = store.write_partition(cat.feature_dir("orb", "f1", "run-1"), p,
                                     pd.DataFrame({"key": keys, "blob": [b"x" * 10] * 4}))
        rows += [{"kind": "orb", "fp": "f1", "sha256": f"{k:064d}", "transform": 0, "key": int(k),
                  "part": cat.files.rel(path), "error": None} for k in keys]
    features = pd.DataFrame(rows, columns=catalog.FEATURE_COLUMNS)
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 2)  # fewer than the 3 parts
    monkeypatch.setattr(catalog, "COMPACT_ROWS_PER_PART", 8)  # 4 rows: not small (under 8 // 2)
    kept, done = cat.compact(features, "t1")
    assert done == [] and kept.equals(features)
    monkeypatch.setattr(catalog, "COMPACT_ROWS_PER_PART", 16)  # now every part is small
    kept, done = cat.compact(features, "t2")
    assert done == [{"kind": "orb", "fp": "f1", "parts_before": 3, "rows_stored_before": 12, "rows_kept": 12,
                     "parts_after": 1}]
    assert kept["part"].nunique() == 1 and "/compact-t2" in kept["part"].iloc[0]
    assert sorted(kept["key"]) == sorted(features["key"])


def test_compaction_points_every_kept_row_at_a_new_part_holding_its_key(tmp_path, monkeypatch):
    """Compacting parts whose rows are interleaved in the table, partly dead, with a listed part
    that no longer matches its checksum (its rows dropped, to be recomputed), over two settings:
    each kept row names a new part that holds its key with the bytes it had; the counts match."""
    import pyarrow.parquet as pq

    from pipeline import store
    cat = catalog.Catalog(tmp_path / "catalog")
    rng = np.random.default_rng(7)
    rows, blobs = [], {}
    for fp in ("f1", "f2"):
        for p in range(6):  # 6 parts of 5 rows; keys unique per settings
            keys = (np.arange(p * 5, p * 5 + 5, dtype=np.int64) + (100 if fp == "f2" else 0)) * 8
            data = [rng.bytes(12) for _ in keys]
            blobs.update({(fp, int(k)): b for k, b in zip(keys, data)})
            path = store.write_partition(cat.feature_dir("orb", fp, f"run-{p}"), p,
                                         pd.DataFrame({"key": keys, "blob": data}))
            rel = cat.files.rel(path)
            if fp == "f1" and p == 2:  # listed with another checksum: corrupt
                cat.manifest.setdefault("parts", {})[rel] = {"file": rel, "bytes": 1, "sha256": "0" * 64}
            rows += [{"kind": "orb", "fp": fp, "sha256": f"{k:064d}", "transform": 0, "key": int(k), "part": rel,
                      "error": None} for k in keys[: 4 if p % 2 else 5]]  # (odd parts: one dead row)
    features = pd.DataFrame(rows, columns=catalog.FEATURE_COLUMNS).sample(frac=1, random_state=3)
    monkeypatch.setattr(catalog, "COMPACT_MAX_PARTS", 1)
    monkeypatch.setattr(catalog, "COMPACT_ROWS_PER_PART", 12)
    kept, done = cat.compact(features, "t")
    corrupt = features["part"].str.contains("/run-2/") & (features["fp"] == "f1")
    assert sorted(kept["key"]) == sorted(features.loc[~corrupt, "key"])
    assert [(d["fp"], d["parts_before"], d["rows_stored_before"], d["rows_kept"]) for d in done] == \
        [("f1", 6, 30, 22), ("f2", 6, 30, 27)]
    for fp, d in zip(("f1", "f2"), done):
        mine = kept[kept["fp"] == fp]
        assert mine["part"].nunique() == d["parts_after"] == 2 and mine["part"].str.contains("/compact-t/").all()
        for part, group in mine.groupby("part"):
            table = pq.read_table(tmp_path / "catalog" / part).to_pandas().set_index("key")
            assert all(table.loc[k, "blob"] == blobs[(fp, k)] for k in group["key"])


def test_search_settings_key_the_neighbour_lists_not_the_hashes():
    """How the candidate search runs (sharding, shard sizes, K, distances) re-searches from the
    stored hashes; it never re-hashes a catalog's images."""
    from pipeline.config import load_config
    base = catalog.fingerprints(load_config(None, []))
    for setting in ("screen.search_sharding=sharded", "screen.search_shard_size=1000",
                    "screen.embedding_shard_size=1000", "screen.max_distance=6"):
        fp = catalog.fingerprints(load_config(None, [setting]))
        assert fp["screen"] == base["screen"] and fp["neighbours"] != base["neighbours"], setting
    fp = catalog.fingerprints(load_config(None, ["screen.decode_size=48"]))
    assert fp["screen"] != base["screen"]


def _edited(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.mark.parametrize("module, plumbing, shaping", [
    # (an edit to a definition the module leaves out of its fingerprint, one to a definition
    # that shapes the numbers)
    ("verify.py", ('f"orb-{uuid.uuid4().hex[:12]}"', 'f"orb-{uuid.uuid4().hex[:16]}"'),
     ("SSIM_TAIL = 1.5", "SSIM_TAIL = 2.0")),
    ("verify.py", ("        self.step, self.parts = max(1, int(step)), parts\n",
                   "        self.step, self.parts = max(2, int(step)), parts\n"),
     ("return np.where(np.asarray(transform, dtype=np.int64) >= 4, 4, 0)",
      "return np.where(np.asarray(transform, dtype=np.int64) >= 1, 4, 0)")),
    ("verify.py", ("        self.error = error[error.notna()]", "        self.error = error.dropna()"),
     ("RESULTS_REVISION = 1\n", "RESULTS_REVISION = 2\n")),
    ("hamming.py", ("    nf_max = flips.shape[1]\n", "    nf_max = int(flips.shape[1])\n"),
     ("if d1 < ratio * d2:", "if d1 <= ratio * d2:")),
    ("confirm.py", ("self.parts = store.PartPaths(part_of)", "self.parts = store.PartPaths(part_of.copy())"),
     ("* 8 + np.asarray(transform, dtype=np.int64))", "* 8)")),
    ("decode.py", (None, None), ("    lambda a: a[:, ::-1],\n", "    lambda a: a[::-1, :],\n")),
    ("weights.py", ('    log.info("downloading %s -> %s", url, dest)', '    log.info("fetching %s -> %s", url, dest)'),
     ('"InceptionV3": "inception_v3"', '"InceptionV3": "xception"')),
    ("candidates.py", ("    keep &= sim >= cfg.embedding_min_cosine\n", "    keep &= sim > cfg.embedding_min_cosine\n"),
     ("    out = out[out.groupby(\"owner_a\", sort=False).cumcount() < k]\n",
      "    out = out[out.groupby(\"owner_a\", sort=False).cumcount() <= k]\n")),
    ("candidates.py", (None, None), ("LISTS_REVISION = 1\n", "LISTS_REVISION = 2\n")),
    ("search.py", (None, None), ('raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")',
                                 'raise ValueError(f"shapes differ: {a.shape} and {b.shape}")')),
])
def test_code_fingerprint_is_the_syntax_that_shapes_results(module, plumbing, shaping):
    """A stored result is keyed on the code that computes it (catalog._CODE), read as its syntax:
    comments, docstrings and the definitions a module lists in NOT_FINGERPRINTED (the tier's task
    plumbing) may change without invalidating a catalog; an edit to any other definition, to
    which feature keys a pair is checked with, or to RESULTS_REVISION invalidates what it
    computes."""
    text = (Path(catalog.__file__).parent / module).read_text()
    base = catalog.source_fingerprint(text)
    cosmetic = "# a comment\n" + text.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n# note\n")
    cosmetic = cosmetic.replace('    """', '    """Reworded too. ', 1)  # (a definition's docstring)
    assert catalog.source_fingerprint(cosmetic) == base
    if plumbing[0]:
        assert catalog.source_fingerprint(_edited(text, *plumbing)) == base
    assert catalog.source_fingerprint(_edited(text, *shaping)) != base


def test_every_kinds_code_is_read_as_its_syntax(monkeypatch):
    """Each module a kind of result is keyed on goes through `source_fingerprint` (a comment in
    any of them changes no fingerprint)."""
    read = []
    real = catalog.source_fingerprint
    monkeypatch.setattr(catalog, "source_fingerprint", lambda text, *a: read.append(text) or real(text, *a))
    for kind, (files, _) in catalog._CODE.items():
        read.clear()
        catalog.code_fingerprint(kind)
        here = Path(catalog.__file__).parent
        assert read == [(here / name).read_text() for name in files], kind


# libraries that carry and move the data, shaping no stored number
_CARRIERS = {"pandas", "pyarrow", "distributed"}


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_library_the_fingerprinted_code_imports_keys_its_kind():
    """A new import (a decoder plugin, a search library) in code a kind is keyed on must come with
    its library's version in that kind's fingerprint (catalog._CODE), or an upgrade of it would
    leave stored results as the old version made them."""
    import sys
    from importlib import metadata
    dist_of = metadata.packages_distributions()
    here = Path(catalog.__file__).parent
    for kind, (files, dists) in catalog._CODE.items():
        imported = set()
        for name in files:
            tree = catalog.fingerprinted_syntax((here / name).read_text(), name not in catalog._WHOLE.get(kind, ()))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
        imported -= set(sys.stdlib_module_names) | {"pipeline", "__future__"}
        assert imported, kind
        for module in imported:
            assert module in dist_of, f"{module}: not installed?"
            names = {_dist(d) for d in dist_of[module]}
            assert names & ({_dist(d) for d in dists} | _CARRIERS), f"{kind}: {module} ({names}) not in catalog._CODE"


def test_the_search_code_keys_the_neighbour_lists_only(monkeypatch):
    """The K-nearest lists a re-run reuses are keyed on the search's code: an edit to a search
    kernel (which hamming.py leaves out of the matcher's fingerprint) or to the candidate search
    makes the next re-run search again, and invalidates no hash, feature or score; an edit to
    the embedding kNN (not stored) or the matcher (pair scores only) keeps the lists."""
    from pipeline.config import load_config
    here = Path(catalog.__file__).parent
    texts = {name: (here / name).read_text() for name in ("hamming.py", "candidates.py")}
    base = catalog.fingerprints(load_config(None, []))

    def with_edit(name, old, new):
        edited = {**texts, name: _edited(texts[name], old, new)}
        real = Path.read_text
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: edited[self.name]
                            if self.parent == here and self.name in edited else real(self, *a, **k))
        try:
            return catalog.fingerprints(load_config(None, []))
        finally:
            monkeypatch.setattr(Path, "read_text", real)

    def changed(fp):
        return {kind for kind in base if fp[kind] != base[kind]}

    # a search kernel: its tie between equally distant rows
    assert changed(with_edit("hamming.py", "    elif d < bd:\n", "    elif d <= bd:\n")) == {"neighbours"}
    # the merge of a partition's lists over the shards: K + 1 kept
    assert changed(with_edit("candidates.py", "    out = out[out.groupby(\"owner_a\", sort=False).cumcount() < k]\n",
                             "    out = out[out.groupby(\"owner_a\", sort=False).cumcount() <= k]\n")) == {"neighbours"}
    assert changed(with_edit("candidates.py", "    keep &= sim >= cfg.embedding_min_cosine\n",
                             "    keep &= sim > cfg.embedding_min_cosine\n")) == set()
    assert changed(with_edit("hamming.py", "if d1 < ratio * d2:", "if d1 <= ratio * d2:")) == {"orb", "neighbours"}


@pytest.mark.parametrize("edit, refused", [
    # a name the module does not define (a rename left behind)
    (('"run_verify",', '"run_verify_renamed", "run_verify",'), "does not define.*run_verify_renamed"),
    # a kept definition that uses a left-out one
    (("    missing = [c for c in JOB_COLUMNS if c not in pairs]\n",
      "    missing = [c for c in JOB_COLUMNS if c not in pairs]\n    _ = _PairTasks\n"), "uses.*_PairTasks"),
    # a left-out definition that rebinds a module name, or a non-literal statement
    (("        self.error = error[error.notna()]",
      "        global PIXEL_SIDE\n        PIXEL_SIDE = 64\n        self.error = error[error.notna()]"),
     "rebinds.*_PairTasks"),
    (('TEXT_COLUMNS = ("orb_status", "orb_reason")', 'TEXT_COLUMNS = tuple(["orb_status", "orb_reason"])'),
     "not a literal.*TEXT_COLUMNS"),
    (("        self.error = error[error.notna()]",
      "        RESULT_DTYPES['orb_score'] = np.float64\n        self.error = error[error.notna()]"),
     "rebinds.*_PairTasks"),
    (("        self.error = error[error.notna()]",
      "        sys.modules[__name__].PIXEL_SIDE = 64\n        self.error = error[error.notna()]"),
     "rebinds.*_PairTasks"),
    (("        self.error = error[error.notna()]",
      "        vars(store)['x'] = 1\n        self.error = error[error.notna()]"), "rebinds.*_PairTasks"),
    # the list itself: a literal tuple of names, annotated or not
    (("NOT_FINGERPRINTED = (", "NOT_FINGERPRINTED: tuple = ("), None),
    (("NOT_FINGERPRINTED = (", "NOT_FINGERPRINTED = str(("), "literal tuple"),
])
def test_code_fingerprint_refuses_a_skip_list_that_hides_shaping_code(edit, refused):
    """The skip list must name definitions the module has, none that kept code uses, and only
    functions, classes and literals that rebind nothing outside themselves: what a fingerprinted
    function calls or reads shapes its numbers."""
    text = (Path(catalog.__file__).parent / "verify.py").read_text()
    edited = _edited(text, *edit)
    if edit[1] == "NOT_FINGERPRINTED = str((":  # (close the call after the tuple)
        end = edited.index(")", edited.index(edit[1]) + len(edit[1]))
        edited = edited[:end] + ")" + edited[end:]
    if refused is None:  # (the annotated list is read as the plain one)
        assert catalog.source_fingerprint(edited) == catalog.source_fingerprint(text)
        return
    with pytest.raises(ValueError, match=refused):
        catalog.source_fingerprint(edited)


@pytest.mark.parametrize("edit, features_change", [
    # how pairs are judged (verify.PAIR_CHECK_ONLY): the stored pairs are checked again, no image's
    # features are made again
    (("    elif matches >= cfg.chance_min_matches and inliers < cfg.min_inlier_share * matches:",
      "    elif matches > cfg.chance_min_matches and inliers < cfg.min_inlier_share * matches:"), False),
    (('_STATUS_RANK = {"no-match": 0, "inconclusive": 1, "partial": 2, "match": 3}',
      '_STATUS_RANK = {"no-match": 0, "inconclusive": 2, "partial": 1, "match": 3}'), False),
    (("        if ssim < cfg.semi_flat_ssim:", "        if ssim <= cfg.semi_flat_ssim:"), False),
    # how an image's features are made: both
    (("    return np.count_nonzero(spread <= 4) / spread.size", "    return np.count_nonzero(spread <= 5) / spread.size"),
     True),
    (("PIXEL_SIDE = 128", "PIXEL_SIDE = 96"), True),
])
def test_an_edit_to_how_pairs_are_judged_keeps_the_stored_features(edit, features_change):
    """verify.py holds both the per-image features and the checks of a pair made from them. The
    features' fingerprint leaves the checks out (verify.PAIR_CHECK_ONLY, catalog._SKIP_LISTS):
    every edit to verify.py used to make every catalog compute every image's ORB features again,
    where a change to a verdict needs only the stored pairs checked again ("orb_check", in the
    pair evidence's fingerprint)."""
    text = (Path(catalog.__file__).parent / "verify.py").read_text()
    edited = _edited(text, *edit)
    features = catalog._SKIP_LISTS["orb_features"]["verify.py"]
    assert (catalog.source_fingerprint(edited, features) != catalog.source_fingerprint(text, features)) \
        == features_change
    assert catalog.source_fingerprint(edited) != catalog.source_fingerprint(text)  # (orb_check's reading)


def test_the_features_fingerprint_refuses_to_leave_out_what_feature_code_uses():
    """PAIR_CHECK_ONLY is held to NOT_FINGERPRINTED's refusals: a definition the feature code
    uses cannot be listed (flat_share shapes every feature row's flatness)."""
    text = (Path(catalog.__file__).parent / "verify.py").read_text()
    edited = _edited(text, 'PAIR_CHECK_ONLY = ("STATUSES", ', 'PAIR_CHECK_ONLY = ("STATUSES", "flat_share", ')
    with pytest.raises(ValueError, match="uses.*flat_share"):
        catalog.source_fingerprint(edited, catalog._SKIP_LISTS["orb_features"]["verify.py"])
    catalog.source_fingerprint(edited)  # (orb_check reads it whole but for NOT_FINGERPRINTED)


def test_evidence_table_keeps_old_rows_and_updates_the_scored_pairs(tmp_path, monkeypatch):
    """Column by column, as the catalog relies on: old rows of contents still present keep their
    order and values (the last of a repeated key), this run's scored pairs overwrite their ORB
    numbers, only confirmed pairs their cosine, and new pairs follow sorted by key."""
    h = [c * 64 for c in "abcdef"]
    cat = catalog.Catalog(tmp_path)
    cat.evidence = pd.DataFrame({
        "sha_a": [h[1], h[0], h[0], h[0], h[4]], "sha_b": [h[2], h[1], h[1], h[2], h[5]],
        "transform": pd.array([0, 0, 0, 3, 0], dtype="int8"), "orb_fp": ["o1", "o1", "o1", "o1", "o1"],
        "orb_matches": pd.array([10, 20, 21, 30, 40], dtype="Int32"),
        "orb_inliers": pd.array([1, 2, 3, None, 4], dtype="Int32"),
        "orb_score": pd.array([0.5, 0.25, 0.75, None, 1.0], dtype="Float32"),
        "orb_status": ["match", "no-match", "match", None, "match"], "orb_reason": ["r0", "r1", "r2", None, "r4"],
        "ssim": pd.array([None] * 5, dtype="Float32"), "hist_corr": pd.array([None] * 5, dtype="Float32"),
        "embed_fp": ["e1", None, "e1", None, None],
        "cosine": pd.array([0.9, None, 0.8, None, None], dtype="Float32")})
    rows = pd.DataFrame({  # an old pair, two new pairs (given unsorted), one of them twice (the
        # last row wins); contents e, f are gone
        "sha_a": [h[0], h[2], h[1], h[2]], "sha_b": [h[1], h[3], h[3], h[3]], "transform": [0, 5, 0, 5],
        "orb_matches": [50.0, 59.0, float("nan"), 60.0], "orb_inliers": [5.0, 6.0, float("nan"), 6.0],
        "orb_score": [0.125, 0.5, float("nan"), 0.5], "orb_status": ["match", "no-match", None, "match"],
        "orb_reason": ["n0", "n9", None, "n1"], "ssim": [float("nan")] * 4, "hist_corr": [float("nan")] * 4,
        "cosine": [0.5, 0.125, 0.75, 0.25]})
    present = set(h[:4])
    table = catalog.EvidenceTable(cat, present, rows, {"orb": "o2", "embed": "e2"}, True,
                                  [False, False, True, True])
    out = table.frame()
    assert len(table) == len(out) == 5
    assert out.columns.tolist() == catalog.EVIDENCE_COLUMNS
    assert [(a[0], b[0], t) for a, b, t in zip(out["sha_a"], out["sha_b"], out["transform"])] == \
        [("b", "c", 0), ("a", "b", 0), ("a", "c", 3), ("b", "d", 0), ("c", "d", 5)]
    assert out["transform"].dtype == "int8"
    assert {c: str(out[c].dtype) for c in ("orb_matches", "orb_score", "cosine")} == \
        {"orb_matches": "Int32", "orb_score": "Float32", "cosine": "Float32"}
    assert out["orb_matches"].tolist() == [10, 50, 30, pd.NA, 60]  # a re-scored pair takes the new numbers
    assert out["orb_fp"].tolist() == ["o1", "o2", "o1", "o2", "o2"]
    assert out["orb_status"].tolist() == ["match", "match", None, None, "match"]  # text: None, never NaN
    # the old pair was not confirmed this time: its stored cosine (of the last repeated row) stays
    assert out["cosine"].tolist() == [pytest.approx(0.9), pytest.approx(0.8), pd.NA, 0.75, 0.25]
    assert out["embed_fp"].tolist() == ["e1", "e1", None, "e2", "e2"]
    # made a group at a time as it is written: the same table whatever the groups' size, each
    # group as long as the writer's row groups (old rows and new pairs in one group or across two)
    for size in (1, 2, 3, 4):
        monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", size)
        parts = list(table.parts())
        assert [len(p) for p in parts] == [min(size, 5 - s) for s in range(0, 5, size)]
        pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), out)
    # the same pairs, none repeated (the rows are then not copied)
    once = catalog.EvidenceTable(cat, present, rows.iloc[[0, 2, 3]], {"orb": "o2", "embed": "e2"}, True,
                                 [False, True, True])
    pd.testing.assert_frame_equal(once.frame(), out)
    # the run passes the sha256 as object columns sharing the images' strings: the same table
    shared = rows.assign(**{c: pd.Series(rows[c].to_numpy(dtype=object), dtype=object) for c in ("sha_a", "sha_b")})
    assert shared["sha_a"].dtype == object
    pd.testing.assert_frame_equal(catalog.EvidenceTable(cat, present, shared, {"orb": "o2", "embed": "e2"}, True,
                                                        [False, False, True, True]).frame(), out)
    # the run's way: the scores left in its pair frame (`values`, here shuffled among other rows),
    # each row naming its position there (`at`): the same table, in any group size
    scores = [c for c in rows.columns if c not in ("sha_a", "sha_b", "transform")]
    at = np.array([5, 1, 3, 0])
    values = pd.DataFrame({c: rows[c].iloc[np.argsort(at)].to_numpy() for c in scores}, index=np.arange(6)[np.sort(at)])
    values = pd.concat([values, rows[scores].iloc[:2].set_axis([2, 4])]).sort_index().reset_index(drop=True)
    keys = rows[["sha_a", "sha_b", "transform"]].assign(at=at)
    by_position = catalog.EvidenceTable(cat, present, keys, {"orb": "o2", "embed": "e2"}, True,
                                        [False, False, True, True], values=values)
    for size in (2, 5):
        monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", size)
        pd.testing.assert_frame_equal(by_position.frame(), out)
    empty = catalog.EvidenceTable(None, present, rows.iloc[:0], {"orb": "o2", "embed": "e2"}, True, [])
    assert len(empty) == 0 and [len(p) for p in empty.parts()] == [0]
    assert empty.frame().columns.tolist() == catalog.EVIDENCE_COLUMNS


def test_an_evidence_table_is_written_a_group_at_a_time_with_its_columns_types(tmp_path, monkeypatch):
    """The catalog writes the evidence as it is made (EvidenceTable.parts): the file reads back as
    the whole table, in groups of TABLE_ROWS_PER_GROUP rows; a text column with no value in the
    first group (no pair confirmed there) is still text, and numbers keep their nullable types."""
    import pyarrow.parquet as pq
    monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", 2)
    h = [c * 64 for c in "abcde"]
    rows = pd.DataFrame({"sha_a": [h[0], h[0], h[1], h[2], h[3]], "sha_b": [h[1], h[2], h[2], h[3], h[4]],
                         "transform": [0, 0, 1, 0, 0], "orb_matches": [5, 6, 7, 8, 9],
                         "orb_inliers": [1, None, 3, 4, 5], "orb_score": [0.5, 0.25, None, 1.0, 0.0],
                         "orb_status": ["match"] * 5, "orb_reason": ["r"] * 5, "ssim": [None] * 5,
                         "hist_corr": [None] * 5, "cosine": [None, None, None, 0.5, 0.75]})
    table = catalog.EvidenceTable(None, set(h), rows, {"orb": "o", "embed": "e"}, True,
                                  [False, False, False, True, True])
    entry = catalog._Files(tmp_path).write_table("tables/evidence.parquet", table)
    path = tmp_path / entry["file"]
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2, 1]
    schema = pq.read_schema(path)
    assert schema.field("embed_fp").type in ("string", "large_string")  # None in the whole first group
    assert str(schema.field("cosine").type) == "float" and str(schema.field("orb_matches").type) == "int32"
    back = pq.read_table(path).to_pandas()
    assert back["embed_fp"].iloc[:3].isna().all()
    assert back["embed_fp"].tolist()[3:] == ["e", "e"]
    assert str(back["orb_inliers"].dtype) == "Int32" and back["orb_inliers"].isna().tolist() == [False, True] + [False] * 3
    assert back["cosine"].tolist()[3:] == [0.5, 0.75]
    assert back["sha_a"].tolist() == rows["sha_a"].tolist() and back["transform"].tolist() == [0, 0, 1, 0, 0]


def test_lookup_evidence_finds_the_last_stored_row_of_each_pair(tmp_path):
    """Stored evidence is found per (sha_a, sha_b, transform) made with the asked settings (the last
    of a repeated pair); a pair in the other order, with another transform or other settings is a
    miss; `found` has a row per hit, in order; "_any" takes any settings; the column types are the table's."""
    h = [c * 64 for c in "abcd"]
    cat = catalog.Catalog(tmp_path)
    cat.evidence = pd.DataFrame({
        "sha_a": [h[0], h[0], h[0], h[1], h[2]], "sha_b": [h[1], h[1], h[2], h[2], h[3]],
        "transform": pd.array([0, 0, 3, 0, 0], dtype="int8"), "orb_fp": ["o1", "o1", "o1", "o0", None],
        "orb_matches": pd.array([10, 11, 30, 40, None], dtype="Int32"),
        "orb_inliers": pd.array([1, 2, None, 4, None], dtype="Int32"),
        "orb_score": pd.array([0.5, 0.25, None, 1.0, None], dtype="Float32"),
        "orb_status": ["match", "no-match", None, "match", None], "orb_reason": ["r0", "r1", None, "r3", None],
        "ssim": pd.array([None] * 5, dtype="Float32"), "hist_corr": pd.array([None] * 5, dtype="Float32"),
        "embed_fp": [None, None, None, None, "e1"], "cosine": pd.array([None, None, None, None, 0.5], dtype="Float32")})
    sha_a = [h[0], h[1], h[0], h[0], h[1], h[0], h[2]]
    sha_b = [h[1], h[0], h[2], h[2], h[2], h[1], h[3]]
    tt = [0, 0, 3, 0, 0, 0, 0]
    hit, found = catalog.lookup_evidence(cat, sha_a, sha_b, tt, "orb", "o1")
    assert hit.tolist() == [True, False, True, False, False, True, False]
    assert found.index.tolist() == list(range(3)) and found.columns.tolist() == catalog.ORB_COLUMNS
    assert found["orb_matches"].tolist() == [11, 30, 11]
    assert found["orb_inliers"].tolist() == [2, pd.NA, 2]
    assert str(found["orb_matches"].dtype) == "Int32" and str(found["orb_score"].dtype) == "Float32"
    assert found["orb_status"].iloc[0] == "no-match" and pd.isna(found["orb_status"].iloc[1])
    hit, _ = catalog.lookup_evidence(cat, sha_a, sha_b, tt, "orb_any", "")
    assert hit.tolist() == [True, False, True, False, True, True, False]
    hit, found = catalog.lookup_evidence(cat, sha_a, sha_b, tt, "cosine", "e1")
    assert hit.tolist() == [False] * 6 + [True] and found["cosine"].tolist() == [pytest.approx(0.5)]
    hit, found = catalog.lookup_evidence(cat, [], [], [], "orb", "o1")
    assert hit.tolist() == [] and len(found) == 0
    hit, found = catalog.lookup_evidence(cat, [h[3]], [h[0]], [0], "orb", "o1")  # no stored row of these
    assert hit.tolist() == [False] and len(found) == 0 and found.columns.tolist() == catalog.ORB_COLUMNS
    hit, found = catalog.lookup_evidence(catalog.Catalog(tmp_path / "empty"), sha_a, sha_b, tt, "orb", "o1")
    assert hit.tolist() == [False] * 7 and len(found) == 0 and found.columns.tolist() == catalog.ORB_COLUMNS


def test_pair_keys_match_pairs_of_contents_across_arrow_and_object_columns():
    """Stored pairs (a table read back from Parquet: Arrow-backed text) and a run's pairs (object
    columns sharing the images' strings, as EvidenceTable passes them) get equal keys exactly when
    their sha_a, sha_b and transform are equal, a missing sha256 matching only a missing one, and
    without a Python string per stored row: the two kinds of column concatenated made an object
    column of every stored text (~0.25 kB per pair here, ~0.5 kB at a 10k re-run's commit)."""
    import io
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(7)
    shas = np.array([f"{i:064x}" for i in rng.choice(2**62, 300, replace=False)], dtype=object)
    n = 20_000
    a, b, t = rng.integers(0, 300, n), rng.integers(0, 300, n), rng.integers(0, 8, n)
    stored_a = shas[a].tolist()
    stored_a[7] = None
    buf = io.BytesIO()
    pq.write_table(pa.table({"sha_a": stored_a, "sha_b": shas[b].tolist(), "transform": t}), buf)
    stored = pq.read_table(io.BytesIO(buf.getvalue())).to_pandas()
    as_loaded = pq.read_table(io.BytesIO(buf.getvalue()), read_dictionary=["sha_a", "sha_b"]).to_pandas()
    assert isinstance(as_loaded["sha_a"].dtype, pd.CategoricalDtype)  # (as Catalog.load reads evidence)
    asked_a, asked_b = shas[rng.integers(0, 300, n)], shas[b].copy()
    asked_a[: n // 2] = shas[a[: n // 2]]  # half the asked pairs are stored ones
    asked_t = np.where(np.arange(n) % 3 == 0, (t + 1) % 8, t)  # a third of those with another transform
    asked_a[5], asked_b[6] = None, None
    truth = {}
    for i, key in enumerate(zip(stored_a, shas[b].tolist(), t.tolist())):
        truth.setdefault(key, i)
    tracemalloc.start()
    keys, asked = catalog._pair_keys((stored["sha_a"], stored["sha_b"], stored["transform"]),
                                     (pd.Series(asked_a, dtype=object), pd.Series(asked_b, dtype=object), asked_t))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    first = ~keys.duplicated(keep="first")
    at = keys[first].get_indexer(asked)
    where = np.flatnonzero(first)
    got = [int(where[i]) if i >= 0 else -1 for i in at]
    want = [truth.get((x, y, int(z)), -1) for x, y, z in zip(asked_a, asked_b, asked_t)]
    assert got == want and sum(i >= 0 for i in want) > n // 4
    assert peak < 150 * 2 * n, f"{peak / 2 / n:.0f} B per pair"
    # the same matches from categorical columns, and through the MultiIndex form (a transform past
    # 15 does not fit the int64 key's 4 bits; the evidence's keys reach 15: verify.evidence_transforms)
    keys, asked = catalog._pair_keys((as_loaded["sha_a"], as_loaded["sha_b"], as_loaded["transform"]),
                                     (pd.Series(asked_a, dtype=object), pd.Series(asked_b, dtype=object), asked_t))
    assert keys[~keys.duplicated(keep="first")].get_indexer(asked).tolist() == at.tolist()
    both_ways = (stored["transform"] + 8, asked_t + 8)
    keys, asked = catalog._pair_keys((stored["sha_a"], stored["sha_b"], both_ways[0]),
                                     (pd.Series(asked_a, dtype=object), pd.Series(asked_b, dtype=object), both_ways[1]))
    assert not isinstance(keys, pd.MultiIndex)
    assert keys[~keys.duplicated(keep="first")].get_indexer(asked).tolist() == at.tolist()
    # plain and both-ways keys mixed (verify.evidence_transforms): equal only the same way round
    way_s, way_a = rng.integers(0, 2, n) * 8, rng.integers(0, 2, n) * 8
    way_a[: n // 4] = way_s[: n // 4]
    keys, asked = catalog._pair_keys((stored["sha_a"], stored["sha_b"], stored["transform"] + way_s),
                                     (pd.Series(asked_a, dtype=object), pd.Series(asked_b, dtype=object), asked_t + way_a))
    truth_ways = {}
    for i, key in enumerate(zip(stored_a, shas[b].tolist(), (t + way_s).tolist())):
        truth_ways.setdefault(key, i)
    first = ~keys.duplicated(keep="first")
    got = [int(np.flatnonzero(first)[i]) if i >= 0 else -1 for i in keys[first].get_indexer(asked)]
    want = [truth_ways.get((x, y, int(z)), -1) for x, y, z in zip(asked_a, asked_b, asked_t + way_a)]
    assert got == want and sum(i >= 0 for i in want) > n // 16
    wide = (stored["transform"] * 3, asked_t * 3)
    keys, asked = catalog._pair_keys((stored["sha_a"], stored["sha_b"], wide[0]),
                                     (pd.Series(asked_a, dtype=object), pd.Series(asked_b, dtype=object), wide[1]))
    assert isinstance(keys, pd.MultiIndex)
    assert keys[~keys.duplicated(keep="first")].get_indexer(asked).tolist() == at.tolist()
    k1, k2 = catalog._pair_keys(([None, "x"], ["y", "y"], [0, 0]), ([None, None, "x"], ["y", "y", "y"], [0, 1, 0]))
    assert k1.get_indexer(k2).tolist() == [0, -1, 1]


def test_found_evidence_texts_share_one_string_per_value(tmp_path):
    """The texts lookup_evidence gives from a loaded table (categoricals) are plain objects holding
    one string per distinct value: pandas' own conversion of a categorical makes one per row, and
    a re-run copies them into every pair's row (~55 MB at 100k files)."""
    h = [c * 64 for c in "ab"]
    files = catalog._Files(tmp_path)
    frame = pd.DataFrame({c: [None] * 4 for c in catalog.EVIDENCE_COLUMNS})
    frame = frame.assign(sha_a=[h[0]] * 4, sha_b=[h[1]] * 4, transform=np.arange(4, dtype=np.int8), orb_fp="o1",
                         orb_matches=pd.array([9] * 4, dtype="Int32"), orb_status=["match", "no-match"] * 2,
                         orb_reason=["same reason"] * 4)
    files.write_table("tables/evidence.parquet", frame)
    data = (tmp_path / "tables" / "evidence.parquet").read_bytes()
    import io

    import pyarrow.parquet as pq
    cat = catalog.Catalog(tmp_path)
    cat.evidence = pq.read_table(io.BytesIO(data), read_dictionary=catalog.DICTIONARY_COLUMNS["evidence"]).to_pandas()
    assert isinstance(cat.evidence["orb_reason"].dtype, pd.CategoricalDtype)
    hit, found = catalog.lookup_evidence(cat, [h[0]] * 4, [h[1]] * 4, [3, 2, 1, 0], "orb", "o1")
    assert hit.all() and found["orb_status"].tolist() == ["no-match", "match", "no-match", "match"]
    assert found["orb_reason"].dtype == object and found["orb_status"].dtype == object
    assert len({id(v) for v in found["orb_reason"]}) == 1 and len({id(v) for v in found["orb_status"]}) == 2


def test_tables_are_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    """A table is converted and written TABLE_ROWS_PER_GROUP rows at a time, with the whole
    column's type (a text column that is all None in its first group is still text), and reads back
    equal; its manifest entry names the file's size and sha256; no temporary file is left."""
    import hashlib

    import numpy as np
    import pyarrow.parquet as pq
    monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", 4)
    frame = pd.DataFrame({"sha_a": [f"{i:064x}" for i in range(10)],
                          "transform": np.arange(10, dtype=np.int8),
                          "orb_matches": pd.array([None] * 5 + list(range(5)), dtype="Int32"),
                          "orb_status": np.array([None] * 5 + ["match"] * 5, dtype=object),
                          "cosine": pd.array([0.5] * 9 + [None], dtype="Float32")}, index=range(100, 110))
    files = catalog._Files(tmp_path)
    entry = files.write_table("tables/t.parquet", frame)
    data = (tmp_path / "tables" / "t.parquet").read_bytes()
    assert entry == {"file": "tables/t.parquet", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta = pq.ParquetFile(tmp_path / "tables" / "t.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    back = pq.read_table(tmp_path / "tables" / "t.parquet").to_pandas()
    pd.testing.assert_frame_equal(back, frame.reset_index(drop=True), check_dtype=True)
    assert pq.read_schema(tmp_path / "tables" / "t.parquet").field("orb_status").type in ("string", "large_string")
    assert back["orb_status"].isna().tolist() == [True] * 5 + [False] * 5 and back["orb_status"].iloc[5] == "match"
    empty = files.write_table("tables/e.parquet", frame.iloc[:0])
    assert empty["bytes"] > 0 and pq.read_table(tmp_path / "tables" / "e.parquet").num_rows == 0
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["e.parquet", "t.parquet"]


def test_a_tables_schema_is_the_whole_frames_without_converting_whole_columns(tmp_path, monkeypatch):
    """write_table infers a frame's schema from the rows holding each column's first value: the
    file's types and pandas metadata are those pyarrow infers from the whole frame (text, bytes
    and nullable numbers first set deep in the frame; a column that is None throughout), and
    pyarrow is never handed the whole frame to infer them (it converts every object column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", 8)
    n = 50
    frame = pd.DataFrame({
        "path": pd.Series([f"p{i}" for i in range(n)], dtype="str"),
        "etag": pd.Series([None] * 30 + [f"e{i}" for i in range(20)], dtype=object),
        "error": pd.Series([None] * n, dtype=object),
        "codes": pd.Series([None] * 41 + [bytes([i]) * 9 for i in range(9)], dtype=object),
        "width": pd.array([None] * 12 + list(range(38)), dtype="Int64"),
        "bytes": np.arange(n, dtype=np.int64)})
    frame.index = range(7, 7 + n)  # (not a range from 0: the writer's own)
    expected = pa.Schema.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    seen = []

    class Schema:  # (pyarrow's own type cannot be patched: catalog's `pa` is)
        @staticmethod
        def from_pandas(df, *args, **kwargs):
            seen.append(len(df))
            return pa.Schema.from_pandas(df, *args, **kwargs)

    class Arrow:
        def __getattr__(self, name):
            return Schema if name == "Schema" else getattr(pa, name)
    monkeypatch.setattr(catalog, "pa", Arrow())
    entry = catalog._Files(tmp_path).write_table("tables/images.parquet", frame)
    assert seen and max(seen) <= 4  # (row 0 and each object column's first value)
    written = pq.read_schema(tmp_path / entry["file"])
    assert written.equals(expected, check_metadata=True)
    assert pa.types.is_null(written.field("error").type) and pa.types.is_binary(written.field("codes").type)
    back = pq.read_table(tmp_path / entry["file"]).to_pandas()
    for column in frame.columns:  # (the same values; text may read back as `str`, None as NaN)
        assert [None if pd.isna(v) else v for v in back[column]] == \
            [None if pd.isna(v) else v for v in frame[column]], column
    # an object column of numbers whose first is an int and a later one a float: the whole
    # frame's inference (double), not the first value's (int64, which would store 2.5 as 2)
    seen.clear()
    mixed = frame.assign(score=pd.Series([None] * 10 + [1] + [2.5] * 39, dtype=object).to_numpy())
    entry = catalog._Files(tmp_path).write_table("tables/mixed.parquet", mixed)
    assert max(seen) == n
    written = pq.read_schema(tmp_path / entry["file"])
    assert written.equals(pa.Schema.from_pandas(mixed.reset_index(drop=True), preserve_index=False),
                          check_metadata=True)
    assert pq.read_table(tmp_path / entry["file"]).column("score").to_pylist()[10:12] == [1.0, 2.5]


def test_known_images_stand_in_for_the_screen_of_unchanged_files(tmp_path):
    """A re-screen matched against the catalog's records (KnownImages, by path) gives the same
    rows as screening the files again; a changed, a new and a stale-settings file are screened,
    and a repeated path in the records counts once (its last row)."""
    import numpy as np
    from pipeline import run as run_mod
    from pipeline.config import load_config
    from pipeline.progress import Progress
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(data / f"p{i}.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    # a name that is not UTF-8: matched to its record by its text form (pipeline/paths.py)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(data / os.fsdecode(b"caf\xe9.png"))
    cfg = load_config(None, [])
    fps = catalog.fingerprints(cfg)
    first = run_mod.run_screen(data, cfg, None, Progress(True))
    assert first["raw_path"].notna().sum() == 1
    records = catalog.images_table(first, fps)
    records = pd.concat([records.iloc[[0]].assign(bytes=1), records], ignore_index=True)  # a repeated path
    known = catalog.KnownImages(records, fps["screen"])
    assert len(known) == len(first) and list(known.find(["p1.png", "nope.png"]) >= 0) == [True, False]

    reuse: dict = {}
    again = run_mod.run_screen(data, cfg, None, Progress(True), known=known, reuse=reuse)
    # (the broken file's error is its bytes' own, reused: catalog.tried_again)
    assert reuse["reused"] == len(first) and reuse["screened"] == 0
    pd.testing.assert_frame_equal(again, first)

    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(data / "p1.png")  # changed
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(data / "new.png")
    stale = records.assign(screen_fp=np.where(records["path"] == "p2.png", "older", records["screen_fp"]))
    reuse = {}
    mixed = run_mod.run_screen(data, cfg, None, Progress(True), known=catalog.KnownImages(stale, fps["screen"]),
                               reuse=reuse)
    assert reuse["why_screened"] == {"new": 1, "changed_size_or_mtime": 1, "screen_settings_changed": 1}
    pd.testing.assert_frame_equal(mixed, run_mod.run_screen(data, cfg, None, Progress(True)))


def test_a_file_whose_record_is_an_error_is_read_again_and_its_cause_may_be_gone(tmp_path):
    """An error in the catalog is not reused: a file too large for scan.max_file_bytes (a setting
    in no fingerprint: the message says to raise it) or unreadable at the last run is screened
    again, unchanged, once the cause is gone."""
    from pipeline import run as run_mod
    from pipeline.config import load_config
    from pipeline.progress import Progress
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(data / f"p{i}.png")
    small = load_config(None, ["scan.max_file_bytes=100"])
    first = run_mod.run_screen(data, small, None, Progress(True))
    assert first["error"].str.contains("scan.max_file_bytes").all()
    cfg = load_config(None, [])
    fps = catalog.fingerprints(cfg)
    assert catalog.fingerprints(small)["screen"] == fps["screen"]
    reuse: dict = {}
    again = run_mod.run_screen(data, cfg, None, Progress(True),
                               known=catalog.KnownImages(catalog.images_table(first, fps), fps["screen"]), reuse=reuse)
    assert reuse["why_screened"] == {"failed_last_time": 3} and reuse["reused"] == 0
    assert again["error"].isna().all() and again["codes"].notna().all()


def test_a_rerun_after_the_only_broken_file_is_gone_marks_a_file_changed_during_the_run(tmp_path, monkeypatch):
    """The catalog's error column is text while it holds an error; once the broken file is gone,
    the reused rows have no error at all, and a run must still be able to mark a file (here one
    rewritten while the run went on), run after run."""
    import numpy as np
    from pipeline import decide, scan
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(data / f"p{i}.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    args = ["--tiers", "screen"]
    assert run(data, out, *args)["counts"]["errors"] == 1
    (data / "broken.jpg").unlink()
    manifest = run(data, out, *args)
    assert manifest["reuse"]["screen"]["reused"] == 3 and manifest["counts"]["errors"] == 0
    monkeypatch.setattr(scan, "changed_since", lambda paths, sizes, mtimes: [True] + [False] * (len(list(paths)) - 1))
    manifest = run(data, out, *args)
    assert manifest["counts"]["changed_during_run"] == 1
    images = pd.read_parquet(out / "images.parquet")
    assert (images["error"] == decide.CHANGED_ERROR).sum() == 1


def test_shared_text_keeps_the_values_with_one_string_per_distinct_one():
    """store.shared_text (the evidence's text, the report's pair rows, the verify tier's texts in
    a run: run._share_texts): the same values, missing ones None, equal texts one object."""
    from pipeline.run import _share_texts
    texts = ["orb: 3 inliers of " + str(n % 4) + " matches" for n in range(40)]  # 40 objects, 4 values
    scores = pd.DataFrame({"orb_matches": np.arange(41, dtype=np.int32),
                           "orb_status": pd.Series(["match"] * 40 + [None], dtype=object),
                           "orb_reason": pd.Series(texts + [np.nan], dtype=object)})  # (as verify's frames)
    expected = scores.copy()
    _share_texts(scores)
    assert scores["orb_reason"].iloc[:40].tolist() == texts and scores["orb_reason"].iloc[40] is None
    assert scores["orb_status"].iloc[40] is None
    assert len({id(x) for x in scores["orb_reason"].iloc[:40]}) == 4
    assert len({id(x) for x in scores["orb_status"].iloc[:40]}) == 1
    assert scores["orb_reason"].dtype == object  # (a str column would make a string per row again when set
    # into the run's object columns)
    pd.testing.assert_series_equal(scores["orb_matches"], expected["orb_matches"])
    assert store.shared_text(pd.Series([], dtype=object)).tolist() == []


def test_neighbours_table_shares_the_images_path_strings_and_reads_back_as_text(tmp_path):
    """The K-nearest lists by path: object columns holding the images' own path strings (no copy
    per row), written and read back as the same text."""
    images = pd.DataFrame({"path": pd.Series(["a/x.jpg", "b/é y.png", "c.gif"], dtype=object)})
    directed = pd.DataFrame({"owner_a": [0, 0, 1, 2], "owner_b": [1, 2, 0, 0], "hash_distance": [3, 5, 3, 5]})
    table = catalog.neighbours_table(directed, images).frame()
    assert table.columns.tolist() == catalog.NEIGHBOUR_COLUMNS
    assert table["owner"].dtype == object and table["neighbour"].dtype == object
    paths = images["path"].tolist()
    assert all(v is paths[i] for v, i in zip(table["owner"], directed["owner_a"]))
    assert all(v is paths[i] for v, i in zip(table["neighbour"], directed["owner_b"]))
    entry = catalog._Files(tmp_path).write_table("tables/neighbours.parquet", table)
    back = pd.read_parquet(tmp_path / entry["file"])
    assert back["owner"].tolist() == ["a/x.jpg", "a/x.jpg", "b/é y.png", "c.gif"]
    assert back["neighbour"].tolist() == ["b/é y.png", "c.gif", "a/x.jpg", "a/x.jpg"]
    assert back["hash_distance"].tolist() == [3, 5, 3, 5]


def test_neighbours_table_from_lists_in_files_is_the_table_of_the_lists_as_a_frame(tmp_path, monkeypatch):
    """Lists the workers wrote, a file per partition (`candidates.SavedLists`), make the neighbours
    table a row group at a time as it is written (`NeighbourTable`): the same rows, the same row
    groups and the same text as the table of every list in one frame; partitions of any size,
    with none at all; and no rows at all give an empty table of the same columns."""
    from pipeline import candidates
    monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", 5)
    rng = np.random.default_rng(3)
    images = pd.DataFrame({"path": pd.Series([f"d{i % 4}/img {i}.jpg" for i in range(40)], dtype=object)})
    sizes = [7, 0, 3, 2, 11, 5, 1]
    frames = [pd.DataFrame({"owner_a": rng.integers(0, 40, n), "owner_b": rng.integers(0, 40, n),
                            "hash_distance": rng.integers(0, 11, n)}).astype(
        {"owner_a": "int64", "owner_b": "int64", "hash_distance": "int16"}) for n in sizes]
    paths = [str(tmp_path / "lists" / f"lists-{j:06d}.parquet") for j in range(len(frames))]
    assert [candidates._write_lists(f, p) for f, p in zip(frames, paths)] == sizes
    saved = candidates.SavedLists(str(tmp_path / "lists"), paths, sizes)
    whole = pd.concat(frames, ignore_index=True)
    pd.testing.assert_frame_equal(saved.gather(), whole)
    table = catalog.neighbours_table(saved, images)
    assert isinstance(table, catalog.NeighbourTable) and len(table) == len(whole) == 29
    assert [len(p) for p in table.parts()] == [5, 5, 5, 5, 5, 4]
    files = catalog._Files(tmp_path)
    streamed = files.write_table("tables/streamed.parquet", table)
    framed = files.write_table("tables/framed.parquet", catalog.neighbours_table(whole, images))
    a, b = (pq.ParquetFile(tmp_path / e["file"]) for e in (streamed, framed))
    assert [a.metadata.row_group(i).num_rows for i in range(a.num_row_groups)] == \
        [b.metadata.row_group(i).num_rows for i in range(b.num_row_groups)]
    assert a.read().equals(b.read())
    saved.remove()
    assert not (tmp_path / "lists").exists()
    none = catalog.neighbours_table(candidates.SavedLists(str(tmp_path / "x"), [], []), images)
    back = pd.read_parquet(tmp_path / files.write_table("tables/none.parquet", none)["file"])
    assert back.columns.tolist() == catalog.NEIGHBOUR_COLUMNS and len(back) == 0


def test_neighbours_table_takes_the_paths_of_each_groups_rows_only(tmp_path, monkeypatch):
    """A row group's paths are taken at its rows from the images' Arrow text (pandas 3's `str`
    column, as in a run), not by turning the whole column into Python strings for each group (one
    per image a group: thousands of groups at 10M images); the same table either way, whether the
    lists are a frame or files."""
    import tracemalloc

    from pipeline import candidates
    monkeypatch.setattr(catalog, "TABLE_ROWS_PER_GROUP", 4)
    n = 200_000
    images = pd.DataFrame({"path": pd.Series([f"folder {i % 7}/image-{i:08d}.jpg" for i in range(n)], dtype="str")})
    assert images["path"].dtype != object
    rng = np.random.default_rng(5)
    directed = pd.DataFrame({"owner_a": rng.integers(0, n, 10), "owner_b": rng.integers(0, n, 10),
                             "hash_distance": rng.integers(0, 11, 10)}).astype(
        {"owner_a": "int64", "owner_b": "int64", "hash_distance": "int16"})
    paths = [str(tmp_path / "lists-000000.parquet")]
    candidates._write_lists(directed, paths[0])
    expected = pd.DataFrame({"owner": images["path"].to_numpy(dtype=object)[directed["owner_a"]],
                             "neighbour": images["path"].to_numpy(dtype=object)[directed["owner_b"]],
                             "hash_distance": directed["hash_distance"].to_numpy()})
    for lists in (candidates.SavedLists(str(tmp_path), paths, [10]), directed):
        table = catalog.neighbours_table(lists, images)
        tracemalloc.start()
        parts = list(table.parts())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [len(p) for p in parts] == [4, 4, 2]
        # (the whole column as Python strings: 200,000 of ~75 B, ~15 MB, three times)
        assert peak < 2_000_000, f"making 10 rows of the table traced {peak} bytes"
        got = pd.concat(parts, ignore_index=True)
        assert got["owner"].dtype == object and got["neighbour"].dtype == object
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_saved_lists_refuse_a_file_that_is_not_the_one_written(tmp_path):
    """A list file holding other rows than its writer counted (replaced since) is an error, not
    a neighbours table silently made of them."""
    from pipeline import candidates
    rows = pd.DataFrame({"owner_a": np.array([0, 1], np.int64), "owner_b": np.array([1, 0], np.int64),
                         "hash_distance": np.array([2, 2], np.int16)})
    path = str(tmp_path / "lists-000000.parquet")
    assert candidates._write_lists(rows, path) == 2
    candidates._write_lists(rows.iloc[:1], path)  # (replaced by a write of another cut)
    with pytest.raises(RuntimeError, match="holds 1 list rows, 2 were written"):
        list(candidates.SavedLists(str(tmp_path), [path], [2]).frames())


def test_the_lists_files_are_removed_when_a_run_fails_before_its_commit(generated, tmp_path, monkeypatch):
    """The lists the workers wrote for the catalog's commit are removed when the run fails
    between the search and the commit, from a work dir the config names (which stays)."""
    from pipeline import candidates, verify
    written = []
    real_write = candidates.Lists.write
    monkeypatch.setattr(candidates.Lists, "write", lambda self, d: written.append(real_write(self, d)) or written[-1])

    def fails(*args, **kwargs):
        raise RuntimeError("planted: the verify tier fails")

    monkeypatch.setattr(verify, "run_verify", fails)
    work = tmp_path / "work"
    args = ["dedupe", str(generated["A"]), "--out", str(tmp_path / "out"), "--scheduler", "local", "--quiet",
            "--set", "dask.n_workers=2", "--set", "dask.dashboard_address=", "--set", f"work_dir={work}"]
    assert main(args) == 1
    assert len(written) == 1 and len(written[0]) > 0  # (the lists were written, then the run failed)
    assert not Path(written[0].paths[0]).exists() and work.is_dir()
    assert not list(work.rglob("lists-*"))  # (in the run's own folder of work_dir)


def test_feature_parts_finds_the_wanted_features_of_these_settings_in_first_seen_order(tmp_path):
    """Cat.feature_parts: the stored rows of the wanted (sha256, transform) made with these
    settings, in the order the wanted ones first appear, none from a part that fails its check;
    `settings_changed` counts wanted features stored with other settings only; a stored failure
    is not found (made again) and counted as `failed_last_time`; the path of each part file is
    one shared string."""
    sha = {c: c * 64 for c in "ABCDE"}
    rows = [("orb", "F1", sha["A"], 0, 10, "p1"), ("orb", "F1", sha["A"], 4, 14, "p1"),
            ("orb", "F1", sha["B"], 0, 20, "p2"), ("orb", "F1", sha["C"], 0, 30, "p1"),
            ("orb", "F0", sha["A"], 0, 11, "p0"), ("orb", "F0", sha["D"], 0, 41, "p0"),
            ("embed", "F1", sha["E"], 0, 50, "p3"), ("orb", "F1", sha["E"], 0, 60, "p1")]
    features = pd.DataFrame(rows, columns=["kind", "fp", "sha256", "transform", "key", "part"]).assign(error=None)
    features.loc[7, "error"] = "cannot read: a read that failed"  # (E0's ORB features failed: tried again)

    class Checked(catalog.Catalog):
        def verify_file(self, rel):
            return rel != "p2"  # p2 fails its checksum

    cat = Checked(tmp_path, features=features)
    wanted = np.array([sha["C"], sha["A"], None, sha["A"], sha["B"], sha["D"], sha["E"], sha["C"]], dtype=object)
    found, counts = cat.feature_parts("orb", "F1", wanted, [0, 0, 0, 4, 0, 0, 0, 0])
    assert found.index.tolist() == [30, 10, 14]
    assert found.tolist() == [str(tmp_path / "p1")] * 3
    assert len({id(p) for p in found}) == 1
    # stored with other settings and not found: D0 (A0 is found); failed: E0
    assert counts == {"reused": 3, "settings_changed": 1, "failed_last_time": 1}
    assert cat.failed("orb", "F1").to_dict("list") == {"sha256": [sha["E"]], "key": [60]}
    assert not len(cat.failed("orb", "F0"))
    empty, counts = cat.feature_parts("embed", "F9", wanted[:2], [0, 0])
    assert empty.empty and counts == {"reused": 0, "settings_changed": 0, "failed_last_time": 0}
    nothing, counts = Checked(tmp_path).feature_parts("orb", "F1", wanted, np.zeros(len(wanted), np.int64))
    assert nothing.empty and counts == {"reused": 0, "settings_changed": 0, "failed_last_time": 0}
    flipped, counts = cat.feature_parts("orb", "F1", wanted[:2], [4, 4])  # A4 only: C has no flipped row
    assert flipped.index.tolist() == [14] and counts == {"reused": 1, "settings_changed": 0, "failed_last_time": 0}


def test_new_feature_rows_name_each_part_file_relative_to_the_catalog_once(tmp_path, monkeypatch):
    """The features a run wrote: a row per key, its part named relative to the catalog (links
    resolved), with one `rel` call per part file, not per row."""
    (tmp_path / "cat" / "orb").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "cat")
    cat = catalog.Catalog(tmp_path / "cat")
    p1, p2 = str(tmp_path / "cat" / "orb" / "p1.parquet"), str(tmp_path / "link" / "orb" / "p2.parquet")
    summary = pd.DataFrame({"key": np.array([80, 81, 88, 96, 97], np.int64), "part_path": [p1, p1, p2, p1, p2],
                            "error": [None, None, "too few keypoints", None, None]})
    sha_of_cid = pd.Series(["a" * 64, "b" * 64, "c" * 64], index=[10, 11, 12])
    calls, rel = [], cat.files.rel
    monkeypatch.setattr(cat.files, "rel", lambda full: calls.append(full) or rel(full))
    rows = catalog.new_feature_rows(cat, "orb", "F1", summary, sha_of_cid)
    assert rows["part"].tolist() == ["orb/p1.parquet", "orb/p1.parquet", "orb/p2.parquet", "orb/p1.parquet",
                                     "orb/p2.parquet"]
    assert sorted(calls) == sorted([p1, p2])
    assert rows["sha256"].tolist() == ["a" * 64, "a" * 64, "b" * 64, "c" * 64, "c" * 64]
    assert rows["transform"].tolist() == [0, 1, 0, 0, 1] and rows["error"].tolist()[2] == "too few keypoints"


def test_a_catalog_path_that_is_a_file_is_no_catalog(tmp_path):
    """`--catalog` naming a file: "no catalog there" (exit 2 from query), not a traceback."""
    from pipeline import catalog as catalog_module
    (tmp_path / "notes.txt").write_text("not a catalog")
    assert catalog_module.exists(tmp_path / "notes.txt") is False
    assert catalog_module.exists(tmp_path / "nothing") is False


def test_an_empty_or_unlistable_data_never_wipes_the_catalog(grown, tmp_path, monkeypatch, caplog):
    """An unmounted share (DATA empty), a DATA this user cannot list, and a subfolder it cannot
    list: the first two stop with exit 2 before anything is published (they used to publish empty
    outputs and leave a catalog that forgot every file), the third is a warning and a count. The
    permission errors are raised by a stand-in for the listing: the tests may run as root, whom
    chmod does not stop."""
    import contextlib
    from pipeline import paths
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    before = {name: (out / name).read_bytes() for name in ("run.json", "images.parquet")}
    # the catalog knows the files of grown["data"]: point the same OUT at an empty folder of that name
    moved = tmp_path / "away"
    os.replace(grown["data"], moved)
    grown["data"].mkdir()
    try:
        assert main(["dedupe", str(grown["data"]), "--out", str(out), *COMMON]) == 2
    finally:
        grown["data"].rmdir()
        os.replace(moved, grown["data"])
    assert {name: (out / name).read_bytes() for name in before} == before

    real = paths.scandir
    denied = set()

    @contextlib.contextmanager
    def listing(path):
        if os.path.abspath(path) in denied:
            raise PermissionError(13, "Permission denied", path)
        with real(path) as it:
            yield it

    monkeypatch.setattr(paths, "scandir", listing)
    denied.add(os.path.abspath(grown["data"]))
    assert main(["dedupe", str(grown["data"]), "--out", str(out), *COMMON]) == 2
    assert {name: (out / name).read_bytes() for name in before} == before
    denied.clear()
    denied.add(os.path.abspath(grown["data"] / "b"))
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        manifest = run(grown["data"], out)
    assert manifest["counts"]["unlisted_folders"] == 1
    assert any("could not be listed" in r.getMessage() and "b (Permission denied)" in r.getMessage()
               for r in caplog.records)
    assert not pd.read_parquet(out / "images.parquet")["path"].str.startswith("b/").any()


def test_a_catalog_made_for_another_folder_is_a_warning(grown, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        manifest = run(grown["data"] / "a", out)
    assert manifest["reuse"]["screen"]["screened"] == manifest["counts"]["files"]
    assert any("was made for another folder" in r.getMessage() for r in caplog.records)


def test_what_only_the_commit_reads_is_let_go_of_before_the_write_stage(generated, tmp_path, monkeypatch):
    """The directed K-nearest lists (18 B a row, up to screen.max_candidates rows an image) and
    this run's feature rows (~0.2 kB each) are kept for the catalog's commit only, not through the
    write stage, the driver's peak."""
    import gc
    import weakref

    from pipeline import write
    kept, alive_at_write = [], []
    neighbours_table, features_table, outputs = catalog.neighbours_table, catalog.features_table, write.write_outputs

    def lists(directed, images):
        kept.append(weakref.ref(directed))
        return neighbours_table(directed, images)

    def features(cat, present, new_features, ran):
        kept.extend(weakref.ref(f) for f in new_features)
        return features_table(cat, present, new_features, ran)

    def write_outputs(*args, **kwargs):
        gc.collect()
        alive_at_write.extend(ref() is not None for ref in kept)
        return outputs(*args, **kwargs)

    monkeypatch.setattr(catalog, "neighbours_table", lists)
    monkeypatch.setattr(catalog, "features_table", features)
    monkeypatch.setattr(write, "write_outputs", write_outputs)
    manifest = run(generated["A"], tmp_path / "out", "--set", "tiers=verify")
    assert manifest["counts"]["near_candidates"] > 0 and len(kept) >= 2  # the lists and the ORB features made
    assert alive_at_write == [False] * len(kept)


@pytest.mark.parametrize("kind", ["str", "object", "category", "large_string"])
def test_among_finds_the_present_texts_whatever_the_column_and_the_set(kind):
    """catalog.among (Arrow's lookup, not pandas' isin, which makes an Arrow scalar per text
    looked for): the rows isin finds, for Arrow, object and categorical text with missing values,
    the texts given as a set, a list, an object array or an Arrow array."""
    import pyarrow as pa
    texts = ["a" * 64, "b" * 64, None, "c" * 64, "a" * 64, "ü" * 3]
    values = {"str": pd.Series(pd.array(texts, dtype="str")), "object": pd.Series(texts, dtype=object),
              "category": pd.Series(texts, dtype="category"),
              "large_string": pd.Series(pd.array(texts, dtype=pd.ArrowDtype(pa.large_string())))}[kind]
    want = [True, False, False, True, True, True]
    for present in ({"a" * 64, "c" * 64, "ü" * 3, "zz"}, ["a" * 64, "c" * 64, "ü" * 3, "a" * 64],
                    np.array(["a" * 64, "c" * 64, "ü" * 3], dtype=object), pa.array(["ü" * 3, "c" * 64, "a" * 64])):
        got = catalog.among(values, present)
        assert got.dtype == bool and got.tolist() == want
        assert got.tolist() == values.isin(present.to_pylist() if isinstance(present, pa.Array) else list(present)).tolist()
    assert catalog.among(values, set()).tolist() == [False] * len(texts)
    assert catalog.among(values.iloc[:0], {"a"}).tolist() == []


@pytest.mark.parametrize("values", [[None, None], [np.nan, None], ["a", "b\udcff"], [1.5, np.nan], [1, 2]])
def test_among_gives_what_isin_gives_for_what_arrow_cannot_take_as_text(values):
    """All missing, undecodable names, numbers (a table read back with no rows): no error."""
    present = np.array(["a", "c"], dtype=object)  # (contents: never missing)
    columns = [pd.Series(values, dtype=object)]
    if not any(isinstance(v, str) and not paths.is_utf8(v) for v in values):  # (pandas refuses those categories)
        columns.append(pd.Series(values).astype("category"))
    for column in columns:
        for given in (present, set(present.tolist())):
            assert catalog.among(column, given).tolist() == column.isin(list(given)).tolist()


def test_a_rerun_opens_only_the_files_its_catalog_cannot_vouch_for(generated, tmp_path, monkeypatch):
    """A nightly run over a mostly unchanged folder: the listing reads the first bytes of new,
    changed and error files only (the catalog's clean records, same size and mtime_ns, are
    images as they are); with --rehash every file is read."""
    from pipeline import scan
    data = tmp_path / "data"
    shutil.copytree(generated["A"], data)
    first = run(data, tmp_path / "out", "--set", "tiers=screen")
    errors = set(pd.read_parquet(tmp_path / "out" / "images.parquet").query("error.notna()")["path"])
    with Image.open(data / "g0001_original.jpg") as im:
        im.convert("RGB").resize((im.width // 2, im.height // 2)).save(data / "zz_added.jpg", quality=85)
    touched = sorted(p.name for p in data.iterdir() if p.name not in errors)[3]
    os.utime(data / touched, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    opened, classify = [], scan.classify
    monkeypatch.setattr(scan, "classify", lambda path, size, cfg: opened.append(os.path.basename(path))
                        or classify(path, size, cfg))
    again = run(data, tmp_path / "out", "--set", "tiers=screen")
    assert sorted(opened) == sorted({"zz_added.jpg", touched} | errors)
    assert again["counts"]["files"] == first["counts"]["files"] + 1
    assert again["reuse"]["screen"]["reused"] == first["counts"]["files"] - 1
    opened.clear()
    run(data, tmp_path / "out", "--set", "tiers=screen", "--rehash")
    assert len(opened) == again["counts"]["files"]


def test_known_images_answer_each_batch_without_going_over_every_record():
    """KnownImages.find (a call per screen batch, and per folder of the listing): the records'
    hash table is built once, not with every record's path made again per call, which at 1M
    records was ~137 ms per 4,096 paths (a nightly run over 10M files: hours)."""
    import tracemalloc
    n = 50_000
    paths_ = [f"folder{i // 1000:03d}/image_{i:06d}.jpg" for i in range(n)]
    records = pd.DataFrame({"path": pd.array(paths_, dtype="str"), "bytes": np.ones(n, np.int64),
                            "mtime_ns": np.ones(n, np.int64), "sha256": [None] * n, "etag": [None] * n,
                            "error": [None] * n, "screen_fp": "fp"})
    known = catalog.KnownImages(records, "fp")
    assert known.find(paths_[10:20]).tolist() == list(range(10, 20))
    tracemalloc.start()
    try:
        got = known.find(["nope", paths_[-1], paths_[0]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.tolist() == [-1, n - 1, 0]
    assert peak < 200_000, peak  # (every record's path as a Python string: ~4 MB)


def test_files_dated_past_2262_are_rows_with_their_dates_and_never_taken_as_unchanged(photo_paths, tmp_path):
    """64-bit nanoseconds end on 2262-04-11. A file dated later failed the whole run (an int64
    cast, then nanosecond timestamps in images.parquet); now its mtime_ns is clamped to that bound,
    which a re-run never takes as a match (two such dates would look equal), and images.parquet
    holds its date. Every file's mtime is its st_mtime_ns floored to the microsecond (from the
    float seconds, some were 1 us off). `dedupe plan` and `apply` take the rows as they are."""
    from pipeline import actions, scan
    data, out, cat = tmp_path / "data", tmp_path / "out", tmp_path / "catalog"
    data.mkdir()
    for i, src in enumerate(photo_paths[:6]):
        shutil.copyfile(src, data / f"p{i}.jpg")
    shutil.copyfile(photo_paths[0], data / "copy.jpg")
    Image.open(photo_paths[1]).resize((240, 160)).save(data / "small.jpg", quality=80)
    later = 10_500_000_000 * 10 ** 9 + 123_456_789  # 2302-09-25
    os.utime(data / "copy.jpg", ns=(later, later))
    os.utime(data / "small.jpg", ns=(later - 10 ** 17, later - 10 ** 17))
    if os.stat(data / "copy.jpg").st_mtime_ns != later:
        pytest.skip("this file system does not keep dates past 2262")
    for again in (False, True):
        assert main(["dedupe", str(data), "--out", str(out), "--catalog", str(cat), "--tiers", "verify",
                     "--scheduler", "sync", "--quiet"]) == 0
        images = pd.read_parquet(out / "images.parquet").set_index("path")
        for path in images.index:
            st_us = os.stat(data / path).st_mtime_ns // 1000
            got = int(images.at[path, "mtime"].to_datetime64().astype("datetime64[us]").astype(np.int64))
            # (past 2262 from the float seconds: within their precision, ~2 us there)
            assert abs(got - st_us) <= (0 if scan.mtime_ns_exact(st_us * 1000) else 4), path
        assert images.at["copy.jpg", "mtime"].year == 2302 and images["error"].isna().all()
        pairs = pd.read_parquet(out / "pairs.parquet")
        assert set(map(tuple, pairs.loc[pairs["is_duplicate"], ["path_a", "path_b"]].to_numpy())) \
            >= {("copy.jpg", "p0.jpg"), ("p1.jpg", "small.jpg")}
    reuse = json.loads((out / "run.json").read_text())["reuse"]
    assert reuse["screen"]["why_screened"] == {"mtime_beyond_64_bits": 2}, reuse  # clamped, never matched
    assert main(["plan", str(out), "--keep", "newest"]) == 0
    plan = actions.read_plan(out / "plan.parquet")
    assert set(plan.loc[plan["action"] == "keep", "path"]) == {"copy.jpg", "small.jpg"}
    assert all(actions.changed(actions.file_name(r), r) is None for r in plan.itertuples())


def test_a_name_whose_text_form_is_another_files_name_is_left_out_and_said(photo_paths, tmp_path, caplog):
    """b"bad-\\xff.jpg" (not UTF-8) and a valid "bad-\\\\xff.jpg" both read bad-\\xff.jpg, the text
    the outputs and the catalog name files by: images.parquet had two rows of one path, a pair
    with path_a == path_b, and every catalog re-run failed (duplicate labels). The valid name is
    kept; the other is left out, with a warning and a count, until one is renamed."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    raw = os.path.join(os.fsencode(data), b"bad-\xff.jpg")
    shutil.copyfile(photo_paths[0], raw)
    shutil.copyfile(photo_paths[1], data / "bad-\\xff.jpg")
    shutil.copyfile(photo_paths[1], data / "copy.jpg")
    for _ in range(2):
        caplog.clear()
        assert main(["dedupe", str(data), "--out", str(out), "--catalog", str(tmp_path / "cat"), "--tiers", "screen",
                     "--scheduler", "sync", "--quiet"]) == 0
        images = pd.read_parquet(out / "images.parquet")
        assert sorted(images["path"]) == ["bad-\\xff.jpg", "copy.jpg"] and images["raw_path"].isna().all()
        assert json.loads((out / "run.json").read_text())["counts"]["unlisted_folders"] == 1
        assert "is another entry's name in its folder" in caplog.text
    assert os.path.exists(raw)  # (never touched)


def test_query_add_makes_nothing_of_a_catalog_file_rewritten_since_the_batch_run(photo_paths, tmp_path):
    """`query --add` compares a query with the catalog's files as they are on disk, filed under
    the sha256 the batch run recorded: a file rewritten since gave features of its new bytes under
    its old sha256, which the next batch run reused for that file's byte copy (0 inliers against
    the query it is the original of, instead of ~330)."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    shutil.copyfile(photo_paths[0], data / "a.jpg")
    shutil.copyfile(photo_paths[0], data / "z_copy.jpg")
    shutil.copyfile(photo_paths[1], data / "b.jpg")
    args = ["--preset", "fast", "--scheduler", "sync", "--quiet"]
    assert main(["dedupe", str(data), "--out", str(out), *args]) == 0
    Image.open(data / "a.jpg").resize((400, 267)).save(data / "q.jpg", quality=80)
    shutil.copyfile(photo_paths[2], data / "a.jpg")  # rewritten after the batch run
    from pipeline.query import query
    query([data / "q.jpg"], out / "catalog", add=True)
    assert main(["dedupe", str(data), "--out", str(out), *args]) == 0
    pairs = pd.read_parquet(out / "pairs.parquet").set_index(["path_a", "path_b"])
    assert pairs.loc[("q.jpg", "z_copy.jpg"), "is_duplicate"] and pairs.loc[("q.jpg", "z_copy.jpg"), "orb_inliers"] > 100


def test_a_verdict_only_verify_setting_keeps_the_stored_orb_features():
    """verify.min_coverage, like match_inliers, shapes the verdict of a pair, not an image's ORB
    features: changing it recomputes the pair scores from the stored features (it recomputed
    every image's features)."""
    from pipeline.config import load_config
    base = catalog.fingerprints(load_config(None, []))
    for change in ("verify.min_coverage=0.5", "verify.match_inliers=16", "verify.min_inlier_share=0.2",
                   "verify.chance_min_matches=30", "verify.semi_flat_share=0.7",
                   "verify.semi_flat_ssim=0.2", "verify.region_mismatch=0.3"):
        other = catalog.fingerprints(load_config(None, [change]))
        assert other["orb_features"] == base["orb_features"], change
        assert other["orb"] != base["orb"], change


def test_groups_of_copies_with_one_hash_past_k_come_out_as_one_cluster(photos_dir, photo_paths, tmp_path):
    """More than screen.max_candidates copies with one hash (frames, burst shots) filled each
    other's K-nearest lists with ties, so a second such group a bit away was never paired: one
    photo's copies came out as two clusters. The groups' first images are now paired with their
    nearest outside the group (`candidates.tie_bridges`), in a run, a catalog re-run and a query."""
    from PIL import ImageDraw

    from pipeline.query import query
    photo = photos_dir / "bsds__test_100007.jpg"
    if not photo.exists():
        pytest.skip(f"{photo} is not in the shared photos")
    data, out, fresh = tmp_path / "data", tmp_path / "out", tmp_path / "fresh"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    with Image.open(photo) as im:
        base = im.convert("RGB")
    base.thumbnail((900, 900))
    patched = base.copy()  # one of the hash's 8 x 8 cells painted over: its hash is a bit away
    w, h = base.width / 8, base.height / 8
    cell = np.asarray(base.convert("L"))[int(h):int(2 * h), int(w):int(2 * w)]
    ImageDraw.Draw(patched).rectangle([w, h, 2 * w, 2 * h], fill=(0, 0, 0) if cell.mean() > 128 else (255, 255, 255))
    scales = np.linspace(0.5, 1.0, 8)  # (resized copies: each group's hash is one code)
    for folder, picture in (("a", base), ("b", patched)):
        for i, s in enumerate(scales):
            picture.resize((int(base.width * s), int(base.height * s))).save(data / folder / f"{i}.jpg", quality=90)
    for p in photo_paths[:4]:
        if p != photo:
            shutil.copyfile(p, data / p.name)
    k = ("--set", "screen.max_candidates=4")
    manifest = run(data, out, *k)
    assert manifest["reuse"]["candidates"]["tied_hash_groups"] == 2
    assert manifest["reuse"]["candidates"]["tie_bridge_pairs"] >= 1
    images = pd.read_parquet(out / "images.parquet")
    copies = images[images["path"].str.match(r"[ab]/")]
    assert copies["cluster_id"].notna().all() and copies["cluster_id"].nunique() == 1
    pairs = pd.read_parquet(out / "pairs.parquet")
    across = pairs[pairs["path_a"].str.startswith("a/") & pairs["path_b"].str.startswith("b/")]
    assert across["is_duplicate"].any() and set(across["path_a"]) == {"a/0.jpg"}
    # a re-run from the catalog, after a file is added, equals a run from scratch
    base.resize((base.width // 3, base.height // 3)).save(data / "a" / "9.jpg", quality=90)
    again = run(data, out, *k)
    assert again["reuse"]["candidates"]["tied_hash_groups"] == 2
    run(data, fresh, "--no-catalog", *k)
    assert_same_outputs(out, fresh)
    # on a cluster (the bridges searched in a task on a worker) the same
    clustered = tmp_path / "clustered"
    assert main(["dedupe", str(data), "--out", str(clustered), "--scheduler", "local", "--quiet", "--no-catalog",
                 "--set", "decide.accept_inliers=60", "--set", "dask.n_workers=2",
                 "--set", "dask.dashboard_address=", *k]) == 0
    assert json.loads((clustered / "run.json").read_text())["reuse"]["candidates"]["tied_hash_groups"] == 2
    assert_same_outputs(clustered, fresh)
    # a query gets the batch job's pairs, the bridge's first image and one of B's alike
    for rel in ("a/0.jpg", "b/0.jpg", "b/3.jpg"):
        _same_rows(query([data / rel], out / "catalog"), _batch_rows(fresh, rel))
