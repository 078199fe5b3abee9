"""Generation with sparse patterns: the positions-based decode attention, the bounded KV cache, generate.

References, from the most to the least independent:

* :func:`hf_sparse.sparse_attention` with ``backend="dense"`` (the ``O(T^2)`` oracle built from
  :meth:`Pattern.allowed`) on the full history, for :func:`hf_sparse.decode.attention_with_positions`
  on shuffled, partly empty key slots;
* the patched model's full forward without cache on the final sequence (teacher forcing), for the
  logits of every generated step;
* ``generate(use_cache=False)``: recomputing the whole sequence at every step, for greedy, sampling,
  beam search and chunked prefill;
* the same prompts generated one at a time, for left-padded batches.

Tiny models built from configs, float32, ``backend="reference"``, on the CPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import cache_kwargs, left_padding, tiny, tokens  # noqa: E402
from hf_sparse.patches import SparseCache, SparseWindowLayer, patch_model, unpatch_model  # noqa: E402
from hf_sparse.patches.cache import cache_bytes, generated_cache  # noqa: E402
from hf_sparse.patches.options import options_of  # noqa: E402
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

import hf_sparse.decode as decode_mod  # noqa: E402
from hf_sparse import parse_pattern, sparse_attention  # noqa: E402
from hf_sparse.decode import attention_with_positions  # noqa: E402

W, G = 8, 2
PATTERNS = {
    "window": f"sliding_window:window={W}",
    "longformer": f"longformer:window={W},global_tokens={G}",
    "bigbird": "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1,seed=1",
    "dense": "dense",
}
BOUNDED = {"window": W - 1, "longformer": W - 1 + G}  # live tokens per layer after many steps
NEW = 40  # generated tokens: many more than W + G


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread (see conftest)."""


def generate(model, ids, mask, new: int = NEW, **kwargs):
    kwargs.setdefault("do_sample", False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, 1), generated_cache(out)


def full_forward_logits(model, seq, mask):
    """Teacher forcing: the patched model on the whole final sequence, no cache."""
    full = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        return model(seq, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp_min(0), use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# core: attention_with_positions
def _full_history_case(b=3, hq=4, hkv=2, t=70, d=8, tq=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=dtype)
    mask = left_padding([t, t - 17, 9][:b], t).bool()
    pos = torch.where(mask, mask.long().cumsum(1) - 1, -1)
    return q, k, v, mask, pos, tq


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
def test_attention_with_positions_equals_dense_oracle(name, hkv):
    """Shuffled key slots with empty ones mixed in give the dense oracle's output on the full history."""
    q, k, v, mask, pos, tq = _full_history_case(hkv=hkv)
    b, t, d = k.shape[0], k.shape[2], k.shape[-1]
    layer = 1 if name == "bigbird" else 0
    ref = sparse_attention(q, k, v, PATTERNS[name], key_padding_mask=mask, backend="dense", scale=0.3, softcap=2.0,
                           layer=layer)
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(3))
    junk = torch.randn(b, hkv, 6, d, dtype=k.dtype) * 50  # empty slots hold garbage that must never be seen
    kk = torch.cat([k[:, :, perm], junk], 2)
    vv = torch.cat([v[:, :, perm], junk], 2)
    kpos = torch.cat([pos[:, perm], torch.full((b, 6), -1)], 1)
    out = attention_with_positions(q[:, :, -tq:], kk, vv, PATTERNS[name], q_pos=pos[:, -tq:], k_pos=kpos, scale=0.3,
                                   softcap=2.0, layer=layer)
    torch.testing.assert_close(out, ref[:, :, -tq:], atol=1e-12, rtol=1e-12)


def test_attention_with_positions_chunks_and_gradients(monkeypatch):
    """Many query chunks (a tiny score budget) give the same output and the oracle's gradients."""
    q, k, v, mask, pos, _ = _full_history_case(b=2, t=40)
    spec = PATTERNS["longformer"]
    monkeypatch.setattr(decode_mod, "_SCORE_BUDGET", 4 * 40 * 3)  # 3 query rows per chunk
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention_with_positions(*leaves, spec, q_pos=pos, k_pos=pos)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = sparse_attention(*ref_leaves, spec, key_padding_mask=mask, backend="dense")
    real = mask.view(2, 1, -1, 1)
    torch.testing.assert_close(out * real, ref * real, atol=1e-12, rtol=1e-12)
    w = torch.randn_like(out) * real
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


