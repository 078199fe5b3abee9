"""Static (fixed-shape) bounded caches, per-KV-head caches and the compiled decode step.

References, from the most to the least independent:

* HF's own eager attention with an explicit per-layer, per-KV-head 4D mask from ``Pattern.allowed``
  (``explicit_mask_logits`` of ``tests/test_patches.py``: the per-head dense oracle), on the final
  sequence of a generation (teacher forcing), for the logits of every generated step;
* ``generate(use_cache=False)``: recomputing the whole sequence at every step;
* the dynamic :class:`SparseCache` (tokens and logits), for the static cache;
* the eager decode step, for the same step compiled (``torch._dynamo.explain`` for graph breaks).

Tiny models built from configs, float32, ``backend="reference"``, on the CPU (one test runs the
Triton decode kernel in the interpreter). W = 8 and 40 new tokens: the ring wraps around many times.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import cache_kwargs, left_padding, tiny, tokens  # noqa: E402
from hf_sparse.patches import patch_model  # noqa: E402
from hf_sparse.patches.cache import (  # noqa: E402
    HeadGroupsLayer,
    SparseCache,
    SparseWindowLayer,
    cache_bytes,
    head_groups,
    layer_bytes,
)
from hf_sparse.patches.options import options_of  # noqa: E402
from hf_sparse.patches.static_cache import SparseStaticCache, StaticWindowLayer  # noqa: E402
from test_cache import NEW, PATTERNS, Feeder, G, W, generate  # noqa: E402
from test_patches import explicit_mask_logits  # noqa: E402
from transformers.cache_utils import DynamicLayer, StaticCache  # noqa: E402

from hf_sparse import Dense, PerHead, SlidingWindow, parse_pattern  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread (see conftest)."""


def full_mask(mask, seq):
    return torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)


def oracle_logits(base, layer_patterns, seq, mask, prompt):
    """The per-head dense oracle's logits for the generated steps of ``seq``."""
    return explicit_mask_logits(base, layer_patterns, seq, full_mask(mask, seq))[:, prompt - 1 : -1]


def pointers(cache):
    return [t.data_ptr() for layer in cache.layers for sub in getattr(layer, "layers", [layer])
            for t in (sub.keys, sub.values, sub.positions, sub.real_counts)]


# ---------------------------------------------------------------------------------------------
# the layer on its own
def test_static_layer_keeps_sinks_and_window_in_place():
    """Left padding, a prompt, decode steps and a chunk: each row holds its first G positions and (at
    least) its last W - 1 with their own keys, in buffers that never move or change shape."""
    layer = StaticWindowLayer(64, window=W, sinks=G)
    feed = Feeder(layer)
    lengths, prompt = [13, 5], 13
    real = left_padding(lengths, prompt).bool()
    assert feed(prompt, real).shape[-2] == prompt  # the prompt's own keys: the prefill kernels run on them
    where = [layer.keys.data_ptr(), layer.positions.data_ptr(), layer.real_counts.data_ptr()]
    for step in range(30):
        out = feed(1, None if step % 2 else torch.cat([real, torch.ones(2, step + 1, dtype=torch.bool)], 1))
        assert out.data_ptr() == layer.keys.data_ptr() and out.shape == layer.keys.shape == (2, 2, G + W, 4)
    feed(5, torch.ones(2, 5, dtype=torch.bool))  # a chunk: only its own columns of the mask are read
    assert [layer.keys.data_ptr(), layer.positions.data_ptr(), layer.real_counts.data_ptr()] == where
    assert int(layer.get_seq_length()) == prompt + 35 and layer.live_tokens() == W - 1 + G
    for r in range(2):
        n = len(feed.keys_by_pos[r])
        assert set(range(G)) | set(range(n - W + 1, n)) <= set(feed.stored(r)) <= set(range(G)) | set(range(n - W, n))


