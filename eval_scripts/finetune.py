"""``hf-sparse-finetune``: fine-tune a pretrained decoder with its sparse attention pattern in place.

A model trained with full attention loses quality when it is patched with a sparse pattern; a short
fine-tune at long context, with the pattern in place, recovers most of it::

    hf-sparse-finetune --model smollm2-135m --pattern sliding_window:window=1024 --dataset book1.txt \\
        --eval-dataset book2.txt --seq-len 8192 --max-steps 200 --output-dir runs/smollm2-sw1024
    accelerate launch --num_processes 2 -m hf_sparse.eval.finetune ...     # several GPUs (DDP, FSDP)

In order, a run

1. reads the documents (the sources of ``hf-sparse-eval``), holds some out for evaluation, tokenizes the
   rest once into a cache that the other processes and later runs read (:mod:`.finetune_data`), and packs
   it into ``--seq-len`` chunks in an order fixed by ``--seed``;
2. measures perplexity of the model as loaded (``full``) and patched on the held-out documents with the
   eval pipeline: ``OUT/eval_before.json``;
3. loads the model in float32, applies the pattern with ``patch_model`` (before ``peft`` and before
   ``accelerator.prepare``), and trains: AdamW, warmup then cosine (or constant) learning rate, gradient
   clipping at 1.0, gradient accumulation, mixed precision, optional gradient checkpointing and LoRA;
   metrics go to ``OUT/metrics.jsonl`` and to the trackers of ``--report-to``;
4. saves a checkpoint at the end (and every ``--save-every`` steps), so ``--resume`` continues an
   interrupted run or extends a finished one to a larger ``--max-steps`` (:mod:`.finetune_checkpoints`);
5. saves ``OUT/final`` (``save_pretrained`` + tokenizer; with ``--lora`` the adapters merged), whose
   ``config.hf_sparse`` keeps the pattern, and measures perplexity again: ``OUT/eval_after.json``.

From Python, :func:`main` takes the command line and, besides, tracker objects of your own
(``accelerate.tracking.GeneralTracker``). See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_sparse import parse_pattern

from .errors import EvalError, FinetuneError
from .finetune_checkpoints import (
    CHECKPOINTS,
    STATE_FILE,
    check_resume,
    interrupted_message,
    list_checkpoints,
    mark_finished,
    now,
    run_identity,
    truncate_metrics,
    write_state,
)
from .finetune_data import Layout, load_or_tokenize
from .finetune_options import PROG, build_parser, check_args, default_warmup, resolve_mixed_precision
from .models import load_model, load_tokenizer, resolve_model
from .options import PatternChoice, RunOptions
from .report import render_report, summarize
from .results import environment_info, read_results
from .runner import run_eval

__all__ = ["main", "train", "parse_args", "build_parser", "learning_rate_at", "FinetuneError"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked (:class:`FinetuneError` for a bad value), ready for :func:`train`."""
    args = _parse(argv)
    check_args(args)
    return args


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join([PROG, *argv])  # recorded in run_config.json (a launcher's options are not seen)
    return args


# -- learning rate -----------------------------------------------------------------------------------------
def learning_rate_at(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of the optimizer step that follows ``step`` finished steps: a linear warmup from 0
    over ``warmup`` steps, then constant, or a cosine down to 0 at ``total`` (transformers'
    ``get_cosine_schedule_with_warmup`` / ``get_constant_schedule_with_warmup``). A pure function of the step,
    so a resumed run needs no scheduler state, and an extended run follows the schedule of its new length."""
    if step < warmup:
        return peak * step / max(1, warmup)
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


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


# -- processes ----------------------------------------------------------------------------------------------
def on_main(accelerator, fn):
    """``fn()`` on the main process while the others wait; if it fails, every process stops (none hangs at a
    barrier, as under ``main_process_first``): the main process with the original error, the others with a
    one-line one."""
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


def save_checkpoint(accelerator, out: Path, step: int, elapsed: float, layout: Layout, identity: dict[str, Any],
                    keep: int) -> None:
    accelerator.save_state(str(out / CHECKPOINTS / f"step_{step}"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_state(out, step, elapsed, layout.global_batch, identity, keep)
    accelerator.wait_for_everyone()


def _log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)


def _tracker_config(args, extra: dict[str, Any]) -> dict[str, Any]:
    """The options as tracker hyperparameters: scalars only (TensorBoard's hparams take nothing else)."""
    values = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str))}
    return values | extra


