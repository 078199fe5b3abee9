"""The pattern travels with a saved model: reload with ``attn_implementation="hf_sparse"``, and plain loads.

* ``from_pretrained(path, attn_implementation="hf_sparse")`` after ``import hf_sparse`` (nothing else)
  restores the pattern or per-head plan: logits equal the patched model's before saving, ``generate``
  gets the bounded cache and the same tokens, ``print(model)`` shows the pattern.
* a plain ``from_pretrained(path)`` of a causal sliding window on every layer of Mistral, Qwen 2 or
  Qwen 3 runs the same attention in transformers alone (``save_pretrained`` wrote the native fields);
  any other pattern loads dense and warns once.

CPU, float32, ``backend="reference"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import left_padding, tiny, tokens  # noqa: E402
from hf_sparse.patches import ATTN_NAME, StoredPatternWarning, native_fields, patch_model, unpatch_model  # noqa: E402
from hf_sparse.patches.cache import HeadGroupsLayer, SparseWindowLayer, generated_cache  # noqa: E402
from test_patches import assert_real_close, run  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

T = 40

CASES = {
    # model_type, config overrides, pattern, head_patterns
    "llama-longformer": ("llama", {}, "longformer:window=6,global_tokens=3", None),
    "mistral-plan": ("mistral", {"sliding_window": 5}, "sliding_window:window=6",
                     {(0, 0): "dense", (1, 1): "longformer:window=4,global_tokens=2"}),
    "qwen2-bigbird": ("qwen2", {}, "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1,seed=2", None),
}


def _generate(model, ids, mask, new: int = 8):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    return out.sequences, torch.stack(out.scores, 1), generated_cache(out)


def _quiet_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reload with our backend warns about nothing
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_reload_with_hf_sparse_equals_the_patched_model(case, tmp_path):
    model_type, extra, pattern, heads = CASES[case]
    model = patch_model(tiny(model_type, **extra), pattern, head_patterns=heads, backend="reference")
    ids = tokens(2, T, seed=4)
    mask = left_padding([T, T - 9], T)
    want = run(model, ids, mask)
    want_seq, want_scores, _ = _generate(model, ids, mask)
    model.save_pretrained(tmp_path)

    loaded = _quiet_load(tmp_path, attn_implementation=ATTN_NAME)
    assert loaded.config._attn_implementation == ATTN_NAME
    assert loaded.config.hf_sparse == model.config.hf_sparse
    assert repr(loaded) == repr(model)  # every patched attention module shows its pattern (or plan)
    assert_real_close(run(loaded, ids, mask), want, mask)
    seq, scores, cache = _generate(loaded, ids, mask)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=1e-4)
    # the bounded cache of generate, as after patch_model: window and Longformer layers keep G + W slots; the
    # KV heads of a plan each keep what their own pattern does (a group per policy)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicLayer if "bigbird" in pattern else HeadGroupsLayer if heads else SparseWindowLayer] * 2

    unpatch_model(loaded)  # back to the implementation the model had before it was patched
    assert loaded.config._attn_implementation == "eager" and not hasattr(loaded.config, "hf_sparse")


def test_reload_keeps_layers_and_native_attention_of_the_others(tmp_path):
    model = patch_model(tiny("mistral", sliding_window=5), "longformer:window=6,global_tokens=2", layers=[1],
                        backend="reference")
    ids = tokens(2, T, seed=8)
    mask = left_padding([T, T - 5], T)
    want = run(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] == 5  # not a native pattern
    loaded = _quiet_load(tmp_path, attn_implementation=ATTN_NAME)
    assert loaded.config.hf_sparse["layers"] == [1]
    assert "hf_sparse=" not in repr(loaded.model.layers[0]) and "hf_sparse=" in repr(loaded.model.layers[1])
    assert_real_close(run(loaded, ids, mask), want, mask)


def test_import_hf_sparse_alone_registers_the_backend(tmp_path):
    """In a fresh process: ``import hf_sparse`` does not import transformers, yet a later
    ``from_pretrained(..., attn_implementation="hf_sparse")`` finds the backend and the pattern."""
    model = patch_model(tiny("llama"), "sliding_window:window=6", backend="reference")
    ids = tokens(1, 20, seed=2)
    torch.save(run(model, ids), tmp_path / "want.pt")
    model.save_pretrained(tmp_path / "model")
    code = textwrap.dedent(f"""
        import sys, torch
        import hf_sparse
        assert "transformers" not in sys.modules, "import hf_sparse imported transformers"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, attn_implementation="hf_sparse")
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            got = model.eval()(ids, use_cache=False).logits
        torch.testing.assert_close(got, torch.load({str(tmp_path / "want.pt")!r}))
        print("ok", model.config.hf_sparse["pattern"]["type"])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok sliding_window")


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {"sliding_window": None}),  # Mistral v0.2+: no native window
    ("mistral", {"sliding_window": 3}),  # a native window shorter than the pattern's
    ("qwen2", {}),
    ("qwen3", {}),
], ids=["mistral-none", "mistral-3", "qwen2", "qwen3"])
def test_plain_load_of_a_sliding_window_runs_the_same_attention(model_type, extra, tmp_path):
    model = patch_model(tiny(model_type, **extra), "sliding_window:window=6", backend="reference")
    live = {k: getattr(model.config, k, None) for k in ("sliding_window", "use_sliding_window", "layer_types")}
    ids = tokens(2, T, seed=5)
    mask = left_padding([T, T - 11], T)
    want = run(model, ids, mask)
    want_seq, _, _ = _generate(model, ids, mask)
    model.save_pretrained(tmp_path)
    # the live config keeps its own fields; only the saved file states the window natively
    assert {k: getattr(model.config, k, None) for k in live} == live
    assert "native_fields" not in model.config.hf_sparse
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sliding_window"] == 6 and saved["hf_sparse"]["native_fields"]["sliding_window"] == 6

    plain = _quiet_load(tmp_path)  # no warning: transformers alone runs the pattern
    assert plain.config._attn_implementation == "sdpa"
    assert_real_close(run(plain, ids, mask), want, mask)
    seq, _, _ = _generate(plain, ids, mask)
    assert torch.equal(seq, want_seq)
    # and with our backend it is the patched model again (the native fields are then ignored)
    again = _quiet_load(tmp_path, attn_implementation=ATTN_NAME)
    assert_real_close(run(again, ids, mask), want, mask)


