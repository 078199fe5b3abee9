"""``chunked``: chunked local attention (Llama 4's local layers): a query sees the earlier keys of its chunk.

Causal: query ``i`` sees key ``j <= i`` when ``j // chunk == i // chunk``. ``chunk=3`` over 7 tokens::

    k: 0 1 2 3 4 5 6
    q0 x . . . . . .
    q2 x x x . . . .
    q3 . . . x . . .
    q5 . . . x x x .
    q6 . . . . . . x
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..primitives import MAX_POSITION, Primitives
from .base import Pattern, as_long, check_options, option, register_pattern


@dataclass(frozen=True)
class Chunked(Pattern):
    """Local attention inside fixed chunks of ``chunk`` tokens (the kernels take powers of two >= 16)."""

    chunk: int = option(8192, minimum=1, maximum=MAX_POSITION, hint="the chunk length, e.g. chunk=8192")
    causal: ClassVar[bool] = True
    name: ClassVar[str] = "chunked"

    def __post_init__(self) -> None:
        check_options(self)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        same = k.div(self.chunk, rounding_mode="floor") == q.div(self.chunk, rounding_mode="floor")
        return (k >= 0) & (k <= q) & same

    def primitives(self) -> Primitives | None:
        c = self.chunk
        if c < 16 or c & (c - 1):
            return None  # the kernels' tiles never straddle a block: a power of two is needed
        return Primitives(block=c, window_blocks=1)

    def cache_policy(self) -> tuple[int, int] | None:
        return 0, self.chunk  # a later query never sees more than the last `chunk` tokens


register_pattern("chunked", Chunked)
