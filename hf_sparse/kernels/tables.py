"""The extra-block (random) tables the kernels read: forward ``[B or 1, Hkv, nqb, R]`` and reverse CSR."""

from __future__ import annotations

import functools

import torch

from ..layout import random_table
from ..patterns import Pattern, ceil_div
from .plan import KernelPlan


@functools.lru_cache(maxsize=16)
def _dummy(device: torch.device) -> torch.Tensor:
    """A one-element int32 tensor for kernel arguments a specialisation does not read."""
    return torch.zeros(1, dtype=torch.int32, device=device)


# one entry per (pattern, layer, shape): a forward and backward of a model uses one per BigBird layer, so the
# bound must exceed the deepest model's layer count (or every step rebuilds every layer's tables); each entry
# is small (8 KV heads x 1024 query blocks x 3 blocks of int32 at 64k tokens: 100 KB with its reverse)
@functools.lru_cache(maxsize=512)
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


@functools.lru_cache(maxsize=512)
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