def _record_run(args, out: Path, saved: dict[str, Any] | None, facts: dict[str, Any]) -> None:
    """``OUT/run_config.json``: the first run's command, options and environment; each resume appends its own.
    Extending a finished run keeps that run's evaluation as ``eval_after_step_N``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_config.json"
    command = getattr(args, "command", None)
    if saved is None or not path.exists():
        config = {"time": now(), "command": command, "args": vars(args)} | facts
    else:
        config = json.loads(path.read_text(encoding="utf-8"))
        config.setdefault("resumes", []).append({"time": now(), "command": command, "from_step": saved["step"],
                                                 "max_steps": args.max_steps, "env": facts["env"]})
    path.write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    if saved is not None and saved.get("finished"):
        kept = f"eval_after_step_{saved['step']}"
        for name in ("eval_after.json", "eval_after"):
            if (out / name).exists():
                target = out / name.replace("eval_after", kept)
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.replace(out / name, target)
        record = out / f"{kept}.json"
        if record.exists():  # its rows moved with it; OUT/final will hold the extended model
            data = json.loads(record.read_text(encoding="utf-8"))
            data |= {"results": str(out / kept / "results.jsonl"), "step": saved["step"]}
            record.write_text(json.dumps(data, indent=2), encoding="utf-8")


# -- the run ----------------------------------------------------------------------------------------------
def _start(args, trackers: Sequence[Any]):
    """The accelerator, and where the run starts: ``(accelerator, identity, checkpoint or None, its state)``."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    log_with = [n for n in args.report_to.split(",") if n != "none"] + list(trackers)
    # A long evaluation runs on the main process while the others wait at a barrier.
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(args.mixed_precision),
                              gradient_accumulation_steps=args.grad_accum, log_with=log_with or None,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=_dt.timedelta(hours=3))])
    args.mixed_precision = accelerator.mixed_precision
    found = list_checkpoints(out)
    if args.resume and not found:
        raise FinetuneError(f"--resume: no checkpoint in {out / CHECKPOINTS}; run without --resume first")
    if not args.resume and found:
        raise FinetuneError(f"{out} already has checkpoints (last: step {found[-1][0]}); add --resume to continue "
                            "or extend that run, or choose a new --output-dir")
    resume_from = found[-1][1] if args.resume else None
    saved = json.loads((resume_from / STATE_FILE).read_text()) if resume_from else None
    if args.warmup_steps is None:  # the resumed run's own, else 5% of this run's steps
        args.warmup_steps = saved["run"]["warmup_steps"] if saved else default_warmup(args.max_steps)
    identity = run_identity(args, accelerator.num_processes)
    if saved is not None:
        check_resume(saved["run"], identity, resume_from)
        done = saved["step"]
        if args.max_steps < done or (args.max_steps == done and saved.get("finished")):
            raise FinetuneError(f"--resume: the run in {out} is at step {done} (finished: "
                                f"{'yes' if saved.get('finished') else 'no'}); give --max-steps larger than {done} "
                                "to extend it")
        if args.stop_at_step is not None and args.stop_at_step <= done:
            raise FinetuneError(f"--stop-at-step {args.stop_at_step}: the run resumes after step {done}; give a "
                                f"later step, up to --max-steps={args.max_steps}")
    return accelerator, identity, resume_from, saved


