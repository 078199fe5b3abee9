"""Head plans and ``hf-sparse-calibrate`` on tiny random models (CPU, float32, reference backend).

* the plan file: round trip, and every kind of bad plan refused with a message naming the value;
* ``patch_model(model, "plan.json")`` equals HF's eager attention under the plan's explicit per-head masks,
  survives ``save_pretrained`` / ``from_pretrained(attn_implementation="hf_sparse")``, and runs in
  ``hf-sparse-eval`` (perplexity against a plain forward of the reloaded model, cache bytes against the
  size of a full cache);
* calibration: the mass score against brute force from HF's eager attention weights, the gated attention
  against the patched models it interpolates, the budget kept exactly by both methods, the model put back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import needs_interpreter, save_tiny_llama, sentences  # noqa: E402
from hf_models import tiny, tokens  # noqa: E402
from hf_sparse.eval import passkey as pk  # noqa: E402
from hf_sparse.eval.calibrate import (  # noqa: E402
    Sample,
    _calibrating,
    _hidden,
    calibrate,
    compare_plans,
    mass_scores,
    select_dense,
)
from hf_sparse.eval.calibrate import main as calibrate_main  # noqa: E402
from hf_sparse.eval.cli import build_parser, options_from_args  # noqa: E402
from hf_sparse.eval.cli import main as eval_main  # noqa: E402
from hf_sparse.eval.errors import EvalError  # noqa: E402
from hf_sparse.eval.options import parse_patterns  # noqa: E402
from hf_sparse.eval.results import read_results  # noqa: E402
from hf_sparse.eval.runner import run_eval  # noqa: E402
from hf_sparse.patches import ATTN_NAME, patch_model  # noqa: E402
from test_patches import assert_real_close, explicit_mask_logits, run  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_sparse import Dense, PerHead, parse_pattern  # noqa: E402
from hf_sparse.head_plan import HeadPlan, budget_heads, load_plan, model_identity  # noqa: E402

STREAM = "longformer:window=8,global_tokens=2"
TEXTS = [sentences(1, 80), sentences(2, 80)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, 4 query / 2 KV heads) and its byte-level BPE tokenizer, saved together."""
    path = tmp_path_factory.mktemp("tiny-llama")
    corpus = TEXTS + [pk.TASK, pk.FILLER * 4, pk.KEY_LINE.format(key="12345"), pk.QUESTION] * 20
    save_tiny_llama(path, corpus, vocab_size=600, max_positions=256)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def a_plan(model, heads=((0, 1), (1, 0)), budget=0.5, **kwargs) -> HeadPlan:
    return HeadPlan(STREAM, heads, model_identity(model.config, "tiny"), budget, **kwargs)


# -- the file -----------------------------------------------------------------------------------------
def test_plan_file_round_trip(tmp_path):
    model = tiny("llama")
    plan = a_plan(model, method="mass", scores=[[0.1, 0.9], [0.8, 0.2]], details={"note": "x"})
    path = plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert again == plan and again.details == {"note": "x"} and again.source == str(path)
    data = json.loads(path.read_text())
    assert data["format"] == "hf_sparse.head_plan" and data["dense_heads"] == [[0, 1], [1, 0]]
    assert data["streaming"] == parse_pattern(STREAM).spec() and data["model"]["num_kv_heads"] == 2
    assert plan.dense_share == 0.5 and plan.head_patterns() == {(0, 1): Dense(), (1, 0): Dense()}
    # the spec changes with the heads (eval results of two plans never share a key)
    assert a_plan(model, heads=((0, 0), (1, 0))).spec() != plan.spec()


@pytest.mark.parametrize("budget,total,n", [(0.25, 90, 22), (0.29, 100, 29), (0.5, 6, 3), (0.0, 6, 0), (1.0, 6, 6),
                                            (0.3, 4, 1)])
def test_budget_heads_is_the_floor(budget, total, n):
    assert budget_heads(budget, total) == n


def _bad(change: dict) -> dict:
    data = a_plan(tiny("llama")).to_dict()
    data.update(change)
    return data


