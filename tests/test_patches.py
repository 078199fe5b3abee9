"""The Hugging Face adapter (``hf_sparse.patches``) on tiny random models built from configs.

References, from the most to the least independent of hf_sparse:

* HF's own Mistral sliding window (pins the window convention and the padding semantics);
* HF's own eager attention given an explicit 4D mask built from :meth:`Pattern.allowed` -- the
  single definition of a pattern. BigBird's random blocks differ per layer and per KV head, so the
  mask is built per layer and per KV head (expanded to the query heads of each group) and handed to
  each attention module by a forward pre-hook; the model forward itself gets a 4D mask, which
  transformers passes through untouched;
* the same patched model run another way (one sequence at a time; generation without cache).

Everything runs on the CPU in float32 with ``backend="reference"``.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import cache_kwargs, left_padding, tiny, tokens  # noqa: E402
from hf_sparse.patches import ATTN_NAME, patch_model, unpatch_model  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

import hf_sparse  # noqa: E402
from hf_sparse import Dense, SlidingWindow, parse_pattern  # noqa: E402

PATTERNS = {
    "window": "sliding_window:window=7",
    "longformer": "longformer:window=6,global_tokens=3",
    "bigbird": "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1,seed=1",
    "dense": "dense",
}
SPARSE = ["window", "longformer", "bigbird"]
T = 72  # > 3 BigBird blocks of 16, so random blocks exist; > every window

# Large native windows here, so that an unpatched model is plain causal attention over T tokens.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 512},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"],
               "attn_logit_softcapping": 1.5, "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 12},
    "gemma3_text": {"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 12},
    "phi3": {},
}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids under padding, as ``generate`` builds them (padding slots get 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def explicit_masks(model, layer_patterns: dict, input_ids, attention_mask=None) -> dict:
    """Per-layer ``[B, Hq, T, T]`` float masks from ``Pattern.allowed`` (per KV head, expanded over its group)."""
    b, t = input_ids.shape
    dev = input_ids.device
    real = torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
    pos = real.long().cumsum(-1) - 1
    cfg = model.config
    hkv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    masks = {}
    for layer, pat in layer_patterns.items():
        ok = pat.allowed(pos.view(b, 1, t, 1), pos.view(b, 1, 1, t), layer=layer,
                         kv_head=torch.arange(hkv, device=dev).view(1, hkv, 1, 1), num_keys=t)
        ok = (ok & real.view(b, 1, 1, t)).expand(b, hkv, t, t).repeat_interleave(group, dim=1)
        masks[layer] = torch.zeros(ok.shape, device=dev).masked_fill(~ok, torch.finfo(torch.float32).min)
    return masks


def explicit_mask_forward(model, layer_patterns: dict, input_ids, attention_mask=None, **kwargs):
    """The unpatched model with HF's eager attention, each layer given its own explicit 4D mask.

    The model forward gets a 4D mask (transformers passes 4D masks through untouched) and a forward
    pre-hook on each attention module swaps in that layer's mask.
    """
    masks = explicit_masks(model, layer_patterns, input_ids, attention_mask)

    def inject(module, args, kw):
        kw["attention_mask"] = masks[module.layer_idx]
        return args, kw

    assert model.config._attn_implementation == "eager"
    attn_modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    assert sorted(m.layer_idx for m in attn_modules) == sorted(layer_patterns)
    handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in attn_modules]
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    try:
        return model(input_ids, attention_mask=masks[0][:, :1], position_ids=positions(real), use_cache=False,
                     **kwargs)
    finally:
        for h in handles:
            h.remove()


def explicit_mask_logits(model, layer_patterns: dict, input_ids, attention_mask=None):
    with torch.no_grad():
        return explicit_mask_forward(model, layer_patterns, input_ids, attention_mask).logits


def run(model, input_ids, attention_mask=None):
    pos = None if attention_mask is None else positions(attention_mask)
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits


def assert_real_close(out, ref, attention_mask=None, atol=2e-5, rtol=2e-5):
    if attention_mask is not None:
        keep = attention_mask.bool()
        out, ref = out[keep], ref[keep]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def all_layers(model, pattern) -> dict:
    return {i: parse_pattern(pattern) for i in range(model.config.num_hidden_layers)}


# ---------------------------------------------------------------------------------------------
# conventions
def test_sliding_window_matches_hf_mistral():
    """Pins the window convention (and padding semantics) against HF's own sliding-window model."""
    window = 6
    llama = tiny("llama")
    mistral = tiny("mistral", sliding_window=window)
    mistral.load_state_dict(llama.state_dict())
    ids = tokens(3, 30)
    mask = left_padding([30, 22, 9], 30)
    for m in (None, mask):
        ref = run(mistral, ids, m)
        patch_model(llama, f"sliding_window:window={window}", backend="reference")
        assert_real_close(run(llama, ids, m), ref, m)
        for off_by_one in (window - 1, window + 1):  # the neighbours of the right window are measurably wrong
            patch_model(llama, SlidingWindow(off_by_one), backend="reference")
            assert not torch.allclose(run(llama, ids, m), ref, atol=1e-3)
        unpatch_model(llama)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dense_pattern_equals_unpatched(attn):
    model = tiny("llama", attn=attn)
    ids = tokens(3, T)
    mask = left_padding([T, 40, 11], T)
    refs = [run(model, ids), run(model, ids, mask)]
    patch_model(model, "dense", backend="reference")
    assert model.config.hf_sparse["previous_attn_implementation"] == attn
    assert_real_close(run(model, ids), refs[0])
    assert_real_close(run(model, ids, mask), refs[1], mask)


