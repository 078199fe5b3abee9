"""Triton kernels: attention of a few queries over key slots with explicit positions (decode).

The bounded caches keep keys in slots that do not follow positions (sinks, then a ring buffer), so
the prefill kernels' "slot = position" layout does not hold. Here every slot carries its position and
the token-level predicate of :mod:`hf_sparse.kernels.attention` (``_visible``) decides, per (query,
slot) pair, what is seen; empty slots hold position ``-1``.

Grouped-query attention is packed: one program takes the ``GROUP`` query heads of a KV head (and all
``Tq`` queries, flattened to rows ``query * GROUP + head``), so each K/V tile is read once for its
group. Long caches are split over programs along the slots (flash-decoding); each split writes a
partial output with its running max and sum in float32 and :func:`_decode_combine` merges them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import _head_rules, _row_keys, _tanh, _visible


@triton.jit
def _stride_hit(qp, q_rem, q_min, q_max, kp, lo, hi, S, POSITIONS: tl.constexpr):
    """Whether a key tile holds a key that some row sees through a causal stride ``S > 0`` (``(i - j) % S == 0``,
    ``j <= i``), decided before its keys and values are loaded: it may take a tile that holds none, never miss one.

    Prefill layout (not ``POSITIONS``): the tile's keys are the positions ``[lo, hi)``, ``lo >= 0``; row ``qp``
    (``-1``: padding; ``q_rem = qp % S``) hits it when the first key of ``[lo, qp]`` on its stride,
    ``lo + (qp - lo) % S``, lies below ``hi``. By positions: the slots hold positions ``kp`` (``-1``: empty) and
    the rows lie in ``[q_min, q_max]``; slot ``kp`` is hit when the first position ``>= max(kp, q_min)`` on its
    stride is at most ``q_max`` -- exact when the rows' positions are consecutive, as those of a decode step."""
    s = tl.maximum(S, 1)
    if POSITIONS:
        x = tl.maximum(kp, q_min)
        gap = (x - kp) % s
        first = x + tl.where(gap == 0, 0, s - gap)
        return tl.max(((kp >= 0) & (first <= q_max)).to(tl.int32), 0) > 0
    d = q_rem - lo % s
    first = lo + tl.where(d < 0, d + s, d)
    return tl.max(((qp >= lo) & (first < hi)).to(tl.int32), 0) > 0