@pytest.mark.parametrize("change,match", [
    ({"dense_heads": [[2, 0]]}, r"names layer 2, but the plan's model has 2 layers"),
    ({"dense_heads": [[0, 2]]}, r"names KV head 2, but the plan's model has 2 KV heads"),
    ({"dense_heads": [[0, 1], [0, 1]]}, r"lists \[\[0, 1\]\] more than once"),
    ({"dense_heads": [[0, "1"]]}, r"each entry is a \[layer, kv_head\] pair of integers"),
    ({"budget": 1.5}, r"budget 1.5 is outside \[0, 1\]"),
    ({"budget": -0.1}, r"budget -0.1 is outside \[0, 1\]"),
    ({"budget": float("nan")}, r"budget must be a number in \[0, 1\]"),
    ({"budget": 0.25}, r"2 dense heads exceed the budget 0.25 of 4 KV heads \(at most 1"),
    ({"streaming": "longformer:window=8,causal=false"}, r"must be one causal pattern"),
    ({"streaming": "nonsense"}, r"unknown pattern 'nonsense'"),
    ({"scores": [[1.0, 2.0]]}, r"scores must be a \[2 layers\]\[2 KV heads\] list"),
    ({"format": "something"}, r"not a head plan"),
    ({"format_version": 7}, r"format_version 7 is not supported"),
    ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
    ({"model": {"num_layers": 2}}, r"model.num_attention_heads must be an integer >= 1"),
])
def test_bad_plans_are_refused(tmp_path, change, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_bad(change)))
    with pytest.raises(ValueError, match=match):
        load_plan(path)
    with pytest.raises(EvalError, match=match):  # hf-sparse-eval says it before any model loads
        parse_patterns(f"full,{path}")


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"plan file .*missing.json does not exist; make one with hf-sparse"):
        patch_model(tiny("llama"), str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json is not JSON"):
        load_plan(tmp_path / "broken.json")


@pytest.mark.parametrize("model_type,extra,match", [
    ("llama", {"num_hidden_layers": 3}, r"was calibrated for 'tiny', llama with 2 layers x 2 KV heads .* but this "
                                        r"model is llama with 3 layers x 2 KV heads .*num_layers differ.*hf-sparse-calibrate"),
    ("llama", {"num_key_value_heads": 1}, r"num_kv_heads differ"),
    ("qwen2", {}, r"model_type differ"),
])
def test_plan_for_another_model_is_refused(model_type, extra, match):
    plan = a_plan(tiny("llama"))
    with pytest.raises(ValueError, match=match):
        patch_model(tiny(model_type, **extra), plan)


def test_plan_and_head_patterns_together_are_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="a head plan already names its dense heads"):
        patch_model(model, a_plan(model), head_patterns={(0, 0): "dense"})


