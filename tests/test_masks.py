"""Patched layers under masks with holes, custom 4D masks, ``output_attentions`` and native sliding windows.

References: HF's own eager attention (unpatched, or given an explicit 4D mask built from
:meth:`Pattern.allowed` with positions counting real tokens, ``test_patches.explicit_mask_forward``), and the
patched model run without cache. Tiny random models, float32, CPU, ``backend="reference"`` (one case on the
Triton kernels under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import needs_interpreter  # noqa: E402
from hf_models import tiny, tokens  # noqa: E402
from hf_sparse.patches import patch_model, unpatch_model  # noqa: E402
from hf_sparse.patches.options import native_windows, options_of  # noqa: E402
from test_patches import PATTERNS, all_layers, explicit_mask_forward  # noqa: E402

import hf_sparse.ops  # noqa: E402

T = 40


def holes_mask(batch: int = 3, length: int = T) -> torch.Tensor:
    """Row 0 full, row 1 with holes inside, row 2 right-padded and then extended (a prompt that generate grew)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, [3, 4, length // 2, length - 10]] = 0
    if batch > 2:
        mask[2, length // 2 + 2 : length - 9] = 0
    return mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        pos = None if mask is None else positions(mask)
        return model(ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)


def real(x, mask):
    return x[mask.bool()]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    hf_sparse.ops._warned.clear()  # one-time warnings, asserted per test


# ---------------------------------------------------------------------------------------------
# masks with holes
@pytest.mark.parametrize("name", list(PATTERNS))
def test_holes_equal_explicit_mask(name):
    """Masked keys are not attended, positions count real tokens: HF eager with that explicit mask."""
    model = tiny("llama")
    ids, mask = tokens(3, T), holes_mask()
    ref = explicit_mask_forward(model, all_layers(model, PATTERNS[name]), ids, mask).logits
    patch_model(model, PATTERNS[name], backend="reference")
    torch.testing.assert_close(real(logits(model, ids, mask).logits, mask), real(ref, mask), atol=2e-5, rtol=2e-5)


def test_holes_dense_equals_unpatched_and_gradients():
    model = tiny("llama")
    ids, mask = tokens(3, T), holes_mask()
    ref = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    (real(ref, mask) ** 2).mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    patch_model(model, "dense", backend="reference")
    out = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    torch.testing.assert_close(real(out, mask), real(ref, mask), atol=2e-5, rtol=2e-5)
    (real(out, mask) ** 2).mean().backward()
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-3)


@needs_interpreter
def test_holes_on_the_triton_kernels():
    model = tiny("llama", head_dim=16, hidden_size=64, num_hidden_layers=1)
    ids, mask = tokens(2, 24), holes_mask(2, 24)
    patch_model(model, PATTERNS["longformer"], backend="reference")
    ref = logits(model, ids, mask).logits
    patch_model(model, PATTERNS["longformer"], backend="triton")
    torch.testing.assert_close(real(logits(model, ids, mask).logits, mask), real(ref, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["dense", "window", "bigbird"])
def test_generate_from_right_padded_prompts(name):
    """Right-padded prompts that generate extends (its mask gets holes): cached generation equals the
    recomputation without cache. (Not compared with HF: the next token of a right-padded row is read at a
    padding slot, whose row is zero here, see hf_sparse.patches.masks.)"""
    model = tiny("llama")
    ids = tokens(2, 16, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding: the generated tokens follow the pad slots

    def generate(m, use_cache):
        out = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.scores, 1)

    patch_model(model, PATTERNS[name], backend="reference")
    seq_cached, scores_cached = generate(model, True)
    seq_full, scores_full = generate(model, False)
    torch.testing.assert_close(scores_cached, scores_full, atol=2e-5, rtol=2e-5)
    assert torch.equal(seq_cached, seq_full)


def test_sequence_classification_with_pad_ids_inside_rows():
    """HF's own classification test masks every pad id (id 1 here), wherever it stands."""
    ref = transformers.LlamaForSequenceClassification(tiny("llama").config).eval()
    ids = tokens(4, 12)
    ids[1, 3] = ids[2, 7] = ids[3, 0] = 1
    mask = ids.ne(1).long()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        patch_model(ref, "dense", backend="reference")
        torch.testing.assert_close(ref(ids, attention_mask=mask).logits, expected, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# output_attentions and custom 4D masks
def test_output_attentions_dense_equals_eager():
    model = tiny("llama")
    ids, mask = tokens(3, 20), holes_mask(3, 20)
    ref = logits(model, ids, mask, output_attentions=True)
    patch_model(model, "dense", backend="reference")
    with pytest.warns(UserWarning, match=r"output_attentions=True.*O\(batch \* heads \* queries \* keys\)"):
        out = logits(model, ids, mask, output_attentions=True)
    torch.testing.assert_close(real(out.logits, mask), real(ref.logits, mask), atol=2e-5, rtol=2e-5)
    assert len(out.attentions) == len(ref.attentions) == 2
    keep = mask.bool()
    for a, r in zip(out.attentions, ref.attentions):  # [B, H, T, T]; rows of real queries over every key
        assert a.shape == r.shape
        torch.testing.assert_close(a.transpose(1, 2)[keep], r.transpose(1, 2)[keep], atol=2e-5, rtol=2e-5)
    assert logits(model, ids, mask).attentions is None  # not asked: the sparse path, no weights


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_output_attentions_follow_the_pattern(name):
    model = tiny("llama")
    ids = tokens(2, T)
    layer_patterns = all_layers(model, PATTERNS[name])
    with torch.no_grad():
        ref = explicit_mask_forward(model, layer_patterns, ids, output_attentions=True)
    patch_model(model, PATTERNS[name], backend="reference")
    with pytest.warns(UserWarning, match="output_attentions"):
        out = logits(model, ids, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=2e-5)
    for a, r in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


def packed_4d_mask(lengths, dtype):
    """One row holding documents of ``lengths``: causal inside each, nothing across (HF's custom 4D form)."""
    t = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    if dtype == torch.bool:
        return allowed[None, None]
    return torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
def test_custom_4d_mask_dense_equals_hf(dtype):
    model = tiny("llama", attn="sdpa")  # HF's eager adds a boolean mask instead of applying it; SDPA applies it
    lengths = [9, 14, 5]
    ids = tokens(1, sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    mask4 = packed_4d_mask(lengths, dtype)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask4, position_ids=pos, use_cache=False).logits
        patch_model(model, "dense", backend="reference")
        with pytest.warns(UserWarning, match="custom 4D attention mask"):
            out = model(ids, attention_mask=mask4, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_custom_4d_mask_and_a_pattern_equal_documents_alone():
    """Packed documents under a 4D mask: each runs the pattern from its own first token (its own globals)."""
    model = patch_model(tiny("llama"), PATTERNS["longformer"], backend="reference")
    lengths = [12, 20]
    ids = tokens(1, sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, attention_mask=packed_4d_mask(lengths, torch.bool), position_ids=pos, use_cache=False).logits
        alone = [model(part, use_cache=False).logits for part in ids.split(lengths, dim=1)]
    torch.testing.assert_close(out, torch.cat(alone, 1), atol=2e-5, rtol=2e-5)


def test_additive_bias_masks_are_refused():
    model = patch_model(tiny("llama"), "dense", backend="reference")
    bias = torch.zeros(1, 1, 8, 8).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    bias[..., 0] = -0.5
    with pytest.raises(NotImplementedError, match="additive biases"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(tokens(1, 8), attention_mask=bias, use_cache=False)


# ---------------------------------------------------------------------------------------------
# native sliding windows
@pytest.mark.parametrize(
    ("model_type", "fields"),
    [("mistral", {"sliding_window": 6}),
     ("qwen2", {"sliding_window": 6, "use_sliding_window": True, "max_window_layers": 1,
                "layer_types": ["full_attention", "sliding_attention"]})],
    ids=["mistral", "qwen2-mixed"],
)
def test_dense_keeps_the_native_window(model_type, fields):
    model = tiny(model_type, **fields)
    ids, mask = tokens(2, 30), holes_mask(2, 30)
    mask[1] = torch.arange(30) >= 7  # left padding
    ref = logits(model, ids, mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "dense" replaces nothing: no warning
        patch_model(model, "dense", backend="reference")
    assert options_of(model.config).pattern_for(1).spec() == "sliding_window:window=6,causal=true"
    torch.testing.assert_close(real(logits(model, ids, mask).logits, mask), real(ref, mask), atol=2e-5, rtol=2e-5)
    unpatch_model(model)
    assert native_windows(model.config)  # the config itself is untouched


def test_dense_generate_keeps_the_native_window():
    model = tiny("mistral", sliding_window=5)
    ids = tokens(2, 12, seed=3)
    mask = torch.stack([torch.ones(12), torch.arange(12) >= 4]).long()

    def generate():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.scores, 1)

    ref = generate()
    patch_model(model, "dense", backend="reference")
    torch.testing.assert_close(generate(), ref, atol=2e-5, rtol=2e-5)


def test_a_pattern_replacing_a_native_window_says_so():
    model = tiny("mistral", sliding_window=6)
    with pytest.warns(UserWarning, match=r"sliding window of 6 tokens.*longformer.*replaces it.*'dense'"):
        patch_model(model, PATTERNS["longformer"], backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(model, "sliding_window:window=6", backend="reference")  # the same window: nothing replaced
        patch_model(tiny("llama"), PATTERNS["longformer"], backend="reference")  # no native window at all
