"""Triton kernels: block-sparse FlashAttention forward and backward for every pattern.

One kernel family serves all patterns. Work happens in *position* space (real tokens from 0):
query row ``i`` of batch ``b`` sits at position ``q_start[b] + i``; key position ``j`` sits in key
slot ``k_shift[b] + j`` and exists when ``j < k_len[b]`` (left/right padding, chunked prefill).

For a tile of query positions the keys needed come in three groups, computed arithmetically here
(the host-side statement of the same ranges is :mod:`hf_sparse.layout`):

* global tiles ``[0, g_end)`` (Longformer global tokens, BigBird global blocks),
* window tiles ``[a, w_end)``, split into a masked leading edge ``[a, e)``, an unmasked interior
  ``[e, f)`` and a masked trailing part ``[f, w_end)`` (the diagonal for causal patterns),
* BigBird random blocks, read from a small ``[Hkv, num_q_blocks, R]`` table,
* stride runs: the key tiles below the window that a long stride hits (:func:`_stride_runs`; a short stride
  or key columns make the window start at key 0 instead).

Only tiles on a boundary evaluate the token-level predicate; interior tiles run without a mask.
The backward has a dK/dV kernel (one program per key tile and KV head, looping over the query heads
of its GQA group and the query tiles that see the key tile, random blocks through a reverse table)
and a dQ kernel with the forward's iteration. The forward and dQ kernels can pack a GQA group into a
tile's rows (``PACK``: rows are (position, head) pairs, so each K/V tile loaded serves the group) or
hold one query head per program; the tile table (:mod:`.configs`) says which. Exponentials use
``exp2`` with the scale folded in.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_BIG_I32 = tl.constexpr(2**30)


@triton.jit
def _floor_to(x, m: tl.constexpr):
    return (x // m) * m


@triton.jit
def _ceil_to(x, m: tl.constexpr):
    return ((x + m - 1) // m) * m


@triton.jit
def _tanh(x):
    # tanh through exp2, saturating correctly for large |x|
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


# KIND: the bits of a constexpr that say which rules a specialisation compiles in (the host's kernel plan,
# hf_sparse.kernels.plan, sets them): 1 token band (i - W < j; non-causal |i - j| < W), 2 block band
# (i // BLK - WB < j // BLK; non-causal symmetric), 4 stride ((i - j) % S == 0 for S > 0), 8 key columns
# (j % CP >= CP - CC for CC > 0), 16 RAND_MASKED (the extra blocks may hold keys another rule shows: they are
# visited masked, counting only the keys no rule shows). Globals (j < G) are always compiled in.


@triton.jit
def _head_rules(HP, hk):
    """Per-KV-head rule values ``W, G, WB, S, CP, CC`` of a per-head plan (row ``hk`` of ``[Hkv, 8]`` int32)."""
    row = HP + hk * 8
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5))


@triton.jit
def _visible(qp, kp, k_len, W, G, WB, S, CP, CC, KIND: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr):
    """Token-level predicate of the rules (extra/random blocks are handled by the loops)."""
    qp2 = qp[:, None]
    kp2 = kp[None, :]
    vis = kp2 < G
    if KIND & 1:
        inwin = kp2 > qp2 - W
        if not CAUSAL:
            inwin = inwin & (kp2 < qp2 + W)
        vis = vis | inwin
    if KIND & 2:
        qb = qp2 // BLK
        kb = kp2 // BLK
        inb = kb > qb - WB
        if not CAUSAL:
            inb = inb & (kb < qb + WB)
        vis = vis | inb
    if KIND & 4:  # causal only: for 0 <= j <= i, (i - j) % S == 0 iff i % S == j % S -- a remainder per row
        # and per column instead of one per pair (an integer remainder costs tens of instructions)
        s_pos = tl.maximum(S, 1)
        vis = vis | ((S > 0) & ((qp % s_pos)[:, None] == (kp % s_pos)[None, :]))
    if KIND & 8:
        vis = vis | ((CC > 0) & (kp2 % tl.maximum(CP, 1) >= CP - CC))
    if CAUSAL:
        vis = vis & (kp2 <= qp2)
    else:
        vis = vis | (qp2 < G)
    return vis & (kp2 < k_len) & (kp2 >= 0)


# ----------------------------------------------------------------------------------------------
# stride runs. Through a stride S the query positions [x_lo, x_hi) of a tile see the keys [x_lo - k S,
# x_hi - k S), k >= 0 (and the keys [x_lo, x_hi) of a tile are seen by the queries [x_lo + k S, x_hi + k S)):
# runs of x_hi - x_lo positions, S apart. Once S >= (x_hi - x_lo) + TILE no two runs share a tile of the
# other side, so a tile can visit the tiles of its runs, each once, instead of every tile of the prefix.
@triton.jit
def _far_rules(S, CC, span, KIND: tl.constexpr, CAUSAL: tl.constexpr, TILE: tl.constexpr):
    """For a tile of ``span`` positions: whether a stride or key columns reach the whole prefix (``reach``: the
    window range starts at 0, or ends at the last query), and whether the stride hits are visited as runs
    instead (``runs``: causal, no key columns, and no two runs share a ``TILE`` of the other side)."""
    reach = (S > 0) | (CC > 0)
    runs = False
    if KIND & 4 and CAUSAL:
        runs = (S >= span + TILE) & (CC == 0)
        reach = reach & ~runs
    return reach, runs


@triton.jit
def _stride_runs(x_lo, x_hi, S, on, c_lo, c_hi, none, UP: tl.constexpr, TILE: tl.constexpr):
    """The runs of the positions ``[x_lo, x_hi)`` on the other side -- later queries (``UP``) or earlier keys --
    restricted to ``[c_lo, c_hi)`` (``c_lo`` a multiple of ``TILE``): the tuple :func:`_run_tile` reads (first
    run's start, step, length, tiles per run, the clip, the empty tile ``none``, the tile count; no tiles unless
    ``on``). A run covers at most ``per`` tiles; one that covers fewer (another alignment, or clipped) spends
    the spare iterations on ``none``, a tile that no valid row sees."""
    s = tl.maximum(S, 1)
    if UP:  # run k: queries [x_lo + k s, x_hi + k s)
        near = c_lo - x_hi
        far = c_hi - 1 - x_lo
        step = s
    else:  # run k: keys [x_lo - k s, x_hi - k s)
        near = x_lo - c_hi
        far = x_hi - 1 - c_lo
        step = -s
    k_first = tl.maximum(near + s, 0) // s  # the first run that reaches into [c_lo, c_hi); far // s is the last
    n_runs = tl.where(on & (far >= 0), tl.maximum(far, 0) // s - k_first + 1, 0)
    span = x_hi - x_lo
    off = tl.where(S % TILE == 0, x_lo % TILE, TILE - 1)  # offset of a run in its first tile (the worst if it varies)
    per = tl.maximum((off + span + TILE - 1) // TILE, 1)
    return x_lo + k_first * step, step, span, per, c_lo, c_hi, none, tl.maximum(n_runs, 0) * per


@triton.jit
def _run_tile(j, run, TILE: tl.constexpr):
    """Start of tile ``j`` of the runs ``run`` (:func:`_stride_runs`): tile ``j % per`` of run ``j // per``, or the
    empty tile past the run's end or the clip."""
    first, step, span, per, c_lo, c_hi, none, n = run
    r = j // per
    run_lo = first + r * step
    start = _floor_to(tl.maximum(run_lo, c_lo), TILE) + (j - r * per) * TILE
    return tl.where(start < tl.minimum(run_lo + span, c_hi), start, none)


