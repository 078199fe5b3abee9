"""``bigbird``: block-sparse attention with window blocks, global blocks and random blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..primitives import MAX_POSITION, Primitives
from .base import (
    Pattern,
    as_long,
    check_max_distance,
    check_options,
    max_distance_option,
    option,
    register_pattern,
    set_cap,
)

__all__ = ["BigBird", "bigbird_random_blocks", "MAX_BLOCK", "MAX_RANDOM_BLOCKS"]

_MASK32 = 0xFFFFFFFF
#: The largest block: a tile of the kernels never straddles a block, and the reference holds one block
#: of queries against its keys at a time.
MAX_BLOCK = 4096
#: Random blocks per query block: every kernel unrolls over them.
MAX_RANDOM_BLOCKS = 64


@dataclass(frozen=True)
class BigBird(Pattern):
    """Block-sparse attention: window blocks, global blocks and random blocks.

    In blocks of ``block`` tokens, query block ``qb`` sees key block ``kb`` when
    ``qb - window_blocks < kb <= qb`` (window), ``kb < global_blocks`` (global), or ``kb`` is one of
    ``random_blocks`` blocks drawn from the earlier blocks not already seen (fewer when fewer exist).
    Causal inside the diagonal block. The random draw is a pure function of
    ``(seed, layer, kv_head, qb)``, shared by the query heads of one GQA group.

    Non-causal: ``|qb - kb| < window_blocks``, global blocks as keys and as queries (a global query
    block sees every block), and random blocks drawn from all other blocks of the sequence (the draw
    then also depends on the number of key blocks).

    ``max_distance``: the distance cap of the global blocks, as for :class:`Longformer` (global keys in
    the window blocks or in a random block keep their own distance).
    """

    block: int = option(64, minimum=16, maximum=MAX_BLOCK, power_of_two=True,
                        hint="e.g. block=64 (16, 32, 64, 128, 256 ...)")
    window_blocks: int = option(3, minimum=1, maximum=MAX_POSITION // 16, hint="it counts the query's own block, e.g. 3")
    global_blocks: int = option(1, minimum=0, maximum=MAX_POSITION // 16, hint="use 0 for none, e.g. global_blocks=1")
    random_blocks: int = option(3, minimum=0, maximum=MAX_RANDOM_BLOCKS, hint="use 0 for none, e.g. random_blocks=3")
    seed: int = option(0, minimum=0, maximum=_MASK32, hint="any 32-bit non-negative integer, e.g. seed=0")
    causal: bool = option(True)
    max_distance: int | str | None = max_distance_option()
    name: ClassVar[str] = "bigbird"

    def __post_init__(self) -> None:
        check_options(self)
        check_max_distance(self)

    def primitives(self) -> Primitives:
        return Primitives(causal=self.causal, block=self.block, window_blocks=self.window_blocks,
                          global_tokens=self.global_blocks * self.block, random_blocks=self.random_blocks,
                          random_source=self if self.random_blocks else None,
                          random_disjoint=bool(self.random_blocks), max_distance=set_cap(self.max_distance))

    def random_table(
        self, *, layer: int, kv_heads: int, num_q_blocks: int, num_k_blocks: int | None = None, device=None
    ) -> torch.Tensor:
        """``[kv_heads, num_q_blocks, random_blocks]`` int32 key-block indices, ``-1`` where fewer exist."""
        heads = torch.arange(kv_heads, device=device).view(-1, 1)
        qb = torch.arange(num_q_blocks, device=device).view(1, -1)
        return bigbird_random_blocks(self, layer, heads, qb, num_k_blocks=num_k_blocks).to(torch.int32)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        qb, kb = q.div(self.block, rounding_mode="floor"), k.div(self.block, rounding_mode="floor")
        head = as_long(kv_head, device=q.device)
        if self.causal:
            base = ((kb > qb - self.window_blocks) | (kb < self.global_blocks)) & (k <= q)
            nkb = None
        else:
            if num_keys is None:
                raise ValueError("BigBird(causal=False).allowed needs num_keys= (the random draw covers the sequence)")
            nkb = -(-num_keys // self.block)
            base = ((qb - kb).abs() < self.window_blocks) | (kb < self.global_blocks) | (qb < self.global_blocks)
        if self.random_blocks:
            rnd = bigbird_random_blocks(self, layer, head, qb.clamp_min(0), num_k_blocks=nkb)
            base = base | (rnd == kb.unsqueeze(-1)).any(-1)
        return ok & base


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser (lowbias32 shape). Constants stay below 2**31 so every product of a
    # 32-bit value fits in int64 and the result is the same on every device.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x4F6CDD1D) & _MASK32
    return x ^ (x >> 16)


def bigbird_random_blocks(
    pattern: BigBird, layer: int, kv_head, q_block, *, num_k_blocks: int | None = None
) -> torch.Tensor:
    """Random key blocks of BigBird: ``[..., random_blocks]`` int64, ``-1`` where fewer exist.

    A pure function of ``(seed, layer, kv_head, q_block)`` (and ``num_k_blocks`` when non-causal):
    the same on every device, process, forward, backward, prefill and decode. It draws, without
    replacement, from the blocks the window and global blocks do not already cover, with Floyd's
    algorithm (one hash per draw, so the cost is ``O(random_blocks)`` per query block).
    """
    head = as_long(kv_head)
    qb = as_long(q_block, device=head.device)
    head, qb = torch.broadcast_tensors(head, qb)
    r_count, wb, gb = pattern.random_blocks, pattern.window_blocks, pattern.global_blocks
    out = torch.full((*qb.shape, r_count), -1, dtype=torch.long, device=qb.device)
    if r_count == 0:
        return out
    if pattern.causal:
        # candidates: gb <= kb <= qb - wb  (earlier than the window, not global)
        n_cand = (qb - wb + 1 - gb).clamp_min(0)
    else:
        if num_k_blocks is None:
            raise ValueError("non-causal BigBird needs num_k_blocks to draw random blocks")
        win_lo = (qb - wb + 1).clamp_min(gb)
        win_hi = (qb + wb - 1).clamp_max(num_k_blocks - 1)
        n_cand = (num_k_blocks - gb - (win_hi - win_lo + 1).clamp_min(0)).clamp_min(0)
        n_cand = torch.where(qb < gb, torch.zeros_like(n_cand), n_cand)  # a global query block sees every block
    h = _mix32(torch.full_like(qb, pattern.seed & _MASK32) ^ 0x2545F491)
    h = _mix32(h ^ (layer & _MASK32))
    h = _mix32(h ^ head)
    h = _mix32(h ^ qb)
    picks = []
    for r in range(r_count):
        j = n_cand - r_count + r  # Floyd: draw t in [0, j], take j if t was already drawn
        t = _mix32(h ^ (r + 1)) % (j.clamp_min(0) + 1)
        if picks:
            seen = (torch.stack(picks, -1) == t.unsqueeze(-1)).any(-1)
            t = torch.where(seen, j, t)
        # fewer candidates than draws: take them all, in order
        t = torch.where(n_cand <= r_count, torch.full_like(t, r), t)
        picks.append(t)
    idx = torch.stack(picks, -1)
    valid = idx < n_cand.unsqueeze(-1)
    # map candidate index -> block index
    kb = idx + gb
    if not pattern.causal:
        win_lo = (qb - wb + 1).clamp_min(gb).unsqueeze(-1)
        win_len = ((qb + wb - 1).clamp_max(num_k_blocks - 1).unsqueeze(-1) - win_lo + 1).clamp_min(0)
        kb = torch.where(kb >= win_lo, kb + win_len, kb)
    return torch.where(valid, kb, out)


register_pattern("bigbird", BigBird)
