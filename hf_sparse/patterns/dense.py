"""``dense``: plain attention, causal (``j <= i``) or, with ``causal=False``, every key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..primitives import DENSE_WINDOW, Primitives
from .base import Pattern, as_long, check_options, option, register_pattern


@dataclass(frozen=True)
class Dense(Pattern):
    """Plain attention: causal (``j <= i``) or, with ``causal=False``, every key."""

    causal: bool = option(True)
    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        check_options(self)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        return ok & (k <= q) if self.causal else ok

    def primitives(self) -> Primitives:
        return Primitives(causal=self.causal, window=DENSE_WINDOW)


register_pattern("dense", Dense, aliases=("full", "causal"))
