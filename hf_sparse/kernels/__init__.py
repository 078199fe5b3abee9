"""Host launchers for the Triton kernels (host logic only: shapes, tables, grids, configs).

``forward`` returns ``(out, lse)`` and ``backward`` returns ``(dq, dk, dv)`` for any pattern whose rules
are :class:`~hf_sparse.primitives.Primitives` (read through :mod:`.plan`, never by pattern class); ``forward`` hands calls with few queries to the decode kernel
(:mod:`hf_sparse.kernels.decode`), which also serves ``decode_forward`` (keys by explicit positions)
and ``ring_append`` (one decode step's write into a bounded cache). Nothing here allocates more than ``O(T * D)`` per head: the only tables
are the extra (random) blocks ``[Hkv, num_q_blocks, R]`` and their reverse (CSR) form, and a per-head
plan's ``[Hkv, 8]`` rule table.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..layout import random_table
from ..patterns import Pattern, ceil_div
from .attention import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess, _dkdv_global_finish, _fwd_kernel
from .configs import KernelConfig, pack_setting, pick_config, tma_setting
from .decode import _decode_combine, _decode_kernel, _ring_append_kernel
from .plan import KernelPlan, head_table, kernel_plan, kernel_unfit

try:  # host-side tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

__all__ = ["forward", "backward", "decode_forward", "ring_append", "kernel_plan", "kernel_unfit"]

_BIG = 2**30
# dK/dV of a key tile with global keys is split over programs of about this many query tiles each
_SPLIT_TILES = 64
_MAX_SPLITS = 128
# forward calls with at most this many (query, head) rows per KV head run the decode kernel: one
# program per KV head and split of the keys instead of one per query head walking every key
_DECODE_MAX_ROWS = 64


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=16)
def _dummy(device: torch.device) -> torch.Tensor:
    """A one-element int32 tensor for kernel arguments a specialisation does not read."""
    return torch.zeros(1, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=16)
def _programs_to_fill(device: torch.device) -> int:
    """Two programs per streaming multiprocessor (4 in the interpreter)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=64)
def _random_tables(pattern: Pattern, layer: int, kv_heads: int, nqb: int, nkb: int, device: str):
    """Forward table ``[Hkv, nqb, R]`` and its reverse ``(ptr [Hkv, nkb + 1], idx [Hkv, max])``."""
    table = random_table(pattern, layer=layer, kv_heads=kv_heads, num_q_blocks=nqb, num_k_blocks=nkb, device=device)
    table = torch.where(table < nkb, table, torch.full_like(table, -1)).to(torch.int32).contiguous()
    t = table.long()
    heads = torch.arange(kv_heads, device=device).view(-1, 1, 1).expand_as(t)
    qbs = torch.arange(nqb, device=device).view(1, -1, 1).expand_as(t)
    valid = t >= 0
    h, kb, qb = heads[valid], t[valid], qbs[valid]
    order = torch.argsort((h * nkb + kb) * nqb + qb)
    h, kb, qb = h[order], kb[order], qb[order]
    counts = torch.zeros(kv_heads * nkb, dtype=torch.long, device=device).index_add_(0, h * nkb + kb,
                                                                                       torch.ones_like(kb))
    counts = counts.view(kv_heads, nkb)
    ptr = torch.zeros(kv_heads, nkb + 1, dtype=torch.int32, device=device)
    ptr[:, 1:] = torch.cumsum(counts, 1).to(torch.int32)
    per_head = counts.sum(1)
    width = max(int(per_head.max()) if per_head.numel() else 0, 1)
    idx = torch.zeros(kv_heads, width, dtype=torch.int32, device=device)
    head_start = torch.cumsum(per_head, 0) - per_head
    slot = torch.arange(h.numel(), device=device) - head_start[h]
    idx[h, slot] = qb.to(torch.int32)
    return table, ptr, idx


@functools.lru_cache(maxsize=64)
def _shared_tables(pattern: Pattern, layer: int, hkv: int, nqb: int, nkb: int, device: str):
    """The tables of every batch row: a leading dimension of 1 (read with stride 0 over the batch)."""
    return tuple(t.unsqueeze(0) for t in _random_tables(pattern, layer, hkv, nqb, nkb, device))


