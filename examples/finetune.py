"""Fine-tune a pretrained decoder with its sparse attention pattern in place, through accelerate.

A model trained with full attention loses quality when it is patched with a sparse pattern; a short
fine-tune at long context, with the pattern in place, recovers most of it::

    accelerate launch [--config_file examples/accelerate/multi_gpu.yaml] examples/finetune.py \\
        --model smollm2-135m --pattern sliding_window:window=1024 --dataset book1.txt \\
        --eval-dataset book2.txt --seq-len 8192 --max-steps 200 --output-dir runs/smollm2-sw1024

``--model`` and ``--dataset`` take the same sources as ``hf-sparse-eval`` (its loaders are used). In
order, the script

1. reads the documents, holds some out for evaluation (``--eval-dataset``, or by default the last
   ``--eval-fraction`` of the documents), tokenizes the rest and packs them (EOS between documents)
   into ``--seq-len`` chunks, in an order fixed by ``--seed``;
2. measures perplexity of the model as loaded (``full``) and patched (the pattern) on the held-out
   documents with the eval pipeline (``hf_sparse.eval``): ``OUT/eval_before.json``;
3. loads the model in float32, applies the pattern with ``patch_model`` (before ``peft`` and before
   ``accelerator.prepare``), and trains: AdamW, warmup + cosine, gradient clipping at 1.0, gradient
   accumulation, mixed precision and optional gradient checkpointing, all through accelerate;
4. saves ``OUT/final`` (``save_pretrained`` + tokenizer; with ``--lora`` the adapters merged), whose
   ``config.hf_sparse`` keeps the pattern: reload it and call ``patch_model(model)``;
5. measures perplexity again on the fine-tuned model: ``OUT/eval_after.json``.

The output folder::

    OUT/run_config.json             the options and the environment of the first run
    OUT/metrics.jsonl               one row per optimizer step: step, loss, lr, tokens_per_s, elapsed_s, peak_mem_gb
    OUT/checkpoints/step_N/         accelerator.save_state + trainer_state.json (step, data position, options)
    OUT/eval_before.json            perplexity of full and of the pattern before training, and the gap in percent
    OUT/eval_after.json             the same after training, and the gap against the model before training
    OUT/eval_before/, eval_after/   the eval pipeline's results.jsonl and summary.md
    OUT/final/                      the fine-tuned model with config.hf_sparse, and the tokenizer

Data position: the batch of every (optimizer step, micro step, process) is a pure function of
``--seed`` and the step number (an epoch-wise permutation of the packed chunks), so ``--resume``
continues from the last checkpoint without repeating or skipping data; no sampler state is needed.
BigBird's random blocks are a pure function of (seed, layer, kv head, query block), hence identical on
every rank. See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hf_sparse.eval.data import (
    DataSpec,
    Document,
    add_bos,
    check_dataset,
    check_out_outside_dataset,
    iter_documents,
    tokenize_documents,
)
from hf_sparse.eval.errors import EvalError
from hf_sparse.eval.models import load_model, load_tokenizer, resolve_dtype, resolve_model
from hf_sparse.eval.options import PatternChoice, RunOptions
from hf_sparse.eval.report import render_report, summarize
from hf_sparse.eval.results import environment_info, read_results
from hf_sparse.eval.runner import run_eval

from hf_sparse import parse_pattern
from hf_sparse.ops import BACKENDS

__all__ = ["main", "build_parser", "PackedData", "pack_documents", "split_heldout"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# Options that fix what a step means (its data, its learning rate, its model): a resumed run must match.
RESUME_KEYS = ("model", "pattern", "backend", "dataset", "dataset_config", "dataset_split", "text_column",
               "join_rows", "max_docs", "eval_dataset", "eval_fraction", "seq_len", "batch_size",
               "grad_accum", "max_steps", "learning_rate", "weight_decay", "warmup_steps", "seed", "lora",
               "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "mixed_precision", "num_processes")


class FinetuneError(Exception):
    """A bad option or an impossible resume: printed as one line, exit status 2."""


# -- options -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune.py", description="Fine-tune a pretrained decoder with a sparse attention pattern in place "
                                        "(launch with `accelerate launch`). See docs/finetune.md.")
    g = p.add_argument_group("model and pattern")
    g.add_argument("--model", default="smollm2-135m",
                   help="hub id or local folder, a .gguf file, or 'smollm2-135m' (as hf-sparse-eval) [%(default)s]")
    g.add_argument("--pattern", required=True,
                   help="hf_sparse.parse_pattern string, e.g. sliding_window:window=1024 or bigbird:block=64")
    g.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "dense"],
                   help="patch_model backend: auto (Triton on CUDA, else the PyTorch reference) [%(default)s]")
    g = p.add_argument_group("training data")
    g.add_argument("--dataset", default="stdlib",
                   help="'stdlib', a .txt/.md/.jsonl file or folder, or a `datasets` hub name (as hf-sparse-eval) "
                        "[%(default)s]")
    g.add_argument("--dataset-config", default=None, help="hub dataset config")
    g.add_argument("--dataset-split", default="train", help="hub dataset split [%(default)s]")
    g.add_argument("--text-column", default="text", help="text field of .jsonl and hub rows [%(default)s]")
    g.add_argument("--join-rows", action="store_true", help="concatenate all rows of a hub split into one document")
    g.add_argument("--max-docs", type=int, default=0, help="read at most N documents; 0 = all [%(default)s]")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per packed training sequence [%(default)s]")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, default=100, help="optimizer steps [%(default)s]")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per process per micro step [%(default)s]")
    g.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int, default=1,
                   help="micro steps per optimizer step [%(default)s]")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                   help="peak learning rate [2e-5; 2e-4 with --lora]")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay [%(default)s]")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps, then cosine to 0 "
                                                                  "[5%% of --max-steps]")
    g.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "fp16", "no"),
                   help="accelerate mixed precision; auto = bf16 on CUDA, no on the CPU [%(default)s]")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward (use_reentrant=False): long sequences in less memory")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order and of the weights' RNG [%(default)s]")
    g = p.add_argument_group("LoRA (peft)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters; OUT/final holds the merged model")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank [%(default)s]")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha [%(default)s]")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout [%(default)s]")
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names for the adapters [%(default)s]")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output-dir", required=True, help="run folder (metrics, checkpoints, evals, final model)")
    g.add_argument("--save-every", type=int, default=100,
                   help="accelerator.save_state every N optimizer steps; 0 = never [%(default)s]")
    g.add_argument("--save-total-limit", type=int, default=2,
                   help="keep the last N checkpoints; 0 = keep all [%(default)s]")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end after this optimizer step as if interrupted (no final model, no eval after): a run "
                        "longer than a job's time limit, continued later with --resume")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("evaluation before and after (hf_sparse.eval)")
    g.add_argument("--no-eval", action="store_true", help="skip both perplexity evaluations")
    g.add_argument("--eval-dataset", default=None,
                   help="held-out documents (same sources as --dataset); default: the last --eval-fraction of the "
                        "training documents (of a single document: its last part), left out of training")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share without --eval-dataset "
                                                                    "[%(default)s]")
    g.add_argument("--eval-dataset-config", default=None, help="hub config of --eval-dataset")
    g.add_argument("--eval-dataset-split", default="test", help="hub split of --eval-dataset [%(default)s]")
    g.add_argument("--eval-seq-len", type=int, default=None, help="context length of the evaluation [--seq-len]")
    g.add_argument("--eval-max-docs", type=int, default=8, help="held-out documents evaluated; 0 = all [%(default)s]")
    g.add_argument("--eval-protocol", default="windows", choices=("first", "windows"),
                   help="hf-sparse-eval --protocol: 'windows' scores every non-overlapping window [%(default)s]")
    g.add_argument("--eval-max-windows", type=int, default=0, help="windows per document; 0 = all [%(default)s]")
    g.add_argument("--eval-dtype", default="auto",
                   help="dtype of the evaluation: auto = bfloat16 on CUDA, float32 on the CPU [%(default)s]")
    return p


# Every numeric option and its range: (name, low, high, low included, high included, what to give). Checked
# before anything loads, so a bad value is one line, not a traceback from torch minutes later.
_INF = float("inf")
NUMERIC_RANGES = (
    ("seq_len", 16, _INF, True, True, "tokens per sequence, e.g. 2048"),
    ("max_steps", 1, _INF, True, True, "optimizer steps, e.g. 100"),
    ("batch_size", 1, _INF, True, True, "sequences per process per micro step, e.g. 1"),
    ("grad_accum", 1, _INF, True, True, "micro steps per optimizer step, e.g. 1"),
    ("learning_rate", 0.0, 1.0, False, True, "a peak learning rate such as 2e-5"),
    ("weight_decay", 0.0, _INF, True, True, "0 (none) or e.g. 0.01"),
    ("warmup_steps", 0, _INF, True, True, "0 or a few steps"),
    ("seed", 0, 2**32 - 1, True, True, "an integer in [0, 2**32 - 1]"),
    ("lora_r", 1, _INF, True, True, "the adapter rank, e.g. 16"),
    ("lora_alpha", 0.0, _INF, False, True, "e.g. 32"),
    ("lora_dropout", 0.0, 1.0, True, False, "a probability in [0, 1), e.g. 0.05"),
    ("max_docs", 0, _INF, True, True, "0 (no limit) or a count"),
    ("save_every", 0, _INF, True, True, "0 (never) or a step count"),
    ("save_total_limit", 0, _INF, True, True, "0 (keep all) or a count"),
    ("stop_at_step", 1, _INF, True, True, "a step in [1, --max-steps]"),
    ("eval_fraction", 0.0, 1.0, False, False, "a share in (0, 1), e.g. 0.1"),
    ("eval_seq_len", 16, _INF, True, True, "tokens per evaluated window, e.g. 2048"),
    ("eval_max_docs", 0, _INF, True, True, "0 (all) or a count"),
    ("eval_max_windows", 0, _INF, True, True, "0 (all) or a count"),
)


def check_ranges(args: argparse.Namespace) -> None:
    """A :class:`FinetuneError` naming the first option out of its range (NaN and infinity included)."""
    for name, low, high, low_in, high_in, what in NUMERIC_RANGES:
        value = getattr(args, name, None)
        if value is None:  # an option whose default is computed from the others
            continue
        ok = (math.isfinite(value) and (value >= low if low_in else value > low)
              and (value <= high if high_in else value < high))
        if not ok:
            lo = f"{'>=' if low_in else '>'} {low}"
            hi = "" if high == _INF else f" and {'<=' if high_in else '<'} {high}"
            raise FinetuneError(f"--{name.replace('_', '-')} must be {lo}{hi}, got {value}; give {what}")


def check_args(args: argparse.Namespace) -> None:
    check_ranges(args)
    try:
        pattern = parse_pattern(args.pattern)
    except ValueError as err:
        raise FinetuneError(f"--pattern: {err}") from None
    if not pattern.causal:
        raise FinetuneError(f"--pattern {args.pattern!r} is non-causal; decoders need causal patterns")
    args.pattern = pattern.spec()
    if args.learning_rate is None:
        args.learning_rate = 2e-4 if args.lora else 2e-5
    if args.warmup_steps is None:
        args.warmup_steps = max(1, round(0.05 * args.max_steps)) if args.max_steps >= 20 else 0
    if not 0 <= args.warmup_steps <= args.max_steps:
        raise FinetuneError(f"--warmup-steps must be in [0, --max-steps={args.max_steps}], got {args.warmup_steps}")
    if args.eval_seq_len is None:
        args.eval_seq_len = args.seq_len
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= args.max_steps:
        raise FinetuneError(f"--stop-at-step must be in [1, --max-steps={args.max_steps}], got {args.stop_at_step}")
    args.lora_targets = ",".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.lora and not args.lora_targets:
        raise FinetuneError("--lora-targets is empty; e.g. q_proj,k_proj,v_proj,o_proj")
    # what needs the machine or the disk, still before anything loads or is written
    from hf_sparse.patches.model import check_backend_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where accelerate will train
    try:
        check_backend_available(args.backend, device=device)
    except ValueError as err:
        raise FinetuneError(f"--backend {args.backend}: {err}") from None
    resolve_model(args.model)  # a missing folder says so here, without asking the hub
    for name in (args.dataset, args.eval_dataset):
        if name:
            check_dataset(DataSpec(name))
            check_out_outside_dataset(DataSpec(name), args.output_dir, "--output-dir")
    if not args.no_eval:
        try:
            resolve_dtype(args.eval_dtype, device)
        except EvalError as err:
            raise FinetuneError(str(err).replace("--dtype", "--eval-dtype", 1)) from None


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# -- data ------------------------------------------------------------------------------------------------
def split_heldout(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """``(train, heldout)``: the last ``fraction`` of the documents (at least one) are held out.

    A single document is cut instead: its last ``fraction`` of characters, at a line break (or a space)
    where there is one, becomes the held-out document.
    """
    if not docs:
        return [], []
    if len(docs) >= 2:
        k = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
        return docs[:-k], docs[-k:]
    doc = docs[0]
    cut = int(len(doc.text) * (1.0 - fraction))
    for sep in ("\n", " "):
        at = doc.text.rfind(sep, 0, cut)
        if at > cut // 2:
            cut = at + 1
            break
    return [Document(doc.doc_id, doc.text[:cut])], [Document(f"{doc.doc_id}#heldout", doc.text[cut:])]


def pack_documents(docs: list[list[int]], seq_len: int, *, prefix: list[int], eos: int | None) -> torch.Tensor:
    """``[N, seq_len]`` chunks of ``prefix + doc + [eos]`` for every document, concatenated (the tail is dropped)."""
    tail = [eos] if eos is not None else []
    parts = [torch.tensor(prefix + ids + tail, dtype=torch.long) for ids in docs]
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


class PackedData:
    """Packed chunks in a deterministic order: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Sample ``g`` of the whole run (counting over optimizer steps, micro steps, processes and batch rows)
    is chunk ``perm(g // N)[g % N]``, so a batch depends only on the step number: resuming needs no
    sampler state, and the global order does not depend on the number of processes.
    """

    def __init__(self, chunks: torch.Tensor, seed: int) -> None:
        if chunks.shape[0] == 0:
            raise FinetuneError("no packed sequence: the training text is shorter than --seq-len")
        self.chunks, self.seed = chunks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self), generator=gen)}  # keep one epoch: O(N) memory
        return self._perms[epoch]

    def indices(self, first: int, count: int) -> list[int]:
        out = []
        for g in range(first, first + count):
            epoch, pos = divmod(g, len(self))
            out.append(int(self._perm(epoch)[pos]))
        return out

    def batch(self, first: int, count: int) -> torch.Tensor:
        return self.chunks[self.indices(first, count)]


@dataclass
class Layout:
    """How samples are numbered: ``g = ((step * grad_accum + micro) * processes + rank) * batch_size + row``."""

    batch_size: int
    grad_accum: int
    processes: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def first_sample(self, step: int, micro: int) -> int:
        return ((step * self.grad_accum + micro) * self.processes + self.rank) * self.batch_size


def read_training_documents(args) -> list[Document]:
    spec = DataSpec(args.dataset, args.dataset_config, args.dataset_split, args.text_column, args.join_rows)
    docs = list(itertools.islice(iter_documents(spec), args.max_docs or None))
    if not docs:
        raise FinetuneError(f"--dataset {spec.describe()}: no document")
    return docs


# -- evaluation through hf_sparse.eval ------------------------------------------------------------------------
def evaluate(model_spec: str, args, data: dict[str, Any], out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Perplexity of ``full`` (the model unpatched) and of the pattern on the held-out documents."""
    pattern = parse_pattern(args.pattern)
    choices = [PatternChoice("full", "full", None), PatternChoice(args.pattern, pattern.spec(), pattern)]
    shutil.rmtree(out_dir, ignore_errors=True)  # the model under the same path may have new weights
    opts = RunOptions(model=model_spec, patterns=choices, lengths=[args.eval_seq_len], out=str(out_dir),
                      dataset=data["name"], dataset_config=data["config"], dataset_split=data["split"],
                      text_column=data["text_column"], join_rows=data["join_rows"],
                      max_docs=args.eval_max_docs or None, protocol=args.eval_protocol,
                      max_windows=args.eval_max_windows or None, device=str(device), dtype=args.eval_dtype,
                      backend=args.backend, seed=args.seed, progress=not args.no_progress)
    run_eval(opts, ("perplexity",))
    render_report(out_dir, make_plots=False)
    summary = summarize(read_results(out_dir / "results.jsonl"))
    length = args.eval_seq_len
    full, sparse = summary.ppl.get(("full", length)), summary.ppl.get((pattern.spec(), length))
    if full is None or sparse is None:
        raise FinetuneError(f"the evaluation gave no perplexity at {length} tokens; are the held-out documents "
                            f"shorter than --eval-seq-len?")
    return {
        "model": model_spec, "pattern": pattern.spec(), "eval_seq_len": length,
        "dataset": summary.run.get("dataset") if summary.run else None, "protocol": args.eval_protocol,
        "units": len(full.units), "tokens": sum(r["tokens"] for r in full.units.values()),
        "ppl": {"full": full.ppl(), pattern.spec(): sparse.ppl()},
        "gap_pct": summary.delta(pattern.spec(), length),
        "ppl_by_position": {"full": full.buckets(), pattern.spec(): sparse.buckets()},
        "results": str(out_dir / "results.jsonl"),
    }


def _release(device: torch.device) -> None:
    if device.type == "cuda":  # give the GPU memory of a dropped model back before the next one is loaded
        gc.collect()
        torch.cuda.empty_cache()


# -- checkpoints --------------------------------------------------------------------------------------------
def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their ``trainer_state.json`` is written last), oldest first."""
    found = []
    for d in (out / CHECKPOINTS).glob("step_*"):
        if (d / STATE_FILE).is_file() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def run_identity(args, num_processes: int) -> dict[str, Any]:
    ident = {k: getattr(args, k) for k in RESUME_KEYS if hasattr(args, k)}
    ident["num_processes"] = num_processes
    return ident


def check_resume(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        raise FinetuneError(f"--resume from {where}: the options differ from the interrupted run ({'; '.join(diff)}); "
                            "resume with the same options, or start a new --output-dir")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows past the checkpoint: steps done after it are done again, and logged once."""
    rows = [r for r in read_results(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


# -- model ----------------------------------------------------------------------------------------------------
def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM")


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (transformers 5.2x renamed ``gradient_checkpointing_enable``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(source, args, *, training: bool = True):
    """float32 weights on the CPU, the pattern patched in, then (optionally) LoRA adapters around it."""
    from hf_sparse.patches import patch_model

    model = load_model(source, torch.device("cpu"), torch.float32)
    patch_model(model, args.pattern, backend=args.backend)  # before peft and before accelerator.prepare
    if training:
        model.config.use_cache = False  # (under autocast, sparse_attention casts q/k/v itself, as SDPA does)
        if args.gradient_checkpointing:
            enable_checkpointing(model)
        model.train()
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args))
    return model


def on_main(accelerator, fn):
    """``fn()`` on the main process while the others wait; if it fails, every process stops (none hangs at a
    barrier): the main process with the original error, the others with a one-line one."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the others know
            error = err
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(message, from_process=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise FinetuneError(f"the main process failed ({message[0]})")
    return result


def save_final(accelerator, model, tokenizer, source, args, final: Path) -> None:
    """``save_pretrained`` of the trained model (LoRA merged) with ``config.hf_sparse``, and the tokenizer."""
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP: every rank calls it

    def save() -> None:
        if args.lora:
            # A fresh copy on the CPU takes the trained adapters and merges them; this works the same whether
            # the training model is plain, DDP or FSDP-sharded.
            merged = build_model(source, args, training=False)
            merged.load_state_dict(state_dict)
            merged = merged.merge_and_unload()
            merged.save_pretrained(final, safe_serialization=True)
            del merged
        else:
            accelerator.unwrap_model(model).save_pretrained(final, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(final)
        saved = json.loads((final / "config.json").read_text(encoding="utf-8"))
        if saved.get("hf_sparse", {}).get("pattern") != parse_pattern(args.pattern).to_dict():
            raise FinetuneError(f"{final}/config.json does not carry the pattern {args.pattern} (hf_sparse: "
                                f"{saved.get('hf_sparse')!r})")

    on_main(accelerator, save)


# -- the run ----------------------------------------------------------------------------------------------
def _log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def train(args) -> int:
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # A long evaluation runs on the main process while the others wait at a barrier.
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision),
                              gradient_accumulation_steps=args.grad_accum,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=_dt.timedelta(hours=3))])
    args.mixed_precision = accelerator.mixed_precision
    main_proc = accelerator.is_main_process
    out = Path(args.output_dir)
    found = list_checkpoints(out)
    if args.resume and not found:
        raise FinetuneError(f"--resume: no checkpoint in {out / CHECKPOINTS}; run without --resume first")
    if not args.resume and found:
        raise FinetuneError(f"{out} already has checkpoints (last: step {found[-1][0]}); add --resume to continue "
                            "that run, or choose a new --output-dir")
    identity = run_identity(args, accelerator.num_processes)
    resume_from = found[-1][1] if args.resume else None
    saved_state = json.loads((resume_from / STATE_FILE).read_text()) if resume_from else None
    if saved_state is not None:
        check_resume(saved_state["run"], identity, resume_from)
    set_seed(args.seed)
    device = accelerator.device

    # data: every process reads and packs the same documents (deterministic), then takes its own rows
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    docs = read_training_documents(args)
    if args.eval_dataset:
        train_docs = docs
        eval_data = {"name": args.eval_dataset, "config": args.eval_dataset_config, "split": args.eval_dataset_split,
                     "text_column": args.text_column, "join_rows": args.join_rows}
    else:
        train_docs, heldout = split_heldout(docs, args.eval_fraction)
        path = out / "eval_data" / "heldout.jsonl"
        eval_data = {"name": str(path), "config": None, "split": "test", "text_column": "text", "join_rows": False}
        if main_proc:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in heldout),
                            encoding="utf-8")
    corpus = tokenize_documents(iter(train_docs), tokenizer, 1, max_docs=None, progress=False)
    prefix = add_bos(tokenizer)
    chunks = pack_documents([ids for _, ids in corpus.docs], args.seq_len, prefix=prefix, eos=tokenizer.eos_token_id)
    data = PackedData(chunks, args.seed)
    layout = Layout(args.batch_size, args.grad_accum, accelerator.num_processes, accelerator.process_index)
    tokens_per_step = layout.global_batch * args.seq_len
    epochs = args.max_steps * layout.global_batch / len(data)
    _log(accelerator, f"{accelerator.distributed_type.value} on {accelerator.num_processes} process(es), mixed precision "
                      f"{accelerator.mixed_precision}; training data: {len(corpus.docs)} documents, {len(data)} "
                      f"sequences of {args.seq_len} tokens; {args.max_steps} steps x {layout.global_batch} sequences "
                      f"= {epochs:.2f} epochs")
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        if saved_state is None:
            (out / "run_config.json").write_text(json.dumps(
                {"time": _now(), "args": vars(args), "processes": accelerator.num_processes,
                 "distributed_type": str(accelerator.distributed_type), "train_docs": len(corpus.docs),
                 "train_sequences": len(data), "tokens_per_step": tokens_per_step, "epochs": epochs,
                 "eval_dataset": eval_data["name"], "env": environment_info(device)}, indent=2, default=str),
                encoding="utf-8")
    accelerator.wait_for_everyone()

    # before: full vs the pattern on the held-out documents (main process only; the others wait)
    if not args.no_eval and not (saved_state and (out / "eval_before.json").exists()):
        def eval_before() -> None:
            _log(accelerator, "evaluating before training")
            before = evaluate(args.model, args, eval_data, out / "eval_before", device)
            (out / "eval_before.json").write_text(json.dumps(before, indent=2), encoding="utf-8")
            _release(device)

        on_main(accelerator, eval_before)
    set_seed(args.seed)  # the evaluation touched the main process' RNG

    model = build_model(source, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    del trainable
    # Not passed to prepare(): stepped once per optimizer step by us (accelerate's wrapper would step it
    # once per process), saved and loaded with the state all the same.
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step, elapsed_before = 0, 0.0
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        start_step, elapsed_before = saved_state["step"], saved_state.get("elapsed_s", 0.0)
        _log(accelerator, f"resumed from {resume_from} (step {start_step})")
        if main_proc:
            truncate_metrics(metrics_path, start_step)
    elif main_proc and metrics_path.exists():
        metrics_path.unlink()
    accelerator.wait_for_everyone()

    end_step = args.stop_at_step or args.max_steps
    bar = tqdm(total=args.max_steps, initial=start_step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not main_proc or args.no_progress)
    t_start = time.perf_counter()
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        losses = []
        for micro in range(args.grad_accum):
            batch = data.batch(layout.first_sample(step, micro), args.batch_size).to(device)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # all of the prepared model's parameters: what accelerate's FSDP path expects
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        if not accelerator.sync_gradients:  # cannot happen with whole accumulation windows; guard the invariant
            raise RuntimeError(f"step {step + 1}: accelerate did not sync gradients after {args.grad_accum} micro steps")
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        dt = time.perf_counter() - t0
        done = step + 1
        row = {"step": done, "loss": mean_loss, "lr": lr, "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
               "elapsed_s": elapsed_before + time.perf_counter() - t_start,
               "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
        if main_proc:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if args.save_every and done % args.save_every == 0:
            save_checkpoint(accelerator, out, done, row["elapsed_s"], layout, identity, args.save_total_limit)
    bar.close()
    if end_step < args.max_steps:
        _log(accelerator, f"stopped after step {end_step} (--stop-at-step); continue with --resume")
        accelerator.end_training()
        return 0

    final = out / "final"
    save_final(accelerator, model, tokenizer, source, args, final)
    _log(accelerator, f"saved {final}")
    accelerator.free_memory()  # drops accelerate's references to the model and optimizer
    del model, optimizer, scheduler
    _release(device)
    if not args.no_eval:
        def eval_after() -> None:
            _log(accelerator, "evaluating after training")
            after = evaluate(str(final), args, eval_data, out / "eval_after", device)
            before_path = out / "eval_before.json"
            if before_path.exists():
                before = json.loads(before_path.read_text())
                after["ppl_before"] = before["ppl"]
                after["gap_vs_full_before_pct"] = (after["ppl"][after["pattern"]] / before["ppl"]["full"] - 1) * 100
            (out / "eval_after.json").write_text(json.dumps(after, indent=2), encoding="utf-8")
            _log(accelerator, _eval_line(out))

        on_main(accelerator, eval_after)
    accelerator.end_training()
    return 0


def save_checkpoint(accelerator, out: Path, step: int, elapsed: float, layout: Layout, identity: dict[str, Any],
                    keep: int) -> None:
    ckpt = out / CHECKPOINTS / f"step_{step}"
    accelerator.save_state(str(ckpt))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "elapsed_s": elapsed, "time": _now(),
                 "data": {"next_sample": step * layout.global_batch, "global_batch": layout.global_batch},
                 "run": identity}
        tmp = ckpt / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, ckpt / STATE_FILE)  # written last: a checkpoint without it is incomplete
        if keep:
            for _, old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _eval_line(out: Path) -> str:
    before = json.loads((out / "eval_before.json").read_text()) if (out / "eval_before.json").exists() else None
    after = json.loads((out / "eval_after.json").read_text())
    spec = after["pattern"]

    def fmt(e):
        return f"full {e['ppl']['full']:.3f}, pattern {e['ppl'][spec]:.3f} ({e['gap_pct']:+.2f}%)"

    lines = [f"perplexity at {after['eval_seq_len']} tokens on {after['units']} held-out units"]
    if before:
        lines.append(f"  before: {fmt(before)}")
    lines.append(f"  after:  {fmt(after)}")
    if "gap_vs_full_before_pct" in after:
        lines.append(f"  pattern after vs full before: {after['gap_vs_full_before_pct']:+.2f}%")
    return "\n".join(lines)


def interrupted_message(out: Path) -> str:
    """What Ctrl-C leaves and how to go on, in one line."""
    found = list_checkpoints(out)
    if found:
        return (f"finetune.py: interrupted; the last checkpoint is {found[-1][1]} (step {found[-1][0]}): run the same "
                "command with --resume to continue from it")
    return ("finetune.py: interrupted before the first checkpoint (--save-every); run the same command again to "
            "start over")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return train(args)
    except (FinetuneError, EvalError) as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process gets the signal: one line
            if sys.stderr.isatty():
                print(file=sys.stderr)  # past a progress bar's unfinished line
            print(interrupted_message(Path(args.output_dir)), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