def test_static_layer_and_cache_refuse_bad_input():
    with pytest.raises(ValueError, match="window must be None"):
        StaticWindowLayer(16, window=0)
    with pytest.raises(ValueError, match="max_cache_len must be an integer"):
        StaticWindowLayer(0)
    layer = StaticWindowLayer(16, window=4)
    layer.prepare(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="last 1 columns are the new tokens"):
        layer.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    assert StaticWindowLayer(10, window=8, sinks=4).full  # sinks + window beyond the cache: every position kept
    model = patch_model(tiny("llama"), PATTERNS["window"], layers=[1], backend="reference")
    with pytest.raises(NotImplementedError, match="needs every layer patched"):
        SparseStaticCache(model, max_cache_len=32)
    with pytest.raises(ValueError, match="max_cache_len must be an integer >= 1"):
        SparseStaticCache(patch_model(tiny("llama"), "dense", backend="reference"), max_cache_len=0)
    with pytest.raises(ValueError, match="patched by hf_sparse.patch_model"):
        SparseStaticCache(tiny("llama"), max_cache_len=32)


def test_transformers_static_cache_is_refused_with_the_fix():
    model = patch_model(tiny("llama"), PATTERNS["window"], backend="reference")
    ids = tokens(1, 12)
    with pytest.raises(NotImplementedError, match="SparseStaticCache"):
        generate(model, ids, torch.ones_like(ids), new=3, **cache_kwargs(StaticCache(config=model.config,
                                                                                     max_cache_len=32)))


# ---------------------------------------------------------------------------------------------
# generate with the static cache
STATIC_CASES = [(m, n) for m in ("llama", "mistral") for n in PATTERNS]


@pytest.mark.parametrize(("model_type", "name"), STATIC_CASES, ids=[f"{a}-{b}" for a, b in STATIC_CASES])
def test_static_cache_equals_dynamic_cache(model_type, name):
    """cache_implementation="static" builds a SparseStaticCache: across 40 steps (the ring wraps five times)
    of a left-padded batch, the same tokens and logits as the dynamic SparseCache and the per-head dense
    oracle; window layers show G + W slots whatever the length."""
    extra = {"sliding_window": 5} if model_type == "mistral" else {}
    base = tiny(model_type, **extra)
    model = patch_model(tiny(model_type, **extra), PATTERNS[name], backend="reference")
    prompt = 36 if name == "bigbird" else 20
    ids = tokens(2, prompt, seed=5)
    mask = left_padding([prompt, prompt - 7], prompt)
    seq, logits, cache = generate(model, ids, mask, cache_implementation="static")
    seq_dyn, logits_dyn, _ = generate(model, ids, mask)
    assert isinstance(cache, SparseStaticCache) and torch.equal(seq, seq_dyn)
    torch.testing.assert_close(logits, logits_dyn, atol=1e-5, rtol=1e-5)
    want = oracle_logits(base, {i: patch_plan(model, i) for i in range(2)}, seq, mask, prompt)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    total = prompt + NEW
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, StaticWindowLayer) and int(layer.get_seq_length()) == total - 1
        # "dense" on Mistral is the model's own window (5); a full history is sized by generate to
        # prompt + new - 1 (the last token is never fed back)
        policy = options_of(model.config).pattern_for(i).cache_policy()
        assert layer.keys.shape[-2] == (total - 1 if policy is None else sum(policy))


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_static_cache_buffers_have_transformers_shapes(model_type):
    """What transformers' tests read (cache.layers[i].keys / .values) has the shape of its own StaticCache for
    the same config: [B, H, max_cache_len, D] for a full history, the window for Mistral's native one (which
    "dense" keeps)."""
    extra = {"sliding_window": 5} if model_type == "mistral" else {}
    base = tiny(model_type, **extra)
    ids = tokens(2, 3)
    theirs = StaticCache(config=base.config, max_cache_len=16)
    with torch.no_grad():
        base(ids, **cache_kwargs(theirs))
    model = patch_model(tiny(model_type, **extra), "dense", backend="reference")
    ours = SparseStaticCache(model, max_cache_len=16)
    with torch.no_grad():
        model(ids, **cache_kwargs(ours))
    for mine, hf in zip(ours.layers, theirs.layers, strict=True):
        assert mine.keys.shape == hf.keys.shape and mine.values.shape == hf.values.shape
    assert [layer.keys.shape[-2] for layer in ours.layers] == [5 if extra else 16] * 2