# -- patch_model, save, reload, eval --------------------------------------------------------------------
@pytest.mark.filterwarnings("error::hf_sparse.patches.StoredPatternWarning")  # the eval loads it quietly
def test_plan_through_patch_model_save_reload_and_eval(folder, tmp_path):
    model = load(folder)
    plan = a_plan(model, method="mass")
    plan_file = plan.save(tmp_path / "plan.json")
    ids = tokens(2, 40, seed=3)
    # HF's eager attention under the explicit per-head masks of the plan
    per_layer = {i: PerHead(parse_pattern(STREAM), tuple((h, Dense()) for (li, h) in plan.dense_heads if li == i))
                 for i in range(2)}
    want = explicit_mask_logits(load(folder, attn_implementation="eager"), per_layer, ids)
    patched = patch_model(model, str(plan_file), backend="reference")
    got = run(patched, ids)
    assert_real_close(got, want)
    assert patched.config.hf_sparse["plan"] == plan.summary()
    assert [h[:2] for h in patched.config.hf_sparse["head_patterns"]] == [[0, 1], [1, 0]]

    saved = tmp_path / "saved"
    patched.save_pretrained(saved)
    AutoTokenizer.from_pretrained(folder).save_pretrained(saved)
    again = load(saved, attn_implementation=ATTN_NAME)
    assert again.config.hf_sparse["plan"] == plan.summary()
    torch.testing.assert_close(run(again, ids), got)
    assert patch_model(again).config.hf_sparse == patched.config.hf_sparse  # re-applying keeps the plan's record

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXTS[0])
    out = tmp_path / "eval"
    assert eval_main(["run", "--model", str(saved), "--dataset", str(docs), "--device", "cpu", "--out", str(out),
                      "--no-progress", "--no-plots", "--patterns", f"full,{STREAM},{plan_file}",
                      "--context-lengths", "96", "--depths", "0.5", "--backend", "reference"]) == 0
    records = read_results(out / "results.jsonl")
    ppl = {r["pattern"]: r for r in records if r.get("task") == "perplexity"}
    keys = {r["pattern"]: r for r in records if r.get("task") == "passkey"}
    assert (ppl[str(plan_file)]["dense_kv_heads"], ppl[str(plan_file)]["kv_heads_total"]) == (2, 4)
    assert (ppl["full"]["dense_kv_heads"], ppl[STREAM]["dense_kv_heads"]) == (4, 0)
    # the plan's perplexity is the reloaded model's, from a plain forward and cross entropy
    unit = torch.tensor([AutoTokenizer.from_pretrained(saved)(TEXTS[0])["input_ids"][:96]])
    logits = run(again, unit)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], unit[0, 1:], reduction="sum")
    assert math.isclose(ppl[str(plan_file)]["nll_sum"], float(nll), rel_tol=1e-5)
    # cache bytes are measured on generate's cache: full keeps K and V of every token in every layer
    full = keys["full"]
    cached_tokens = full["prompt_tokens"] + pk.NEW_TOKENS - 1
    assert full["cache_bytes"] == 2 * 2 * 2 * cached_tokens * 8 * 4  # layers, K and V, KV heads, tokens, dim, fp32
    assert keys[STREAM]["cache_bytes"] < full["cache_bytes"]
    assert keys[str(plan_file)]["cache_bytes"] <= full["cache_bytes"]
    summary = (out / "summary.md").read_text()
    assert "## Dense KV heads and KV cache" in summary and "| 2/4 (50%) |" in summary


def test_eval_refuses_a_plan_for_another_model(folder, tmp_path):
    plan = HeadPlan(STREAM, [(0, 0)], model_identity(tiny("llama", num_hidden_layers=3).config, "other"), 0.5)
    path = plan.save(tmp_path / "other.json")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXTS[0])
    args = build_parser().parse_args(["perplexity", "--model", str(folder), "--dataset", str(docs), "--device", "cpu",
                                      "--out", str(tmp_path / "o"), "--no-progress", "--patterns", f"full,{path}",
                                      "--context-lengths", "64"])
    with pytest.raises(EvalError, match=r"cannot apply .*other.json.*3 layers x 2 KV heads.*this model is llama "
                                        r"with 2 layers"):
        run_eval(options_from_args(args), ("perplexity",))
    assert not (tmp_path / "o" / "results.jsonl").exists() or not read_results(tmp_path / "o" / "results.jsonl")


# -- calibration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [STREAM, f"{STREAM},max_distance=16",
                                       "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1"])
