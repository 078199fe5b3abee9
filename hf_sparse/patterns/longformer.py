"""``longformer``: a local window plus ``global_tokens`` leading tokens that every query sees."""

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


@dataclass(frozen=True)
class Longformer(Pattern):
    """A local window plus ``global_tokens`` leading tokens that every query sees.

    In a decoder the global tokens act as attention sinks. Causal:
    ``(i - window < j or j < global_tokens) and j <= i``. Non-causal: ``|i - j| < window``, or
    ``j < global_tokens``, or ``i < global_tokens`` (global rows see everything).

    ``max_distance=N``: a global key outside the window is scored as if the query stood at position
    ``min(i, N)`` (LM-Infinite's distance ceiling; :mod:`hf_sparse.cap`). ``auto`` (the default) is the
    trained length of the model :func:`hf_sparse.patch_model` patches; ``none`` turns the cap off.
    """

    window: int = option(4096, minimum=1, maximum=MAX_POSITION, hint="the window counts the query itself, e.g. window=4096")
    global_tokens: int = option(4, minimum=0, maximum=MAX_POSITION, hint="use 0 for none, e.g. global_tokens=4")
    causal: bool = option(True)
    max_distance: int | str | None = max_distance_option()
    name: ClassVar[str] = "longformer"

    def __post_init__(self) -> None:
        check_options(self)
        check_max_distance(self)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        g = self.global_tokens
        if self.causal:
            return ok & (k <= q) & ((k > q - self.window) | (k < g))
        return ok & (((q - k).abs() < self.window) | (k < g) | (q < g))

    def primitives(self) -> Primitives:
        return Primitives(causal=self.causal, window=self.window, global_tokens=self.global_tokens,
                          max_distance=set_cap(self.max_distance))


register_pattern("longformer", Longformer)