def test_static_cache_attentions_equal_eager_static_cache():
    """output_attentions with a static cache: "dense" returns transformers' eager probabilities over the cache's
    slots, [B, H, q, max_cache_len], for the prompt, every decode step and a chunk after stored tokens."""
    base = tiny("llama")
    model = patch_model(tiny("llama"), "dense", backend="reference")
    ids = tokens(2, 7)
    runs = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                       cache_implementation="static", output_attentions=True, return_dict_in_generate=True)
            for m in (base, model)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for want_step, got_step in zip(runs[0].attentions, runs[1].attentions, strict=True):
        for want, got in zip(want_step, got_step, strict=True):
            assert got.shape == want.shape and got.shape[-1] == 7 + 4 - 1
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a prompt in two chunks, the second over the stored slots and itself
    theirs, ours = StaticCache(config=base.config, max_cache_len=12), SparseStaticCache(model, max_cache_len=12)
    with torch.no_grad():
        for start, stop in ((0, 4), (4, 7)):
            kwargs = dict(attention_mask=torch.ones(2, stop, dtype=torch.long), output_attentions=True,
                          position_ids=torch.arange(start, stop).expand(2, -1))
            want = base(ids[:, start:stop], **kwargs, **cache_kwargs(theirs)).attentions
            got = model(ids[:, start:stop], **kwargs, **cache_kwargs(ours)).attentions
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape == (2, 4, stop - start, 12)
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_static_cache_chunked_prefill_explicit_cache_and_reuse():
    """An explicit SparseStaticCache, allocated up front: chunked prefill (prompt in chunks of 7, each over
    the stored slots and the chunk) and decode equal recomputation, the buffers never move, and
    cache_bytes is what was allocated."""
    model = patch_model(tiny("llama"), PATTERNS["longformer"], backend="reference")
    ids = tokens(2, 30, seed=5)
    mask = left_padding([30, 13], 30)
    cache = SparseStaticCache(model, max_cache_len=30 + 16, max_batch_size=2)
    where = pointers(cache)
    seq, logits, returned = generate(model, ids, mask, new=16, prefill_chunk_size=7, **cache_kwargs(cache))
    seq_full, logits_full, _ = generate(model, ids, mask, new=16, use_cache=False)
    assert returned is cache and pointers(cache) == where
    assert torch.equal(seq, seq_full)
    torch.testing.assert_close(logits, logits_full, atol=1e-4, rtol=1e-4)
    per_layer = 2 * (2 * 2 * (G + W + 1) * 8 * 4) + 2 * (G + W + 1) * 8 + 2 * 8  # K, V; positions; counts
    assert cache_bytes(cache) == 2 * per_layer
    cache.reset()  # the same cache again, from scratch
    seq_again, _, _ = generate(model, ids, mask, new=16, **cache_kwargs(cache))
    assert torch.equal(seq_again, seq) and pointers(cache) == where


