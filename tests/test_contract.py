"""The output contract (README "Output"), property by property, on a real full-cascade run.

Not only that the columns exist: every documented property of their values is checked here
(cluster ids are member image ids, ids come from the path, stages and rules agree with the
evidence columns, pandas reads the documented dtypes back, the files carry their provenance).
"""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.decide import RULES
from pipeline.write import CONTRACT_VERSION, IMAGES_DTYPES, PAIRS_DTYPES, STAGES

pytestmark = pytest.mark.slow

DIFFERENT_RULES = {"screen_hash_far", "verify_orb_reject", "verify_inconclusive_hash_far", "confirm_cosine_low",
                   "verify_pixel_mismatch", "file_changed"}
EITHER_RULES = {"confirm_no_embedding"}  # the verdict is ORB's


@pytest.fixture(scope="module")
def full_run(labelled_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract-run")
    # two labelled sets: copies, crops, rotations, look-alike negatives and a 4032 px EXIF set
    data = tmp_path_factory.mktemp("contract-data")
    for name in ("jenssegers_imagehash", "threatexchange_pdq"):
        (data / name).symlink_to(labelled_dir / name, target_is_directory=True)
    assert main(["dedupe", str(data), "--out", str(out), "--scheduler", "sync", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def images(full_run) -> pd.DataFrame:
    return pd.read_parquet(full_run / "images.parquet")


@pytest.fixture(scope="module")
def pairs(full_run) -> pd.DataFrame:
    return pd.read_parquet(full_run / "pairs.parquet")


def test_pandas_reads_the_documented_dtypes(images, pairs):
    assert list(images.columns) == ["image_id", "path", "bytes", "mtime", "width", "height", "format",
                                    "sha256", "hash", "error", "cluster_id", "raw_path"]
    assert images["raw_path"].isna().all()  # every name here is valid UTF-8
    assert list(pairs.columns)[:12] == ["path_a", "path_b", "image_id_a", "image_id_b", "hash_distance",
                                        "orb_matches", "orb_inliers", "orb_score", "cosine", "stage",
                                        "is_duplicate", "reason"]  # v1 order kept; v2 appends
    for frame, dtypes in ((images, IMAGES_DTYPES), (pairs, PAIRS_DTYPES)):
        for col, dtype in dtypes.items():
            if col == "raw_path":
                continue  # bytes or null: object
            if dtype == "object":  # text: object before pandas 3, its string dtype after
                assert pd.api.types.is_string_dtype(frame[col]), (col, frame[col].dtype)
            else:
                assert str(frame[col].dtype) == dtype, (col, frame[col].dtype)
    assert str(images["mtime"].dtype) == "datetime64[us, UTC]"
    assert list(pairs["stage"].cat.categories) == STAGES


def test_every_cluster_id_is_the_image_id_of_its_first_member(images, pairs):
    clustered = images[images["cluster_id"].notna()]
    assert len(clustered) >= 10
    assert clustered["cluster_id"].isin(images["image_id"]).all()  # exact 64-bit ids, no float rounding
    for cid, members in clustered.groupby("cluster_id"):
        assert len(members) >= 2
        first = members.sort_values("path").iloc[0]
        assert first["image_id"] == cid
    dup = pairs[pairs["is_duplicate"]]
    cid = images.set_index("image_id")["cluster_id"]
    assert (cid.loc[dup["image_id_a"]].to_numpy() == cid.loc[dup["image_id_b"]].to_numpy()).all()
    # and an image in no duplicate pair is in no cluster
    in_pairs = set(dup["image_id_a"]) | set(dup["image_id_b"])
    assert images.loc[~images["image_id"].isin(in_pairs), "cluster_id"].isna().all()


def test_image_ids_come_from_the_path(images, pairs):
    expected = [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "big") >> 1
                for p in images["path"]]
    assert images["image_id"].tolist() == expected
    ids = images.set_index("path")["image_id"]
    assert (ids.loc[pairs["path_a"]].to_numpy() == pairs["image_id_a"].to_numpy()).all()
    assert (ids.loc[pairs["path_b"]].to_numpy() == pairs["image_id_b"].to_numpy()).all()
    assert (pairs["path_a"] < pairs["path_b"]).all()


def test_stage_rule_and_evidence_agree(images, pairs):
    assert set(pairs["rule"]) <= set(RULES)
    assert {"verify_orb_accept", "verify_orb_reject"} <= set(pairs["rule"])
    assert pairs["reason"].str.len().gt(0).all()
    assert pairs["rule"].astype(str).str.split("_").str[0].isin(["exact", "screen", "verify", "confirm", "file"]).all()
    different = pairs["rule"].isin(DIFFERENT_RULES)
    fixed = ~pairs["rule"].isin(EITHER_RULES)
    assert (pairs.loc[fixed, "is_duplicate"] == ~different[fixed]).all()
    exact = pairs[pairs["stage"] == "exact"]
    sha = images.set_index("image_id")["sha256"]
    assert (exact["hash_distance"] == 0).all()
    assert (sha.loc[exact["image_id_a"]].to_numpy() == sha.loc[exact["image_id_b"]].to_numpy()).all()
    verify = pairs[pairs["stage"] == "verify"]
    assert verify["orb_inliers"].notna().all() and verify["cosine"].isna().all()
    confirm = pairs[pairs["stage"] == "confirm"]
    assert len(confirm) and confirm["cosine"].notna().all() and confirm["orb_inliers"].notna().all()
    assert confirm["cosine"].between(-1, 1).all()


def test_files_carry_their_provenance(full_run):
    manifest = json.loads((full_run / "run.json").read_text())
    assert manifest["contract_version"] == CONTRACT_VERSION == 2
    for name in ("images.parquet", "pairs.parquet"):
        meta = pq.read_schema(full_run / name).metadata
        got = {k.decode(): json.loads(v) for k, v in meta.items() if k.startswith(b"dedupe.")}
        assert got["dedupe.contract_version"] == 2
        assert got["dedupe.run_id"] == manifest["run_id"]
        assert got["dedupe.config"]["decide"]["cosine_threshold"] == manifest["config"]["decide"]["cosine_threshold"]
        for lib in ("tensorflow", "keras", "faiss", "opencv", "numpy", "pillow", "pyarrow"):
            assert got["dedupe.versions"][lib], lib
    assert manifest["versions"]["tensorflow"] and manifest["versions"]["faiss"]