def test_native_fields_only_for_exact_patterns():
    cases = [
        ("mistral", "sliding_window:window=6", {}, {"sliding_window": 6}),
        ("mistral", "longformer:window=6,global_tokens=2", {}, {}),
        ("mistral", "sliding_window:window=6", {"layers": [0]}, {}),  # the other layer keeps its own window
        ("mistral", "sliding_window:window=6", {"head_patterns": {(0, 0): "dense"}}, {}),
        ("llama", "sliding_window:window=6", {}, {}),  # Llama has no window field
        ("gemma2", "sliding_window:window=6", {}, {}),
    ]
    for model_type, pattern, kwargs, want in cases:
        model = patch_model(tiny(model_type), pattern, backend="reference", **kwargs)
        assert native_fields(model.config) == want, (model_type, pattern, kwargs)


def test_plain_load_of_another_pattern_warns_once_and_is_dense(tmp_path):
    base = tiny("llama", attn="sdpa")
    ids = tokens(1, T, seed=3)
    dense = run(base, ids)
    model = patch_model(base, "longformer:window=6,global_tokens=2", backend="reference")
    assert (run(model, ids) - dense).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    with pytest.warns(StoredPatternWarning, match=r"longformer:window=6,global_tokens=2.*runs full attention") as record:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len([w for w in record if "hf_sparse pattern" in str(w.message)]) == 1
    torch.testing.assert_close(run(plain, ids), dense)
    assert plain.config.hf_sparse["pattern"]["type"] == "longformer"  # ...while the config names the pattern
    patch_model(plain)  # the other supported way: re-apply the stored pattern
    torch.testing.assert_close(run(plain, ids), run(model, ids))


def test_hf_sparse_implementation_needs_a_saved_pattern(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"holds no pattern.*patch_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_NAME)
