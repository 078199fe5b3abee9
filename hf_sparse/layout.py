"""Block layouts: for each query tile, the key tiles a pattern needs (and the reverse, for backward).

Everything here works in *position* space (real tokens counted from 0). The Triton kernels derive
the same ranges arithmetically inside the kernel; the functions below are the host-side statement
of those ranges, used by the reference path, by tests (which check them against
:meth:`Pattern.allowed`) and by benchmarks (which turn them into FlexAttention ``BlockMask``s).

For a run of query positions ``[q_lo, q_hi)`` a pattern needs at most three groups of keys, read
from its :class:`~hf_sparse.primitives.Primitives`:

* a *window* range ``[lo, hi)`` (the bands; the whole causal prefix for dense attention, strides,
  key columns and patterns defined by their predicate only),
* a *global* range ``[0, g)`` (the global prefix),
* the *extra* (random) key blocks, which differ per KV head and per query block.

Memory is ``O(T * visited keys)`` at most: nothing here builds a ``T x T`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .patterns import Pattern, ceil_div
from .primitives import Primitives

__all__ = ["key_ranges", "window_range", "global_range", "BlockLayout", "block_layout", "attended_pairs",
           "random_table", "rule_sets", "random_block_size"]


def _clip(lo: int, hi: int, n: int) -> tuple[int, int]:
    lo, hi = max(lo, 0), min(hi, n)
    return (lo, hi) if hi > lo else (0, 0)


def rule_sets(pattern: Pattern) -> list[Primitives | None]:
    """The distinct primitives among the pattern's KV heads (``None``: a head defined by its predicate only)."""
    return pattern.rule_sets()


def global_range(pattern: Pattern, q_lo: int, q_hi: int, num_keys: int) -> tuple[int, int]:
    """Key positions ``[0, g)`` that are global for queries ``[q_lo, q_hi)`` (``(0, 0)`` for none)."""
    g = pattern.global_tokens_total
    if not pattern.causal and g > 0 and q_lo < g:
        return _clip(0, num_keys, num_keys)  # a global query row sees every key
    return _clip(0, min(g, q_hi) if pattern.causal else g, num_keys)


