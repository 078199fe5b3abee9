"""hf-sparse-finetune (hf_sparse.eval.finetune) on a tiny random Llama and a small local text (CPU, offline).

The model and a byte-level BPE tokenizer are built here and saved into a temporary folder, so the
command loads them the way it loads any local model. ``finetune.main([...])`` runs in this process:
accelerate's ``Accelerator`` works single-process on the CPU without ``accelerate launch``. The
two-process test launches the command with ``accelerate launch`` (gloo, CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

from hf_sparse.eval import finetune, finetune_data  # noqa: E402
from hf_sparse.eval.data import Document  # noqa: E402
from hf_sparse.eval.finetune_data import Layout, PackedData, pack_documents, split_heldout  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_sparse import parse_pattern  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROG = "hf-sparse-finetune"
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
def token_cache(tmp_path, monkeypatch) -> Path:
    """Each test tokenizes into its own cache folder (the default is the user's ~/.cache/hf_sparse)."""
    folder = tmp_path / "token-cache"
    monkeypatch.setenv("HF_SPARSE_CACHE", str(folder))
    return folder / "finetune-data"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerator keeps process-wide singletons; each in-process run starts from a clean slate. Under mixed
    # precision accelerate may wrap the registered "hf_sparse" attention function: register the adapter's own again.
    from hf_sparse.patches import register

    yield
    reset_accelerate()
    register()


def reset_accelerate() -> None:
    # two runs inside one test: accelerate's process-wide state starts clean for the second (as between tests)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(model_dir: Path, data: Path, out: Path, *extra: str, pattern: str = PATTERNS["sliding_window"],
        trackers=()) -> int:
    code = finetune.main(["--model", str(model_dir), "--pattern", pattern, "--dataset", str(data),
                          "--seq-len", str(SEQ), "--output-dir", str(out), "--backend", "reference",
                          "--no-progress", *extra], trackers=trackers)
    reset_accelerate()
    return code


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, **tol) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k, **tol)


def reload_patched(folder: Path):
    from hf_sparse.patches import patch_model

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config._attn_implementation != "hf_sparse"  # not saved: patch_model re-applies it
    patch_model(model)
    return model


def state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())


# -- units ----------------------------------------------------------------------------------------------------
def test_packing_and_data_order_are_deterministic():
    chunks = pack_documents([[5, 6, 7], [8, 9]], 4, prefix=[1], eos=2)
    assert chunks.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9]]  # the trailing EOS does not fill a chunk
    data = PackedData(torch.arange(10).view(5, 2), seed=3)
    first = data.indices(0, 12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))  # each epoch once
    assert first[:5] != first[5:10]  # a new order each epoch
    assert PackedData(torch.arange(10).view(5, 2), seed=3).indices(7, 5) == first[7:12]
    # the sample numbering does not depend on how steps are split between processes and micro steps
    one = Layout(batch_size=2, grad_accum=2, processes=1, rank=0)
    two = [Layout(batch_size=1, grad_accum=2, processes=2, rank=r) for r in range(2)]
    assert one.global_batch == two[0].global_batch == 4
    assert one.first_sample(3, 1) == 14 and [lay.first_sample(3, 1) for lay in two] == [14, 15]


