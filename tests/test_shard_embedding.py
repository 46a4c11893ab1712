"""Sharded embedding kNN (high-recall mode): the same pairs as one FAISS index, in-process and on a
real 2-worker LocalCluster, on generated unit vectors with planted near-duplicates and dense
clusters (the k cap bites), stored as feature-store partitions like a run's screen embeddings."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import candidates, store
from pipeline.config import ScreenConfig

COS_TOL = 1e-5  # float32 inner products of 64-d unit vectors from differently sized FAISS indexes


def cfg(**kw) -> ScreenConfig:
    base = dict(mode="hash+embedding", embedding_k=5, embedding_min_cosine=0.5, embedding_index="flat")
    return dataclasses.replace(ScreenConfig(), **{**base, **kw})


def planted_store(directory: Path, n: int = 3000, d: int = 64, part: int = 250, seed: int = 0):
    """n vectors in feature-store partitions of `part` images (key = idx * 8; a few failed images
    with no embedding and a few transformed keys, which the kNN skips). Even idx 2j < n/2: a random
    unit vector, 2j + 1 its near copy (cosine ~0.999); the rest: 40 clusters (cosines ~0.6-0.85, each
    image has more than k neighbours above the floor, spread enough that no two of an image's
    nearest share a float32 cosine: see test_exact_ties). Returns (part paths, planted pairs)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    half = n // 2
    vecs[1:half:2] = vecs[0:half:2] + 0.05 * rng.standard_normal((half // 2, d)).astype(np.float32) * np.sqrt(d) / 8
    centres = rng.standard_normal((40, d)).astype(np.float32)
    vecs[half:] = centres[rng.integers(0, 40, n - half)] + 0.6 * rng.standard_normal((n - half, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    failed = rng.random(n) < 0.01
    paths = []
    for p, s in enumerate(range(0, n, part)):
        idx = np.arange(s, min(n, s + part))
        keys = list(idx * 8) + [int(i) * 8 + 3 for i in idx[:2]]  # transformed keys: not screen embeddings
        blobs = [None if failed[i] else vecs[i].astype("<f4").tobytes() for i in idx]
        blobs += [vecs[i].astype("<f4").tobytes() for i in idx[:2]]
        frame = pd.DataFrame({"key": np.array(keys, np.int64), "embedding": blobs})
        paths.append(store.write_partition(directory, p, frame.sort_values("key")))
    planted = {(i, i + 1) for i in range(0, half, 2) if not failed[i] and not failed[i + 1]}
    return paths, planted


def _as_set(frame: pd.DataFrame) -> set:
    return set(zip(frame["idx_a"].tolist(), frame["idx_b"].tolist()))


def assert_same_pairs(want: pd.DataFrame, got: pd.DataFrame, tol: float = COS_TOL) -> None:
    assert list(got.columns) == ["idx_a", "idx_b", "cosine"]
    assert got.dtypes.tolist() == want.dtypes.tolist()
    pd.testing.assert_frame_equal(want[["idx_a", "idx_b"]], got[["idx_a", "idx_b"]])
    np.testing.assert_allclose(got["cosine"].to_numpy(), want["cosine"].to_numpy(), rtol=0, atol=tol)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("emb-store"))


@pytest.mark.parametrize("shard_size", [1, 700, 1300, 10**9])
def test_sharded_flat_equals_one_index(planted, shard_size):
    paths, truth = planted
    c = cfg()
    want = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="single"))
    got = candidates.sharded_embedding_pairs(paths, c, shard_size=shard_size)
    assert_same_pairs(want, got)
    assert truth <= _as_set(want)  # every planted pair, and the clusters' capped lists
    per_image = pd.concat([want["idx_a"], want["idx_b"]]).value_counts()
    assert len(want) > 3000 and per_image.max() > c.embedding_k  # the cap is per query, pairs are unions


def test_sharded_ivf_finds_the_exact_neighbours_when_visiting_every_list(planted):
    paths, truth = planted
    c = cfg()
    want = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="single"))
    ivf = dataclasses.replace(c, embedding_index="ivf", embedding_nprobe=10_000)
    got = candidates.sharded_embedding_pairs(paths, ivf, shard_size=1000)
    assert truth <= _as_set(got)
    # float16 vectors: near-equal cosines at the k-th place may swap; nearly all pairs agree
    agree = len(_as_set(got) & _as_set(want)) / len(want)
    assert agree > 0.99, agree
    both = want.merge(got, on=["idx_a", "idx_b"], suffixes=("_flat", "_ivf"))
    np.testing.assert_allclose(both["cosine_ivf"], both["cosine_flat"], rtol=0, atol=2e-3)
    # default nprobe (32 of the shared quantizer's 77 lists): planted pairs
    assert truth <= _as_set(candidates.sharded_embedding_pairs(
        paths, dataclasses.replace(c, embedding_index="ivf"), shard_size=1000))


