"""Attention by absolute positions: the decode path over bounded KV caches.

:func:`hf_sparse.sparse_attention` assumes that key slot ``s`` holds position ``s`` (shifted by the
padding of its row): keys are a plain prefix of the sequence. A bounded cache breaks that. For
``Longformer(W, G)`` it keeps, per row, the first ``G`` real tokens (the sinks) and a ring buffer of the
last tokens, so the slots hold positions such as ``0 1 2 3 | 1029 1030 1023 1024 ...`` with empty slots
in between. :func:`attention_with_positions` takes the position of every query and key slot
explicitly and asks :meth:`~hf_sparse.Pattern.allowed` -- the single definition of the pattern --
which pairs may attend::

    k_pos:  0  1  2  3  9 10  7  8 -1        (-1: empty or padding slot)
    q_pos 10: x  x  x  x  .  x  x  x  .      Longformer(window=4, global_tokens=4)

Cost: ``O(Tq * Tk)`` scores, computed in chunks of queries, where ``Tk`` is the (bounded) number of
cache slots; every slot is read, so it fits caches whose slots are mostly visible (a sliding window,
a window plus sinks), not a long full history -- there the block-sparse kernels of
:func:`~hf_sparse.sparse_attention` visit only the blocks the pattern needs. Grouped-query attention is
native: the ``G = Hq // Hkv`` query heads of a group are stacked on the query axis of one matrix
product with their KV head, nothing is repeated in memory. Softmax in float32 (float64 for float64
inputs); a query row that sees no key returns zeros. Differentiable through autograd.

No transformers import here: :mod:`hf_sparse.patches.cache` holds the cache that feeds it.
"""

from __future__ import annotations

import torch

from .ops import resolve_backend, validate_qkv
from .patterns import Pattern, parse_pattern
from .patterns.base import declares_cap

__all__ = ["attention_with_positions", "positions_attention", "positions_forward"]

_SCORE_BUDGET = 1 << 26  # float32 scores held at once per query chunk (256 MiB)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
    validate_qkv(q, k, v, value_dim_may_differ=True)
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    for name, pos, n in (("q_pos", q_pos, tq), ("k_pos", k_pos, tk)):
        if not isinstance(pos, torch.Tensor) or pos.shape != (b, n):
            got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"{name} must be a [B, T] = [{b}, {n}] integer tensor of absolute positions (-1 = empty), got {got}")
        if pos.is_floating_point() or pos.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers (absolute positions, -1 = empty), got {pos.dtype}")


def attention_with_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | str | dict,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    layer: int = 0,
    num_keys: int | None = None,
    backend: str = "auto",
    q_cap: torch.Tensor | None = None,
    k_cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of queries over key slots whose absolute positions are given.

    Args:
        q: ``[B, Hq, Tq, D]`` queries (RoPE applied).
        k, v: ``[B, Hkv, Tk, D]`` keys and values in any slot order, ``Hq % Hkv == 0``.
        pattern: a :class:`~hf_sparse.Pattern` or anything :func:`~hf_sparse.parse_pattern` takes.
        q_pos: ``[B, Tq]`` integer positions of the queries (``-1``: padding, the row returns zeros).
        k_pos: ``[B, Tk]`` integer positions of the key slots (``-1``: empty or padding slot, never seen).
        scale: softmax scale, default ``D ** -0.5``.
        softcap: optional logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2).
        layer: layer index (BigBird draws its random blocks per layer and KV head).
        num_keys: only for non-causal BigBird, whose random draw covers the whole sequence.
        backend: ``"triton"`` (the decode kernel of :mod:`hf_sparse.kernels.decode`: one launch, GQA
            packed, split over the slots; dense, window and Longformer patterns, positions below 2**30,
            no autograd),
            ``"reference"`` (the PyTorch code below, differentiable) or ``"auto"`` (the kernel on CUDA
            when it applies and no gradient is needed; ``"dense"`` is taken as ``"reference"``).
        q_cap: for a pattern with ``max_distance=N`` (:mod:`hf_sparse.cap`): the queries rotated to position
            ``min(i, N)``, same shape as ``q``; required for such a pattern (give the pattern with
            ``max_distance=none`` when every query is known to stand at or before ``N``).
        k_cap: for a pattern whose dense heads cap their distances (``dense:max_distance=N``): the keys rotated
            back to position 0 (``k`` unrotated by ``k_pos``), same shape as ``k``; required for such a pattern.

    Returns:
        ``[B, Hq, Tq, Dv]`` in the dtype of ``q``. Equal to :func:`~hf_sparse.sparse_attention` on the
        full history whenever the slots hold every key the pattern lets the queries see.

    Example (one decode step over a cache of ``S`` slots)::

        out = attention_with_positions(q, k_cache, v_cache, "longformer:window=4096,global_tokens=4",
                                       q_pos=torch.tensor([[9000]]), k_pos=cache_positions)
    """
    pat = parse_pattern(pattern)
    _check(q, k, v, q_pos, k_pos)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap or 0.0)
    if q_cap is not None or k_cap is not None or declares_cap(pat):
        from .cap import capped_positions_attention

        return capped_positions_attention(q, q_cap, k, v, pat, q_pos=q_pos, k_pos=k_pos, scale=scale,
                                          softcap=softcap, layer=layer, num_keys=num_keys, backend=backend,
                                          k_cap=k_cap)
    return positions_attention(q, k, v, pat, q_pos=q_pos, k_pos=k_pos, scale=scale, softcap=softcap, layer=layer,
                               num_keys=num_keys, backend=backend)[0]


def positions_attention(q, k, v, pat: Pattern, *, q_pos, k_pos, scale: float, softcap: float, layer: int,
                        num_keys: int | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of :func:`attention_with_positions` on checked inputs (the decode kernel or PyTorch)."""
    if _use_decode_kernel(backend, q, k, v, pat) and q.shape[2] and k.shape[2]:
        from .kernels import decode_forward

        return decode_forward(q, k, v, q_pos, k_pos, pat, scale=scale, softcap=softcap, return_lse=True)

    def visible(qp, kp, kv_head):
        return pat.allowed(qp, kp, layer=layer, kv_head=kv_head, num_keys=num_keys)

    return positions_forward(q, k, v, q_pos, k_pos, visible, scale=scale, softcap=softcap)


