"""Decode launchers: a few queries over long keys (split over programs), by positions, and the ring write."""

from __future__ import annotations

import functools

import torch
import triton

from ..patterns import Pattern, ceil_div
from ..reference import empty_rows_neg_inf
from .decode import _decode_combine, _decode_kernel, _ring_append_kernel
from .launch import _interpret
from .plan import head_table, kernel_plan
from .tables import _dummy, _tables


@functools.lru_cache(maxsize=16)
def _programs_to_fill(device: torch.device) -> int:
    """Two programs per streaming multiprocessor (4 in the interpreter)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _decode(q, k, v, pattern: Pattern, *, scale: float, softcap: float, q_pos=None, k_pos=None, k_shift=None,
            k_len=None, q_offset: int = 0, layer: int = 0):
    """Launch the decode kernel and its combine: ``(out, lse)``. Positions from ``q_pos``/``k_pos`` when
    given, else the prefill layout (``q_offset``, padding via ``k_shift``/``k_len``). Under
    ``torch.compile`` the positions form runs as one custom op (:func:`_decode_positions_op`)."""
    if q_pos is not None and torch.compiler.is_compiling():
        return _decode_positions_op(q, k, v, q_pos, k_pos, pattern.spec(), scale, softcap)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    plan = kernel_plan(pattern, hkv)
    positions = q_pos is not None
    dummy = _dummy(q.device)
    table = _tables(plan, pattern, layer, hkv, q_offset + tq, tk, k_len, q.device)[0]
    block_d = max(triton.next_power_of_2(d), 16)
    interpret = _interpret()
    if interpret:
        block_m, block_n, warps, stages = 16, 16, 1, 1
    else:
        block_m, block_n, warps, stages = min(64, max(16, triton.next_power_of_2(tq * group))), 64, 4, 2
    m_tiles = ceil_div(tq * group, block_m)
    # enough programs to fill the GPU, at least four key tiles each
    nsplit = max(1, min(ceil_div(tk, 4 * block_n), ceil_div(_programs_to_fill(q.device), m_tiles * b * hkv)))
    per_split = ceil_div(ceil_div(tk, nsplit), block_n) * block_n
    nsplit = ceil_div(tk, per_split)
    rows = b * hq * tq * nsplit
    parts = torch.empty(rows * (block_d + 2), dtype=torch.float32, device=q.device)  # one allocation
    opart, mpart, lpart = parts[: rows * block_d], parts[rows * block_d : rows * (block_d + 1)], parts[-rows:]
    if positions:
        q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    else:
        q_pos = k_pos = dummy.view(1, 1)
    varlen = k_shift is not None
    _decode_kernel[(m_tiles, b * hkv, nsplit)](
        q, k, v, q_pos, k_pos, k_shift if varlen else dummy, k_len if varlen else dummy, table, head_table(plan, q.device),
        opart, mpart, lpart,
        *q.stride(), *k.stride(), *v.stride(), q_pos.stride(0), k_pos.stride(0),
        table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2),
        tq, tk, q_offset, hkv, nsplit, per_split, *plan.rules, scale, softcap,
        POSITIONS=positions, VARLEN=varlen, KIND=plan.kind, CAUSAL=plan.causal, HAS_SOFTCAP=bool(softcap),
        GROUP=group, R=plan.r, BLK=plan.blk, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PER_HEAD=plan.per_head is not None, num_warps=warps, num_stages=stages,
    )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    _decode_combine[(b * hq * tq,)](
        opart, mpart, lpart, out, lse, *out.stride(), hq, tq, nsplit,
        HEAD_DIM=d, BLOCK_D=block_d, SPLITS=max(triton.next_power_of_2(nsplit), 2),
        num_warps=1 if interpret else 4,
    )
    return out, lse


@torch.library.custom_op("hf_sparse::decode_positions", mutates_args=())
def _decode_positions_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                         pattern: str, scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel by positions as an opaque op for ``torch.compile``: dynamo does not trace the host
    launcher, and a CUDA graph replays its two launches (everything host-side -- the plan, the per-head
    table, the grid -- is decided when the graph is captured; nothing is built per step)."""
    from ..ops import _pattern_from_spec

    return _decode(q, k, v, _pattern_from_spec(pattern), scale=scale, softcap=softcap, q_pos=q_pos, k_pos=k_pos)


@_decode_positions_op.register_fake
def _(q, k, v, q_pos, k_pos, pattern, scale, softcap):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def decode_forward(q, k, v, q_pos, k_pos, pattern: Pattern, *, scale: float, softcap: float = 0.0,
                   return_lse: bool = False):
    """Attention of ``q [B, Hq, Tq, D]`` over key slots ``k, v [B, Hkv, S, D]`` whose positions are
    ``k_pos [B, S]`` (``-1`` = empty), queries at ``q_pos [B, Tq]`` (``-1`` = padding, output zero).
    Every pattern without extra (random) blocks; GQA packed, split over the slots. ``return_lse``: also
    the ``[B, Hq, Tq]`` float32 log-sum-exp (natural log, ``-inf`` on rows that see no key)."""
    if kernel_plan(pattern, k.shape[1]).r:
        raise NotImplementedError("decode by positions takes patterns without extra (random) blocks; those decode "
                                  "over their full history with sparse_attention")
    out, lse = _decode(q, k, v, pattern, scale=scale, softcap=softcap, q_pos=q_pos, k_pos=k_pos)
    return (out, empty_rows_neg_inf(lse)) if return_lse else out


def ring_append(k_buf, v_buf, pos, counts, k_new, v_new, real, *, slots: int, sinks: int, window: int):
    """Write one decode token per row into a sinks + ring cache in one launch (see
    :func:`hf_sparse.kernels.decode._ring_append_kernel`). Updates the buffers, ``pos`` and ``counts``
    in place; returns the ``[B, 1]`` query positions (``-1`` where ``real`` marks padding) and the
    ``[B, slots]`` key positions that this step's attention sees."""
    b, h, _, d = k_new.shape
    q_pos = torch.empty(b, 1, dtype=pos.dtype, device=pos.device)
    k_pos = torch.empty(b, slots, dtype=pos.dtype, device=pos.device)
    real_t = real if real is not None else counts
    _ring_append_kernel[(b,)](
        k_buf, v_buf, pos, counts, k_new, v_new, real_t, q_pos, k_pos, *k_buf.stride(), *v_buf.stride(),
        pos.stride(0), k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1),
        v_new.stride(3), real_t.stride(0), k_pos.stride(0), h, slots, sinks, window,
        HAS_REAL=real is not None, HEAD_DIM=d, BLOCK_H=max(triton.next_power_of_2(h), 2),
        BLOCK_D=max(triton.next_power_of_2(d), 16), BLOCK_S=16 if _interpret() else 1024,
        num_warps=1 if _interpret() else 4,
    )
    return q_pos, k_pos
