"""The candidates stage: which pairs of images go on to the verify tier.

* `exact_pairs`: byte-identical files (same sha256). Nothing further to check.
* `near_pairs`: pairs whose perceptual hashes are within `screen.max_distance` bits, found with a
  Hamming index (`pipeline.search`, multi-index hashing by default), at most
  `screen.max_candidates` nearest per image (a pair is kept when either image has the other among
  its K nearest), so hubs (blank images, logos) cannot explode the pair count.

Hash variants. `codes[i, v]` is image i's hash: v = 0 plain, v = 1..7 the hash of
`decode.dihedral(image, v)`, v = 8 the hash of the border-trimmed image. The index holds each
image's plain and trimmed hash; every present variant queries it (dihedral ones when
`screen.dihedral`, trimmed when `screen.trim_borders`). A pair's `hash_distance` is the smallest
distance over both directions (a's variants against b's index entries and b's against a's), and
`transform` is the dihedral transform t such that `decode.dihedral(image_b, t)` is aligned with
image_a: if a's variant v matched, dihedral(a, v) ~ b, so t = DIHEDRAL_INVERSE[v]; if b's variant v
matched, dihedral(b, v) ~ a, so t = v; plain and trimmed matches give 0. Among equally close
matches the first of (a plain, b plain, a trimmed, b trimmed, a's dihedral 1..7, b's dihedral
1..7) wins, so an undistorted match is preferred.

High-recall mode (`screen.mode: hash+embedding`, see the last section): `embedding_pairs` adds
each representative image's `screen.embedding_k` nearest neighbours by MobileNet cosine (FAISS,
exact or IVF), `union_pairs` merges them with the hash pairs (a pair found by both keeps its hash
row; an embedding-only pair gets `pair_hash_distance` and transform 0). Past
`screen.embedding_shard_size` embeddings on a cluster (same `screen.search_sharding` switch), the
FAISS index is sharded over the workers (`sharded_embedding_pairs`): with the exact index the
same pairs.

Parallelism: with `screen.search_sharding` "single" the index is built once in the driver,
broadcast to every Dask worker (`client.scatter(..., broadcast=True)`), and blocks of query images
run as tasks; without a client the same blocks run in-process. The result does not depend on the
blocking. On a cluster (`screen.search_sharding` "auto") the index is built on the workers instead,
a copy of one index on each, or past `screen.search_shard_size` images slices of one multi-index
spread over them (`sharded_neighbours`, sections "sharded search" and "Routed search"): same lists,
and the driver compiles no numba kernel. A catalog re-run's
re-derivation of the lists a change can affect (`incremental_neighbours`) takes the same path on a
cluster, over hash partitions (`sharded_incremental_neighbours`). There the lists stay on the
workers and the pairs are made there as well (`Lists`, section "pairs made where the lists
are"): the driver gathers the pairs, and the lists only when a catalog keeps them.
"""
from __future__ import annotations

import io
import itertools
import operator
import uuid
from typing import Iterator

import numpy as np
import pandas as pd

from . import storage
from .config import ScreenConfig
from .progress import scatter
from .decode import DIHEDRAL_INVERSE
from .search import (ChunkSlice, HammingIndex, SliceGroup, chunk_geometry, chunk_of, interleave, make_index,
                     plan_chunks)

PLAIN = 0
TRIMMED = 8
N_VARIANTS = 9

# What makes no K-nearest list a catalog keeps (`catalog._CODE["neighbours"]`): exact pairs, the
# pairs made from the lists, the embedding kNN of high-recall mode. Editing them keeps every
# catalog's lists; an edit to the rest (the search, its sharding, the re-run's re-derivation)
# makes the next re-run search everything again. A change elsewhere (run.py, catalog.py) that
# changes which lists are made bumps LISTS_REVISION.
NOT_FINGERPRINTED = ("__all__", "exact_pairs", "build_index", "near_pairs", "hash_partitions",
                     "PAIRS_PER_TASK", "PAIR_TASKS_IN_FLIGHT", "_chunk_rows", "_best_of_rows", "pair_best",
                     "pairs_from_neighbours", "reach_of", "_KNN_BATCH", "_faiss", "_open_part",
                     "_embedding_parts", "iter_embeddings", "_count_part", "_count_rows", "_ivf_nlist",
                     "_embedding_kind", "_ivf_plan", "ivf_sample", "train_ivf", "_train_ivf_shared",
                     "build_embedding_index", "_empty_embedding_pairs", "_kept_neighbours", "_pair_rows",
                     "embedding_pairs", "_build_embedding_shard", "_read_vectors", "_vectors_of",
                     "_assign_lists", "_empty_knn", "_search_embedding_shard", "_best_of",
                     "_merge_embedding_lists", "_search_partitions", "sharded_embedding_pairs",
                     "pair_hash_distance", "union_pairs", "tied_groups", "tie_bridges", "with_pairs")
LISTS_REVISION = 1

__all__ = ["exact_pairs", "exact_representatives", "near_pairs", "near_pairs_partition",
           "directed_neighbours", "pairs_from_neighbours", "Lists", "SavedLists",
           "sharded_neighbours", "sharded_directed_neighbours", "hash_partitions", "iter_hash_partitions", "shard_groups", "reach_pairs", "reach_of", "gained_neighbours", "incremental_neighbours",
           "build_index", "query_variants", "embedding_pairs", "sharded_embedding_pairs", "build_embedding_index",
           "iter_embeddings", "pair_hash_distance", "union_pairs", "tied_groups", "tie_bridges", "with_pairs"]


# --------------------------------------------------------------------------------------------
# exact duplicates


def _sha_groups(sha256: pd.Series):
    """-> (sorted row positions, group id per sorted position, group sizes) over non-null sha."""
    values = pd.Series(sha256).reset_index(drop=True)
    valid = values.notna().to_numpy().copy()
    if valid.any():
        valid &= (values.astype(str) != "").to_numpy()
    pos = np.flatnonzero(valid).astype(np.int64)
    if pos.size == 0:
        return pos, np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes, _ = pd.factorize(values.iloc[pos], sort=False)
    order = np.lexsort((pos, codes))  # by group, then row
    pos, codes = pos[order], codes[order].astype(np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1])
    sizes = np.diff(np.concatenate([starts, [pos.size]]))
    gid = np.repeat(np.arange(starts.size), sizes)
    return pos, gid, sizes


def exact_pairs(sha256: pd.Series, group_limit: int) -> pd.DataFrame:
    """Pairs of byte-identical files: DataFrame(idx_a < idx_b, int64), sorted by (idx_a, idx_b).

    Rows are images in path order (row position = idx); null/empty sha256 (errors) are ignored.
    A group of n identical files gives all n(n-1)/2 pairs when n <= group_limit + 1, otherwise a
    star from its first member (lowest idx) to each other member: the clusters are the same.
    """
    pos, gid, sizes = _sha_groups(sha256)
    empty = pd.DataFrame({"idx_a": np.zeros(0, np.int64), "idx_b": np.zeros(0, np.int64)})
    if pos.size == 0:
        return empty
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = sizes[gid]
    t = np.arange(pos.size) - starts[gid]  # position within the group
    full = n <= group_limit + 1
    cnt = np.where(full, n - 1 - t, np.where(t == 0, n - 1, 0)).astype(np.int64)
    total = int(cnt.sum())
    if total == 0:
        return empty
    src = np.repeat(np.arange(pos.size), cnt)
    within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    a = pos[src]
    b = pos[src + 1 + within]
    order = np.lexsort((b, a))
    return pd.DataFrame({"idx_a": a[order].astype(np.int64), "idx_b": b[order].astype(np.int64)})


def exact_representatives(sha256: pd.Series) -> np.ndarray:
    """bool (N,): False for every exact copy except the first (lowest idx) of its sha256 group.

    Pass it as `representatives` to `near_pairs`: copies reach their near neighbours through
    their representative (exact pairs + near pairs give the same clusters).
    """
    values = pd.Series(sha256).reset_index(drop=True)
    rep = np.ones(len(values), bool)
    pos, gid, sizes = _sha_groups(values)
    if pos.size:
        first = np.concatenate([[True], gid[1:] != gid[:-1]])
        rep[pos[~first]] = False
    return rep


# --------------------------------------------------------------------------------------------
# near duplicates


def query_variants(cfg: ScreenConfig, V: int) -> np.ndarray:
    """Variant numbers that query the index under `cfg` (subset of 0..V-1)."""
    vs = [PLAIN]
    if cfg.dihedral:
        vs += [v for v in range(1, 8) if v < V]
    if cfg.trim_borders and TRIMMED < V:
        vs.append(TRIMMED)
    return np.array(vs, dtype=np.int64)


def _index_variants(cfg: ScreenConfig, V: int) -> np.ndarray:
    vs = [PLAIN]
    if cfg.trim_borders and TRIMMED < V:
        vs.append(TRIMMED)
    return np.array(vs, dtype=np.int64)


def _prepare(codes, variant_mask, cfg: ScreenConfig, representatives):
    codes = np.asarray(codes)
    if codes.ndim == 2:
        codes = codes[:, None, :]
    if codes.ndim != 3:
        raise ValueError(f"codes must have shape (N, V, W), got {codes.shape}")
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    N, V, W = codes.shape
    if V > N_VARIANTS:
        raise ValueError(f"at most {N_VARIANTS} hash variants per image, got {V}")
    mask = np.asarray(variant_mask, dtype=bool)
    if mask.ndim == 1:
        mask = mask[:, None]
    if mask.shape != (N, V):
        raise ValueError(f"variant_mask must have shape {(N, V)}, got {mask.shape}")
    part = mask[:, PLAIN].copy()
    if representatives is not None:
        rep = np.asarray(representatives, dtype=bool)
        if rep.shape != (N,):
            raise ValueError(f"representatives must have shape ({N},), got {rep.shape}")
        part &= rep
    use = np.zeros((N, V), bool)
    qv = query_variants(cfg, V)
    use[:, qv] = mask[:, qv]
    use &= part[:, None]
    idx_use = np.zeros((N, V), bool)
    iv = _index_variants(cfg, V)
    idx_use[:, iv] = use[:, iv]
    return codes, use, idx_use


def build_index(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                representatives: np.ndarray | None = None) -> HammingIndex:
    """The Hamming index over every taking-part image's plain (and trimmed) hash."""
    codes, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    img, var = np.nonzero(idx_use)
    return make_index(codes[img, var], img.astype(np.int64), cfg.backend,
                      max_distance=cfg.max_distance)


def near_pairs_partition(index: HammingIndex, queries: np.ndarray, query_owners: np.ndarray,
                         cfg: ScreenConfig, query_variant: np.ndarray | None = None) -> pd.DataFrame:
    """One block of query images (their rows contiguous): each image's K nearest other images.

    Plain and trimmed query rows match within `screen.max_distance`; the flipped/rotated rows only
    within `screen.dihedral_max_distance` (a true mirrored or rotated copy lands at 0-2 bits, while
    seven extra queries at the full distance would mostly add false candidates). Returns directed
    rows `owner_a` (the query image), `owner_b`, `hash_distance` (int16), `query_row` (row of
    `queries` that matched) and, with `query_variant`, `variant` (that row's variant number).
    """
    k = cfg.max_candidates
    if query_variant is None:
        groups = [(np.arange(len(queries)), cfg.max_distance)]
    else:
        variant = np.asarray(query_variant)
        rotated = (variant >= 1) & (variant <= 7)
        groups = [(np.flatnonzero(~rotated), cfg.max_distance),
                  (np.flatnonzero(rotated), min(cfg.dihedral_max_distance, cfg.max_distance))]
    found = []
    for rows, limit in groups:
        if rows.size == 0:
            continue
        a, b, d, row = index.search(queries[rows], query_owners[rows], limit, k)
        found.append(pd.DataFrame({"owner_a": a.astype(np.int64), "owner_b": b.astype(np.int64),
                                   "hash_distance": d.astype(np.int16), "query_row": rows[row].astype(np.int64)}))
    if not found:
        out = pd.DataFrame({"owner_a": np.zeros(0, np.int64), "owner_b": np.zeros(0, np.int64),
                            "hash_distance": np.zeros(0, np.int16), "query_row": np.zeros(0, np.int64)})
    elif len(found) == 1:
        out = found[0]
    else:  # each image's K nearest of the union (the top K of two top-K lists is exact)
        out = (pd.concat(found, ignore_index=True)
               .sort_values(["owner_a", "hash_distance", "owner_b", "query_row"], kind="stable")
               .drop_duplicates(["owner_a", "owner_b"], keep="first"))
        out = out[out.groupby("owner_a", sort=False).cumcount() < k].reset_index(drop=True)
    if query_variant is not None:
        out["variant"] = np.asarray(query_variant, dtype=np.int8)[out["query_row"].to_numpy()]
    return out


# candidate order for choosing the transform among equally close matches: (side, variant)
_ORDER = [(0, 0), (1, 0), (0, 8), (1, 8)] + [(0, v) for v in range(1, 8)] + [(1, v) for v in range(1, 8)]


