"""``per_head``: a different pattern for some KV heads of a layer (retrieval heads kept dense, say).

``PerHead(default=SlidingWindow(1024), heads=((0, Dense()), (2, Strided(64))))``: KV head 0 (and the
query heads of its GQA group) attends densely, KV head 2 with the strided pattern, every other KV
head with the default. Its string form is ``per_head[DEFAULT;H=PATTERN;...]``, e.g.
``per_head[sliding_window:window=1024;0=dense]``. The forward kernel runs all heads in one launch, each
head reading its own primitives (the backward: one launch per distinct head pattern);
:func:`hf_sparse.patch_model` builds one per layer from ``head_patterns=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..primitives import Primitives
from .base import Pattern, as_long, parse_pattern, register_pattern


@dataclass(frozen=True)
class PerHead(Pattern):
    """``default`` for every KV head except those listed in ``heads`` (``(kv_head, pattern)`` pairs)."""

    default: Pattern = None  # type: ignore[assignment]
    heads: tuple[tuple[int, Pattern], ...] = ()
    name: ClassVar[str] = "per_head"
    bracket_form: ClassVar[str] = "per_head[DEFAULT;H=PATTERN;...]"

    def __post_init__(self) -> None:
        if not isinstance(self.default, Pattern) or self.default.per_head:
            raise ValueError(f"PerHead: default must be a pattern (not a plan), got {self.default!r}")
        if isinstance(self.heads, dict):
            object.__setattr__(self, "heads", tuple(self.heads.items()))
        heads = []
        for item in self.heads:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"PerHead: heads must be (kv_head, pattern) pairs, got {item!r}")
            h, p = item
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ValueError(f"PerHead: a KV head index must be an integer >= 0, got {h!r}")
            p = parse_pattern(p)
            if p.per_head:
                raise ValueError(f"PerHead: head {h} names a plan; give it one pattern")
            heads.append((h, p))
        seen = [h for h, _ in heads]
        if len(set(seen)) != len(seen):
            raise ValueError(f"PerHead: KV head(s) {sorted({h for h in seen if seen.count(h) > 1})} given twice")
        if {p.causal for _, p in heads} - {self.default.causal}:
            raise ValueError("PerHead: every head's pattern must be causal like the default (or all non-causal)")
        object.__setattr__(self, "heads", tuple(sorted(heads)))

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.default.causal

    @property
    def per_head(self) -> bool:
        return True

    def _patterns(self) -> tuple[Pattern, ...]:
        """The default and every listed head's pattern."""
        return (self.default, *(p for _, p in self.heads))

    def rule_sets(self) -> list[Primitives | None]:
        return list(dict.fromkeys(p.primitives() for p in self._patterns()))

    def pattern_of(self, kv_head: int) -> Pattern:
        return dict(self.heads).get(kv_head, self.default)

    def check_heads(self, kv_heads: int) -> None:
        bad = [h for h, _ in self.heads if h >= kv_heads]
        if bad:
            raise ValueError(f"per-head pattern names KV head(s) {bad}, but the layer has {kv_heads} KV heads "
                             f"(0..{kv_heads - 1})")

    def allowed(self, q_idx, k_idx, *, layer: int = 0, kv_head=0, num_keys: int | None = None) -> torch.Tensor:
        if not isinstance(kv_head, torch.Tensor):
            return self.pattern_of(int(kv_head)).allowed(q_idx, k_idx, layer=layer, kv_head=kv_head, num_keys=num_keys)
        head = as_long(kv_head)
        out = self.default.allowed(q_idx, k_idx, layer=layer, kv_head=head, num_keys=num_keys)
        for h, p in self.heads:
            ok = p.allowed(q_idx, k_idx, layer=layer, kv_head=head, num_keys=num_keys)
            out = torch.where(head == h, ok, out)
        return out

    def primitives(self) -> Primitives | None:
        prims = self.rule_sets()
        return prims[0] if len(prims) == 1 else None

    def head_primitives(self, kv_heads: int) -> tuple[Primitives | None, ...]:
        self.check_heads(kv_heads)
        return tuple(self.pattern_of(h).primitives() for h in range(kv_heads))

    def cache_policy(self) -> tuple[int, int] | None:
        policies = [p.cache_policy() for p in self._patterns()]
        if any(c is None for c in policies):
            return None
        return max(s for s, _ in policies), max(w for _, w in policies)

    @property
    def global_tokens_total(self) -> int:
        return max(p.global_tokens_total for p in self._patterns())

    @classmethod
    def from_options(cls, opts: dict[str, Any], shown: str) -> Pattern:
        if set(opts) - {"default", "heads"} or "default" not in opts:
            raise ValueError(f"pattern {shown}: a per-head dict is {{'type': 'per_head', 'default': pattern, "
                             "'heads': {kv_head: pattern}}")
        heads = opts.get("heads") or {}
        items = heads.items() if isinstance(heads, dict) else heads
        try:
            pairs = tuple((int(h), parse_pattern(p)) for h, p in items)
        except (TypeError, ValueError) as err:
            raise ValueError(f"pattern {shown}: heads must map KV head indices to patterns ({err})") from None
        return cls(parse_pattern(opts["default"]), pairs)

    @classmethod
    def from_string(cls, inner: str, shown: str) -> Pattern:
        parts = [s.strip() for s in inner.split(";")]
        pairs = []
        for item in parts[1:]:
            h, eq, spec = item.partition("=")
            if not eq or not h.strip().isdigit():
                raise ValueError(f"pattern {shown}: {item!r} must look like KV_HEAD=pattern, e.g. 0=dense")
            pairs.append((int(h), parse_pattern(spec)))
        return cls(parse_pattern(parts[0]), tuple(pairs))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_head", "default": self.default.to_dict(),
                "heads": {str(h): p.to_dict() for h, p in self.heads}}

    def spec(self) -> str:
        return f"per_head[{';'.join([self.default.spec(), *(f'{h}={p.spec()}' for h, p in self.heads)])}]"


register_pattern("per_head", PerHead)
