"""PyTorch attention under a pattern: the dense oracle and the block-wise CPU path.

* :func:`dense_attention` builds the full mask from :meth:`Pattern.allowed` and runs plain softmax
  attention with autograd. ``O(T^2)`` memory: for tests and small sizes only. It derives token
  positions on its own (a cumulative sum over the padding mask), independently of the block path.
  :func:`attention_probabilities` is the same computation at given token positions that also returns
  the probabilities (``output_attentions``, custom 4D masks in :mod:`hf_sparse.patches.masks`).
* :func:`blockwise_forward` / :func:`blockwise_backward` visit, for each chunk of queries, only the
  keys the pattern needs (:func:`hf_sparse.layout.key_ranges` plus the extra key blocks), keep the
  log-sum-exp, and recompute in the backward like FlashAttention: memory ``O(T * visited keys)`` for
  one chunk at a time and ``O(T * D)`` in total. This is the CPU backend and the fallback.

Shapes: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``, ``Hq % Hkv == 0`` (query head ``h`` uses KV head
``h // (Hq // Hkv)``).
"""

from __future__ import annotations

import torch

from .layout import key_ranges, random_block_size, random_table, rule_sets
from .patterns import Pattern, ceil_div

__all__ = ["dense_attention", "empty_rows_neg_inf", "attention_probabilities", "positions_of", "blockwise_forward", "blockwise_backward",
           "SeqLayout"]


def _softcap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    return s if not softcap else softcap * torch.tanh(s / softcap)


