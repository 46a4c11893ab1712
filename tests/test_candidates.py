"""The candidates stage: exact groups, near pairs with variants and transforms, Dask == local."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.candidates import exact_pairs, exact_representatives, near_pairs
from pipeline.config import ScreenConfig
from pipeline.decode import dihedral
from pipeline.search import pack_hex

imagehash = pytest.importorskip("imagehash")


def cfg(**kw) -> ScreenConfig:
    return dataclasses.replace(ScreenConfig(), **kw)


# --------------------------------------------------------------------------------------------
# exact


def test_exact_pairs_all_pairs_star_and_nulls():
    sha = pd.Series(["x", "a", None, "a", "b", "x", "a", "", "c", "x", "x", "x", np.nan])
    # group "a": rows 1, 3, 6 (n=3); group "x": rows 0, 5, 9, 10, 11 (n=5); "b", "c" singletons
    full = exact_pairs(sha, group_limit=4)  # n <= 5 -> all pairs everywhere
    expect_a = [(1, 3), (1, 6), (3, 6)]
    expect_x = [(0, 5), (0, 9), (0, 10), (0, 11), (5, 9), (5, 10), (5, 11), (9, 10), (9, 11), (10, 11)]
    assert list(full.itertuples(index=False, name=None)) == sorted(expect_a + expect_x)
    assert full.dtypes.tolist() == [np.int64, np.int64]
    star = exact_pairs(sha, group_limit=3)  # n = 5 > 4 -> star from row 0
    assert list(star.itertuples(index=False, name=None)) == sorted(
        expect_a + [(0, 5), (0, 9), (0, 10), (0, 11)])
    assert exact_pairs(pd.Series([None, None], dtype=object), 5).empty
    assert exact_pairs(pd.Series(["a", "b"]), 5).empty
    rep = exact_representatives(sha)
    assert np.flatnonzero(~rep).tolist() == [3, 5, 6, 9, 10, 11]


def test_exact_pairs_ignores_series_index():
    sha = pd.Series(["h", "g", "h"], index=[10, 20, 30])
    assert list(exact_pairs(sha, 50).itertuples(index=False, name=None)) == [(0, 2)]


# --------------------------------------------------------------------------------------------
# near pairs: variants and transforms


def synthetic(seed: int, size=(128, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def variant_codes(images: list[Image.Image], V: int = 9):
    """codes (N, V, 1) and mask as the screen computes them (no trimmed variant here)."""
    n = len(images)
    codes = np.zeros((n, V, 1), np.uint64)
    mask = np.zeros((n, V), bool)
    for i, img in enumerate(images):
        for v in range(min(V, 8)):
            codes[i, v] = pack_hex([str(imagehash.average_hash(dihedral(img, v)))])[0]
            mask[i, v] = True
    return codes, mask


@pytest.mark.parametrize("t", range(1, 8))
@pytest.mark.parametrize("copy_first", [False, True])
def test_transform_aligns_b_with_a(t, copy_first):
    img = synthetic(t)
    copy = dihedral(img, t)
    others = [synthetic(100 + j) for j in range(3)]
    images = [copy, img] + others if copy_first else [img, copy] + others
    codes, mask = variant_codes(images)
    pairs = near_pairs(codes, mask, cfg(max_distance=6))
    row = pairs[(pairs.idx_a == 0) & (pairs.idx_b == 1)]
    assert len(row) == 1, pairs
    assert int(row.hash_distance.iloc[0]) == 0
    t_out = int(row["transform"].iloc[0])
    a, b = images[0], images[1]
    assert np.array_equal(np.asarray(dihedral(b, t_out)), np.asarray(a)), (t, t_out)
    # without dihedral variants the mirrored/rotated copy is not a candidate
    plain = near_pairs(codes, mask, cfg(max_distance=6, dihedral=False))
    assert not ((plain.idx_a == 0) & (plain.idx_b == 1)).any()


def test_trimmed_variant_matches_letterboxed_copy():
    img = synthetic(7, size=(128, 96))
    boxed = Image.new("RGB", (128, 160), (0, 0, 0))
    boxed.paste(img, (0, 32))
    codes = np.zeros((3, 9, 1), np.uint64)
    mask = np.zeros((3, 9), bool)
    codes[0, 0] = pack_hex([str(imagehash.average_hash(img))])[0]
    codes[1, 0] = pack_hex([str(imagehash.average_hash(boxed))])[0]
    codes[1, 8] = pack_hex([str(imagehash.average_hash(boxed.crop((0, 32, 128, 128))))])[0]
    codes[2, 0] = pack_hex([str(imagehash.average_hash(synthetic(8)))])[0]
    mask[:, 0] = True
    mask[1, 8] = True
    on = near_pairs(codes, mask, cfg(max_distance=4, dihedral=False))
    assert list(on[["idx_a", "idx_b", "hash_distance", "transform"]].itertuples(index=False, name=None)) == [(0, 1, 0, 0)]
    off = near_pairs(codes, mask, cfg(max_distance=4, dihedral=False, trim_borders=False))
    assert not ((off.idx_a == 0) & (off.idx_b == 1)).any()


def test_invalid_rows_and_representatives_left_out():
    codes = np.full((5, 1, 1), 12345, np.uint64)
    mask = np.ones((5, 1), bool)
    mask[2] = False  # decode error
    all_pairs = near_pairs(codes, mask, cfg(max_distance=2, max_candidates=10))
    assert list(zip(all_pairs.idx_a, all_pairs.idx_b)) == [(0, 1), (0, 3), (0, 4), (1, 3), (1, 4), (3, 4)]
    rep = np.array([True, False, True, True, False])
    some = near_pairs(codes, mask, cfg(max_distance=2), representatives=rep)
    assert list(zip(some.idx_a, some.idx_b)) == [(0, 3)]
    assert list(some.columns) == ["idx_a", "idx_b", "hash_distance", "transform"]
    assert some.dtypes.tolist() == [np.int64, np.int64, np.int16, np.int8]


def test_hub_cap_is_union_of_top_k():
    codes = np.full((50, 1, 1), 777, np.uint64)
    mask = np.ones((50, 1), bool)
    pairs = near_pairs(codes, mask, cfg(max_distance=3, max_candidates=3))
    got = set(zip(pairs.idx_a.tolist(), pairs.idx_b.tolist()))
    expect = {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)} | {(j, i) for i in range(4, 50) for j in range(3)}
    assert got == expect


def random_variant_data(seed: int, n: int = 4000):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, np.iinfo(np.uint64).max, size=(n, 9, 1), dtype=np.uint64, endpoint=True)
    mask = rng.random((n, 9)) < 0.8
    mask[:, 0] = rng.random(n) < 0.97
    for i in range(0, 1200, 2):  # plant: a variant of i near b's plain / trimmed entry
        v = int(rng.integers(0, 9))
        target = 8 if i % 6 == 0 else 0
        noise = np.uint64(0)
        for bit in rng.choice(64, size=int(rng.integers(0, 9)), replace=False):
            noise |= np.uint64(1) << np.uint64(int(bit))
        codes[i + 1, target] = codes[i, v] ^ noise
        mask[i, v] = mask[i + 1, target] = mask[i, 0] = mask[i + 1, 0] = True
    return codes, mask


def test_near_pairs_backends_agree_and_find_planted():
    codes, mask = random_variant_data(11)
    c = cfg(max_distance=8, max_candidates=4, dihedral_max_distance=8)
    mih = near_pairs(codes, mask, c)
    brute = near_pairs(codes, mask, dataclasses.replace(c, backend="brute"))
    pd.testing.assert_frame_equal(mih, brute)
    blocked = near_pairs(codes, mask, c, block_rows=997)
    pd.testing.assert_frame_equal(mih, blocked)
    got = set(zip(mih.idx_a.tolist(), mih.idx_b.tolist()))
    assert all((i, i + 1) in got for i in range(0, 1200, 2))
    assert (mih.idx_a < mih.idx_b).all()
    assert mih.equals(mih.sort_values(["idx_a", "idx_b"]).reset_index(drop=True))


@pytest.mark.slow
def test_dask_cluster_equals_in_process():
    distributed = pytest.importorskip("distributed")
    codes, mask = random_variant_data(12, n=6000)
    rep = np.random.default_rng(3).random(6000) < 0.95
    # two groups of more than K images with one hash, a bit apart (candidates.tie_bridges)
    codes[3000:3010], mask[3000:3010], rep[3000:3010] = codes[3000], True, True
    codes[3010:3016], mask[3010:3016], rep[3010:3016] = codes[3000] ^ np.uint64(1), True, True
    c = cfg(max_distance=9, max_candidates=3, dihedral_max_distance=9)
    local = near_pairs(codes, mask, c, representatives=rep)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = near_pairs(codes, mask, c, client=client, representatives=rep, block_rows=1500)
    pd.testing.assert_frame_equal(local, remote)
    assert len(local) > 500
    assert ((local["idx_a"] == 3000) & (local["idx_b"] == 3010)).any()  # the two groups' first images


def test_rotated_variants_match_only_within_their_own_limit():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, np.iinfo(np.uint64).max, size=(4, 9, 1), dtype=np.uint64, endpoint=True)
    mask = np.zeros((4, 9), bool)
    mask[:, :8] = True
    six = np.uint64(0b111111)
    codes[1, 0] = codes[0, 0] ^ six  # plain hashes 6 bits apart: a candidate at max_distance 8
    codes[3, 0] = codes[2, 4] ^ six  # 2's mirrored hash 6 bits from 3: beyond dihedral_max_distance 4
    got = near_pairs(codes, mask, cfg(max_distance=8, dihedral_max_distance=4))
    assert set(zip(got.idx_a, got.idx_b)) == {(0, 1)}
    wide = near_pairs(codes, mask, cfg(max_distance=8, dihedral_max_distance=8))
    assert {(0, 1), (2, 3)} <= set(zip(wide.idx_a, wide.idx_b))


def test_the_runs_pair_frame_holds_kind_and_source_as_one_byte_categories(tmp_path):
    """run.build_pairs: exact pairs (no source) and hash candidates ("hash"), kind and source as
    categories of a byte a pair (the driver holds this frame from the candidates to the end)."""
    from pipeline import run
    from pipeline.config import load_config
    from pipeline.progress import Progress
    rng = np.random.default_rng(5)
    base = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(base).save(tmp_path / "a.png")
    Image.fromarray(base).save(tmp_path / "a-copy.png")  # the same bytes: an exact pair
    Image.fromarray(base).resize((48, 32)).save(tmp_path / "a-small.png")  # a near candidate of both
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "other.png")
    cfg = load_config(None, [])
    images = run.run_screen(tmp_path, cfg, None, Progress(True))
    pairs = run.build_pairs(images, cfg, None)
    assert pairs["kind"].dtype == run.PAIR_KINDS and pairs["source"].dtype == run.PAIR_SOURCES
    assert pairs["kind"].array.codes.dtype == np.int8 and pairs["source"].array.codes.dtype == np.int8
    paths = images["path"].to_numpy(dtype=object)
    found = {(paths[a], paths[b], k, s if isinstance(s, str) else None)
             for a, b, k, s in zip(pairs["idx_a"], pairs["idx_b"], pairs["kind"], pairs["source"])}
    assert ("a-copy.png", "a.png", "exact", None) in found or ("a.png", "a-copy.png", "exact", None) in found
    assert {k for _, _, k, _ in found} == {"exact", "near"}
    assert all((k == "exact") == (s is None) and s in (None, "hash") for _, _, k, s in found)
    assert not [f for f in found if "other.png" in f[:2]]


def test_groups_of_more_than_k_tied_hashes_are_bridged_by_their_first_image():
    """More than K images with one hash fill each other's K-nearest lists with distance-0 ties:
    two such groups a bit apart were never paired (each image's list held only its own group).
    Each group's first image is now paired with its nearest outside the group as well; the lists
    and the groups' own pairs are as before, and a group of at most K changes nothing."""
    from pipeline.candidates import tie_bridges, tied_groups
    c = cfg(max_distance=4, max_candidates=3)
    codes = np.zeros((14, 1, 1), np.uint64)
    codes[0:5] = 0b1010          # group A (5 > K)
    codes[5:10] = 0b1011         # group B, one bit from A
    codes[10:12] = 0b111010      # two more, two bits from A: a group of at most K
    codes[12] = 0xFFFF0000FFFF   # far from everything
    codes[13] = 0b1010           # A's hash, but a decode error: takes no part
    mask = np.ones((14, 1), bool)
    mask[13] = False
    first, others = tied_groups(codes, mask, c)
    assert first.tolist() == [0, 5] and np.flatnonzero(others).tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
    pairs = near_pairs(codes, mask, c)
    got = set(zip(pairs.idx_a.tolist(), pairs.idx_b.tolist()))
    assert (0, 5) in got  # the bridge: A's and B's first images, one bit apart
    bridges, groups = tie_bridges(codes, mask, c)
    assert groups == 2
    # A's first image's K nearest outside A: B's first (1 bit), then the two at 2 bits
    assert set(zip(bridges.idx_a.tolist(), bridges.idx_b.tolist())) == {(0, 5), (0, 10), (0, 11), (5, 10), (5, 11)}
    row = pairs[(pairs.idx_a == 0) & (pairs.idx_b == 5)].iloc[0]
    assert (row["hash_distance"], row["transform"]) == (1, 0)
    # the groups' own pairs are the ties' as before: all of each group's first K+1, the rest with its first K
    a_pairs = {p for p in got if p[0] < 5 and p[1] < 5}
    assert a_pairs == {(i, j) for i in range(4) for j in range(i + 1, 4)} | {(0, 4), (1, 4), (2, 4)}
    # at most K alike: nothing added
    small = cfg(max_distance=4, max_candidates=5)
    assert tied_groups(codes, mask, small)[0].size == 0
    assert tie_bridges(codes, mask, small)[0].empty
    # byte copies left out (representatives) do not count toward a group
    rep = np.ones(14, bool)
    rep[[1, 2]] = False
    assert tied_groups(codes, mask, c, representatives=rep)[0].tolist() == [5]


def test_a_group_of_tied_images_is_one_plain_hash_whatever_their_other_variants():
    """Copies with one plain hash tie at distance 0 in each other's lists whatever their turned,
    flipped or trimmed hashes (a border found in some copies, a turned hash a bit off): grouped
    by all their variants, such copies split into small groups and were never bridged (a review
    finding)."""
    from pipeline.candidates import tied_groups
    c = cfg(max_distance=4, max_candidates=3)  # (dihedral and trimmed variants searched)
    codes = np.zeros((16, 9, 1), np.uint64)
    codes[:8] = 0b1010   # A
    codes[8:] = 0b1011   # B, one bit away
    mask = np.ones((16, 9), bool)
    mask[:, 8] = False
    trimmed, turned = codes.copy(), codes.copy()
    with_border = mask.copy()
    with_border[::2, 8] = True  # half the copies: a border trimmed, each its own far hash
    trimmed[::2, 8, 0] = np.arange(8, dtype=np.uint64) * np.uint64(0xF0F0F0F0F0F0) + np.uint64(1 << 40)
    turned[1::2, 3, 0] ^= np.uint64(1 << 20)  # a turned hash a bit off
    for cs, m in ((codes, mask), (trimmed, with_border), (turned, mask)):
        assert tied_groups(cs, m, c)[0].tolist() == [0, 8]
        pairs = near_pairs(cs, m, c)
        assert ((pairs["idx_a"] == 0) & (pairs["idx_b"] == 8)).any()