@triton.jit
def _query_tile_ranges(m_lo, m_hi, k_len, W, G, WB, S, CP, CC,
                       KIND: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile ranges for the query positions ``[m_lo, m_hi)``: globals, then a, e, f, w_end.

    The bands give the window ``[win_lo, win_hi)`` and its unmasked interior ``[full_lo, full_hi)``; a
    token band and a block band together (causal) take the union of both. A stride or key columns reach
    every earlier key: the window then starts at 0, masked outside the bands' interior -- unless the stride
    hits are visited as runs (``runs``, see :func:`_stride_runs`), which leaves the window to the bands."""
    if CAUSAL:
        win_hi = tl.minimum(m_hi, k_len)
        full_hi = _floor_to(tl.minimum(m_lo + 1, k_len), BLOCK_N)
    if KIND & 1:
        win_lo = tl.maximum(m_lo - W + 1, 0)
        full_lo = _ceil_to(tl.maximum(m_hi - W, 0), BLOCK_N)
        if not CAUSAL:
            win_hi = tl.minimum(m_hi - 1 + W, k_len)
            full_hi = _floor_to(tl.minimum(m_lo + W, k_len), BLOCK_N)
    if KIND & 2:
        qb = m_lo // BLK
        b_lo = tl.maximum((qb - WB + 1) * BLK, 0)
        if KIND & 1:  # (causal only: the host refuses two non-causal bands)
            win_lo = tl.minimum(win_lo, b_lo)
            full_lo = tl.minimum(full_lo, b_lo)
        else:
            win_lo = b_lo
            full_lo = b_lo
            if not CAUSAL:
                win_hi = tl.minimum((qb + WB) * BLK, k_len)
                full_hi = _floor_to(win_hi, BLOCK_N)
    runs = False
    if KIND & 12:
        reach, runs = _far_rules(S, CC, m_hi - m_lo, KIND, CAUSAL, BLOCK_N)
        win_lo = tl.where(reach, 0, win_lo)
    if not CAUSAL:
        if m_lo < G:  # global query rows see every key: take all tiles, masked
            win_lo = 0
            win_hi = k_len
            full_lo = _ceil_to(k_len, BLOCK_N)
            full_hi = full_lo
    if CAUSAL:
        g_hi = tl.minimum(tl.minimum(G, k_len), m_hi)
    else:
        g_hi = tl.minimum(G, k_len)
    a = _floor_to(win_lo, BLOCK_N)
    w_end = _ceil_to(win_hi, BLOCK_N)
    w_end = tl.maximum(w_end, a)
    e = tl.minimum(tl.maximum(full_lo, a), w_end)
    f = tl.minimum(tl.maximum(full_hi, e), w_end)
    g_full = tl.minimum(_floor_to(g_hi, BLOCK_N), a)
    g_end = tl.minimum(_ceil_to(g_hi, BLOCK_N), a)
    return g_full, g_end, a, e, f, w_end, runs


# ----------------------------------------------------------------------------------------------
# iteration: every kernel runs two loops, one over tiles that need no mask and one over boundary
# tiles. Each loop walks up to three contiguous tile ranges and a list of random blocks through a
# single index, so the compiler sees one loop body (one software pipeline, one register budget).
@triton.jit
def _tile_start(it, a0, na, RPTR, n_rand, b0, nb, c0, RUN,
                TPB: tl.constexpr, BLK: tl.constexpr, TILE: tl.constexpr, HAS_RAND: tl.constexpr,
                HAS_RUNS: tl.constexpr):
    """Start position of tile ``it`` of the sequence: with ``HAS_RUNS`` first the stride runs ``RUN``
    (:func:`_stride_runs`), then A (``na`` tiles from ``a0``), random blocks (``n_rand`` tiles, ``TPB`` per
    block, block ids at ``RPTR``), B (``nb`` from ``b0``), C (from ``c0``).

    Without random blocks (``HAS_RAND`` false, ``n_rand`` must be 0) the table read and its index
    arithmetic are left out of the loop body; without ``HAS_RUNS`` (``RUN`` unused) the runs' arithmetic."""
    if HAS_RUNS:
        run_start = _run_tile(it, RUN, TILE)
        is_run = it < RUN[7]
        it = it - RUN[7]
    j = it - na
    if HAS_RAND:
        is_rand = (j >= 0) & (j < n_rand)
        blk_id = tl.load(RPTR + tl.where(is_rand, j // TPB, 0), mask=is_rand, other=0)
        r_start = blk_id * BLK + (j % TPB) * TILE
        j2 = j - n_rand
        start = tl.where(it < na, a0 + it * TILE,
                         tl.where(is_rand, r_start, tl.where(j2 < nb, b0 + j2 * TILE, c0 + (j2 - nb) * TILE)))
    else:
        is_rand = j < -_BIG_I32  # never true; keeps the return type
        start = tl.where(it < na, a0 + it * TILE, tl.where(j < nb, b0 + j * TILE, c0 + (j - nb) * TILE))
    if HAS_RUNS:
        start = tl.where(is_run, run_start, start)
    return start, is_rand


@triton.jit
def _tma_tile(desc, b, h, row0, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[ROWS, BLOCK_D]`` tile at sequence row ``row0`` of head ``h``, batch ``b``, through a tensor
    descriptor of the ``[B, H, T, D]`` tensor (Hopper's copy engine; rows outside ``[0, T)`` read as 0)."""
    return tl.reshape(desc.load([b, h, row0, 0]), (ROWS, BLOCK_D))


@triton.jit
def _rand_visible(vis, is_rand, k_ok, KIND: tl.constexpr):
    """Visibility on a tile visited as an extra (random) block: the whole block, or -- when the blocks may
    hold keys another rule shows (``RAND_MASKED``) -- only the keys no rule shows, since the rule's own
    visit of that tile counts the others (each pair is counted once)."""
    if KIND & 16:
        return tl.where(is_rand, k_ok & (vis == 0), vis)
    return vis | (is_rand & k_ok)


@triton.jit
def _count_valid(RPTR, R: tl.constexpr):
    """Number of valid (>= 0) entries of a random-block row (the valid ones come first)."""
    n = 0
    for r in tl.static_range(R):
        n += (tl.load(RPTR + r) >= 0).to(tl.int32)
    return n


# ----------------------------------------------------------------------------------------------
# forward
@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              desc_k, desc_v, b, hk, k_shift,
              offs_n, offs_d, qp, k_len, W, G, WB, S, CP, CC, qk_scale, softcap,
              a0, na, RPTR, n_rand, b0, nb, c0, RUN, n_total,
              KIND: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, MASKED: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              TPB: tl.constexpr, HAS_RAND: tl.constexpr, HAS_RUNS: tl.constexpr, TMA: tl.constexpr,
              BLOCK_D: tl.constexpr, ZERO_KEYS: tl.constexpr):
    """``TMA``: this loop loads K/V tiles through tensor descriptors. Interior tiles lie inside the keys;
    masked tiles may reach past them, where the copy engine reads rows outside ``[0, Tk)`` as 0 -- what the
    masked pointer load gives. ``ZERO_KEYS`` (masked tiles of padded rows): slots inside the tensor that are
    not keys of the row are zeroed after the load, since a zero weight still multiplies what they hold."""
    d_ok = offs_d < HEAD_DIM
    for it in range(0, n_total):
        start_n, is_rand = _tile_start(it, a0, na, RPTR, n_rand, b0, nb, c0, RUN, TPB, BLK, BLOCK_N, HAS_RAND, HAS_RUNS)
        kp = start_n + offs_n
        k_ptrs = k_base + kp[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + kp[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k_ok = (kp < k_len) & (kp >= 0)
        if TMA:
            k = tl.trans(_tma_tile(desc_k, b, hk, k_shift + start_n, BLOCK_N, BLOCK_D))
        elif MASKED:
            k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, k)
        if HAS_SOFTCAP:
            s = softcap * _tanh(qk * (qk_scale / softcap)) * 1.4426950408889634
        elif MASKED:
            s = qk * (qk_scale * 1.4426950408889634)
        if MASKED:
            vis = _visible(qp, kp, k_len, W, G, WB, S, CP, CC, KIND, CAUSAL, BLK)
            if HAS_RAND:
                vis = _rand_visible(vis, is_rand, k_ok[None, :], KIND)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        elif HAS_SOFTCAP:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            p = tl.exp2(s - m_use[:, None])
        else:  # interior tile: the scale is positive, so max(qk) * c is the row max; qk * c - m is one FMA
            c = qk_scale * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
            m_use = m_new
            p = tl.exp2(qk * c - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = _tma_tile(desc_v, b, hk, k_shift + start_n, BLOCK_N, BLOCK_D)
            if ZERO_KEYS:  # padded slots inside the tensor: a zero weight still multiplies what they hold
                v = tl.where(k_ok[:, None], v, 0.0)
        elif MASKED:
            v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _row_keys(b, Tk, KSHIFT, KLEN, VARLEN: tl.constexpr):
    """Where batch row ``b``'s keys sit: ``(k_shift, k_len)`` (padding: from the tables, else all of Tk)."""
    if VARLEN:
        return tl.load(KSHIFT + b), tl.load(KLEN + b)
    return 0, Tk


@triton.jit
def _row_queries(q_offset, Tq, k_shift, k_len, VARLEN: tl.constexpr):
    """Where a row's queries sit: ``q_start`` (position of query row 0) and its valid rows ``[row_lo, row_hi)``."""
    q_start = q_offset - k_shift
    if VARLEN:
        row_hi = tl.minimum(Tq, k_len - q_start)
    else:
        row_hi = Tq
    return q_start, tl.maximum(0, -q_start), row_hi


@triton.jit
def _tile_setup(b, q_offset, Tq, Tk, KSHIFT, KLEN, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
    """Batch-row geometry and this program's query tile (forward and dQ). A tile's rows are the flat
    indices ``f = position * PACK + head_in_group``: with ``PACK`` = the GQA group, the query heads of one
    KV head share every K/V tile the program loads; with ``PACK`` = 1 a program holds one head. Tiles
    start at multiples of ``BLOCK_M`` in flat space, so a tile never straddles a BigBird block
    (``BLOCK_M`` divides the block)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # last query tiles (most keys when causal) first
    k_shift, k_len = _row_keys(b, Tk, KSHIFT, KLEN, VARLEN)
    q_start, row_lo, row_hi = _row_queries(q_offset, Tq, k_shift, k_len, VARLEN)
    p_first = q_start + row_lo
    p_end = q_start + row_hi
    f_lo = ((p_first * PACK) // BLOCK_M + pid_m) * BLOCK_M
    return k_shift, k_len, q_start, row_lo, row_hi, p_first, p_end, f_lo


@triton.jit
def _tile_rows(f_lo, p_first, p_end, q_start, row_lo, row_hi, h0, PACK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per row of the tile: position, query head, query index and validity; and the tile's position
    range ``[m_lo, m_hi)`` (what the key-tile plan is computed for)."""
    flat = f_lo + tl.arange(0, BLOCK_M)
    qp = flat // PACK
    heads = h0 + flat % PACK
    rows = qp - q_start
    row_ok = (rows >= row_lo) & (rows < row_hi)
    m_lo = tl.maximum(f_lo // PACK, p_first)
    m_hi = tl.minimum((f_lo + BLOCK_M - 1) // PACK + 1, p_end)
    return qp, heads, rows, row_ok, m_lo, m_hi


@triton.jit
def _program_heads(H, HMAP, NH, GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_MAP: tl.constexpr):
    """Batch row, first query head and KV head of this program (grid axis 1: ``B * H / PACK``; with
    ``HEAD_MAP``, ``B * NH * GROUP / PACK`` over the ``NH`` KV heads listed in ``HMAP``)."""
    pid_bh = tl.program_id(1)
    if HEAD_MAP:
        per_kv: tl.constexpr = GROUP // PACK
        i = pid_bh % (NH * per_kv)
        hk = tl.load(HMAP + i // per_kv)
        return pid_bh // (NH * per_kv), hk * GROUP + (i % per_kv) * PACK, hk
    hp = H // PACK
    h0 = (pid_bh % hp) * PACK
    return pid_bh // hp, h0, h0 // GROUP


@triton.jit
def _key_program_head(HKV, HMAP, NH, HEAD_MAP: tl.constexpr):
    """Batch row and KV head of a dK/dV program (grid axis 1: ``B * HKV``, or ``B * NH`` over ``HMAP``)."""
    pid_bh = tl.program_id(1)
    if HEAD_MAP:
        return pid_bh // NH, tl.load(HMAP + pid_bh % NH)
    return pid_bh // HKV, pid_bh % HKV


@triton.jit
def _query_program(H, HMAP, NH, q_offset, Tq, Tk, KSHIFT, KLEN, VARLEN: tl.constexpr, GROUP: tl.constexpr,
                   PACK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_MAP: tl.constexpr):
    """The prologue of the forward and dQ programs: batch row, KV head, the row's keys, the tile's rows
    (positions, heads, query indices, validity), its position range, and whether it holds any row."""
    b, h0, hk = _program_heads(H, HMAP, NH, GROUP, PACK, HEAD_MAP)
    k_shift, k_len, q_start, row_lo, row_hi, p_first, p_end, f_lo = _tile_setup(
        b, q_offset, Tq, Tk, KSHIFT, KLEN, VARLEN, BLOCK_M, PACK)
    live = (f_lo < p_end * PACK) & (p_first < p_end)
    qp, heads, rows, row_ok, m_lo, m_hi = _tile_rows(f_lo, p_first, p_end, q_start, row_lo, row_hi, h0, PACK, BLOCK_M)
    return b, hk, k_shift, k_len, qp, heads, rows, row_ok, m_lo, m_hi, live


@triton.jit
def _query_side_plan(m_lo_eff, m_hi, k_len, W, G, WB, S, CP, CC, RAND, hk, stride_rh, stride_rq,
                     KIND: tl.constexpr, CAUSAL: tl.constexpr, R: tl.constexpr, BLK: tl.constexpr,
                     BLOCK_N: tl.constexpr, PAST_KEYS: tl.constexpr):
    """Tile ranges of the two loops for one query tile (shared by the forward and dQ kernels).

    A causal random block precedes its query block, so it lies inside the keys and runs unmasked --
    unless queries sit past the last key block (``PAST_KEYS``: ``q_offset + Tq > Tk``), where the last,
    partial key block may have been drawn: those tiles send their random blocks to the masked loop.

    Stride runs (causal plans with a stride, where :func:`_far_rules` allows them) are masked tiles below
    the window and at or above the global tiles, ``[g_end, min(a, k_len))``: tiles of the window or of the
    globals are visited there, so each key tile is visited once."""
    g_full, g_end, a, e, f, w_end, runs = _query_tile_ranges(
        m_lo_eff, m_hi, k_len, W, G, WB, S, CP, CC, KIND, CAUSAL, BLK, BLOCK_N)
    TPB: tl.constexpr = BLK // BLOCK_N
    if R > 0:
        rptr = RAND + hk * stride_rh + (m_lo_eff // BLK) * stride_rq
        n_rand = _count_valid(rptr, R) * TPB
    else:
        rptr = RAND
        n_rand = 0
    # unmasked: [0, g_full), random blocks (causal), [e, f)
    if KIND & 16:
        u_rand = 0
    elif CAUSAL and PAST_KEYS:
        u_rand = tl.where(m_lo_eff // BLK > (k_len - 1) // BLK, 0, n_rand)
    elif CAUSAL:
        u_rand = n_rand
    else:
        u_rand = 0
    nu_a = g_full // BLOCK_N
    nu_b = (f - e) // BLOCK_N
    # masked: [g_full, g_end), random blocks (non-causal; causal ones past the keys), [a, e), [f, w_end)
    m_rand = n_rand - u_rand
    nm_a = (g_end - g_full) // BLOCK_N
    nm_b = (e - a) // BLOCK_N
    nm_c = (w_end - f) // BLOCK_N
    if (KIND & 4) != 0 and CAUSAL:
        run = _stride_runs(m_lo_eff, m_hi, S, runs, g_end, tl.minimum(a, k_len), _ceil_to(m_hi, BLOCK_N), False,
                           BLOCK_N)
        n_run = run[7]
    else:
        run = 0  # (unused)
        n_run = 0
    return (rptr, nu_a, u_rand, e, nu_b, nu_a + u_rand + nu_b,
            g_full, nm_a, m_rand, a, nm_b, f, n_run + nm_a + m_rand + nm_b + nm_c, run)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KSHIFT, KLEN, RAND, HP, HMAP, DESC_K, DESC_V,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_rb, stride_rh, stride_rq,
    Tq, Tk, q_offset, H, NH, W, G, WB, S, CP, CC, sm_scale, softcap,
    KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr, R: tl.constexpr, BLK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PACK: tl.constexpr, PAST_KEYS: tl.constexpr, PER_HEAD: tl.constexpr,
    HEAD_MAP: tl.constexpr,
):
    b, hk, k_shift, k_len, qp, heads, rows, row_ok, m_lo_eff, m_hi, live = _query_program(
        H, HMAP, NH, q_offset, Tq, Tk, KSHIFT, KLEN, VARLEN, GROUP, PACK, BLOCK_M, HEAD_MAP)
    if PER_HEAD:
        W, G, WB, S, CP, CC = _head_rules(HP, hk)
    if live:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        TPB: tl.constexpr = BLK // BLOCK_N
        d_ok = offs_d < HEAD_DIM
        q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh + k_shift * stride_kn
        v_base = V + b * stride_vb + hk * stride_vh + k_shift * stride_vn

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        (rptr, nu_a, u_rand, ub0, nu_b, nu, ma0, nm_a, m_rand, mb0, nm_b, mc0, nm, run) = _query_side_plan(
            m_lo_eff, m_hi, k_len, W, G, WB, S, CP, CC, RAND + b * stride_rb, hk, stride_rh, stride_rq, KIND, CAUSAL, R, BLK,
            BLOCK_N, PAST_KEYS)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  DESC_K, DESC_V, b, hk, k_shift, offs_n, offs_d, qp, k_len, W, G, WB, S, CP, CC, sm_scale, softcap,
                                  0, nu_a, rptr, u_rand, ub0, nu_b, ub0, run, nu,
                                  KIND, CAUSAL, BLK, False, HAS_SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, TPB,
                                  (R > 0) and CAUSAL and (KIND & 16) == 0, False, USE_TMA, BLOCK_D, False)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  DESC_K, DESC_V, b, hk, k_shift, offs_n, offs_d, qp, k_len, W, G, WB, S, CP, CC, sm_scale, softcap,
                                  ma0, nm_a, rptr, m_rand, mb0, nm_b, mc0, run, nm,
                                  KIND, CAUSAL, BLK, True, HAS_SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, TPB,
                                  (R > 0) and (PAST_KEYS or not CAUSAL or (KIND & 16) != 0), (KIND & 4) != 0 and CAUSAL,
                                  USE_TMA, BLOCK_D, VARLEN)
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
        o_ptrs = O + b * stride_ob + heads[:, None] * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + (b * H + heads) * Tq + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward
@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                    stride_dob, stride_doh, stride_dom, stride_dod, Tq, H,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * Tq + rows, tl.sum(o * do, 1), mask=rows < Tq)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
             desc_k, desc_v, b, hk, k_shift, offs_n, offs_d, qp, k_len, W, G, WB, S, CP, CC, sm_scale, softcap,
             a0, na, RPTR, n_rand, b0, nb, c0, RUN, n_total,
             KIND: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, MASKED: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TPB: tl.constexpr,
             HAS_RAND: tl.constexpr, HAS_RUNS: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr,
             ZERO_KEYS: tl.constexpr):
    """``TMA`` and ``ZERO_KEYS`` as in :func:`_fwd_loop`."""
    d_ok = offs_d < HEAD_DIM
    for it in range(0, n_total):
        start_n, is_rand = _tile_start(it, a0, na, RPTR, n_rand, b0, nb, c0, RUN, TPB, BLK, BLOCK_N, HAS_RAND, HAS_RUNS)
        kp = start_n + offs_n
        k_ok = (kp < k_len) & (kp >= 0)
        if TMA:
            kT = tl.trans(_tma_tile(desc_k, b, hk, k_shift + start_n, BLOCK_N, BLOCK_D))
            vT = tl.trans(_tma_tile(desc_v, b, hk, k_shift + start_n, BLOCK_N, BLOCK_D))
            if ZERO_KEYS:  # padded slots: dS = 0 there, but 0 times what they hold need not be 0
                kT = tl.where(k_ok[None, :], kT, 0.0)
                vT = tl.where(k_ok[None, :], vT, 0.0)
        else:
            kT = tl.load(k_base + kp[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(v_base + kp[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                         mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT)
        if HAS_SOFTCAP:
            t = _tanh(qk * (sm_scale / softcap))
            s = softcap * t * 1.4426950408889634
        else:
            s = qk * (sm_scale * 1.4426950408889634)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            vis = _visible(qp, kp, k_len, W, G, WB, S, CP, CC, KIND, CAUSAL, BLK)
            if HAS_RAND:
                vis = _rand_visible(vis, is_rand, k_ok[None, :], KIND)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KSHIFT, KLEN, RAND, HP, HMAP, DESC_K, DESC_V,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_rb, stride_rh, stride_rq,
    Tq, Tk, q_offset, H, NH, W, G, WB, S, CP, CC, sm_scale, softcap,
    KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr, R: tl.constexpr, BLK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PACK: tl.constexpr, PAST_KEYS: tl.constexpr, PER_HEAD: tl.constexpr,
    HEAD_MAP: tl.constexpr,
):
    b, hk, k_shift, k_len, qp, heads, rows, row_ok, m_lo_eff, m_hi, live = _query_program(
        H, HMAP, NH, q_offset, Tq, Tk, KSHIFT, KLEN, VARLEN, GROUP, PACK, BLOCK_M, HEAD_MAP)
    if PER_HEAD:
        W, G, WB, S, CP, CC = _head_rules(HP, hk)
    if live:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        TPB: tl.constexpr = BLK // BLOCK_N
        d_ok = offs_d < HEAD_DIM
        mask_qd = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + rows[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=mask_qd, other=0.0)
        do = tl.load(DO + b * stride_dob + heads[:, None] * stride_doh + rows[:, None] * stride_dom
                     + offs_d[None, :] * stride_dod, mask=mask_qd, other=0.0)
        lse = tl.load(LSE + (b * H + heads) * Tq + rows, mask=row_ok, other=float("inf"))
        lse2 = lse * 1.4426950408889634
        delta = tl.load(DELTA + (b * H + heads) * Tq + rows, mask=row_ok, other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh + k_shift * stride_kn
        v_base = V + b * stride_vb + hk * stride_vh + k_shift * stride_vn
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        (rptr, nu_a, u_rand, ub0, nu_b, nu, ma0, nm_a, m_rand, mb0, nm_b, mc0, nm, run) = _query_side_plan(
            m_lo_eff, m_hi, k_len, W, G, WB, S, CP, CC, RAND + b * stride_rb, hk, stride_rh, stride_rq, KIND, CAUSAL, R, BLK,
            BLOCK_N, PAST_KEYS)
        dq = _dq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      DESC_K, DESC_V, b, hk, k_shift, offs_n, offs_d, qp, k_len, W, G, WB, S, CP, CC, sm_scale, softcap,
                      0, nu_a, rptr, u_rand, ub0, nu_b, ub0, run, nu,
                      KIND, CAUSAL, BLK, False, HAS_SOFTCAP, HEAD_DIM, BLOCK_N, TPB,
                      (R > 0) and CAUSAL and (KIND & 16) == 0, False,
                      USE_TMA, BLOCK_D, False)
        dq = _dq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      DESC_K, DESC_V, b, hk, k_shift, offs_n, offs_d, qp, k_len, W, G, WB, S, CP, CC, sm_scale, softcap,
                      ma0, nm_a, rptr, m_rand, mb0, nm_b, mc0, run, nm,
                      KIND, CAUSAL, BLK, True, HAS_SOFTCAP, HEAD_DIM, BLOCK_N, TPB,
                      (R > 0) and (PAST_KEYS or not CAUSAL or (KIND & 16) != 0), (KIND & 4) != 0 and CAUSAL,
                      USE_TMA, BLOCK_D, VARLEN)
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + heads[:, None] * stride_dqh + rows[:, None] * stride_dqm
                 + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask_qd)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dom, stride_dod,
               desc_q, desc_do, b, h, offs_m, offs_d, kp, q_start, row_lo, row_hi, k_len, W, G, WB, S, CP, CC, sm_scale, softcap,
               a0, na, RPTR, n_rand, b0, nb, c0, RUN, it_lo, it_hi,
               KIND: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, MASKED: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TPB: tl.constexpr,
               HAS_RAND: tl.constexpr, HAS_RUNS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_D: tl.constexpr,
               ZERO_ROWS: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles ``[it_lo, it_hi)`` of the plan (BLOCK_M rows each)."""
    d_ok = offs_d < HEAD_DIM
    for it in range(it_lo, it_hi):
        start_m, is_rand = _tile_start(it, a0, na, RPTR, n_rand, b0, nb, c0, RUN, TPB, BLK, BLOCK_M, HAS_RAND, HAS_RUNS)
        qp = start_m + offs_m
        rows = qp - q_start
        row_ok = (rows >= row_lo) & (rows < row_hi)
        if USE_TMA:  # rows outside [0, Tq) read as 0, their lse as +inf
            qT = tl.trans(_tma_tile(desc_q, b, h, start_m - q_start, BLOCK_M, BLOCK_D))
            do = _tma_tile(desc_do, b, h, start_m - q_start, BLOCK_M, BLOCK_D)
            if ZERO_ROWS:  # padding rows inside the tensor: whatever they hold must not reach dK/dV
                qT = tl.where(row_ok[None, :], qT, 0.0)
                do = tl.where(row_ok[:, None], do, 0.0)
        else:
            qT = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        qkT = tl.dot(k, qT)  # [BLOCK_N, BLOCK_M]
        if HAS_SOFTCAP:
            t = _tanh(qkT * (sm_scale / softcap))
            sT = softcap * t * 1.4426950408889634
        else:
            sT = qkT * (sm_scale * 1.4426950408889634)
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            vis = tl.trans(_visible(qp, kp, k_len, W, G, WB, S, CP, CC, KIND, CAUSAL, BLK))
            if HAS_RAND:
                vis = _rand_visible(vis, is_rand, (kp < k_len)[:, None], KIND)
            pT = tl.where(vis, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def _key_tile_ranges(n_lo, n_hi, q_lo, q_hi, W, G, WB, S, CP, CC,
                     KIND: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query-position ranges that see keys ``[n_lo, n_hi)``, valid queries being ``[q_lo, q_hi)``.

    Returns ``s_end`` (global query rows ``[q_lo_al, s_end)``, non-causal only), then the window part
    ``a, e, f, w_end`` (masked ``[a, e)``, unmasked ``[e, f)``, masked ``[f, w_end)``), and whether the
    stride hits past the window are visited as runs (:func:`_far_rules`; else the window reaches ``q_hi``).
    """
    q_lo_al = _floor_to(q_lo, BLOCK_M)
    if KIND & 1:
        if CAUSAL:
            lo = n_lo
            full_lo = n_hi - 1
        else:
            lo = n_lo - W + 1
            full_lo = n_hi - W
        hi = n_hi - 1 + W
        full_hi = n_lo + W
    if KIND & 2:
        kb = n_lo // BLK
        b_hi = (kb + WB) * BLK
        if KIND & 1:  # (causal only) the union of both bands
            hi = tl.maximum(hi, b_hi)
            full_hi = tl.maximum(full_hi, b_hi)
        else:
            if CAUSAL:
                lo = n_lo
                full_lo = n_hi - 1
            else:
                lo = (kb - WB + 1) * BLK
                full_lo = lo
            hi = b_hi
            full_hi = hi
    runs = False
    if KIND & 12:  # a stride or key columns: every later query may see this tile
        reach, runs = _far_rules(S, CC, n_hi - n_lo, KIND, CAUSAL, BLOCK_M)
        hi = tl.where(reach, q_hi, hi)
    if n_lo < G:  # the tile holds global keys: every later query (every query if non-causal) sees them
        if not CAUSAL:
            lo = 0
        hi = q_hi
        if n_hi <= G:
            full_hi = q_hi
    s_end = q_lo_al
    if not CAUSAL:
        if G > 0:  # global query rows see this key tile
            s_end = tl.minimum(_ceil_to(tl.minimum(G, q_hi), BLOCK_M), _ceil_to(q_hi, BLOCK_M))
            s_end = tl.maximum(s_end, q_lo_al)
    lo = tl.maximum(lo, q_lo)
    hi = tl.minimum(hi, q_hi)
    a = tl.maximum(_floor_to(lo, BLOCK_M), s_end)
    w_end = tl.maximum(_ceil_to(hi, BLOCK_M), a)
    e = tl.minimum(tl.maximum(_ceil_to(full_lo, BLOCK_M), a), w_end)
    f = tl.minimum(tl.maximum(_floor_to(full_hi, BLOCK_M), e), w_end)
    return q_lo_al, s_end, a, e, f, w_end, runs


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KSHIFT, KLEN, REV_PTR, REV_IDX, HP, HMAP, DESC_Q, DESC_DO, DESC_K, DESC_V, DKACC,
    DVACC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_pb, stride_ph, stride_ib, stride_ih,
    Tq, Tk, q_offset, H, HKV, NH, W, G, WB, S, CP, CC, sm_scale, softcap, NKT, NSPLIT, GP, NG,
    KIND: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr, R: tl.constexpr, BLK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, SPLIT_GLOBAL: tl.constexpr, PER_HEAD: tl.constexpr, HEAD_MAP: tl.constexpr,
):
    # Key tiles holding global keys are seen by every query: one program each would run T / BLOCK_M
    # query tiles alone after the others finish. With SPLIT_GLOBAL they get NSPLIT programs each
    # (program ids from NKT on), every one over a share of the query tiles, summed by fp32 atomics.
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if SPLIT_GLOBAL:
        is_extra = pid >= NKT
        pid_n = tl.where(is_extra, (pid - NKT) // NSPLIT, pid)
        split = tl.where(is_extra, (pid - NKT) % NSPLIT, 0)
        nsplit = tl.where(is_extra, NSPLIT, 1)
        skip = (pid_n < NG) & (pid < NKT)  # a global tile's own program: the extra ones do it
    else:
        is_extra = False
        pid_n = pid
        split = 0
        nsplit = 1
        skip = False
    b, hk = _key_program_head(HKV, HMAP, NH, HEAD_MAP)
    if PER_HEAD:
        W, G, WB, S, CP, CC = _head_rules(HP, hk)
    k_shift, k_len = _row_keys(b, Tk, KSHIFT, KLEN, VARLEN)
    q_start, row_lo, row_hi = _row_queries(q_offset, Tq, k_shift, k_len, VARLEN)
    n_lo = pid_n * BLOCK_N
    if (n_lo < k_len) & (not skip):
        n_hi = tl.minimum(n_lo + BLOCK_N, k_len)
        offs_n = tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        TPB: tl.constexpr = BLK // BLOCK_M
        kp = n_lo + offs_n
        d_ok = offs_d < HEAD_DIM
        kmask = (kp < k_len)[:, None] & d_ok[None, :]
        if USE_TMA and not VARLEN:  # keys past Tk read as 0, as the masked load would (padding: once, by pointers)
            k = _tma_tile(DESC_K, b, hk, n_lo, BLOCK_N, BLOCK_D)
            v = _tma_tile(DESC_V, b, hk, n_lo, BLOCK_N, BLOCK_D)
        else:
            k = tl.load(K + b * stride_kb + hk * stride_kh + (k_shift + kp)[:, None] * stride_kn
                        + offs_d[None, :] * stride_kd, mask=kmask, other=0.0)
            v = tl.load(V + b * stride_vb + hk * stride_vh + (k_shift + kp)[:, None] * stride_vn
                        + offs_d[None, :] * stride_vd, mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        q_lo = q_start + row_lo
        q_hi = q_start + row_hi
        s_lo, s_end, a, e, f, w_end, runs = _key_tile_ranges(n_lo, n_hi, q_lo, q_hi, W, G, WB, S, CP, CC, KIND, CAUSAL,
                                                             BLK, BLOCK_M)
        HAS_RUNS: tl.constexpr = (KIND & 4) != 0 and CAUSAL
        if HAS_RUNS:  # the query tiles past the window that see this key tile through the stride
            run = _stride_runs(n_lo, n_hi, S, runs, w_end, q_hi, _ceil_to(q_hi, BLOCK_M), True, BLOCK_M)
            n_run = run[7]
        else:
            run = 0  # (unused)
            n_run = 0
        if R > 0:  # query blocks that drew this key block at random: a CSR row of the reverse table
            kb = n_lo // BLK
            j0 = tl.load(REV_PTR + b * stride_pb + hk * stride_ph + kb)
            n_rand = (tl.load(REV_PTR + b * stride_pb + hk * stride_ph + kb + 1) - j0) * TPB
            rptr = REV_IDX + b * stride_ib + hk * stride_ih + j0
        else:
            n_rand = 0
            rptr = REV_IDX
        if KIND & 16:  # extra blocks that may hold keys another rule shows: masked, like the boundary tiles
            u_rand = 0
        else:
            u_rand = n_rand
        m_rand = n_rand - u_rand
        nu_a = (f - e) // BLOCK_M
        nu = nu_a + u_rand
        nm_a = (s_end - s_lo) // BLOCK_M
        nm_b = (e - a) // BLOCK_M
        nm = n_run + nm_a + m_rand + nm_b + (w_end - f) // BLOCK_M
        cu = (nu + nsplit - 1) // nsplit  # this program's share of each loop (all of it unless split)
        cm = (nm + nsplit - 1) // nsplit
        for g in range(GROUP):
            h = hk * GROUP + g
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_base = LSE + (b * H + h) * Tq
            delta_base = DELTA + (b * H + h) * Tq
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                                stride_dom, stride_dod, DESC_Q, DESC_DO, b, h, offs_m, offs_d, kp, q_start, row_lo, row_hi, k_len,
                                W, G, WB, S, CP, CC, sm_scale, softcap, e, nu_a, rptr, u_rand, f, 0, f, run,
                                split * cu, tl.minimum(nu, split * cu + cu),
                                KIND, CAUSAL, BLK, False, HAS_SOFTCAP, HEAD_DIM, BLOCK_M, TPB, (R > 0) and (KIND & 16) == 0,
                                False, USE_TMA, BLOCK_D, VARLEN)
            dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                                stride_dom, stride_dod, DESC_Q, DESC_DO, b, h, offs_m, offs_d, kp, q_start, row_lo, row_hi, k_len,
                                W, G, WB, S, CP, CC, sm_scale, softcap, s_lo, nm_a, rptr, m_rand, a, nm_b, f, run,
                                split * cm, tl.minimum(nm, split * cm + cm),
                                KIND, CAUSAL, BLK, True, HAS_SOFTCAP, HEAD_DIM, BLOCK_M, TPB, (R > 0) and (KIND & 16) != 0,
                                HAS_RUNS, USE_TMA, BLOCK_D, VARLEN)
        dk = dk * sm_scale
        if is_extra:  # a share of a global tile: add into the fp32 buffer [B, Hkv (or NH), GP, BLOCK_D]
            acc_off = (pid_bh * GP + kp)[:, None] * BLOCK_D + offs_d[None, :]
            tl.atomic_add(DKACC + acc_off, dk, mask=kmask, sem="relaxed")
            tl.atomic_add(DVACC + acc_off, dv, mask=kmask, sem="relaxed")
        else:
            tl.store(DK + b * stride_dkb + hk * stride_dkh + (k_shift + kp)[:, None] * stride_dkn
                     + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kmask)
            tl.store(DV + b * stride_dvb + hk * stride_dvh + (k_shift + kp)[:, None] * stride_dvn
                     + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dkdv_global_finish(DK, DV, DKACC, DVACC, KSHIFT, KLEN, HMAP,
                        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                        Tk, HKV, NH, GP, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEAD_MAP: tl.constexpr):
    """Write the summed fp32 dK/dV of the global key tiles into their key slots."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hk = _key_program_head(HKV, HMAP, NH, HEAD_MAP)
    k_shift, k_len = _row_keys(b, Tk, KSHIFT, KLEN, VARLEN)
    kp = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (kp < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc_off = (pid_bh * GP + kp)[:, None] * BLOCK_D + offs_d[None, :]
    dk = tl.load(DKACC + acc_off, mask=mask, other=0.0)
    dv = tl.load(DVACC + acc_off, mask=mask, other=0.0)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + (k_shift + kp)[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + (k_shift + kp)[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=mask)
