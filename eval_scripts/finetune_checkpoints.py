"""Checkpoints of ``hf-sparse-finetune``: ``OUT/checkpoints/step_N/``, what a resume must match, the metrics log.

A checkpoint is ``accelerator.save_state`` (model, optimizer, RNG states; sharded under FSDP) plus
``trainer_state.json`` (the step, the data position, the options that define a step), written last: a
folder without it is incomplete and ignored. The learning rate is a function of the step
(:func:`hf_sparse.eval.finetune.learning_rate_at`), so no scheduler state is kept.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import FinetuneError
from .results import read_results

__all__ = ["CHECKPOINTS", "STATE_FILE", "RESUME_KEYS", "list_checkpoints", "run_identity", "check_resume",
           "write_state", "mark_finished", "truncate_metrics"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# Options that fix what a step means (its data, its learning rate, its model): a resumed run must match them.
# --max-steps is not one of them: a larger value extends the run (the data order continues; a cosine schedule
# follows the new length from the step it resumes at).
RESUME_KEYS = ("model", "pattern", "backend", "dataset", "dataset_config", "dataset_split", "text_column",
               "join_rows", "max_docs", "eval_dataset", "eval_fraction", "seq_len", "batch_size",
               "grad_accum", "learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "seed", "lora",
               "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "mixed_precision", "num_processes")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def check_resume(saved: dict[str, Any], now_: dict[str, Any], where: Path) -> None:
    diff = [f"{k}: {saved.get(k)!r} -> {now_.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now_.get(k)]
    if diff:
        raise FinetuneError(f"--resume from {where}: the options differ from the run being resumed "
                            f"({'; '.join(diff)}); resume with the same options, or start a new --output-dir")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def write_state(out: Path, step: int, elapsed: float, global_batch: int, identity: dict[str, Any],
                keep: int) -> None:
    """Main process, after ``accelerator.save_state`` into ``step_N``: the state file that completes it, then
    the rotation to the newest ``keep`` checkpoints."""
    ckpt = out / CHECKPOINTS / f"step_{step}"
    _write_json(ckpt / STATE_FILE, {"step": step, "elapsed_s": elapsed, "time": now(), "finished": False,
                                    "data": {"next_sample": step * global_batch, "global_batch": global_batch},
                                    "run": identity})
    if keep:
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def mark_finished(ckpt: Path) -> None:
    """The run that ended at this checkpoint has its final model and evaluation: a resume with the same
    ``--max-steps`` has nothing left to do."""
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    _write_json(ckpt / STATE_FILE, state | {"finished": True, "finished_time": now()})


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows past the checkpoint: steps done after it are done again, and logged once."""
    rows = [r for r in read_results(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def interrupted_message(prog: str, out: Path) -> str:
    """What Ctrl-C leaves and how to go on, in one line."""
    found = list_checkpoints(out)
    if found:
        return (f"{prog}: interrupted; the last checkpoint is {found[-1][1]} (step {found[-1][0]}): run the same "
                "command with --resume to continue from it")
    return f"{prog}: interrupted before the first checkpoint (--save-every); run the same command again to start over"
