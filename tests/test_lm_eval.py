"""The ``hf-sparse`` model type for lm-evaluation-harness (hf_sparse.eval.lm_eval), offline on a tiny random Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from helpers import save_tiny_llama, sentences  # noqa: E402
from hf_sparse.eval.lm_eval import HFSparseLM, pattern_from_model_args  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_sparse import patch_model  # noqa: E402

# most are long enough that a window of 4 drops keys
REQUESTS = [
    ("The river ran past old stone walls while merchants argued", " about prices and weather"),
    ("Every street had a name and every name had a story", " that children learned before they could read"),
    (sentences(5, 2), " the town"),
    ("A", " river ran past old stone walls"),
]
PATTERN = "longformer:window=4,global_tokens=1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder, [sentences(i, 40) for i in range(8)], vocab_size=300, max_positions=256)
    return str(folder)


def _instances():
    return [Instance(request_type="loglikelihood", doc={}, arguments=req, idx=i) for i, req in enumerate(REQUESTS)]


def _lm(cls, model_dir, **kw):
    return cls(pretrained=model_dir, device="cpu", dtype="float32", batch_size=2, **kw)


def _direct(model, tokenizer, context, continuation):
    """Sum of the continuation's log-probabilities, from the model's logits (lm-eval's BOS + tokenization)."""
    whole = tokenizer(context + continuation).input_ids
    n_ctx = len(tokenizer(context).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    return sum(logp[p - 1, whole[p]].item() for p in range(n_ctx, len(whole)))


def test_pattern_separator():
    assert pattern_from_model_args("longformer:window=1024;global_tokens=4") == "longformer:window=1024,global_tokens=4"
    assert pattern_from_model_args("per_head[sliding_window:window=1024;0=dense]") == (
        "per_head[sliding_window:window=1024;0=dense]")
    assert pattern_from_model_args("per_head[longformer:window=8;global_tokens=2;1=dense]") == (
        "per_head[longformer:window=8,global_tokens=2;1=dense]")
    assert pattern_from_model_args(PATTERN) == PATTERN  # commas that arrive whole stay
    assert pattern_from_model_args(None) is None


def test_loglikelihood_matches_patched_model(model_dir):
    lm = _lm(HFSparseLM, model_dir, pattern="longformer:window=4;global_tokens=1", sparse_backend="reference")
    got = [ll for ll, _ in lm.loglikelihood(_instances())]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dense = [_direct(model, tokenizer, c, x) for c, x in REQUESTS]
    patch_model(model, PATTERN, backend="reference")
    want = [_direct(model, tokenizer, c, x) for c, x in REQUESTS]

    assert got == pytest.approx(want, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(want, dense)) > 1e-3  # the window really drops keys here


def test_dense_pattern_equals_plain_hf(model_dir):
    sparse = [ll for ll, _ in _lm(HFSparseLM, model_dir, pattern="dense").loglikelihood(_instances())]
    plain = [ll for ll, _ in _lm(HFLM, model_dir).loglikelihood(_instances())]
    assert sparse == pytest.approx(plain, abs=1e-4)


def test_per_head_plan_and_split_options(model_dir):
    lm = HFSparseLM.create_from_arg_string(
        f"pretrained={model_dir},pattern=per_head[sliding_window:window=4;0=dense],sparse_backend=reference,"
        "device=cpu,dtype=float32")
    assert lm.model.config.hf_sparse["pattern"]["type"] == "per_head"
    with pytest.raises(ValueError, match="';' inside the pattern"):
        HFSparseLM.create_from_arg_string(f"pretrained={model_dir},pattern=longformer:window=4,global_tokens=1")


def _task(root):
    data = root / "tiny_mc.jsonl"
    rows = [
        {"question": "The river ran past old stone", "choices": ["walls", "prices", "weather"], "answer": 0},
        {"question": "Merchants argued about", "choices": ["read", "prices", "a"], "answer": 1},
        {"question": "Every street had a", "choices": ["story", "town", "name"], "answer": 2},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_mc.yaml").write_text(
        "task: hf_sparse_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n")


@pytest.fixture
def offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


@pytest.mark.slow
def test_simple_evaluate_local_task(model_dir, tmp_path, offline):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _task(tmp_path)
    out = simple_evaluate(
        model="hf-sparse",
        model_args=f"pretrained={model_dir},pattern=longformer:window=4;global_tokens=1,sparse_backend=reference,"
                   "device=cpu,dtype=float32",
        tasks=["hf_sparse_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), batch_size=2)
    res = out["results"]["hf_sparse_tiny_mc"]
    assert 0.0 <= res["acc,none"] <= 1.0
    assert len(out["samples"]["hf_sparse_tiny_mc"]) == 3


@pytest.mark.slow
def test_command_line(model_dir, tmp_path):
    _task(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "hf_sparse.eval.lm_eval", "--model", "hf-sparse", "--model_args",
         f"pretrained={model_dir},pattern=longformer:window=4;global_tokens=1,sparse_backend=reference,dtype=float32",
         "--tasks", "hf_sparse_tiny_mc", "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "hf_sparse_tiny_mc" in run.stdout