def empty_rows_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    """The backends mark a row that sees no key by ``lse = +inf`` (its probabilities ``exp(s - lse)`` are then
    0 in the backward); callers get the log of an empty sum, ``-inf``."""
    return torch.where(lse == float("inf"), float("-inf"), lse)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    layer: int = 0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The oracle: full ``[B, Hkv, Tq, Tk]`` mask from ``pattern.allowed``, softmax in float32 (or 64).

    Positions count real tokens: key slot ``s`` is at position ``cumsum(mask)[s] - 1``; query ``i``
    sits at key slot ``q_offset + i``. A query row that sees no key (or is padding) returns zeros.
    """
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    slots = q_offset + torch.arange(tq, device=q.device)
    if key_padding_mask is None:
        k_pos = torch.arange(tk, device=q.device).expand(b, tk)
        q_pos = slots.expand(b, tq)
    else:
        if int(slots.max()) >= tk:
            raise ValueError("with key_padding_mask, queries must be key slots: q_offset + Tq <= Tk")
        k_pos = positions_of(key_padding_mask)
        q_pos = k_pos[:, slots]
    out, _, scores = _dense(q, k, v, pattern, q_pos, k_pos, scale, softcap, layer, None)
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def positions_of(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions counting real tokens (True in the mask) from 0; ``-1`` where the mask is False."""
    real = key_padding_mask.bool()
    return (torch.cumsum(real.long(), 1) - 1).masked_fill(~real, -1)


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    softcap: float = 0.0,
    layer: int = 0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention under ``pattern`` at given positions: ``(out [B, Hq, Tq, Dv], probabilities [B, Hq, Tq, Tk])``.

    ``q_pos [B, Tq]`` and ``k_pos [B, Tk]`` are token positions (``-1``: not a token, never attended; such a
    query row is zero). ``mask`` (optional, bool, broadcastable to ``[B, Hq, Tq, Tk]``) further restricts the
    pairs, e.g. a custom 4D attention mask. Softmax in float32 (float64 for float64 inputs), autograd through
    everything. ``O(Tq * Tk)`` memory: the oracle of the tests, and what a caller gets who asks for the
    attention probabilities themselves.
    """
    out, p, _ = _dense(q, k, v, pattern, q_pos, k_pos, scale, softcap, layer, mask)
    return out, p.to(q.dtype)


def _dense(q, k, v, pattern: Pattern, q_pos, k_pos, scale, softcap, layer, mask):
    """``(out, probabilities, masked scores)`` of :func:`attention_probabilities`, in the accumulation dtype."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1, 1)
    q_pos, k_pos = q_pos.long(), k_pos.long()
    kreal, qreal = k_pos >= 0, q_pos >= 0
    # num_keys only matters for non-causal BigBird, whose random draw covers each row's own sequence
    rows = [
        pattern.allowed(q_pos[i].view(1, tq, 1), k_pos[i].view(1, 1, tk), layer=layer, kv_head=heads[0],
                        num_keys=int(kreal[i].sum()))
        for i in range(b)
    ]
    allowed = torch.stack([r.expand(hkv, tq, tk) for r in rows])
    allowed = allowed & kreal.view(b, 1, 1, tk) & qreal.view(b, 1, tq, 1)  # [B, Hkv, Tq, Tk]
    allowed = allowed.repeat_interleave(group, dim=1)
    if mask is not None:
        allowed = allowed & mask.bool()
    kk = k.to(acc).repeat_interleave(group, dim=1)
    vv = v.to(acc).repeat_interleave(group, dim=1)
    s = _softcap(torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale, softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: all -inf -> NaN -> 0
    return torch.matmul(p, vv).to(q.dtype), p, s


class SeqLayout:
    """Per batch row: where key position 0 sits (``k_shift``), how many real keys (``k_len``), the
    position of query row 0 (``q_start``) and the first position past the real queries (``q_limit``).

    Without padding: ``k_shift = 0``, ``k_len = Tk``, ``q_start = q_offset``, ``q_limit = +inf``.
    """

    BIG = 2**30

    def __init__(self, q_start, k_shift, k_len, q_limit):
        self.q_start, self.k_shift, self.k_len, self.q_limit = q_start, k_shift, k_len, q_limit

    @classmethod
    def build(cls, batch: int, tq: int, tk: int, q_offset: int, k_shift=None, k_len=None) -> SeqLayout:
        if k_shift is None:
            return cls([q_offset] * batch, [0] * batch, [tk] * batch, [cls.BIG] * batch)
        ks = [int(x) for x in k_shift.tolist()]
        kl = [int(x) for x in k_len.tolist()]
        return cls([q_offset - s for s in ks], ks, kl, kl)

    def rows(self, b: int, tq: int) -> tuple[int, int]:
        """Valid query rows ``[lo, hi)`` of batch row ``b``."""
        lo = max(0, -self.q_start[b])
        hi = min(tq, self.q_limit[b] - self.q_start[b])
        return lo, max(lo, hi)


def _chunks(p_lo: int, p_hi: int, chunk: int):
    """Position chunks ``[c0, c1)`` covering ``[p_lo, p_hi)``, aligned to ``chunk``."""
    if p_hi <= p_lo:
        return
    c = (p_lo // chunk) * chunk
    while c < p_hi:
        yield max(c, p_lo), min(c + chunk, p_hi)
        c += chunk


def _chunk_keys(pattern: Pattern, c0: int, c1: int, n: int, layer: int, hkv: int, device, table, blk: int):
    """Key positions for one query chunk: ``[Hkv, nsel]`` int64 (``-1`` = padding slot)."""
    parts = [torch.arange(lo, hi, device=device) for lo, hi in key_ranges(pattern, c0, c1, n)]
    shared = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)
    kpos = shared.expand(hkv, -1)
    if table is not None:
        rnd = table[:, c0 // blk]  # [Hkv, R]
        offs = torch.arange(blk, device=device)
        rpos = (rnd.unsqueeze(-1) * blk + offs).view(hkv, -1)
        keep = (rnd.unsqueeze(-1) >= 0).expand(-1, -1, blk).reshape(hkv, -1) & (rpos < n) & ~torch.isin(rpos, shared)
        rpos = torch.where(keep, rpos, -1)  # a block the ranges already hold is not listed twice
        kpos = torch.cat([kpos, rpos], 1)
    return kpos


def _random_table(pattern, q, k, layer, seq: SeqLayout, b: int, blk: int):
    """The extra key blocks for batch row ``b`` (its own key count when non-causal), or None."""
    if not blk:
        return None
    max_pos = seq.q_start[b] + q.shape[2]
    return random_table(pattern, layer=layer, kv_heads=k.shape[1], num_q_blocks=max(ceil_div(max_pos, blk), 1),
                        num_k_blocks=ceil_div(seq.k_len[b], blk), device=q.device)


def _chunk_size(pattern) -> int:
    sizes = [p.chunk() for p in rule_sets(pattern) if p is not None]
    return min(sizes) if sizes else 256


def _chunk_scores(pattern, qc, kb, kpos, c0, c1, n, scale, softcap, layer, acc):
    """Scores ``[Hkv, G, C, nsel]`` (after softcap, before masking), the mask and the gathered keys."""
    hkv = kb.shape[0]
    safe = kpos.clamp_min(0)
    ksel = torch.gather(kb, 1, safe.unsqueeze(-1).expand(-1, -1, kb.shape[-1])).to(acc)
    raw = torch.einsum("hgcd,hkd->hgck", qc.to(acc), ksel) * scale
    qpos = torch.arange(c0, c1, device=kb.device)
    heads = torch.arange(hkv, device=kb.device).view(hkv, 1, 1)
    mask = pattern.allowed(qpos.view(1, -1, 1), kpos.view(hkv, 1, -1), layer=layer, kv_head=heads, num_keys=n)
    mask = (mask & (kpos >= 0).view(hkv, 1, -1)).unsqueeze(1)  # [Hkv, 1, C, nsel]
    return raw, mask, safe, ksel


def _acc_dtype(q: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def blockwise_forward(q, k, v, pattern: Pattern, *, scale: float, softcap: float, seq: SeqLayout, layer: int = 0,
                      compute_dtype: torch.dtype | None = None):
    """Returns ``(out [B, Hq, Tq, D] in q.dtype, lse [B, Hq, Tq])``; ``lse = +inf`` on empty rows.

    Arithmetic runs in float32 (float64 for float64 inputs) unless ``compute_dtype`` says otherwise
    (tests use ``bfloat16`` to measure PyTorch's own error in that dtype).
    """
    bsz, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    acc = _acc_dtype(q, compute_dtype)
    out = torch.zeros(bsz, hq, tq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((bsz, hq, tq), float("inf"), dtype=acc, device=q.device)
    chunk = _chunk_size(pattern)
    blk = random_block_size(pattern)
    for b in range(bsz):
        lo, hi = seq.rows(b, tq)
        s0, n, p0 = seq.k_shift[b], seq.k_len[b], seq.q_start[b]
        if n == 0:
            continue
        table = _random_table(pattern, q, k, layer, seq, b, blk)
        kb, vb = k[b, :, s0 : s0 + n], v[b, :, s0 : s0 + n]
        for c0, c1 in _chunks(p0 + lo, p0 + hi, chunk):
            kpos = _chunk_keys(pattern, c0, c1, n, layer, hkv, q.device, table, blk)
            if kpos.shape[1] == 0:
                continue
            qc = q[b, :, c0 - p0 : c1 - p0].reshape(hkv, g, c1 - c0, d)
            raw, mask, safe, _ = _chunk_scores(pattern, qc, kb, kpos, c0, c1, n, scale, softcap, layer, acc)
            s = _softcap(raw, softcap).masked_fill(~mask, float("-inf"))
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(s - m)
            l_sum = p.sum(-1, keepdim=True)
            vsel = torch.gather(vb, 1, safe.unsqueeze(-1).expand(-1, -1, vb.shape[-1])).to(acc)
            o = torch.einsum("hgck,hkd->hgcd", p, vsel) / l_sum.clamp_min(torch.finfo(acc).tiny)
            row_lse = torch.where(l_sum > 0, m + torch.log(l_sum), torch.full_like(m, float("inf")))
            out[b, :, c0 - p0 : c1 - p0] = o.reshape(hq, c1 - c0, -1).to(q.dtype)
            lse[b, :, c0 - p0 : c1 - p0] = row_lse.reshape(hq, c1 - c0)
    return out, lse


def blockwise_backward(do, q, k, v, out, lse, pattern: Pattern, *, scale: float, softcap: float, seq: SeqLayout,
                       layer: int = 0, compute_dtype: torch.dtype | None = None, d_lse: torch.Tensor | None = None):
    """Gradients ``(dq, dk, dv)`` by recomputation chunk by chunk (FlashAttention-2 style). ``d_lse``: the
    gradient of the log-sum-exp output, if it was used (``dL/ds = p * (dp - delta + d_lse)``)."""
    bsz, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    acc = _acc_dtype(q, compute_dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = (do.to(acc) * out.to(acc)).sum(-1)  # [B, Hq, Tq]
    if d_lse is not None:
        delta = delta - d_lse.to(acc)
    chunk = _chunk_size(pattern)
    blk = random_block_size(pattern)
    for b in range(bsz):
        lo, hi = seq.rows(b, tq)
        s0, n, p0 = seq.k_shift[b], seq.k_len[b], seq.q_start[b]
        if n == 0:  # nothing to attend to: all gradients of this row stay zero
            continue
        table = _random_table(pattern, q, k, layer, seq, b, blk)
        kb, vb = k[b, :, s0 : s0 + n], v[b, :, s0 : s0 + n]
        dk_acc = torch.zeros(hkv * n, d, dtype=acc, device=q.device)  # flat [head * n + position]
        dv_acc = torch.zeros(hkv * n, v.shape[-1], dtype=acc, device=q.device)
        for c0, c1 in _chunks(p0 + lo, p0 + hi, chunk):
            kpos = _chunk_keys(pattern, c0, c1, n, layer, hkv, q.device, table, blk)
            if kpos.shape[1] == 0:
                continue
            rows = slice(c0 - p0, c1 - p0)
            qc = q[b, :, rows].reshape(hkv, g, c1 - c0, d)
            raw, mask, safe, ksel = _chunk_scores(pattern, qc, kb, kpos, c0, c1, n, scale, softcap, layer, acc)
            s = _softcap(raw, softcap)
            lse_c = lse[b, :, rows].reshape(hkv, g, c1 - c0, 1).to(acc)
            p = torch.exp(s - lse_c).masked_fill(~mask, 0.0)
            doc = do[b, :, rows].reshape(hkv, g, c1 - c0, -1).to(acc)
            vsel = torch.gather(vb, 1, safe.unsqueeze(-1).expand(-1, -1, vb.shape[-1])).to(acc)
            dv_sel = torch.einsum("hgck,hgcd->hkd", p, doc)
            dp = torch.einsum("hgcd,hkd->hgck", doc, vsel)
            ds = p * (dp - delta[b, :, rows].reshape(hkv, g, c1 - c0, 1))
            if softcap:
                ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
            dq[b, :, rows] += (torch.einsum("hgck,hkd->hgcd", ds, ksel) * scale).reshape(hq, c1 - c0, d)
            dk_sel = torch.einsum("hgck,hgcd->hkd", ds, qc.to(acc)) * scale
            flat = (torch.arange(hkv, device=q.device).view(-1, 1) * n + safe).view(-1)
            valid = (kpos >= 0).view(-1, 1)
            dk_acc.index_add_(0, flat, (dk_sel.reshape(-1, d) * valid))
            dv_acc.index_add_(0, flat, (dv_sel.reshape(-1, dv_sel.shape[-1]) * valid))
        dk[b, :, s0 : s0 + n] = dk_acc.view(hkv, n, d)
        dv[b, :, s0 : s0 + n] = dv_acc.view(hkv, n, -1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