@pytest.mark.parametrize("shard_size", [700, 1300])
def test_sharded_ivf_equals_one_ivf_index(planted, shard_size):
    """IVF shards share one coarse quantizer, trained on the sample one index takes: each query
    visits the same lists as in one index, so the pairs are one IVF index's (float16 lists: the
    cosines are the same numbers)."""
    paths, truth = planted
    c = cfg(embedding_index="ivf", embedding_nprobe=1)  # 1 of 77 lists: far from exhaustive
    want = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="single"))
    got = candidates.sharded_embedding_pairs(paths, c, shard_size=shard_size)
    assert_same_pairs(want, got, tol=1e-6)
    exact = candidates.embedding_pairs(paths, cfg(search_sharding="single"))
    assert _as_set(exact) - _as_set(want)  # nprobe 1 does miss neighbours: which lists are visited matters


def test_settings_pick_the_path(planted, monkeypatch):
    paths, _ = planted
    calls = []
    original = candidates.sharded_embedding_pairs

    def spy(*a, **kw):
        calls.append(kw.get("counts"))
        return original(*a, **kw)
    monkeypatch.setattr(candidates, "sharded_embedding_pairs", spy)
    c = cfg(embedding_shard_size=600)
    single = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="single"))
    auto = candidates.embedding_pairs(paths, c)  # auto without a client: one index
    assert calls == []
    forced = candidates.embedding_pairs(paths + paths[:1], dataclasses.replace(c, search_sharding="sharded"))
    assert len(calls) == 1 and len(calls[0]) == len(paths)  # a file listed twice is read once
    assert_same_pairs(single, auto, tol=0)
    assert_same_pairs(single, forced)


def test_no_embeddings_or_one_image(tmp_path):
    c = cfg(search_sharding="sharded", embedding_shard_size=1)
    empty = store.write_partition(tmp_path, 0, pd.DataFrame({"key": np.int64([0, 8]), "embedding": [None, None]}))
    got = candidates.embedding_pairs([empty], c)
    assert got.empty and got.dtypes.tolist() == [np.int64, np.int64, np.float32]
    one = store.write_partition(tmp_path, 1, pd.DataFrame({"key": np.int64([16]),
                                                           "embedding": [np.ones(4, "<f4").tobytes()]}))
    assert candidates.embedding_pairs([empty, one], c).empty


def test_exact_ties_at_the_cut(tmp_path):
    """12 identical vectors (same pixels, different files) and k = 5: every query ties with 11
    others at the cut. Which 5 it keeps is FAISS's choice within a shard (it depends on FAISS's
    blocking, so one index may keep others: the only place where the two paths can differ) and the
    lowest shard across shards; either way each image keeps exactly 5 others, itself dropped."""
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((60, 16)).astype(np.float32)
    vecs[:12] = vecs[0]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = [store.write_partition(tmp_path, p, pd.DataFrame({"key": np.arange(s, s + 20, dtype=np.int64) * 8,
                                                             "embedding": [v.tobytes() for v in vecs[s:s + 20]]}))
             for p, s in enumerate(range(0, 60, 20))]
    c = cfg(embedding_k=5, embedding_min_cosine=0.9)
    for size in (1, 20, 100):
        got = candidates.sharded_embedding_pairs(paths, c, shard_size=size)
        assert (got["idx_b"] < 12).all() and (got["idx_a"] < got["idx_b"]).all()
        partners = pd.concat([got["idx_a"], got["idx_b"]]).value_counts()
        assert len(partners) == 12 and partners.min() >= 5 and 30 <= len(got) <= 60
        np.testing.assert_allclose(got["cosine"], 1.0, atol=1e-6)