def test_attention_with_positions_empty_rows_and_bad_inputs():
    q = torch.randn(1, 2, 2, 4)
    k = v = torch.randn(1, 1, 3, 4)
    out = attention_with_positions(q, k, v, "sliding_window:window=2", q_pos=torch.tensor([[-1, 9]]),
                                   k_pos=torch.tensor([[0, 1, -1]]))
    assert torch.equal(out, torch.zeros_like(out))  # padding query; query 9 sees neither 0 nor 1
    with pytest.raises(ValueError, match="k_pos must be"):
        attention_with_positions(q, k, v, "dense", q_pos=torch.tensor([[0, 1]]), k_pos=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="multiple"):
        attention_with_positions(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), "dense",
                                 q_pos=torch.zeros(1, 2, dtype=torch.long), k_pos=torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# the bounded cache layer on its own
class Feeder:
    """Feeds random keys (values: the same) to a cache layer, as the pre-hook and the model do, and
    remembers each row's keys by position (padding tokens have none)."""

    def __init__(self, layer, batch: int = 2, heads: int = 2, dim: int = 4):
        self.layer, self.b, self.h, self.d = layer, batch, heads, dim
        self.keys_by_pos = [[] for _ in range(batch)]

    def __call__(self, n_new: int, mask: torch.Tensor | None) -> torch.Tensor:
        k = torch.randn(self.b, self.h, n_new, self.d)
        self.layer.prepare(mask)
        out_k, _ = self.layer.update(k, k.clone())
        rows_real = torch.ones(self.b, n_new, dtype=torch.bool) if mask is None else mask[:, -n_new:]
        for r in range(self.b):
            self.keys_by_pos[r] += [k[r, :, i] for i in range(n_new) if rows_real[r, i]]
        return out_k

    def stored(self, row: int) -> list[int]:
        """The positions the layer holds for ``row``, after checking that each slot holds its own key."""
        layer = self.layer
        assert int(layer.real_counts[row]) == len(self.keys_by_pos[row])
        for slot, p in enumerate(layer.positions[row].tolist()):
            if p >= 0:
                torch.testing.assert_close(layer.keys[row, :, slot], self.keys_by_pos[row][p])
        return sorted(p for p in layer.positions[row].tolist() if p >= 0)


def test_window_layer_keeps_sinks_and_last_tokens_per_row():
    """Left padding puts each row's sinks at a different slot index; the layer keeps the first G real
    tokens and the last W - 1 of every row, with their own keys, after prefill, decode and a chunk."""
    layer = SparseWindowLayer(window=W, sinks=G)
    feed = Feeder(layer)
    lengths, prompt = [13, 5], 13
    real = left_padding(lengths, prompt).bool()
    out = feed(prompt, real)
    assert out.shape[-2] == prompt  # prefill returns the prompt's keys themselves
    for step in range(30):
        feed(1, None if step % 2 else torch.cat([real, torch.ones(2, step + 1, dtype=torch.bool)], 1))
    total = layer.seen
    feed(5, torch.cat([real, torch.ones(2, total - prompt + 5, dtype=torch.bool)], 1))
    assert layer.keys.shape[-2] <= W + G and layer.live_tokens() <= W - 1 + G
    for r in range(2):
        n = len(feed.keys_by_pos[r])
        assert feed.stored(r) == sorted(set(range(G)) | set(range(n - W + 1, n)))


def test_window_layer_refuses_wrong_masks():
    layer = SparseWindowLayer(window=4)
    layer.update(torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2))
    layer.prepare(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="covering past and new tokens"):
        layer.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    with pytest.raises(ValueError, match="window"):
        SparseWindowLayer(window=0)


