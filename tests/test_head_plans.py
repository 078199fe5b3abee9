"""Per-head plans, strided patterns, unions and registered patterns through ``patch_model``.

The reference is HF's own eager attention given, per layer, an explicit 4D mask built from
``Pattern.allowed`` per KV head (expanded over the query heads of each group): a per-head dense
oracle (``explicit_masks`` of ``tests/test_patches.py``). CPU, float32, ``backend="reference"``.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import Parity  # noqa: E402
from hf_models import left_padding, tiny, tokens  # noqa: E402
from hf_sparse.patches import patch_model  # noqa: E402
from test_patches import _generate, assert_real_close, explicit_mask_logits, run  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_sparse import (  # noqa: E402
    Dense,
    Longformer,
    Pattern,
    PerHead,
    SlidingWindow,
    parse_pattern,
    register_pattern,  # noqa: E402
)

T = 40
PLAN = {(0, 0): "dense", (1, 1): "strided:stride=5,window=2"}


def plan_layers(default: str, heads: dict) -> dict:
    """The expected per-layer patterns of a 2-layer model patched with ``head_patterns=heads``."""
    out = {}
    for layer in range(2):
        mine = tuple((h, parse_pattern(p)) for (i, h), p in sorted(heads.items()) if i == layer)
        out[layer] = PerHead(parse_pattern(default), mine) if mine else parse_pattern(default)
    return out


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_per_head_plan_equals_per_head_oracle(model_type):
    base = tiny(model_type, **({"sliding_window": 512} if model_type == "mistral" else {}))
    ids = tokens(2, T, seed=3)
    mask = left_padding([T, T - 9], T)
    want = explicit_mask_logits(base, plan_layers("sliding_window:window=6", PLAN), ids, mask)
    model = patch_model(copy.deepcopy(base), "sliding_window:window=6", head_patterns=PLAN, backend="reference")
    assert_real_close(run(model, ids, mask), want, mask)
    # and the plan matters: the same model with the default everywhere differs
    plain = patch_model(copy.deepcopy(base), "sliding_window:window=6", backend="reference")
    assert (run(plain, ids, mask) - want).abs().max() > 1e-3
    assert "per_head[" in repr(model) and model.config.hf_sparse["head_patterns"][0][:2] == [0, 0]


@pytest.mark.parametrize("spec", ["strided:stride=6,window=3", "fixed:block=8,summary=2",
                                  "sliding_window:window=5|strided:stride=7,window=1",
                                  "per_head[sliding_window:window=4;1=longformer:window=3,global_tokens=2]"])
def test_new_patterns_equal_explicit_mask(spec):
    base = tiny("llama")
    ids = tokens(2, T, seed=4)
    mask = left_padding([T, T - 5], T)
    want = explicit_mask_logits(base, {i: parse_pattern(spec) for i in range(2)}, ids, mask)
    got = run(patch_model(copy.deepcopy(base), spec, backend="reference"), ids, mask)
    assert_real_close(got, want, mask)


@pytest.mark.parametrize("default,heads", [
    ("sliding_window:window=6", PLAN),  # a dense head and a strided head: full-history cache
    ("sliding_window:window=6", {(0, 1): "longformer:window=4,global_tokens=3"}),  # bounded, per-head sinks
    ("sliding_window:window=6|longformer:window=3,global_tokens=2", {}),  # a union with a bounded cache
    ("strided:stride=4,window=3", {}),  # full history
    ("chunked:chunk=8", {}),  # bounded by the chunk; chunks of the prompt take the exact positions path
], ids=["plan-full", "plan-bounded", "union-bounded", "strided", "chunked"])
def test_generate_with_a_plan_equals_recomputation(default, heads):
    model = patch_model(tiny("mistral", sliding_window=5), default, head_patterns=heads or None,
                        backend="reference")
    ids = tokens(2, 20, seed=5)
    mask = left_padding([20, 13], 20)
    seq_cached, scores_cached = _generate(model, ids, mask, use_cache=True)
    seq_full, scores_full = _generate(model, ids, mask, use_cache=False)
    torch.testing.assert_close(scores_cached, scores_full, atol=2e-5, rtol=2e-5)
    assert torch.equal(seq_cached, seq_full)


def test_plan_cache_policy():
    # each KV head keeps what its own pattern needs: a group per policy, each with its own layer
    from hf_sparse.patches.cache import HeadGroupsLayer, SparseCache, SparseWindowLayer
    from transformers.cache_utils import DynamicLayer

    model = patch_model(tiny("llama"), "sliding_window:window=6",
                        head_patterns={(0, 1): "longformer:window=4,global_tokens=3"}, backend="reference")
    cache = SparseCache(model)
    groups = cache.layers[0].groups
    assert isinstance(cache.layers[0], HeadGroupsLayer) and [g[0] for g in groups] == [(0,), (1,)]
    assert [(g[2].sinks, g[2].window) for g in groups] == [(0, 6), (3, 4)]
    assert isinstance(cache.layers[1], SparseWindowLayer) and (cache.layers[1].sinks, cache.layers[1].window) == (0, 6)
    model = patch_model(model, "sliding_window:window=6", head_patterns={(1, 0): "dense"}, backend="reference")
    cache = SparseCache(model)
    assert isinstance(cache.layers[0], SparseWindowLayer)
    assert [type(g[2]) for g in cache.layers[1].groups] == [DynamicLayer, SparseWindowLayer]


def test_plan_is_saved_and_restored(tmp_path):
    model = patch_model(tiny("llama"), "sliding_window:window=6", head_patterns=PLAN, backend="reference")
    ids = tokens(1, T, seed=6)
    want = run(model, ids)
    model.save_pretrained(tmp_path)
    again = patch_model(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), backend="reference")
    assert again.config.hf_sparse["head_patterns"] == model.config.hf_sparse["head_patterns"]
    torch.testing.assert_close(run(again, ids), want)


@pytest.mark.parametrize("heads,match", [
    ({(2, 0): "dense"}, r"names layer 2, but the model has 2 layers"),
    ({(0, 2): "dense"}, r"KV head 2 of layer 0, but the model has 2 KV heads"),
    ({(0, 0): "dense:causal=false"}, r"give one causal pattern per head"),
    ({0: "dense"}, r"keys are \(layer, kv_head\) pairs"),
    ({(0, 0): "nonsense"}, r"unknown pattern 'nonsense'"),
    ([(0, 0)], r"must be a dict"),
])
def test_bad_head_patterns(heads, match):
    with pytest.raises(ValueError, match=match):
        patch_model(tiny("llama"), "sliding_window:window=6", head_patterns=heads)


def test_head_pattern_on_an_unpatched_layer_is_refused():
    with pytest.raises(ValueError, match=r"names layer 1, which layers=\[0\] leaves unpatched"):
        patch_model(tiny("llama"), "sliding_window:window=6", layers=[0], head_patterns={(1, 0): "dense"})


def test_per_head_pattern_naming_a_missing_head_is_refused():
    with pytest.raises(ValueError, match=r"KV head\(s\) \[3\], but the layer has 2"):
        patch_model(tiny("llama"), PerHead(SlidingWindow(window=4), ((3, Dense()),)))


def test_registered_pattern_runs_through_patch_model(tmp_path):
    register_pattern("parity_test", Parity, replace=True)
    base = tiny("llama")
    ids = tokens(1, T, seed=7)
    want = explicit_mask_logits(base, {i: Parity() for i in range(2)}, ids)
    model = patch_model(copy.deepcopy(base), "parity_test")
    assert_real_close(run(model, ids), want)
    model.save_pretrained(tmp_path)
    again = patch_model(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    torch.testing.assert_close(run(again, ids), run(model, ids))
    assert isinstance(Longformer(window=2) | Parity(), Pattern)