@pytest.mark.parametrize("name", SPARSE + ["dense"])
def test_pattern_equals_explicit_mask(name):
    """Per-layer, per-KV-head 4D masks from Pattern.allowed with HF eager attention (GQA: 4 q / 2 kv heads)."""
    model = tiny("llama")
    ids = tokens(3, T)
    mask = left_padding([T, 57, 20], T)
    refs = [explicit_mask_logits(model, all_layers(model, PATTERNS[name]), ids, m) for m in (None, mask)]
    dense = run(model, ids)
    patch_model(model, PATTERNS[name], backend="reference")
    assert_real_close(run(model, ids), refs[0])
    assert_real_close(run(model, ids, mask), refs[1], mask)
    if name != "dense":  # the pattern must matter at this size, or the test proves nothing
        assert (refs[0] - dense).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_gradients_equal_explicit_mask(name):
    """Training through the adapter: loss and every parameter gradient match the explicit-mask model."""
    model = tiny("llama")
    ids = tokens(2, T)
    mask = left_padding([T, 40], T)
    # No label may be predicted from a padding slot (its logits are arbitrary in both models).
    predicted_from_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0)) == 0
    labels = ids.masked_fill((mask == 0) | predicted_from_padding, -100)
    ref = explicit_mask_forward(model, all_layers(model, PATTERNS[name]), ids, mask, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    patch_model(model, PATTERNS[name], backend="reference")
    out = model(ids, attention_mask=mask, position_ids=positions(mask), labels=labels, use_cache=False)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def _triton_device() -> str | None:
    """Where backend="triton" can run: CUDA, or the CPU under Triton's interpreter (as in CI)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        return "cpu"
    return None


def decode_logits(model, ids, mask, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens into a DynamicCache, then feed the rest one token at a time (teacher
    forcing, no argmax involved); the logits at positions ``prompt - 1 .. T - 1``."""
    cache = DynamicCache(config=model.config)
    pos = positions(mask)
    with torch.no_grad():
        out = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt], use_cache=True,
                     **cache_kwargs(cache)).logits[:, -1:]]
        for s in range(prompt, ids.shape[1]):
            out.append(model(ids[:, s : s + 1], attention_mask=mask[:, : s + 1], position_ids=pos[:, s : s + 1],
                             use_cache=True, **cache_kwargs(cache)).logits)
    return torch.cat(out, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_triton_backend_through_the_adapter(name):
    """backend="triton" through the adapter, prefill and cached decode, against the explicit-mask model.

    Under Triton's CPU interpreter the kernels compute in float32: compared tightly. On CUDA, float32 inputs
    use TF32 inside the kernels, so the error is bounded by twice that of HF eager attention with TF32
    matrix products (flash-attention's rule), for the full forward and for token-by-token decoding.
    """
    device = _triton_device()
    if device is None:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 with triton installed")
    on_gpu = device == "cuda"
    # head dims in multiples of 16 for the kernels; one layer and a short sequence for the slow interpreter
    model = tiny("llama", head_dim=16, hidden_size=64, num_hidden_layers=2 if on_gpu else 1,
                 initializer_range=0.1 if on_gpu else 0.3).to(device)
    t = 200 if on_gpu else T
    ids = tokens(2, t).to(device)
    mask = left_padding([t, t - 37], t).to(device)
    layers = all_layers(model, PATTERNS[name])
    ref = explicit_mask_logits(model, layers, ids, mask)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ref_tf32 = explicit_mask_logits(model, layers, ids, mask)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    patch_model(model, PATTERNS[name], backend="triton")
    out = run(model, ids, mask)
    if not on_gpu:
        assert_real_close(out, ref, mask, atol=1e-4, rtol=1e-4)
        return
    keep = mask.bool()
    bound = 2 * (ref_tf32 - ref)[keep].abs().max().item() + 1e-4
    err_full = (out - ref)[keep].abs().max().item()
    prompt = 150
    dec = decode_logits(model, ids, mask, prompt)
    err_decode = (dec - ref[:, prompt - 1 :])[keep[:, prompt - 1 :]].abs().max().item()
    print(f"{name}: prefill err {err_full:.3g}, decode err {err_decode:.3g}, bound (2 x eager TF32) {bound:.3g}")
    assert err_full <= bound and err_decode <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_triton_bf16_error_at_most_twice_eager(model_type):
    """flash-attention's rule: against a float32 reference, the bf16 kernel errs at most about twice as much
    as HF's own bf16 eager attention under the same explicit mask."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    extra = FAMILIES[model_type] if model_type == "gemma2" else {}
    model = tiny(model_type, head_dim=64, hidden_size=128, initializer_range=0.1, **extra).cuda()
    ids = tokens(2, 300).cuda()
    mask = left_padding([300, 211], 300).cuda()
    layers = all_layers(model, PATTERNS["bigbird"])
    ref = explicit_mask_logits(model, layers, ids, mask)
    eager_bf16 = explicit_mask_logits(model.to(torch.bfloat16), layers, ids, mask).float()
    patch_model(model, PATTERNS["bigbird"], backend="triton")
    ours = run(model, ids, mask).float()
    keep = mask.bool()
    err_ours = (ours - ref)[keep].abs().max().item()
    err_eager = (eager_bf16 - ref)[keep].abs().max().item()
    print(f"{model_type}: max |bf16 triton - fp32| = {err_ours:.4g}, max |bf16 eager - fp32| = {err_eager:.4g}")
    assert err_ours <= 2 * err_eager + 1e-3


def test_bigbird_masks_differ_per_layer_and_head():
    """The comparison above is only honest if BigBird's random blocks really vary with layer and KV head."""
    pat = parse_pattern(PATTERNS["bigbird"])
    q, k = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    masks = [pat.allowed(q, k, layer=layer, kv_head=head) for layer in (0, 1) for head in (0, 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :])


# ---------------------------------------------------------------------------------------------
# padding, generation
@pytest.mark.parametrize("name", list(PATTERNS))
def test_padded_batch_equals_one_by_one(name):
    model = patch_model(tiny("llama"), PATTERNS[name], backend="reference")
    lengths = [T, 50, 17]
    ids = tokens(3, T)
    for side in ("left", "right"):
        mask = left_padding(lengths, T)
        if side == "right":
            mask = mask.flip(-1)
        batch = run(model, ids, mask)
        for row in range(len(lengths)):
            real = mask[row].bool()
            alone = run(model, ids[row : row + 1, real])
            torch.testing.assert_close(batch[row, real], alone[0], atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """The registered functions trace without graph breaks (aot_eager: no C++ compiler needed)."""
    model = patch_model(tiny("mistral", sliding_window=5), PATTERNS["longformer"], layers=[1], backend="reference")
    ids = tokens(2, 30)
    mask = left_padding([30, 19], 30)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    assert_real_close(out, run(model, ids, mask), mask)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_torch_compile_inductor_on_gpu(name):
    """torch.compile with Inductor on CUDA, the Triton kernels (custom ops) inside the compiled graph: logits
    and gradients as close to the float32 reference path as the eager model's are (the kernels take float32
    through TF32 products, so compiled and eager differ in the last bits; neither may be further off)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    base = tiny("llama", head_dim=64, hidden_size=128, initializer_range=0.1).cuda()
    ids = tokens(2, 300).cuda()
    mask = left_padding([300, 211], 300).cuda()
    pos = positions(mask)
    keep = mask.bool()

    def logits_and_grads(model):
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out[keep].float().square().mean().backward()
        return out[keep].detach(), [p.grad.detach().clone() for p in model.parameters()]

    ref = logits_and_grads(patch_model(copy.deepcopy(base), PATTERNS[name], backend="reference"))
    eager = logits_and_grads(patch_model(copy.deepcopy(base), PATTERNS[name], backend="triton"))
    model = patch_model(copy.deepcopy(base), PATTERNS[name], backend="triton")
    compiled = logits_and_grads(torch.compile(model, fullgraph=True))
    for r, e, c in zip([ref[0], *ref[1]], [eager[0], *eager[1]], [compiled[0], *compiled[1]]):
        err_eager = (e - r).abs().max().item()
        err_compiled = (c - r).abs().max().item()
        assert err_compiled <= 2 * err_eager + 1e-4 * r.abs().max().item(), (err_compiled, err_eager)


def _generate(model, ids, mask, use_cache: bool, new: int = 6):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=use_cache,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores, 1)


GENERATE_CASES = [(model_type, name) for model_type in ("llama", "mistral") for name in PATTERNS]


@pytest.mark.parametrize(("model_type", "name"), GENERATE_CASES, ids=[f"{a}-{b}" for a, b in GENERATE_CASES])
def test_generate_with_cache_equals_recomputation(model_type, name):
    """Greedy generation with a DynamicCache equals recomputing the whole sequence at every step.

    The Mistral config has a native sliding window (5) shorter than the prompt: its default cache would
    drop keys that Longformer's globals, BigBird and dense attention need.
    """
    extra = {"sliding_window": 5} if model_type == "mistral" else {}
    model = patch_model(tiny(model_type, **extra), PATTERNS[name], backend="reference")
    prompt = 36 if name == "bigbird" else 20
    ids = tokens(2, prompt, seed=5)
    mask = left_padding([prompt, prompt - 7], prompt)
    seq_cached, scores_cached = _generate(model, ids, mask, use_cache=True)
    seq_full, scores_full = _generate(model, ids, mask, use_cache=False)
    torch.testing.assert_close(scores_cached, scores_full, atol=2e-5, rtol=2e-5)
    assert torch.equal(seq_cached, seq_full)


def test_patched_layers_get_a_full_history_cache():
    model = tiny("mistral", sliding_window=5)
    patch_model(model, PATTERNS["longformer"], layers=[1], backend="reference")
    cache = DynamicCache(config=model.config)
    assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
    with torch.no_grad():
        model(tokens(1, 12), use_cache=True, **cache_kwargs(cache))
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)  # unpatched layer keeps its window
    assert type(cache.layers[1]) is DynamicLayer and cache.layers[1].keys.shape[-2] == 12


def test_truncated_cache_is_refused():
    model = tiny("mistral", sliding_window=5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens(1, 12), use_cache=True, **cache_kwargs(cache))  # unpatched: the sliding layers drop old keys
        patch_model(model, PATTERNS["longformer"], backend="reference")
        with pytest.raises(RuntimeError, match="dropped"):
            model(tokens(1, 1), use_cache=True, **cache_kwargs(cache))


def test_static_cache_of_a_partly_patched_model_is_refused():
    # a fully patched model gets a SparseStaticCache (tests/test_static_cache.py); the unpatched layers' masks
    # grow with the sequence, which a fixed-shape decode step cannot take
    model = patch_model(tiny("llama"), PATTERNS["longformer"], layers=[1], backend="reference")
    ids = tokens(1, 12)
    with pytest.raises(NotImplementedError, match="needs every layer patched"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       cache_implementation="static", pad_token_id=0)


def test_layers_keep_native_attention_in_generate():
    """Mistral, layer 0 native sliding window (its cache stays a sliding layer), layer 1 Longformer."""
    model = patch_model(tiny("mistral", sliding_window=5), PATTERNS["longformer"], layers=[1], backend="reference")
    ids = tokens(2, 20, seed=7)
    mask = left_padding([20, 14], 20)
    seq_cached, scores_cached = _generate(model, ids, mask, use_cache=True)
    seq_full, scores_full = _generate(model, ids, mask, use_cache=False)
    torch.testing.assert_close(scores_cached, scores_full, atol=2e-5, rtol=2e-5)
    assert torch.equal(seq_cached, seq_full)


# ---------------------------------------------------------------------------------------------
# layers=
@pytest.mark.parametrize("previous", ["eager", "sdpa"])
def test_layers_keep_the_model_own_attention(previous):
    """Only layer 1 patched; layer 0 keeps Mistral's own sliding window (5), through eager or sdpa."""
    model = tiny("mistral", attn=previous, sliding_window=5)
    ids = tokens(3, T)
    mask = left_padding([T, 45, 12], T)
    model.set_attn_implementation("eager")
    expected = {0: SlidingWindow(5), 1: parse_pattern(PATTERNS["longformer"])}
    refs = [explicit_mask_logits(model, expected, ids, m) for m in (None, mask)]
    model.set_attn_implementation(previous)
    patch_model(model, PATTERNS["longformer"], layers=[1], backend="reference")
    assert model.config.hf_sparse["layers"] == [1]
    assert_real_close(run(model, ids), refs[0], atol=1e-4, rtol=1e-4)
    assert_real_close(run(model, ids, mask), refs[1], mask, atol=1e-4, rtol=1e-4)
    assert "hf_sparse=" in repr(model.model.layers[1].self_attn)
    assert "hf_sparse=" not in repr(model.model.layers[0].self_attn)


def test_layers_on_mixed_layer_types():
    """Gemma 2: patch the local (sliding) layer 0 only; the global layer 1 stays native full attention."""
    model = tiny("gemma2", sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                 attn_logit_softcapping=1.5, query_pre_attn_scalar=12)
    ids = tokens(2, T)
    mask = left_padding([T, 30], T)
    expected = {0: parse_pattern(PATTERNS["bigbird"]), 1: Dense()}
    ref = explicit_mask_logits(model, expected, ids, mask)
    patch_model(model, PATTERNS["bigbird"], layers=[0], backend="reference")
    assert_real_close(run(model, ids, mask), ref, mask)


HYBRID = {
    "qwen2": (dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, num_hidden_layers=3), [0, 2]),
    "gemma3_text": (dict(sliding_window=5, num_hidden_layers=3, query_pre_attn_scalar=12,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"]), [1, 2]),
}


@pytest.mark.parametrize("model_type", list(HYBRID))
def test_layers_with_mixed_native_layer_types(model_type):
    """Three layers of mixed types, some patched: the rest keep their own full or sliding attention,
    in a forward (explicit masks) and in cached generation (sliding cache layers only where unpatched)."""
    extra, layers = HYBRID[model_type]
    model = tiny(model_type, **extra)
    types = model.config.layer_types
    assert "sliding_attention" in types and "full_attention" in types
    ids = tokens(2, 24, seed=9)
    mask = left_padding([24, 15], 24)
    native = {"sliding_attention": SlidingWindow(5), "full_attention": Dense()}
    expected = {i: parse_pattern(PATTERNS["longformer"]) if i in layers else native[types[i]] for i in range(3)}
    ref = explicit_mask_logits(model, expected, ids, mask)
    model.set_attn_implementation("sdpa")
    patch_model(model, PATTERNS["longformer"], layers=layers, backend="reference")
    assert_real_close(run(model, ids, mask), ref, mask, atol=1e-4, rtol=1e-4)
    seq_cached, scores_cached = _generate(model, ids, mask, use_cache=True)
    seq_full, scores_full = _generate(model, ids, mask, use_cache=False)
    torch.testing.assert_close(scores_cached, scores_full, atol=2e-5, rtol=2e-5)
    assert torch.equal(seq_cached, seq_full)


# ---------------------------------------------------------------------------------------------
# state: config, save/load, unpatch, repr
def test_config_save_load_and_repatch(tmp_path):
    model = tiny("llama")
    ids = tokens(2, 40)
    patch_model(model, PATTERNS["longformer"], layers=[0, 1], backend="reference")
    stored = model.config.hf_sparse
    assert stored == {"pattern": {"type": "longformer", "window": 6, "global_tokens": 3, "causal": True,
                                  "max_distance": "auto"},
                      "layers": [0, 1], "backend": "reference", "previous_attn_implementation": "eager"}
    assert "hf_sparse" in str(model.config) and "longformer" in str(model.config)
    assert "hf_sparse=longformer:window=6,global_tokens=3,causal=true" in repr(model)
    out = run(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.hf_sparse == stored
    assert loaded.config._attn_implementation == "eager"  # the implementation itself is not saved
    patch_model(loaded)
    assert loaded.config._attn_implementation == ATTN_NAME
    torch.testing.assert_close(run(loaded, ids), out)


def test_unpatch_restores_outputs_and_implementation():
    model = tiny("llama", attn="sdpa")
    ids = tokens(2, 40)
    before = run(model, ids)
    patch_model(model, PATTERNS["window"], backend="reference")
    assert not torch.allclose(run(model, ids), before, atol=1e-3)
    patch_model(model, PATTERNS["bigbird"], backend="reference")  # re-patching keeps the original "previous"
    assert model.config.hf_sparse["previous_attn_implementation"] == "sdpa"
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "hf_sparse")
    assert "hf_sparse" not in repr(model)
    assert all(not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(run(model, ids), before)


def test_lazy_entry_point_and_dict_or_object_patterns():
    model = tiny("llama")
    hf_sparse.patch_model(model, {"type": "sliding_window", "window": 4}, backend="reference")
    assert model.config.hf_sparse["pattern"] == {"type": "sliding_window", "window": 4, "causal": True}
    hf_sparse.patch_model(model, SlidingWindow(4), backend="reference")
    hf_sparse.unpatch_model(model)
    assert model.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------
# families
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_families(model_type):
    """Dense patched == unpatched eager; a pattern == explicit-mask eager (scaling, softcap, GQA, padding)."""
    model = tiny(model_type, **FAMILIES[model_type])
    name = "bigbird" if model_type in ("gemma2", "qwen3") else "longformer"
    t = T if name == "bigbird" else 40
    ids = tokens(2, t)
    mask = left_padding([t, 33], t)
    plain = run(model, ids, mask)
    ref = explicit_mask_logits(model, all_layers(model, PATTERNS[name]), ids, mask)
    patch_model(model, "dense", backend="reference")
    assert_real_close(run(model, ids, mask), plain, mask)
    patch_model(model, PATTERNS[name], backend="reference")
    assert_real_close(run(model, ids, mask), ref, mask)
    assert (ref - plain)[mask.bool()].abs().max() > 1e-2


def test_gemma2_softcap_is_applied():
    """With a strong soft-cap the result differs from the uncapped one: the capping really goes through."""
    capped = tiny("gemma2", **FAMILIES["gemma2"])
    uncapped = tiny("gemma2", **{**FAMILIES["gemma2"], "attn_logit_softcapping": None})
    ids = tokens(1, 40)
    for model in (capped, uncapped):
        patch_model(model, "dense", backend="reference")
    assert not torch.allclose(run(capped, ids), run(uncapped, ids), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# errors
@pytest.mark.parametrize(
    ("pattern", "kwargs", "error", "match"),
    [
        ("nope:window=3", {}, ValueError, "unknown pattern"),
        ("longformer:window=4,globals=2", {}, ValueError, "unknown option"),
        ("sliding_window:window=0", {}, ValueError, "window must be an integer"),
        ("sliding_window:window=4,causal=false", {}, ValueError, "non-causal"),
        ("dense", {"backend": "cuda"}, ValueError, "backend"),
        ("dense", {"layers": [2]}, ValueError, "not layer indices"),
        ("dense", {"layers": [-1]}, ValueError, "not layer indices"),
        ("dense", {"layers": []}, ValueError, "patches nothing"),
        ("dense", {"layers": [0, 0]}, ValueError, "twice"),
        (None, {}, ValueError, "has none"),
    ],
)
def test_bad_inputs(pattern, kwargs, error, match):
    model = tiny("llama")
    with pytest.raises(error, match=match):
        patch_model(model, pattern, **kwargs)
    assert model.config._attn_implementation == "eager" and not hasattr(model.config, "hf_sparse")


def test_unsupported_model_type():
    model = tiny("starcoder2")
    with pytest.raises(NotImplementedError, match="does not support model_type 'starcoder2'.*llama"):
        patch_model(model, "dense")


def test_model_that_cannot_switch_implementation_is_refused(monkeypatch):
    model = tiny("llama")
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(NotImplementedError, match="cannot switch its attention implementation"):
        patch_model(model, "dense")
    assert not hasattr(model.config, "hf_sparse")


def test_old_transformers_is_refused():
    from hf_sparse.patches._compat import check_transformers_version

    with pytest.raises(ImportError, match=r"transformers>=5\.4.*4\.57\.1"):
        check_transformers_version("4.57.1")
    with pytest.raises(ImportError, match=r"transformers>=5\.4.*q_length.*5\.3\.0"):  # another mask interface
        check_transformers_version("5.3.0")
    check_transformers_version("5.4.0rc1")
    check_transformers_version(transformers.__version__)


def test_bidirectional_gemma3_is_refused():
    model = tiny("gemma3_text", **FAMILIES["gemma3_text"], use_bidirectional_attention=True)
    with pytest.raises(NotImplementedError, match="bidirectional"):
        patch_model(model, "dense")


def test_dropout_in_training_is_refused():
    model = patch_model(tiny("llama", attention_dropout=0.1), "dense", backend="reference")
    run(model, tokens(1, 8))  # eval: no dropout, fine
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(tokens(1, 8), use_cache=False)


def test_packed_sequences_after_cached_keys_are_refused():
    # packed rows without a cache run each document alone (tests/test_packing.py); over cached keys they cannot
    model = patch_model(tiny("llama"), "dense", backend="reference")
    pos = torch.cat([torch.arange(10), torch.arange(6)]).unsqueeze(0)
    cache = transformers.DynamicCache(config=model.config)
    with pytest.raises(NotImplementedError, match="packed"), torch.no_grad():
        model(tokens(1, 4), use_cache=True, **cache_kwargs(cache))
        model(tokens(1, 16), position_ids=pos + 4, use_cache=True, **cache_kwargs(cache))