def _blocks(owners: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """Split contiguous query rows into blocks of about `block_rows` rows at owner boundaries."""
    n = owners.size
    if n == 0:
        return []
    out, start = [], 0
    while start < n:
        end = min(n, start + block_rows)
        while end < n and owners[end] == owners[end - 1]:
            end += 1
        out.append((start, end))
        start = end
    return out


def near_pairs(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig, client=None,
               representatives: np.ndarray | None = None, block_rows: int | None = None,
               index: HammingIndex | None = None) -> pd.DataFrame:
    """Near-duplicate candidate pairs by hash distance (see the module docstring).

    codes (N, V, W) uint64 (V = 1 or up to 9 variants), variant_mask (N, V) bool,
    representatives (N,) bool or None (all valid images). Returns a DataFrame `idx_a < idx_b`
    (int64), `hash_distance` (int16), `transform` (int8), one row per unordered pair, sorted by
    (idx_a, idx_b); identical with and without a Dask `client`. `block_rows` sets the query rows
    per task (default: about 8 tasks per worker thread, 20k-200k rows each).
    """
    found = directed_neighbours(codes, variant_mask, cfg, client=client, representatives=representatives,
                                block_rows=block_rows, index=index, gather=False)
    near = pairs_from_neighbours(found, codes, variant_mask, cfg, representatives)
    return with_pairs(near, tie_bridges(codes, variant_mask, cfg, representatives, client=client)[0])


# --------------------------------------------------------------------------------------------
# ties at the K-th distance: many images with one hash
#
# An image's list holds its K nearest, ties broken by image number. More than K images with one
# plain hash (video frames, burst shots, a page scanned again and again) fill each other's lists
# with distance-0 ties, whatever their other variants, so none of them lists an image a bit or two
# away: two such groups a bit apart were never paired and came out as two clusters (1,500 frames
# of one scene with three hashes: clusters of 1,321 and 179). The lists are left as they are (a
# catalog keeps them, a query reproduces them); each such group's first image also gets its K
# nearest images outside the group, searched with the group's other members left out of the index
# (`tie_bridges`). Those pairs go on to the verify tier as any candidate does.


def tied_groups(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                representatives: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Groups of more than `screen.max_candidates` taking-part images with one plain hash (each
    such image has every other one in its list at distance 0, whatever its other variants) ->
    (first: each group's first image, ascending; others: bool (N,), the groups' other members)."""
    codes, use, _ = _prepare(codes, variant_mask, cfg, representatives)
    N = codes.shape[0]
    k = int(cfg.max_candidates)
    others = np.zeros(N, bool)
    part = np.flatnonzero(use[:, PLAIN])
    if part.size <= k:
        return np.zeros(0, np.int64), others
    plain = codes[part, PLAIN, :]
    key = plain[:, 0].copy()  # (one number per hash first, cheap at any size; then exactly)
    for w in range(1, plain.shape[1]):
        key = key * np.uint64(0x9E3779B97F4A7C15) ^ plain[:, w]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    rows = part[counts[inverse.reshape(-1)] > k]
    if rows.size == 0:
        return np.zeros(0, np.int64), others
    _, inverse, counts = np.unique(codes[rows, PLAIN, :], axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    big = counts[inverse] > k
    rows, inverse = rows[big], inverse[big]  # (ascending, as `part` is)
    first_of = np.full(counts.size, N, np.int64)
    np.minimum.at(first_of, inverse, rows)
    first = np.unique(first_of[inverse])
    others[rows] = True
    others[first] = False
    return first, others


def tie_bridges(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                representatives: np.ndarray | None = None, client=None) -> tuple[pd.DataFrame, int]:
    """Each group of tied images' first image paired with its K nearest images outside the group
    (see the section comment), the pairs as `pairs_from_neighbours` makes them, and the number
    of groups. With a Dask `client` the search runs on the workers as the main search does
    (sharded past `screen.search_shard_size`; the driver compiles no numba kernel). Nothing is
    searched when there is no such group."""
    first, others = tied_groups(codes, variant_mask, cfg, representatives)
    if first.size == 0:
        return _empty_pairs(), 0
    N = np.asarray(codes).shape[0]
    index_rows = (np.ones(N, bool) if representatives is None else np.asarray(representatives, bool)) & ~others
    owners = np.zeros(N, bool)
    owners[first] = True
    found = None
    # On a cluster, `directed_neighbours`' own choice of the sharded path, made here with only the
    # first images querying: that function keys the catalog's stored lists (its code is in their
    # fingerprint), and a query mask on its sharded path would make every catalog search again
    if client is not None:
        prepared, use, idx_use = _prepare(codes, variant_mask, cfg, index_rows)
        spread = _sharded(cfg, client, int(idx_use.any(axis=1).sum()))
        if spread or cfg.search_sharding == "auto":
            found = sharded_directed_neighbours(prepared, use & owners[:, None], idx_use, cfg, client=client,
                                                one_shard=not spread)
        del prepared, use, idx_use
    if found is None:
        found = directed_neighbours(codes, variant_mask, cfg, representatives=index_rows, query_owners=owners)
    return pairs_from_neighbours(found, codes, variant_mask, cfg, representatives, client=client), int(first.size)


def with_pairs(pairs: pd.DataFrame, more: pd.DataFrame) -> pd.DataFrame:
    """Two frames of pairs (idx_a < idx_b; a pair in both has the same values in each) as one,
    sorted by (idx_a, idx_b)."""
    if more.empty:
        return pairs
    out = pd.concat([pairs, more[list(pairs.columns)]], ignore_index=True)
    out = out.drop_duplicates(["idx_a", "idx_b"]).sort_values(["idx_a", "idx_b"], kind="stable")
    return out.reset_index(drop=True).astype(pairs.dtypes.to_dict())


def _empty_directed() -> pd.DataFrame:
    return pd.DataFrame({"owner_a": np.zeros(0, np.int64), "owner_b": np.zeros(0, np.int64),
                         "hash_distance": np.zeros(0, np.int16)})


def directed_neighbours(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig, client=None,
                        representatives: np.ndarray | None = None, block_rows: int | None = None,
                        index: HammingIndex | None = None,
                        query_owners: np.ndarray | None = None, gather: bool = True) -> pd.DataFrame | Lists:
    """Each querying image's K nearest other images (the per-image cap of `near_pairs`): directed
    rows `owner_a` (the querying image), `owner_b`, `hash_distance` (int16), sorted by owner_a,
    distance, owner_b. The index holds every taking-part image; `query_owners` (N,) bool limits
    which images query (default: all), so a catalog can re-derive only some images' lists.
    `gather=False`: where the search runs on the workers (sharded), its lists stay there
    (`Lists`, which `pairs_from_neighbours` takes as they are)."""
    codes, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    N, V, W = codes.shape
    if index is None and query_owners is None:
        spread = _sharded(cfg, client, int(idx_use.any(axis=1).sum()))
        if spread or (client is not None and cfg.search_sharding == "auto"):
            # on a cluster the index is built and searched on the workers (one shard below
            # search_shard_size): the driver compiles no numba kernel (~66 MB it would keep)
            return sharded_directed_neighbours(codes, use, idx_use, cfg, client=client, block_rows=block_rows,
                                               one_shard=not spread, gather=gather)
    if index is None:
        img, var = np.nonzero(idx_use)
        index = make_index(codes[img, var], img.astype(np.int64), cfg.backend,
                           max_distance=cfg.max_distance)
    quse = use if query_owners is None else use & np.asarray(query_owners, bool)[:, None]
    q_img, q_var = np.nonzero(quse)  # row-major: by image, then variant (contiguous per owner)
    if q_img.size == 0:
        return _empty_directed()
    queries = codes[q_img, q_var]
    q_img = q_img.astype(np.int64)
    q_var = q_var.astype(np.int8)
    if block_rows is None:
        n_threads = 1
        if client is not None:
            try:
                n_threads = max(1, sum(client.nthreads().values()))
            except Exception:
                n_threads = 2
        block_rows = int(np.clip(-(-q_img.size // (8 * n_threads)), 20_000, 200_000))
    blocks = _blocks(q_img, block_rows)
    if client is None or len(blocks) <= 1:  # one block: shipping the index costs more than it saves
        parts = [near_pairs_partition(index, queries[s:e], q_img[s:e], cfg, q_var[s:e])
                 for s, e in blocks]
    else:
        index_future = scatter(client, index, broadcast=True, hash=False)  # fresh keys (see sharded_directed_neighbours)
        payload = scatter(client, [(queries[s:e], q_img[s:e], q_var[s:e]) for s, e in blocks], hash=False)
        futures = client.map(_run_block, [index_future] * len(blocks), payload,
                             [cfg] * len(blocks), pure=False)
        parts = client.gather(futures)
        del index_future, payload, futures
    found = pd.concat(parts, ignore_index=True) if parts else None
    if found is None or found.empty:
        return _empty_directed()
    return (found[["owner_a", "owner_b", "hash_distance"]]
            .astype({"owner_a": "int64", "owner_b": "int64", "hash_distance": "int16"})
            .reset_index(drop=True))


# --------------------------------------------------------------------------------------------
# sharded search: no process holds every hash
#
# A hash partition is a tuple (img int64 (n,) ascending global image numbers, codes uint64
# (n, V, W), use bool (n, V) query rows, idx_use bool (n, V) index entries), as `_prepare` makes
# them. Consecutive partitions are grouped into index shards of about `screen.search_shard_size`
# entries, each built on a worker from its partitions; every partition's query rows probe every
# shard and the per-shard K-nearest lists are merged per partition. The merge is exact: an image
# p in o's global top K (by distance, then p) has its true distance in the shard holding p's
# entries, and every image beating it there beats it globally, so it is in that shard's top K;
# the smallest distance per (o, p) over the shards, cut to K, is the global list. The driver
# holds O(partitions): counts and futures, never codes. Data moved: each query partition is sent
# to every shard (S x the query rows); work: the per-shard searches (about one full-index search
# plus S x the bucket probes per query row).


def _worker_addresses(client) -> list[str]:
    """The cluster's workers, asked of the scheduler now. Not `client.scheduler_info()["workers"]`:
    distributed's periodic refresh (without per-worker details) can replace that answer before it
    is returned, so it is sometimes empty on a busy machine."""
    workers = sorted(client.nthreads())
    if not workers:  # a remote cluster whose workers have not joined yet: wait, as tasks would
        client.wait_for_workers(1)
        workers = sorted(client.nthreads())
    return workers


def _sharded(cfg: ScreenConfig, client, n_entries: int) -> bool:
    mode = cfg.search_sharding
    if mode in ("sharded", "routed"):
        return True
    return mode == "auto" and client is not None and n_entries > cfg.search_shard_size


def _part_entries(part) -> int:
    return int(part[3].sum())


def _part_words(part) -> int:
    return int(part[1].shape[2])


def _build_shard(cfg: ScreenConfig, *parts) -> HammingIndex:
    """The index over the entries of some consecutive hash partitions (runs on a worker)."""
    codes = [p[1][p[3]] for p in parts]
    owners = [np.repeat(p[0], p[3].sum(axis=1)) for p in parts]  # np.nonzero order: by image, then variant
    W = parts[0][1].shape[2]
    codes = np.concatenate(codes) if codes else np.zeros((0, W), np.uint64)
    return make_index(codes, np.concatenate(owners).astype(np.int64), cfg.backend, max_distance=cfg.max_distance)


def _search_shard(index: HammingIndex, part, cfg: ScreenConfig) -> pd.DataFrame:
    """One partition's query rows against one shard: each query image's K nearest in the shard."""
    img, codes, use, _ = part
    q_img, q_var = np.nonzero(use)
    if q_img.size == 0:
        return _empty_directed()
    found = near_pairs_partition(index, codes[q_img, q_var], img[q_img].astype(np.int64), cfg,
                                 q_var.astype(np.int8))
    return found[["owner_a", "owner_b", "hash_distance"]]


def _merge_lists(k: int, *found: pd.DataFrame) -> pd.DataFrame:
    """Per-shard K-nearest lists of one partition -> the K nearest over all shards."""
    out = pd.concat(found, ignore_index=True) if found else _empty_directed()
    out = (out.sort_values(["owner_a", "hash_distance", "owner_b"], kind="stable")
           .drop_duplicates(["owner_a", "owner_b"], keep="first"))
    out = out[out.groupby("owner_a", sort=False).cumcount() < k]
    return (out.reset_index(drop=True)
            .astype({"owner_a": "int64", "owner_b": "int64", "hash_distance": "int16"}))


def shard_groups(entries: list[int], shard_size: int, n_workers: int = 1) -> list[list[int]]:
    """Consecutive partitions -> index shards of about `shard_size` entries (at least `n_workers`
    shards when there are that many non-empty partitions, so every worker builds and searches one)."""
    total = sum(entries)
    n_shards = max(1, -(-total // max(shard_size, 1)))
    if n_shards > 1 and n_workers > 1:  # a multiple of the workers: none idles at the end
        n_shards = -(-n_shards // n_workers) * n_workers
    n_shards = max(n_shards, min(n_workers, sum(e > 0 for e in entries)))
    target = total / n_shards
    groups, current, acc = [], [], 0
    for i, e in enumerate(entries):
        if e == 0:
            continue
        current.append(i)
        acc += e
        if acc >= target * (len(groups) + 1) - 1e-9 and len(groups) < n_shards - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


# Routed search ("routed"): instead of whole indexes over some of the entries, each worker holds
# slices of one multi-index planned for all of them (`search.ChunkSlice`): chunk c's table over
# the entries whose chunk-c value starts with a given prefix. The prefixes split each chunk's
# value range in halves until a slice holds about `search_shard_size` entries (from a histogram
# of the chunk values' first PREFIX_BITS bits, summed on a worker). Every partition's rows still
# go to every slice, but a slice probes only the flips that land in it, so each probe and each
# verification is made once, as in one index, however many slices there are; the sharded
# search pays the probes once per shard, and its shards' chunks are planned for a shard's
# entries, not all of them. The slices are dealt to the workers in turn and each worker holds its
# share as one index (`search.SliceGroup`); the entries reach it through a piece per partition cut
# on the partition's worker, so the tasks are per partition and worker, not per slice. Each entry
# lies in one slice per chunk, as a contiguous multi-index holds a copy of its code per chunk.

PREFIX_BITS = 12  # a chunk's values are split on at most their first 12 bits (4,096 slices per chunk)
MIN_SLICE_ENTRIES = 256  # below this a slice costs more to search than it saves


def _routing(cfg: ScreenConfig, n_entries: int, W: int) -> int | None:
    """Chunks per word of the multi-index a routed search spreads over slices, or None when the
    threshold is too wide for chunking (the multi-index itself would scan linearly)."""
    if cfg.backend != "mih":
        return None
    plan = plan_chunks(n_entries, W, cfg.max_distance)
    return None if plan["probes"] > 200_000 else int(plan["chunks_per_word"])


def _entries(part) -> tuple[np.ndarray, np.ndarray]:
    """A hash partition's index entries: (codes (n, W), owners)."""
    img, codes, _, idx_use = part
    e_img, e_var = np.nonzero(idx_use)
    return codes[e_img, e_var], img[e_img].astype(np.int64)


def _prefix_counts(part, chunks_per_word: int) -> list[np.ndarray]:
    """Per chunk: how many of the partition's entries start with each value of the chunk's first
    (up to PREFIX_BITS) bits."""
    codes, _ = _entries(part)
    lengths = chunk_geometry(chunks_per_word, codes.shape[1])[0]
    ordered = interleave(codes, chunks_per_word)  # (once for every chunk)
    out = []
    for ci, b in enumerate(lengths):
        h = min(b, PREFIX_BITS)
        top = chunk_of(ordered, chunks_per_word, ci) >> np.uint64(b - h)
        out.append(np.bincount(top.astype(np.int64), minlength=1 << h))
    return out


def _sum_counts(*counts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sum(column, axis=0) for column in zip(*counts)]


def slice_plan(counts: list[np.ndarray], target: int) -> list[tuple[int, int, int]]:
    """(chunk, prefix, prefix bits) of the slices: each chunk's value range halved until a part
    holds at most `target` entries or is one value of the counted bits (empty parts dropped).
    `counts[c]`: entries per value of chunk c's first log2(len(counts[c])) bits."""
    out = []
    for ci, c in enumerate(counts):
        h = int(len(c)).bit_length() - 1
        cum = np.concatenate([[0], np.cumsum(c)])
        stack = [(0, 0)]
        while stack:
            prefix, bits = stack.pop()
            n = cum[(prefix + 1) << (h - bits)] - cum[prefix << (h - bits)]
            if n == 0:
                continue
            if n <= target or bits == h:
                out.append((ci, prefix, bits))
            else:
                stack += [(2 * prefix + 1, bits + 1), (2 * prefix, bits + 1)]
    return out


def _slice_pieces(part, chunks_per_word: int, slices: list[tuple[int, int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The partition's entries that belong to each of `slices` (chunk, prefix, bits): (codes, owners)
    per slice; the entries and each chunk's values made once."""
    codes, owners = _entries(part)
    lengths = chunk_geometry(chunks_per_word, codes.shape[1])[0]
    ordered = interleave(codes, chunks_per_word)
    values = {ci: chunk_of(ordered, chunks_per_word, ci) for ci in {s[0] for s in slices}}
    out = []
    for ci, prefix, bits in slices:
        keep = (values[ci] >> np.uint64(lengths[ci] - bits)) == np.uint64(prefix)
        out.append((codes[keep], owners[keep]))
    return out


def _build_slices(chunks_per_word: int, W: int, slices: list[tuple[int, int, int]], *pieces) -> SliceGroup:
    """One worker's slices from their pieces (`_slice_pieces` of every partition), as one index."""
    built = []
    for i, s in enumerate(slices):
        mine = [p[i] for p in pieces]
        codes = np.concatenate([c for c, _ in mine]) if mine else np.zeros((0, W), np.uint64)
        owners = np.concatenate([o for _, o in mine]) if mine else np.zeros(0, np.int64)
        built.append(ChunkSlice(codes, owners, chunks_per_word, *s))
    return SliceGroup(built)


def _tree_sum(client, counts: list):
    """The prefix histograms summed a few at a time on the workers (one future), not all in one task."""
    while len(counts) > 16:
        counts = [client.submit(_sum_counts, *counts[i:i + 16], pure=False) for i in range(0, len(counts), 16)]
    return client.submit(_sum_counts, *counts, pure=False)


def routed_plan(parts: list, cfg: ScreenConfig, client, target: int) -> tuple[int | None, int, list, list]:
    """The routed search's (chunks per word, words per code, slices as `slice_plan` gives them, the
    partitions that hold entries); chunks per word None when the threshold is too wide for chunking."""
    run = lambda fn, *args: _run(client, fn, *args)  # noqa: E731
    get = (lambda x: x) if client is None else client.gather
    entries = get([run(_part_entries, p) for p in parts])
    W = int(get(run(_part_words, parts[0]))) if parts else 1
    chunks_per_word = _routing(cfg, sum(entries), W)
    if chunks_per_word is None:
        return None, W, [], parts
    parts = [p for p, e in zip(parts, entries) if e > 0]
    if client is not None:  # at least about 4 slices a worker, so none idles at the end
        target = min(target, -(-chunks_per_word * W * sum(entries) // (4 * len(_worker_addresses(client)))))
    counts = [run(_prefix_counts, p, chunks_per_word) for p in parts]
    if counts:
        counts = _sum_counts(*counts) if client is None else client.gather(_tree_sum(client, counts))
    plan = slice_plan(counts, max(target, MIN_SLICE_ENTRIES)) if parts else []
    return chunks_per_word, W, plan, parts


class _Shards:
    """Index shards over the entries of hash partitions (see the section comment), built on the
    workers with a client (one shard per worker in turn: the searches follow their large index),
    in-process without. `one_shard`: one index over every partition, a copy built on each
    worker (as the driver's single index was broadcast), each item probing one copy. `routed`:
    slices of one multi-index instead (see "Routed search" above)."""

    def __init__(self, parts: list, cfg: ScreenConfig, client=None, shard_size: int | None = None,
                 one_shard: bool = False, routed: bool = False):
        self.client, self.one_shard = client, one_shard
        shard_size = int(shard_size or cfg.search_shard_size)
        if routed and not one_shard and self._slices(parts, cfg, client, shard_size):
            return
        if client is None:
            entries = [_part_entries(p) for p in parts]
            groups = ([[i for i, e in enumerate(entries) if e > 0]] if one_shard
                      else shard_groups(entries, shard_size))
            self.shards = [_build_shard(cfg, *[parts[i] for i in g]) for g in groups if g]
            return
        self.workers = _worker_addresses(client)
        entries = client.gather(client.map(_part_entries, parts, pure=False))
        if one_shard:
            every = [parts[i] for i, e in enumerate(entries) if e > 0]
            self.shards = [client.submit(_build_shard, cfg, *every, pure=False, workers=[w], allow_other_workers=True)
                           for w in self.workers] if every else []
        else:
            groups = shard_groups(entries, shard_size, len(self.workers))
            self.shards = [client.submit(_build_shard, cfg, *[parts[i] for i in g], pure=False,
                                         workers=[self.workers[j % len(self.workers)]], allow_other_workers=True)
                           for j, g in enumerate(groups)]

    def _slices(self, parts: list, cfg: ScreenConfig, client, target: int) -> bool:
        """Build the routed search's slices (False, nothing built: the threshold is too wide)."""
        chunks_per_word, W, plan, parts = routed_plan(parts, cfg, client, target)
        if chunks_per_word is None:
            return False
        if client is None:  # one group of every slice
            self.shards = [_build_slices(chunks_per_word, W, plan, *[_slice_pieces(p, chunks_per_word, plan)
                                                                     for p in parts])] if plan else []
            return True
        # the slices dealt to the workers in turn, each worker's held as one index: one piece task
        # per partition and worker, one search task per partition and worker
        self.workers = _worker_addresses(client)
        self.shards = []
        for j, w in enumerate(self.workers):
            mine = plan[j::len(self.workers)]
            if mine:
                pieces = [client.submit(_slice_pieces, p, chunks_per_word, mine, pure=False) for p in parts]
                self.shards.append(client.submit(_build_slices, chunks_per_word, W, mine, *pieces, pure=False,
                                                 workers=[w], allow_other_workers=True))
        return True

    def probe(self, fn, item, j: int, *args) -> list:
        """fn(shard, item, *args) against every shard (one copy with `one_shard`; `j`: the item's
        number, which picks it), as results, or futures with a client."""
        if not self.shards:
            return []
        if self.client is None:
            return [fn(s, item, *args) for s in (self.shards[:1] if self.one_shard else self.shards)]
        if self.one_shard:
            c = j % len(self.shards)
            return [self.client.submit(fn, self.shards[c], item, *args, pure=False,
                                       workers=[self.workers[c % len(self.workers)]], allow_other_workers=True)]
        return [self.client.submit(fn, s, item, *args, pure=False) for s in self.shards]


def _run(client, fn, *args):
    """fn(*args) here, or as a task with a client (its future)."""
    return fn(*args) if client is None else client.submit(fn, *args, pure=False)


def sharded_neighbours(parts: list, cfg: ScreenConfig, client=None, shard_size: int | None = None,
                       gather: bool = True, one_shard: bool = False):
    """`directed_neighbours` over hash partitions (or futures of them, e.g. made on the workers),
    with the index sharded (see the section comment; `one_shard`: one index over every partition,
    a copy built on each worker). Returns the directed rows, sorted by owner_a, distance, owner_b, or with
    `gather=False` (and a client) one future per partition of them."""
    k = int(cfg.max_candidates)
    shards = _Shards(parts, cfg, client, shard_size, one_shard, routed=cfg.search_sharding != "sharded")
    merged = [_run(client, _merge_lists, k, *shards.probe(_search_shard, p, j, cfg)) for j, p in enumerate(parts)]
    if client is not None and not gather:
        return merged
    lists = merged if client is None else client.gather(merged)
    return pd.concat(lists, ignore_index=True) if lists else _empty_directed()


def hash_partitions(codes: np.ndarray, use: np.ndarray, idx_use: np.ndarray, rows: int) -> list:
    """Prepared arrays (as `_prepare` returns them) -> hash partitions of about `rows` images,
    keeping only images that take part."""
    return list(iter_hash_partitions(codes, use, idx_use, rows))


def iter_hash_partitions(codes: np.ndarray, use: np.ndarray, idx_use: np.ndarray, rows: int) -> Iterator[tuple]:
    """`hash_partitions`, one at a time (each a copy of its rows: a caller that sends each away
    before taking the next holds one, not a second copy of every row)."""
    img = np.flatnonzero(use.any(axis=1) | idx_use.any(axis=1)).astype(np.int64)
    for s in range(0, img.size, max(rows, 1)):
        yield img[s:s + rows], codes[img[s:s + rows]], use[img[s:s + rows]], idx_use[img[s:s + rows]]


def _partition_rows(n_img: int, client, block_rows: int | None = None) -> int:
    """Images per hash partition: about 8 per worker thread, 20k-200k."""
    n_threads = 1 if client is None else max(1, sum(client.nthreads().values()))
    return int(block_rows or np.clip(-(-n_img // (8 * n_threads)), 20_000, 200_000))


def sharded_directed_neighbours(codes: np.ndarray, use: np.ndarray, idx_use: np.ndarray, cfg: ScreenConfig,
                                client=None, block_rows: int | None = None, one_shard: bool = False,
                                gather: bool = True) -> pd.DataFrame | Lists:
    """`directed_neighbours` for codes the caller already holds: cut into partitions, sent to the
    workers, searched there with `sharded_neighbours` (`one_shard`: one index). With `gather=False`
    (and a client) the lists stay on the workers (`Lists`)."""
    n_img = int((use.any(axis=1) | idx_use.any(axis=1)).sum())
    if n_img == 0:
        return _empty_directed()
    made = iter_hash_partitions(codes, use, idx_use, _partition_rows(n_img, client, block_rows))
    firsts, parts = [], []
    for part in made:  # (each sent as it is cut: the driver holds one partition's copy of its rows)
        firsts.append(part[0][0])
        # fresh keys: a same-data scatter right after the last search released its futures would
        # share their keys and be cancelled with them
        parts.append(part if client is None else scatter(client, [part], hash=False)[0])
        del part
    firsts = np.array(firsts, dtype=np.int64)
    if client is None or gather:
        return sharded_neighbours(parts, cfg, client=client, one_shard=one_shard)
    return Lists(client, parts, sharded_neighbours(parts, cfg, client=client, one_shard=one_shard, gather=False),
                 firsts, codes.shape[0])


def _best_over_variants(codes, use, idx_use, a, b) -> tuple[np.ndarray, np.ndarray]:
    """`hamming.pair_best` with the screen's candidate order: (distance int16, transform int8) per pair."""
    from pipeline import hamming  # (numba: imported where the kernel runs)
    order_side = np.array([s for s, _ in _ORDER], dtype=np.int64)
    order_var = np.array([v for _, v in _ORDER], dtype=np.int64)
    return hamming.pair_best(codes, use, idx_use, a, b, order_side, order_var, np.asarray(DIHEDRAL_INVERSE, dtype=np.int8))


PAIRS_PER_TASK = 250_000  # pairs per `pair_best` task (it gets the codes of its pairs' rows only)
PAIR_TASKS_IN_FLIGHT = 8  # at most: the driver holds each one's data (~55 MB) until its result is back


def _chunk_rows(codes, use, idx_use, a: np.ndarray, b: np.ndarray) -> tuple:
    """One `pair_best` task's data: the rows its pairs name (ascending), their codes and masks,
    and the pairs (renumbered over the rows by the task: `_best_of_rows`)."""
    rows = np.concatenate([a, np.sort(b)])  # (`a` ascends from pairs_from_neighbours: two sorted runs merge fast)
    rows.sort(kind="stable")
    rows = rows[np.concatenate([[True], rows[1:] != rows[:-1]])]  # (a chunk has a pair at least)
    return codes[rows], use[rows], idx_use[rows], rows, a, b


def _best_of_rows(codes, use, idx_use, rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_best_over_variants` of the pairs (a, b) given the codes of `rows` only (on a worker: the
    renumbering, most of a chunk's preparation, is not the driver's, which cuts every chunk)."""
    if rows[-1] - rows[0] < 16 * rows.size:  # a table over the rows' span (at most 64 B a row)
        at = np.empty(int(rows[-1] - rows[0]) + 1, np.int32)
        at[rows - rows[0]] = np.arange(rows.size, dtype=np.int32)
        return _best_over_variants(codes, use, idx_use, at[a - rows[0]].astype(np.int64), at[b - rows[0]].astype(np.int64))
    return _best_over_variants(codes, use, idx_use, np.searchsorted(rows, a), np.searchsorted(rows, b))


def pair_best(codes, use, idx_use, a: np.ndarray, b: np.ndarray, client=None) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's smallest distance over both directions and its transform (prepared arrays, as
    `_prepare` returns them), in this process or, with a Dask `client`, on the workers: there the
    driver never compiles the numba kernel, which costs it ~66 MB of memory for the rest of the
    run (LLVM and the compiled code). The pairs go in chunks of PAIRS_PER_TASK, each task with
    the codes of the rows its pairs name (never every image's: at 10M images those are ~0.9 GB
    a worker), two tasks a worker thread in flight, at most PAIR_TASKS_IN_FLIGHT: the driver
    holds each one's data until its result is back, so that a chunk a lost worker took is sent
    again (`progress.Sent`)."""
    if client is None or a.size == 0:
        return _best_over_variants(codes, use, idx_use, a, b)
    from pipeline.progress import Sent
    dist, trans = np.empty(a.size, np.int16), np.empty(a.size, np.int8)
    starts = iter(range(0, a.size, PAIRS_PER_TASK))
    sent = Sent(client)

    def send_next() -> None:
        s = next(starts, None)
        if s is not None:
            e = min(s + PAIRS_PER_TASK, a.size)
            sent.send([(s, _best_of_rows, _chunk_rows(codes, use, idx_use, a[s:e], b[s:e]))], star=True)

    for _ in range(max(1, min(2 * sum(client.nthreads().values()), PAIR_TASKS_IN_FLIGHT))):
        send_next()
    for s, (d, t) in sent.results():  # (each result makes room for the next chunk)
        dist[s:s + d.size], trans[s:s + t.size] = d, t
        send_next()
    return dist, trans


def pairs_from_neighbours(directed: pd.DataFrame | Lists, codes: np.ndarray, variant_mask: np.ndarray,
                          cfg: ScreenConfig, representatives: np.ndarray | None = None,
                          client=None) -> pd.DataFrame:
    """Directed top-K rows -> one row per unordered pair (kept when either side has the other in
    its list), with the pair's smallest distance over both directions and its transform (on the
    workers with a Dask `client`: `pair_best`; lists left on the workers, `Lists`: made there)."""
    if isinstance(directed, Lists):
        return directed.pairs()
    codes, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    N = max(codes.shape[0], 1)
    if directed is None or directed.empty:
        return _empty_pairs()
    a = np.minimum(directed["owner_a"].to_numpy(np.int64), directed["owner_b"].to_numpy(np.int64))
    b = np.maximum(directed["owner_a"].to_numpy(np.int64), directed["owner_b"].to_numpy(np.int64))
    key = np.unique(a * np.int64(N) + b)
    a, b = key // N, key % N
    dist, trans = pair_best(codes, use, idx_use, a, b, client=client)
    return pd.DataFrame({"idx_a": a.astype(np.int64), "idx_b": b.astype(np.int64),
                         "hash_distance": dist, "transform": trans})


# --------------------------------------------------------------------------------------------
# pairs made where the lists are: the driver neither holds the lists nor cuts code chunks
#
# A sharded search leaves each hash partition's directed lists on a worker (`Lists`). The pairs
# are made there too. Each list row (o, p) goes, with o's codes (from o's own partition), to the
# block of partitions that holds p, which has p's codes: a pair's best distance over the variants
# is computed where both rows' codes are, and the driver sends no codes. A pair listed both ways
# is made once: at b's block from the row (a, b) (a < b), and at a's block from the row (b, a)
# only when a's list does not hold b (a's list is in a's block). A pair is made at a or b's
# block, so the made pairs are routed once more, by a's block (`_route_pairs`), and each block
# sorts its own (`_ordered_block`): the blocks cover ascending ranges of image numbers, so in
# block order they are the pairs in (a, b) order, which the driver copies into its columns a
# block at a time (`_gather_in_order`, 19 B a pair) with no sort of its own; the lists
# themselves reach the driver only when it keeps them (a catalog).

MAX_PAIR_BLOCKS = 64  # blocks of partitions the rows are routed to: tasks = partitions x blocks
# list rows routed at once, ~90 B each with their owner's codes (the workers hold them until their
# blocks are made): past this the blocks are made in waves, each routing only its blocks' rows
PAIR_WAVE_ROWS = 20_000_000


class Lists:
    """A sharded search's directed lists, left on the workers: a future per hash partition of its
    rows (`lists`), the partitions' futures (`parts`), each partition's first image number, and
    `n`, the image numbers' bound."""

    def __init__(self, client, parts: list, lists: list, firsts: np.ndarray, n: int):
        self.client, self.parts, self.lists, self.firsts, self.n = client, parts, lists, np.asarray(firsts), int(n)

    def gather(self) -> pd.DataFrame:
        """The directed rows, as `directed_neighbours` returns them."""
        rows = self.client.gather(self.lists)
        return pd.concat(rows, ignore_index=True) if rows else _empty_directed()

    def write(self, directory: str) -> SavedLists:
        """The lists written by the workers into `directory` (a folder or URL every worker and
        this process reach, as the feature parts' work dir), a file per partition: for a caller
        that reads them much later (the catalog's commit), which then holds neither the rows
        meanwhile nor, once written, the workers' copies (which a lost worker would take)."""
        # (a folder of its own per call: a search made again after a lost worker cuts its
        # partitions anew, and a write left running from the first try must not replace a file)
        directory = storage.join(directory, uuid.uuid4().hex[:12])
        paths = [storage.join(directory, f"lists-{j:06d}.parquet") for j in range(len(self.lists))]
        rows = self.client.gather([self.client.submit(_write_lists, rows, path, pure=False)
                                   for rows, path in zip(self.lists, paths)])
        return SavedLists(directory, paths, rows)

    def pairs(self) -> pd.DataFrame:
        """`pairs_from_neighbours` of the lists, made on the workers (see the section comment)."""
        client = self.client
        blocks = [b for b in np.array_split(np.arange(len(self.parts)), min(len(self.parts), MAX_PAIR_BLOCKS))
                  if b.size]
        starts = self.firsts[[b[0] for b in blocks]]
        rows_listed = sum(client.gather([client.submit(len, rows, pure=False) for rows in self.lists]))
        made = []  # each block's pairs, left on the workers
        for wave in np.array_split(np.arange(len(blocks)), min(len(blocks), max(1, -(-rows_listed // PAIR_WAVE_ROWS)))):
            lo, hi = int(wave[0]), int(wave[-1]) + 1
            routed = [client.submit(_route_rows, p, rows, starts, lo, hi, pure=False)
                      for p, rows in zip(self.parts, self.lists)]
            for j in range(lo, hi):
                # (a piece taken where its routing task's result is: only the piece moves)
                pieces = [_piece(client, r, j - lo) for r in routed]
                made.append(client.submit(_pair_block, self.n, blocks[j].size, *[self.parts[i] for i in blocks[j]],
                                          *[self.lists[i] for i in blocks[j]], *pieces, pure=False))
            del routed
            # (waited for, so that a wave's routed rows are let go of before the next is routed)
            client.gather([client.submit(len, block, pure=False) for block in made[lo:hi]])
        # by the block of idx_a, each block sorted: in block order, the pairs in (idx_a, idx_b) order
        routed = [client.submit(_route_pairs, block, starts, pure=False) for block in made]
        del made
        ordered = [client.submit(_ordered_block, *[_piece(client, r, j) for r in routed], pure=False)
                   for j in range(len(blocks))]
        del routed
        return _gather_in_order(client, ordered)


def _write_lists(rows: pd.DataFrame, path: str) -> int:
    """One partition's directed rows as a Parquet file (whole or not at all); returns their count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(rows[["owner_a", "owner_b", "hash_distance"]], preserve_index=False), buf)
    storage.write_whole(path, buf.getvalue())
    return len(rows)


class SavedLists:
    """Directed lists as files, one per hash partition in partition order (`Lists.write`), read
    back a partition at a time (`frames`): the driver holds one partition's rows at once, not
    every image's K nearest (18 B a row, up to screen.max_candidates rows an image) from the
    candidate search to the catalog's commit."""

    def __init__(self, directory: str, paths: list[str], rows: list[int]):
        self.directory, self.paths, self.rows = directory, list(paths), [int(n) for n in rows]

    def __len__(self) -> int:
        return sum(self.rows)

    def frames(self) -> Iterator[pd.DataFrame]:
        """Each partition's rows in turn (none for a partition that has none)."""
        for path, n in zip(self.paths, self.rows):
            if n:
                with storage.open_input(path) as fh:
                    rows = pd.read_parquet(fh)
                if len(rows) != n:
                    raise RuntimeError(f"candidates: {path} holds {len(rows)} list rows, {n} were written there")
                yield rows.astype({"owner_a": "int64", "owner_b": "int64", "hash_distance": "int16"})

    def gather(self) -> pd.DataFrame:
        """Every row, as `directed_neighbours` returns them."""
        rows = list(self.frames())
        return pd.concat(rows, ignore_index=True) if rows else _empty_directed()

    def remove(self) -> None:
        """Delete the files (their folder)."""
        storage.remove_folder(self.directory)


def _piece(client, routed, j: int):
    """The j-th piece of a routing task's result, taken where that result is."""
    return client.submit(operator.getitem, routed, j, pure=False)


def _route_pairs(pairs: pd.DataFrame, starts: np.ndarray) -> list:
    """One block's pairs cut by the block holding idx_a (`starts`: each block's first image
    number): a frame or None per block."""
    block = np.searchsorted(starts, pairs["idx_a"].to_numpy(np.int64), side="right") - 1
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(len(starts) + 1))
    return [pairs.take(order[bounds[j]:bounds[j + 1]]).reset_index(drop=True) if bounds[j + 1] > bounds[j] else None
            for j in range(len(starts))]


def _ordered_block(*pieces) -> pd.DataFrame:
    """The pairs whose idx_a is in one block, sorted by idx_a, idx_b (each pair is made once)."""
    pieces = [x for x in pieces if x is not None]
    if not pieces:
        return _empty_pairs()
    out = pd.concat(pieces, ignore_index=True)
    return out.take(np.lexsort((out["idx_b"].to_numpy(), out["idx_a"].to_numpy()))).reset_index(drop=True)


def _gather_in_order(client, blocks: list) -> pd.DataFrame:
    """The blocks' pairs concatenated in block order, fetched a block at a time into columns
    made to size: the driver holds the pairs once (a gather of every block, their concatenation
    and a sorted copy were 3 x 19 B a pair at once, plus the sort's keys)."""
    sizes = np.asarray(client.gather([client.submit(len, b, pure=False) for b in blocks]), dtype=np.int64)
    empty = _empty_pairs()
    columns = {c: np.empty(int(sizes.sum()), empty[c].dtype) for c in empty.columns}
    at = 0
    for j in range(len(blocks)):
        if sizes[j]:
            got = blocks[j].result()
            for c in columns:
                columns[c][at:at + sizes[j]] = got[c].to_numpy()
            at += int(sizes[j])
            del got
        blocks[j] = None  # (its pairs let go of on the worker)
    return pd.DataFrame(columns)


def _empty_pairs() -> pd.DataFrame:
    return pd.DataFrame({"idx_a": np.zeros(0, np.int64), "idx_b": np.zeros(0, np.int64),
                         "hash_distance": np.zeros(0, np.int16), "transform": np.zeros(0, np.int8)})


def _route_rows(part, rows, starts: np.ndarray, lo: int, hi: int) -> list:
    """One partition's list rows (o, p) cut by the block holding p (`starts`: each block's first
    image number), each with o's codes and masks (o is this partition's): for the blocks lo..hi-1,
    (o, p, codes, use, idx_use) or None. Only the rows of those blocks are looked up and sorted:
    a partition is routed once per wave, and a wave's rows are about 1/waves of them."""
    img, codes, use, idx_use = part
    p = rows["owner_b"].to_numpy(np.int64)
    wave = p >= starts[lo]
    if hi < len(starts):
        wave &= p < starts[hi]
    o, p = rows["owner_a"].to_numpy(np.int64)[wave], p[wave]
    at = _rows_in(img, o, "a list's owner")
    block = np.searchsorted(starts, p, side="right") - 1
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(lo, hi + 1))
    out = []
    for j in range(hi - lo):
        take = order[bounds[j]:bounds[j + 1]]
        out.append((o[take], p[take], codes[at[take]], use[at[take]], idx_use[at[take]]) if take.size else None)
    return out


def _rows_in(img: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """The row of each id among ascending image numbers `img`, every id being there (an image
    listed by the search takes part, so its partition holds it; else the codes of another image
    would be read in silence)."""
    at, found = _rows_of(img, ids)
    if not found.all():
        raise RuntimeError(f"candidates: {what} ({int(ids[~found][0])}) is not among its partitions' images")
    return at


def _pair_block(n: int, n_parts: int, *items) -> pd.DataFrame:
    """The pairs made at one block of partitions (see the section comment): `items` its
    partitions, their lists, then the pieces routed to it (`_route_rows`)."""
    parts, lists = items[:n_parts], items[n_parts:2 * n_parts]
    pieces = [x for x in items[2 * n_parts:] if x is not None]
    if not pieces:
        return _empty_pairs()
    o, p = np.concatenate([x[0] for x in pieces]), np.concatenate([x[1] for x in pieces])
    listed = np.concatenate([r["owner_a"].to_numpy(np.int64) * np.int64(n) + r["owner_b"].to_numpy(np.int64)
                             for r in lists])
    keep = (o <= p) | ~np.isin(p * np.int64(n) + o, listed)  # (b, a): only when (a, b) is not listed
    a, b = np.minimum(o, p)[keep], np.maximum(o, p)[keep]
    _, first = np.unique(a * np.int64(n) + b, return_index=True)
    rows = np.flatnonzero(keep)[first]
    a, b, m = a[first], b[first], first.size
    at = _rows_in(np.concatenate([x[0] for x in parts]), p[rows], "a listed neighbour")  # (in the block's partitions)
    # codes, use, idx_use: o's rows (0..m-1, from the pieces), then p's (m..2m-1, from the partitions)
    local = [np.concatenate([np.concatenate([x[k + 1] for x in pieces])[rows],
                             np.concatenate([x[k] for x in parts])[at]]) for k in (1, 2, 3)]
    o_first = o[rows] <= p[rows]
    mine, theirs = np.arange(m, dtype=np.int64), np.arange(m, 2 * m, dtype=np.int64)
    dist, trans = _best_over_variants(*local, np.where(o_first, mine, theirs), np.where(o_first, theirs, mine))
    return pd.DataFrame({"idx_a": a, "idx_b": b, "hash_distance": dist.astype(np.int16),
                         "transform": trans.astype(np.int8)})


def reach_pairs(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                added: np.ndarray, owners: np.ndarray,
                representatives: np.ndarray | None = None) -> pd.DataFrame:
    """Pairs (owner, added image) where the added image is within reach of the owner in the
    OWNER's direction (one of its query variants against the added image's index entries, at the
    limit of that variant): rows `owner`, `added`, `hash_distance` (the owner-side distance).

    The roles are swapped so only the added images query: an index over the owners' query
    variants (plain and trimmed rows within `max_distance`, dihedral rows within
    `dihedral_max_distance`) is searched with the added images' index entries, uncapped."""
    codes, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    added = np.asarray(added, bool) & idx_use.any(axis=1)
    owners = np.asarray(owners, bool) & ~added
    if not added.any() or not owners.any():
        return _owner_reach(codes, use, owners, np.zeros((0, codes.shape[2]), np.uint64), np.zeros(0, np.int64), cfg)
    q_img, q_var = np.nonzero(idx_use & added[:, None])
    found = _owner_reach(codes, use, owners, codes[q_img, q_var], q_img.astype(np.int64), cfg)
    return (found.sort_values(["owner", "added", "hash_distance"], kind="stable")
            .drop_duplicates(["owner", "added"], keep="first").reset_index(drop=True))


def _owner_reach(codes: np.ndarray, use: np.ndarray, owners: np.ndarray, queries: np.ndarray,
                 query_img: np.ndarray, cfg: ScreenConfig, img: np.ndarray | None = None) -> pd.DataFrame:
    """Rows (owner, added, hash_distance) of `reach_pairs`, repeats included: an index over the
    owners' query rows (prepared `codes`/`use`, `owners` bool over their rows; `img`: their global
    numbers, default the row numbers) searched with the added images' entries `queries`, owned
    by `query_img`, uncapped, each owner row at its own limit."""
    found = [pd.DataFrame({"owner": np.zeros(0, np.int64), "added": np.zeros(0, np.int64),
                           "hash_distance": np.zeros(0, np.int16)})]
    if not len(queries) or not owners.any():
        return found[0]
    img = np.arange(codes.shape[0], dtype=np.int64) if img is None else np.asarray(img, np.int64)
    ouse = use & owners[:, None]
    dihedral_var = np.zeros(use.shape[1], bool)
    dihedral_var[1:min(8, use.shape[1])] = True
    for rows, limit in ((ouse & ~dihedral_var[None, :], cfg.max_distance),
                        (ouse & dihedral_var[None, :], min(cfg.dihedral_max_distance, cfg.max_distance))):
        e_img, e_var = np.nonzero(rows)
        if e_img.size == 0:
            continue
        index = make_index(codes[e_img, e_var], img[e_img], cfg.backend, max_distance=limit)
        a, hit, d, _ = index.search(np.ascontiguousarray(queries, np.uint64), query_img, limit,
                                    max(int(owners.sum()), 1))
        found.append(pd.DataFrame({"owner": hit.astype(np.int64), "added": a.astype(np.int64),
                                   "hash_distance": d.astype(np.int16)}))
    return pd.concat(found, ignore_index=True)


def gained_neighbours(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                      added: np.ndarray, owners: np.ndarray,
                      representatives: np.ndarray | None = None,
                      index: HammingIndex | None = None) -> np.ndarray:
    """bool (N,): images of `owners` that have an image of `added` within reach in their own
    direction (`reach_pairs`), i.e. whose K-nearest list may change because of the added images.

    aHash: its flipped/rotated hashes are bit permutations of one grid, so an owner's rotated query
    row against an added image's entry is at the same distance as the owner's plain hash against
    that entry rotated back. Then the usual index of plain and trimmed entries (`index`, built over
    every taking-part image when not given) answers everything, searched only with the added
    images' entries and their rotations: a superset of the owners within reach (a rotated entry may
    also meet an owner's trimmed hash), which costs a few extra re-derived lists, never a missed
    one. Other hashes are hashed per orientation: `reach_pairs` indexes the owners' variants."""
    N = np.asarray(codes).shape[0]
    out = np.zeros(N, bool)
    if cfg.hash != "ahash":
        out[reach_pairs(codes, variant_mask, cfg, added, owners, representatives)["owner"].to_numpy()] = True
        return out
    codes, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    N, V, W = codes.shape
    added = np.asarray(added, bool) & idx_use.any(axis=1)
    owners = np.asarray(owners, bool) & ~added
    if not added.any() or not owners.any():
        return out
    if index is None:
        img, var = np.nonzero(idx_use)
        index = make_index(codes[img, var], img.astype(np.int64), cfg.backend, max_distance=cfg.max_distance)
    groups = _reach_queries(codes, use, idx_use, added,
                            bool((use[:, 1:min(8, V)].any(axis=1) & owners).any()), cfg)
    for queries, query_owners, limit in groups:
        if len(queries):
            _, hit, _, _ = index.search(np.ascontiguousarray(queries, np.uint64),
                                        query_owners.astype(np.int64), limit, max(N, 1))
            out[hit] = True
    return out & owners


def _reach_queries(codes: np.ndarray, use: np.ndarray, idx_use: np.ndarray, added: np.ndarray, rotate: bool,
                   cfg: ScreenConfig, img: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The rows with which `gained_neighbours` searches the usual index (aHash): the added images'
    plain and trimmed entries, at max_distance, and with `rotate` (some owner queries with rotated
    rows) their plain hash and trimmed entry rotated, within dihedral_max_distance. Prepared
    arrays; `img`: the rows' global image numbers (default the row numbers). -> [(queries, owner
    of each row, limit)], each group's rows of one image contiguous."""
    N, V, W = codes.shape
    img = np.arange(N, dtype=np.int64) if img is None else np.asarray(img, np.int64)
    q_img, q_var = np.nonzero(idx_use & added[:, None])  # plain and trimmed entries, at max_distance
    groups = [(codes[q_img, q_var], img[q_img], cfg.max_distance)]
    if rotate:  # owners query with rotated rows: those match within dihedral_max_distance
        limit = min(cfg.dihedral_max_distance, cfg.max_distance)
        r_img, r_var = np.nonzero(use[:, 1:min(8, V)] & added[:, None])  # the added plain hash, rotated
        rows, owners_of = [codes[r_img, r_var + 1]], [r_img]
        t_img = np.flatnonzero(idx_use[:, TRIMMED] & added) if V > TRIMMED else np.zeros(0, np.int64)
        if t_img.size:  # the added trimmed hash, rotated (the screen stores no such variant)
            from .decode import GRID_DIHEDRAL  # how the screen turns an aHash bit grid
            side = cfg.hash_size
            bits = np.unpackbits(codes[t_img, TRIMMED].astype(">u8").view(np.uint8), axis=1)
            grids = bits.reshape(-1, side, side)
            for t in range(1, 8):
                turned = np.stack([GRID_DIHEDRAL[t](g) for g in grids]).reshape(len(t_img), -1)
                rows.append(np.packbits(turned, axis=1).view(">u8").astype(np.uint64))
                owners_of.append(t_img)
        order = np.argsort(np.concatenate(owners_of), kind="stable")  # rows of one image contiguous
        groups.append((np.concatenate(rows)[order], img[np.concatenate(owners_of)[order]], limit))
    return groups


def reach_of(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig, added: np.ndarray,
             owners: np.ndarray, representatives: np.ndarray | None = None,
             index: HammingIndex | None = None) -> pd.DataFrame:
    """`reach_pairs` for a few added images (e.g. `dedupe query`): with aHash, the owners within
    reach come from `gained_neighbours` (the usual `index`, no index of every owner variant) and
    their distances from a direct comparison. Same rows as `reach_pairs`."""
    if cfg.hash != "ahash":
        return reach_pairs(codes, variant_mask, cfg, added, owners, representatives)
    near = gained_neighbours(codes, variant_mask, cfg, added, owners, representatives, index=index)
    codes_p, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    added = np.asarray(added, bool) & idx_use.any(axis=1)
    o_rows, n_rows = np.flatnonzero(near), np.flatnonzero(added)
    o = np.repeat(o_rows, n_rows.size).astype(np.int64)
    n = np.tile(n_rows, o_rows.size).astype(np.int64)
    from pipeline import hamming  # (numba: imported where the kernel runs)
    d = hamming.own_direction(codes_p, use, idx_use, o, n, cfg.max_distance,
                       min(cfg.dihedral_max_distance, cfg.max_distance))
    keep = d >= 0
    return pd.DataFrame({"owner": o[keep], "added": n[keep], "hash_distance": d[keep].astype(np.int16)})


def incremental_neighbours(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                           previous: pd.DataFrame, same: np.ndarray, client=None,
                           representatives: np.ndarray | None = None,
                           gather: bool = True) -> tuple[pd.DataFrame | Lists, dict]:
    """The K-nearest lists of `directed_neighbours` over all images, re-deriving only those that
    can have changed since `previous` (the last run's directed rows, owner_a/owner_b as current
    row numbers, -1 for an image that is gone or changed).

    `same` (N,) bool: images that took part last time with the same hashes. Their lists are
    reused unless one of their neighbours is gone (a farther image may move up) or an added image
    is within their reach (it may push a neighbour out of the top K). Added images and those are
    searched against the whole index; the result equals a search from scratch.

    With a Dask `client` the codes are cut into hash partitions, sent to the workers and searched
    there (`sharded_incremental_neighbours`: one index shard, or past `screen.search_shard_size`
    images several; the driver compiles no numba kernel), as with `screen.search_sharding`
    "sharded" without one (in-process); with "single" and a client the whole re-derivation is one
    task on a worker. `gather=False`: lists made on the workers stay there (`Lists`)."""
    if cfg.search_sharding in ("sharded", "routed") or (client is not None and cfg.search_sharding == "auto"):
        codes_p, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
        n_img = int((use.any(axis=1) | idx_use.any(axis=1)).sum())
        rows = max(_partition_rows(n_img, client), 1)
        img = np.flatnonzero(use.any(axis=1) | idx_use.any(axis=1))  # (the partitions' image numbers)
        if img.size == 0:
            return _empty_directed(), dict.fromkeys(INCREMENTAL_COUNTS, 0)
        same = np.asarray(same, bool)
        prevs = split_previous(previous, [(img[s:s + rows],) for s in range(0, img.size, rows)], same & use[:, PLAIN])
        firsts, n = img[::rows].astype(np.int64), codes_p.shape[0]
        del img
        pieces = []
        # each partition sent as it is cut, with its rows of the last lists (fresh keys: see
        # sharded_directed_neighbours): the driver holds one partition's copy of its rows
        for j, part in enumerate(iter_hash_partitions(codes_p, use, idx_use, rows)):
            piece, prevs[j] = [part, prevs[j], same[part[0]]], None
            pieces += piece if client is None else scatter(client, piece, hash=False)
            del part, piece
        del prevs, codes_p
        one_shard = not _sharded(cfg, client, int(idx_use.any(axis=1).sum()))
        if client is None or gather:
            return sharded_incremental_neighbours(pieces[::3], pieces[1::3], pieces[2::3], cfg, client=client,
                                                  one_shard=one_shard)
        out = sharded_incremental_neighbours(pieces[::3], pieces[1::3], pieces[2::3], cfg, client=client,
                                             one_shard=one_shard, gather=False)
        counts = client.gather([client.submit(operator.getitem, f, 1, pure=False) for f in out])
        return (Lists(client, pieces[::3], [client.submit(operator.getitem, f, 0, pure=False) for f in out], firsts, n),
                {key: sum(c[key] for c in counts) for key in INCREMENTAL_COUNTS})
    if client is not None:
        from .progress import map_tasks
        [(directed, stats)] = map_tasks(client, incremental_neighbours,
                                        [(codes, variant_mask, cfg, previous, same, None, representatives)],
                                        star=True)
        return directed, stats
    codes_p, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    N = codes_p.shape[0]
    part = use[:, PLAIN]
    same = np.asarray(same, bool) & part
    added = part & ~same
    prev = previous if previous is not None else _empty_directed()
    prev = prev[prev["owner_a"].to_numpy() >= 0]
    owner = prev["owner_a"].to_numpy(np.int64)
    prev = prev[same[owner]]
    owner = prev["owner_a"].to_numpy(np.int64)
    nb = prev["owner_b"].to_numpy(np.int64)
    lost = np.zeros(N, bool)
    broken = (nb < 0) | ~same[np.maximum(nb, 0)]
    lost[owner[broken]] = True
    img, var = np.nonzero(idx_use)
    index = make_index(codes_p[img, var], img.astype(np.int64), cfg.backend, max_distance=cfg.max_distance)
    gained = gained_neighbours(codes, variant_mask, cfg, added, same, representatives, index=index)
    redo = added | ((lost | gained) & same)
    fresh = directed_neighbours(codes, variant_mask, cfg, representatives=representatives,
                                query_owners=redo, index=index)
    return _kept_and_fresh(prev[~redo[owner]], fresh, part, same, added, redo, lost, gained)


# the counts `incremental_neighbours` reports (run.json: reuse.candidates)
INCREMENTAL_COUNTS = ("images", "added", "lists_reused", "rederived_lost_neighbour", "rederived_gained_neighbour")


def _kept_and_fresh(kept: pd.DataFrame, fresh: pd.DataFrame, taking, same, added, redo, lost,
                    gained) -> tuple[pd.DataFrame, dict]:
    """The kept and re-derived lists as `directed_neighbours` sorts them, and the counts (over
    the images the bool arrays cover)."""
    directed = (pd.concat([kept, fresh], ignore_index=True)
                .sort_values(["owner_a", "hash_distance", "owner_b"], kind="stable")
                .reset_index(drop=True)
                .astype({"owner_a": "int64", "owner_b": "int64", "hash_distance": "int16"}))
    counts = (taking.sum(), added.sum(), (same & ~redo).sum(), (lost & same & ~gained).sum(), (gained & same).sum())
    return directed[["owner_a", "owner_b", "hash_distance"]], dict(zip(INCREMENTAL_COUNTS, map(int, counts)))


# incremental search over hash partitions (a catalog re-run on a cluster): `incremental_neighbours`
# with no process holding every hash. Per partition: which of its images are unchanged ("same")
# or added, which unchanged ones lost a neighbour (each last-run row says whether its neighbour is
# unchanged: `split_previous`), which gained one within reach (the added images' rows probe every
# index shard, or with other hashes each partition's owner rows are indexed and probed by the
# added entries), then
# the re-derived lists by the sharded search and the kept ones. The same lists as one index.


def _rows_of(img: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in `img`, found) of each id among a partition's ascending image numbers."""
    at = np.searchsorted(img, ids)
    found = at < len(img)
    found[found] = img[at[found]] == ids[found]
    return at, found


def _part_changes(part, same) -> tuple[np.ndarray, np.ndarray]:
    """(same, added) over a partition's images: taking part and unchanged since the lists were made, or not."""
    taking = part[2][:, PLAIN]
    same = np.asarray(same, bool) & taking
    return same, taking & ~same


def _part_flags(part, changes) -> tuple[bool, bool, bool, int]:
    """(any added image with an index entry, any unchanged image, any unchanged one querying with
    rotated rows, the number of query rows)."""
    img, codes, use, idx_use = part
    same, added = changes
    return (bool((added & idx_use.any(axis=1)).any()), bool(same.any()),
            bool((use[:, 1:min(8, use.shape[1])].any(axis=1) & same).any()), int(use.sum()))


def _part_reach_queries(part, changes, rotate: bool, cfg: ScreenConfig) -> list:
    img, codes, use, idx_use = part
    added = changes[1] & idx_use.any(axis=1)
    return _reach_queries(codes, use, idx_use, added, rotate, cfg, img=img)


def _shard_hits(index: HammingIndex, groups: list) -> np.ndarray:
    """Image numbers of `index` within reach of any row of `groups` (`_reach_queries`)."""
    hits = [np.zeros(0, np.int64)]
    k = max(int(index.owner_values.size), 1)
    for queries, owners, limit in groups:
        if len(queries):
            hits.append(index.search(np.ascontiguousarray(queries, np.uint64), owners.astype(np.int64), limit, k)[1])
    return np.unique(np.concatenate(hits))


def _union(*ids: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([np.zeros(0, np.int64), *ids]))


def _added_entries(part, changes) -> tuple[np.ndarray, np.ndarray]:
    """A partition's added images' index entries (rows, owner numbers)."""
    img, codes, use, idx_use = part
    e_img, e_var = np.nonzero(idx_use & changes[1][:, None])
    return codes[e_img, e_var], img[e_img].astype(np.int64)


def _group_owner_reach(cfg: ScreenConfig, n_parts: int, *items) -> list[np.ndarray]:
    """Other hashes: for each of a group of consecutive partitions (`items`: (part, changes) of
    each, then every partition's `_added_entries`), its unchanged images within reach of an
    added image, in their own direction (`reach_pairs` with the group's owners). One index over
    the group's owners, searched once with every added entry: one per partition made the work
    partitions x added (a helper's audit: up to ~5,000 s of CPU at 10M images, 10 % added)."""
    parts, changes = items[:2 * n_parts:2], items[1:2 * n_parts:2]
    added = items[2 * n_parts:]
    W = parts[0][1].shape[2]
    queries = np.concatenate([np.zeros((0, W), np.uint64), *[rows for rows, _ in added]])
    query_img = np.concatenate([np.zeros(0, np.int64), *[owners for _, owners in added]])
    # (the owners' rows only, not the group's whole partitions: a group is ~search_shard_size rows)
    owners = [same & ~(new & p[3].any(axis=1)) for p, (same, new) in zip(parts, changes)]
    img = np.concatenate([p[0][o] for p, o in zip(parts, owners)])
    codes = np.concatenate([p[1][o] for p, o in zip(parts, owners)])
    use = np.concatenate([p[2][o] for p, o in zip(parts, owners)])
    found = _owner_reach(codes, use, np.ones(len(img), bool), queries, query_img, cfg, img=img)
    found = np.unique(found["owner"].to_numpy(np.int64))
    # (each partition's, by its range of image numbers: its images are ascending)
    return [found[np.searchsorted(found, p[0][0]):np.searchsorted(found, p[0][-1], side="right")]
            if len(p[0]) else np.zeros(0, np.int64) for p in parts]


def _part_redo(part, changes, previous: pd.DataFrame, gained_ids: np.ndarray) -> dict:
    """The partition's images whose lists are searched again: added, or unchanged with a
    neighbour gone or changed (`lost`: its row's `nb_same` is False) or one within reach of an
    added image (`gained`: image numbers in `gained_ids`)."""
    img = part[0]
    same, added = changes
    at, inside = _rows_of(img, previous["owner_a"].to_numpy(np.int64))
    inside[inside] = same[at[inside]]
    known = previous["nb_same"].to_numpy(bool)[inside]
    lost = np.zeros(len(img), bool)
    lost[at[inside][~known]] = True
    # (`gained_ids` is sorted, over the whole collection: a binary search per image of the
    # partition, where np.isin hashed every gained id again for each partition: 0.8-1.5 s at 1M)
    gained_ids = np.asarray(gained_ids, dtype=np.int64)
    if gained_ids.size > 1 and (gained_ids[1:] < gained_ids[:-1]).any():  # (every caller sorts them: ~1 ms)
        gained_ids = np.sort(gained_ids)
    gained = _rows_of(gained_ids, img)[1] & same
    return {"redo": added | ((lost | gained) & same), "lost": lost, "gained": gained}


def _redo_queries(part, redo: dict):
    img, codes, use, idx_use = part
    return img, codes, use & redo["redo"][:, None], idx_use


def _part_lists(part, changes, previous: pd.DataFrame, redo: dict, fresh: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The partition's directed rows (kept and re-derived, sorted as `directed_neighbours`) and its counts."""
    img, codes, use, _ = part
    same, added = changes
    at, keep = _rows_of(img, previous["owner_a"].to_numpy(np.int64))
    keep[keep] = same[at[keep]] & ~redo["redo"][at[keep]]
    return _kept_and_fresh(previous[keep], fresh, use[:, PLAIN], same, added, redo["redo"], redo["lost"],
                           redo["gained"])


def sharded_incremental_neighbours(parts: list, previous: list, same: list, cfg: ScreenConfig, client=None,
                                   shard_size: int | None = None, one_shard: bool = False, gather: bool = True):
    """`incremental_neighbours` over hash partitions (or futures of them): `previous[i]` the last
    run's directed rows owned by partition i's images (current image numbers, owner_b -1 when
    gone), each marked `nb_same` when its owner_b is unchanged and takes part (`split_previous`),
    `same[i]` bool per image of partition i (taking part last time with the same hashes).
    Returns (directed rows, counts) as `incremental_neighbours`, or with `gather=False` (and a
    client) one future per partition of (rows, counts). The index is sharded as in
    `sharded_neighbours`; the driver holds futures and a few flags per partition."""
    k = int(cfg.max_candidates)
    run = lambda fn, *args: _run(client, fn, *args)  # noqa: E731
    get = (lambda xs: xs) if client is None else client.gather
    changes = [run(_part_changes, p, s) for p, s in zip(parts, same)]
    flags = get([run(_part_flags, p, c) for p, c in zip(parts, changes)])
    any_added, any_same = any(f[0] for f in flags), any(f[1] for f in flags)
    shards = _Shards(parts, cfg, client, shard_size, one_shard, routed=cfg.search_sharding != "sharded")
    gained = [np.zeros(0, np.int64)] * len(parts)
    if any_added and any_same and cfg.hash == "ahash":
        rotate = any(f[2] for f in flags)
        queries = [run(_part_reach_queries, p, c, rotate, cfg) for p, c in zip(parts, changes)]
        every = run(_union, *[h for j, q in enumerate(queries) for h in shards.probe(_shard_hits, q, j)])
        gained = [every] * len(parts)
    elif any_added and any_same:
        # (each partition's added entries go to every group of partitions, as the main search's
        # queries go to every shard; a group holds about `search_shard_size` query rows)
        entries = [run(_added_entries, p, c) for p, c in zip(parts, changes)]
        groups = shard_groups([f[3] for f in flags], shard_size or cfg.search_shard_size,
                              1 if client is None else len(_worker_addresses(client)))
        for g in groups:
            reach = run(_group_owner_reach, cfg, len(g), *[x for i in g for x in (parts[i], changes[i])], *entries)
            for j, i in enumerate(g):
                gained[i] = run(operator.getitem, reach, j)
    redo = [run(_part_redo, p, c, prev, g) for p, c, prev, g in zip(parts, changes, previous, gained)]
    out = []
    for j, (p, c, prev, r) in enumerate(zip(parts, changes, previous, redo)):
        q = run(_redo_queries, p, r)
        fresh = run(_merge_lists, k, *shards.probe(_search_shard, q, j, cfg))
        out.append(run(_part_lists, p, c, prev, r, fresh))
    if client is not None and not gather:
        return out
    results = get(out)
    directed = (pd.concat([d for d, _ in results], ignore_index=True) if results else _empty_directed())
    stats = {key: sum(st[key] for _, st in results) for key in INCREMENTAL_COUNTS}
    return directed, stats


def split_previous(previous: pd.DataFrame | None, parts: list, same: np.ndarray) -> list[pd.DataFrame]:
    """The last run's directed rows cut by partition: each gets the rows whose owner_a lies
    between its first and last image number (partitions in ascending image order, as
    `hash_partitions` makes them; a row of an image that takes no part is dropped later), with
    `nb_same`: whether its owner_b is unchanged and takes part (`same`, bool over every image
    number), so that no task needs a flag per image of the collection."""
    prev = previous if previous is not None else _empty_directed()
    nb = prev["owner_b"].to_numpy(np.int64)
    known = (nb >= 0) & (nb < len(same))  # (-1: gone)
    known[known] = same[nb[known]]
    prev = prev.assign(nb_same=known)
    owner = prev["owner_a"].to_numpy(np.int64)
    order = np.argsort(owner, kind="stable")
    prev, owner = prev.iloc[order], owner[order]
    out = []
    for img, *_ in parts:
        lo = np.searchsorted(owner, img[0]) if len(img) else 0
        hi = np.searchsorted(owner, img[-1], side="right") if len(img) else 0
        out.append(prev.iloc[lo:hi].reset_index(drop=True))
    return out


def _run_block(index: HammingIndex, block, cfg: ScreenConfig) -> pd.DataFrame:
    queries, owners, variants = block
    return near_pairs_partition(index, queries, owners, cfg, variants)


# --------------------------------------------------------------------------------------------
# high-recall mode: nearest neighbours by embedding cosine (screen.mode = "hash+embedding")
#
# The embeddings are the confirm tier's (L2-normalised MobileNet vectors of every representative
# image, transform 0, key = idx * 8), read from the feature store's Parquet partitions. Only the
# FAISS index lives in the driver: "flat" holds N x d float32 (1280-d: 5 KB per image, 1 GB at
# 200k images) and searches exactly; "ivf" holds N x d float16 (2.5 KB per image) in inverted
# lists and visits `embedding_nprobe` of ~4 sqrt(N) lists per query (training reads a sample of
# at most max(39 nlist, 50k) vectors). Queries are streamed from the partitions again in
# batches, so no N x N matrix and no second N x d copy is ever built. Past
# `screen.embedding_shard_size` embeddings on a cluster the index is sharded instead (section
# "sharded embedding search" below).

_KNN_BATCH = 4096  # query vectors per FAISS search call


def _faiss():
    """Import FAISS with passive OpenMP waiting: its default spin-waiting made the exact search 3x
    slower on a busy 2-core machine (bench/high_recall.py: 8.6 s -> 2.8 s at N = 10k). Only takes
    effect when this process has not started an OpenMP runtime yet; OMP_WAIT_POLICY set by the
    user wins."""
    import os
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss
    return faiss


def _open_part(path: str):
    """A feature-store partition for pyarrow: the local path, or the object's bytes from a store
    (read with the run's storage options, as pipeline/store.py does)."""
    from . import storage
    if storage.is_url(path):
        import io
        return io.BytesIO(storage.read_bytes(path))
    return path


def _embedding_parts(part_paths) -> list[str]:
    """The distinct partition files, in first-seen order (the caller may pass one per image)."""
    return list(dict.fromkeys(p for p in part_paths if isinstance(p, str) and p))


def iter_embeddings(part_paths) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image idx (int64), float32 (n, d) vectors) per feature-store partition, transform-0 keys
    with an embedding only (failed images are skipped), in the order of `part_paths`."""
    import pyarrow.parquet as pq
    for path in _embedding_parts(part_paths):
        table = pq.read_table(_open_part(path), columns=["key", "embedding"])
        keys = table.column("key").to_numpy().astype(np.int64)
        blobs = table.column("embedding").to_pylist()
        ok = [i for i, b in enumerate(blobs) if b is not None and keys[i] % 8 == 0]
        if not ok:
            continue
        # (a view of the Arrow buffer instead of a bytes object per row measured 0.8-1.4x this,
        # depending on the process: not worth its code)
        width = {len(blobs[i]) for i in ok}
        if len(width) > 1:
            raise ValueError(f"{path}: embeddings of different sizes ({sorted(width)[:4]} bytes)")
        if next(iter(width)) % 4:
            raise ValueError(f"{path}: embeddings of {next(iter(width))} bytes, not a whole number of float32 values")
        vecs = np.frombuffer(b"".join(blobs[i] for i in ok), dtype="<f4").reshape(len(ok), -1)
        yield keys[ok] // 8, np.ascontiguousarray(vecs, dtype=np.float32)


def _count_part(path: str) -> int:
    import pyarrow.parquet as pq
    return int(pq.ParquetFile(_open_part(path)).metadata.num_rows)


def _count_rows(part_paths) -> int:
    return sum(_count_part(p) for p in _embedding_parts(part_paths))


def _ivf_nlist(n: int) -> int:
    return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


def _embedding_kind(cfg: ScreenConfig, n_rows: int) -> str:
    """The index kind, "flat" or "ivf", for `n_rows` stored embeddings (all of them, also when
    sharded: "auto" bounds the exact search's total work, N x N, which sharding does not change)."""
    kind = cfg.embedding_index
    if kind == "auto":
        kind = "flat" if n_rows <= cfg.embedding_exact_max else "ivf"
    return kind


def _ivf_plan(n_rows: int) -> tuple[int, int, int]:
    """(nlist, training rows, sampling stride) of an IVF index over `n_rows` stored rows."""
    nlist = _ivf_nlist(max(n_rows, 1))
    n_train = min(n_rows, max(39 * nlist, 50_000))
    return nlist, n_train, max(1, n_rows // max(n_train, 1))


def ivf_sample(part_paths, stride: int) -> np.ndarray:
    """The training sample's vectors in some partition files: the images whose idx is a multiple
    of `stride` (the same rows whichever process reads which file, so one index and the shards
    train on the same sample, in part order)."""
    picked = [vecs[idx % stride == 0] for idx, vecs in iter_embeddings(part_paths)]
    picked = [v for v in picked if len(v)]
    return np.concatenate(picked) if picked else np.zeros((0, 0), np.float32)


def train_ivf(cfg: ScreenConfig, nlist: int, n_train: int, *samples: np.ndarray):
    """An empty, trained IVF index (float16 lists, inner product) from the samples (in order, the
    first n_train rows); None without any vector."""
    faiss = _faiss()
    samples = [x for x in samples if len(x)]
    if not samples:
        return None
    train = np.concatenate(samples)[:n_train]
    nlist = min(nlist, len(train))
    quantizer = faiss.IndexFlatIP(train.shape[1])
    index = faiss.IndexIVFScalarQuantizer(quantizer, train.shape[1], nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234  # deterministic k-means
    index.train(train)
    index.nprobe = int(min(cfg.embedding_nprobe, nlist))
    return index


def _train_ivf_shared(cfg: ScreenConfig, nlist: int, n_train: int, *samples: np.ndarray):
    """train_ivf on a worker -> the index serialised (uint8 array: what the shards start from)."""
    index = train_ivf(cfg, nlist, n_train, *samples)
    return None if index is None else _faiss().serialize_index(index)


def build_embedding_index(part_paths, cfg: ScreenConfig, kind: str | None = None, trained=None):
    """-> (faiss index over the inner product, idx of each index row, kind "flat" | "ivf").
    `kind` (default: from `embedding_index` and the number of stored rows) forces the kind;
    `trained` (ivf: a serialised trained index, `_train_ivf_shared`) is filled instead of training
    one on these files' own sample."""
    faiss = _faiss()
    ids: list[np.ndarray] = []
    index = None
    if trained is not None:
        kind = "ivf"
        index = faiss.deserialize_index(trained)
    else:
        n_rows = _count_rows(part_paths)
        kind = kind or _embedding_kind(cfg, n_rows)
        if kind == "ivf":
            nlist, n_train, stride = _ivf_plan(n_rows)
            index = train_ivf(cfg, nlist, n_train, ivf_sample(part_paths, stride))
            if index is None:
                return None, np.zeros(0, np.int64), kind
    for idx, vecs in iter_embeddings(part_paths):
        if index is None:
            index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        ids.append(idx)
    return index, (np.concatenate(ids) if ids else np.zeros(0, np.int64)), kind


def _empty_embedding_pairs() -> pd.DataFrame:
    return pd.DataFrame({"idx_a": np.zeros(0, np.int64), "idx_b": np.zeros(0, np.int64),
                         "cosine": np.zeros(0, np.float32)})


def _kept_neighbours(q_idx: np.ndarray, sim: np.ndarray, nb: np.ndarray, cfg: ScreenConfig):
    """Rows of k + 1 nearest (best first, nb -1 where none) -> directed (a, b, cosine): the query
    itself dropped, at most k others, those at >= embedding_min_cosine."""
    keep = (nb >= 0) & (nb != q_idx[:, None])
    keep &= np.cumsum(keep, axis=1) <= int(cfg.embedding_k)  # at most k others per query
    keep &= sim >= cfg.embedding_min_cosine
    r, c = np.nonzero(keep)
    return q_idx[r], nb[r, c], sim[r, c].astype(np.float32)


def _pair_rows(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> pd.DataFrame:
    """Directed (a, b, cosine) -> one row per unordered pair with the larger cosine, sorted."""
    if a.size == 0:
        return _empty_embedding_pairs()
    frame = pd.DataFrame({"idx_a": np.minimum(a, b), "idx_b": np.maximum(a, b),
                          "cosine": np.clip(s, -1.0, 1.0)})
    frame = frame.groupby(["idx_a", "idx_b"], sort=True, as_index=False)["cosine"].max()
    return frame.astype({"idx_a": "int64", "idx_b": "int64", "cosine": "float32"})


def embedding_pairs(part_paths, cfg: ScreenConfig, client=None) -> pd.DataFrame:
    """Each embedded image's `embedding_k` nearest other images by cosine, those at
    >= `embedding_min_cosine`: one row per unordered pair, idx_a < idx_b (int64), `cosine`
    (float32, the larger of the two directions' scores), sorted by (idx_a, idx_b). At most
    embedding_k rows per image, so at most N * embedding_k pairs.

    One index in this process, or, with `screen.search_sharding` "sharded" (or "auto" with a Dask
    `client` and more than `screen.embedding_shard_size` stored embeddings), index shards built on
    the workers (`sharded_embedding_pairs`)."""
    mode = cfg.search_sharding
    if mode in ("sharded", "routed") or (mode == "auto" and client is not None):  # (routed: as sharded)
        parts = _embedding_parts(part_paths)
        counts = (client.gather(client.map(_count_part, parts, pure=False)) if client is not None
                  else [_count_part(p) for p in parts])
        if mode != "auto" or sum(counts) > cfg.embedding_shard_size:
            return sharded_embedding_pairs(parts, cfg, client=client, counts=counts)
    index, ids, _ = build_embedding_index(part_paths, cfg)
    if index is None or len(ids) < 2:
        return _empty_embedding_pairs()
    kk = min(int(cfg.embedding_k) + 1, len(ids))  # + 1: the image itself is (nearly always) its own nearest
    qa, qb, qs = [], [], []
    for idx, vecs in iter_embeddings(part_paths):
        for s in range(0, len(idx), _KNN_BATCH):
            q_idx, q = idx[s:s + _KNN_BATCH], vecs[s:s + _KNN_BATCH]
            sim, rows = index.search(q, kk)
            nb = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
            a, b, c = _kept_neighbours(q_idx, sim, nb, cfg)
            qa.append(a)
            qb.append(b)
            qs.append(c)
    if not qa:
        return _empty_embedding_pairs()
    return _pair_rows(np.concatenate(qa), np.concatenate(qb), np.concatenate(qs))


# --------------------------------------------------------------------------------------------
# sharded embedding search: no process holds every embedding
#
# The feature-store partitions (files) are grouped, consecutively, into index shards of about
# `screen.embedding_shard_size` stored rows (`shard_groups`, as for the hash search); each shard's
# FAISS index is built on a worker from its files (flat or IVF as the total number of rows gives,
# see `_embedding_kind`). IVF shards share one coarse quantizer, trained once on a worker from the
# sample one index would take (`ivf_sample`, `_train_ivf_shared`): each partition's queries are
# assigned to their `embedding_nprobe` lists once (`_assign_lists`), and every shard scans only
# its part of those lists (`search_preassigned`), so the work per query does not grow with the
# number of shards and the lists visited are those of one index. Every partition's vectors are
# searched against every shard, in the batches of the one-index search, for their k + 1 best in
# the shard; on a cluster its file is read once for all the shards and a few partitions are in
# flight at a time (`_search_partitions`), in this process once per shard (one shard in
# memory). Per partition the shard lists are merged: the k + 1 best over all shards by (cosine,
# then index row: shard, row in shard), then the same rule as one index (self dropped, at most
# k, >= min cosine). The merge is exact:
# an image among the query's k + 1 best overall is among the k + 1 best of its own shard. With flat
# shards the pairs equal the one-index search's; the only freedom is among exactly equal cosines
# at the k + 1 cut, where FAISS's own order depends on its internal blocking. The driver holds the
# file list, counts, futures and the pair frame (at most N x k rows).


def _build_embedding_shard(paths: list[str], cfg: ScreenConfig, kind: str, threads: int | None = None,
                           trained=None):
    """(index, idx of each row) over some partition files (runs on a worker); `trained`: the
    shared IVF quantizer (serialised), whose lists the shard fills."""
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    index, ids, _ = build_embedding_index(paths, cfg, kind=kind, trained=trained)
    return index, ids


def _read_vectors(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One partition's (idx, vectors) as `iter_embeddings` gives them, read once on a worker for
    every shard's search of it (each search task read the file again: S reads a partition)."""
    return list(iter_embeddings([path]))


def _vectors_of(source) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A partition's (idx, vectors): from its file (a path) or as `_read_vectors` read them."""
    return iter_embeddings([source]) if isinstance(source, str) else iter(source)


def _assign_lists(trained, source, threads: int | None = None):
    """One partition's queries (a path or `_read_vectors`) -> (their nprobe lists, distances to
    those centroids), in the order iter_embeddings gives them: computed once, used by every IVF
    shard."""
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    if trained is None:
        return None
    index = faiss.deserialize_index(trained)
    found = [index.quantizer.search(vecs, index.nprobe) for _, vecs in _vectors_of(source)]
    if not found:
        return None
    return np.concatenate([f[1] for f in found]), np.concatenate([f[0] for f in found])


def _empty_knn(kk: int):
    return (np.zeros(0, np.int64), np.zeros((0, kk), np.float32), np.full((0, kk), -1, np.int64),
            np.zeros((0, kk), np.int64))


def _search_embedding_shard(shard, source, shard_no: int, cfg: ScreenConfig, threads: int | None = None,
                            assigned=None):
    """One partition's vectors (a path or `_read_vectors`) against one shard: (query idx (n,),
    cosine (n, k+1), neighbour idx (n, k+1), -1 where none, order key (n, k+1): shard_no << 40 |
    row in the shard). `assigned`: the queries' IVF lists (`_assign_lists`) when the shards share
    one quantizer."""
    index, ids = shard
    kk = int(cfg.embedding_k) + 1
    found = [_empty_knn(kk)]
    if index is None or len(ids) == 0:
        return found[0]
    if threads:
        _faiss().omp_set_num_threads(threads)
    take = min(kk, len(ids))
    at = 0  # row of the partition's queries (assigned lists are in the same order)
    for idx, vecs in _vectors_of(source):
        for s in range(0, len(idx), _KNN_BATCH):
            q = vecs[s:s + _KNN_BATCH]
            if assigned is None:
                sim, rows = index.search(q, take)
            else:
                lists, dist = assigned[0][at:at + len(q)], assigned[1][at:at + len(q)]
                sim, rows = index.search_preassigned(q, take, lists, dist)
            at += len(q)
            n = len(rows)
            sim_p = np.full((n, kk), -np.inf, np.float32)
            nb = np.full((n, kk), -1, np.int64)
            key = np.zeros((n, kk), np.int64)
            sim_p[:, :take] = np.where(rows >= 0, sim, -np.inf)
            nb[:, :take] = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
            key[:, :take] = (np.int64(shard_no) << 40) | np.maximum(rows, 0)
            found.append((idx[s:s + _KNN_BATCH], sim_p, nb, key))
    return tuple(np.concatenate([f[i] for f in found]) for i in range(4))


def _best_of(kk: int, a, b):
    """Two shard results for the same queries -> the kk best of both by (cosine desc, key).
    (A shard without embeddings answers with no rows at all.)"""
    if len(a[0]) == 0 or len(b[0]) == 0:
        return b if len(a[0]) == 0 else a
    sim = np.concatenate([a[1], b[1]], axis=1)
    nb = np.concatenate([a[2], b[2]], axis=1)
    key = np.concatenate([a[3], b[3]], axis=1)
    key = np.where(nb >= 0, key, np.iinfo(np.int64).max)
    order = np.lexsort((key, -sim), axis=1)[:, :kk]  # -(-inf) sorts the empty slots last
    take = lambda x: np.take_along_axis(x, order, axis=1)  # noqa: E731
    return a[0], take(sim), take(nb), take(key)


def _merge_embedding_lists(cfg: ScreenConfig, *found) -> pd.DataFrame:
    """One partition's per-shard results -> its pairs (one row per unordered pair, larger cosine)."""
    kk = int(cfg.embedding_k) + 1
    best = found[0]
    for more in found[1:]:
        best = _best_of(kk, best, more)
    if len(best[0]) == 0:
        return _empty_embedding_pairs()
    return _pair_rows(*_kept_neighbours(best[0], best[1], best[2], cfg))


def _search_partitions(client, parts: list[str], shards: list, cfg: ScreenConfig, trained, window: int) -> list:
    """Each partition's pairs over every shard, on the workers: its file read once (`_read_vectors`),
    its IVF lists assigned once, each shard searched with them, the shard lists merged. At most
    `window` partitions at a time, each let go of as its merge ends, so the workers hold a few
    partitions' vectors and lists, not every image's (~5 kB and ~0.4 kB an image)."""
    from distributed import as_completed

    def submit(p: int):
        vectors = client.submit(_read_vectors, parts[p], pure=False)
        lists = None if trained is None else client.submit(_assign_lists, trained, vectors, 1, pure=False)
        searches = [client.submit(_search_embedding_shard, shard, vectors, s, cfg, 1, lists, pure=False)
                    for s, shard in enumerate(shards)]
        return client.submit(_merge_embedding_lists, cfg, *searches, pure=False)

    frames: list = [None] * len(parts)
    todo = iter(range(len(parts)))
    partition_of = {}
    first = []
    for p in itertools.islice(todo, max(1, window)):
        first.append(submit(p))
        partition_of[first[-1].key] = p
    if not first:
        return frames
    running = as_completed(first, loop=client.loop)  # (the run's client need not be the default one)
    del first
    for merged in running:
        frames[partition_of.pop(merged.key)] = merged.result()
        p = next(todo, None)
        if p is not None:
            merged = submit(p)
            partition_of[merged.key] = p
            running.add(merged)
    return frames


def sharded_embedding_pairs(part_paths, cfg: ScreenConfig, client=None, shard_size: int | None = None,
                            counts: list[int] | None = None) -> pd.DataFrame:
    """`embedding_pairs` with the index sharded (see the section comment): on the `client`'s
    workers, or without one shard after shard in this process. `counts`: stored rows per distinct
    partition file (read from the files' metadata when not given)."""
    parts = _embedding_parts(part_paths)
    shard_size = int(shard_size or cfg.embedding_shard_size)
    if counts is None:
        counts = (client.gather(client.map(_count_part, parts, pure=False)) if client is not None
                  else [_count_part(p) for p in parts])
    kind = _embedding_kind(cfg, sum(counts))
    nlist, n_train, stride = _ivf_plan(sum(counts))
    if client is None:
        groups = shard_groups(counts, shard_size)
        trained = (_train_ivf_shared(cfg, nlist, n_train, *[ivf_sample([p], stride) for p in parts])
                   if kind == "ivf" else None)
        # each partition's lists assigned once, for every shard (as on a cluster)
        assigned = [_assign_lists(trained, path) for path in parts] if trained is not None else [None] * len(parts)
        best: list = [None] * len(parts)
        for s, g in enumerate(groups):  # one shard in memory at a time
            shard = _build_embedding_shard([parts[i] for i in g], cfg, kind, trained=trained)
            for p, path in enumerate(parts):
                got = _search_embedding_shard(shard, path, s, cfg, assigned=assigned[p])
                best[p] = got if best[p] is None else _best_of(int(cfg.embedding_k) + 1, best[p], got)
            del shard
        frames = [_merge_embedding_lists(cfg, b) for b in best if b is not None]
    else:
        workers = _worker_addresses(client)
        groups = shard_groups(counts, shard_size, len(workers))
        trained = None
        if kind == "ivf":  # one quantizer for every shard, trained on a worker (the sample never
            # comes to the driver)
            samples = [client.submit(ivf_sample, [p], stride, pure=False) for p in parts]
            trained = client.submit(_train_ivf_shared, cfg, nlist, n_train, *samples, pure=False)
            del samples
        # one shard per worker in turn (the search tasks follow their index); FAISS on one thread
        # per task, as the worker's threads already run tasks side by side
        shards = [client.submit(_build_embedding_shard, [parts[i] for i in g], cfg, kind, 1, trained, pure=False,
                                workers=[workers[j % len(workers)]], allow_other_workers=True)
                  for j, g in enumerate(groups)]
        frames = _search_partitions(client, parts, shards, cfg, trained, window=2 * len(workers)) if shards else []
        del shards, trained
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty_embedding_pairs()
    out = pd.concat(frames, ignore_index=True)
    out = out.groupby(["idx_a", "idx_b"], sort=True, as_index=False)["cosine"].max()
    return out.astype({"idx_a": "int64", "idx_b": "int64", "cosine": "float32"})


def pair_hash_distance(codes: np.ndarray, variant_mask: np.ndarray, cfg: ScreenConfig,
                       idx_a: np.ndarray, idx_b: np.ndarray,
                       representatives: np.ndarray | None = None, client=None) -> np.ndarray:
    """The hash distance `near_pairs` would report for given pairs (smallest over the screen's
    query variants against the index variants, both directions), int16 (on the workers with a
    Dask `client`: `pair_best`)."""
    codes, use, idx_use = _prepare(codes, variant_mask, cfg, representatives)
    a = np.asarray(idx_a, dtype=np.int64)
    b = np.asarray(idx_b, dtype=np.int64)
    if a.size == 0:
        return np.zeros(0, np.int16)
    dist, _ = pair_best(codes, use, idx_use, a, b, client=client)
    return dist


def union_pairs(hash_pairs: pd.DataFrame, emb_pairs: pd.DataFrame, codes: np.ndarray,
                variant_mask: np.ndarray, cfg: ScreenConfig,
                representatives: np.ndarray | None = None, client=None) -> pd.DataFrame:
    """Hash candidates plus embedding neighbours. A pair found by both keeps its hash row; a pair
    only found by embedding gets the smallest hash distance over the screen's variants and
    transform 0 (the embeddings compared are the untransformed images; the confirm tier embeds
    it so), and the verify tier checks it both ways round (`verify.checked_transforms`: its
    hash says nothing of a mirror). Adds `source` ("hash", "embedding", "both") and
    `embedding_cosine` (NaN for hash-only pairs); sorted by (idx_a, idx_b)."""
    N = max(int(np.asarray(codes).shape[0]), 1)
    hk = hash_pairs["idx_a"].to_numpy(np.int64) * N + hash_pairs["idx_b"].to_numpy(np.int64)
    ek = emb_pairs["idx_a"].to_numpy(np.int64) * N + emb_pairs["idx_b"].to_numpy(np.int64)
    in_hash = np.isin(ek, hk)
    out_hash = hash_pairs.copy()
    cos_of = pd.Series(emb_pairs["cosine"].to_numpy(np.float32), index=ek)
    out_hash["source"] = np.where(np.isin(hk, ek), "both", "hash")
    out_hash["embedding_cosine"] = cos_of.reindex(hk).to_numpy(np.float32)
    only = emb_pairs[~in_hash]
    a, b = only["idx_a"].to_numpy(np.int64), only["idx_b"].to_numpy(np.int64)
    extra = pd.DataFrame({"idx_a": a, "idx_b": b,
                          "hash_distance": pair_hash_distance(codes, variant_mask, cfg, a, b, representatives,
                                                              client=client),
                          "transform": np.zeros(a.size, np.int8), "source": "embedding",
                          "embedding_cosine": only["cosine"].to_numpy(np.float32)})
    out = pd.concat([out_hash, extra], ignore_index=True)
    out = out.sort_values(["idx_a", "idx_b"], kind="stable").reset_index(drop=True)
    return out.astype({"idx_a": "int64", "idx_b": "int64", "hash_distance": "int16", "transform": "int8",
                       "embedding_cosine": "float32"})