def _tables_for(pattern: Pattern, blk: int, layer: int, hkv: int, nqb: int, nkb: int, k_len, device: str):
    """Random tables with a batch dimension: shared (stride 0) unless a non-causal draw differs per row."""
    if pattern.causal or k_len is None:
        return _shared_tables(pattern, layer, hkv, nqb, nkb, device)
    # non-causal: each row draws from its own number of key blocks
    rows = [_random_tables(pattern, layer, hkv, nqb, max(ceil_div(int(n), blk), 1), device)
            for n in k_len.tolist()]
    # a row's key blocks past its own length are never visited, so zero padding is never read
    width = max(r[2].shape[1] for r in rows)
    table = torch.stack([r[0] for r in rows])
    ptr = torch.stack([torch.nn.functional.pad(r[1], (0, nkb + 1 - r[1].shape[1])) for r in rows])
    idx = torch.stack([torch.nn.functional.pad(r[2], (0, width - r[2].shape[1])) for r in rows])
    return table, ptr, idx


def _tables(plan: KernelPlan, pattern: Pattern, layer: int, hkv: int, tq_end: int, tk: int, k_len, device):
    """The extra-block tables (forward, reverse pointers, reverse indices), or one-element dummies."""
    if not plan.r:
        dummy = _dummy(device)
        return dummy.view(1, 1, 1, 1), dummy.view(1, 1, 1), dummy.view(1, 1, 1)
    nqb = max(ceil_div(tq_end, plan.blk), 1)
    nkb = max(ceil_div(tk, plan.blk), 1)
    return _tables_for(pattern, plan.blk, layer, hkv, nqb, nkb, k_len, str(device))


def _common(q, k, pattern, layer, q_offset, k_shift, k_len):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    plan = kernel_plan(pattern, hkv)
    varlen = k_shift is not None
    dummy = _dummy(q.device)
    return dict(
        b=b, hq=hq, hkv=hkv, tq=tq, tk=tk, d=d, plan=plan, varlen=varlen, hp=head_table(plan, q.device),
        k_shift=k_shift if varlen else dummy, k_len=k_len if varlen else dummy,
        tables=_tables(plan, pattern, layer, hkv, q_offset + tq, tk, k_len, q.device),
        block_d=max(triton.next_power_of_2(d), 16),
    )


def _tma_compatible(x: torch.Tensor) -> bool:
    """The copy engine needs a 16-byte aligned base, 16-byte aligned strides and a contiguous last dim."""
    strides, shape = x.stride(), x.shape
    if strides[-1] != 1 or x.data_ptr() % 16 or shape[-1] <= 0:
        return False
    size = x.element_size()
    for st, n in zip(strides[:-1], shape[:-1]):  # (a plain loop: this runs on every launch)
        if n <= 0 or (st * size) % 16 or (st <= 0 and n != 1):
            return False
    return True


def _use_tma(c: dict, cfg: KernelConfig, *tensors: torch.Tensor) -> bool:
    """Whether the kernels load K/V tiles through tensor descriptors: ``configs.set_tma`` decides, else the
    config's ``tma`` and whether the GPU and inputs allow it. Boundary tiles use them too, unless keys are
    padded inside the tensor (the kernels decide that per loop)."""
    setting = tma_setting()
    if setting is False or (setting is None and not cfg.tma):
        return False
    ok = TensorDescriptor is not None and c["d"] == c["block_d"] and all(_tma_compatible(x) for x in tensors)
    if setting is True and not ok:
        raise ValueError("set_tma(True) but these inputs cannot use tensor descriptors (head dim "
                         f"{c['d']} must be a power of two >= 16, strides 16-byte aligned, last dim contiguous); "
                         "use set_tma(None)")
    if not ok:
        return False
    if setting is True or _interpret():
        return True
    return tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9


def _descs(use: bool, rows: int, block_d: int, *tensors: torch.Tensor) -> list:
    """``[B, H, T, D]`` descriptors with ``[1, 1, rows, D]`` boxes, or the tensors themselves (unused)."""
    if not use:
        return list(tensors)
    return [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, block_d]) for x in tensors]


