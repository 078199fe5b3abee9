"""Backward launcher: the preprocess, dQ and dK/dV kernels (global key tiles split over programs).

A per-head plan runs the dQ and dK/dV kernels once per group of KV heads that share their rules
(:meth:`Problem.launches`): each launch is the uniform kernel of that rule over the heads of its group.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern, ceil_div
from . import prefill
from .attention import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess, _dkdv_global_finish
from .launch import Problem, _cfg, _descs, _interpret, _use_tma

# dK/dV of a key tile with global keys is split over programs of about this many query tiles each
_SPLIT_TILES = 64
_MAX_SPLITS = 128


def backward(do, q, k, v, out, lse, pattern: Pattern, *, scale: float, softcap: float = 0.0, k_shift=None,
             k_len=None, q_offset: int = 0, layer: int = 0, d_lse=None):
    c = Problem.of(q, k, pattern, layer, q_offset, k_shift, k_len)
    do = do.contiguous() if do.stride(-1) != 1 else do
    delta = torch.empty((c.b, c.hq, c.tq), dtype=torch.float32, device=q.device)
    pre_m = 64 if not _interpret() else 16
    _bwd_preprocess[(ceil_div(c.tq, pre_m), c.b * c.hq)](
        out, do, delta, *out.stride(), *do.stride(), c.tq, c.hq,
        HEAD_DIM=c.d, BLOCK_D=c.block_d, BLOCK_M=pre_m,
    )
    if d_lse is not None:  # the lse output was used: dL/ds = p * (dp - delta + d_lse)
        delta -= d_lse
    # padded query rows are never visited by the dQ kernel: their gradient is zero
    alloc = torch.zeros if c.varlen else torch.empty
    dq, dk, dv = (alloc(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))  # contiguous
    for part in c.launches():
        _dq(part, do, q, k, v, dq, lse, delta, pattern, scale, softcap, q_offset)
        _dkdv(part, do, q, k, v, dk, dv, lse, delta, scale, softcap, q_offset)
    return dq, dk, dv


def _dq(c: Problem, do, q, k, v, dq, lse, delta, pattern: Pattern, scale, softcap, q_offset) -> None:
    table = c.tables[0]
    cfg = _cfg("dq", c, q.dtype)
    tma = _use_tma(c, cfg, k, v)
    grid, launch = prefill._query_side_launch(c, cfg, pattern, q_offset)
    _bwd_dq_kernel[grid](
        q, k, v, do, dq, lse, delta, c.k_shift, c.k_len, table, c.hp, c.hmap,
        *_descs(tma, cfg.block_n, c.block_d, k, v),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2),
        c.tq, c.tk, q_offset, c.hq, c.nh, *c.plan.rules, scale, softcap,
        **prefill._shared_constexprs(c, softcap), USE_TMA=tma, **launch,
    )


def _dkdv(c: Problem, do, q, k, v, dk, dv, lse, delta, scale, softcap, q_offset) -> None:
    _, ptr, idx = c.tables
    cfg = _cfg("dkdv", c, q.dtype)
    tma = _use_tma(c, cfg, q, do, k, v)
    nkt = ceil_div(c.tk, cfg.block_n)
    n_global = ceil_div(min(c.plan.g_max, c.tk), cfg.block_n)  # key tiles holding global keys (any head's)
    nsplit = max(1, min(_MAX_SPLITS, ceil_div(ceil_div(c.tq, cfg.block_m), _SPLIT_TILES)))
    gp = n_global * cfg.block_n
    if n_global:  # fp32 sums of the global tiles, [B, NH, GP, BLOCK_D] (program axis 1 order)
        dkacc, dvacc = (torch.zeros(c.b, c.nh, gp, c.block_d, dtype=torch.float32, device=q.device)
                        for _ in range(2))
    else:
        dkacc = dvacc = torch.zeros(1, dtype=torch.float32, device=q.device)  # unused
    common = prefill._shared_constexprs(c, softcap)
    _bwd_dkdv_kernel[(nkt + n_global * nsplit, c.b * c.nh)](
        q, k, v, do, dk, dv, lse, delta, c.k_shift, c.k_len, ptr, idx, c.hp, c.hmap,
        *_descs(tma, cfg.block_m, c.block_d, q, do), *_descs(tma, cfg.block_n, c.block_d, k, v), dkacc, dvacc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        ptr.stride(0) if ptr.shape[0] > 1 else 0, ptr.stride(1), idx.stride(0) if idx.shape[0] > 1 else 0,
        idx.stride(1),
        c.tq, c.tk, q_offset, c.hq, c.hkv, c.nh, *c.plan.rules, scale, softcap, nkt, nsplit, gp, n_global,
        **common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=tma, SPLIT_GLOBAL=n_global > 0,
        **cfg.launch_options(),
    )
    if n_global:
        _dkdv_global_finish[(n_global, c.b * c.nh)](
            dk, dv, dkacc, dvacc, c.k_shift, c.k_len, c.hmap, *dk.stride(), *dv.stride(), c.tk, c.hkv, c.nh, gp,
            VARLEN=c.varlen, HEAD_DIM=c.d, BLOCK_D=c.block_d, BLOCK_N=cfg.block_n, HEAD_MAP=common["HEAD_MAP"],
        )
