"""Each private transformers name that hf_sparse.patches relies on, pinned: these fail when transformers
changes one, before a user meets a wrong answer. CI runs them on the transformers floor and the newest release."""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import tiny, tokens  # noqa: E402
from hf_sparse.patches import patch_model  # noqa: E402
from hf_sparse.patches._compat import attentions_requested, eager_attention_for  # noqa: E402


def _requested_in_forward(model, **kwargs) -> list[bool]:
    seen = []
    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_pre_hook(lambda module, args: seen.append(attentions_requested()))
    try:
        with torch.no_grad():
            model(tokens(1, 6), use_cache=False, **kwargs)
    finally:
        handle.remove()
    return seen


def test_output_attentions_reaches_the_layers_through_the_output_collector():
    """utils.output_capturing._active_collector: how a layer learns that output_attentions was asked for."""
    model = patch_model(tiny("llama"), "dense", backend="reference")
    assert _requested_in_forward(model, output_attentions=True) == [True]
    assert _requested_in_forward(model) == [False]
    assert _requested_in_forward(model, output_hidden_states=True) == [False]
    assert not attentions_requested()  # outside a forward


def test_eager_attention_forward_of_the_modeling_file():
    """Modeling files define a module-level eager_attention_forward: the unpatched layers' fallback."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.llama import modeling_llama

    llama = tiny("llama")
    assert eager_attention_for(llama.model.layers[0].self_attn) is modeling_llama.eager_attention_forward
    gemma2 = tiny("gemma2", sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert eager_attention_for(gemma2.model.layers[0].self_attn) is modeling_gemma2.eager_attention_forward
    params = inspect.signature(modeling_llama.eager_attention_forward).parameters
    assert list(params)[:5] == ["module", "query", "key", "value", "attention_mask"]
    assert {"scaling", "dropout"} <= set(params)


def test_private_model_hooks_used_by_patch_model():
    """_can_set_attn_implementation (patch_model's check), _supports_sdpa (the implementation unpatch restores),
    GenerationMixin._prepare_cache_for_generation(generation_config, model_kwargs, ...) (generate's cache)."""
    model = tiny("llama")
    assert model._can_set_attn_implementation() is True
    assert isinstance(type(model)._supports_sdpa, bool)
    params = list(inspect.signature(transformers.GenerationMixin._prepare_cache_for_generation).parameters)
    assert params[:3] == ["self", "generation_config", "model_kwargs"]
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_cache_internals_used_by_the_sparse_cache():
    """DynamicCache(config=...).layers (one layer object per decoder layer, replaced in place), its
    layer_class_to_replicate, and the sliding layer type the history hook swaps out."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    model = tiny("mistral", sliding_window=4)
    cache = transformers.DynamicCache(config=model.config)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert all(isinstance(layer, DynamicSlidingWindowLayer) and layer.is_sliding for layer in cache.layers)
    assert hasattr(transformers.DynamicCache(), "layer_class_to_replicate")
    assert not DynamicLayer.is_sliding


def test_prepare_static_cache_passes_through_on_this_release():
    """GenerationMixin._prepare_static_cache(cache_implementation, batch_size, max_cache_len, ...): patch_model
    replaces it on the model; what follows max_cache_len differs by release (5.4: model_kwargs; 5.25 adds
    prefill_chunk_size) and is passed on to transformers' own for a model that is not ours."""
    from hf_sparse.patches.static_cache import prepare_static_cache_for_generation
    from transformers.cache_utils import StaticCache

    params = list(inspect.signature(transformers.GenerationMixin._prepare_static_cache).parameters)
    assert params[:4] == ["self", "cache_implementation", "batch_size", "max_cache_len"] and "model_kwargs" in params
    # what generate passes, by name, on the installed release
    kwargs = {"cache_implementation": "static", "batch_size": 2, "max_cache_len": 12, "model_kwargs": {}}
    if "prefill_chunk_size" in params:
        kwargs["prefill_chunk_size"] = None
    cache = prepare_static_cache_for_generation(tiny("llama"), **kwargs)  # unpatched: transformers' cache
    assert type(cache) is StaticCache and {layer.max_cache_len for layer in cache.layers} == {12}