def test_heldout_split_by_documents_and_within_one_document():
    docs = [Document(f"d{i}", f"text {i}") for i in range(20)]
    train, held = split_heldout(docs, 0.1)
    assert [d.doc_id for d in held] == ["d18", "d19"] and len(train) == 18
    one = Document("book", "line one\n" * 50)
    (train,), (held,) = split_heldout([one], 0.1)
    assert train.text + held.text == one.text and held.text.startswith("line") and 0 < len(held.text) < 60


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_is_the_transformers_schedule(schedule, warmup):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_constant_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make(opt, warmup, 10) if schedule == "cosine" else make(opt, warmup)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [finetune.learning_rate_at(s, peak=0.1, warmup=warmup, total=10, schedule=schedule) for s in range(10)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


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
        assert set(r) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s", "peak_mem_gb", "chunks"}
        assert r["tokens_per_s"] > 0 and r["peak_mem_gb"] is None  # CPU
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, f"{name}: loss {first:.3f} -> {last:.3f}"
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(1e-2)  # warmup, then cosine down
    assert rows[-1]["lr"] < rows[3]["lr"]
    # --save-every 0: the one checkpoint is the run's end, marked finished once the final model is saved
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_12"] and state(out, 12)["finished"]
    model = reload_patched(out / "final")
    assert model.config.hf_sparse["pattern"] == parse_pattern(PATTERNS[name]).to_dict()
    assert model.config._attn_implementation == "hf_sparse"
    assert "hf_sparse=" in repr(model.model.layers[0].self_attn)


@pytest.mark.parametrize("name", ["sliding_window", "bigbird"])
def test_first_step_trains_the_patched_model_on_the_first_batch(model_dir, corpus, tmp_path, name):
    from hf_sparse.patches import patch_model

    out = tmp_path / name
    assert run(model_dir, corpus / "train", out, "--max-steps", "1", "--batch-size", "3", "--save-every", "0",
               "--no-eval", "--seed", "7", pattern=PATTERNS[name]) == 0
    logged = metrics(out)[0]
    # the batch, rebuilt: doc0 and doc1 (doc2 is held out), BOS + text + EOS each, packed, seed 7's order
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    docs = [tok((corpus / "train" / f"doc{i}.txt").read_text(), add_special_tokens=False)["input_ids"]
            for i in range(2)]
    chunks = pack_documents(docs, SEQ, prefix=[tok.bos_token_id], eos=tok.eos_token_id)
    assert chunks.shape[0] == sum(len(d) + 2 for d in docs) // SEQ
    data = PackedData(chunks, seed=7)
    assert logged["chunks"] == [data.indices(0, 3)]  # one process: its chunks of the step
    batch = data.batch(0, 3)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        full = model(input_ids=batch, labels=batch).loss.item()
        patch_model(model, PATTERNS[name], backend="reference")
        sparse = model(input_ids=batch, labels=batch).loss.item()
    # near-uniform attention of a random model: the pattern moves the loss a little, but 20x the tolerance
    assert logged["loss"] == pytest.approx(sparse, rel=0, abs=1e-5)
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
    spec = parse_pattern(PATTERNS["sliding_window"]).spec()
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
    # a job that ends after step 5: a checkpoint there (step 2 rotated out by the limit of 2), no final model
    assert run(model_dir, corpus / "train", parts, *common, "--stop-at-step", "5") == 0
    assert [r["step"] for r in metrics(parts)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert not (parts / "final").exists()
    assert state(parts, 5)["step"] == 5 and state(parts, 5)["data"] == {"next_sample": 20, "global_batch": 4}
    assert not state(parts, 5)["finished"]
    # without --resume the folder is not silently reused
    assert run(model_dir, corpus / "train", parts, *common) == 2
    # with other options it refuses to resume
    assert run(model_dir, corpus / "train", parts, *common[:-1], "--seed", "1", "--no-eval", "--resume") == 2
    assert run(model_dir, corpus / "train", parts, *common, "--resume") == 0
    a, b = metrics(whole), metrics(parts)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["loss"], ra["lr"], ra["chunks"]) == (rb["step"], rb["loss"], rb["lr"], rb["chunks"])
    assert_same_weights(whole / "final", parts / "final", rtol=0, atol=1e-6)
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step_4", "step_6"]


def test_finished_run_extends_like_one_longer_run(model_dir, corpus, tmp_path, capsys):
    # a constant learning rate after the warmup: steps 1-4 are the same in a 4-step and in an 8-step run
    extend = ("--lr-schedule", "constant", "--learning-rate", "5e-3", "--batch-size", "2", "--save-every", "0",
              "--no-eval")
    common = (*extend, "--warmup-steps", "2")
    short, long_ = tmp_path / "short", tmp_path / "long"
    assert run(model_dir, corpus / "train", long_, *common, "--max-steps", "8") == 0
    assert run(model_dir, corpus / "train", short, *common, "--max-steps", "4") == 0
    assert (short / "final").exists() and state(short, 4)["finished"]
    # the extension keeps the run's own warmup without --warmup-steps (5% of 8 steps would be 0)
    capsys.readouterr()
    assert run(model_dir, corpus / "train", short, *extend, "--max-steps", "8", "--resume") == 0
    err = capsys.readouterr().err
    assert "extending the finished run from step 4 to 8; the data order continues at sample 8" in err
    assert "one process, no distribution, mixed precision no; training data:" in err
    a, b = metrics(long_), metrics(short)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["lr"], ra["chunks"]) == (rb["step"], rb["lr"], rb["chunks"])
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    assert_same_weights(long_ / "final", short / "final", rtol=0, atol=1e-6)
    assert sorted(p.name for p in (short / "checkpoints").iterdir()) == ["step_4", "step_8"]
    # nothing left to do at the same --max-steps; fewer steps than done is refused too
    for steps in ("8", "6"):
        capsys.readouterr()
        assert run(model_dir, corpus / "train", short, *extend, "--max-steps", steps, "--resume") == 2
        assert "is at step 8 (finished: yes); give --max-steps larger than 8" in capsys.readouterr().err