def test_mass_score_equals_brute_force(folder, streaming):
    """Mass outside the pattern from two lse's equals the eager attention weights summed over hidden keys (a
    distance cap changes how global keys are scored, not which keys are seen: it does not count here)."""
    model = load(folder, attn_implementation="eager")
    T = 64
    ids = tokens(1, T, seed=9)
    rows = (5, T)
    with torch.no_grad():
        attn = model(ids, output_attentions=True, use_cache=False).attentions  # [1, Hq, T, T] per layer
    pattern = parse_pattern(streaming)
    q = torch.arange(T).view(T, 1)
    k = torch.arange(T).view(1, T)
    want = torch.zeros(2, 2)
    for layer, p in enumerate(attn):
        for kv in range(2):
            hidden = ~pattern.allowed(q, k, layer=layer, kv_head=kv)
            share = (p[0, 2 * kv:2 * kv + 2] * hidden).sum(-1)  # [group, T]: weight on keys the pattern hides
            want[layer, kv] = share[:, rows[0]:rows[1]].mean()
    got, parts = mass_scores(model, [Sample(tuple(ids[0].tolist()), rows, "text")], streaming, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert parts == {"text": got.tolist()} and float(want.min()) > 0.05  # the pattern hides real mass here


@needs_interpreter
def test_mass_scores_on_the_interpreter_kernels(folder):
    """The Triton kernels' log-sum-exp (dense and streaming) give the reference path's mass scores."""
    model = load(folder)
    sample = Sample(tuple(tokens(1, 40, seed=9)[0].tolist()), (5, 40), "text")
    want, _ = mass_scores(model, [sample], STREAM, backend="reference")
    got, _ = mass_scores(model, [sample], STREAM, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_calibration_on_cuda_in_bfloat16(tokenizer):
    """Both methods on the Triton kernels in bf16 keep the budget; the mass scores stay within 0.02 of the
    float32 reference path's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny("llama", vocab_size=len(tokenizer), head_dim=64, hidden_size=128, initializer_range=0.1,
                 num_hidden_layers=4)
    kwargs = dict(texts=TEXTS, lengths=[256], passkeys=2, text_samples=1, steps=5)
    want = calibrate(model, tokenizer, STREAM, 0.25, method="mass", backend="reference", **kwargs)
    model = model.to("cuda", torch.bfloat16)
    for method in ("mass", "gates"):
        plan = calibrate(model, tokenizer, STREAM, 0.25, method=method, backend="triton", **kwargs)
        assert len(plan.dense_heads) == 2
        scores = torch.tensor(plan.scores)
        assert bool(torch.isfinite(scores).all()) and float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
        if method == "mass":
            torch.testing.assert_close(scores, torch.tensor(want.scores), atol=0.02, rtol=0.0)


@pytest.mark.parametrize("streaming", [STREAM, f"{STREAM},max_distance=16"])
def test_gated_attention_interpolates_the_patched_models(folder, streaming):
    """Gates at 1 give full attention, at 0 the streaming pattern, and 1 on a plan's heads the plan (with a
    distance cap that acts on these 40 tokens too: the mix streams through the patched model's own path)."""
    model = load(folder)
    sample = Sample(tuple(tokens(1, 40, seed=2)[0].tolist()), (0, 40), "text")
    plan = dataclasses.replace(a_plan(model), streaming=streaming)

    def hidden_of(patched):
        return _hidden(patched, sample, "cpu")

    with torch.no_grad():
        want_full = hidden_of(model)
        want_stream = hidden_of(patch_model(copy.deepcopy(model), streaming, backend="reference"))
        want_plan = hidden_of(patch_model(copy.deepcopy(model), plan, backend="reference"))
        with _calibrating(model, parse_pattern(streaming), "reference") as probe:
            probe.mode = "mix"
            results = []
            for gates in (torch.ones(2, 2), torch.zeros(2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])):
                probe.gates = gates
                results.append(hidden_of(model))
    for got, want in zip(results, (want_full, want_stream, want_plan)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want_plan - want_stream).abs().max() > 1e-3 and (want_plan - want_full).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["mass", "gates"])
@pytest.mark.parametrize("budget,n", [(0.0, 0), (0.25, 1), (0.5, 3), (0.99, 5), (1.0, 6)])
def test_calibration_keeps_the_budget(tokenizer, method, budget, n):
    model = tiny("qwen2", vocab_size=len(tokenizer), num_hidden_layers=3)  # 3 layers x 2 KV heads
    plan = calibrate(model, tokenizer, STREAM, budget, method=method, texts=TEXTS, lengths=[96], passkeys=2,
                     text_samples=1, steps=3, backend="reference")
    assert len(plan.dense_heads) == n == budget_heads(budget, 6)
    scores = torch.tensor(plan.scores)
    assert scores.shape == (3, 2) and plan.method == method
    assert set(plan.dense_heads) == set(select_dense(scores, budget, None if method == "mass" else torch.tensor(
        plan.details["training"]["mean_gates"])))
    if plan.dense_heads and len(plan.dense_heads) < 6:  # the dense heads are the top scores
        kept = min(float(scores[i, h]) for i, h in plan.dense_heads)
        left = max(float(scores[i, h]) for i in range(3) for h in range(2) if (i, h) not in plan.dense_heads)
        assert kept >= left
    assert model.config._attn_implementation == "eager" and not hasattr(model.config, "hf_sparse")
    assert all(p.requires_grad for p in model.parameters())