def _prim_window(p: Primitives | None, causal: bool, q_lo: int, q_hi: int, num_keys: int) -> tuple[int, int]:
    if p is None or p.stride or p.column_count:  # a rule that reaches any earlier key: the whole prefix
        return 0, q_hi if causal else num_keys
    lo, hi = q_hi, q_lo  # empty unless a band is on
    if p.window:
        w = p.window
        lo, hi = q_lo - w + 1, q_hi if causal else q_hi - 1 + w
    if p.window_blocks:
        b, wb = p.block, p.window_blocks
        lo = min(lo, (q_lo // b - wb + 1) * b)
        hi = max(hi, q_hi if causal else ((q_hi - 1) // b + wb) * b)
    return lo, hi


def window_range(pattern: Pattern, q_lo: int, q_hi: int, num_keys: int) -> tuple[int, int]:
    """The contiguous key positions ``[lo, hi)`` the local part of the pattern covers for ``[q_lo, q_hi)``
    (for per-head patterns: of every head; for strides, key columns and predicate-only patterns: the
    whole causal prefix)."""
    spans = [_prim_window(p, pattern.causal, q_lo, q_hi, num_keys) for p in rule_sets(pattern)]
    return _clip(min(a for a, _ in spans), max(b for _, b in spans), num_keys)


def key_ranges(pattern: Pattern, q_lo: int, q_hi: int, num_keys: int) -> list[tuple[int, int]]:
    """Sorted, disjoint key position ranges (random blocks excluded) for queries ``[q_lo, q_hi)``."""
    if q_hi <= q_lo or q_hi <= 0:
        return []
    q_lo = max(q_lo, 0)
    w = window_range(pattern, q_lo, q_hi, num_keys)
    g = global_range(pattern, q_lo, q_hi, num_keys)
    ranges = sorted(r for r in (g, w) if r[1] > r[0])
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def random_block_size(pattern: Pattern) -> int:
    """The block of the extra key blocks (0 when the pattern has none)."""
    sizes = {p.block for p in rule_sets(pattern) if p is not None and p.random_blocks}
    if len(sizes) > 1:
        raise ValueError(f"{pattern.spec()}: heads draw extra key blocks of different sizes {sorted(sizes)}; use one block size")
    return sizes.pop() if sizes else 0


def random_table(pattern: Pattern, *, layer: int, kv_heads: int, num_q_blocks: int, num_k_blocks: int | None,
                 device=None) -> torch.Tensor | None:
    """Extra key blocks ``[kv_heads, num_q_blocks, R]`` int64 (``-1`` = none, valid entries first) of every
    KV head, from each head's source; ``None`` when the pattern has none."""
    heads = pattern.head_primitives(kv_heads)
    width = max((p.random_blocks for p in heads if p is not None), default=0)
    if width == 0:
        return None
    out = torch.full((kv_heads, num_q_blocks, width), -1, dtype=torch.long, device=device)
    for source in dict.fromkeys(p.random_source for p in heads if p is not None and p.random_blocks):
        rows = [h for h, p in enumerate(heads) if p is not None and p.random_source == source]
        t = source.random_table(layer=layer, kv_heads=kv_heads, num_q_blocks=num_q_blocks,
                                num_k_blocks=None if source.causal else num_k_blocks, device=device).long()
        out[rows, :, : t.shape[-1]] = t[rows]
    return out


def random_key_blocks(pattern: Pattern, *, layer: int, kv_heads: int, q_block: int, num_keys: int) -> torch.Tensor:
    """Extra (random) key blocks of one query block: ``[kv_heads, r]`` int64 (``-1`` = none)."""
    blk = random_block_size(pattern)
    if not blk:
        return torch.empty(kv_heads, 0, dtype=torch.long)
    nkb = ceil_div(num_keys, blk)
    table = random_table(pattern, layer=layer, kv_heads=kv_heads, num_q_blocks=q_block + 1, num_k_blocks=nkb)
    rnd = table[:, q_block]
    return torch.where(rnd < nkb, rnd, torch.full_like(rnd, -1))


@dataclass
class BlockLayout:
    """Tile-level layout of a pattern, like FlexAttention's ``BlockMask`` but per KV head.

    ``kv_count[h, m]`` key tiles are listed in ``kv_index[h, m, :kv_count]`` (ascending) for query tile
    ``m``; ``kv_full`` says which of them every query of the tile sees entirely (no mask needed).
    ``pairs[h]`` is the exact number of attended (query, key) pairs.
    """

    block_m: int
    block_n: int
    kv_count: torch.Tensor  # [H, NQT] int32
    kv_index: torch.Tensor  # [H, NQT, MAXK] int32, padded with -1
    kv_full: torch.Tensor  # [H, NQT, MAXK] bool
    pairs: torch.Tensor  # [H] int64

    def transpose(self, num_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each key tile, the query tiles that visit it: ``(q_count [H, NKT], q_index [H, NKT, MAXQ])``."""
        h, nqt, maxk = self.kv_index.shape
        valid = self.kv_index >= 0
        heads = torch.arange(h).view(-1, 1, 1).expand_as(self.kv_index)[valid]
        qt = torch.arange(nqt).view(1, -1, 1).expand_as(self.kv_index)[valid]
        kt = self.kv_index[valid].long()
        key = (heads * num_k_tiles + kt) * nqt + qt
        key, _ = key.sort()
        heads, kt, qt = key // (num_k_tiles * nqt), (key // nqt) % num_k_tiles, key % nqt
        count = torch.zeros(h * num_k_tiles, dtype=torch.long).index_add_(0, heads * num_k_tiles + kt, torch.ones_like(kt))
        maxq = int(count.max()) if count.numel() else 0
        start = torch.cumsum(count, 0) - count
        slot = torch.arange(key.numel()) - start[heads * num_k_tiles + kt]
        q_index = torch.full((h * num_k_tiles, max(maxq, 1)), -1, dtype=torch.int32)
        q_index[heads * num_k_tiles + kt, slot] = qt.to(torch.int32)
        return count.view(h, num_k_tiles).to(torch.int32), q_index.view(h, num_k_tiles, -1)


def block_layout(
    pattern: Pattern,
    num_queries: int,
    num_keys: int,
    *,
    block_m: int = 128,
    block_n: int = 128,
    kv_heads: int = 1,
    layer: int = 0,
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """Build the tile layout of ``pattern`` for queries at ``q_offset..q_offset+num_queries-1``.

    Query tile ``m`` holds query rows ``[m * block_m, (m + 1) * block_m)`` (row ``i`` is at position
    ``q_offset + i``). The candidate tiles come from :func:`key_ranges` and the random blocks; each is
    then checked against :meth:`Pattern.allowed`, so the result is exact. Cost ``O(T * visited)``.
    """
    nqt = ceil_div(num_queries, block_m)
    heads = torch.arange(kv_heads, device=device)
    rows_all = torch.arange(block_m, device=device)
    cols_all = torch.arange(block_n, device=device)
    per_tile: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
    pairs = torch.zeros(kv_heads, dtype=torch.long, device=device)
    blk = random_block_size(pattern)
    table = None
    if blk:
        table = random_table(pattern, layer=layer, kv_heads=kv_heads, num_q_blocks=ceil_div(q_offset + num_queries, blk),
                             num_k_blocks=ceil_div(num_keys, blk), device=device)
    maxk = 1
    for m in range(nqt):
        r0, r1 = m * block_m, min((m + 1) * block_m, num_queries)
        q_lo, q_hi = q_offset + r0, q_offset + r1
        tiles = set()
        for lo, hi in key_ranges(pattern, q_lo, q_hi, num_keys):
            tiles.update(range(lo // block_n, ceil_div(hi, block_n)))
        cand = torch.tensor(sorted(tiles), dtype=torch.long, device=device)
        if table is not None:
            qbs = torch.arange(max(q_lo, 0) // blk, (q_hi - 1) // blk + 1, device=device)
            rnd = table[:, qbs].reshape(kv_heads, -1)
            rnd = rnd[rnd >= 0]
            first = (rnd * blk) // block_n
            last = (rnd * blk + blk - 1).clamp_max(num_keys - 1) // block_n
            extra = [torch.arange(int(a), int(b) + 1, device=device) for a, b in zip(first.tolist(), last.tolist())]
            cand = torch.unique(torch.cat([cand, *extra]))
        rows = q_lo + rows_all[: r1 - r0]
        cols = (cand.view(-1, 1) * block_n + cols_all.view(1, -1)).view(-1)
        ok = pattern.allowed(
            rows.view(1, -1, 1), cols.view(1, 1, -1), layer=layer, kv_head=heads.view(-1, 1, 1), num_keys=num_keys
        )
        ok = (ok & (cols < num_keys).view(1, 1, -1)).expand(kv_heads, r1 - r0, cols.numel())
        ok = ok.reshape(kv_heads, r1 - r0, len(cand), block_n)
        cnt = ok.sum(dim=(1, 3))  # [H, ncand]
        full = ok.all(dim=3).all(dim=1) & (cand * block_n + block_n <= num_keys) & (r1 - r0 == block_m)
        pairs += cnt.sum(1)
        per_tile.append((cand, cnt > 0, full))
        maxk = max(maxk, int((cnt > 0).sum(1).max()) if len(cand) else 0)
    kv_count = torch.zeros(kv_heads, nqt, dtype=torch.int32, device=device)
    kv_index = torch.full((kv_heads, nqt, maxk), -1, dtype=torch.int32, device=device)
    kv_full = torch.zeros(kv_heads, nqt, maxk, dtype=torch.bool, device=device)
    for m, (cand, used, full) in enumerate(per_tile):
        for h in range(kv_heads):
            idx = cand[used[h]]
            kv_count[h, m] = len(idx)
            kv_index[h, m, : len(idx)] = idx.to(torch.int32)
            kv_full[h, m, : len(idx)] = full[h][used[h]]
    return BlockLayout(block_m, block_n, kv_count, kv_index, kv_full, pairs)


def attended_pairs(pattern: Pattern, num_queries: int, num_keys: int | None = None, *, kv_heads: int = 1, layer: int = 0,
                   q_offset: int = 0, device: torch.device | str | None = None) -> int:
    """Exact number of attended (query, key) pairs summed over KV heads (FLOP counts, density)."""
    num_keys = num_queries + q_offset if num_keys is None else num_keys
    tile = random_block_size(pattern) or 128
    lay = block_layout(pattern, num_queries, num_keys, block_m=tile, block_n=tile, kv_heads=kv_heads, layer=layer,
                       q_offset=q_offset, device=device)
    return int(lay.pairs.sum())
