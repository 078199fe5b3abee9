"""``fixed``: the "fixed" pattern of the Sparse Transformer (Child et al., 2019).

Causal: query ``i`` sees key ``j <= i`` when both sit in the same block of ``block`` tokens
(``j // block == i // block``) or ``j`` is one of the last ``summary`` tokens of its block
(``j % block >= block - summary``, the summary columns every later query reads).
``block=4, summary=1`` over 10 tokens::

    k: 0 1 2 3 4 5 6 7 8 9
    q0 x . . . . . . . . .
    q3 x x x x . . . . . .
    q4 . . . x x . . . . .
    q6 . . . x x x x . . .
    q9 . . . x . . . x x x
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..primitives import MAX_POSITION, Primitives
from .base import Pattern, as_long, check_options, option, register_pattern
from .bigbird import MAX_BLOCK


@dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformer's fixed pattern: the query's own block and the summary columns of every block.

    The kernels take a ``block`` that is a power of two from 16 to 4096; other block sizes run on the
    reference path (and FlexAttention).
    """

    block: int = option(128, minimum=1, maximum=MAX_POSITION, hint="the block length L, e.g. block=128")
    summary: int = option(8, minimum=1, maximum=MAX_POSITION,
                          hint="the last C tokens of each block every later query sees, 1 <= summary <= block")
    causal: ClassVar[bool] = True
    name: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        check_options(self)
        if self.summary > self.block:
            raise ValueError(f"Fixed: summary must be at most block ({self.block}), got {self.summary}; e.g. "
                             f"fixed:block={self.block},summary={max(1, self.block // 16)}")

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        lb = self.block
        same = k.div(lb, rounding_mode="floor") == q.div(lb, rounding_mode="floor")
        return (k >= 0) & (k <= q) & (same | (k % lb >= lb - self.summary))

    def primitives(self) -> Primitives | None:
        b = self.block
        if b < 16 or b > MAX_BLOCK or b & (b - 1):
            return None  # the kernels' tiles never straddle a block: a power of two is needed
        return Primitives(block=b, window_blocks=1, column_period=b, column_count=self.summary)


register_pattern("fixed", Fixed)