def _fed(steps: list[int], keys: torch.Tensor, mask: torch.Tensor, record_after: int | None = None):
    """A window layer fed ``keys [B, H, T, D]`` in updates of ``steps`` tokens (the 2D mask of each forward as
    the pre-hook gives it), recording from the update ``record_after`` on."""
    layer, at = SparseWindowLayer(window=4, sinks=1), 0
    for i, q in enumerate(steps):
        if i == record_after:
            layer.activate_past_recording()
        layer.prepare(mask[:, : at + q])
        layer.update(keys[:, :, at : at + q], -keys[:, :, at : at + q])
        at += q
    return layer


def _held(layer) -> dict:
    """Each row's stored positions with their keys and values."""
    pos = layer.positions
    return {(r, p): (layer.keys[r, :, s], layer.values[r, :, s]) for r in range(pos.shape[0])
            for s, p in enumerate(pos[r].tolist()) if p >= 0}


def _assert_same_layer(got, want) -> None:
    assert got.seen == want.seen and torch.equal(got.real_counts, want.real_counts)
    a, b = _held(got), _held(want)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])


CROP_STEPS = {"decode": [6] + [1] * 9, "chunks": [6, 3, 1, 4, 1]}


@pytest.mark.parametrize("steps", list(CROP_STEPS))
def test_recording_window_layer_crops_exactly(steps):
    """After activate_past_recording (what generate calls before assisted decoding), crop(-n) for every n up
    to the tokens recorded leaves the layer as a layer fed n tokens fewer (left-padded rows, decode steps and
    chunks, the ring of 4 wrapping twice), and the next update agrees too."""
    steps = CROP_STEPS[steps]
    total = sum(steps)
    keys = torch.randn(2, 2, total + 1, 3)
    mask = torch.ones(2, total + 1, dtype=torch.bool)
    mask[1, :2] = False  # row 1: two padding tokens in the prompt
    for n in range(total - steps[0] + 1):
        got = _fed(steps, keys, mask, record_after=1)
        got.crop(-n)
        kept, left = [], total - n
        for q in steps:  # the same updates, cut at total - n tokens
            kept.append(min(q, left))
            left -= kept[-1]
        want = _fed([q for q in kept if q], keys, mask)
        _assert_same_layer(got, want)
        for layer in (got, want):  # the next token sees the same keys
            layer.prepare(mask[:, : total - n + 1])
            layer.update(keys[:, :, total - n : total - n + 1], keys[:, :, :1])
        _assert_same_layer(got, want)


def test_window_layer_crop_without_record_and_its_refusals():
    """Without a record, crop is exact while nothing the rolled-back queries see was overwritten (here: the
    last token, or anything before the ring wrapped) and refuses, unchanged, with the numbers otherwise."""
    keys = torch.randn(1, 1, 10, 2)
    mask = torch.ones(1, 10, dtype=torch.bool)
    for total, n in ((10, 1), (5, 4), (5, 2)):
        got = _fed([1] * total, keys, mask)
        got.crop(-n)
        _assert_same_layer(got, _fed([1] * (total - n), keys, mask))
        got.crop(total - n)  # the positive form (transformers < 5.18): the length to keep
        _assert_same_layer(got, _fed([1] * (total - n), keys, mask))
    layer = _fed([1] * 10, keys, mask)
    assert not layer.is_croppable
    with pytest.raises(ValueError, match=r"roll it back to 8 tokens, but positions 5\.\.5.*activate_past_recording"):
        layer.crop(-2)
    _assert_same_layer(layer, _fed([1] * 10, keys, mask))  # refused before changing anything
    with pytest.raises(ValueError, match="holds only 10 tokens"):
        layer.crop(-11)
    # a padded row: which positions go is read from the next forward's mask
    padded = torch.ones(2, 10, dtype=torch.bool)
    padded[1, :2] = False
    keys = torch.randn(2, 1, 10, 2)
    got, want = _fed([3, 1, 1], keys, padded), _fed([3], keys, padded)
    got.crop(-2)
    for layer in (got, want):
        layer.prepare(padded[:, :4])
        layer.update(keys[:, :, 3:4], -keys[:, :, 3:4])
    _assert_same_layer(got, want)
    with pytest.raises(ValueError, match="were padding"):
        _fed([3] + [1] * 5, keys, padded).crop(-2)


