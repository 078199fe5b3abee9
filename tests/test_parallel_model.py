"""A patched tiny Llama with its sequence sharded over 2 gloo processes (``hf_sparse.patches.parallel``)
gives the logits, the loss and every parameter's gradient of the unsharded model: RoPE at the shard's
absolute positions, the loss over the next token across shard edges, remote keys' gradients sent back."""

from __future__ import annotations

import pytest
from parallel_workers import MODEL_CASES, spawn

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(2, "model_case", [f"{c}@2" for c in MODEL_CASES], tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_sharded_model_equals_whole(results, case):
    res = results[f"{case}@2"]
    assert "error" not in res, res.get("error")
    assert res["restored"] == 0.0, "context_parallel did not switch the model back to hf_sparse"
    tol = {"logits": 1e-9, "grads": 1e-9, "loss": 1e-5}  # transformers' loss runs in float32 (logits.float())
    bad = {k: v for k, v in res.items() if k in tol and v > tol[k]}
    assert set(tol) <= set(res)
    assert not bad, f"{case}: max abs errors {res}"


def test_context_parallel_needs_a_patched_model():
    from hf_sparse.patches.parallel import context_parallel
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="patch_model"):
        context_parallel(model)
