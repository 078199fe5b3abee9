"""Fine-tune SmolLM2-135M with a 1024-token sliding window in place, from Python, with a tracker of your own.

The training run is ``hf-sparse-finetune`` (``hf_sparse.eval.finetune``); this script calls it as a library
with default options and an ``accelerate`` tracker that prints the loss. Anything on the command line is
added to the options (a later option wins)::

    python examples/finetune.py --dataset book1.txt --eval-dataset book2.txt --output-dir runs/sw1024
    accelerate launch --num_processes 2 examples/finetune.py --dataset book1.txt --output-dir runs/sw1024-ddp

See docs/finetune.md for the options, the output folder and ``--resume``.
"""

from __future__ import annotations

import sys

from accelerate.tracking import GeneralTracker
from hf_sparse.eval.finetune import main

OPTIONS = ["--model", "smollm2-135m", "--pattern", "sliding_window:window=1024", "--seq-len", "8192",
           "--gradient-checkpointing", "--max-steps", "200", "--output-dir", "runs/smollm2-sw1024"]


class PrintLoss(GeneralTracker):
    """Prints the loss and learning rate of every optimizer step (main process only, as every tracker)."""

    name = "print_loss"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, float]] = []

    @property
    def tracker(self):
        return self.rows

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.rows.append((step, values["loss"]))
        print(f"step {step}: loss {values['loss']:.4f}, lr {values['lr']:.3g}", flush=True)


def run(argv: list[str]) -> int:
    return main([*OPTIONS, *argv], trackers=[PrintLoss()])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
