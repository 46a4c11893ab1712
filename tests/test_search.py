"""Hamming search backends: multi-index hashing must equal brute force exactly."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest

from pipeline.search import (BruteForceIndex, ChunkSlice, MultiIndexHash, SliceGroup, chunk_geometry, chunk_values, hamming,
                             make_index, pack_hex, plan_chunks, unpack_hex)


def random_codes(rng, n, W):
    return rng.integers(0, np.iinfo(np.uint64).max, size=(n, W), dtype=np.uint64, endpoint=True)


def flip_bits(rng, code, d):
    """`code` (W,) with d distinct random bits flipped."""
    W = code.shape[0]
    out = code.copy()
    for bit in rng.choice(64 * W, size=d, replace=False):
        out[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return out


def planted(rng, n, W, n_pairs, max_d):
    codes = random_codes(rng, n, W)
    idx = rng.choice(n, size=2 * n_pairs, replace=False).reshape(-1, 2)
    for i, (x, y) in enumerate(idx):
        codes[y] = flip_bits(rng, codes[x], 1 + i % max_d)
    return codes, idx


def naive(codes, owners, queries, qowners, T, k):
    """Pure-Python statement of the search semantics (small inputs only)."""
    out = []
    seen = []
    for o in qowners:
        if not seen or seen[-1] != o:
            seen.append(int(o))
    for o in seen:
        rows = np.flatnonzero(qowners == o)
        best = {}
        for r in rows:
            d = np.array([sum(bin(int(x)).count("1") for x in (queries[r] ^ c)) for c in codes])
            for j in np.flatnonzero(d <= T):
                p = int(owners[j])
                if p == o:
                    continue
                if p not in best or d[j] < best[p][0]:
                    best[p] = (int(d[j]), int(r))
        top = sorted(best.items(), key=lambda kv: (kv[1][0], kv[0]))[:k]
        out += [(o, p, dr[0], dr[1]) for p, dr in top]
    return out


def as_rows(res):
    return list(zip(*(x.tolist() for x in res)))


def assert_same(r1, r2):
    for x, y, name in zip(r1, r2, ("owner_a", "owner_b", "dist", "query_row")):
        assert np.array_equal(x, y), f"{name} differs"


def test_hamming_and_hex_roundtrip():
    rng = np.random.default_rng(1)
    a = random_codes(rng, 50, 4)
    b = a.copy()
    b[:, 2] ^= np.uint64(0b1011)
    assert hamming(a, b).tolist() == [3] * 50
    assert np.array_equal(pack_hex(unpack_hex(a)), a)
    assert pack_hex(["ffffffffffffffff", None]).tolist() == [[2**64 - 1], [0]]


def test_brute_matches_naive_statement():
    rng = np.random.default_rng(2)
    codes, _ = planted(rng, 120, 1, 30, 10)
    # several entries per owner, several query rows per owner
    owners = np.arange(120) // 2
    queries = np.concatenate([codes, codes ^ np.uint64(0xFF)])
    qowners = np.concatenate([np.arange(120) // 2, np.arange(120) // 2])
    order = np.argsort(qowners, kind="stable")
    queries, qowners = queries[order], qowners[order]
    for T, k in [(6, 2), (12, 3), (20, 1)]:
        res = BruteForceIndex(codes, owners).search(queries, qowners, T, k)
        assert as_rows(res) == naive(codes, owners, queries, qowners, T, k)


@pytest.mark.parametrize("W,T,k,cpw", [
    (1, 0, 3, None), (1, 3, 2, None), (1, 10, 1, None), (1, 10, 5, None), (1, 14, 4, None),
    (1, 10, 3, 3), (1, 10, 3, 5), (1, 10, 3, 8), (4, 10, 3, None), (4, 25, 2, None), (2, 7, 4, 4),
])
def test_mih_equals_brute_planted(W, T, k, cpw):
    rng = np.random.default_rng(100 + W * 31 + T + k)
    codes, pairs = planted(rng, 3000, W, 400, max(T, 1))
    # a few triangles and chains so the k cap matters
    for i in range(0, 60, 3):
        codes[i + 1] = flip_bits(rng, codes[i], 1 + i % 3)
        codes[i + 2] = flip_bits(rng, codes[i], 2)
    owners = np.arange(3000, dtype=np.int64)
    brute = BruteForceIndex(codes, owners).search(codes, owners, T, k)
    mih = MultiIndexHash(codes, owners, max_distance=T, chunks_per_word=cpw)
    res = mih.search(codes, owners, T, k)
    assert_same(brute, res)
    # planted pairs within T are found (unless the k cap cut them: then k closer ones exist)
    found = set(zip(res[0].tolist(), res[1].tolist()))
    count = np.bincount(res[0], minlength=3000)
    for x, y in pairs:
        if hamming(codes[x:x + 1], codes[y:y + 1])[0] <= T:
            assert (x, y) in found or count[x] == k


def test_mih_equals_brute_other_threshold_than_planned():
    rng = np.random.default_rng(5)
    codes, _ = planted(rng, 2000, 1, 300, 12)
    owners = np.arange(2000)
    mih = MultiIndexHash(codes, owners, max_distance=4)
    for T in (0, 4, 9, 12, 40):  # 40: falls back to a scan of the distinct codes
        assert_same(BruteForceIndex(codes, owners).search(codes, owners, T, 3),
                    mih.search(codes, owners, T, 3))


def test_mih_equals_brute_multi_entry_owners_and_variants():
    """Owners with several index entries and several query rows; query owners absent from the
    index; non-contiguous owner ids."""
    rng = np.random.default_rng(6)
    base, _ = planted(rng, 800, 1, 150, 8)
    owners = (np.arange(800) // 2) * 7 + 3  # two entries per owner, sparse ids
    # queries: 3 rows per owner (the entries plus a noisy copy), plus 20 outside owners
    q, qo = [], []
    for o in range(400):
        q += [base[2 * o], base[2 * o + 1], flip_bits(rng, base[2 * o], 3)]
        qo += [o * 7 + 3] * 3
    for j in range(20):
        q.append(flip_bits(rng, base[j * 10], 2))
        qo.append(10_000 + j)
    q, qo = np.array(q), np.array(qo)
    for T, k in [(8, 2), (10, 6)]:
        brute = BruteForceIndex(base, owners).search(q, qo, T, k)
        assert_same(brute, MultiIndexHash(base, owners, max_distance=T).search(q, qo, T, k))
        assert as_rows(brute) == naive(base, owners, q, qo, T, k)
    assert (brute[0] >= 10_000).sum() > 0  # outside owners found their neighbours


def test_hubs_identical_and_near_identical():
    rng = np.random.default_rng(7)
    blank = random_codes(rng, 1, 1)[0]
    parts = [np.repeat(blank[None], 1500, axis=0),  # 1500 identical "blank" images
             np.array([flip_bits(rng, blank, 1 + i % 4) for i in range(300)]),  # noisy blanks
             random_codes(rng, 1200, 1)]
    codes = np.concatenate(parts)
    perm = rng.permutation(codes.shape[0])
    codes = codes[perm]
    owners = np.arange(codes.shape[0])
    for T, k in [(0, 5), (3, 7), (10, 30)]:
        brute = BruteForceIndex(codes, owners).search(codes, owners, T, k)
        mih = MultiIndexHash(codes, owners, max_distance=T)
        assert mih.n_codes < codes.shape[0] - 1400  # identical codes collapsed
        res = mih.search(codes, owners, T, k)
        assert_same(brute, res)
        assert np.bincount(res[0]).max() <= k


def test_contiguity_required_and_empty():
    codes = np.arange(10, dtype=np.uint64)[:, None]
    idx = make_index(codes, np.arange(10), "mih")
    with pytest.raises(ValueError, match="contiguous"):
        idx.search(codes[:3], np.array([0, 1, 0]), 3, 2)
    res = idx.search(np.zeros((0, 1), np.uint64), np.zeros(0, np.int64), 3, 2)
    assert all(x.size == 0 for x in res)
    empty = make_index(np.zeros((0, 1), np.uint64), np.zeros(0, np.int64), "mih")
    assert all(x.size == 0 for x in empty.search(codes, np.arange(10), 5, 2))
    with pytest.raises(ValueError, match="unknown search backend"):
        make_index(codes, np.arange(10), "faiss")


def sliced_search(codes, owners, queries, qowners, T, k, cpw, prefix_bits):
    """Every slice of every chunk (each chunk's values split on their first `prefix_bits` bits),
    searched and merged as the routed search merges them: smallest distance per pair, top k."""
    rows = []
    for ci, b in enumerate(chunk_geometry(cpw, codes.shape[1])[0]):
        bits = min(prefix_bits, b)
        top = chunk_values(codes, cpw, ci) >> np.uint64(b - bits)
        for prefix in np.unique(top):
            keep = top == prefix
            a, p, d, r = ChunkSlice(codes[keep], owners[keep], cpw, ci, int(prefix), bits).search(queries, qowners, T, k)
            rows += list(zip(a.tolist(), d.tolist(), p.tolist()))
    best = {}
    for a, d, p in sorted(rows):
        best.setdefault((a, p), d)
    out = sorted((a, d, p) for (a, p), d in best.items())
    order = {o: i for i, o in enumerate(dict.fromkeys(qowners.tolist()))}
    out.sort(key=lambda x: (order[x[0]], x[1], x[2]))
    taken, kept = {}, []
    for a, d, p in out:
        taken[a] = taken.get(a, 0) + 1
        if taken[a] <= k:
            kept.append((a, p, d))
    return kept


@pytest.mark.parametrize("W,T,k,cpw,prefix_bits", [
    (1, 10, 3, 4, 0), (1, 10, 3, 4, 3), (1, 12, 5, 3, 6), (1, 2, 2, 4, 2), (2, 9, 4, 4, 2), (1, 30, 40, 4, 4),
    (1, 10, 3, 8, 8), (1, 10, 4, 3, 12),  # whole chunk values as prefixes (no low bits); 12 of 21-22 bits
])
def test_chunk_slices_merged_equal_one_index(W, T, k, cpw, prefix_bits):
    """The slices of a multi-index (one chunk's table, one value prefix each) searched apart and
    merged give one index's lists, distances included: planted pairs, dense clusters where the k
    cap bites, several entries per owner, and thresholds where some chunk's radius is -1 (T = 2
    over 4 chunks) or where every slice answers (T = 30)."""
    rng = np.random.default_rng(200 + W + T + k)
    codes, _ = planted(rng, 2000, W, 300, max(T, 1))
    for i in range(0, 300, 6):  # dense groups: the cap bites
        for j in range(1, 6):
            codes[i + j] = flip_bits(rng, codes[i], 1 + j % 3)
    owners = np.arange(2000, dtype=np.int64) // 2
    queries = np.concatenate([codes[:600], np.array([flip_bits(rng, c, 2) for c in codes[:600]])])
    qowners = np.concatenate([owners[:600], owners[:600]])
    order = np.argsort(qowners, kind="stable")
    queries, qowners = queries[order], qowners[order]
    want = BruteForceIndex(codes, owners).search(queries, qowners, T, k)
    assert sliced_search(codes, owners, queries, qowners, T, k, cpw, prefix_bits) == \
        list(zip(*(x.tolist() for x in want[:3])))
    assert len(want[0]) > 200
    # the slices held as one index (as a worker holds its share): the same four arrays, query row included
    slices = []
    for ci, b in enumerate(chunk_geometry(cpw, W)[0]):
        bits = min(prefix_bits, b)
        top = chunk_values(codes, cpw, ci) >> np.uint64(b - bits)
        slices += [ChunkSlice(codes[top == v], owners[top == v], cpw, ci, int(v), bits) for v in np.unique(top)]
    assert_same(want, SliceGroup(slices).search(queries, qowners, T, k))
    assert all(x.size == 0 for x in SliceGroup([]).search(queries, qowners, T, k))


@pytest.mark.parametrize("cpw", [3, 4, 5, 6, 7, 8, 12, 16])
def test_interleave_takes_each_chunk_across_the_word(cpw):
    from pipeline.search import interleave
    single = np.array([[1 << i] for i in range(64)], dtype=np.uint64)
    assert sorted(interleave(single, cpw)[:, 0].tolist()) == [1 << i for i in range(64)]  # a permutation
    rows, cols = np.arange(64) // 8, np.arange(64) % 8  # a word's bits as an 8 x 8 aHash grid
    for ci, b in enumerate(chunk_geometry(cpw, 1)[0]):
        vals = chunk_values(single, cpw, ci)
        held = np.flatnonzero(vals)
        assert held.size == b and sorted(vals[held].tolist()) == [1 << j for j in range(b)]
        if cpw < 8:  # every chunk takes bits from most rows and columns, not a band or a stripe
            assert np.unique(rows[held]).size >= min(b, 6) and np.unique(cols[held]).size >= min(b, 4)
        if math.gcd(cpw, 8) < 4:  # dealt in turn: bits ci, ci + c, ci + 2c, ... in that order
            assert held.tolist() == list(range(ci, 64, cpw))
            assert vals[held].tolist() == [1 << j for j in range(b)]
    rng = np.random.default_rng(cpw)
    a, b = rng.integers(0, 2**63, size=(500, 2), dtype=np.uint64) << np.uint64(1), \
        rng.integers(0, 2**63, size=(500, 2), dtype=np.uint64)
    assert np.array_equal(hamming(interleave(a, cpw), interleave(b, cpw)), hamming(a, b))  # distances kept


def test_chunk_slice_refuses_an_entry_without_its_prefix():
    # chunk 0 of 4 (16 bits, taken across the word): the word's bit that is its first (highest) bit
    single = np.array([[1 << i] for i in range(64)], dtype=np.uint64)
    top = int(np.flatnonzero(chunk_values(single, 4, 0) == 1 << 15)[0])
    codes = np.array([[0], [1 << top]], dtype=np.uint64)
    assert chunk_values(codes, 4, 0).tolist() == [0, 1 << 15]
    assert ChunkSlice(codes[:1], np.array([0]), 4, 0, 0, 1).n_codes == 1
    with pytest.raises(ValueError, match="prefix"):
        ChunkSlice(codes, np.arange(2), 4, 0, 0, 1)


def test_plan_prefers_16_bit_chunks_at_1m():
    plan = plan_chunks(1_000_000, 1, 10)
    assert plan["chunks_per_word"] == 4  # 4 x 16-bit chunks, as measured fastest at 1M
    assert sum(r + 1 for r in plan["radii"]) == 11  # pigeonhole: sum(r_i + 1) = T + 1
    assert plan_chunks(1_000_000, 4, 10)["lengths"][0] <= 22


# --------------------------------------------------------------------------------------------
# real photos


@pytest.fixture(scope="module")
def real_hashes(photo_paths):
    imagehash = pytest.importorskip("imagehash")
    from PIL import Image

    from pipeline.decode import load_image
    hexes, names = [], []
    for i, path in enumerate(photo_paths[:200]):
        img, _, _ = load_image(path, min_side=64)
        hexes.append(str(imagehash.average_hash(img)))
        names.append((i, "orig"))
        if i % 5 == 0:  # true near pairs: a resized and a jpeg-recompressed copy
            small = img.resize((max(16, img.width // 3), max(16, img.height // 3)), Image.Resampling.BILINEAR)
            hexes.append(str(imagehash.average_hash(small)))
            names.append((i, "resized"))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=35)
            buf.seek(0)
            hexes.append(str(imagehash.average_hash(Image.open(buf).convert("RGB"))))
            names.append((i, "jpeg"))
    return pack_hex(hexes), names


def test_mih_equals_brute_on_real_ahash(real_hashes):
    codes, names = real_hashes
    owners = np.arange(codes.shape[0])
    for T, k in [(4, 3), (10, 5), (16, 4)]:
        brute = BruteForceIndex(codes, owners).search(codes, owners, T, k)
        mih = MultiIndexHash(codes, owners, max_distance=T).search(codes, owners, T, k)
        assert_same(brute, mih)
    # every copy finds its original at T = 10 (with k large enough)
    a, b, d, _ = MultiIndexHash(codes, owners).search(codes, owners, 10, 20)
    found = set(zip(a.tolist(), b.tolist()))
    where = {n: i for i, n in enumerate(names)}
    copies = [(where[(i, "orig")], j) for j, (i, kind) in enumerate(names) if kind != "orig"]
    assert copies
    missing = [c for c in copies if c not in found]
    assert not missing, f"copies not found: {missing}"
