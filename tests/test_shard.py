"""Sharded and routed candidate search: the same K-nearest lists and pairs as one index, in-process
and on a real 2-worker LocalCluster, on random and clustered hashes with planted near pairs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from pipeline.candidates import (_prefix_counts, _prepare, _slice_pieces, directed_neighbours, hash_partitions,
                                 near_pairs, shard_groups, sharded_neighbours, slice_plan)
from pipeline.config import ScreenConfig


def cfg(**kw) -> ScreenConfig:
    return dataclasses.replace(ScreenConfig(), **kw)


def _noise(rng, d: int) -> np.uint64:
    out = np.uint64(0)
    for bit in rng.choice(64, size=d, replace=False):
        out |= np.uint64(1) << np.uint64(int(bit))
    return out


def planted(seed: int, n: int = 3000, clustered: bool = False):
    """9-variant codes: random (or a few dense clusters: many images within the threshold of one
    another, so the K cap bites) with near pairs planted on all variants."""
    rng = np.random.default_rng(seed)
    if clustered:
        centres = rng.integers(0, np.iinfo(np.uint64).max, size=12, dtype=np.uint64, endpoint=True)
        base = centres[rng.integers(0, 12, size=(n, 9))]
        codes = np.empty((n, 9, 1), np.uint64)
        for i in range(n):
            for v in range(9):
                codes[i, v, 0] = base[i, v] ^ _noise(rng, int(rng.integers(0, 7)))
    else:
        codes = rng.integers(0, np.iinfo(np.uint64).max, size=(n, 9, 1), dtype=np.uint64, endpoint=True)
    mask = rng.random((n, 9)) < 0.6
    mask[:, 0] = True
    for i in range(0, n - 1, 2):
        v, target = int(rng.integers(0, 9)), int(rng.choice([0, 8]))
        codes[i + 1, target] = codes[i, v] ^ _noise(rng, int(rng.integers(0, 9)))
        mask[i, v] = mask[i + 1, target] = True
    mask[rng.random(n) < 0.02] = False  # invalid images take no part
    return codes, mask


CASES = [(1, False), (2, True)]


@pytest.mark.parametrize("seed,clustered", CASES)
@pytest.mark.parametrize("shard_size,rows", [(1, 500), (700, 333), (2500, 1000), (10**9, 4000)])
@pytest.mark.parametrize("mode", ["sharded", "routed"])
def test_sharded_lists_equal_one_index(seed, clustered, shard_size, rows, mode):
    codes, mask = planted(seed, clustered=clustered)
    c = cfg(max_distance=8, max_candidates=4, dihedral_max_distance=5)
    rep = np.random.default_rng(seed).random(len(codes)) < 0.97
    want = directed_neighbours(codes, mask, c, representatives=rep)
    p_codes, use, idx_use = _prepare(codes, mask, c, rep)
    got = sharded_neighbours(hash_partitions(p_codes, use, idx_use, rows), cfg(**{**dataclasses.asdict(c),
                             "search_sharding": mode}), shard_size=shard_size)
    pd.testing.assert_frame_equal(want, got)
    assert len(want) > 1000
    if clustered:  # the cap bites: some lists are full and longer ones were cut
        assert (want.groupby("owner_a").size() == 4).mean() > 0.5


def _spy(monkeypatch) -> list:
    """Record every call of the sharded search (so a test knows the switch took that path)."""
    import pipeline.candidates as candidates
    calls, original = [], candidates.sharded_neighbours

    def spy(parts, cfg, **kw):
        calls.append(len(parts))
        return original(parts, cfg, **kw)
    monkeypatch.setattr(candidates, "sharded_neighbours", spy)
    return calls


def test_config_switch_gives_the_same_pairs(monkeypatch):
    calls = _spy(monkeypatch)
    codes, mask = planted(3)
    c = cfg(max_distance=9, max_candidates=3, dihedral_max_distance=4)
    off = near_pairs(codes, mask, dataclasses.replace(c, search_sharding="single"))
    auto = near_pairs(codes, mask, dataclasses.replace(c, search_shard_size=800))  # auto: no client, one index
    assert calls == []
    on = near_pairs(codes, mask, dataclasses.replace(c, search_sharding="sharded", search_shard_size=800))
    assert len(calls) == 1
    pd.testing.assert_frame_equal(off, on)
    pd.testing.assert_frame_equal(off, auto)
    import pipeline.candidates as candidates
    built, original = [], candidates._build_slices
    monkeypatch.setattr(candidates, "_build_slices", lambda *a: built.append(a[2]) or original(*a))
    routed = near_pairs(codes, mask, dataclasses.replace(c, search_sharding="routed", search_shard_size=800))
    assert len(calls) == 2 and len(built) == 1 and len(built[0]) > 4  # slices of one multi-index, not whole shards
    pd.testing.assert_frame_equal(off, routed)
    got = set(zip(on.idx_a.tolist(), on.idx_b.tolist()))
    assert sum((i, i + 1) in got for i in range(0, 3000, 2)) > 800  # most planted pairs (rotated ones only within 4 bits)


def test_slice_plan_puts_every_entry_in_one_slice_of_each_chunk():
    """Each chunk's value range is halved until a slice holds at most the target (or is one value
    of the counted bits); the slices of a chunk hold each entry once."""
    codes, mask = planted(4, n=4000, clustered=True)
    c = cfg()
    parts = hash_partitions(*_prepare(codes, mask, c, None), 700)
    counts = [np.sum(col, axis=0) for col in zip(*[_prefix_counts(p, 4) for p in parts])]
    total = sum(int(p[3].sum()) for p in parts)
    for target in (300, 2000, 10**9):
        plan = slice_plan(counts, target)
        for ci in range(4):
            mine = [s for s in plan if s[0] == ci]
            sizes = np.sum([[len(c) for c, _ in _slice_pieces(p, 4, mine)] for p in parts], axis=0)
            assert sum(sizes) == total
            bits = [s[2] for s in plan if s[0] == ci]
            assert all(n <= target or b == 12 for n, b in zip(sizes, bits)) and min(sizes) > 0
        assert len(plan) == 4 if target == 10**9 else len(plan) > 4
    assert slice_plan([np.zeros(16, np.int64)], 5) == []


def test_shard_groups_cover_every_non_empty_partition_once():
    entries = [5, 0, 7, 3, 0, 9, 1, 4]
    for size in (1, 4, 10, 100):
        for workers in (1, 2, 3):
            groups = shard_groups(entries, size, workers)
            flat = [i for g in groups for i in g]
            assert flat == [i for i, e in enumerate(entries) if e]  # consecutive, in order, once
            assert len(groups) >= min(workers, 6)
    assert len(shard_groups(entries, 100, 1)) == 1
    assert len(shard_groups(entries, 10, 1)) == 3
    assert shard_groups([0, 0], 10, 2) == []


def _scattered_code_rows(monkeypatch, client) -> list[int]:
    """Rows of every (N, V, W) code array the client scatters from now on (inside lists and tuples)."""
    seen: list[int] = []
    scatter = client.scatter

    def walk(item) -> None:
        if isinstance(item, (list, tuple)):
            for x in item:
                walk(x)
        elif isinstance(item, np.ndarray) and item.ndim == 3:
            seen.append(item.shape[0])

    def spy(data, *args, **kwargs):
        walk(data)
        return scatter(data, *args, **kwargs)
    monkeypatch.setattr(client, "scatter", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("seed,clustered", CASES)
def test_sharded_on_a_local_cluster_equals_one_index(seed, clustered, monkeypatch):
    distributed = pytest.importorskip("distributed")
    calls = _spy(monkeypatch)
    codes, mask = planted(seed, n=6000, clustered=clustered)
    c = cfg(max_distance=9, max_candidates=3, dihedral_max_distance=9)
    want_lists = directed_neighbours(codes, mask, c)
    want = near_pairs(codes, mask, c)
    on = dataclasses.replace(c, search_sharding="sharded", search_shard_size=1500)
    routed = dataclasses.replace(c, search_sharding="routed", search_shard_size=1500)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        # the cached scheduler info as distributed's periodic refresh can leave it (no workers listed)
        monkeypatch.setattr(client, "scheduler_info", lambda *a, **k: {"workers": {}})
        lists = directed_neighbours(codes, mask, on, client=client, block_rows=700)
        got = near_pairs(codes, mask, on, client=client)
        routed_lists = directed_neighbours(codes, mask, routed, client=client, block_rows=700)
        auto_routed = near_pairs(codes, mask, dataclasses.replace(routed, search_sharding="auto"), client=client)
        auto = near_pairs(codes, mask, dataclasses.replace(c, search_sharding="auto", search_shard_size=1000),
                          client=client)
        # below search_shard_size: one index, a copy on each worker; each pair's best distance over
        # the variants on the workers too, in several tasks
        import pipeline.candidates as candidates
        monkeypatch.setattr(candidates, "PAIRS_PER_TASK", 500)
        one = directed_neighbours(codes, mask, c, client=client)
        code_rows = _scattered_code_rows(monkeypatch, client)
        best = candidates.pairs_from_neighbours(one, codes, mask, c, client=client)
    # every search on the cluster took the sharded path, the tie bridges' too (one a near_pairs
    # call, where more than K images share a plain hash: candidates.tie_bridges)
    assert len(calls) == 6 + 3 * (candidates.tied_groups(codes, mask, c)[0].size > 0)
    pd.testing.assert_frame_equal(want_lists, routed_lists)
    pd.testing.assert_frame_equal(want, auto_routed)
    pd.testing.assert_frame_equal(want_lists, one)
    pd.testing.assert_frame_equal(candidates.pairs_from_neighbours(want_lists, codes, mask, c), best)
    assert len(best) > 2 * 500
    # each task got the codes of its own pairs' rows (at most two a pair), never all 6000 images'
    assert len(code_rows) >= 3 and max(code_rows) <= 2 * 500
    pd.testing.assert_frame_equal(want_lists, lists)
    pd.testing.assert_frame_equal(want, got)
    pd.testing.assert_frame_equal(want, auto)
    assert len(want) > 1500


@pytest.mark.slow
@pytest.mark.parametrize("seed,clustered", CASES)
def test_pairs_made_on_the_workers_equal_the_drivers(seed, clustered, monkeypatch):
    """With the search on the workers, the lists stay there and the pairs are made there too
    (`candidates.Lists`): rows routed with their owner's codes to the partitions of their
    neighbour, the pairs made there routed again to the block of their idx_a and sorted there.
    The same pairs, distances and transforms, in the same (idx_a, idx_b) order, as made in-process
    from the gathered lists, for fresh and incremental searches over many partitions (one and
    several blocks of partitions, all at once or in waves), and the driver neither gathers a list
    nor cuts a code chunk."""
    distributed = pytest.importorskip("distributed")
    import pipeline.candidates as candidates
    codes, mask = planted(seed, n=6000, clustered=clustered)
    rep = np.random.default_rng(seed).random(len(codes)) < 0.97
    same = np.random.default_rng(seed + 10).random(len(codes)) < 0.8  # ~20 % of the images added or changed
    c = cfg(max_distance=9, max_candidates=3, dihedral_max_distance=6)
    want = near_pairs(codes, mask, c, representatives=rep)
    previous = directed_neighbours(codes, mask, c, representatives=rep)
    want_lists, want_counts = candidates.incremental_neighbours(codes, mask, c, previous, same, representatives=rep)
    want_incremental = candidates.pairs_from_neighbours(want_lists, codes, mask, c, rep)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        gathered = []
        monkeypatch.setattr(candidates.Lists, "gather", lambda self: gathered.append(1))
        real_best, bridged = candidates.pair_best, candidates.tied_groups(codes, mask, c, rep)[0].size

        def best(codes, use, idx_use, a, b, client=None):  # (the tie bridges' pairs only: K a group at most)
            if a.size > c.max_candidates * bridged:
                pytest.fail("the driver cut code chunks")
            return real_best(codes, use, idx_use, a, b, client=client)
        monkeypatch.setattr(candidates, "pair_best", best)
        monkeypatch.setattr(candidates, "_partition_rows", lambda n, client, rows=None: rows or 450)  # 13 partitions
        waves, submit = [], client.submit

        ordered = []  # the tasks that sort a block's pairs, routed to it by idx_a

        def spy(fn, *args, **kwargs):  # the blocks each routing task makes: (first, past the last)
            if fn is candidates._route_rows:
                waves.append(args[3:5])
            if fn is candidates._ordered_block:
                ordered.append(len(args))
            return submit(fn, *args, **kwargs)
        monkeypatch.setattr(client, "submit", spy)
        got = {}
        # a block per partition, several partitions a block, and blocks of several partitions made
        # in waves of two blocks (a wave a third of the rows)
        for blocks, wave_rows, modes in ((64, 10**9, ("auto", "routed")), (4, 10**9, ("auto",)),
                                         (6, len(previous) // 3 + 1, ("auto",))):
            monkeypatch.setattr(candidates, "MAX_PAIR_BLOCKS", blocks)
            monkeypatch.setattr(candidates, "PAIR_WAVE_ROWS", wave_rows)
            for mode in modes:
                waves.clear()
                ordered.clear()
                on = dataclasses.replace(c, search_sharding=mode, search_shard_size=2000)
                got[blocks, wave_rows, mode] = near_pairs(codes, mask, on, client=client, representatives=rep)
                lists, counts = candidates.incremental_neighbours(codes, mask, on, previous, same, client=client,
                                                                  representatives=rep, gather=False)
                assert isinstance(lists, candidates.Lists) and len(lists.parts) == 13
                assert counts == want_counts
                got[blocks, wave_rows, mode, "incremental"] = candidates.pairs_from_neighbours(lists, codes, mask, c, rep)
                # every block once, in one wave or, past PAIR_WAVE_ROWS rows, several; each routing
                # task of a wave, one per partition
                ranges = sorted(set(waves))
                assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]]
                assert ranges[-1][1] == min(blocks, 13) and len(waves) == 2 * 13 * len(ranges)
                assert len(ranges) == (1 if wave_rows == 10**9 else 3) and max(h - lo for lo, h in ranges) >= 2
                # then each block's pairs routed to the block of their idx_a, one sorting task a
                # block taking a piece from every block (the driver only concatenates them)
                assert ordered == [min(blocks, 13)] * (2 * min(blocks, 13))
        assert not gathered
        monkeypatch.undo()
        pd.testing.assert_frame_equal(lists.gather(), want_lists)  # (the lists, when a catalog keeps them)
    for key, pairs in got.items():
        pd.testing.assert_frame_equal(pairs, want_incremental if "incremental" in key else want, obj=str(key))
    assert len(want) > 2000 and (want["transform"] != 0).any()


@pytest.mark.slow
def test_whole_cascade_same_pairs_with_sharding_forced_on(review_data, review_run, tmp_path):
    """The real review set through every tier on a local cluster with the search sharded into
    shards of 4 images: the same images and pairs as the one-index run (sync, `review_run`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(review_data), "--out", str(out),
                             "--scheduler", "local", "--no-catalog", "--quiet", "--set", "screen.mode=hash+embedding",
                             "--set", "screen.embedding_min_cosine=0.3", "--set", "screen.search_sharding=sharded",
                             "--set", "screen.search_shard_size=4"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)),
                            cwd=repo, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, keys in (("images.parquet", ["path"]), ("pairs.parquet", ["path_a", "path_b"])):
        want = pd.read_parquet(review_run / name).sort_values(keys).reset_index(drop=True)
        got = pd.read_parquet(out / name).sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(want.drop(columns=["abs_path_a", "abs_path_b"], errors="ignore"),
                                      got.drop(columns=["abs_path_a", "abs_path_b"], errors="ignore"))
    assert len(want) > 10


