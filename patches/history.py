"""Full-history KV cache layers for patched layers.

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
``past_key_values=`` in 5.17) and, while the sliding layer has not dropped anything, swaps it for a
plain ``DynamicLayer`` holding the same keys. The swap happens before the first ``update``, so the
cache ``generate`` builds, the one the model's forward builds, and one the user passes all work.
``Cache.is_sliding`` is computed from the layers, so transformers then sizes the masks of the
remaining (unpatched) sliding layers on an unpatched layer. A sliding layer that already dropped keys
cannot be repaired: that raises. Static caches are not supported yet for patched layers (raise).

A bounded sparse cache (window + global tokens) is planned separately; until then patched layers keep
every key, like full-attention layers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

from ._compat import cache_of

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
                f"hf_sparse layer {layer_idx}: static caches are not supported by patched layers yet; use the "
                "default dynamic cache (generate(..., cache_implementation=None))"
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


def full_history_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    cache = cache_of(kwargs)
    if cache is not None:
        ensure_full_history(cache, module.layer_idx)
    return None


def remove_history_hook(module: torch.nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is full_history_pre_hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def add_history_hook(module: torch.nn.Module) -> None:
    remove_history_hook(module)
    module.register_forward_pre_hook(full_history_pre_hook, with_kwargs=True)
