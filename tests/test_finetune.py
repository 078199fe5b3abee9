"""examples/finetune.py on a tiny random Llama and a small local text (CPU, offline, in-process).

The model and a byte-level BPE tokenizer are built here and saved into a temporary folder, so the
script loads them the way it loads any local model. ``finetune.main([...])`` runs in this process:
accelerate's ``Accelerator`` works single-process on the CPU without ``accelerate launch``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

from transformers import LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64
# every pattern is sparse at SEQ = 64 tokens (none of them reduces to dense causal attention)
PATTERNS = {
    "sliding_window": "sliding_window:window=16",
    "longformer": "longformer:window=16,global_tokens=2",
    "bigbird": "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1",
    "dense": "dense",
}

from helpers import save_tiny_llama, sentences  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_finetune():
    spec = importlib.util.spec_from_file_location("hf_sparse_finetune_example", ROOT / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


finetune = _load_finetune()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three documents for training (the last one is held out by default) and one for --eval-dataset."""
    root = tmp_path_factory.mktemp("corpus")
    train = root / "train"
    train.mkdir()
    for i in range(3):
        (train / f"doc{i}.txt").write_text(sentences(i, 60))
    (root / "heldout.txt").write_text(sentences(99, 40))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder, [p.read_text() for p in sorted(corpus.rglob("*.txt"))], vocab_size=400,
                    max_positions=256)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerator keeps process-wide singletons; each in-process run starts from a clean slate. Under mixed
    # precision the script wraps the registered "hf_sparse" attention function: register the adapter's own again.
    from accelerate.state import AcceleratorState, GradientState
    from hf_sparse.patches import register

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    register()


def run(model_dir: Path, data: Path, out: Path, *extra: str, pattern: str = PATTERNS["sliding_window"]) -> int:
    return finetune.main(["--model", str(model_dir), "--pattern", pattern, "--dataset", str(data),
                          "--seq-len", str(SEQ), "--output-dir", str(out), "--backend", "reference",
                          "--no-progress", *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def reload_patched(folder: Path):
    from hf_sparse.patches import patch_model

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config._attn_implementation != "hf_sparse"  # not saved: patch_model re-applies it
    patch_model(model)
    return model


# -- units ----------------------------------------------------------------------------------------------------
def test_packing_and_data_order_are_deterministic():
    chunks = finetune.pack_documents([[5, 6, 7], [8, 9]], 4, prefix=[1], eos=2)
    assert chunks.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9]]  # the trailing EOS does not fill a chunk
    data = finetune.PackedData(torch.arange(10).view(5, 2), seed=3)
    first = data.indices(0, 12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))  # each epoch once
    assert first[:5] != first[5:10]  # a new order each epoch
    assert finetune.PackedData(torch.arange(10).view(5, 2), seed=3).indices(7, 5) == first[7:12]
    # the sample numbering does not depend on how steps are split between processes and micro steps
    one = finetune.Layout(batch_size=2, grad_accum=2, processes=1, rank=0)
    two = [finetune.Layout(batch_size=1, grad_accum=2, processes=2, rank=r) for r in range(2)]
    assert one.global_batch == two[0].global_batch == 4
    assert one.first_sample(3, 1) == 14 and [lay.first_sample(3, 1) for lay in two] == [14, 15]


def test_heldout_split_by_documents_and_within_one_document():
    docs = [finetune.Document(f"d{i}", f"text {i}") for i in range(20)]
    train, held = finetune.split_heldout(docs, 0.1)
    assert [d.doc_id for d in held] == ["d18", "d19"] and len(train) == 18
    one = finetune.Document("book", "line one\n" * 50)
    (train,), (held,) = finetune.split_heldout([one], 0.1)
    assert train.text + held.text == one.text and held.text.startswith("line") and 0 < len(held.text) < 60


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PATTERNS))
def test_loss_goes_down_with_each_pattern(model_dir, corpus, tmp_path, name):
    out = tmp_path / name
    assert run(model_dir, corpus / "train", out, "--max-steps", "12", "--learning-rate", "1e-2",
               "--warmup-steps", "2", "--batch-size", "2", "--save-every", "0", "--no-eval",
               pattern=PATTERNS[name]) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert set(r) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s", "peak_mem_gb"}
        assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] is None  # CPU
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, f"{name}: loss {first:.3f} -> {last:.3f}"
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(1e-2)  # warmup, then cosine down
    assert rows[-1]["lr"] < rows[3]["lr"]
    model = reload_patched(out / "final")
    assert model.config.hf_sparse["pattern"] == finetune.parse_pattern(PATTERNS[name]).to_dict()
    assert model.config._attn_implementation == "hf_sparse"
    assert "hf_sparse=" in repr(model.model.layers[0].self_attn)


