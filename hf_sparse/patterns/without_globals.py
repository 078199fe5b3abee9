"""``without_globals[P]``: pattern ``P`` without its global prefix, the first pass of the distance cap.

A query sees key ``j`` under ``without_globals[P]`` when a rule of ``P`` other than the global prefix
shows it: its bands, strides, key columns and extra blocks (drawn exactly as ``P`` draws them). The keys
that only the global rule shows are the rest, which :mod:`hf_sparse.cap` scores with the capped query
and merges by log-sum-exp. It runs wherever ``P`` runs on its primitives (kernels, reference) and its
spec round-trips like any pattern's, so the traced custom ops take it. Use :func:`without_globals` to
build it: that function leaves patterns without a global prefix as they are and goes inside a
per-head plan, head by head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ..primitives import Primitives, rule_mask
from .base import Pattern, as_long, parse_pattern, register_pattern

__all__ = ["WithoutGlobals", "without_globals"]


@dataclass(frozen=True)
class WithoutGlobals(Pattern):
    """``base`` (one causal pattern with kernel primitives, not a per-head plan) minus its global prefix."""

    base: Pattern = None  # type: ignore[assignment]
    name: ClassVar[str] = "without_globals"
    bracket_form: ClassVar[str] = "without_globals[PATTERN]"

    def __post_init__(self) -> None:
        base = self.base
        if not isinstance(base, Pattern) or base.per_head:
            raise ValueError(f"WithoutGlobals: base must be one pattern (not a per-head plan), got {base!r}")
        if not base.causal:
            raise ValueError(f"WithoutGlobals: {base.spec()} is non-causal; the distance cap is for decoders")
        if base.primitives() is None:
            raise ValueError(f"WithoutGlobals: {base.spec()} has no kernel primitives (its rules do not merge into "
                             "one set), so its global keys cannot be told from the rest")

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return True

    def primitives(self) -> Primitives:
        return replace(self.base.primitives(), global_tokens=0, max_distance=None)

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        q, k = as_long(q_idx), as_long(k_idx)
        p = self.primitives()
        vis = rule_mask(q, k, causal=True, window=p.window, global_tokens=0, window_blocks=p.window_blocks,
                        block=max(p.block, 1), stride=p.stride, column_period=max(p.column_period, 1),
                        column_count=p.column_count)
        if p.random_blocks:
            blk = p.block
            head, qb = torch.broadcast_tensors(as_long(kv_head, device=q.device), q.div(blk, rounding_mode="floor"))
            qb = qb.clamp_min(0)
            table = p.random_source.random_table(
                layer=layer, kv_heads=int(head.max()) + 1 if head.numel() else 1,
                num_q_blocks=int(qb.max()) + 1 if qb.numel() else 1, num_k_blocks=None, device=q.device)
            rnd = table.long()[head, qb]  # [..., R]
            vis = vis | (rnd == k.div(blk, rounding_mode="floor").unsqueeze(-1)).any(-1)
        return vis & (k >= 0) & (q >= 0)

    @classmethod
    def from_options(cls, opts: dict[str, Any], shown: str) -> Pattern:
        if set(opts) != {"base"}:
            raise ValueError(f"pattern {shown}: a without_globals dict is {{'type': 'without_globals', 'base': pattern}}")
        return cls(parse_pattern(opts["base"]))

    @classmethod
    def from_string(cls, inner: str, shown: str) -> Pattern:
        return cls(parse_pattern(inner))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "base": self.base.to_dict()}

    def spec(self) -> str:
        return f"{self.name}[{self.base.spec()}]"


def without_globals(pattern: Pattern, *, capped_only: bool = False) -> Pattern:
    """``pattern`` without its global prefix: itself when it has none, :class:`WithoutGlobals` otherwise, and
    for a per-head plan the plan of each head's own. ``capped_only``: drop only prefixes that carry a
    distance cap (``max_distance``), as the cap's first pass does."""
    if pattern.per_head:
        def each(value: Any) -> Any:
            if isinstance(value, Pattern):
                return without_globals(value, capped_only=capped_only)
            return tuple(each(v) for v in value) if isinstance(value, tuple) else value

        return dataclasses.replace(pattern, **{f.name: each(getattr(pattern, f.name)) for f in dataclasses.fields(pattern)})
    prims = pattern.primitives()
    if not pattern.global_tokens_total or (capped_only and (prims is None or prims.max_distance is None)):
        return pattern
    return WithoutGlobals(pattern)


register_pattern("without_globals", WithoutGlobals)