def _cfg(kernel: str, c: dict, dtype: torch.dtype) -> KernelConfig:
    return pick_config(kernel, head_dim=c["d"], kind=c["plan"].config_kind, blk=c["plan"].blk, dtype=dtype,
                       interpret=_interpret())


def _shared_constexprs(c: dict, pattern: Pattern, softcap: float) -> dict:
    """The compile-time arguments the forward, dQ and dK/dV kernels share."""
    plan = c["plan"]
    return dict(KIND=plan.kind, CAUSAL=plan.causal, VARLEN=c["varlen"], HAS_SOFTCAP=bool(softcap),
                GROUP=c["hq"] // c["hkv"], R=plan.r, BLK=plan.blk, HEAD_DIM=c["d"], BLOCK_D=c["block_d"],
                PER_HEAD=plan.per_head is not None)


def _query_side_launch(c: dict, cfg: KernelConfig, pattern: Pattern, q_offset: int) -> tuple[tuple, dict]:
    """Grid and query-side constexprs of the forward and dQ kernels.

    ``PACK``: rows per query position in a tile, the GQA group (its heads share each K/V tile the program
    loads) or 1 (one head per program). ``PAST_KEYS``: causal random blocks with queries past the keys, the
    only case where a random block the kernels visit unmasked could reach past the last key (a separate
    specialisation; the usual ones are unchanged)."""
    setting = pack_setting()
    pack = c["hq"] // c["hkv"] if (cfg.pack if setting is None else setting) else 1
    grid = (ceil_div(c["tq"] * pack, cfg.block_m) + 1, c["b"] * c["hq"] // pack)
    past_keys = bool(c["plan"].r) and pattern.causal and q_offset + c["tq"] > c["tk"]
    return grid, dict(PACK=pack, PAST_KEYS=past_keys, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      **cfg.launch_options())


def forward(q, k, v, pattern: Pattern, *, scale: float, softcap: float = 0.0, k_shift=None, k_len=None,
            q_offset: int = 0, layer: int = 0):
    if 0 < q.shape[2] * (q.shape[1] // k.shape[1]) <= _DECODE_MAX_ROWS and k.shape[2]:  # decode: split keys
        return _decode(q, k, v, pattern, scale=scale, softcap=softcap, k_shift=k_shift, k_len=k_len,
                       q_offset=q_offset, layer=layer)
    c = _common(q, k, pattern, layer, q_offset, k_shift, k_len)
    rules = c["plan"].rules
    # rows that no tile covers (padding) must read as zero output and +inf log-sum-exp
    if c["varlen"]:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((c["b"], c["hq"], c["tq"]), float("inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((c["b"], c["hq"], c["tq"]), dtype=torch.float32, device=q.device)
    cfg = _cfg("fwd", c, q.dtype)
    table = c["tables"][0]
    grid, launch = _query_side_launch(c, cfg, pattern, q_offset)
    tma = _use_tma(c, cfg, k, v)
    _fwd_kernel[grid](
        q, k, v, out, lse, c["k_shift"], c["k_len"], table, c["hp"], *_descs(tma, cfg.block_n, c["block_d"], k, v),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2),
        c["tq"], c["tk"], q_offset, c["hq"], *rules, scale, softcap,
        **_shared_constexprs(c, pattern, softcap), USE_TMA=tma, **launch,
    )
    return out, lse


def backward(do, q, k, v, out, lse, pattern: Pattern, *, scale: float, softcap: float = 0.0, k_shift=None,
             k_len=None, q_offset: int = 0, layer: int = 0):
    c = _common(q, k, pattern, layer, q_offset, k_shift, k_len)
    rules = c["plan"].rules
    do = do.contiguous() if do.stride(-1) != 1 else do
    delta = torch.empty((c["b"], c["hq"], c["tq"]), dtype=torch.float32, device=q.device)
    pre_m = 64 if not _interpret() else 16
    _bwd_preprocess[(ceil_div(c["tq"], pre_m), c["b"] * c["hq"])](
        out, do, delta, *out.stride(), *do.stride(), c["tq"], c["hq"],
        HEAD_DIM=c["d"], BLOCK_D=c["block_d"], BLOCK_M=pre_m,
    )
    # padded query rows are never visited by the dQ kernel: their gradient is zero
    alloc = torch.zeros if c["varlen"] else torch.empty
    dq, dk, dv = (alloc(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))  # contiguous
    table, ptr, idx = c["tables"]
    common = _shared_constexprs(c, pattern, softcap)
    cfg = _cfg("dq", c, q.dtype)
    tma = _use_tma(c, cfg, k, v)
    grid, launch = _query_side_launch(c, cfg, pattern, q_offset)
    _bwd_dq_kernel[grid](
        q, k, v, do, dq, lse, delta, c["k_shift"], c["k_len"], table, c["hp"],
        *_descs(tma, cfg.block_n, c["block_d"], k, v),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2),
        c["tq"], c["tk"], q_offset, c["hq"], *rules, scale, softcap,
        **common, USE_TMA=tma, **launch,
    )
    cfg = _cfg("dkdv", c, q.dtype)
    tma = _use_tma(c, cfg, q, do, k, v) and not c["varlen"]  # padded query rows must not be read unmasked
    nkt = ceil_div(c["tk"], cfg.block_n)
    n_global = ceil_div(min(c["plan"].g_max, c["tk"]), cfg.block_n)  # key tiles holding global keys (any head's)
    nsplit = max(1, min(_MAX_SPLITS, ceil_div(ceil_div(c["tq"], cfg.block_m), _SPLIT_TILES)))
    gp = n_global * cfg.block_n
    if n_global:
        dkacc, dvacc = (torch.zeros(c["b"], c["hkv"], gp, c["block_d"], dtype=torch.float32, device=q.device)
                        for _ in range(2))
    else:
        dkacc = dvacc = torch.zeros(1, dtype=torch.float32, device=q.device)  # unused
    _bwd_dkdv_kernel[(nkt + n_global * nsplit, c["b"] * c["hkv"])](
        q, k, v, do, dk, dv, lse, delta, c["k_shift"], c["k_len"], ptr, idx, c["hp"],
        *_descs(tma, cfg.block_m, c["block_d"], q, do), *_descs(tma, cfg.block_n, c["block_d"], k, v), dkacc, dvacc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        ptr.stride(0) if ptr.shape[0] > 1 else 0, ptr.stride(1), idx.stride(0) if idx.shape[0] > 1 else 0,
        idx.stride(1),
        c["tq"], c["tk"], q_offset, c["hq"], c["hkv"], *rules, scale, softcap, nkt, nsplit, gp, n_global,
        **common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=tma, SPLIT_GLOBAL=n_global > 0,
        **cfg.launch_options(),
    )
    if n_global:
        _dkdv_global_finish[(n_global, c["b"] * c["hkv"])](
            dk, dv, dkacc, dvacc, c["k_shift"], c["k_len"], *dk.stride(), *dv.stride(), c["tk"], c["hkv"], gp,
            VARLEN=c["varlen"], HEAD_DIM=c["d"], BLOCK_D=c["block_d"], BLOCK_N=cfg.block_n,
        )
    return dq, dk, dv


def _decode(q, k, v, pattern: Pattern, *, scale: float, softcap: float, q_pos=None, k_pos=None, k_shift=None,
            k_len=None, q_offset: int = 0, layer: int = 0):
    """Launch the decode kernel and its combine: ``(out, lse)``. Positions from ``q_pos``/``k_pos`` when
    given, else the prefill layout (``q_offset``, padding via ``k_shift``/``k_len``)."""
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


def decode_forward(q, k, v, q_pos, k_pos, pattern: Pattern, *, scale: float, softcap: float = 0.0):
    """Attention of ``q [B, Hq, Tq, D]`` over key slots ``k, v [B, Hkv, S, D]`` whose positions are
    ``k_pos [B, S]`` (``-1`` = empty), queries at ``q_pos [B, Tq]`` (``-1`` = padding, output zero).
    Every pattern without extra (random) blocks; GQA packed, split over the slots."""
    if kernel_plan(pattern, k.shape[1]).r:
        raise NotImplementedError("decode by positions takes patterns without extra (random) blocks; those decode "
                                  "over their full history with sparse_attention")
    return _decode(q, k, v, pattern, scale=scale, softcap=softcap, q_pos=q_pos, k_pos=k_pos)[0]


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
