"""The capped query of the distance cap, from the model's own rotary embedding.

:mod:`hf_sparse.cap` scores a global key that a query sees only through the global rule as if the
query stood at position ``min(i, N)``. The attention function receives the query already rotated to
``i`` (``q_rot = s * R(i) q``, ``s`` the rotary ``attention_scaling``: 1 except YaRN and LongRoPE). RoPE
rotations compose, ``R(min(i, N)) = R(min(i, N) - i) R(i)``, so the capped query is ``q_rot`` turned by
``delta = min(i, N) - i <= 0``: a pure rotation (no second ``s``) by the angles ``delta * inv_freq``,
in the model's layout (``rotate_half`` over the first ``2 * len(inv_freq)`` dims; the rest, Phi-3's
partial rotary, passes through).

``inv_freq`` is read from the model's rotary module at call time, so every variant is exact: Llama 3's
and YaRN's scaled frequencies are baked into it, and the dynamic types (``dynamic``, ``longrope``) have
already updated it for this forward when the layers run. Gemma 3 keeps one buffer per layer type
(``sliding_attention_inv_freq``); the layer's type picks it. The angle ``delta * inv_freq`` is formed in
float64, so the capped query carries no more angle error than HF's own rotation to ``i``.

The rotary module is found once per model: :func:`remember_rotary` runs in ``patch_model`` and when
``from_pretrained(..., attn_implementation="hf_sparse")`` registers the module; the attention modules
find it through their shared config.

A capped dense head (``dense:max_distance=N``) scores its far keys against the keys at position 0: the
cached keys, rotated to their positions ``j``, turned back by ``delta = -j`` with the same :func:`rotate`
(:func:`capped_keys`, the ``k_cap`` of :func:`hf_sparse.sparse_attention`). ``attention_scaling`` stays on
them as it stays on ``q_cap``, so the score carries ``s**2`` like every other.
"""

from __future__ import annotations

import weakref

import torch

from hf_sparse.cap import cap_acts, dense_caps, head_caps, uncapped
from hf_sparse.patterns import Pattern
from hf_sparse.patterns.base import declares_cap

from .cache import WINDOW_LAYER_ATTR

__all__ = ["remember_rotary", "remember_model_rotary", "is_rotary", "rotary_frequencies", "rotate", "capped_query",
           "capped_keys", "cap_inputs", "cap_pattern", "position_bound", "query_positions", "packed_cap_pattern"]

# id(config) -> the rotary embedding module of the model that config belongs to (checked on use)
_ROTARY: dict[int, weakref.ref] = {}


def _freq_buffers(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_buffers(recurse=False)
            if (n == "inv_freq" or n.endswith("_inv_freq")) and not n.endswith("original_inv_freq")]


def is_rotary(module: torch.nn.Module) -> bool:
    """A rotary embedding module of transformers 5.x: an ``inv_freq`` buffer (or one per layer type)."""
    return bool(_freq_buffers(module))


def remember_rotary(config, module: torch.nn.Module) -> None:
    """Record ``module`` as the rotary embedding of the model whose layers share ``config``."""
    if len(_ROTARY) > 256:
        for key in [k for k, ref in _ROTARY.items() if ref() is None]:
            del _ROTARY[key]
    _ROTARY[id(config)] = weakref.ref(module)


def remember_model_rotary(model: torch.nn.Module, config) -> None:
    """Find and record the rotary embedding of ``model`` (``patch_model``); none found: nothing to record."""
    found = [m for m in model.modules() if is_rotary(m) and getattr(m, "config", config) is config]
    if len(found) == 1:
        remember_rotary(config, found[0])


