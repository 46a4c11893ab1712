"""The compiled Hamming kernels (numba): popcount as one instruction, the index searches and the
row-wise distance of `pipeline/search.py`, a candidate pair's best distance over the screen's
variants (`pair_best`, `own_direction`) for `pipeline/candidates.py`, and the ORB descriptor
matcher of `pipeline/verify.py`.

They live apart from the modules that call them, which import this one when they first compute:
a process that only orchestrates (the driver of a run on a Dask cluster, where every search and
match runs on the workers) then never imports numba and LLVM (~50 MB of its memory for the run).
Single-threaded functions that release the GIL; parallelism comes from running them in separate
Dask tasks or threads.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

# The catalog keys the stored pair scores on this module for the ORB matcher
# (`match_descriptors`, with `popcount`): the search kernels shape no score, so its fingerprint
# leaves them out (`catalog.source_fingerprint`) and editing them re-scores no stored pair.
NOT_FINGERPRINTED = ("_prefetch", "_offer", "_visit", "_flush", "_alloc", "_TILE", "brute_search",
                     "scan_unique_search", "mih_search", "slice_search", "pair_distance", "pair_best",
                     "own_direction")


@intrinsic
def popcount(typingctx, x):
    """llvm.ctpop.i64: one POPCNT instruction (vectorised to VPOPCNTQ where the CPU has it)."""
    if not isinstance(x, nbtypes.Integer):
        return None
    sig = nbtypes.int64(x)

    def codegen(context, builder, signature, args):
        val = context.cast(builder, args[0], signature.args[0], nbtypes.uint64)
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, [val])

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """llvm.prefetch of arr[idx] (1-D array) into all cache levels; a hint, never faults."""
    if not isinstance(arr, nbtypes.Array) or arr.ndim != 1 or not isinstance(idx, nbtypes.Integer):
        return None
    sig = nbtypes.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        i = context.cast(builder, args[1], idxty, nbtypes.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _offer(p, d, row, best_d, best_row, touched, nt):
    """Owner `p` seen at distance `d` from query row `row`: keep its best; returns the new count
    of touched owners (the first sighting appends `p` to `touched`)."""
    bd = best_d[p]
    if bd < 0:
        touched[nt] = p
        nt += 1
        best_d[p] = d
        best_row[p] = row
    elif d < bd:
        best_d[p] = d
        best_row[p] = row
    return nt


@njit(cache=True, nogil=True)
def _visit(u, d, row, o, k, optr, olist, best_d, best_row, touched, nt):
    """Offer distinct code `u` at distance `d` (from query row `row`) to query owner `o`.

    Only the first k owners of u other than o can make o's top-k (owners are sorted ascending).
    Returns the new number of touched owners.
    """
    taken = 0
    for t in range(optr[u], optr[u + 1]):
        p = olist[t]
        if p == o:
            continue
        nt = _offer(p, d, row, best_d, best_row, touched, nt)
        taken += 1
        if taken >= k:
            break
    return nt


@njit(cache=True, nogil=True)
def _flush(o, k, n_owner, best_d, best_row, touched, nt, out_a, out_b, out_d, out_r, n_out):
    """Emit the top-k of the touched owners by (distance, owner); reset the scratch arrays.

    Returns (out_a, out_b, out_d, out_r, n_out), the output arrays grown when needed.
    """
    if nt == 0:
        return out_a, out_b, out_d, out_r, n_out
    keys = np.empty(nt, np.int64)
    for i in range(nt):
        p = touched[i]
        keys[i] = np.int64(best_d[p]) * n_owner + p
    keys.sort()
    take = min(k, nt)
    if n_out + take > out_a.shape[0]:
        cap = max(2 * out_a.shape[0], n_out + take)
        na = np.empty(cap, np.int64)
        nb = np.empty(cap, np.int64)
        nd = np.empty(cap, np.int32)
        nr = np.empty(cap, np.int64)
        na[:n_out] = out_a[:n_out]
        nb[:n_out] = out_b[:n_out]
        nd[:n_out] = out_d[:n_out]
        nr[:n_out] = out_r[:n_out]
        out_a, out_b, out_d, out_r = na, nb, nd, nr
    for i in range(take):
        p = keys[i] % n_owner
        out_a[n_out] = o
        out_b[n_out] = p
        out_d[n_out] = best_d[p]
        out_r[n_out] = best_row[p]
        n_out += 1
    for i in range(nt):
        best_d[touched[i]] = -1
    return out_a, out_b, out_d, out_r, n_out


@njit(cache=True, nogil=True)
def _alloc(n_groups, k, n_owner):
    cap = max(1024, n_groups * min(k, 4))
    best_d = np.full(n_owner, -1, np.int32)
    best_row = np.zeros(n_owner, np.int64)
    touched = np.empty(n_owner, np.int64)
    return (best_d, best_row, touched, np.empty(cap, np.int64), np.empty(cap, np.int64),
            np.empty(cap, np.int32), np.empty(cap, np.int64))


_TILE = 2048


@njit(cache=True, nogil=True)
def brute_search(queries, gstart, gowner, T, k, n_owner, codes, own):
    """Reference: every query row against every (non-deduplicated) index entry."""
    M, W = codes.shape
    G = gowner.shape[0]
    best_d, best_row, touched, out_a, out_b, out_d, out_r = _alloc(G, k, n_owner)
    n_out = 0
    buf = np.empty(_TILE, np.int32)
    for g in range(G):
        o = gowner[g]
        nt = 0
        for row in range(gstart[g], gstart[g + 1]):
            for j0 in range(0, M, _TILE):
                j1 = min(M, j0 + _TILE)
                if W == 1:
                    q0 = queries[row, 0]
                    for j in range(j0, j1):
                        buf[j - j0] = popcount(q0 ^ codes[j, 0])
                else:
                    for j in range(j0, j1):
                        s = 0
                        for w in range(W):
                            s += popcount(queries[row, w] ^ codes[j, w])
                        buf[j - j0] = s
                for j in range(j0, j1):
                    d = buf[j - j0]
                    if d <= T:
                        p = own[j]
                        if p != o:
                            nt = _offer(p, d, row, best_d, best_row, touched, nt)
        out_a, out_b, out_d, out_r, n_out = _flush(o, k, n_owner, best_d, best_row, touched, nt,
                                                   out_a, out_b, out_d, out_r, n_out)
    return out_a[:n_out], out_b[:n_out], out_d[:n_out], out_r[:n_out]


@njit(cache=True, nogil=True)
def scan_unique_search(queries, gstart, gowner, T, k, n_owner, ucodes, optr, olist):
    """Linear scan over the distinct codes (MIH's fallback when the threshold is too large)."""
    U, W = ucodes.shape
    G = gowner.shape[0]
    best_d, best_row, touched, out_a, out_b, out_d, out_r = _alloc(G, k, n_owner)
    n_out = 0
    for g in range(G):
        o = gowner[g]
        nt = 0
        for row in range(gstart[g], gstart[g + 1]):
            for u in range(U):
                d = 0
                for w in range(W):
                    d += popcount(queries[row, w] ^ ucodes[u, w])
                if d <= T:
                    nt = _visit(u, d, row, o, k, optr, olist, best_d, best_row, touched, nt)
        out_a, out_b, out_d, out_r, n_out = _flush(o, k, n_owner, best_d, best_row, touched, nt,
                                                   out_a, out_b, out_d, out_r, n_out)
    return out_a[:n_out], out_b[:n_out], out_d[:n_out], out_r[:n_out]


@njit(cache=True, nogil=True)
def mih_search(queries, gstart, gowner, T, k, n_owner, cword, cshift, cmask, cr, flips, nflips,
                ccodes, cids, coff, contiguous, optr, olist):
    """Multi-index hashing search.

    Chunk ci covers bits [cshift, cshift + len) of word cword[ci] (mask cmask[ci]) and is probed
    with every flip mask of <= cr[ci] bits (flips[ci, :nflips[ci]]). coff[ci] is the CSR offset
    table over chunk values; positions index cids[ci] (distinct-code id) and, when `contiguous`,
    ccodes[ci] (that code's words, in chunk ci's order); otherwise ccodes[0] is indexed by id.
    Per chunk, the bucket offsets and the first code of every probed bucket are prefetched
    before any is read, so the cache misses of one query overlap instead of queueing.
    """
    W = queries.shape[1]
    m = cword.shape[0]
    G = gowner.shape[0]
    U = cids.shape[1]
    best_d, best_row, touched, out_a, out_b, out_d, out_r = _alloc(G, k, n_owner)
    n_out = 0
    nf_max = flips.shape[1]
    keys = np.empty(nf_max, np.int64)
    st = np.empty(nf_max, np.int64)
    en = np.empty(nf_max, np.int64)
    coff_flat = coff.reshape(-1)
    ccodes_flat = ccodes.reshape(-1)
    row_len = coff.shape[1]
    for g in range(G):
        o = gowner[g]
        nt = 0
        for row in range(gstart[g], gstart[g + 1]):
            for ci in range(m):
                r = cr[ci]
                if r < 0:
                    continue
                nf = nflips[ci]
                qv = (queries[row, cword[ci]] >> cshift[ci]) & cmask[ci]
                base_off = ci * row_len
                for f in range(nf):
                    key = np.int64(qv ^ flips[ci, f])
                    keys[f] = key
                    _prefetch(coff_flat, base_off + key)
                cc = ci if contiguous else 0
                for f in range(nf):
                    key = keys[f]
                    s = np.int64(coff[ci, key])
                    st[f] = s
                    en[f] = np.int64(coff[ci, key + 1])
                    if contiguous and s < U:
                        _prefetch(ccodes_flat, (cc * U + s) * W)
                for f in range(nf):
                    for pos in range(st[f], en[f]):
                        cp = pos if contiguous else np.int64(cids[ci, pos])
                        if W == 1:
                            d = popcount(queries[row, 0] ^ ccodes[cc, cp, 0])
                        else:
                            d = 0
                            for w in range(W):
                                d += popcount(queries[row, w] ^ ccodes[cc, cp, w])
                        if d > T:
                            continue
                        # count it only at the first chunk where it qualifies
                        dup = False
                        for cj in range(ci):
                            rj = cr[cj]
                            if rj >= 0:
                                wj = cword[cj]
                                x = ((queries[row, wj] ^ ccodes[cc, cp, wj]) >> cshift[cj]) & cmask[cj]
                                if popcount(x) <= rj:
                                    dup = True
                                    break
                        if dup:
                            continue
                        nt = _visit(cids[ci, pos], d, row, o, k, optr, olist, best_d, best_row,
                                    touched, nt)
        out_a, out_b, out_d, out_r, n_out = _flush(o, k, n_owner, best_d, best_row, touched, nt,
                                                   out_a, out_b, out_d, out_r, n_out)
    return out_a[:n_out], out_b[:n_out], out_d[:n_out], out_r[:n_out]


@njit(cache=True, nogil=True)
def slice_search(queries, gstart, gowner, T, k, n_owner, ci, prefix, low_bits, cword, cshift, cmask, cr,
                 flips, n_flips, ccodes, coff, optr, olist):
    """Multi-index hashing within one slice (`search.ChunkSlice`): chunk ci's table over the codes
    whose chunk value starts with `prefix` (then `low_bits` bits). A query row whose chunk value
    starts j bits away from `prefix` probes the first n_flips[r - j] masks of `flips` (masks of the
    low bits by popcount), none when j > r; a code within T is kept only when no earlier chunk
    already qualifies it (its slice of that chunk keeps it). Codes are numbered in the table's
    order (optr/olist by position)."""
    W = queries.shape[1]
    G = gowner.shape[0]
    U = ccodes.shape[0]
    r = cr[ci]
    best_d, best_row, touched, out_a, out_b, out_d, out_r = _alloc(G, k, n_owner)
    n_out = 0
    nf_max = flips.shape[0]
    keys = np.empty(nf_max, np.int64)
    st = np.empty(nf_max, np.int64)
    en = np.empty(nf_max, np.int64)
    ccodes_flat = ccodes.reshape(-1)
    low_mask = (np.uint64(1) << np.uint64(low_bits)) - np.uint64(1)
    for g in range(G):
        o = gowner[g]
        nt = 0
        for row in range(gstart[g], gstart[g + 1]):
            qv = (queries[row, cword[ci]] >> cshift[ci]) & cmask[ci]
            j = popcount((qv >> np.uint64(low_bits)) ^ np.uint64(prefix))
            if j > r:
                continue
            nf = n_flips[r - j]
            ql = qv & low_mask
            for f in range(nf):
                key = np.int64(ql ^ flips[f])
                keys[f] = key
                _prefetch(coff, key)
            for f in range(nf):
                s = coff[keys[f]]
                st[f] = s
                en[f] = coff[keys[f] + 1]
                if s < U:
                    _prefetch(ccodes_flat, s * W)
            for f in range(nf):
                for pos in range(st[f], en[f]):
                    if W == 1:
                        d = popcount(queries[row, 0] ^ ccodes[pos, 0])
                    else:
                        d = 0
                        for w in range(W):
                            d += popcount(queries[row, w] ^ ccodes[pos, w])
                    if d > T:
                        continue
                    dup = False
                    for cj in range(ci):
                        rj = cr[cj]
                        if rj >= 0:
                            wj = cword[cj]
                            x = ((queries[row, wj] ^ ccodes[pos, wj]) >> cshift[cj]) & cmask[cj]
                            if popcount(x) <= rj:
                                dup = True
                                break
                    if dup:
                        continue
                    nt = _visit(pos, d, row, o, k, optr, olist, best_d, best_row, touched, nt)
        out_a, out_b, out_d, out_r, n_out = _flush(o, k, n_owner, best_d, best_row, touched, nt,
                                                   out_a, out_b, out_d, out_r, n_out)
    return out_a[:n_out], out_b[:n_out], out_d[:n_out], out_r[:n_out]


@njit(cache=True, nogil=True)
def pair_distance(a, b):
    """Row-wise Hamming distance of two (n, W) uint64 arrays (int32)."""
    n, W = a.shape
    out = np.empty(n, np.int32)
    for i in range(n):
        s = 0
        for w in range(W):
            s += popcount(a[i, w] ^ b[i, w])
        out[i] = s
    return out


# the candidates stage: one pair's distance over the screen's variants


@njit(cache=True, nogil=True)
def pair_best(codes, use, idx_use, a, b, order_side, order_var, inverse):
    """Smallest distance over both directions for each pair, and the transform of the first
    (in candidate order) query/entry combination achieving it."""
    n = a.shape[0]
    V = codes.shape[1]
    W = codes.shape[2]
    dist = np.empty(n, np.int16)
    trans = np.empty(n, np.int8)
    for i in range(n):
        best = 1 << 30
        bt = 0
        for c in range(order_side.shape[0]):
            side = order_side[c]
            v = order_var[c]
            q = a[i] if side == 0 else b[i]
            e = b[i] if side == 0 else a[i]
            if v >= V or not use[q, v]:
                continue
            for ev in range(V):
                if not idx_use[e, ev]:
                    continue
                d = 0
                for w in range(W):
                    d += popcount(codes[q, v, w] ^ codes[e, ev, w])
                if d < best:
                    best = d
                    if v == 0 or v == 8:
                        bt = 0
                    elif side == 0:
                        bt = inverse[v]
                    else:
                        bt = v
        dist[i] = best
        trans[i] = bt
    return dist, trans


@njit(cache=True, nogil=True)
def own_direction(codes, use, idx_use, a, b, limit_plain, limit_rotated):
    """Distance from a's query rows to b's index entries, each row within its limit; -1 if none."""
    n = a.shape[0]
    V = codes.shape[1]
    W = codes.shape[2]
    out = np.full(n, -1, np.int16)
    for i in range(n):
        best = 1 << 30
        for v in range(V):
            if not use[a[i], v]:
                continue
            limit = limit_rotated if 1 <= v <= 7 else limit_plain
            for e in range(V):
                if not idx_use[b[i], e]:
                    continue
                d = 0
                for w in range(W):
                    d += popcount(codes[a[i], v, w] ^ codes[b[i], e, w])
                if d <= limit and d < best:
                    best = d
        if best < (1 << 30):
            out[i] = best
    return out


# the verify tier: ORB descriptors


@njit(cache=True, nogil=True)
def match_descriptors(a, bt, ratio):
    """2-NN Hamming matching a -> b + Lowe ratio test + one-to-one, on packed descriptors.

    `a` (na,4) uint64 and `bt` (4,nb) uint64 (`_packed`), nb >= 2. Per query, two passes that
    LLVM vectorises: the nb distances (xor + popcount over 4 words) and their minimum d1; then
    d2 = the minimum over the other entries (d2 == d1 when d1 occurs twice, which fails the ratio
    test, so the result never depends on how a tie is broken). Kept when d1 < ratio * d2 (the
    comparison cv2 BFMatcher.knnMatch + the Python loop made, in float64); only then the index
    of d1 is looked up. One-to-one: a train keypoint picked by several queries goes to the
    closest (ties: the lower query index). Returns (query idx, train idx) int64 arrays in
    ascending query order — the same pairs in the same order as `_good_matches_reference`, so
    RANSAC sees identical input.
    """
    na, nb = a.shape[0], bt.shape[1]
    big = np.int32(1 << 30)
    best_q = np.full(nb, -1, np.int64)
    best_d = np.full(nb, big, np.int32)
    pick = np.full(na, -1, np.int64)
    dist = np.empty(nb, np.int32)
    b0, b1, b2, b3 = bt[0], bt[1], bt[2], bt[3]
    for i in range(na):
        a0, a1, a2, a3 = a[i, 0], a[i, 1], a[i, 2], a[i, 3]
        d1 = big
        for j in range(nb):
            d = np.int32(popcount(a0 ^ b0[j]) + popcount(a1 ^ b1[j])
                         + popcount(a2 ^ b2[j]) + popcount(a3 ^ b3[j]))
            dist[j] = d
            d1 = min(d1, d)
        ties = np.int32(0)
        d2 = big
        for j in range(nb):
            d = dist[j]
            ties += np.int32(d == d1)
            d2 = min(d2, big if d == d1 else d)
        if ties > 1:
            d2 = d1
        if d1 < ratio * d2:
            j1 = 0
            while dist[j1] != d1:
                j1 += 1
            pick[i] = j1
            if d1 < best_d[j1]:
                best_d[j1] = d1
                best_q[j1] = i
    n = 0
    for i in range(na):
        if pick[i] >= 0 and best_q[pick[i]] == i:
            n += 1
    q = np.empty(n, np.int64)
    t = np.empty(n, np.int64)
    k = 0
    for i in range(na):
        if pick[i] >= 0 and best_q[pick[i]] == i:
            q[k] = i
            t[k] = pick[i]
            k += 1
    return q, t
