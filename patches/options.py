"""The options a patched model carries in ``config.hf_sparse``, parsed once per distinct value.

Both the attention function (:mod:`.attention`) and the caches (:mod:`.cache`) read them; neither
imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_sparse.cap import resolve_max_distance
from hf_sparse.patterns import Pattern, PerHead, SlidingWindow, parse_pattern

__all__ = ["ATTN_NAME", "SparseOptions", "options_of", "layer_plans", "native_windows"]

ATTN_NAME = "hf_sparse"


@dataclass(frozen=True)
class SparseOptions:
    """The parsed form of ``config.hf_sparse``."""

    pattern: Pattern
    layers: frozenset[int] | None  # None: every layer
    backend: str
    previous: str
    # layers whose KV heads differ (their per-head plan), and layers where "dense" keeps a native window
    by_layer: tuple[tuple[int, Pattern], ...] = ()

    def pattern_for(self, layer_idx: int | None) -> Pattern:
        """The pattern of one layer: its per-head plan where ``head_patterns`` named some of its heads."""
        for i, p in self.by_layer:
            if i == layer_idx:
                return p
        return self.pattern

    @property
    def all_layers(self) -> bool:
        return self.layers is None

    @property
    def first_layer(self) -> int:
        return 0 if self.layers is None else min(self.layers)

    def patches(self, layer_idx: int | None) -> bool:
        return self.layers is None or layer_idx in self.layers


# Parsed options by value of config.hf_sparse. A plain dict rather than functools.lru_cache: under
# torch.compile, dynamo reads a global dict (and guards on the config values that make the key), while
# it would trace through an lru_cache wrapper into the pattern parser, which it cannot compile.
_OPTIONS: dict[tuple, SparseOptions] = {}


def options_of(config) -> SparseOptions:
    """The options stored in ``config.hf_sparse`` (parsed once per distinct value)."""
    stored = getattr(config, "hf_sparse", None)
    if not isinstance(stored, dict) or "pattern" not in stored:
        raise RuntimeError(
            f"config._attn_implementation is {ATTN_NAME!r} but config.hf_sparse holds no pattern ({stored!r}); "
            "call hf_sparse.patch_model(model, pattern) instead of setting the implementation by hand (from_pretrained("
            "path, attn_implementation='hf_sparse') restores a pattern that a patched model saved in its config)"
        )
    layers = stored.get("layers")
    heads = stored.get("head_patterns") or []
    trained = getattr(config, "max_position_embeddings", None)
    key = (
        _freeze(stored["pattern"]),
        None if layers is None else tuple(layers),
        stored.get("backend", "auto"),
        stored.get("previous_attn_implementation", "sdpa"),
        _freeze(heads),
        trained,
        _freeze(native_windows(config)),
    )
    opts = _OPTIONS.get(key)
    if opts is None:
        if len(_OPTIONS) >= 256:
            _OPTIONS.clear()
        _, layer_tuple, backend, previous, _, _, native = key
        pattern = _resolved(parse_pattern(stored["pattern"]), trained)
        plans = tuple((i, _resolved(p, trained)) for i, p in layer_plans(pattern, heads))
        if pattern.to_dict().get("type") == "dense":  # "dense" is the model's own attention: its window too
            planned = {i for i, _ in plans}
            kept = tuple((i, SlidingWindow(window=w)) for i, w in native if i not in planned)
            plans = tuple(sorted(plans + kept, key=lambda item: item[0]))
        opts = SparseOptions(pattern, None if layer_tuple is None else frozenset(layer_tuple), backend, previous,
                             plans)
        _OPTIONS[key] = opts
    return opts


def native_windows(config) -> dict[int, int]:
    """``{layer: W}`` for the layers that the model's own attention limits to a causal sliding window of ``W``
    tokens (HF's convention, which is ours): those typed ``"sliding_attention"`` in ``config.layer_types``
    (Qwen 2/3, Gemma 2/3), or every layer when the config sets ``sliding_window`` without layer types
    (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        return {}
    types = getattr(config, "layer_types", None)
    if types is not None:
        return {i: window for i, kind in enumerate(types) if kind == "sliding_attention"}
    return {i: window for i in range(config.num_hidden_layers)}


def _resolved(pattern: Pattern, trained) -> Pattern:
    """``max_distance="auto"`` is the model's trained length, ``config.max_position_embeddings``."""
    if resolve_max_distance(pattern, None) == pattern:  # no "auto" in it
        return pattern
    if not isinstance(trained, int) or isinstance(trained, bool) or trained < 1:
        raise ValueError(
            f"pattern {pattern.spec()}: max_distance=auto is the model's trained length, config.max_position_embeddings, "
            f"which this config does not give ({trained!r}); give max_distance=N or max_distance=none")
    return resolve_max_distance(pattern, trained)


def _freeze(obj):
    """A hashable key of a stored value (dicts and lists nest in unions and plans); plain enough for dynamo."""
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("[",) + tuple(_freeze(v) for v in obj)
    return obj


def layer_plans(pattern: Pattern, head_patterns) -> tuple[tuple[int, Pattern], ...]:
    """Per-layer plans from ``[[layer, kv_head, pattern], ...]`` (the stored form of ``head_patterns=``)."""
    per_layer: dict[int, list[tuple[int, Pattern]]] = {}
    for item in head_patterns:
        layer, head, p = item
        per_layer.setdefault(int(layer), []).append((int(head), parse_pattern(p)))
    if per_layer and pattern.per_head:
        raise ValueError("give head_patterns= or a per-head pattern, not both")
    return tuple((layer, PerHead(pattern, tuple(heads))) for layer, heads in sorted(per_layer.items()))
