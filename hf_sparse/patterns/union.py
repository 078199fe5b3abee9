"""``a | b``: the union of patterns. A query sees a key when any member allows it.

``parse_pattern("sliding_window:window=256|strided:stride=64")`` and ``SlidingWindow(256) | Strided(64)``
give the same pattern; ``spec()`` joins the members' specs with ``|``. It runs on the kernels when the
members' primitives merge into one set (:meth:`hf_sparse.primitives.Primitives.union`), else on the
reference path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..primitives import Primitives
from .base import Pattern, parse_pattern, register_pattern


@dataclass(frozen=True)
class Union(Pattern):
    """The union of two or more patterns (all causal, or all non-causal)."""

    members: tuple[Pattern, ...] = ()
    name: ClassVar[str] = "union"

    def __post_init__(self) -> None:
        if len(self.members) < 2 or not all(isinstance(m, Pattern) for m in self.members):
            raise ValueError(f"Union needs two or more patterns, got {self.members!r}; e.g. "
                             "SlidingWindow(window=256) | Strided(stride=64)")
        if any(m.per_head for m in self.members):
            raise ValueError("a union cannot hold a per-head plan; put the union inside the plan instead "
                             "(PerHead(default=a | b, heads=...))")
        causal = {m.causal for m in self.members}
        if len(causal) > 1:
            raise ValueError(f"the members of a union must all be causal or all non-causal: {self.spec()!r}")
        capped_dense = [m.spec() for m in self.members if getattr(m.primitives(), "dense_cap", None) is not None]
        if capped_dense:
            raise ValueError(f"a union cannot hold a dense pattern with a distance cap ({', '.join(capped_dense)}): "
                             "dense already sees every key, so give the capped dense alone (e.g. as a head of "
                             "a per-head plan) or drop max_distance")
        caps = {getattr(m, "max_distance", None) for m in self.members if m.global_tokens_total}
        if len(caps) > 1:
            shown = ", ".join(sorted("none" if c is None else str(c) for c in caps))
            raise ValueError(f"the members of {self.spec()!r} with global keys cap their distance differently "
                             f"(max_distance {shown}); give them one max_distance")

    @classmethod
    def of(cls, *patterns: Pattern) -> Pattern:
        """The union of ``patterns`` (nested unions flattened, repeated members dropped)."""
        flat: list[Pattern] = []
        for p in patterns:
            for m in p.members if isinstance(p, Union) else (p,):
                if m not in flat:
                    flat.append(m)
        return flat[0] if len(flat) == 1 else cls(tuple(flat))

    @classmethod
    def from_options(cls, opts: dict[str, Any], shown: str) -> Pattern:
        members = opts.get("members")
        if set(opts) != {"members"} or not isinstance(members, (list, tuple)):
            raise ValueError(f"pattern {shown}: a union dict is {{'type': 'union', 'members': [pattern, ...]}}")
        return cls.of(*(parse_pattern(m) for m in members))

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.members[0].causal

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        out = None
        for m in self.members:
            ok = m.allowed(q_idx, k_idx, layer=layer, kv_head=kv_head, num_keys=num_keys)
            out = ok if out is None else out | ok
        return out

    def primitives(self) -> Primitives | None:
        prims = [m.primitives() for m in self.members]
        if any(p is None for p in prims):
            return None
        merged = prims[0]
        for p in prims[1:]:
            merged = merged.union(p)
            if merged is None:
                return None
        return merged

    def to_dict(self) -> dict[str, Any]:
        return {"type": "union", "members": [m.to_dict() for m in self.members]}

    def spec(self) -> str:
        return "|".join(m.spec() for m in self.members)


register_pattern("union", Union)