@pytest.mark.parametrize("name", ["sliding_window", "bigbird"])
def test_first_step_trains_the_patched_model_on_the_first_batch(model_dir, corpus, tmp_path, name):
    from hf_sparse.patches import patch_model

    out = tmp_path / name
    assert run(model_dir, corpus / "train", out, "--max-steps", "1", "--batch-size", "3", "--save-every", "0",
               "--no-eval", "--seed", "7", pattern=PATTERNS[name]) == 0
    logged = metrics(out)[0]["loss"]
    # the batch, rebuilt: doc0 and doc1 (doc2 is held out), BOS + text + EOS each, packed, seed 7's order
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    docs = [tok((corpus / "train" / f"doc{i}.txt").read_text(), add_special_tokens=False)["input_ids"]
            for i in range(2)]
    chunks = finetune.pack_documents(docs, SEQ, prefix=[tok.bos_token_id], eos=tok.eos_token_id)
    assert chunks.shape[0] == sum(len(d) + 2 for d in docs) // SEQ
    batch = finetune.PackedData(chunks, seed=7).batch(0, 3)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        full = model(input_ids=batch, labels=batch).loss.item()
        patch_model(model, PATTERNS[name], backend="reference")
        sparse = model(input_ids=batch, labels=batch).loss.item()
    # near-uniform attention of a random model: the pattern moves the loss a little, but 20x the tolerance
    assert logged == pytest.approx(sparse, rel=0, abs=1e-5)
    assert abs(sparse - full) > 2e-4, (sparse, full)


def test_bf16_mixed_precision(model_dir, corpus, tmp_path):
    # accelerate's autocast hands the attention function float32 query/key and a bfloat16 value
    out = tmp_path / "bf16"
    assert run(model_dir, corpus / "train", out, "--max-steps", "8", "--learning-rate", "1e-2", "--batch-size", "2",
               "--save-every", "0", "--no-eval", "--mixed-precision", "bf16") == 0
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert json.loads((out / "run_config.json").read_text())["args"]["mixed_precision"] == "bf16"


