"""The primitives the kernels consume, and that patterns compose.

A pattern (:mod:`hf_sparse.patterns`) states *what* a query sees through its predicate
:meth:`~hf_sparse.Pattern.allowed`. For the block-sparse kernels, the block layouts, the reference
path and the bounded caches, it also states it as a :class:`Primitives`: a small set of rules that
the kernels know how to iterate fast. A query at position ``i`` sees key ``j`` (``j <= i`` when
causal, ``0 <= j``) when any rule that is switched on allows it:

==================  ======================================  ==========================================
rule                fields                                  causal rule (non-causal in the docstring)
==================  ======================================  ==========================================
token band         ``window`` (0: off)                     ``i - window < j``
block band         ``block``, ``window_blocks`` (0: off)   ``i // block - window_blocks < j // block``
global prefix      ``global_tokens`` (0: off)              ``j < global_tokens``
relative stride    ``stride`` (0: off)                     ``(i - j) % stride == 0``
key columns        ``column_period``, ``column_count``     ``j % column_period >= column_period -
                                                            column_count``
extra key blocks   ``random_blocks`` (0: off), its source  ``j // block`` is one of the blocks that
                                                            ``random_source.random_table`` lists for
                                                            ``(layer, kv_head, i // block)``
==================  ======================================  ==========================================

Non-causal: the bands are symmetric (``|i - j| < window``, ``|qb - kb| < window_blocks``), and a query
inside the global prefix (``i < global_tokens``) sees every key. Strides and columns are causal only.

``max_distance`` (``None``: off) does not change which keys a query sees but how it scores some of
them: a key of the global prefix that no other rule shows is scored with the query rotated to position
``min(i, max_distance)`` (:mod:`hf_sparse.cap`). The kernels ignore it; :func:`hf_sparse.sparse_attention`
routes a capped pattern through the cap. ``dense_cap`` (``None``: off), set by ``dense:max_distance=N`` only,
caps the distances of a dense band: a key at distance ``i - j >= N`` is scored as if at distance ``N``
(ReRoPE); it does not merge with other rules.

The union of two patterns is the union of their rules: :meth:`Primitives.union` merges two sets of
primitives when the result is again one set (the larger band, the longer prefix, at most one stride,
one column rule and one source of extra blocks), and returns ``None`` otherwise; such a pattern then
runs on the reference path only. No kernel, launcher or cache names a pattern class: they read these
fields.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["Primitives", "DENSE_WINDOW", "MAX_POSITION", "rule_mask"]

#: Positions are below this bound on every path (the kernels' int32 arithmetic).
MAX_POSITION = 2**30
#: A token band this wide covers every earlier key: dense attention.
DENSE_WINDOW = MAX_POSITION


@dataclass(frozen=True)
class Primitives:
    """The rules of one pattern for one KV head (see the module docstring)."""

    causal: bool = True
    window: int = 0
    block: int = 0
    window_blocks: int = 0
    global_tokens: int = 0
    stride: int = 0
    column_period: int = 0
    column_count: int = 0
    random_blocks: int = 0
    # the pattern whose ``random_table(layer=, kv_heads=, num_q_blocks=, num_k_blocks=, device=)`` lists the
    # extra key blocks, ``[kv_heads, num_q_blocks, random_blocks]`` (``-1`` = none, valid entries first)
    random_source: Any = None
    # True when the extra blocks never hold a key another rule already shows (BigBird draws them so):
    # the kernels then visit them without a mask; otherwise they mask out what the other rules show
    random_disjoint: bool = False
    # the distance cap of the global prefix (None: off): see the module docstring
    max_distance: int | None = None
    # the distance cap of a dense band (None: off): keys at distance >= dense_cap are scored at that distance
    dense_cap: int | None = None

    # -- derived facts ---------------------------------------------------------------------------
    @property
    def reaches_everywhere(self) -> bool:
        """True when some query far from a key may still see it through a rule other than the prefix:
        a stride, key columns, extra blocks, or a dense band."""
        return bool(self.stride or self.column_count or self.random_blocks or self.window >= DENSE_WINDOW)

    @property
    def block_structured(self) -> bool:
        """True when rules work in blocks of ``block`` tokens (a kernel tile may not straddle a block)."""
        return bool(self.window_blocks or self.random_blocks)

    def bounded_cache(self) -> tuple[int, int] | None:
        """``(sinks, window)`` when decoding needs only the first ``sinks`` tokens and the last ``window``
        tokens (the query's own included); ``None`` when a later query may see any earlier key."""
        if not self.causal or self.reaches_everywhere or self.window_blocks:
            return None
        if self.window == 0 and self.global_tokens == 0:
            return None
        return self.global_tokens, self.window

    def chunk(self) -> int:
        """Query chunk of the reference path: at most 256 rows, and one block where extra blocks are read
        per query block (a chunk may not straddle two)."""
        return min(self.block, 256) if self.random_blocks else 256

    @property
    def shifts_freely(self) -> bool:
        """True when only distances inside a token band and the global prefix matter: keys may then be
        moved closer to the prefix without changing what a query sees (the chunked prefill over a
        bounded cache does that)."""
        return not (self.window_blocks or self.stride or self.column_count or self.random_blocks)

    # -- composition -----------------------------------------------------------------------------
    def union(self, other: Primitives) -> Primitives | None:
        """The primitives of the union of two patterns, or ``None`` when one set cannot express it."""
        if self.causal != other.causal:
            return None
        if self.dense_cap is not None or other.dense_cap is not None:
            return self if self == other else None  # a capped dense band scores every far key: nothing adds to it
        blocks = {b for p in (self, other) if p.block_structured for b in (p.block,)}
        if len(blocks) > 1:
            return None
        if self.random_blocks and other.random_blocks:
            return None
        if self.stride and other.stride and self.stride != other.stride:
            return None
        cols = {(p.column_period, p.column_count) for p in (self, other) if p.column_count}
        if len(cols) > 1:
            return None
        if not self.causal and (self.window and other.window_blocks or self.window_blocks and other.window):
            return None  # the kernels merge a token band and a block band in causal patterns only
        caps = {p.max_distance for p in (self, other) if p.global_tokens}
        if len(caps) > 1:
            return None  # two prefixes capped differently
        rnd = self if self.random_blocks else other
        period, count = next(iter(cols)) if cols else (0, 0)
        merged = Primitives(
            causal=self.causal,
            window=max(self.window, other.window),
            block=blocks.pop() if blocks else 0,
            window_blocks=max(self.window_blocks, other.window_blocks),
            global_tokens=max(self.global_tokens, other.global_tokens),
            stride=self.stride or other.stride,
            column_period=period,
            column_count=count,
            random_blocks=rnd.random_blocks,
            random_source=rnd.random_source,
            max_distance=caps.pop() if caps else None,
        )
        # extra blocks stay disjoint only if nothing was added beside the rules they were drawn against
        solo = rnd if rnd.random_blocks else None
        disjoint = solo is not None and solo.random_disjoint and replace(merged, random_disjoint=False) == replace(
            solo, random_disjoint=False)
        return replace(merged, random_disjoint=disjoint)


def rule_mask(q, k, *, causal: bool, window, global_tokens, window_blocks, block, stride, column_period, column_count):
    """Which keys the rules other than the extra blocks show (causality included): a boolean tensor broadcast
    over ``q`` and ``k`` (positions). The rule values may be ints or tensors (one value per head, broadcasting
    with the positions); ``block`` and ``column_period`` must be at least 1. The rules' arithmetic in one
    place: FlexAttention's ``mask_mod`` and :class:`~hf_sparse.patterns.WithoutGlobals` evaluate it."""
    band = k > q - window
    blocks = k // block > q // block - window_blocks
    if not causal:
        band = band & (k < q + window)
        blocks = blocks & (k // block < q // block + window_blocks)
    vis = (k < global_tokens) | band | blocks
    vis = vis | ((stride > 0) & ((q - k) % torch.clamp(torch.as_tensor(stride), min=1) == 0))
    vis = vis | ((column_count > 0) & (k % column_period >= column_period - column_count))
    return vis & (k <= q) if causal else vis | (q < global_tokens)
