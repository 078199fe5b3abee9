"""FlexAttention export: a pattern as a ``mask_mod`` and as a ``BlockMask``.

``mask_mod(pattern)`` returns a function ``(b, h, q_idx, kv_idx) -> bool`` with the pattern's
semantics (``h`` is the query head; its KV head is ``h // group``). Patterns with kernel primitives get
a mask made of those rules -- the kernels' own arithmetic, with per-head rule values and the extra
blocks read from small tables -- so Flex can compile it; patterns defined by their predicate only
use :meth:`~hf_sparse.Pattern.allowed` as it is (eager Flex on the CPU runs it).

``block_mask(pattern, q_len, kv_len)`` builds the ``BlockMask`` from :func:`hf_sparse.block_layout`
(``O(T * visited keys)``, no ``T x T`` walk): full tiles need no mask, partial tiles evaluate the
``mask_mod``. Use them to compare with FlexAttention, or as a second oracle in tests::

    from torch.nn.attention.flex_attention import flex_attention
    bm = hf_sparse.block_mask("sliding_window:window=256|strided:stride=64", T, T, heads=Hq, kv_heads=Hkv)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import block_layout, random_block_size, random_table
from .patterns import Pattern, ceil_div, parse_pattern
from .primitives import rule_mask

__all__ = ["mask_mod", "block_mask"]


def mask_mod(pattern: Pattern | str | dict, *, layer: int = 0, kv_heads: int = 1, group: int = 1, q_offset: int = 0,
             num_keys: int | None = None, device: torch.device | str | None = None):
    """A FlexAttention ``mask_mod`` for ``pattern``: query ``q_idx`` sits at position ``q_offset + q_idx``,
    query head ``h`` reads KV head ``h // group`` (``kv_heads`` of them). ``num_keys`` is needed by
    patterns whose extra blocks depend on the length (non-causal BigBird)."""
    pat = parse_pattern(pattern)
    prims = pat.head_primitives(kv_heads) if pat.per_head else (pat.primitives(),) * kv_heads
    if any(p is None for p in prims):
        def predicate_mask(b, h, q_idx, kv_idx):
            return pat.allowed(q_idx + q_offset, kv_idx, layer=layer, kv_head=h // group if kv_heads > 1 else 0,
                               num_keys=num_keys)

        return predicate_mask
    rules = torch.tensor([[p.window, p.global_tokens, p.window_blocks, max(p.block, 1), p.stride,
                           max(p.column_period, 1), p.column_count] for p in prims], dtype=torch.long, device=device)
    causal = pat.causal
    blk = random_block_size(pat)
    table = width = None
    if blk:
        if not num_keys:
            raise ValueError("mask_mod of a pattern with extra (random) blocks needs num_keys= (the sequence length)")
        table = random_table(pat, layer=layer, kv_heads=kv_heads, num_q_blocks=ceil_div(q_offset + num_keys, blk),
                             num_k_blocks=ceil_div(num_keys, blk), device=device)
        width = table.shape[-1]

    def kv_head(h):
        return h // group if kv_heads > 1 else h * 0

    def rules_mask(b, h, q_idx, kv_idx):
        r = rules[kv_head(h)]
        w, g, wb, bs, s, cp, cc = (r[i] for i in range(7))
        q, k = q_idx + q_offset, kv_idx
        vis = rule_mask(q, k, causal=causal, window=w, global_tokens=g, window_blocks=wb, block=bs, stride=s,
                        column_period=cp, column_count=cc)
        if table is not None:
            for i in range(width):  # unrolled: Flex compiles scalar arithmetic
                vis = vis | (table[kv_head(h), q // blk, i] == k // blk)
        return vis & (k >= 0) & (q >= 0)

    return rules_mask


def block_mask(pattern: Pattern | str | dict, q_len: int, kv_len: int, *, heads: int | None = None,
               kv_heads: int | None = None, layer: int = 0, q_offset: int = 0, block_size: int = 128,
               device: torch.device | str | None = None) -> Any:
    """A FlexAttention ``BlockMask`` of ``pattern`` for ``q_len`` queries over ``kv_len`` keys.

    ``heads``/``kv_heads``: query and KV heads (both ``None``: one mask for every head, which suits
    patterns that do not depend on the head). Tiles of ``block_size`` (a pattern with extra blocks uses
    its block when smaller)."""
    from torch.nn.attention.flex_attention import BlockMask

    pat = parse_pattern(pattern)
    hkv = kv_heads or 1
    hq = heads or hkv
    if hq % hkv:
        raise ValueError(f"heads ({hq}) must be a multiple of kv_heads ({hkv})")
    blk = random_block_size(pat)
    tile = min(block_size, blk) if blk else block_size
    per_head = pat.per_head or bool(blk)
    lay = block_layout(pat, q_len, kv_len, block_m=tile, block_n=tile, kv_heads=hkv if per_head else 1,
                       layer=layer, q_offset=q_offset, device=device)
    nkt = ceil_div(kv_len, tile)
    idx, full = lay.kv_index.long(), lay.kv_full
    valid = idx >= 0

    def dense_order(sel):
        count = sel.sum(-1).to(torch.int32)
        key = torch.where(sel, idx, torch.full_like(idx, nkt + 1))
        order, _ = key.sort(-1)
        out = torch.zeros(*idx.shape[:-1], nkt, dtype=torch.int32, device=device)
        width = min(order.shape[-1], nkt)
        out[..., :width] = order[..., :width].clamp_max(nkt - 1).to(torch.int32)
        return count, out

    part_n, part_i = dense_order(valid & ~full)
    full_n, full_i = dense_order(valid & full)
    if per_head and heads is not None:  # per KV head -> per query head
        rep = hq // hkv
        part_n, part_i, full_n, full_i = (x.repeat_interleave(rep, 0) for x in (part_n, part_i, full_n, full_i))
    mm = mask_mod(pat, layer=layer, kv_heads=hkv if per_head else 1, group=hq // hkv, q_offset=q_offset,
                  num_keys=kv_len, device=device)
    return BlockMask.from_kv_blocks(part_n[None], part_i[None], full_n[None], full_i[None], BLOCK_SIZE=tile,
                                    mask_mod=mm, seq_lengths=(q_len, kv_len))