@pytest.mark.parametrize("far", [False, True])
def test_a_pair_best_chunk_with_its_own_rows_gives_what_all_rows_give(far):
    """A chunk's rows, its codes and its pairs renumbered on the worker (by a table over the rows'
    span when it is short, else by search): the same distances and transforms as over every row,
    for pairs in any order, repeated, and partners near or far apart."""
    from pipeline import candidates
    rng = np.random.default_rng(7)
    n, m = 20_000, 300 if far else 4000
    codes, mask = planted(3, n=n, clustered=True)
    codes, use, idx_use = _prepare(codes, mask, cfg(), None)
    a = rng.integers(0, n - 1, m)
    b = rng.integers(0, n, m) if far else np.minimum(a + 1 + rng.integers(0, 20, m), n - 1)
    a, b = np.minimum(a, b), np.maximum(a, b)
    a, b = np.concatenate([a, a[:50]]), np.concatenate([b, b[:50]])  # (repeated pairs, `a` not ascending)
    chunk = candidates._chunk_rows(codes, use, idx_use, a, b)
    rows = chunk[3]
    assert (rows[-1] - rows[0] >= 16 * rows.size) == far  # (each way of renumbering is taken)
    got = candidates._best_of_rows(*chunk)
    want = candidates._best_over_variants(codes, use, idx_use, a, b)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_a_routed_row_whose_image_is_not_in_its_partitions_stops_the_search():
    """The pairs made on the workers look each listed image up among its partitions' image
    numbers: one that is not there is an error, never the codes of the next image read in
    silence."""
    from pipeline import candidates
    img = np.array([2, 5, 9], dtype=np.int64)
    np.testing.assert_array_equal(candidates._rows_in(img, np.array([9, 2, 5]), "x"), [2, 0, 1])
    with pytest.raises(RuntimeError, match=r"a listed neighbour \(6\) is not among its partitions' images"):
        candidates._rows_in(img, np.array([5, 6]), "a listed neighbour")
    with pytest.raises(RuntimeError, match=r"\(10\)"):
        candidates._rows_in(img, np.array([10]), "a list's owner")