def test_beam_search_with_the_static_cache():
    model = patch_model(tiny("llama"), PATTERNS["window"], backend="reference")
    ids = tokens(2, 20, seed=3)
    mask = left_padding([20, 14], 20)
    beams = generate(model, ids, mask, new=12, num_beams=3, cache_implementation="static")
    beams_full = generate(model, ids, mask, new=12, num_beams=3, use_cache=False)
    assert torch.equal(beams[0], beams_full[0])
    torch.testing.assert_close(beams[1], beams_full[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths", [[9, 9], [9, 6]], ids=["no-padding", "left-padding"])
def test_generate_hands_every_decode_step_the_same_mask_layout(lengths):
    """A compiled decode step recompiles when its inputs change: the attention mask must be absent at every
    step or a tensor of one shape and stride at every step, up to the last one (whose 2D mask is as long as
    the cache)."""
    model = patch_model(tiny("llama"), "dense", backend="reference")
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                    with_kwargs=True)
    ids, mask = tokens(2, 9, seed=4), left_padding(lengths, 9)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                   cache_implementation="static")
    layouts = [None if m is None else (m.shape, m.stride(), m.dtype) for m in seen[1:]]
    assert len(layouts) == 3 and layouts == [layouts[0]] * 3, layouts


# ---------------------------------------------------------------------------------------------
# per-KV-head caches
HEADS = {(0, 0): "dense", (0, 2): "longformer:window=4,global_tokens=3", (1, 1): "dense"}
BASE_HEADS = dict(num_attention_heads=8, num_key_value_heads=4)


def test_head_groups_by_policy():
    plan = PerHead(SlidingWindow(6), ((0, Dense()), (2, Dense()), (3, SlidingWindow(4))))
    groups = head_groups(plan, 4)
    assert [g[0] for g in groups] == [(0, 2), (1,), (3,)]
    assert [g[1] for g in groups] == [Dense(), SlidingWindow(6), SlidingWindow(4)]
    # heads numbered from 0 inside a group; one group when every head keeps the same
    mixed = PerHead(SlidingWindow(6), ((1, parse_pattern("strided:stride=4,window=2")),))
    assert head_groups(PerHead(SlidingWindow(6), ((0, SlidingWindow(6)),)), 2)[0][0] == (0, 1)
    assert head_groups(PerHead(Dense(), ((1, mixed.pattern_of(1)),)), 3) == [
        ((0, 1, 2), PerHead(Dense(), ((1, mixed.pattern_of(1)),)))]
    # a head whose rule depends on its index (random blocks) keeps the layer in one group
    bigbird = parse_pattern(PATTERNS["bigbird"])
    assert len(head_groups(PerHead(SlidingWindow(6), ((1, bigbird),)), 2)) == 1


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_per_head_cache_equals_per_head_oracle(static):
    """A dense head, a Longformer head and window heads in one layer, a dense head in the other: each
    group keeps only what its heads' pattern can still see, and 40 generated steps of a left-padded
    batch give the per-head dense oracle's logits and the recomputation's tokens."""
    base = tiny("llama", **BASE_HEADS)
    model = patch_model(tiny("llama", **BASE_HEADS), "sliding_window:window=6", head_patterns=HEADS,
                        backend="reference")
    ids = tokens(2, 20, seed=5)
    mask = left_padding([20, 13], 20)
    seq, logits, cache = generate(model, ids, mask, **({"cache_implementation": "static"} if static else {}))
    seq_full, _, _ = generate(model, ids, mask, use_cache=False)
    assert torch.equal(seq, seq_full)
    layer_patterns = {i: patch_plan(model, i) for i in range(2)}
    torch.testing.assert_close(logits, oracle_logits(base, layer_patterns, seq, mask, 20), atol=1e-4, rtol=1e-4)
    first = cache.layers[0]
    assert isinstance(first, HeadGroupsLayer) and [g[0] for g in first.groups] == [(0,), (1, 3), (2,)]
    kinds = [type(sub) for sub in first.layers]
    assert kinds == ([StaticWindowLayer] * 3 if static else [DynamicLayer, SparseWindowLayer, SparseWindowLayer])
    # the cache's bytes are the groups' own: the dense head costs the full history, the others their window
    total = 20 + NEW - 1
    per_slot = 2 * 2 * 8 * 4 + 2 * 8  # K and V (batch 2, head dim 8, float32) per head, positions per group
    dense, window, longformer = (layer_bytes(sub) for sub in first.layers)
    assert dense >= 2 * 2 * 8 * 4 * total
    assert window <= 2 * per_slot * (6 + 1) + 16 and longformer <= per_slot * (4 + 3 + 1) + 16
    assert cache_bytes(cache) == sum(layer_bytes(layer) for layer in cache.layers)
    assert cache_bytes(cache) < 0.5 * (2 * 4 * 2 * 2 * 8 * 4 * total)  # half of every head kept in full


