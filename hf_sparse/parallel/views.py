"""A pattern as seen from one piece of the keys: the patterns that context-parallel pieces run with.

A rank of :mod:`hf_sparse.parallel` holds its queries at absolute positions ``[s, e)`` and, in
separate buffers, the keys it owns and the keys it received. Each buffer is one *piece*; the rank
runs :func:`hf_sparse.ops` attention (kernels or reference) once per piece and merges the pieces by
their log-sum-exp. Those calls number key slots from 0, so each piece gets a pattern in its own
coordinates, stated like any other pattern (predicate and primitives):

* :class:`Shifted` -- the keys are one contiguous run ``[a, a + Tk)``: slot ``t`` is position ``a + t``
  and so is query ``t`` (the queries sit at ``q_offset = s - a``). Token bands and strides do not move;
  the global prefix shrinks to ``g - a``; block rules and key columns need ``a`` to be a multiple of
  their block / period (:func:`alignment`); extra (random) blocks are the base draw moved by ``a``.
* :class:`CompactBlocks` -- the keys are whole extra blocks gathered from anywhere in the sequence,
  a list per KV head, packed one after another; the queries keep their absolute positions. Its only
  rule is "the blocks the base draw lists", in packed numbering. Exact for the blocks that no other
  rule of the base pattern can reach from these queries (the plan puts only those here).

Both answer :meth:`allowed` by asking the base pattern at absolute positions, the single definition
of the pattern, so the reference path masks exactly; the kernels read the primitives.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..layout import random_block_size, random_table
from ..patterns import Pattern, ceil_div
from ..patterns.base import as_long
from ..primitives import Primitives

__all__ = ["Shifted", "CompactBlocks", "alignment"]


def alignment(pattern: Pattern) -> int:
    """The multiple that a key run's first position must be for :class:`Shifted` to express the pattern:
    the block of block-structured rules, the period of key columns (their least common multiple), else 1."""
    align = 1
    for p in pattern.rule_sets():
        if p is None:
            continue
        if p.block_structured:
            align = math.lcm(align, p.block)
        if p.column_count:
            align = math.lcm(align, p.column_period)
    return align


@dataclass(frozen=True)
class _ShiftedSource:
    """The extra blocks of ``source`` for the queries and keys of a run that starts at block ``blocks``."""

    source: object
    blocks: int
    num_k_blocks: int  # of the whole sequence (a non-causal draw depends on it)

    @property
    def causal(self) -> bool:
        return self.source.causal

    def random_table(self, *, layer: int, kv_heads: int, num_q_blocks: int, num_k_blocks: int | None = None,
                     device=None) -> torch.Tensor:
        t = self.source.random_table(layer=layer, kv_heads=kv_heads, num_q_blocks=num_q_blocks + self.blocks,
                                     num_k_blocks=None if self.causal else self.num_k_blocks, device=device)
        return _valid_first(t[:, self.blocks:].long() - self.blocks).to(t.dtype)


def _valid_first(t: torch.Tensor) -> torch.Tensor:
    """Entries ``< 0`` become ``-1`` and move behind the valid ones (what the kernels expect of a table)."""
    big = torch.iinfo(torch.long).max
    out = torch.where(t >= 0, t, big).sort(-1).values
    return torch.where(out == big, -1, out)


@dataclass(frozen=True)
class Shifted(Pattern):
    """``base`` for keys and queries at positions ``offset + slot`` (see the module docstring).

    ``num_keys`` is the length of the whole sequence, for the rules that depend on it (non-causal
    BigBird's draw). ``offset`` must be a multiple of :func:`alignment` of ``base``.
    """

    base: Pattern
    offset: int
    num_keys: int
    name: ClassVar[str] = "shifted"

    def __post_init__(self) -> None:
        align = alignment(self.base)
        if self.offset < 0 or self.offset % align:
            raise ValueError(f"Shifted: offset {self.offset} is not a non-negative multiple of {align}, the block or "
                             f"column period of {self.base.spec()}")

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.base.causal

    @property
    def per_head(self) -> bool:
        return self.base.per_head

    @functools.cached_property
    def _moved(self) -> dict:
        """One moved set of primitives per distinct set of the base: equal rules stay one object, which
        :func:`hf_sparse.layout.random_table` relies on to group heads by their source."""
        return {p: self._move(p) for p in self.base.rule_sets()}

    def _move(self, p: Primitives | None) -> Primitives | None:
        if p is None:
            return None
        a = self.offset
        moved = replace(p, global_tokens=max(0, p.global_tokens - a))
        if p.random_blocks:
            blk = p.block
            source = _ShiftedSource(p.random_source, a // blk, ceil_div(self.num_keys, blk))
            moved = replace(moved, random_source=source)
        return moved

    def primitives(self) -> Primitives | None:
        p = self.base.primitives()
        return None if p is None else self._moved.get(p, self._move(p))

    def head_primitives(self, kv_heads: int) -> tuple[Primitives | None, ...]:
        return tuple(None if p is None else self._moved[p] for p in self.base.head_primitives(kv_heads))

    def rule_sets(self) -> list[Primitives | None]:
        return list(dict.fromkeys(self._moved.values()))

    @property
    def global_tokens_total(self) -> int:
        return max(0, self.base.global_tokens_total - self.offset)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        ok = (q >= 0) & (k >= 0)
        return ok & self.base.allowed(q + self.offset, k + self.offset, layer=layer, kv_head=kv_head,
                                      num_keys=self.num_keys)


@dataclass(frozen=True, eq=False)  # identity: the kernels' caches key on the pattern, and the lists are long
class CompactBlocks(Pattern):
    """Extra key blocks of ``base`` packed per KV head: slot ``c * block + o`` of head ``h`` holds position
    ``blocks[h][c] * block + o``. Queries keep their absolute positions (``q_offset`` = their first one).

    ``tail``: the sequence's last, partial block when some head needs it (non-causal draws only); it
    then sits in the last slot of every head, so that the keys past the sequence's end fall outside
    the piece and no kernel reads them.
    """

    base: Pattern
    blocks: tuple[tuple[int, ...], ...]
    num_keys: int
    tail: bool = False
    name: ClassVar[str] = "compact_blocks"

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.base.causal

    @property
    def block(self) -> int:
        return random_block_size(self.base)

    @property
    def slots(self) -> int:
        """Blocks per head in the packed buffer (the tail block included)."""
        return max((len(b) for b in self.blocks), default=0) + (1 if self.tail else 0)

    @property
    def num_slots(self) -> int:
        """Key slots of the packed buffer: the tail block holds only the sequence's last keys."""
        blk = self.block
        return self.slots * blk - ((-self.num_keys) % blk if self.tail else 0)

    @functools.cached_property
    def _lookup(self) -> torch.Tensor:
        """``[Hkv, blocks of the sequence]``: each block's packed slot per head, ``-1`` where not held."""
        nkb = ceil_div(self.num_keys, self.block)
        lut = torch.full((len(self.blocks), nkb), -1, dtype=torch.long)
        for h, bl in enumerate(self.blocks):
            lut[h, list(bl)] = torch.arange(len(bl))
            if self.tail:
                lut[h, nkb - 1] = self.slots - 1
        return lut

    @functools.cached_property
    def _positions(self) -> torch.Tensor:
        """``[Hkv, slots * block]``: the absolute position of each packed key slot (``-1`` for an empty one)."""
        blk = self.block
        owner = torch.full((len(self.blocks), self.slots), -1, dtype=torch.long)
        lut = self._lookup
        heads, kbs = (lut >= 0).nonzero(as_tuple=True)
        owner[heads, lut[heads, kbs]] = kbs
        pos = owner.unsqueeze(-1) * blk + torch.arange(blk)
        pos = torch.where((owner.unsqueeze(-1) >= 0) & (pos < self.num_keys), pos, -1)
        return pos.view(len(self.blocks), -1)

    def primitives(self) -> Primitives:
        width = max(p.random_blocks for p in self.base.rule_sets() if p is not None)
        return Primitives(causal=self.causal, block=self.block, random_blocks=width, random_source=self,
                          random_disjoint=True)

    def rule_sets(self) -> list[Primitives | None]:
        return [self.primitives()]

    def random_table(self, *, layer: int, kv_heads: int, num_q_blocks: int, num_k_blocks: int | None = None,
                     device=None) -> torch.Tensor:
        """The base draw of every KV head with each block renamed to its packed slot (``-1``: not held here)."""
        nkb = ceil_div(self.num_keys, self.block)
        t = random_table(self.base, layer=layer, kv_heads=kv_heads, num_q_blocks=num_q_blocks, num_k_blocks=nkb)
        lut = self._lookup
        heads = torch.arange(kv_heads).view(-1, 1, 1).expand_as(t)
        packed = torch.where((t >= 0) & (t < nkb), lut[heads, t.clamp(0, nkb - 1)], -1)
        return _valid_first(packed).to(device=device, dtype=torch.int32)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        head = as_long(kv_head, device=k.device)
        pos = self._positions.to(k.device)
        inside = (k >= 0) & (k < pos.shape[1])
        head, kk = torch.broadcast_tensors(head, k.clamp(0, pos.shape[1] - 1))
        absolute = torch.where(inside, pos[head, kk], -1)
        return inside & (absolute >= 0) & self.base.allowed(q, absolute, layer=layer, kv_head=kv_head,
                                                            num_keys=self.num_keys)