def test_eval_before_and_after_and_reload(model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    assert run(model_dir, corpus / "train", out, "--max-steps", "10", "--learning-rate", "1e-2",
               "--batch-size", "2", "--grad-accum", "2", "--save-every", "0", "--eval-seq-len", "128") == 0
    heldout = [json.loads(line) for line in (out / "eval_data" / "heldout.jsonl").read_text().splitlines()]
    assert [d["id"] for d in heldout] == ["doc2.txt"]  # the last of three documents, not trained on
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    spec = finetune.parse_pattern(PATTERNS["sliding_window"]).spec()
    for e in (before, after):
        assert set(e["ppl"]) == {"full", spec} and e["eval_seq_len"] == 128 and e["units"] >= 1
        assert e["gap_pct"] == pytest.approx((e["ppl"][spec] / e["ppl"]["full"] - 1) * 100)
        assert (Path(e["results"]).parent / "summary.md").exists()
    assert after["ppl_before"] == before["ppl"]
    assert after["ppl"][spec] < before["ppl"][spec]  # it learned the text's words
    # the eval pipeline's own numbers: the fine-tuned model as saved, patched again, on the held-out windows
    model = reload_patched(out / "final").eval()
    from hf_sparse.eval.perplexity import perplexity, token_nll
    from hf_sparse.eval.results import read_results

    recs = [r for r in read_results(out / "eval_after" / "results.jsonl")
            if r.get("task") == "perplexity" and r["pattern_spec"] == spec]
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    ids = tok(heldout[0]["text"])["input_ids"][:128]
    nll = token_nll(model, torch.tensor([ids]))
    w0 = next(r for r in recs if r["item"] == "w0")
    assert float(nll.sum()) == pytest.approx(w0["nll_sum"], rel=1e-5)
    assert after["ppl"][spec] == pytest.approx(perplexity(sum(r["nll_sum"] for r in recs),
                                                          sum(r["tokens"] for r in recs)), rel=1e-9)


def test_interrupted_run_resumes_to_the_same_state(model_dir, corpus, tmp_path):
    common = ("--max-steps", "6", "--learning-rate", "5e-3", "--warmup-steps", "1", "--batch-size", "2",
              "--grad-accum", "2", "--save-every", "2", "--no-eval")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(model_dir, corpus / "train", whole, *common) == 0
    # "killed" after step 5: steps 1-5 logged, last checkpoint at step 4 (step 2 rotated out by the limit of 2)
    assert run(model_dir, corpus / "train", parts, *common, "--stop-at-step", "5") == 0
    assert [r["step"] for r in metrics(parts)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert not (parts / "final").exists()
    state = json.loads((parts / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"] == {"next_sample": 16, "global_batch": 4}
    # without --resume the folder is not silently reused
    assert run(model_dir, corpus / "train", parts, *common) == 2
    # with other options it refuses to resume
    assert run(model_dir, corpus / "train", parts, *common[:-1], "--seed", "1", "--no-eval", "--resume") == 2
    assert run(model_dir, corpus / "train", parts, *common, "--resume") == 0
    a, b = metrics(whole), metrics(parts)
    assert [r["step"] for r in b] == list(range(1, 7))  # step 5 redone, logged once
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["loss"], ra["lr"]) == (rb["step"], rb["loss"], rb["lr"])
    wa, wb = weights(whole / "final"), weights(parts / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step_4", "step_6"]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(model_dir, corpus, tmp_path):
    """DDP through accelerate (gloo, 2 CPU processes, launched by torchrun) against one process with the
    same global batch: same samples per step, same losses, same weights up to float summation order.
    Then a failing evaluation on the main process: both processes stop."""
    import os
    import subprocess

    common = ["--model", str(model_dir), "--pattern", PATTERNS["bigbird"], "--dataset", str(corpus / "train"),
              "--seq-len", str(SEQ), "--backend", "reference", "--no-progress", "--no-eval", "--max-steps", "4",
              "--learning-rate", "1e-2", "--grad-accum", "2", "--save-every", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "finetune.py"), *common, "--batch-size", "1", "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr
    assert finetune.main([*common, "--batch-size", "2", "--output-dir", str(tmp_path / "one")]) == 0
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    wa, wb = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "one" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    # an error in the main process' evaluation ends both processes instead of leaving one at a barrier
    cmd = [*cmd[:-2], "--output-dir", str(tmp_path / "fail")]
    cmd.remove("--no-eval")
    proc = subprocess.run([*cmd, "--eval-seq-len", "100000"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the main process failed (EvalError: " in proc.stderr


def test_lora_merges_and_keeps_the_pattern(model_dir, corpus, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    pattern = PATTERNS["longformer"]
    assert run(model_dir, corpus / "train", out, "--lora", "--lora-r", "4", "--max-steps", "4",
               "--learning-rate", "1e-2", "--save-every", "2", "--no-eval", "--gradient-checkpointing",
               pattern=pattern) == 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["hf_sparse"]["pattern"] == finetune.parse_pattern(pattern).to_dict()
    merged = weights(out / "final")
    assert not any("lora" in k for k in merged)  # a plain transformers model
    base = weights(model_dir)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed)
    model = reload_patched(out / "final")
    assert model.config.hf_sparse["pattern"]["type"] == "longformer"


def test_errors_are_one_line(model_dir, corpus, tmp_path, capsys):
    assert run(model_dir, corpus / "train", tmp_path / "x", pattern="sliding_window:window=0") == 2
    assert "window must be an integer >= 1" in capsys.readouterr().err
    assert run(model_dir, corpus / "train", tmp_path / "x", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert run(model_dir, corpus / "train", tmp_path / "x", "--seq-len", "100000", "--no-eval") == 2
    assert "shorter than --seq-len" in capsys.readouterr().err


# -- first contact: every input checked before any work (issue 17) ------------------------------------------
@pytest.mark.parametrize(("extra", "message"), [
    (["--learning-rate", "-1"], "--learning-rate must be > 0.0 and <= 1.0, got -1.0"),
    (["--learning-rate", "0"], "--learning-rate must be > 0.0"),
    (["--learning-rate", "nan"], "--learning-rate must be > 0.0 and <= 1.0, got nan"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--seq-len", "8"], "--seq-len must be >= 16, got 8"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0.0, got -0.1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--warmup-steps", "50"], "--warmup-steps must be in [0, --max-steps=3], got 50"),
    (["--seed", "-1"], "--seed must be >= 0 and <= 4294967295, got -1"),
    (["--lora-r", "0"], "--lora-r must be >= 1, got 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0.0, got 0.0"),
    (["--lora-dropout", "1"], "--lora-dropout must be >= 0.0 and < 1.0, got 1.0"),
    (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    (["--stop-at-step", "0"], "--stop-at-step must be >= 1, got 0"),
    (["--eval-fraction", "1.5"], "--eval-fraction must be > 0.0 and < 1.0, got 1.5"),
    (["--eval-seq-len", "4"], "--eval-seq-len must be >= 16, got 4"),
    (["--eval-max-windows", "-3"], "--eval-max-windows must be >= 0, got -3"),
    (["--eval-dtype", "float8"], "--eval-dtype 'float8' is not supported"),
    (["--model", "nonexistent_dir"], "--model nonexistent_dir: no such folder"),
    (["--model", "./no/such/folder"], "no such folder"),
    (["--dataset", "no/such/file.txt"], "no such file or folder"),
])
def test_bad_options_stop_before_any_work(model_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    args = ["--model", str(model_dir), "--dataset", str(corpus / "train"), "--max-steps", "3"]
    args = [a for i, a in enumerate(args) if not (a in extra[::2] or (i and args[i - 1] in extra[::2]))]
    assert finetune.main(["--pattern", PATTERNS["sliding_window"], "--seq-len", str(SEQ), "--output-dir", str(out),
                          "--backend", "reference", "--no-progress", *args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune.py: error:") and message in err and "Traceback" not in err, err
    assert not out.exists()  # nothing written, nothing loaded


def test_triton_backend_that_cannot_run_is_refused_up_front(model_dir, corpus, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --backend triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "x"
    assert finetune.main(["--model", str(model_dir), "--pattern", PATTERNS["bigbird"], "--dataset",
                          str(corpus / "train"), "--output-dir", str(out), "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "--backend triton: backend='triton' cannot run here" in err and "'reference'" in err
    assert not out.exists()


def test_binary_data_and_output_folders_are_refused(model_dir, corpus, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50)
    assert run(model_dir, data, tmp_path / "x", "--no-eval") == 2
    assert f"{data / 'notes.txt'} is not a text file" in capsys.readouterr().err
    assert run(model_dir, corpus / "train", corpus / "train" / "run", "--no-eval") == 2
    assert "--output-dir" in capsys.readouterr().err and not (corpus / "train" / "run").exists()
    # an earlier run's output folder is no training data (its metrics.jsonl, its eval results)
    earlier = tmp_path / "earlier"
    assert run(model_dir, corpus / "train", earlier, "--max-steps", "1", "--no-eval", "--save-every", "0") == 0
    assert run(model_dir, earlier, tmp_path / "y", "--no-eval") == 2
    assert "metrics.jsonl holds the training metrics of an earlier examples/finetune.py run" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_resume_continues(model_dir, corpus, tmp_path, capsys, monkeypatch):
    common = ("--max-steps", "4", "--save-every", "2", "--no-eval", "--learning-rate", "5e-3")
    out = tmp_path / "x"
    real = finetune.PackedData.batch

    def interrupted_at_step_4(self, first, count):
        if first >= 3:  # batch size 1, one process: sample 3 is step 4's
            raise KeyboardInterrupt
        return real(self, first, count)

    monkeypatch.setattr(finetune.PackedData, "batch", interrupted_at_step_4)
    assert run(model_dir, corpus / "train", out, *common) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"finetune.py: interrupted; the last checkpoint is "
                                            f"{out / 'checkpoints' / 'step_2'} (step 2): run the same command with "
                                            "--resume to continue from it")
    assert "Traceback" not in err
    monkeypatch.setattr(finetune.PackedData, "batch", real)
    finetune_state_reset()
    assert run(model_dir, corpus / "train", out, *common, "--resume") == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    # interrupted before the first checkpoint: start over, without --resume
    monkeypatch.setattr(finetune.PackedData, "batch", interrupted_at_step_4)
    finetune_state_reset()
    assert run(model_dir, corpus / "train", tmp_path / "z", "--max-steps", "4", "--no-eval") == 130
    assert "before the first checkpoint" in capsys.readouterr().err


def finetune_state_reset() -> None:
    # two runs inside one test: accelerate's process-wide state starts clean for the second (as between tests)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