# ---------------------------------------------------------------------------------------------
# generate
GENERATE_CASES = [(m, n) for m in ("llama", "mistral") for n in PATTERNS]


@pytest.mark.parametrize(("model_type", "name"), GENERATE_CASES, ids=[f"{a}-{b}" for a, b in GENERATE_CASES])
def test_generate_equals_recomputation_with_a_bounded_cache(model_type, name):
    """Greedy, left-padded batch, 40 new tokens with W = 8: the tokens equal those of recomputing the
    whole sequence at every step, the logits those of one full forward, and the cache stays bounded.
    The Mistral config has a native window (5) shorter than the pattern's: its own cache would be wrong."""
    extra = {"sliding_window": 5} if model_type == "mistral" else {}
    model = patch_model(tiny(model_type, **extra), PATTERNS[name], backend="reference")
    prompt = 36 if name == "bigbird" else 20
    ids = tokens(2, prompt, seed=5)
    mask = left_padding([prompt, prompt - 7], prompt)
    seq, logits, cache = generate(model, ids, mask)
    seq_full, logits_full, _ = generate(model, ids, mask, use_cache=False)
    assert torch.equal(seq, seq_full)
    torch.testing.assert_close(logits, logits_full, atol=1e-4, rtol=1e-4)
    ref = full_forward_logits(model, seq, mask)[:, prompt - 1 : -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    total = prompt + NEW - 1  # the last token is never fed back
    for i, layer in enumerate(cache.layers):
        # "dense" on Mistral is the model's own window (5): bounded like a sliding window of 5
        policy = options_of(model.config).pattern_for(i).cache_policy()
        if policy is not None:
            sinks, window = policy
            assert isinstance(layer, SparseWindowLayer) and (layer.sinks, layer.window) == policy
            assert layer.get_seq_length() == total
            assert layer.live_tokens() <= window - 1 + sinks and layer.keys.shape[-2] <= window + sinks
        else:
            assert name not in BOUNDED and type(layer) is DynamicLayer and layer.keys.shape[-2] == total


def test_gemma2_softcap_with_a_bounded_cache():
    model = patch_model(tiny("gemma2", sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                             attn_logit_softcapping=1.5, final_logit_softcapping=5.0, query_pre_attn_scalar=12),
                        PATTERNS["longformer"], backend="reference")
    ids = tokens(2, 20, seed=3)
    mask = left_padding([20, 11], 20)
    seq, logits, cache = generate(model, ids, mask, new=24)
    torch.testing.assert_close(logits, full_forward_logits(model, seq, mask)[:, 19:-1], atol=1e-4, rtol=1e-4)
    assert all(isinstance(layer, SparseWindowLayer) for layer in cache.layers)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton on the CPU)")
