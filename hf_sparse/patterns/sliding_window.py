"""``sliding_window``: local attention over ``window`` keys, the query's own key included.

Causal: ``i - window < j <= i`` (Hugging Face Mistral's convention). ``W = 3`` over 6 tokens::

    k: 0 1 2 3 4 5
    q0 x . . . . .
    q1 x x . . . .
    q2 x x x . . .
    q3 . x x x . .
    q4 . . x x x .
    q5 . . . x x x

Non-causal: ``|i - j| < window``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..primitives import MAX_POSITION, Primitives
from .base import Pattern, as_long, check_options, option, register_pattern


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Local attention over ``window`` keys, the query's own key included.

    Causal: ``i - window < j <= i``. Non-causal: ``|i - j| < window``.
    """

    window: int = option(4096, minimum=1, maximum=MAX_POSITION, hint="the window counts the query itself, e.g. window=4096")
    causal: bool = option(True)
    name: ClassVar[str] = "sliding_window"

    def __post_init__(self) -> None:
        check_options(self)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        if self.causal:
            return ok & (k <= q) & (k > q - self.window)
        return ok & ((q - k).abs() < self.window)

    def primitives(self) -> Primitives:
        return Primitives(causal=self.causal, window=self.window)


register_pattern("sliding_window", SlidingWindow, aliases=("sliding", "window"))
