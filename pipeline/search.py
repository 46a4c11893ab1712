"""Hamming-distance search over packed binary hashes: brute force and multi-index hashing.

Hashes are packed as uint64 arrays of shape (M, W) (W = bits / 64; a 64-bit aHash has W = 1).
Each index entry has an *owner* (an image id); one image may own several entries (its plain and
its border-trimmed hash) and may query with several rows (its dihedral variants). Every backend
answers the same question, deterministically and identically:

    for each distinct query owner o (its query rows contiguous in `queries`), the <= k distinct
    index owners p != o with the smallest d(o, p) = min Hamming distance over (o's query rows x
    p's index entries), keeping d <= max_distance, ties broken by p ascending.

`search` returns four arrays (owner_a = o, owner_b = p, dist int32, query_row = the lowest row of
`queries` achieving the minimum), ordered by query owner (in order of first appearance), then
distance, then p.

Backends
--------
* `BruteForceIndex` — the reference: popcount of every query row against every index entry.
  O(Q x M); fine up to ~1e5 entries.
* `MultiIndexHash` — multi-index hashing (Norouzi et al.): the bits are dealt into m chunks (each
  word's bit i to chunk i mod m, or along diagonals of the image where that would take columns;
  not runs of neighbouring bits: `interleave`); by the
  pigeonhole principle, if d(q, c) <= T then some chunk i has chunk distance <= r_i whenever
  sum_i (r_i + 1) >= T + 1 (so r_i = floor(T/m) or one less). For each chunk the query enumerates
  every flip mask of <= r_i bits and looks the flipped value up in a CSR table (entries sorted by
  chunk value, the full codes of each chunk's order stored contiguously so the verification scan
  is sequential); a neighbour is counted only at the first chunk where it qualifies. m is picked by
  a small cost model over the number of distinct codes and the expected threshold.

Hubs. Identical codes are collapsed before searching (the index works on distinct codes, each
with a sorted list of owners). For one (query row, distinct code) at most the first k owners
(other than the query owner) can enter the query's top-k (any later owner is beaten by k smaller
owners at the same or a smaller distance), so only those are visited: a hub of n images sharing
one hash costs O(n x k), not O(n^2). What remains quadratic: a cluster of n *distinct* codes all
within T of one another (e.g. n blank images with a few bits of noise each) still makes each of
its members enumerate and verify all n codes (O(n^2) popcounts, output still capped at k per
image). The kernels (`pipeline/hamming.py`) are single-threaded numba functions that release the
GIL; parallelism comes from running blocks of queries in separate Dask tasks.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["HammingIndex", "BruteForceIndex", "MultiIndexHash", "ChunkSlice", "SliceGroup", "make_index", "pack_hex",
           "unpack_hex", "hamming", "interleave", "chunk_values", "chunk_of", "BACKENDS"]


# --------------------------------------------------------------------------------------------
# helpers


def _as_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes must have shape (M, W) with W >= 1, got {codes.shape}")
    return np.ascontiguousarray(codes, dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of two (n, W) uint64 arrays (int32)."""
    a, b = _as_codes(a), _as_codes(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    from pipeline import hamming as kernels
    return kernels.pair_distance(a, b)


def pack_hex(hex_strings) -> np.ndarray:
    """Hex strings (imagehash `str(h)`, bits row-major, big-endian) -> (N, W) uint64.

    Every string must have the same length, a multiple of 16 hex digits (64 bits). None or ""
    gives an all-zero row (mark such rows invalid in the caller's mask).
    """
    items = list(hex_strings)
    lengths = {len(s) for s in items if s}
    if len(lengths) > 1:
        raise ValueError(f"hex strings of different lengths: {sorted(lengths)}")
    n_hex = lengths.pop() if lengths else 16
    if n_hex % 16:
        raise ValueError(f"hash of {n_hex * 4} bits is not a multiple of 64 bits")
    W = n_hex // 16
    out = np.zeros((len(items), W), np.uint64)
    for i, s in enumerate(items):
        if s:
            for w in range(W):
                out[i, w] = int(s[16 * w:16 * (w + 1)], 16)
    return out


def unpack_hex(codes: np.ndarray) -> list[str]:
    """Inverse of pack_hex."""
    codes = _as_codes(codes)
    return ["".join(f"{int(x):016x}" for x in row) for row in codes]


def _groups(query_owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs of equal owners -> (starts with the end appended, owner of each run)."""
    q = np.asarray(query_owners, dtype=np.int64)
    if q.size == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    cut = np.flatnonzero(q[1:] != q[:-1]) + 1
    starts = np.concatenate([[0], cut, [q.size]]).astype(np.int64)
    gowner = q[starts[:-1]]
    # (ascending owners are distinct; checking that is far cheaper than counting distinct ones)
    if not np.all(gowner[1:] > gowner[:-1]) and np.unique(gowner).size != gowner.size:
        raise ValueError("the query rows of one owner must be contiguous in `queries`")
    return starts, gowner


class _Base:
    """Shared bookkeeping: owner ids are mapped to dense ids 0..P-1 (order preserved)."""

    def __init__(self, codes: np.ndarray, owners: np.ndarray):
        self.codes = _as_codes(codes)
        owners = np.asarray(owners, dtype=np.int64)
        if owners.shape != (self.codes.shape[0],):
            raise ValueError(f"owners must have shape ({self.codes.shape[0]},), got {owners.shape}")
        self.owner_values, self.owner_dense = np.unique(owners, return_inverse=True)
        self.owner_dense = self.owner_dense.astype(np.int64).reshape(-1)
        self.W = self.codes.shape[1]
        self.n_entries = self.codes.shape[0]

    def _prepare(self, queries, query_owners, max_distance, k, encoded: bool = False):
        queries = _as_codes(queries) if np.asarray(queries).size else np.zeros((0, self.W), np.uint64)
        if queries.shape[1] != self.W:
            raise ValueError(f"queries have {queries.shape[1]} words, the index {self.W}")
        if not encoded:
            queries = self._encode(queries)
        query_owners = np.asarray(query_owners, dtype=np.int64)
        if query_owners.shape != (queries.shape[0],):
            raise ValueError("query_owners must have one entry per query row")
        if k < 1:
            raise ValueError("k must be >= 1")
        if max_distance < 0:
            raise ValueError("max_distance must be >= 0")
        starts, gowner = _groups(query_owners)
        # dense id of each query owner; owners absent from the index get -1 (never equal to p)
        pos = np.searchsorted(self.owner_values, gowner)
        pos_c = np.minimum(pos, max(self.owner_values.size - 1, 0))
        if self.owner_values.size:
            present = self.owner_values[pos_c] == gowner
        else:
            present = np.zeros(gowner.size, bool)
        gdense = np.where(present, pos_c, -1).astype(np.int64)
        return queries, starts, gowner, gdense

    def _encode(self, codes: np.ndarray) -> np.ndarray:
        """Codes in the order of bits the index stores them in (the multi-indexes: `interleave`)."""
        return codes

    def _empty(self):
        z = np.zeros(0, np.int64)
        return z, z.copy(), np.zeros(0, np.int32), z.copy()


class BruteForceIndex(_Base):
    """Reference backend: every query row against every index entry (numba popcount)."""

    name = "brute"

    def __init__(self, codes: np.ndarray, owners: np.ndarray, **_ignored):
        super().__init__(codes, owners)

    def search(self, queries, query_owners, max_distance: int, k: int):
        from pipeline import hamming as kernels  # (numba: imported where a search runs)
        return _search_groups(self, queries, query_owners, max_distance, k,
                              lambda q, st, gd, T, kk, n: kernels.brute_search(
                                  q, st, gd, T, kk, n, self.codes, self.owner_dense))


def _search_groups(index: _Base, queries, query_owners, max_distance, k, run, encoded: bool = False):
    queries, starts, gowner, gdense = index._prepare(queries, query_owners, max_distance, k, encoded)
    G = gowner.size
    if G == 0 or index.n_entries == 0:
        return index._empty()
    n_owner = max(int(index.owner_values.size), 1)
    T = int(max_distance)
    # Owners absent from the index get a private dense id beyond the index's range, so that the
    # kernels can tell groups apart; they never match p (p < n_owner).
    absent = gdense < 0
    gd = gdense.copy()
    gd[absent] = n_owner + np.arange(int(absent.sum()), dtype=np.int64)
    a, b, d, r = run(queries, starts, gd, T, int(k), n_owner)
    owner_a = np.empty(a.size, np.int64)
    inside = a < n_owner
    owner_a[inside] = index.owner_values[a[inside]]
    if (~inside).any():
        owner_a[~inside] = gowner[absent][a[~inside] - n_owner]
    owner_b = index.owner_values[b] if b.size else np.zeros(0, np.int64)
    return owner_a, owner_b.astype(np.int64), d.astype(np.int32), r.astype(np.int64)


# --------------------------------------------------------------------------------------------
# multi-index hashing


@lru_cache(maxsize=256)
def _flip_masks(bits: int, r: int) -> np.ndarray:
    """All masks of <= r set bits within `bits` bits, by popcount then value."""
    if r < 0:
        return np.zeros(0, np.uint64)
    out = []
    for j in range(min(r, bits) + 1):
        level = []
        for combo in itertools.combinations(range(bits), j):
            v = 0
            for c in combo:
                v |= 1 << c
            level.append(v)
        out.extend(sorted(level))
    return np.array(out, dtype=np.uint64)


def _n_masks(bits: int, r: int) -> int:
    return sum(math.comb(bits, j) for j in range(min(r, bits) + 1)) if r >= 0 else 0


def _chunk_lengths(c: int) -> list[int]:
    base, extra = divmod(64, c)
    return [base + 1] * extra + [base] * (c - extra)


def _radii(lengths: list[int], T: int) -> list[int]:
    """Per-chunk radii r_i with sum(r_i + 1) = T + 1 (pigeonhole); larger radii on shorter chunks."""
    m = len(lengths)
    base, rem = divmod(T + 1, m)
    order = sorted(range(m), key=lambda i: (lengths[i], i))
    r = [base - 1] * m
    for i in order[:rem]:
        r[i] = base
    return r


# cost model constants (relative to one sequential code verification)
_PROBE_COST = 4.0  # a bucket lookup: random access into the offsets table
_TABLE_COST = 0.5  # building/holding one offsets-table slot, per query row amortised below
_MAX_CHUNK_BITS = 22


def plan_chunks(n_codes: int, W: int, max_distance: int, n_queries: int | None = None) -> dict:
    """Pick chunks per 64-bit word for MIH by estimated cost (per-query probes + verifications,
    plus the offsets tables). Returns {'chunks_per_word', 'lengths', 'cost_per_query', ...}."""
    U = max(int(n_codes), 1)
    Q = max(int(n_queries if n_queries is not None else n_codes), 1)
    best = None
    for c in range(math.ceil(64 / _MAX_CHUNK_BITS), 17):
        lengths = _chunk_lengths(c) * W
        radii = _radii(lengths, max_distance)
        per_query = sum(_n_masks(b, r) * (_PROBE_COST + U / 2.0 ** b) for b, r in zip(lengths, radii))
        build = _TABLE_COST * sum(2.0 ** b for b in lengths) + U * len(lengths) * 2.0
        total = Q * per_query + build
        if best is None or total < best["total"]:
            best = {"chunks_per_word": c, "lengths": lengths, "radii": radii,
                    "cost_per_query": per_query, "total": total,
                    "probes": sum(_n_masks(b, r) for b, r in zip(lengths, radii))}
    return best


def _chunk_key(i: int, c: int) -> int:
    """The chunk a word's bit i is dealt to (before chunk sizes are evened out): in turn (i mod c),
    which steps across a row of 8 pixels and down the rows; when c shares a factor of 4 or 8 with
    the row of 8, bits c apart are one column, so each row then starts one chunk further on
    (diagonals)."""
    return (i + (i // 8 if math.gcd(c, 8) >= 4 else 0)) % c


@lru_cache(maxsize=32)
def _interleave_tables(chunks_per_word: int) -> np.ndarray:
    """(8, 256) uint64: byte k's value -> its bits at their interleaved places (see `interleave`)."""
    c = int(chunks_per_word)
    order = sorted(range(64), key=lambda i: (_chunk_key(i, c), i))  # the word's bits in their new order
    dest = [0] * 64
    for place, i in enumerate(order):
        dest[i] = place
    tables = np.zeros((8, 256), np.uint64)
    for k in range(8):
        for v in range(256):
            tables[k, v] = sum(1 << dest[8 * k + t] for t in range(8) if v >> t & 1)
    return tables


def interleave(codes: np.ndarray, chunks_per_word: int) -> np.ndarray:
    """Each word's bits reordered so that each chunk of `chunk_geometry(chunks_per_word, W)` takes
    bits from across the image (`_chunk_key`: chunk j holds the word's bits j, j + c, j + 2c, ...,
    or diagonals when those would be columns) instead of a run of neighbours. A permutation of
    bit places keeps every Hamming distance, so a multi-index is exact over either order; but an
    aHash's neighbouring bits are neighbouring pixels, and a uniform band of an image (sky, a white
    background) makes a run of them alike in many images: on the 100k scale folder's codes, runs
    of 21-22 bits put 30x the verifications of uniformly random codes on each query, bits taken
    across the image 7x (docs/design-notes.md, "Chunks across the image")."""
    x = _as_codes(codes)
    tables = _interleave_tables(int(chunks_per_word))
    out = np.empty_like(x)
    for s in range(0, x.shape[0], 1 << 18):  # (in blocks: its temporaries stay small beside a large index)
        block = x[s:s + (1 << 18)]
        part = tables[0][(block & np.uint64(255)).astype(np.intp)]
        for k in range(1, 8):
            part |= tables[k][((block >> np.uint64(8 * k)) & np.uint64(255)).astype(np.intp)]
        out[s:s + (1 << 18)] = part
    return out


def chunk_geometry(chunks_per_word: int, W: int) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """MIH chunks of `chunks_per_word` per 64-bit word: (lengths, word of each chunk, its shift
    within the word, its value mask), over codes as `interleave` orders their bits."""
    lengths = _chunk_lengths(chunks_per_word)
    shifts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return (lengths * W, np.repeat(np.arange(W, dtype=np.int64), chunks_per_word), np.tile(shifts, W),
            np.array([(1 << b) - 1 for b in lengths * W], dtype=np.uint64))


def _distinct_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct codes (U, W), each entry's row in them)."""
    W = codes.shape[1]
    if not codes.shape[0]:
        return np.zeros((0, W), np.uint64), np.zeros(0, np.int64)
    if W == 1:
        ucodes, inv = np.unique(codes[:, 0], return_inverse=True)
        ucodes = ucodes[:, None]
    else:
        view = codes.view(np.dtype((np.void, 8 * W))).reshape(-1)
        _, first, inv = np.unique(view, return_index=True, return_inverse=True)
        ucodes = codes[first]
    return np.ascontiguousarray(ucodes, dtype=np.uint64), inv.reshape(-1).astype(np.int64)


def _owner_lists(inv: np.ndarray, owner_dense: np.ndarray, U: int, n_owners: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of each distinct code's owners, ascending, each (code, owner) once: (optr, olist)."""
    n_own = max(n_owners, 1)
    pair = np.unique(inv * n_own + owner_dense)
    pu, po = pair // n_own, pair % n_own
    optr = np.zeros(U + 1, np.int64)
    np.cumsum(np.bincount(pu, minlength=U), out=optr[1:])
    return optr, po.astype(np.int64)


class MultiIndexHash(_Base):
    """Multi-index hashing over the distinct codes (see the module docstring).

    `max_distance` is the threshold the chunking is planned for (searching with another threshold
    is still exact; only the speed changes). `chunks_per_word` overrides the cost model.
    `contiguous` (default: when the copies take <= 1 GiB) stores each chunk's codes in that chunk's
    order, so verification reads memory sequentially.
    """

    name = "mih"

    def __init__(self, codes: np.ndarray, owners: np.ndarray, max_distance: int = 10,
                 chunks_per_word: int | None = None, contiguous: bool | None = None):
        super().__init__(codes, owners)
        W = self.W
        # distinct codes and their owners (CSR, owners ascending, each (code, owner) once)
        ucodes, inv = _distinct_codes(self.codes)
        U = ucodes.shape[0]
        self.optr, self.olist = _owner_lists(inv, self.owner_dense, U, int(self.owner_values.size))
        self.plan = plan_chunks(U, W, int(max_distance))
        c = int(chunks_per_word or self.plan["chunks_per_word"])
        lengths = _chunk_lengths(c)
        if max(lengths) > 30:
            raise ValueError("chunks_per_word must be >= 3 (chunks of <= 22 bits)")
        self.chunks_per_word = c
        self.ucodes = interleave(ucodes, c)  # (queries too: `_encode`)
        self.lengths, self.cword, self.cshift, self.cmask = chunk_geometry(c, W)
        m = len(self.lengths)
        bmax = max(lengths)
        off_dtype = np.int32 if U < 2**31 - 1 else np.int64
        if contiguous is None:
            contiguous = m * U * W * 8 <= 1 << 30
        self.contiguous = bool(contiguous)
        self.coff = np.zeros((m, (1 << bmax) + 1), off_dtype)
        self.cids = np.empty((m, U), np.int32 if U < 2**31 - 1 else np.int64)
        self.ccodes = np.empty((m, U, W) if self.contiguous else (1, U, W), np.uint64)
        if not self.contiguous:
            self.ccodes[0] = self.ucodes
        for ci in range(m):
            vals = (self.ucodes[:, self.cword[ci]] >> np.uint64(self.cshift[ci])) & self.cmask[ci]
            order = np.argsort(vals, kind="stable")
            self.cids[ci] = order
            counts = np.bincount(vals[order].astype(np.int64), minlength=1 << bmax)
            np.cumsum(counts, out=self.coff[ci, 1:])
            if self.contiguous:
                self.ccodes[ci] = self.ucodes[order]
        # the raw entries are not needed any more (keeps the broadcast index small)
        self.codes = np.zeros((0, W), np.uint64)
        self.owner_dense = np.zeros(0, np.int64)

    @property
    def n_codes(self) -> int:
        return self.ucodes.shape[0]

    def _encode(self, codes: np.ndarray) -> np.ndarray:
        return interleave(codes, self.chunks_per_word)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.owner_values, self.owner_dense, self.ucodes,
                                      self.optr, self.olist, self.coff, self.cids, self.ccodes))

    def search(self, queries, query_owners, max_distance: int, k: int):
        from pipeline import hamming as kernels  # (numba: imported where a search runs)
        T = int(max_distance)
        radii = _radii(self.lengths, T)
        probes = sum(_n_masks(b, r) for b, r in zip(self.lengths, radii))
        U = self.n_codes
        per_query = sum(_n_masks(b, r) * (_PROBE_COST + U / 2.0 ** b)
                        for b, r in zip(self.lengths, radii))
        if per_query >= U or probes > 200_000:
            # the threshold is too large for this chunking: a linear scan is cheaper
            return _search_groups(self, queries, query_owners, T, k,
                                  lambda q, st, gd, T_, kk, n: kernels.scan_unique_search(
                                      q, st, gd, T_, kk, n, self.ucodes, self.optr, self.olist))
        m = len(self.lengths)
        nflips = np.array([_n_masks(b, r) for b, r in zip(self.lengths, radii)], dtype=np.int64)
        flips = np.zeros((m, max(int(nflips.max()), 1)), np.uint64)
        for ci, (b, r) in enumerate(zip(self.lengths, radii)):
            f = _flip_masks(b, r)
            flips[ci, :f.size] = f
        cr = np.array(radii, dtype=np.int64)
        return _search_groups(self, queries, query_owners, T, k,
                              lambda q, st, gd, T_, kk, n: kernels.mih_search(
                                  q, st, gd, T_, kk, n, self.cword, self.cshift, self.cmask, cr,
                                  flips, nflips, self.ccodes, self.cids, self.coff,
                                  self.contiguous, self.optr, self.olist))


# --------------------------------------------------------------------------------------------
# one chunk's table, one value range of it: the pieces of a multi-index spread over workers


def chunk_values(codes: np.ndarray, chunks_per_word: int, ci: int) -> np.ndarray:
    """Chunk `ci`'s value of each code (N, W) under `chunk_geometry(chunks_per_word, W)` (its bits
    taken across the word: `interleave`)."""
    return chunk_of(interleave(codes, chunks_per_word), chunks_per_word, ci)


def chunk_of(interleaved: np.ndarray, chunks_per_word: int, ci: int) -> np.ndarray:
    """Chunk `ci`'s value of codes already interleaved (one `interleave` for all chunks)."""
    interleaved = _as_codes(interleaved)
    lengths, cword, cshift, cmask = chunk_geometry(chunks_per_word, interleaved.shape[1])
    return (interleaved[:, cword[ci]] >> np.uint64(cshift[ci])) & cmask[ci]


class ChunkSlice(_Base):
    """The part of a multi-index (`chunks_per_word` chunks per word, as planned for the whole
    collection) that one worker holds: chunk `ci`'s table over the entries whose chunk value
    starts with the `prefix_bits` bits `prefix`. Every entry lies in one slice of each chunk.

    A search probes only the flip masks that land in this slice: a query row whose chunk value's
    first bits differ from `prefix` in j bits probes the flips of the remaining bits within r - j
    (none when j > r, the chunk's radius), so over all slices of a chunk each probe is made
    once, as in one index. A code within the threshold is kept only in the slice of the first
    chunk where it qualifies (as `MultiIndexHash` counts it once), so each (query row, code)
    lands in exactly one slice; each query owner's top k per slice, merged over the slices by
    the smallest distance per pair and cut to k, is one index's (owner, neighbour, distance)
    lists (query_row may differ on ties across slices; the callers drop it) (an owner in the global
    top k has its true distance in the slice holding its closest entry, and all that beat it
    there beat it globally)."""

    name = "slice"

    def __init__(self, codes: np.ndarray, owners: np.ndarray, chunks_per_word: int, ci: int,
                 prefix: int, prefix_bits: int):
        super().__init__(codes, owners)
        W = self.W
        self.lengths, self.cword, self.cshift, self.cmask = chunk_geometry(chunks_per_word, W)
        self.ci, self.prefix, self.prefix_bits = int(ci), int(prefix), int(prefix_bits)
        self.low_bits = self.lengths[self.ci] - self.prefix_bits
        if self.low_bits < 0:
            raise ValueError(f"a prefix of {prefix_bits} bits is longer than chunk {ci} ({self.lengths[ci]} bits)")
        ucodes, inv = _distinct_codes(self.codes)
        U = ucodes.shape[0]
        self.chunks_per_word = int(chunks_per_word)
        ucodes = interleave(ucodes, self.chunks_per_word)  # (queries too: `_encode`)
        vals = chunk_of(ucodes, self.chunks_per_word, self.ci)
        if U and np.any((vals >> np.uint64(self.low_bits)) != np.uint64(self.prefix)):
            raise ValueError("every entry of a slice must carry its prefix")
        low = (vals & np.uint64((1 << self.low_bits) - 1)).astype(np.int64)
        order = np.argsort(low, kind="stable")
        # the distinct codes numbered in the table's order: a bucket's positions are the codes' ids
        # (no id array, and no second copy of the codes as a multi-index keeps)
        rank = np.empty(U, np.int64)
        rank[order] = np.arange(U)
        self.ccodes = np.ascontiguousarray(ucodes[order])
        self.optr, self.olist = _owner_lists(rank[inv], self.owner_dense, U, int(self.owner_values.size))
        self.coff = np.zeros((1 << self.low_bits) + 1, np.int32 if U < 2**31 - 1 else np.int64)
        np.cumsum(np.bincount(low, minlength=1 << self.low_bits), out=self.coff[1:])
        self.codes = np.zeros((0, W), np.uint64)
        self.owner_dense = np.zeros(0, np.int64)

    @property
    def n_codes(self) -> int:
        return self.ccodes.shape[0]

    def _encode(self, codes: np.ndarray) -> np.ndarray:
        return interleave(codes, self.chunks_per_word)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.owner_values, self.optr, self.olist, self.coff, self.ccodes))

    def search(self, queries, query_owners, max_distance: int, k: int, encoded: bool = False):
        """(`encoded`: the queries are interleaved already, as `SliceGroup` does once for its slices.)"""
        from pipeline import hamming as kernels  # (numba: imported where a search runs)
        T = int(max_distance)
        radii = _radii(self.lengths, T)
        r = radii[self.ci]
        if r < 0 or self.n_codes == 0:
            return self._empty()
        flips = _flip_masks(self.low_bits, r)
        n_flips = np.array([_n_masks(self.low_bits, j) for j in range(r + 1)], dtype=np.int64)
        return _search_groups(self, queries, query_owners, T, k,
                              lambda q, st, gd, T_, kk, n: kernels.slice_search(
                                  q, st, gd, T_, kk, n, self.ci, self.prefix, self.low_bits, self.cword,
                                  self.cshift, self.cmask, np.array(radii, dtype=np.int64), flips, n_flips,
                                  self.ccodes, self.coff, self.optr, self.olist), encoded)