def rotary_frequencies(module: torch.nn.Module) -> torch.Tensor:
    """``inv_freq`` (``[rotary_dim / 2]``) that rotated this attention module's queries in this forward."""
    ref = _ROTARY.get(id(module.config))
    rotary = ref() if ref is not None else None
    if rotary is None or getattr(rotary, "config", module.config) is not module.config:
        raise RuntimeError(
            f"hf_sparse layer {module.layer_idx}: the distance cap (max_distance) needs the model's rotary embedding, "
            "which hf_sparse has not seen for this model (a copy made after patching?); call hf_sparse.patch_model("
            "model) on it, or give the pattern max_distance=none")
    names = _freq_buffers(rotary)
    if len(names) > 1:
        layer_types = getattr(module.config, "layer_types", None)
        name = f"{layer_types[module.layer_idx]}_inv_freq" if layer_types else None
        if name not in names:
            raise NotImplementedError(f"hf_sparse layer {module.layer_idx}: cannot tell which of the rotary "
                                      f"frequencies {names} this layer uses; give the pattern max_distance=none")
    else:
        name = names[0]
    return getattr(rotary, name)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` (``[..., T, D]``, RoPE's ``rotate_half`` layout) turned by ``delta`` positions (``delta``
    broadcasting with ``x[..., 0]``): the angles ``delta * inv_freq`` on the first ``2 * len(inv_freq)``
    dims, the others unchanged. A pure rotation: no ``attention_scaling``."""
    half = inv_freq.shape[-1]
    angle = delta.to(torch.float64).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float64)
    cos, sin = (torch.cat([f, f], -1).to(torch.float32) for f in (angle.cos(), angle.sin()))
    xr = x[..., : 2 * half].float()
    x1, x2 = xr[..., :half], xr[..., half:]
    turned = (xr * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)
    return torch.cat([turned, x[..., 2 * half:]], -1) if x.shape[-1] > 2 * half else turned


def cap_pattern(pattern: Pattern, kv_heads: int, max_position: int) -> tuple[Pattern, bool]:
    """``(pattern to run, whether the cap acts)`` for queries at positions up to ``max_position`` (a host-side
    bound): while no query stands past a cap, the pattern runs uncapped (no rotation, one pass)."""
    if not declares_cap(pattern):  # nothing to drop: no rebuilt pattern (a per-head plan's, inside a trace)
        return pattern, False
    if cap_acts(pattern, kv_heads, max_position):
        return pattern, True
    # under torch.compile the pattern is rebuilt while tracing (the graph holds no Python object): the
    # cache of ``uncapped`` would only be ignored by Dynamo, with a warning
    return (uncapped.__wrapped__ if torch.compiler.is_compiling() else uncapped)(pattern), False


def position_bound(module: torch.nn.Module, keys: int) -> int:
    """A host-side upper bound of the positions of this call's queries: its bounded cache layer's (set by the
    forward pre-hook; a static layer's is a constant, so a compiled step does not branch on it), else the
    key slots (positions never exceed slots)."""
    window_layer = module.__dict__.get(WINDOW_LAYER_ATTR)
    return window_layer.position_bound() if window_layer is not None else keys - 1


def query_positions(padding: torch.Tensor | None, queries: int, keys: int, device) -> torch.Tensor:
    """Positions of the last ``queries`` of ``keys`` slots (``[B or 1, queries]``, ``-1`` for padding), counting
    real tokens as the patterns do."""
    if padding is None:
        return torch.arange(keys - queries, keys, device=device).view(1, queries)
    real = padding[:, keys - queries:]
    return torch.where(real, padding.long().cumsum(1)[:, keys - queries:] - 1, -1)


def packed_cap_pattern(pattern: Pattern, kv_heads: int, layout) -> Pattern:
    """The pattern for packed documents, which count positions from their own start: uncapped when no
    document is longer than the cap, else ``NotImplementedError``."""
    longest = max(g.index.shape[1] for g in layout.groups)
    if cap_acts(pattern, kv_heads, longest - 1):
        raise NotImplementedError(
            f"hf_sparse: a packed batch holds a document of {longest} tokens, past the distance cap of "
            f"{pattern.spec()}; packed documents run uncapped only (give max_distance=none, or pass that document "
            "in a batch of its own)")
    return uncapped(pattern)


def capped_query(module: torch.nn.Module, query: torch.Tensor, pattern: Pattern, q_pos: torch.Tensor) -> torch.Tensor:
    """The queries rotated to ``min(i, N)`` (``N`` the cap of their KV head; ``-1`` positions: padding, left as
    they are): the ``q_cap`` of :func:`hf_sparse.sparse_attention`. ``query [B, Hq, Tq, D]``, ``q_pos [B, Tq]``."""
    hq = query.shape[1]
    kv_heads = hq // module.num_key_value_groups
    caps = head_caps(pattern, kv_heads)
    pos = q_pos.long().unsqueeze(1)  # [B, 1, Tq]
    distinct = {n for n in caps if n is not None}
    if len(distinct) == 1 and None not in caps:
        delta = pos.clamp_max(distinct.pop()) - pos
    else:  # heads capped differently: one row of caps per query head (no cap: the position itself)
        group = hq // kv_heads
        limit = torch.tensor([n if n is not None else -1 for n in caps for _ in range(group)],
                             device=pos.device).view(1, hq, 1)
        limit = torch.where(limit >= 0, limit, pos)
        delta = torch.minimum(pos, limit) - pos
    delta = torch.where(pos >= 0, delta, 0)
    return rotate(query, delta, rotary_frequencies(module))


def capped_keys(module: torch.nn.Module, key: torch.Tensor, pattern: Pattern, k_pos: torch.Tensor) -> torch.Tensor | None:
    """The keys rotated back to position 0 (``-1`` positions: padding or empty slots, left as they are): the
    ``k_cap`` of :func:`hf_sparse.sparse_attention`, or ``None`` when no dense head of ``pattern`` is capped.
    ``key [B, Hkv, Tk, D]``, ``k_pos [B or 1, Tk]``. ``O(Tk * D)`` per call: a decode step rotates the history."""
    if not any(n is not None for n in dense_caps(pattern, key.shape[1])):
        return None
    pos = k_pos.long().unsqueeze(1)  # [B, 1, Tk]
    return rotate(key, -pos.clamp_min(0), rotary_frequencies(module))


def cap_inputs(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, pattern: Pattern, q_pos: torch.Tensor,
               k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(q_cap, k_cap)`` of a call whose cap acts: :func:`capped_query` and :func:`capped_keys`."""
    return capped_query(module, query, pattern, q_pos), capped_keys(module, key, pattern, k_pos)


def padded_cap_inputs(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, pattern: Pattern,
                      padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`cap_inputs` of a call whose keys are its whole history, the queries the last ones; positions count
    the real tokens of ``padding [B, Tk]`` (as generate's position ids do; ``None``: no padding)."""
    sq, skv = query.shape[2], key.shape[2]
    return cap_inputs(module, query, key, pattern, query_positions(padding, sq, skv, query.device),
                      query_positions(padding, skv, skv, query.device))