@pytest.mark.parametrize("name", ["window", "longformer"])
def test_generate_with_the_kernels_equals_the_reference_path(name):
    # backend="triton": prefill on the block-sparse kernels; each decode step writes the bounded cache in
    # one launch (ring_append) and attends on the decode kernel. Same tokens, logits and live-token bound
    # as the PyTorch path, for a left-padded batch (padding rows write nothing)
    pytest.importorskip("triton")
    ids = tokens(2, 20, seed=5)
    mask = left_padding([20, 13], 20)
    runs = {}
    for backend in ("triton", "reference"):
        model = patch_model(tiny("llama"), PATTERNS[name], backend=backend)
        cache = SparseCache(model)
        for layer in cache.layers:
            layer.kernel = backend == "triton"
        runs[backend] = generate(model, ids, mask, new=NEW, **cache_kwargs(cache))
    assert torch.equal(runs["triton"][0], runs["reference"][0])
    torch.testing.assert_close(runs["triton"][1], runs["reference"][1], atol=1e-4, rtol=1e-4)
    for a, b in zip(runs["triton"][2].layers, runs["reference"][2].layers):
        assert a.live_tokens() == b.live_tokens() <= BOUNDED[name]
        assert torch.equal(a.positions, b.positions) and torch.equal(a.real_counts, b.real_counts)
    # chunked prefill over the bounded cache: the chunks run the prefill kernels on the sorted slots
    chunked = {}
    for backend in ("triton", "reference"):
        model = patch_model(tiny("llama"), PATTERNS[name], backend=backend)
        chunked[backend] = generate(model, ids, mask, new=6, prefill_chunk_size=6)
    assert torch.equal(chunked["triton"][0], chunked["reference"][0])
    torch.testing.assert_close(chunked["triton"][1], chunked["reference"][1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton on the CPU)")
def test_one_launch_cache_write_refuses_values_of_another_shape():
    # keys and values of different head dims: the automatic choice writes through PyTorch, a forced
    # one-launch write says why it cannot
    pytest.importorskip("triton")
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    for kernel in (None, True):
        layer = SparseWindowLayer(window=3, sinks=2, kernel=kernel)
        layer.update(k, v)
        if kernel:
            with pytest.raises(NotImplementedError, match=r"kernel=True.*differ in heads or head dim"):
                layer.update(k[:, :, :1], v[:, :, :1])
        else:
            keys, values = layer.update(k[:, :, :1], v[:, :, :1])
            (slot,) = (layer.positions[0] == 5).nonzero()[0].tolist()  # the sixth token's slot
            assert values.shape[-1] == 4 and torch.equal(values[0, :, slot], v[0, :, 0])


@pytest.mark.parametrize("name", ["window", "longformer"])
def test_left_padded_batch_equals_one_by_one(name):
    model = patch_model(tiny("llama"), PATTERNS[name], backend="reference")
    lengths, prompt = [20, 13, 4], 20
    ids = tokens(3, prompt, seed=8)
    mask = left_padding(lengths, prompt)
    seq, logits, _ = generate(model, ids, mask, new=24)
    for row, n in enumerate(lengths):
        alone_seq, alone_logits, _ = generate(model, ids[row : row + 1, prompt - n :], torch.ones(1, n, dtype=torch.long),
                                              new=24)
        assert torch.equal(seq[row, prompt - n :], alone_seq[0])
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["window", "longformer"])
def test_sampling_beams_and_chunked_prefill_equal_recomputation(name, monkeypatch):
    import hf_sparse.patches.attention as attention_mod

    chunk_calls = []
    run_chunk = attention_mod._chunk_over_bounded
    monkeypatch.setattr(attention_mod, "_chunk_over_bounded", lambda *a, **kw: chunk_calls.append(1) or run_chunk(*a, **kw))
    model = patch_model(tiny("mistral", sliding_window=5), PATTERNS[name], backend="reference")
    ids = tokens(2, 30, seed=5)
    mask = left_padding([30, 13], 30)
    results = {}
    for use_cache in (True, False):
        torch.manual_seed(123)
        results[use_cache] = generate(model, ids, mask, new=24, do_sample=True, top_k=0, use_cache=use_cache)
    assert torch.equal(results[True][0], results[False][0])
    beams = generate(model, ids, mask, new=16, num_beams=3)
    beams_full = generate(model, ids, mask, new=16, num_beams=3, use_cache=False)
    assert torch.equal(beams[0], beams_full[0])
    torch.testing.assert_close(beams[1], beams_full[1], atol=1e-4, rtol=1e-4)
    assert isinstance(beams[2].layers[0], SparseWindowLayer)
    chunked = generate(model, ids, mask, new=16, prefill_chunk_size=7)  # prompt in chunks over a non-empty cache
    plain = generate(model, ids, mask, new=16, use_cache=False)
    assert torch.equal(chunked[0], plain[0])
    torch.testing.assert_close(chunked[1], plain[1], atol=1e-4, rtol=1e-4)
    # the chunks after the first ran on sparse_attention over the slots sorted by position (prefill kernels)
    assert len(chunk_calls) >= 4 * len(chunked[2].layers)