def test_a_partitions_list_rows_are_looked_up_and_sorted_in_their_own_wave_only(monkeypatch):
    """Routing a partition's list rows to the blocks of one wave handles that wave's rows only
    (a partition is routed once per wave: ~8 waves at 10M images), and the waves together route
    every row where one wave over all blocks does."""
    from pipeline import candidates
    rng = np.random.default_rng(0)
    img = np.sort(rng.choice(10_000, 500, replace=False)).astype(np.int64)
    part = (img, rng.integers(0, 2**62, (img.size, 8, 1)), rng.random((img.size, 8)) < 0.5,
            rng.integers(0, 9, img.size))
    o = np.repeat(img, 6)
    rows = pd.DataFrame({"owner_a": o, "owner_b": rng.integers(0, 10_000, o.size)})
    starts = np.array([0, 1_000, 4_000, 4_500, 9_000], dtype=np.int64)
    whole = candidates._route_rows(part, rows, starts, 0, 5)
    looked_up, real = [], candidates._rows_in
    monkeypatch.setattr(candidates, "_rows_in", lambda img, ids, what: looked_up.append(ids.size) or real(img, ids, what))
    waves = [candidates._route_rows(part, rows, starts, lo, hi) for lo, hi in ((0, 2), (2, 3), (3, 5))]
    assert sum(looked_up) == len(rows) and len(looked_up) == 3
    for got, want in zip([piece for wave in waves for piece in wave], whole):
        assert got is not None and len(got) == len(want) == 5
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