def train(args: argparse.Namespace, *, trackers: Sequence[Any] = ()) -> int:
    """One run (or its continuation) with options from :func:`parse_args`; ``trackers``: ``GeneralTracker``
    objects logged to next to those of ``--report-to``. Returns 0; raises :class:`FinetuneError`."""
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    accelerator, identity, resume_from, saved = _start(args, trackers)
    main_proc = accelerator.is_main_process
    out = Path(args.output_dir)
    set_seed(args.seed)
    device = accelerator.device

    # data: tokenized once, by the main process, into the cache the others (and later runs) read
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    text = on_main(accelerator, lambda: load_or_tokenize(args, tokenizer, progress=not args.no_progress))
    if not main_proc:
        text = load_or_tokenize(args, tokenizer, progress=False)
    tokenized = sum(gather_object([text.tokenized_here]))  # 1 on a first run, 0 once cached
    data = text.packed(args.seq_len, args.seed)
    layout = Layout(args.batch_size, args.grad_accum, accelerator.num_processes, accelerator.process_index)
    tokens_per_step = layout.global_batch * args.seq_len
    epochs = args.max_steps * layout.global_batch / len(data)
    if args.eval_dataset:
        eval_data = {"name": args.eval_dataset, "config": args.eval_dataset_config, "split": args.eval_dataset_split,
                     "text_column": args.text_column, "join_rows": args.join_rows}
    else:
        path = out / "eval_data" / "heldout.jsonl"
        eval_data = {"name": str(path), "config": None, "split": "test", "text_column": "text", "join_rows": False}
        if main_proc:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in text.heldout),
                            encoding="utf-8")
    kind = accelerator.distributed_type.value  # "NO", "MULTI_GPU", "FSDP", ...
    where = "one process, no distribution" if kind == "NO" else f"{kind} on {accelerator.num_processes} processes"
    _log(accelerator, f"{where}, mixed precision {accelerator.mixed_precision}; training data: {text.documents} documents "
                      f"({'tokenized into' if text.tokenized_here else 'read from'} {text.path}; {tokenized} of "
                      f"{accelerator.num_processes} process(es) tokenized), {len(data)} "
                      f"sequences of {args.seq_len} tokens; {args.max_steps} steps x {layout.global_batch} sequences "
                      f"= {epochs:.2f} epochs")
    if main_proc:
        _record_run(args, out, saved, {
            "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "train_docs": text.documents, "train_sequences": len(data), "tokens_per_step": tokens_per_step,
            "epochs": epochs, "token_cache": str(text.path), "eval_dataset": eval_data["name"],
            "env": environment_info(device)})
    accelerator.wait_for_everyone()

    # before: full vs the pattern on the held-out documents (main process only; the others wait)
    if not args.no_eval and not (saved and (out / "eval_before.json").exists()):
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
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.log_with:
        accelerator.init_trackers(args.tracker_project, config=_tracker_config(args, {
            "num_processes": accelerator.num_processes, "global_batch": layout.global_batch,
            "tokens_per_step": tokens_per_step, "train_sequences": len(data)}))

    def lr_at(step: int) -> float:
        return learning_rate_at(step, peak=args.learning_rate, warmup=args.warmup_steps, total=args.max_steps,
                                schedule=args.lr_schedule)

    start_step, elapsed_before = 0, 0.0
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        start_step, elapsed_before = saved["step"], saved.get("elapsed_s", 0.0)
        _log(accelerator, f"resumed from {resume_from} (step {start_step})")
        if saved.get("finished"):
            _log(accelerator, f"extending the finished run from step {start_step} to {args.max_steps}; the data order "
                              f"continues at sample {start_step * layout.global_batch}, the learning rate is "
                              f"{lr_at(start_step):.3g} at step {start_step + 1} ({args.lr_schedule} schedule of "
                              f"{args.max_steps} steps)")
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
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses, chunks = [], []
        for micro in range(args.grad_accum):
            first = layout.first_sample(step, micro)
            chunks += data.indices(first, args.batch_size)
            batch = data.batch(first, args.batch_size).to(device)
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
        mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        chunks_by_process = gather_object([chunks])
        dt = time.perf_counter() - t0
        done = step + 1
        row = {"step": done, "loss": mean_loss, "lr": lr, "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
               "elapsed_s": elapsed_before + time.perf_counter() - t_start,
               "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
               "chunks": chunks_by_process}
        if main_proc:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=done)
        bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if done == end_step or (args.save_every and done % args.save_every == 0):  # always at the end
            save_checkpoint(accelerator, out, done, row["elapsed_s"], layout, identity, args.save_total_limit)
    bar.close()
    if end_step < args.max_steps:
        _log(accelerator, f"stopped after step {end_step} (--stop-at-step) with a checkpoint; continue with --resume")
        accelerator.end_training()
        return 0

    final = out / "final"
    save_final(accelerator, model, tokenizer, source, args, final)
    _log(accelerator, f"saved {final}")
    accelerator.free_memory()  # drops accelerate's references to the model and optimizer
    del model, optimizer
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
    if main_proc:
        mark_finished(out / CHECKPOINTS / f"step_{end_step}")
    accelerator.end_training()
    return 0


def main(argv: Sequence[str] | None = None, *, trackers: Sequence[Any] = ()) -> int:
    """The command: exit status 0, 2 for a bad option or an impossible resume (one line), 130 on Ctrl-C."""
    args = _parse(argv)
    try:
        check_args(args)
        return train(args, trackers=trackers)
    except EvalError as err:  # FinetuneError included
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process gets the signal: one line
            if sys.stderr.isatty():
                print(file=sys.stderr)  # past a progress bar's unfinished line
            print(interrupted_message(PROG, Path(args.output_dir)), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
