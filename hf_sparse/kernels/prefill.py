"""Prefill launcher: the forward kernel (and, for a few query rows, the decode kernel)."""

from __future__ import annotations

import torch

from ..patterns import Pattern, ceil_div
from .attention import _fwd_kernel
from .configs import KernelConfig, pack_setting
from .decoding import _decode
from .launch import Problem, _cfg, _descs, _use_tma

# forward calls with at most this many (query, head) rows per KV head run the decode kernel: one
# program per KV head and split of the keys instead of one per query head walking every key
_DECODE_MAX_ROWS = 64


def _shared_constexprs(c: Problem, softcap: float) -> dict:
    """The compile-time arguments the forward, dQ and dK/dV kernels share."""
    plan = c.plan
    return dict(KIND=plan.kind, CAUSAL=plan.causal, VARLEN=c.varlen, HAS_SOFTCAP=bool(softcap),
                GROUP=c.hq // c.hkv, R=plan.r, BLK=plan.blk, HEAD_DIM=c.d, BLOCK_D=c.block_d,
                PER_HEAD=plan.per_head is not None, HEAD_MAP=c.nh != c.hkv)


def _query_side_launch(c: Problem, cfg: KernelConfig, pattern: Pattern, q_offset: int) -> tuple[tuple, dict]:
    """Grid and query-side constexprs of the forward and dQ kernels.

    ``PACK``: rows per query position in a tile, the GQA group (its heads share each K/V tile the program
    loads) or 1 (one head per program). ``PAST_KEYS``: causal random blocks with queries past the keys, the
    only case where a random block the kernels visit unmasked could reach past the last key (a separate
    specialisation; the usual ones are unchanged)."""
    setting = pack_setting()
    pack = c.hq // c.hkv if (cfg.pack if setting is None else setting) else 1
    grid = (ceil_div(c.tq * pack, cfg.block_m) + 1, c.b * c.nh * (c.hq // c.hkv) // pack)
    past_keys = bool(c.plan.r) and pattern.causal and q_offset + c.tq > c.tk
    return grid, dict(PACK=pack, PAST_KEYS=past_keys, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      **cfg.launch_options())


def forward(q, k, v, pattern: Pattern, *, scale: float, softcap: float = 0.0, k_shift=None, k_len=None,
            q_offset: int = 0, layer: int = 0):
    if 0 < q.shape[2] * (q.shape[1] // k.shape[1]) <= _DECODE_MAX_ROWS and k.shape[2]:  # decode: split keys
        return _decode(q, k, v, pattern, scale=scale, softcap=softcap, k_shift=k_shift, k_len=k_len,
                       q_offset=q_offset, layer=layer)
    c = Problem.of(q, k, pattern, layer, q_offset, k_shift, k_len)
    rules = c.plan.rules
    # rows that no tile covers (padding) must read as zero output and +inf log-sum-exp
    if c.varlen:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((c.b, c.hq, c.tq), float("inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((c.b, c.hq, c.tq), dtype=torch.float32, device=q.device)
    cfg = _cfg("fwd", c, q.dtype)
    table = c.tables[0]
    grid, launch = _query_side_launch(c, cfg, pattern, q_offset)
    tma = _use_tma(c, cfg, k, v)
    _fwd_kernel[grid](
        q, k, v, out, lse, c.k_shift, c.k_len, table, c.hp, c.hmap, *_descs(tma, cfg.block_n, c.block_d, k, v),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        table.stride(0) if table.shape[0] > 1 else 0, table.stride(1), table.stride(2),
        c.tq, c.tk, q_offset, c.hq, c.nh, *rules, scale, softcap,
        **_shared_constexprs(c, softcap), USE_TMA=tma, **launch,
    )
    return out, lse