@pytest.mark.slow
def test_sharded_on_a_local_cluster_equals_one_index(planted, monkeypatch):
    """On a real cluster the shards are built and searched on the workers: the driver never reads
    an embedding (iter_embeddings is made to fail in this process only), same pairs as one index."""
    distributed = pytest.importorskip("distributed")
    paths, truth = planted
    c = cfg()
    want = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="single"))
    # 3,024 stored rows in shards of 760: 4 shards here and on 2 workers (a multiple of them)
    want_ivf = candidates.sharded_embedding_pairs(paths, dataclasses.replace(c, embedding_index="ivf"), shard_size=760)

    def driver_read(*a, **kw):
        raise AssertionError("the driver read embeddings")
    monkeypatch.setattr(candidates, "iter_embeddings", driver_read)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        # the client's cached scheduler info as distributed's periodic refresh can leave it (no
        # per-worker details): the shards are still placed on the workers
        monkeypatch.setattr(client, "scheduler_info", lambda *a, **k: {"workers": {}})
        forced = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="sharded",
                                                                        embedding_shard_size=700), client=client)
        auto = candidates.embedding_pairs(paths, dataclasses.replace(c, embedding_shard_size=1000), client=client)
        ivf = candidates.embedding_pairs(paths, dataclasses.replace(c, embedding_index="ivf", search_sharding="sharded",
                                                                    embedding_shard_size=760), client=client)
        with pytest.raises(AssertionError, match="driver read"):  # auto below the shard size: one index here
            candidates.embedding_pairs(paths, c, client=client)
    assert_same_pairs(want, forced)
    assert_same_pairs(want, auto)
    assert_same_pairs(want_ivf, ivf, tol=0)  # the same IVF shards in-process and on the workers
    assert truth <= _as_set(forced)


def test_on_a_cluster_each_partition_is_read_once_for_every_shard(planted, monkeypatch):
    """The workers read a partition's file once and search every shard with those vectors (and
    its IVF lists, assigned once): a read per shard was S reads of every embedding. A few
    partitions at a time; the same pairs as one index (flat) and as the in-process shards (IVF).
    (Threads in this process, so that the reads can be counted.)"""
    distributed = pytest.importorskip("distributed")
    paths, truth = planted
    c = cfg()
    want = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="single"))
    ivf = dataclasses.replace(c, embedding_index="ivf", search_sharding="sharded", embedding_shard_size=760)
    want_ivf = candidates.sharded_embedding_pairs(paths, ivf)
    reads, real = [], candidates.iter_embeddings
    monkeypatch.setattr(candidates, "iter_embeddings", lambda parts: reads.append(tuple(parts)) or real(parts))
    in_flight, submit = [], candidates._search_partitions
    monkeypatch.setattr(candidates, "_search_partitions",
                        lambda *a, **k: in_flight.append(k["window"]) or submit(*a, **k))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        got = candidates.embedding_pairs(paths, dataclasses.replace(c, search_sharding="sharded",
                                                                     embedding_shard_size=700), client=client)
        n_parts = len(candidates._embedding_parts(paths))
        shard_reads = [r for r in reads if len(r) == 1]  # (a shard's build reads its group's files together)
        assert sorted(shard_reads) == sorted((p,) for p in candidates._embedding_parts(paths))
        reads.clear()
        got_ivf = candidates.embedding_pairs(paths, ivf, client=client)
        # each partition read twice: its IVF sample (before training) and its vectors for the search
        assert sorted(r for r in reads if len(r) == 1) == sorted(2 * [(p,) for p in candidates._embedding_parts(paths)])
    assert n_parts > 4 and in_flight == [4, 4]
    assert_same_pairs(want, got)
    assert_same_pairs(want_ivf, got_ivf, tol=0)
    assert truth <= _as_set(got)