def test_per_head_cache_rolls_back_for_assisted_decoding():
    """A per-head cache (a full-history group and bounded ones) rolls every group back together: assisted
    greedy decoding gives greedy decoding's tokens (HF's guarantee)."""
    model = patch_model(tiny("llama", **BASE_HEADS), "sliding_window:window=6", head_patterns=HEADS,
                        backend="reference")
    ids = tokens(1, 12)
    seq, _, _ = generate(model, ids, torch.ones_like(ids), new=24)
    cache = SparseCache(model)
    cache.activate_past_recording()
    assisted, _, cache = generate(model, ids, torch.ones_like(ids), new=24, assistant_model=tiny("llama", seed=1),
                                  **cache_kwargs(cache))
    assert isinstance(cache.layers[0], HeadGroupsLayer) and torch.equal(assisted, seq)


def patch_plan(model, layer: int):
    return options_of(model.config).pattern_for(layer)


# ---------------------------------------------------------------------------------------------
# torch.compile of the decode step
def _prefilled(spec, head_patterns=None, backend="reference", **model_kwargs):
    model = patch_model(tiny("llama", **model_kwargs), spec, head_patterns=head_patterns, backend=backend)
    ids = tokens(2, 20, seed=5)
    mask = left_padding([20, 13], 20)
    cache = SparseStaticCache(model, max_cache_len=64, max_batch_size=2)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(cache))
    return model, cache, out.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:] + 1


