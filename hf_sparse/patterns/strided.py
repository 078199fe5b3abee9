"""``strided``: the strided pattern of the Sparse Transformer (Child et al., 2019).

Causal: query ``i`` sees key ``j <= i`` when ``i - j < window`` (the local part) or
``(i - j) % stride == 0`` (every ``stride``-th earlier key). ``window`` defaults to ``stride``.
``stride=3, window=2`` over 8 tokens::

    k: 0 1 2 3 4 5 6 7
    q0 x . . . . . . .
    q1 x x . . . . . .
    q2 . x x . . . . .
    q3 x . x x . . . .
    q4 . x . x x . . .
    q5 . . x . x x . .
    q6 x . . x . x x .
    q7 . x . . x . x x
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..primitives import MAX_POSITION, Primitives
from .base import Pattern, as_long, check_options, option, register_pattern


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer's strided pattern: the last ``window`` keys and every ``stride``-th earlier key."""

    stride: int = option(128, minimum=1, maximum=MAX_POSITION, hint="the distance between strided keys, e.g. stride=128")
    window: int = option(0, minimum=0, maximum=MAX_POSITION,
                         hint="the local keys, the query's own included; 0 means window = stride")
    causal: ClassVar[bool] = True
    name: ClassVar[str] = "strided"

    def __post_init__(self) -> None:
        check_options(self)
        if self.window == 0:
            object.__setattr__(self, "window", self.stride)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        d = q - k
        return (k >= 0) & (d >= 0) & ((d < self.window) | (d % self.stride == 0))

    def primitives(self) -> Primitives:
        return Primitives(window=self.window, stride=self.stride)


register_pattern("strided", Strided)
