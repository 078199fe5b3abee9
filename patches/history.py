"""KV cache layers of patched layers: full history where needed, bounded where the pattern allows.

Why: for a config with a sliding window (Mistral, Qwen with ``use_sliding_window``, Gemma 2/3 local
layers), ``DynamicCache(config=...)`` -- which ``generate`` and the models' own forward build -- gives
those layers a ``DynamicSlidingWindowLayer`` that keeps only the last ``sliding_window - 1`` keys.
A patched layer may need more: Longformer's global tokens, BigBird's global and random blocks, dense
attention, a window larger than the config's, and in any case absolute positions (BigBird blocks,
global tokens) that a truncated cache no longer knows.

How (checked on transformers 5.17 and 5.24): both versions pick the cache layer classes from
``config.layer_types`` / ``config.sliding_window`` when the cache is created, and the modeling code
depends on the same fields, so the config cannot be changed. Instead a forward pre-hook on each
patched attention module looks at the cache it is about to update (``cache=`` in 5.24,
``past_key_values=`` in 5.17) and, before the layer's first update:

* a layer whose slots carry positions (:class:`~hf_sparse.patches.cache.PositionedLayer`: the bounded
  layer that ``generate`` and :class:`~hf_sparse.patches.cache.SparseCache` give ``SlidingWindow`` /
  ``Longformer`` layers, the per-head groups, the static layers of
  :class:`~hf_sparse.patches.static_cache.SparseStaticCache`) gets the 2D padding mask of this forward,
  from which it counts positions, and is remembered on the module so that the attention function can
  read the positions of the slots it returned;
* a ``DynamicSlidingWindowLayer`` that has not dropped anything is swapped for a plain ``DynamicLayer``
  holding the same keys (full history: the cache the model's own forward builds, or a
  ``DynamicCache`` the user passes). The swap happens before the first ``update``. ``Cache.is_sliding``
  is computed from the layers, so transformers then sizes the masks of the remaining (unpatched)
  sliding layers on an unpatched layer. A sliding layer that already dropped keys cannot be repaired:
  that raises. transformers' own ``StaticLayer`` raises too (its slots carry no positions): the static
  form is :class:`~hf_sparse.patches.static_cache.SparseStaticCache`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from ._compat import cache_of
from .attention import HybridMask
from .cache import WINDOW_LAYER_ATTR, PositionedLayer

__all__ = ["ensure_full_history", "full_history_pre_hook", "add_history_hook", "remove_history_hook"]


def ensure_full_history(cache, layer_idx: int) -> None:
    """Make ``cache.layers[layer_idx]`` keep every key (see the module docstring)."""
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return  # a lazily grown cache appends plain DynamicLayer objects
    layer = layers[layer_idx]
    if not getattr(layer, "is_sliding", False):
        if isinstance(layer, StaticLayer):
            raise NotImplementedError(
                f"hf_sparse layer {layer_idx}: transformers' StaticCache keeps plain slots, which patched layers "
                "cannot read; pass hf_sparse.patches.SparseStaticCache(model, max_cache_len=...) or let generate build "
                "one (cache_implementation='static')"
            )
        return
    if not isinstance(layer, DynamicSlidingWindowLayer):
        raise NotImplementedError(
            f"hf_sparse layer {layer_idx}: cache layer {type(layer).__name__} keeps a sliding window only; patched "
            "layers need a full-history dynamic cache (generate(..., cache_implementation=None))"
        )
    full = DynamicLayer()
    if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
        kept, seen = layer.keys.shape[-2], layer.get_seq_length()
        if kept != seen:
            raise RuntimeError(
                f"hf_sparse layer {layer_idx}: its sliding-window cache layer already dropped {seen - kept} of {seen} "
                "past keys, which the sparse pattern may need. Create the cache after patch_model (or let generate "
                "create it) so that patched layers keep every key"
            )
        full.update(layer.keys, layer.values)
    layers[layer_idx] = full


def _cache_layer(cache, layer_idx: int):
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


def full_history_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of patched attention modules (see the module docstring)."""
    cache = cache_of(kwargs)
    if cache is None:
        return None
    ensure_full_history(cache, module.layer_idx)
    layer = _cache_layer(cache, module.layer_idx)
    if isinstance(layer, PositionedLayer):
        mask = kwargs.get("attention_mask")
        padding = mask.padding if isinstance(mask, HybridMask) else mask
        # anything but a 2D mask is refused by the attention function with its own message
        layer.prepare(padding if isinstance(padding, torch.Tensor) and padding.dim() == 2 else None)
        module.__dict__[WINDOW_LAYER_ATTR] = layer
    else:
        module.__dict__.pop(WINDOW_LAYER_ATTR, None)
    return None


def remove_history_hook(module: torch.nn.Module) -> None:
    module.__dict__.pop(WINDOW_LAYER_ATTR, None)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is full_history_pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def add_history_hook(module: torch.nn.Module) -> None:
    remove_history_hook(module)
    module.register_forward_pre_hook(full_history_pre_hook, with_kwargs=True)