def _decode(forward, cache, token, pos, steps: int):
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            out = forward(input_ids=token, position_ids=pos, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
            logits.append(out)
            token, pos = out.argmax(-1, keepdim=True), pos + 1
    return torch.stack(logits, 1)


COMPILE_CASES = {
    "window": (PATTERNS["window"], None),
    "longformer": (PATTERNS["longformer"], None),
    "dense": ("dense", None),
    "per-head": ("sliding_window:window=6", {(0, 0): "dense", (1, 1): "sliding_window:window=3"}),
    # distance caps past their N (positions reach 44): the rotated queries and keys inside the compiled step
    "global-cap": ("longformer:window=6,global_tokens=2,max_distance=8", None),
    "dense-cap": ("sliding_window:window=6", {(0, 0): "dense:max_distance=8", (1, 1): "sliding_window:window=3"}),
}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_static_decode_step_compiles_without_graph_breaks(name):
    """A decode step over the static cache traces to one graph (no break in our code), and the compiled
    step (aot_eager: no C++ compiler needed) gives the eager step's logits for 24 steps across the wrap."""
    spec, heads = COMPILE_CASES[name]
    model, cache, token, pos = _prefilled(spec, heads)
    with torch.no_grad():
        explain = torch._dynamo.explain(model.forward)(input_ids=token, position_ids=pos, use_cache=True,
                                                       **cache_kwargs(cache))
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    model, cache, token, pos = _prefilled(spec, heads)
    eager = _decode(model.forward, cache, token, pos, 24)
    torch._dynamo.reset()
    model, cache, token, pos = _prefilled(spec, heads)
    compiled = _decode(torch.compile(model.forward, backend="aot_eager", fullgraph=True), cache, token, pos, 24)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_static_prefill_compiles_without_graph_breaks(name):
    """The padded prefill into the static cache (20 tokens: the caps of 8 act) traces to one graph too, and
    the compiled prefill gives the eager logits."""
    spec, heads = COMPILE_CASES[name]
    model = patch_model(tiny("llama"), spec, head_patterns=heads, backend="reference")
    ids, mask = tokens(2, 20, seed=5), left_padding([20, 13], 20)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)

    def prefill(forward):
        cache = SparseStaticCache(model, max_cache_len=64, max_batch_size=2)
        with torch.no_grad():
            return forward(ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(cache)).logits

    torch._dynamo.reset()
    explain = torch._dynamo.explain(prefill)(model.forward)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    eager = prefill(model.forward)
    torch._dynamo.reset()
    compiled = prefill(torch.compile(model.forward, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[mask.bool()], eager[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton on the CPU)")
def test_compiled_decode_runs_the_kernel_as_one_op():
    """backend="triton": the compiled step (one graph: fullgraph=True) calls the decode kernel through its
    custom op, with the reference path's logits."""
    pytest.importorskip("triton")
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, cache, token, pos = _prefilled(PATTERNS["window"])  # the prefill on the reference: faster here
    ref_model, ref_cache, _, _ = _prefilled(PATTERNS["window"])
    patch_model(model, PATTERNS["window"], backend="triton")
    compiled = _decode(torch.compile(model.forward, backend=recording, fullgraph=True), cache, token, pos, 4)
    torch.testing.assert_close(compiled, _decode(ref_model.forward, ref_cache, token, pos, 4), atol=1e-4, rtol=1e-4)
    ops = {n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert len(graphs) == 1 and torch.ops.hf_sparse.decode_positions.default in ops


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton on the CPU)")
@pytest.mark.parametrize("spec", [PATTERNS["longformer"], "dense", "per_head[sliding_window:window=5;1=dense]"])
def test_decode_kernel_skips_empty_and_distant_tiles_exactly(spec):
    """Decode by positions over a mostly empty buffer (a static full-history cache early on) with stale
    positions far outside the window: the kernel skips those tiles and gives the reference's output."""
    pytest.importorskip("triton")
    from hf_sparse.decode import attention_with_positions

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, slots, d = 2, 4, 2, 150, 16
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, slots, d, generator=g)
    v = torch.randn(b, hkv, slots, d, generator=g)
    k_pos = torch.full((b, slots), -1)
    k_pos[0, :40] = torch.arange(40)  # row 0: a full history of 40 tokens, the rest empty
    k_pos[1, 3:7] = torch.tensor([0, 1, 2, 3])  # row 1: sinks, stale positions, then the recent ones
    k_pos[1, 60:70] = torch.arange(200, 210)
    k_pos[1, 120:130] = torch.arange(990, 1000)
    q_pos = torch.tensor([[39], [999]])
    out = attention_with_positions(q, k, v, spec, q_pos=q_pos, k_pos=k_pos, backend="triton")
    ref = attention_with_positions(q, k, v, spec, q_pos=q_pos, k_pos=k_pos, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["window", "longformer"])
def test_compiled_generate_on_cuda_replays_cuda_graphs(name):
    """On CUDA, generate(cache_implementation="static") compiles the decode step itself (Inductor,
    mode="reduce-overhead"): no CUDA-graph skip, no recompilation per step, and the greedy tokens and
    logits of the same static cache run eagerly (float32)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = patch_model(tiny("llama", head_dim=64, hidden_size=128).cuda(), PATTERNS[name], backend="triton")
    ids = tokens(2, 40).cuda()
    mask = left_padding([40, 29], 40).cuda()
    eager = generate(model, ids, mask, new=24, cache_implementation="static", disable_compile=True)
    compiled = generate(model, ids, mask, new=24, cache_implementation="static")
    assert torch.equal(compiled[0], eager[0])
    # float32 runs the kernels' matrix products on TF32 and Inductor fuses the rest differently: seen on an
    # H100, logits differ by up to 1.4e-3 while every token agrees
    torch.testing.assert_close(compiled[1], eager[1], atol=5e-3, rtol=1e-3)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # the decode step, compiled once