@triton.jit
def _decode_kernel(
    Q, K, V, QPOS, KPOS, KSHIFT, KLEN, RAND, HP, OPART, MPART, LPART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_qpb, stride_kpb, stride_rb, stride_rh, stride_rq,
    Tq, Tk, q_offset, HKV, NSPLIT, KEYS_PER_SPLIT, W, G, WB, S, CP, CC, sm_scale, softcap,
    POSITIONS: tl.constexpr, VARLEN: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr, BLK: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PER_HEAD: tl.constexpr,
):
    """Partial attention of rows ``query * GROUP + head`` over the slots ``[pid_s * KEYS_PER_SPLIT, ...)``.

    ``POSITIONS``: slot positions come from ``KPOS`` (``-1`` empty) and query positions from ``QPOS``;
    else the prefill layout: slot ``j`` of row ``b`` holds position ``j - k_shift[b]`` (when below
    ``k_len[b]``) and query ``i`` sits at ``q_offset - k_shift[b] + i``. Either way, tiles that no row can
    see (outside the window span, the globals, the random blocks and the keys a causal stride hits; with
    positions, also tiles of empty slots) are skipped before their keys and values are loaded.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    if PER_HEAD:
        W, G, WB, S, CP, CC = _head_rules(HP, hk)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = r // GROUP
    h = hk * GROUP + r % GROUP
    row_ok = qi < Tq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_shift, k_len = _row_keys(b, Tk, KSHIFT, KLEN, VARLEN)
    if POSITIONS:
        qp = tl.load(QPOS + b * stride_qpb + qi, mask=row_ok, other=-1)
        k_lim = 2**30
    else:
        qp = q_offset - k_shift + qi
        if VARLEN:  # rows before a row's first token or past its last are padding (as in the prefill kernel)
            qp = tl.where(row_ok & (qp >= 0) & (qp < k_len), qp, -1)
        else:  # queries past the keys are real rows: they see every key their pattern allows
            qp = tl.where(row_ok, qp, -1)
        k_lim = k_len
    # the span of positions any row here may see through its window (and the global prefix, below G)
    q_min = tl.min(tl.where(qp >= 0, qp, 2**30), 0)
    q_max = tl.max(qp, 0)
    if KIND & 1:
        span_lo = q_min - W + 1
        span_hi = q_max if CAUSAL else q_max + W - 1
    if KIND & 2:
        b_lo = (q_min // BLK - WB + 1) * BLK
        if KIND & 1:  # (causal only)
            span_lo = tl.minimum(span_lo, b_lo)
        else:
            span_lo = b_lo
            span_hi = q_max if CAUSAL else (q_max // BLK + WB) * BLK - 1
    # key columns reach every earlier key, and so does a stride (non-causal); a causal stride's tiles are
    # tested one by one instead (_stride_hit), so they cost only the tiles that hold a hit
    STRIDE_HITS: tl.constexpr = (KIND & 4) != 0 and CAUSAL
    if KIND & 8:
        span_lo = tl.where(CC > 0, 0, span_lo)
    if (KIND & 4) != 0 and not CAUSAL:
        span_lo = tl.where(S > 0, 0, span_lo)
    if STRIDE_HITS:
        q_rem = qp % tl.maximum(S, 1)  # (prefill layout)
    if not CAUSAL:
        if q_min < G:  # a global query row sees every key
            span_lo = q_min * 0  # same integer type as the positions (int64 position tables)
            span_hi = q_min * 0 + 2**30
    if R > 0:  # BigBird: the random key blocks of each row's query block
        rb_base = RAND + b * stride_rb + hk * stride_rh + (tl.maximum(qp, 0) // BLK) * stride_rq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n0 = pid_s * KEYS_PER_SPLIT
    n1 = tl.minimum(n0 + KEYS_PER_SPLIT, Tk)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start in range(n0, n1, BLOCK_N):
        kn = start + offs_n
        k_ok = kn < n1
        if POSITIONS:
            # only the positions are read first: a tile of empty slots, or of positions outside every row's
            # span and the globals, costs no K/V traffic (a static cache's unused slots, a long full history)
            kp = tl.load(KPOS + b * stride_kpb + kn, mask=k_ok, other=-1)
            near = (kp >= 0) & (((kp >= span_lo) & (kp <= span_hi)) | (kp < G))
            hit = tl.max(near.to(tl.int32), 0) > 0
            lo = 0
            hi = 0
        else:
            p0 = start - k_shift  # position of the tile's first slot
            hit = ((p0 + BLOCK_N > span_lo) & (p0 <= span_hi)) | (p0 < G)
            if R > 0:
                for j in tl.static_range(R):
                    rb = tl.load(rb_base + j, mask=qp >= 0, other=-1)
                    hit |= tl.max(((rb >= 0) & (rb * BLK < p0 + BLOCK_N) & (rb * BLK + BLK > p0)).to(tl.int32), 0) > 0
            lo = tl.maximum(p0, 0)  # the tile's real keys: [lo, hi)
            hi = tl.minimum(p0 + BLOCK_N, tl.minimum(k_lim, n1 - k_shift))
        if STRIDE_HITS:
            if S > 0:  # (a per-head plan's heads without a stride skip the test)
                hit = hit | _stride_hit(qp, q_rem, q_min, q_max, kp if POSITIONS else kn, lo, hi, S, POSITIONS)
        if hit:
            if not POSITIONS:
                kp = tl.where(k_ok, kn - k_shift, -1)
            # only real keys are read: a padded or empty slot may hold anything, and a score masked to -inf
            # still multiplies its value
            real = k_ok & (kp >= 0) & (kp < k_lim)
            k = tl.load(k_base + kn[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=real[None, :] & d_ok[:, None], other=0.0)
            qk = tl.dot(q, k)
            if HAS_SOFTCAP:
                s = softcap * _tanh(qk * (sm_scale / softcap)) * 1.4426950408889634
            else:
                s = qk * (sm_scale * 1.4426950408889634)
            # the token-level predicate by position; empty slots (-1) and padded queries see nothing
            vis = _visible(qp, kp, k_lim, W, G, WB, S, CP, CC, KIND, CAUSAL, BLK)
            if R > 0:  # each slot is read once here, so an extra block simply adds its keys
                kb = kp // BLK
                for j in tl.static_range(R):
                    rb = tl.load(rb_base + j, mask=qp >= 0, other=-1)
                    vis |= (kb[None, :] == rb[:, None]) & (rb >= 0)[:, None] & ((kp >= 0) & (kp < k_lim))[None, :]
            vis = vis & (qp >= 0)[:, None]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + kn[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=real[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    # partials [B, Hq, Tq, NSPLIT(, BLOCK_D)], contiguous
    part = ((b * HKV * GROUP + h) * Tq + qi) * NSPLIT + pid_s
    tl.store(OPART + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(MPART + part, m_i, mask=row_ok)
    tl.store(LPART + part, l_i, mask=row_ok)


@triton.jit
def _decode_combine(OPART, MPART, LPART, OUT, LSE, stride_ob, stride_oh, stride_om, stride_od, H, Tq, NSPLIT,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """Merge the splits of one query row (and its log-sum-exp, +inf for a row that saw no key)."""
    row = tl.program_id(0)  # (b * H + h) * Tq + qi
    b = row // (H * Tq)
    h = (row // Tq) % H
    qi = row % Tq
    offs_s = tl.arange(0, SPLITS)
    s_ok = offs_s < NSPLIT
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(MPART + row * NSPLIT + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(LPART + row * NSPLIT + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)
    l_tot = tl.sum(w * l_s, 0)
    has = l_tot > 0.0
    o = tl.load(OPART + (row * NSPLIT + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.where(has, l_tot, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + qi * stride_om + offs_d * stride_od,
             o.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, l_tot, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(LSE + row, lse)


@triton.jit
def _ring_append_kernel(KBUF, VBUF, POS, COUNTS, KNEW, VNEW, REAL, QPOS, KPOS_OUT,
                        stride_kb, stride_kh, stride_ks, stride_kd,
                        stride_vb, stride_vh, stride_vs, stride_vd,
                        stride_pb, stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
                        stride_rb, stride_ob, H, SLOTS, SINKS, WINDOW,
                        HAS_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One decode step of a sinks + ring cache, one program per batch row. The new token (position
    ``n`` = real tokens so far) goes to its slot (which held ``n - W``, invisible to it); ``KPOS_OUT``
    gets the slot positions that this step's query sees; then ``n + 1 - W``, which no later query sees,
    is marked empty, so at most ``G + W - 1`` tokens stay live."""
    b = tl.program_id(0)
    n = tl.load(COUNTS + b)
    if HAS_REAL:
        real = tl.load(REAL + b * stride_rb) != 0
    else:
        real = True
    slot = tl.where(n < SINKS, n, SINKS + (n - SINKS) % WINDOW)
    slot = tl.where(real, slot, -1)
    # the positions this step's attention reads: the stored ones, the new token in its slot
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, SLOTS, BLOCK_S):
        sl = s0 + offs_s
        old = tl.load(POS + b * stride_pb + sl, mask=sl < SLOTS, other=-1)
        tl.store(KPOS_OUT + b * stride_ob + sl, tl.where(sl == slot, n, old).to(KPOS_OUT.dtype.element_ty),
                 mask=sl < SLOTS)
    tl.debug_barrier()  # every read of POS above happens before the writes below
    if real:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < H)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(KNEW + b * stride_knb + offs_h[:, None] * stride_knh + offs_d[None, :] * stride_knd, mask=mask)
        v = tl.load(VNEW + b * stride_vnb + offs_h[:, None] * stride_vnh + offs_d[None, :] * stride_vnd, mask=mask)
        tl.store(KBUF + b * stride_kb + slot * stride_ks + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                 k.to(KBUF.dtype.element_ty), mask=mask)
        tl.store(VBUF + b * stride_vb + slot * stride_vs + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                 v.to(VBUF.dtype.element_ty), mask=mask)
        dead = n + 1 - WINDOW
        d_slot = SINKS + (dead - SINKS) % WINDOW
        if (dead >= SINKS) & (d_slot != slot):
            if tl.load(POS + b * stride_pb + d_slot) == dead:
                tl.store(POS + b * stride_pb + d_slot, (n * 0 - 1).to(POS.dtype.element_ty))
        tl.store(POS + b * stride_pb + slot, tl.where((dead == n) & (n >= SINKS), -1, n).to(POS.dtype.element_ty))
        tl.store(COUNTS + b, n + 1)
        tl.store(QPOS + b, n.to(QPOS.dtype.element_ty))
    else:
        tl.store(QPOS + b, (n * 0 - 1).to(QPOS.dtype.element_ty))