def positions_forward(q, k, v, q_pos, k_pos, visible, *, scale: float, softcap: float):
    """``(out, lse)`` of ``q`` over every key slot that ``visible(q_pos [B, 1, n, 1], k_pos [B, 1, 1, Tk],
    kv_head [1, Hkv, 1, 1])`` allows (a boolean ``[B, 1 or Hkv, n, Tk]``), in PyTorch, differentiable;
    ``lse`` is ``-inf`` on rows that see nothing (their output is zero)."""
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_pos, k_pos = q_pos.long(), k_pos.long()
    if tq == 0 or tk == 0:
        return q.new_zeros((b, hq, tq, dv)), torch.full((b, hq, tq), float("-inf"), dtype=acc, device=q.device)
    kv_head = torch.arange(hkv, device=q.device).view(1, hkv, 1, 1)  # head-free patterns broadcast over it
    kt = k.to(acc).transpose(-1, -2)  # [B, Hkv, D, Tk]
    va = v.to(acc)
    # bounded by the scores and, over few keys (the cap's global pass), by the float32 copy of the queries
    chunk = max(1, min(tq, _SCORE_BUDGET // max(1, b * hq * max(tk, d))))
    outs, lses = [], []
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        n = c1 - c0
        # [B, Hkv, G * n, D]: the query heads of a group share one product with their KV head
        qc = q[:, :, c0:c1].to(acc).reshape(b, hkv, group * n, d)
        s = torch.matmul(qc, kt) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.view(b, hkv, group, n, tk)
        ok = visible(q_pos[:, None, c0:c1, None], k_pos[:, None, None, :], kv_head)  # [B, 1 or Hkv, n, Tk]
        ok = ok.unsqueeze(2)
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)  # masked entries: exp(-inf) = 0
        denom = p.sum(-1, keepdim=True)
        seen = denom > 0
        p = p / torch.where(seen, denom, torch.ones_like(denom))  # a row with no visible key stays zero
        o = torch.matmul(p.view(b, hkv, group * n, tk), va)  # [B, Hkv, G * n, Dv]
        outs.append(o.view(b, hq, n, dv))
        lse = torch.where(seen, m + torch.log(torch.where(seen, denom, torch.ones_like(denom))), float("-inf"))
        lses.append(lse.view(b, hq, n))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out.to(q.dtype), lses[0] if len(lses) == 1 else torch.cat(lses, 2)


def _use_decode_kernel(backend: str, q, k, v, pat: Pattern) -> bool:
    """Whether the Triton decode kernel serves this call (through :func:`hf_sparse.ops.resolve_backend`)."""
    if backend in ("reference", "dense"):
        return False
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend={backend!r} is not one of auto, triton, reference, dense")
    reason = None
    if v.shape[-1] != q.shape[-1]:
        reason = f"value head dim {v.shape[-1]} differs from the query head dim {q.shape[-1]}"
    elif any(p is not None and p.random_blocks for p in pat.head_primitives(k.shape[1])):
        reason = "patterns with extra (random) blocks decode over their full history with the prefill kernels"
    elif torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        reason = "gradients are needed and the decode kernel has no backward"
    if reason is not None:
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this decode: {reason}. Use backend='auto' or 'reference'.")
        return False
    chosen = resolve_backend("triton" if backend == "triton" else "auto", q, k, pat, what="this decode")
    return chosen == "triton" and (backend == "triton" or q.is_cuda)