@pytest.mark.slow
def test_whole_high_recall_cascade_same_pairs_with_tiny_shards(review_data, review_run, tmp_path):
    """The real review set in high-recall mode (real MobileNet embeddings) on a local cluster, the
    embeddings in partitions of 4 images and the kNN sharded into shards of 8 (the hash search
    too, shards of 4): the same images and pairs as the one-index run (sync, `review_run`)."""
    import os
    import subprocess
    import sys
    import pyarrow.parquet as pq
    repo = Path(__file__).resolve().parent.parent
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "pipeline", "dedupe", str(review_data), "--out", str(out),
                             "--scheduler", "local", "--no-catalog", "--quiet", "--set", "screen.mode=hash+embedding",
                             "--set", "screen.embedding_min_cosine=0.3", "--set", "screen.search_sharding=sharded",
                             "--set", "screen.search_shard_size=4", "--set", "screen.embedding_shard_size=8",
                             "--set", "dask.partition_size=4", "--set", f"work_dir={work}"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)),
                            cwd=repo, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, keys in (("images.parquet", ["path"]), ("pairs.parquet", ["path_a", "path_b"])):
        want = pd.read_parquet(review_run / name).sort_values(keys).reset_index(drop=True)
        got = pd.read_parquet(out / name).sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(want.drop(columns=["abs_path_a", "abs_path_b", "mtime"], errors="ignore"),
                                      got.drop(columns=["abs_path_a", "abs_path_b", "mtime"], errors="ignore"),
                                      check_exact=False, atol=1e-5, rtol=0)
    assert (got["hash_distance"] > ScreenConfig().max_distance).any() and len(got) > 10  # embedding-only pairs too
    from pipeline.run import SCREEN_EMBED_SUBDIR
    [own] = work.glob("run-*")  # (the run's own folder in work_dir)
    parts = sorted((own / "embed" / SCREEN_EMBED_SUBDIR).glob("part-*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    assert len(parts) >= 4 and rows > 16  # so the kNN ran over several shards of 8


@pytest.mark.parametrize("binary", ["binary", "large_binary"])
def test_embeddings_are_read_as_stored_and_misshapen_ones_refused(tmp_path, binary):
    """`iter_embeddings` gives a part's transform-0 rows with an embedding, their float32 values
    exactly as stored, in row order, from binary or large binary columns in several chunks; blobs
    of different sizes, or not whole float32 values, are an error naming the part (they were
    joined into one misshapen array)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    keys = np.arange(40, dtype=np.int64) * 8 + rng.choice([0, 0, 4], 40)
    vecs = rng.standard_normal((40, 16)).astype("<f4")
    blobs = [None if i % 7 == 3 else vecs[i].tobytes() for i in range(40)]
    path = tmp_path / "part-000000.parquet"
    table = pa.table({"key": keys, "embedding": pa.array(blobs, getattr(pa, binary)())})
    pq.write_table(table.slice(0, 40), path, row_group_size=16)  # (several chunks)
    (idx, got), = candidates.iter_embeddings([str(path)])
    want = [i for i in range(40) if blobs[i] is not None and keys[i] % 8 == 0]
    np.testing.assert_array_equal(idx, keys[want] // 8)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, vecs[want])
    blobs[want[0]] = vecs[want[0]][:8].tobytes()  # (a kept row half as long)
    pq.write_table(pa.table({"key": keys, "embedding": pa.array(blobs, getattr(pa, binary)())}), path)
    with pytest.raises(ValueError, match="part-000000.parquet: embeddings of different sizes"):
        list(candidates.iter_embeddings([str(path)]))
    odd = [None if b is None else b[:6] for b in blobs]
    pq.write_table(pa.table({"key": keys, "embedding": pa.array(odd, getattr(pa, binary)())}), path)
    with pytest.raises(ValueError, match="embeddings of 6 bytes, not a whole number of float32"):
        list(candidates.iter_embeddings([str(path)]))