def test_cosine_extension_follows_the_schedule_of_the_new_length(model_dir, corpus, tmp_path):
    out = tmp_path / "cos"
    common = ("--learning-rate", "5e-3", "--warmup-steps", "1", "--save-every", "0", "--eval-seq-len", "128")
    assert run(model_dir, corpus / "train", out, *common, "--max-steps", "3") == 0
    before = (out / "eval_before.json").read_text()
    after_3 = (out / "eval_after.json").read_text()
    assert run(model_dir, corpus / "train", out, *common, "--max-steps", "6", "--resume") == 0
    # the evaluation before training is the original model's; the finished run's own is kept by its step
    assert (out / "eval_before.json").read_text() == before
    kept = json.loads((out / "eval_after_step_3.json").read_text())
    assert kept == json.loads(after_3) | {"results": str(out / "eval_after_step_3" / "results.jsonl"), "step": 3}
    assert (out / "eval_after_step_3" / "results.jsonl").exists()
    assert json.loads((out / "eval_after.json").read_text())["ppl_before"] == json.loads(before)["ppl"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["command"].startswith("hf-sparse-finetune --model") and "--resume" not in config["command"]
    (resume,) = config["resumes"]
    assert resume["from_step"] == 3 and resume["max_steps"] == 6 and resume["command"].endswith("--resume")
    lrs = [r["lr"] for r in metrics(out)]

    def lr(step, total):
        return finetune.learning_rate_at(step, peak=5e-3, warmup=1, total=total, schedule="cosine")

    assert lrs == pytest.approx([lr(s, 3) for s in range(3)] + [lr(s, 6) for s in range(3, 6)], rel=1e-12)
    assert lrs[2] < lrs[3]  # the finished run had decayed; the longer schedule is higher at step 4


def test_a_run_interrupted_after_its_last_checkpoint_finishes_on_resume(model_dir, corpus, tmp_path):
    out = tmp_path / "x"
    common = ("--max-steps", "2", "--save-every", "0", "--no-eval")
    assert run(model_dir, corpus / "train", out, *common) == 0
    trained = weights(out / "final")
    # as if the run had died while saving its final model: the end checkpoint is there, not yet finished
    path = out / "checkpoints" / "step_2" / "trainer_state.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"finished": False}))
    for f in (out / "final").iterdir():
        f.unlink()
    assert run(model_dir, corpus / "train", out, *common, "--resume") == 0
    assert [r["step"] for r in metrics(out)] == [1, 2] and state(out, 2)["finished"]
    for k, v in weights(out / "final").items():
        assert torch.equal(v, trained[k]), k


def test_training_text_is_tokenized_once_and_cached(model_dir, corpus, tmp_path, capsys, monkeypatch, token_cache):
    data = tmp_path / "data"
    data.mkdir()
    for p in (corpus / "train").iterdir():
        (data / p.name).write_text(p.read_text())
    common = ("--max-steps", "2", "--batch-size", "2", "--save-every", "0", "--no-eval")
    args = ["--model", str(model_dir), "--pattern", PATTERNS["sliding_window"], "--dataset", str(data),
            "--seq-len", str(SEQ), "--backend", "reference", *common]
    assert finetune.main([*args, "--output-dir", str(tmp_path / "a")]) == 0  # with progress bars
    reset_accelerate()
    err = capsys.readouterr().err
    (cached,) = token_cache.glob("*.pt")
    assert f"tokenized into {cached}; 1 of 1 process(es) tokenized" in err
    assert "tokenize" in err.split("tokenized into")[0]  # the progress bar
    # a second run, and one at another --seq-len, read the cache: no document is read or tokenized again
    real = finetune_data.tokenize_documents

    def refuse(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(finetune_data, "tokenize_documents", refuse)
    assert run(model_dir, data, tmp_path / "b", *common) == 0
    assert f"read from {cached}" in capsys.readouterr().err
    for ra, rb in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert (ra["loss"], ra["chunks"]) == (rb["loss"], rb["chunks"])
    assert run(model_dir, data, tmp_path / "c", *common, "--seq-len", "32") == 0
    assert f"read from {cached}" in capsys.readouterr().err
    # another held-out split, an edited file or another tokenizer: tokenized again, into another file
    monkeypatch.setattr(finetune_data, "tokenize_documents", real)
    assert run(model_dir, data, tmp_path / "d", *common, "--eval-fraction", "0.5") == 0
    (data / "doc0.txt").write_text((data / "doc0.txt").read_text() + " More words.")
    assert run(model_dir, data, tmp_path / "e", *common) == 0
    assert "tokenized into" in capsys.readouterr().err
    assert len(list(token_cache.glob("*.pt"))) == 3
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    before = finetune_data.tokenizer_fingerprint(tok)
    tok.add_tokens(["zebra"])
    assert finetune_data.tokenizer_fingerprint(tok) != before
    assert not list(token_cache.glob("*.tmp"))


def _recording_tracker():
    from accelerate.tracking import GeneralTracker

    class Recording(GeneralTracker):
        name = "hf_sparse_test_recording"
        requires_logging_directory = False
        runs: list[dict] = []

        def __init__(self, project_name: str = "", **kwargs) -> None:
            super().__init__()
            self.record = {"project": project_name, "config": None, "rows": [], "finished": False}
            Recording.runs.append(self.record)

        @property
        def tracker(self):
            return self.record

        def store_init_configuration(self, values: dict) -> None:
            self.record["config"] = values

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.record["rows"].append({"step": step, **values})

        def finish(self) -> None:
            self.record["finished"] = True

    return Recording


def test_report_to_a_tracker_registered_by_name(model_dir, corpus, tmp_path):
    tracking = pytest.importorskip("accelerate.tracking")
    if not hasattr(tracking, "register_tracker_class"):
        pytest.skip("this accelerate has no register_tracker_class")
    recording = _recording_tracker()
    tracking.register_tracker_class(recording)
    try:
        out = tmp_path / "run"
        assert run(model_dir, corpus / "train", out, "--max-steps", "3", "--save-every", "0", "--no-eval",
                   "--report-to", recording.name, "--tracker-project", "sw16") == 0
    finally:
        tracking.LOGGER_TYPE_TO_CLASS.pop(recording.name, None)
    (record,) = recording.runs
    assert record["project"] == "sw16" and record["finished"]
    assert record["config"]["pattern"] == parse_pattern(PATTERNS["sliding_window"]).spec()
    assert record["config"]["global_batch"] == 1 and record["config"]["max_steps"] == 3
    logged = [(r["step"], r["loss"], r["lr"]) for r in record["rows"]]
    assert logged == [(r["step"], r["loss"], r["lr"]) for r in metrics(out)]


def test_example_script_trains_with_its_own_tracker(model_dir, corpus, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hf_sparse_finetune_example", ROOT / "examples" / "finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "example"
    assert example.run(["--model", str(model_dir), "--dataset", str(corpus / "train"), "--pattern",
                        PATTERNS["bigbird"], "--seq-len", str(SEQ), "--max-steps", "2", "--backend", "reference",
                        "--no-eval", "--no-progress", "--output-dir", str(out)]) == 0
    reset_accelerate()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == [f"step {r['step']}: loss {r['loss']:.4f}, lr {r['lr']:.3g}" for r in metrics(out)]
    assert json.loads((out / "final" / "config.json").read_text())["hf_sparse"]["pattern"]["type"] == "bigbird"


def test_tensorboard_tracker_writes_event_files(model_dir, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert run(model_dir, corpus / "train", out, "--max-steps", "2", "--save-every", "0", "--no-eval",
               "--report-to", "tensorboard") == 0
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_refused_up_front(model_dir, corpus, tmp_path, capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    for name, package in (("tensorboard", "tensorboard"), ("comet_ml", "comet-ml")):
        assert run(model_dir, corpus / "train", tmp_path / "x", "--report-to", f"{name}", "--no-eval") == 2
        err = capsys.readouterr().err
        assert f"--report-to {name}: the {name} tracker is not installed: pip install {package}" in err
    assert not (tmp_path / "x").exists()


def test_lora_merges_and_keeps_the_pattern(model_dir, corpus, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    pattern = PATTERNS["longformer"]
    assert run(model_dir, corpus / "train", out, "--lora", "--lora-r", "4", "--max-steps", "4",
               "--learning-rate", "1e-2", "--save-every", "2", "--no-eval", "--gradient-checkpointing",
               pattern=pattern) == 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["hf_sparse"]["pattern"] == parse_pattern(pattern).to_dict()
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
    (tmp_path / "file").write_text("not a folder")
    assert run(model_dir, corpus / "train", tmp_path / "x", "--cache-dir", str(tmp_path / "file"), "--no-eval") == 2
    assert f"--cache-dir {tmp_path / 'file'}: cannot write the tokenized text there" in capsys.readouterr().err


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
    (["--report-to", "tensorbored"], "--report-to 'tensorbored' is no tracker; use tensorboard, wandb"),
    (["--report-to", "none,wandb"], "'none' cannot be combined with trackers"),
])
def test_bad_options_stop_before_any_work(model_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    args = ["--model", str(model_dir), "--dataset", str(corpus / "train"), "--max-steps", "3"]
    args = [a for i, a in enumerate(args) if not (a in extra[::2] or (i and args[i - 1] in extra[::2]))]
    assert finetune.main(["--pattern", PATTERNS["sliding_window"], "--seq-len", str(SEQ), "--output-dir", str(out),
                          "--backend", "reference", "--no-progress", *args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error:") and message in err and "Traceback" not in err, err
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


def test_accelerate_launch_cpu_that_started_one_process_is_refused(model_dir, corpus, tmp_path, capsys,
                                                                   monkeypatch):
    # what `accelerate launch --cpu --num_processes 2` leaves in the one process it starts
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run(model_dir, corpus / "train", tmp_path / "x", "--no-eval") == 2
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


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
    assert "metrics.jsonl holds the training metrics of an earlier hf-sparse-finetune run" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_resume_continues(model_dir, corpus, tmp_path, capsys, monkeypatch):
    common = ("--max-steps", "4", "--save-every", "2", "--no-eval", "--learning-rate", "5e-3")
    out = tmp_path / "x"
    real = PackedData.batch

    def interrupted_at_step_4(self, first, count):
        if first >= 3:  # batch size 1, one process: sample 3 is step 4's
            raise KeyboardInterrupt
        return real(self, first, count)

    monkeypatch.setattr(PackedData, "batch", interrupted_at_step_4)
    assert run(model_dir, corpus / "train", out, *common) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"{PROG}: interrupted; the last checkpoint is "
                                            f"{out / 'checkpoints' / 'step_2'} (step 2): run the same command with "
                                            "--resume to continue from it")
    assert "Traceback" not in err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    monkeypatch.setattr(PackedData, "batch", real)
    assert run(model_dir, corpus / "train", out, *common, "--resume") == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # step 3 done again after step 2, logged once
    # interrupted before the first checkpoint: start over, without --resume
    monkeypatch.setattr(PackedData, "batch", interrupted_at_step_4)
    assert run(model_dir, corpus / "train", tmp_path / "z", "--max-steps", "4", "--no-eval") == 130
    assert "before the first checkpoint" in capsys.readouterr().err


# -- several processes -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_where_they_stopped(model_dir, corpus, tmp_path):
    """``accelerate launch`` of the command in two CPU processes (DDP over gloo) against one process with the
    same global batch: each process trains on its own rows of every step, the losses and weights match up to
    float summation order, and the two-process run extended with --resume continues where it stopped. The
    extension's evaluation after training fails on the main process (held-out text shorter than
    --eval-seq-len): both processes stop, none waits at a barrier."""
    source = ["--model", str(model_dir), "--pattern", PATTERNS["bigbird"], "--dataset", str(corpus / "train"),
              "--seq-len", str(SEQ), "--backend", "reference", "--no-progress"]
    training = ["--learning-rate", "1e-2", "--lr-schedule", "constant", "--grad-accum", "2", "--save-every", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def launch(*args: str) -> subprocess.CompletedProcess:
        # `accelerate launch --cpu --num_processes 2` starts one process; --multi_gpu with ACCELERATE_USE_CPU
        # starts two (torchrun), which accelerate runs on the CPU over gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", "hf_sparse.eval.finetune", *source, *training, "--batch-size", "1", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    ddp = tmp_path / "ddp"
    proc = launch("--max-steps", "2", "--eval-seq-len", "128", "--output-dir", str(ddp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MULTI_CPU on 2 processes, mixed precision" in proc.stderr and state(ddp, 2)["run"]["num_processes"] == 2
    assert "; 1 of 2 process(es) tokenized)" in proc.stderr  # the main one; the other read its cache file
    assert state(ddp, 2)["finished"] and (ddp / "eval_after.json").exists()
    proc = launch("--max-steps", "4", "--resume", "--eval-seq-len", "100000", "--output-dir", str(ddp))
    assert proc.returncode != 0 and "the main process failed (" in proc.stderr, proc.stderr[-3000:]
    assert "; 0 of 2 process(es) tokenized)" in proc.stderr  # the first run's tokens
    assert "extending the finished run from step 2 to 4" in proc.stderr
    assert (ddp / "eval_after_step_2.json").exists() and not state(ddp, 4)["finished"]
    one = tmp_path / "one"
    assert run(model_dir, corpus / "train", one, *training, "--batch-size", "2", "--max-steps", "4", "--no-eval",
               pattern=PATTERNS["bigbird"]) == 0
    rows_ddp, rows_one = metrics(ddp), metrics(one)
    assert [r["step"] for r in rows_ddp] == [1, 2, 3, 4]
    for a, b in zip(rows_ddp, rows_one):
        # process r takes row r of every micro step of the one-process batch of 2: its own shard
        (mine,) = b["chunks"]
        assert a["chunks"] == [mine[0::2], mine[1::2]]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    assert_same_weights(ddp / "final", one / "final", rtol=1e-4, atol=1e-5)