def test_gates_training_moves_the_gates(tokenizer):
    """Without L1 the gates stay at 1 (full attention is the minimum of the distillation loss); a strong L1
    pulls them down, and the distillation loss grows as the mix moves away from full attention."""
    model = tiny("llama", vocab_size=len(tokenizer))
    kwargs = dict(method="gates", texts=TEXTS, lengths=[96], passkeys=2, text_samples=0, steps=6, lr=0.05,
                  backend="reference")
    assert torch.equal(torch.tensor(calibrate(model, tokenizer, STREAM, 0.5, l1=0.0, **kwargs).scores),
                       torch.ones(2, 2))
    plan = calibrate(model, tokenizer, STREAM, 0.5, l1=50.0, **kwargs)
    training = plan.details["training"]
    assert training["steps_done"] == 6 and [h["step"] for h in training["history"]] == [0, 5]
    gates = torch.tensor(plan.scores)
    assert float(gates.max()) <= 1.0 and float(gates.min()) >= 0.0 and float(gates.mean()) < 0.9
    assert training["history"][-1]["distill"] > training["history"][0]["distill"]


def test_calibrate_refuses_bad_input(tokenizer):
    model = tiny("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=r"budget 1.5 is outside \[0, 1\]"):
        calibrate(model, tokenizer, STREAM, 1.5)
    with pytest.raises(ValueError, match="method='duo'"):
        calibrate(model, tokenizer, STREAM, 0.5, method="duo")
    with pytest.raises(ValueError, match="too short for a passkey prompt"):
        calibrate(model, tokenizer, STREAM, 0.5, lengths=[32], text_samples=0)
    with pytest.raises(ValueError, match="unpatch_model"):
        calibrate(patch_model(model, STREAM), tokenizer, STREAM, 0.5, text_samples=0)


def test_calibrate_command_and_compare(folder, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(TEXTS):
        (docs / f"{i}.txt").write_text(text)
    common = ["--model", str(folder), "--dataset", str(docs), "--lengths", "96", "--passkeys", "2", "--texts", "1",
              "--steps", "3", "--device", "cpu", "--backend", "reference", "--no-progress"]

    def command(budget="0.5", streaming=STREAM, out="plan.json", method="mass"):
        return calibrate_main([*common, "--budget", budget, "--streaming", streaming, "--out", str(tmp_path / out),
                               "--method", method])

    assert command(out="mass.json") == 0 and command(out="gates.json", method="gates") == 0
    mass, gates = load_plan(tmp_path / "mass.json"), load_plan(tmp_path / "gates.json")
    assert len(mass.dense_heads) == len(gates.dense_heads) == 2
    assert mass.details["command"].startswith("hf-sparse-calibrate --model") and mass.details["env"]["torch"]
    c = compare_plans(mass, gates)
    assert len(c["common"]) + len(c["only_a"]) == 2 and 0.0 <= c["jaccard"] <= 1.0
    capsys.readouterr()
    assert calibrate_main(["compare", str(tmp_path / "mass.json"), str(tmp_path / "gates.json")]) == 0
    assert "common dense heads" in capsys.readouterr().out

    for kwargs, match in (({"budget": "1.5"}, r"--budget 1.5 is outside \[0, 1\]"),
                          ({"out": "plan.txt"}, r"ends in .json"),
                          ({"streaming": "longformer:window=8,causal=false"}, "one causal pattern")):
        assert command(**kwargs) == 2
        assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "plan.json").exists()