def test_explicit_sparse_cache_and_manual_decode_loop():
    """SparseCache(model) passed by the user: generate uses it as is; a hand-written loop of prefill, a
    chunk of several tokens and single-token steps equals one full forward."""
    model = patch_model(tiny("mistral", sliding_window=5), PATTERNS["longformer"], backend="reference")
    ids = tokens(2, 20, seed=5)
    mask = left_padding([20, 13], 20)
    cache = SparseCache(model)
    assert all(isinstance(layer, SparseWindowLayer) for layer in cache.layers)
    seq, logits, returned = generate(model, ids, mask, **cache_kwargs(cache))
    assert returned is cache and cache.layers[1].live_tokens() <= W - 1 + G
    torch.testing.assert_close(logits, generate(model, ids, mask)[1], atol=1e-5, rtol=1e-5)

    full_ids = tokens(2, 45, seed=6)
    full_mask = left_padding([45, 30], 45)
    ref = full_forward_logits(model, full_ids, full_mask)
    cache = SparseCache(model)
    pieces = [(0, 20), (20, 27), *[(i, i + 1) for i in range(27, 45)]]
    with torch.no_grad():
        for a, b in pieces:
            m = full_mask[:, :b]
            out = model(full_ids[:, a:b], attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0)[:, a:b],
                        use_cache=True, **cache_kwargs(cache))
            real = full_mask[:, a:b].bool()
            torch.testing.assert_close(out.logits[real], ref[:, a:b][real], atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 45 and cache_bytes(cache) > 0


def test_user_dynamic_cache_keeps_full_history_and_unpatch_removes_everything():
    model = patch_model(tiny("llama"), PATTERNS["window"], backend="reference")
    ids = tokens(1, 20)
    mask = torch.ones_like(ids)
    cache = transformers.DynamicCache()
    _, logits, returned = generate(model, ids, mask, new=12, **cache_kwargs(cache))
    assert type(returned.layers[0]) is DynamicLayer and returned.layers[0].keys.shape[-2] == 31
    torch.testing.assert_close(logits, generate(model, ids, mask, new=12)[1], atol=1e-5, rtol=1e-5)

    unpatch_model(model)
    assert "_prepare_cache_for_generation" not in model.__dict__
    attn = model.model.layers[0].self_attn
    assert not attn._forward_pre_hooks and not hasattr(attn, "_hf_sparse_window_layer")
    _, _, cache = generate(model, ids, mask, new=4)
    assert type(cache.layers[0]) is DynamicLayer
    with pytest.raises(ValueError, match="patched"):
        SparseCache(model)


def test_cache_of_another_pattern_is_refused():
    """A SparseCache made for a window of 8, reused after patching with a window of 12: it dropped keys."""
    model = patch_model(tiny("llama"), PATTERNS["window"], backend="reference")
    ids = tokens(1, 20)
    cache = SparseCache(model)
    seq = generate(model, ids, torch.ones_like(ids), new=3, **cache_kwargs(cache))[0]
    patch_model(model, "sliding_window:window=12", backend="reference")
    with pytest.raises(RuntimeError, match="another pattern"):
        generate(model, seq, torch.ones_like(seq), new=3, **cache_kwargs(cache))


def test_layers_subset_keeps_native_cache_layers():
    """Mistral (native window 5) with only layer 1 patched: layer 0 keeps HF's sliding layer."""
    model = patch_model(tiny("mistral", sliding_window=5), PATTERNS["longformer"], layers=[1], backend="reference")
    ids = tokens(2, 20, seed=7)
    mask = left_padding([20, 14], 20)
    seq, logits, cache = generate(model, ids, mask)
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and isinstance(cache.layers[1], SparseWindowLayer)
    seq_full, logits_full, _ = generate(model, ids, mask, use_cache=False)
    assert torch.equal(seq, seq_full)
    torch.testing.assert_close(logits, logits_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["window", "longformer"])
def test_assisted_decoding_equals_greedy(name):
    """Assisted greedy decoding gives greedy decoding's tokens (HF's guarantee) on a model whose bounded
    cache wraps its ring several times: each rejected draft is rolled back by crop. With an explicit
    recording SparseCache on every release; with generate's own caches (which it makes record, in the model
    and in a patched assistant) from transformers 5.15 on."""
    model = patch_model(tiny("llama"), PATTERNS[name], backend="reference")
    ids, mask = tokens(1, 12), torch.ones(1, 12, dtype=torch.long)
    seq, _, _ = generate(model, ids, mask, new=30)
    cache = SparseCache(model)
    cache.activate_past_recording()
    assisted, _, cache = generate(model, ids, mask, new=30, assistant_model=tiny("llama", seed=1), **cache_kwargs(cache))
    assert isinstance(cache.layers[0], SparseWindowLayer) and cache.layers[0].seen > W + G
    assert torch.equal(assisted, seq)
    if hasattr(transformers.cache_utils.Cache, "activate_past_recording"):
        assistant = patch_model(tiny("llama", seed=1), PATTERNS["window"], backend="reference")
        assert torch.equal(generate(model, ids, mask, new=30, assistant_model=assistant)[0], seq)


# ---------------------------------------------------------------------------------------------
# benchmark script
def test_bench_generate_smoke(tmp_path, capsys):
    from hf_sparse.eval import bench_generate

    out = tmp_path / "generate.jsonl"
    rc = bench_generate.main(["--device", "cpu", "--config", "tiny", "--prompt-lens", "96", "--new-tokens", "6",
                              "--patterns", f"{PATTERNS['window']};{PATTERNS['longformer']};dense",
                              "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["impl"], r["cache"]) for r in rows[:4]] == [("sdpa", "dynamic"), ("sdpa_static", "static"),
                                                           ("hf_sparse", "dynamic"), ("hf_sparse_static", "static")]
    assert {r["pattern"] for r in rows} == {"none", parse_pattern(PATTERNS["window"]).spec(),
                                            parse_pattern(PATTERNS["longformer"]).spec(), "dense:causal=true"}
    for r in rows:
        assert r["error"] is None, r
        assert r["prompt_len"] == 96 and r["new_tokens"] == 6 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0
        assert r["step_ms_median"] > 0 and r["roof_tok_s"] > 0 and r["sdpa_backends"] == "flash,efficient,math"
        # the static cache gives the eager path's greedy tokens (float32 on the CPU, where nothing compiles)
        assert r["impl"] not in ("sdpa_static", "hf_sparse_static") or r["same_prefix_eager"] == 6, r
    sparse = [r for r in rows if r["impl"].startswith("hf_sparse") and not r["pattern"].startswith("dense")]
    dense = [r for r in rows if r["impl"] == "sdpa"][0]
    assert all(r["cache_peak_gb"] < dense["cache_peak_gb"] for r in sparse)
    # the dense pattern is the unpatched attention: the same greedy tokens (float32), the same full cache
    ours_dense = [r for r in rows if r["pattern"] == "dense:causal=true" and r["impl"] == "hf_sparse"][0]
    assert ours_dense["same_prefix_sdpa"] == 6 and ours_dense["tokens_equal_sdpa"] == 1.0
    assert ours_dense["cache_peak_gb"] == dense["cache_peak_gb"]
    assert "decode tok/s" in capsys.readouterr().out
    # a deadline already passed: every row is recorded as skipped
    rc = bench_generate.main(["--device", "cpu", "--config", "tiny", "--prompt-lens", "96", "--new-tokens", "3",
                              "--patterns", "dense", "--impls", "sdpa,hf_sparse", "--deadline-s", "1e-9",
                              "--out", str(out)])
    skipped = [json.loads(line) for line in out.read_text().splitlines()][len(rows):]
    assert rc == 0 and len(skipped) == 2 and all(r["error"].startswith("skipped") for r in skipped)


def test_generate_example_runs_and_bounds_the_cache(capsys):
    # examples/generate.py on its tiny model: same greedy tokens as the unpatched model while the prompt is
    # shorter than the window, and a smaller cache than the unpatched one once it is longer
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("hf_sparse_generate_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--model", "tiny", "--pattern", "longformer:window=64,global_tokens=4", "--prompt-tokens", "40",
                  "--new-tokens", "6", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split("s, ")[-1] == lines[2].split("s, ")[-1]  # the window covers everything: same tokens
    example.main(["--model", "tiny", "--pattern", "sliding_window:window=16", "--prompt-tokens", "200",
                  "--new-tokens", "4", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    mib = [float(line.split("KV cache")[1].split("MiB")[0]) for line in lines[1:3]]
    assert mib[1] < mib[0] / 5
