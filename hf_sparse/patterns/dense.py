"""``dense``: plain attention, causal (``j <= i``) or, with ``causal=False``, every key.

``max_distance=N`` (causal only; off by default) caps the relative distance as ReRoPE and Self-Extend do:
the query ``i`` still sees every key ``j <= i``, but a key at distance ``i - j >= N`` is scored as if it
stood ``N`` positions back. With RoPE that is the query rotated to position ``N`` against the key at
position 0 (:mod:`hf_sparse.cap`); the keys nearer than ``N`` keep their true distance::

    N = 2     k: 0 1 2 3 4
    q4 distance: 2 2 2 1 0      (true distances 4 3 2 1 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..primitives import DENSE_WINDOW, MAX_POSITION, Primitives
from .base import (
    MAX_DISTANCE_WORDS,
    Pattern,
    as_long,
    check_max_distance,
    check_options,
    option,
    register_pattern,
    set_cap,
)


@dataclass(frozen=True)
class Dense(Pattern):
    """Plain attention: causal (``j <= i``) or, with ``causal=False``, every key.

    ``max_distance=N``: keys at distance ``N`` or more are scored at distance ``N`` (ReRoPE's cap;
    :mod:`hf_sparse.cap`). ``auto`` is the trained length of the model :func:`hf_sparse.patch_model`
    patches; ``none`` (the default) keeps attention exactly dense.
    """

    causal: bool = option(True)
    max_distance: int | str | None = option(
        None, minimum=1, maximum=MAX_POSITION, words=MAX_DISTANCE_WORDS,
        hint="keys at distance >= max_distance are scored at that distance; e.g. max_distance=8192, auto (the "
             "model's trained length) or none")
    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        check_options(self)
        check_max_distance(self)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        ok = (k >= 0) & (q >= 0)
        return ok & (k <= q) if self.causal else ok

    def primitives(self) -> Primitives:
        return Primitives(causal=self.causal, window=DENSE_WINDOW, dense_cap=set_cap(self.max_distance))

    # without a cap, the spec and the stored form stay those of plain dense attention
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.max_distance is None:
            del out["max_distance"]
        return out

    def spec(self) -> str:
        full = super().spec()
        return full.replace(",max_distance=none", "") if self.max_distance is None else full


register_pattern("dense", Dense, aliases=("full", "causal"))
