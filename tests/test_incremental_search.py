"""The catalog's incremental candidate search equals a search from scratch (per-image cap K)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from bench.incremental import grown_collection
from pipeline import candidates
from pipeline.candidates import directed_neighbours, incremental_neighbours
from pipeline.config import ScreenConfig
from pipeline.decode import GRID_DIHEDRAL


def _words(bits: np.ndarray) -> np.uint64:
    return np.frombuffer(np.packbits(bits.flatten()).tobytes(), ">u8")[0]


def clustered_codes(rng, n: int, centres: np.ndarray):
    """aHash-like codes: noisy copies of a few centres, 8 dihedral variants, some trimmed ones."""
    bits = centres[rng.integers(0, len(centres), n)] ^ (rng.random((n, 8, 8)) < 0.06)
    codes = np.zeros((n, 9, 1), np.uint64)
    mask = np.zeros((n, 9), bool)
    for i in range(n):
        for v in range(8):
            codes[i, v, 0] = _words(GRID_DIHEDRAL[v](bits[i]))
        mask[i, :8] = True
        if rng.random() < 0.3:
            codes[i, 8, 0] = _words(bits[i] ^ (rng.random((8, 8)) < 0.1))
            mask[i, 8] = True
    return codes, mask


def grow(seed: int, k: int, n0: int = 300, n_new: int = 20, drop: float = 0.05):
    """Run 1 on n0 images; then drop some, insert new ones at random path positions. Returns the
    new codes/mask, the previous directed lists in new row numbers, `same`."""
    rng = np.random.default_rng(seed)
    centres = rng.random((12, 8, 8)) < 0.5
    cfg = dataclasses.replace(ScreenConfig(), max_candidates=k, max_distance=10)
    codes0, mask0 = clustered_codes(rng, n0, centres)
    prev = directed_neighbours(codes0, mask0, cfg)
    keep = rng.random(n0) > drop
    new_codes, new_mask = clustered_codes(rng, n_new, centres)
    codes, mask, previous, same = grown_collection(codes0, mask0, prev, keep, new_codes, new_mask,
                                                   rng.random(n_new) * n0)
    return cfg, codes, mask, previous, same


@pytest.mark.parametrize("hash_name", ["ahash", "phash"])  # aHash: rotations by permutation; else indexed
@pytest.mark.parametrize("seed", range(8))
def test_incremental_lists_equal_from_scratch(seed, hash_name):
    cfg, codes, mask, previous, same = grow(seed, k=2 + seed % 4)
    cfg = dataclasses.replace(cfg, hash=hash_name)
    got, stats = incremental_neighbours(codes, mask, cfg, previous, same)
    want = directed_neighbours(codes, mask, cfg)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert stats["added"] == 20 and stats["lists_reused"] > 0  # some lists really were reused
    pairs = candidates.pairs_from_neighbours(got, codes, mask, cfg)
    pd.testing.assert_frame_equal(pairs, candidates.near_pairs(codes, mask, cfg))


def test_a_new_neighbour_can_push_an_old_pair_out_of_the_top_k(monkeypatch):
    # without re-deriving the lists of old images that gained a neighbour, the result differs
    cfg, codes, mask, previous, same = grow(3, k=2)
    monkeypatch.setattr(candidates, "gained_neighbours", lambda *a, **k: np.zeros(len(codes), bool))
    got, _ = incremental_neighbours(codes, mask, cfg, previous, same)
    assert not got.reset_index(drop=True).equals(directed_neighbours(codes, mask, cfg))


@pytest.mark.parametrize("seed", range(4))
def test_the_ahash_shortcut_finds_every_image_within_reach(seed):
    cfg, codes, mask, previous, same = grow(seed, k=3)
    exact = candidates.reach_pairs(codes, mask, cfg, ~same, same)
    within = np.zeros(len(codes), bool)
    within[exact["owner"].to_numpy()] = True
    fast = candidates.gained_neighbours(codes, mask, cfg, ~same, same)  # cfg.hash == "ahash"
    assert within.any() and not (within & ~fast).any()  # a superset: nothing missed
    assert fast.sum() <= 2 * within.sum()  # and not much more
    # the query's version: the same (owner, added, distance) rows as the exhaustive search
    got = candidates.reach_of(codes, mask, cfg, ~same, same)
    key = ["owner", "added"]
    pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                  exact.sort_values(key).reset_index(drop=True))


def test_nothing_changed_searches_nothing():
    cfg, codes, mask, previous, same = grow(5, k=3, n_new=0, drop=0.0)
    got, stats = incremental_neighbours(codes, mask, cfg, previous, same)
    assert stats["added"] == 0 and stats["lists_reused"] == int(mask[:, 0].sum())
    pd.testing.assert_frame_equal(got.reset_index(drop=True), directed_neighbours(codes, mask, cfg))


@pytest.mark.parametrize("hash_name", ["ahash", "phash"])
@pytest.mark.parametrize("seed,rows,shard_size", [(0, 37, 1), (1, 100, 120), (2, 64, 10**9), (6, 400, 150)])
def test_incremental_over_partitions_and_shards_equals_one_index(seed, rows, shard_size, hash_name, monkeypatch):
    """The partitioned re-derivation (no process holds every hash): the same lists and counts as
    `incremental_neighbours` in one process, whatever the partitions and shards."""
    cfg, codes, mask, previous, same = grow(seed, k=2 + seed % 4, n0=600, n_new=40)
    cfg = dataclasses.replace(cfg, hash=hash_name)
    rep = np.random.default_rng(seed).random(len(codes)) < 0.97
    want, want_stats = incremental_neighbours(codes, mask, cfg, previous, same, representatives=rep)
    p_codes, use, idx_use = candidates._prepare(codes, mask, cfg, rep)
    parts = candidates.hash_partitions(p_codes, use, idx_use, rows)
    assert len(parts) > 1
    got, stats = candidates.sharded_incremental_neighbours(
        parts, candidates.split_previous(previous, parts, same & use[:, 0]), [same[p[0]] for p in parts], cfg,
        shard_size=shard_size)
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True))
    assert stats == want_stats
    assert stats["lists_reused"] > 0 and stats["rederived_gained_neighbour"] > 0 and stats["added"] > 0
    pd.testing.assert_frame_equal(got, directed_neighbours(codes, mask, cfg, representatives=rep))
    # the config switch: "sharded" takes this path in-process too
    calls, original = [], candidates.sharded_incremental_neighbours
    monkeypatch.setattr(candidates, "sharded_incremental_neighbours", lambda *a, **k: calls.append(1) or original(*a, **k))
    switched, switched_stats = incremental_neighbours(
        codes, mask, dataclasses.replace(cfg, search_sharding="sharded", search_shard_size=shard_size),
        previous, same, representatives=rep)
    pd.testing.assert_frame_equal(switched, got)
    assert switched_stats == want_stats and calls == [1]


def test_no_partition_task_gets_a_flag_per_image_of_the_collection(monkeypatch):
    """Each task's flags cover its own partition (or its rows of the last lists), never every
    image: at 1B images such an array is 1 GB on each worker."""
    cfg, codes, mask, previous, same = grow(1, k=3, n0=600, n_new=40)
    p_codes, use, idx_use = candidates._prepare(codes, mask, cfg, None)
    parts = candidates.hash_partitions(p_codes, use, idx_use, 37)
    longest, original = [0], candidates._run

    def spy(client, fn, *args):
        for x in args:
            for y in (x if isinstance(x, tuple) else (x,)):
                if isinstance(y, np.ndarray) and y.dtype == bool:
                    longest[0] = max(longest[0], len(y))
        return original(client, fn, *args)

    monkeypatch.setattr(candidates, "_run", spy)
    candidates.sharded_incremental_neighbours(parts, candidates.split_previous(previous, parts, same & use[:, 0]),
                                              [same[p[0]] for p in parts], cfg)
    assert 0 < longest[0] <= 37


def test_a_partition_finds_its_gained_images_by_a_binary_search_in_the_collections():
    """The images within reach of an added one come as ascending numbers over the whole
    collection; each partition marks its own by a binary search (np.isin hashed all of them for
    every partition: ~1.5 s a partition at 1M gained). Same marks as np.isin, only where the
    image is unchanged."""
    rng = np.random.default_rng(0)
    img = np.sort(rng.choice(50_000, 2_000, replace=False)).astype(np.int64)
    part = (img, None, None, None)
    same = rng.random(img.size) < 0.9
    changes = (same, ~same)
    previous = pd.DataFrame({"owner_a": np.zeros(0, np.int64), "owner_b": np.zeros(0, np.int64),
                             "nb_same": np.zeros(0, bool)})
    for gained_ids in (np.zeros(0, np.int64), np.unique(rng.integers(0, 50_000, 5_000)), img[::3], np.array([img[-1] + 1])):
        got = candidates._part_redo(part, changes, previous, gained_ids)
        np.testing.assert_array_equal(got["gained"], np.isin(img, gained_ids) & same)
        np.testing.assert_array_equal(got["redo"], ~same | got["gained"])


def test_split_previous_gives_each_row_to_the_partition_of_its_owner():
    parts = [(np.array([0, 2, 3]),), (np.zeros(0, np.int64),), (np.array([5, 9]),)]
    prev = pd.DataFrame({"owner_a": [9, -1, 2, 5, 0, 4, 3, 2], "owner_b": [1, 2, 3, 4, 5, 6, 7, 8],
                         "hash_distance": np.arange(8, dtype=np.int16)})
    same = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 1], bool)  # (3 and 7 changed)
    got = candidates.split_previous(prev, parts, same)
    assert [g["owner_a"].tolist() for g in got] == [[0, 2, 2, 3], [], [5, 9]]  # (4 and -1: no partition)
    assert got[0]["owner_b"].tolist() == [5, 3, 8, 7]  # (the order within an owner kept)
    # each row says whether its neighbour is unchanged: -1 (gone) and numbers past the end are not
    assert [g["nb_same"].tolist() for g in got] == [[True, False, True, False], [], [True, True]]
    gone = pd.DataFrame({"owner_a": [0, 0, 2], "owner_b": [-1, 12, 1], "hash_distance": np.zeros(3, np.int16)})
    assert candidates.split_previous(gone, parts, same)[0]["nb_same"].tolist() == [False, False, True]


@pytest.mark.slow
def test_incremental_on_a_local_cluster_equals_from_scratch(monkeypatch):
    """A catalog re-run on a cluster: the re-derivation runs on the workers over hash partitions,
    sharded or routed past search_shard_size and with one index below it; the same lists as from
    scratch."""
    distributed = pytest.importorskip("distributed")
    cfg, codes, mask, previous, same = grow(4, k=3, n0=1500, n_new=60)
    want = directed_neighbours(codes, mask, cfg)
    _, want_stats = incremental_neighbours(codes, mask, cfg, previous, same)
    calls, original = [], candidates.sharded_incremental_neighbours
    monkeypatch.setattr(candidates, "sharded_incremental_neighbours",
                        lambda *a, **k: calls.append(k["one_shard"]) or original(*a, **k))
    monkeypatch.setattr(candidates, "_partition_rows", lambda n, client, rows=None: 250)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        sharded = dataclasses.replace(cfg, search_sharding="sharded", search_shard_size=400)
        got, stats = incremental_neighbours(codes, mask, sharded, previous, same, client=client)
        one, one_stats = incremental_neighbours(codes, mask, cfg, previous, same, client=client)
        routed, routed_stats = incremental_neighbours(
            codes, mask, dataclasses.replace(cfg, search_shard_size=400), previous, same, client=client)  # (auto)
        # another hash: the images within reach of an added one found per group of partitions
        other = dataclasses.replace(sharded, hash="phash", search_shard_size=5000)  # (~2 partitions a group)
        other_got, other_stats = incremental_neighbours(codes, mask, other, previous, same, client=client)
    assert calls == [False, True, False, False]
    for lists, counts in ((got, stats), (one, one_stats), (routed, routed_stats)):
        pd.testing.assert_frame_equal(lists, want.reset_index(drop=True))
        assert counts == want_stats
    other_want, other_want_stats = incremental_neighbours(codes, mask, dataclasses.replace(cfg, hash="phash"),
                                                          previous, same)
    pd.testing.assert_frame_equal(other_got, other_want.reset_index(drop=True))
    assert other_stats == other_want_stats and other_stats["rederived_gained_neighbour"] > 0
