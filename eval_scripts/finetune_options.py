"""The options of ``hf-sparse-finetune``, checked before anything loads or is written.

A bad value is one line naming the option, the value and what to give instead (:class:`FinetuneError`,
exit status 2), not a traceback from torch minutes into a run.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from hf_sparse import parse_pattern
from hf_sparse.ops import BACKENDS

from .data import DataSpec, add_dataset_arguments, check_dataset, check_out_outside_dataset
from .errors import EvalError, FinetuneError
from .models import resolve_dtype, resolve_model

__all__ = ["PROG", "build_parser", "check_args", "check_ranges", "default_warmup", "default_cache_dir",
           "resolve_mixed_precision", "tracker_names", "TRACKER_PACKAGES"]

PROG = "hf-sparse-finetune"
LR_SCHEDULES = ("cosine", "constant")
# accelerate's built-in trackers and the pip package that makes each available
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet-ml",
                    "aim": "aim", "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive",
                    "swanlab": "swanlab"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Fine-tune a pretrained decoder with a sparse attention pattern in place. Several "
                               "processes: accelerate launch -m hf_sparse.eval.finetune ... See docs/finetune.md.")
    g = p.add_argument_group("model and pattern")
    g.add_argument("--model", default="smollm2-135m",
                   help="hub id or local folder, a .gguf file, or 'smollm2-135m' (as hf-sparse-eval) [%(default)s]")
    g.add_argument("--pattern", required=True,
                   help="hf_sparse.parse_pattern string, e.g. sliding_window:window=1024 or bigbird:block=64")
    g.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "dense"],
                   help="patch_model backend: auto (Triton on CUDA, else the PyTorch reference) [%(default)s]")
    g = p.add_argument_group("training data")
    add_dataset_arguments(g, split="train", max_docs=0, max_docs_help="read at most N documents; 0 = all")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per packed training sequence [%(default)s]")
    g.add_argument("--cache-dir", default=None,
                   help="where tokenized training text is kept, keyed by tokenizer, data and options "
                        "[$HF_SPARSE_CACHE, else ~/.cache/hf_sparse; the files go under finetune-data/]")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, default=100,
                   help="optimizer steps; with --resume, a larger value extends a finished run [%(default)s]")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per process per micro step [%(default)s]")
    g.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int, default=1,
                   help="micro steps per optimizer step [%(default)s]")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                   help="peak learning rate [2e-5; 2e-4 with --lora]")
    g.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="after the warmup: cosine decay to 0 at --max-steps, or constant (a run meant to be "
                        "extended with --resume) [%(default)s]")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay [%(default)s]")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps [5%% of --max-steps from 20 steps on, else 0; on --resume, the run's]")
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
    g = p.add_argument_group("checkpoints, logging and output")
    g.add_argument("--output-dir", required=True, help="run folder (metrics, checkpoints, evals, final model)")
    g.add_argument("--save-every", type=int, default=100,
                   help="accelerator.save_state every N optimizer steps, and always at the end; 0 = only at the "
                        "end [%(default)s]")
    g.add_argument("--save-total-limit", type=int, default=2,
                   help="keep the last N checkpoints; 0 = keep all [%(default)s]")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in OUT/checkpoints: an interrupted run, or a finished "
                        "one with a larger --max-steps")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end after this optimizer step with a checkpoint, but no final model and no eval after: a "
                        "run longer than a job's time limit, continued later with --resume")
    g.add_argument("--report-to", "--log-with", dest="report_to", default="none",
                   help="comma-separated experiment trackers for accelerate's log_with: "
                        f"{', '.join(TRACKER_PACKAGES)}, all (every one installed), a name registered with "
                        "accelerate.tracking.register_tracker_class, or none [%(default)s]")
    g.add_argument("--tracker-project", default=PROG, help="project name given to the trackers [%(default)s]")
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


# Every numeric option and its range: (name, low, high, low included, high included, what to give).
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
    ("save_every", 0, _INF, True, True, "0 (only at the end) or a step count"),
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


def default_warmup(max_steps: int) -> int:
    """5% of the steps (at least one) from 20 steps on; none for shorter runs."""
    return max(1, round(0.05 * max_steps)) if max_steps >= 20 else 0


def default_cache_dir() -> Path:
    root = os.environ.get("HF_SPARSE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                      "hf_sparse")
    return Path(root).expanduser() / "finetune-data"


def tracker_names(text: str) -> list[str]:
    """``--report-to`` as accelerate ``log_with`` names; a tracker that is not installed, or no tracker at all,
    is refused here (accelerate itself would drop it without a word)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name == "none":
            raise FinetuneError(f"--report-to {text}: 'none' cannot be combined with trackers")
        if name in TRACKER_PACKAGES:
            if name not in available:
                raise FinetuneError(f"--report-to {name}: the {name} tracker is not installed: pip install "
                                    f"{TRACKER_PACKAGES[name]} (or leave --report-to out)")
        elif name != "all" and name not in LOGGER_TYPE_TO_CLASS:
            raise FinetuneError(f"--report-to {name!r} is no tracker; use {', '.join(TRACKER_PACKAGES)}, all, none, "
                                "or a GeneralTracker registered with accelerate.tracking.register_tracker_class")
    return names


def check_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts one process (accelerate runs several CPU processes
    only under MPI), so a run that asked for N would train alone, on 1/N of the global batch."""
    env = os.environ
    if (env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and env.get("MASTER_PORT")
            and "WORLD_SIZE" not in env and not any(k in env for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))):
        raise FinetuneError("accelerate launch --cpu started a single process although several were asked for; "
                            "for N CPU processes (gloo) run: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
                            "--num_processes N -m hf_sparse.eval.finetune ...")


def check_args(args: argparse.Namespace) -> None:
    """Every option, before anything loads or is written; fills the defaults that depend on others (except
    ``--warmup-steps``, which on ``--resume`` is the resumed run's)."""
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
    if args.warmup_steps is not None and args.warmup_steps > args.max_steps:
        raise FinetuneError(f"--warmup-steps must be in [0, --max-steps={args.max_steps}], got {args.warmup_steps}")
    if args.eval_seq_len is None:
        args.eval_seq_len = args.seq_len
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= args.max_steps:
        raise FinetuneError(f"--stop-at-step must be in [1, --max-steps={args.max_steps}], got {args.stop_at_step}")
    args.lora_targets = ",".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.lora and not args.lora_targets:
        raise FinetuneError("--lora-targets is empty; e.g. q_proj,k_proj,v_proj,o_proj")
    args.report_to = ",".join(tracker_names(args.report_to)) or "none"
    args.cache_dir = str(Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir())
    check_launch()
    # what needs the machine or the disk, still before anything loads or is written
    from .runner import check_backend_here

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where accelerate will train
    check_backend_here(args.backend, device)
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