class SliceGroup:
    """Several `ChunkSlice`s that one worker holds, searched as one index: each slice's lists
    merged by the smallest distance per pair (the lowest query row among equals), each query
    owner's first k by distance then owner (the owners in the order of the queries), as the
    merge over all slices gives (see `ChunkSlice`)."""

    name = "slices"

    def __init__(self, slices: list[ChunkSlice]):
        self.slices = list(slices)
        self.owner_values = (np.unique(np.concatenate([s.owner_values for s in self.slices]))
                             if self.slices else np.zeros(0, np.int64))

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.slices)

    def search(self, queries, query_owners, max_distance: int, k: int):
        # (the slices of one plan share their order of bits: the queries interleaved once)
        cpw = {s.chunks_per_word for s in self.slices}
        if len(cpw) == 1 and np.asarray(queries).size:
            queries = interleave(queries, cpw.pop())
            found = [s.search(queries, query_owners, max_distance, k, encoded=True) for s in self.slices]
        else:
            found = [s.search(queries, query_owners, max_distance, k) for s in self.slices]
        a, b, d, r = (np.concatenate([f[i] for f in found]) if found else np.zeros(0, np.int64) for i in range(4))
        if a.size == 0:
            return a.astype(np.int64), b.astype(np.int64), d.astype(np.int32), r.astype(np.int64)
        _, gowner = _groups(query_owners)
        by_owner = np.argsort(gowner, kind="stable")
        rank = by_owner[np.searchsorted(gowner, a, sorter=by_owner)]  # each row's owner: its place in the queries
        order = np.lexsort((r, b, d, rank))
        a, b, d, r, rank = a[order], b[order], d[order], r[order], rank[order]
        # each (owner, neighbour) at its smallest distance (np.unique's first occurrence in this order)
        _, first = np.unique(rank * np.int64(2**32) + np.searchsorted(self.owner_values, b), return_index=True)
        first.sort()  # (still by owner, distance, neighbour)
        a, b, d, r, rank = a[first], b[first], d[first], r[first], rank[first]
        starts = np.r_[0, np.flatnonzero(rank[1:] != rank[:-1]) + 1]
        place = np.arange(a.size) - np.repeat(starts, np.diff(np.r_[starts, a.size]))  # within its owner's run
        keep = place < k
        return a[keep], b[keep], d[keep].astype(np.int32), r[keep]


# --------------------------------------------------------------------------------------------
# interface and factory


@runtime_checkable
class HammingIndex(Protocol):
    owner_values: np.ndarray  # the distinct owners of the entries, ascending

    def search(self, queries: np.ndarray, query_owners: np.ndarray, max_distance: int, k: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


BACKENDS = {"brute": BruteForceIndex, "mih": MultiIndexHash}


def make_index(codes: np.ndarray, owners: np.ndarray, backend: str = "mih", **options) -> HammingIndex:
    """Build a Hamming index. `backend`: "mih" (multi-index hashing) or "brute" (reference).

    Options: `max_distance` (the threshold MIH plans its chunking for), `chunks_per_word`,
    `contiguous` (MIH only; ignored by brute force).
    """
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    return cls(codes, owners, **options)
