"""Which keys each rank needs from the others: a pure function of the pattern and the shard lengths.

Rank ``r`` holds positions ``[s_r, e_r)`` of one sequence of ``N`` tokens (rank order = sequence
order). Its queries need, besides its own keys:

* *shared ranges*: contiguous key positions every KV head reads -- the window band reaching into the
  ranks before it (``W - 1`` keys, the *halo*; for non-causal patterns also after it), the global
  prefix, and, for strides, key columns, dense bands and predicate-only patterns, every earlier key
  (those patterns reach everywhere, :attr:`~hf_sparse.Primitives.reaches_everywhere`, so the rank
  gathers all earlier shards). From :func:`hf_sparse.layout.key_ranges` over the whole shard, widened
  to :func:`~hf_sparse.parallel.views.alignment` so that a block never straddles a run's edge;
* *extra blocks per KV head*: the random blocks its query blocks draw (BigBird), read from
  :func:`hf_sparse.layout.random_table` -- a pure function, so every rank knows what every other rank
  will ask for -- less those inside the shared ranges or its own shard.

:func:`shard_plan` computes this for every rank at once (each rank needs the others' lists to know
what to send) and keeps it, per pattern, lengths, KV heads and, for random blocks, layer.
:meth:`ShardPlan.pieces` cuts a rank's keys into the runs its attention calls take.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from ..layout import key_ranges, random_block_size, random_table, window_range
from ..patterns import Pattern, ceil_div
from .views import CompactBlocks, Shifted, alignment

__all__ = ["ShardPlan", "Piece", "shard_plan", "balanced_lengths"]

Ranges = tuple[tuple[int, int], ...]


def balanced_lengths(total: int, world: int, *, multiple_of: int = 1) -> tuple[int, ...]:
    """Shard lengths for ``total`` tokens over ``world`` ranks: as even as possible, every boundary a
    multiple of ``multiple_of`` (the last shard takes the remainder). Boundaries on a multiple of
    :func:`~hf_sparse.parallel.views.alignment` let a rank attend to its own keys while the halo
    travels (see :meth:`ShardPlan.overlapped`)."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    units = total // multiple_of
    bounds = [min(total, (units * r // world) * multiple_of) for r in range(world)] + [total]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def _merge(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _subtract(ranges, lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        out.extend(r for r in ((a, min(b, lo)), (max(a, hi), b)) if r[1] > r[0])
    return out


def _inside(ranges, lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


def _memo(method):
    """Keep a method's results on the (frozen) plan itself: they live and go with it."""

    @functools.wraps(method)
    def cached(self, *args):
        memo = self.__dict__.setdefault("_memo", {})
        key = (method.__name__, *args)
        if key not in memo:
            memo[key] = method(self, *args)
        return memo[key]

    return cached


@dataclass(frozen=True)
class Piece:
    """One attention call of a rank: keys ``[remote before | own keys | remote after]`` under ``pattern``.

    ``before`` / ``after`` are slices of the rank's shared buffer (positions in order); ``own`` says
    whether the rank's own keys sit between them; ``compact``: the keys are the packed extra blocks.
    ``rows``: the rank's query rows ``[r0, r1)`` that can see any of these keys (the halo of a window
    reaches the first ``W - 1`` rows only); the call runs on those rows, at ``q_offset + r0``.
    """

    pattern: Pattern
    q_offset: int
    rows: tuple[int, int]
    before: tuple[int, int] = (0, 0)
    own: bool = False
    after: tuple[int, int] = (0, 0)
    compact: bool = False


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """What every rank needs (see the module docstring). ``starts[r]`` is the first position of rank ``r``
    (``starts[-1] = N``); ``shared[r]`` its shared ranges; ``blocks[r][h]`` its extra blocks of KV head
    ``h``; ``tail[r]``: it needs the sequence's last, partial block as an extra block (non-causal)."""

    pattern: Pattern
    starts: tuple[int, ...]
    kv_heads: int
    layer: int
    shared: tuple[Ranges, ...]
    blocks: tuple[tuple[tuple[int, ...], ...], ...]
    tail: tuple[bool, ...]

    @property
    def world(self) -> int:
        return len(self.starts) - 1

    @property
    def num_keys(self) -> int:
        return self.starts[-1]

    def shard(self, rank: int) -> tuple[int, int]:
        return self.starts[rank], self.starts[rank + 1]

    @property
    def block(self) -> int:
        return random_block_size(self.pattern)

    # -- what travels -----------------------------------------------------------------------------
    @_memo
    def shared_from(self, dst: int, src: int) -> Ranges:
        """The positions of ``src``'s shard in ``dst``'s shared ranges (absolute, in order)."""
        s, e = self.shard(src)
        return tuple((max(a, s), min(b, e)) for a, b in self.shared[dst] if min(b, e) > max(a, s))

    @_memo
    def blocks_from(self, dst: int, src: int) -> torch.Tensor:
        """``[n, 3]`` int64 rows ``(kv_head, block, packed slot)``: ``dst``'s extra blocks that hold keys of
        ``src``'s shard, ordered by head then block. A block that straddles two shards comes from both
        owners, each sending its own keys (zeros elsewhere)."""
        blk = self.block
        s, e = self.shard(src)
        rows = []
        if e > s and (any(self.blocks[dst]) or self.tail[dst]):
            first, last = s // blk, (e - 1) // blk  # the blocks that overlap [s, e)
            nkb = ceil_div(self.num_keys, blk)
            tail_slot = self.compact_view(dst).slots - 1
            for h, held in enumerate(self.blocks[dst]):
                lo, hi = bisect.bisect_left(held, first), bisect.bisect_right(held, last)
                kbs = torch.tensor(held[lo:hi], dtype=torch.long)
                rows.append(torch.stack([torch.full_like(kbs, h), kbs, torch.arange(lo, hi)], 1))
                if self.tail[dst] and first <= nkb - 1 <= last:
                    rows.append(torch.tensor([[h, nkb - 1, tail_slot]]))
        return torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.long)

    def compact_view(self, rank: int) -> CompactBlocks | None:
        """The pattern of ``rank``'s packed extra blocks (``None`` when it needs none from others)."""
        return self._compact(rank)

    @_memo
    def _compact(self, rank: int) -> CompactBlocks | None:
        if not any(self.blocks[rank]) and not self.tail[rank]:
            return None
        return CompactBlocks(self.pattern, self.blocks[rank], self.num_keys, self.tail[rank])

    def shared_keys(self, rank: int) -> int:
        return sum(b - a for a, b in self.shared[rank])

    def received(self, rank: int) -> tuple[int, int]:
        """``(shared keys, extra-block keys)`` that ``rank`` receives per batch row: shared keys carry every
        KV head, an extra-block key one head (a straddling block counted once per owner)."""
        blk = self.block
        extra = blk * sum(len(self.blocks_from(rank, src)) for src in range(self.world) if src != rank)
        return self.shared_keys(rank), extra

    def received_bytes(self, rank: int, *, batch: int, head_dim: int, value_dim: int | None = None,
                       dtype_bytes: int = 2) -> int:
        """Bytes ``rank`` receives per layer in the forward (K and V); the backward sends as many back."""
        shared, extra = self.received(rank)
        per_key = head_dim + (head_dim if value_dim is None else value_dim)
        return batch * per_key * dtype_bytes * (shared * self.kv_heads + extra)

    # -- the attention calls ------------------------------------------------------------------------
    def overlapped(self, rank: int) -> bool:
        """True when the rank attends to its own keys before the others' arrive: causal patterns whose
        shard starts on a multiple of :func:`alignment`. Otherwise its own keys join the runs next to
        them in one call, after the exchange."""
        s, _ = self.shard(rank)
        return self.pattern.causal and s % alignment(self.pattern) == 0

    @_memo
    def pieces(self, rank: int) -> tuple[Piece, ...]:
        """The attention calls of ``rank``, the own-keys-only call first when :meth:`overlapped`."""
        s, e = self.shard(rank)
        n = self.num_keys
        runs, offsets, at = [], [], 0
        for a, b in self.shared[rank]:
            runs.append((a, b))
            offsets.append((at, at + b - a))
            at += b - a
        every = (0, e - s)
        out = []
        if self.overlapped(rank):
            out.append(Piece(Shifted(self.pattern, s, n), 0, every, own=True))
            others = list(zip(runs, offsets))
        else:
            left = next((i for i, r in enumerate(runs) if r[1] == s), None)
            right = next((i for i, r in enumerate(runs) if r[0] == e), None)
            lo = runs[left][0] if left is not None else s
            out.append(Piece(Shifted(self.pattern, lo, n), s - lo, every,
                             before=offsets[left] if left is not None else (0, 0), own=True,
                             after=offsets[right] if right is not None else (0, 0)))
            others = [(r, o) for i, (r, o) in enumerate(zip(runs, offsets)) if i not in (left, right)]
        for (a, b), o in others:
            if a > s:
                raise AssertionError(f"rank {rank}: a key run [{a}, {b}) after its queries that is not next to them")
            rows = self._rows_seeing(rank, a, b)
            if rows[1] > rows[0]:
                out.append(Piece(Shifted(self.pattern, a, n), s - a + rows[0], rows, before=o))
        view = self.compact_view(rank)
        if view is not None:
            out.append(Piece(view, s, every, compact=True))
        return tuple(out)

    def _rows_seeing(self, rank: int, a: int, b: int) -> tuple[int, int]:
        """The query rows of ``rank`` that may see a key of ``[a, b)`` (before its shard): for causal bands
        the first rows, as far as the band reaches back below ``b``; every row where a global key, a stride,
        key columns or an extra block may be among them."""
        s, e = self.shard(rank)
        rules = self.pattern.rule_sets()
        reach = any(p is None or p.random_blocks or p.stride or p.column_count for p in rules)
        if reach or not self.pattern.causal or a < self.pattern.global_tokens_total:
            return 0, e - s
        lo, hi = 0, e - s  # the band's first key is non-decreasing in the query: bisect the last row below b
        while lo < hi:
            mid = (lo + hi) // 2
            if window_range(self.pattern, s + mid, s + mid + 1, self.num_keys)[0] < b:
                lo = mid + 1
            else:
                hi = mid
        return 0, lo


def _extra_blocks(pattern: Pattern, starts: tuple[int, ...], kv_heads: int, layer: int,
                  shared: list[list[tuple[int, int]]]):
    """Per rank and KV head, the drawn blocks outside its shared ranges and its shard; the tail flags."""
    world, n = len(starts) - 1, starts[-1]
    blk = random_block_size(pattern)
    empty = tuple(() for _ in range(kv_heads))
    if not blk or n == 0:
        return [empty] * world, [False] * world
    nkb = ceil_div(n, blk)
    table = random_table(pattern, layer=layer, kv_heads=kv_heads, num_q_blocks=nkb, num_k_blocks=nkb)
    if table is None:
        return [empty] * world, [False] * world
    partial_tail = n % blk != 0 and not pattern.causal
    blocks, tails = [], []
    for r in range(world):
        s, e = starts[r], starts[r + 1]
        if e == s:
            blocks.append(empty)
            tails.append(False)
            continue
        rows = table[:, s // blk : (e - 1) // blk + 1].reshape(kv_heads, -1)
        covered = _merge([*shared[r], (s, e)])
        per_head, tail = [], False
        for h in range(kv_heads):
            kbs = torch.unique(rows[h][(rows[h] >= 0) & (rows[h] < nkb)])
            lo, hi = kbs * blk, (kbs * blk + blk).clamp_max(n)
            inside = torch.zeros_like(kbs, dtype=torch.bool)
            touches = torch.zeros_like(inside)
            for a, b in covered:
                inside |= (a <= lo) & (hi <= b)
                touches |= (a < hi) & (lo < b)
            if bool((touches & ~inside).any()):
                raise AssertionError(f"rank {r}: an extra block straddles the edge of its key runs {covered}")
            kbs = kbs[~inside]
            if partial_tail and kbs.numel() and int(kbs[-1]) == nkb - 1:
                tail, kbs = True, kbs[:-1]
            per_head.append(tuple(kbs.tolist()))
        blocks.append(tuple(per_head))
        tails.append(tail)
    return blocks, tails


def _shared_ranges(pattern: Pattern, s: int, e: int, n: int, align: int) -> list[tuple[int, int]]:
    if e == s:
        return []
    ranges = []
    for lo, hi in key_ranges(pattern, s, e, n):
        ranges.append((lo // align * align, min(n, ceil_div(hi, align) * align)))
    if align > 1:  # a block across the shard's edges is read in one run with the shard
        ranges.append((s // align * align, s))
        if not pattern.causal:
            ranges.append((e, min(n, ceil_div(e, align) * align)))
    if pattern.causal:
        ranges = [(lo, min(hi, e)) for lo, hi in ranges]
    return _subtract(_merge(ranges), s, e)


@functools.lru_cache(maxsize=256)
def shard_plan(pattern: Pattern, lengths: tuple[int, ...], *, kv_heads: int = 1, layer: int = 0) -> ShardPlan:
    """The plan of ``pattern`` over shards of ``lengths`` tokens (rank order), cached.

    ``layer`` matters for patterns with random blocks only (pass 0 otherwise, so that every layer
    shares one plan).
    """
    lengths = tuple(int(x) for x in lengths)
    if not lengths or any(x < 0 for x in lengths):
        raise ValueError(f"shard lengths must be non-negative ints, one per rank, got {lengths}")
    starts = (0, *[sum(lengths[: i + 1]) for i in range(len(lengths))])
    n = starts[-1]
    if pattern.per_head:
        pattern.check_heads(kv_heads)
    align = alignment(pattern)
    shared = [_shared_ranges(pattern, starts[r], starts[r + 1], n, align) for r in range(len(lengths))]
    blocks, tails = _extra_blocks(pattern, starts, kv_heads, layer, shared)
    # the non-causal tail rides with the extra blocks; anything else is read in the shared runs
    return ShardPlan(pattern, starts, kv_heads, layer, tuple(tuple(r) for r in shared), tuple(blocks), tuple(tails))


def uses_layer(pattern: Pattern) -> bool:
    """Whether the plan depends on the layer (random blocks are drawn per layer)."""
    return random_block_size(pattern) > 0

