"""One evaluation run: check everything, load once, then every pattern over every unit not yet done.

``full`` runs the model as loaded (its own attention, unpatched). Every other pattern is applied with
``hf_sparse.patch_model(model, pattern, backend=...)`` around its units and removed with
``unpatch_model`` afterwards, so one loaded model serves all patterns.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import passkey as pk
from .cost import CostMeter, dense_kv_heads, plan_density
from .data import (
    DataSpec,
    TokenizedCorpus,
    add_bos,
    check_dataset,
    check_out_outside_dataset,
    iter_documents,
    tokenize_documents,
)
from .errors import EvalError
from .models import load_model, load_tokenizer, max_positions, resolve_device, resolve_dtype, resolve_model
from .options import PatternChoice, RunOptions
from .perplexity import PplUnit, bucket_edges, bucket_sums, make_units, perplexity, token_nll
from .results import ResultStore, environment_info, fingerprint, unit_key

__all__ = ["run_eval", "RunStats", "TASKS"]

TASKS = ("perplexity", "passkey")


@dataclass
class RunStats:
    computed: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TASKS})
    resumed: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TASKS})
    failed: int = 0
    docs_used: int = 0
    docs_skipped_short: int = 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _patch_api() -> tuple[Callable, Callable]:
    try:
        patches = importlib.import_module("hf_sparse.patches")
        return patches.patch_model, patches.unpatch_model
    except (ImportError, AttributeError) as err:
        raise EvalError(f"sparse patterns need hf_sparse.patch_model, which is not available here ({err}); "
                        "run --patterns full only, or install the complete hf-sparse") from None


def check_backend_here(backend: str, device: torch.device) -> None:
    """``--backend`` must be able to run on ``device`` (e.g. ``triton`` needs Triton and CUDA): checked at the
    start, by ``patch_model``'s own check, so a run never computes the baseline and then fails."""
    try:
        check = importlib.import_module("hf_sparse.patches.model").check_backend_available
    except (ImportError, AttributeError) as err:
        raise EvalError(f"sparse patterns need hf_sparse.patches, which is not available here ({err}); "
                        "run --patterns full only, or install the complete hf-sparse") from None
    try:
        check(backend, device=device)
    except ValueError as err:
        raise EvalError(f"--backend {backend}: {err}") from None


@contextlib.contextmanager
def applied(model, choice: PatternChoice, backend: str) -> Iterator[None]:
    """The model with ``choice`` patched in for the duration of the block (``full``: untouched)."""
    if choice.is_baseline:
        yield
        return
    patch_model, unpatch_model = _patch_api()
    patch_model(model, choice.patch_target, backend=backend)
    try:
        yield
    finally:
        unpatch_model(model)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="unit", disable=not enabled, leave=False, dynamic_ncols=True)


class _Run:
    def __init__(self, opts: RunOptions, tasks: tuple[str, ...]) -> None:
        self.opts, self.tasks = opts, tasks
        self.stats = RunStats()

    # -- checks and loading: every error is raised here, before any unit runs -----------------------
    def prepare(self) -> None:
        o = self.opts
        o.check()
        self.device = resolve_device(o.device)
        self.dtype = resolve_dtype(o.dtype, self.device)
        if any(not c.is_baseline for c in o.patterns):
            _patch_api()
            check_backend_here(o.backend, self.device)
        self.source = resolve_model(o.model)
        self.data = DataSpec(o.dataset, o.dataset_config, o.dataset_split, o.text_column, o.join_rows)
        if "perplexity" in self.tasks:
            check_dataset(self.data)
            check_out_outside_dataset(self.data, o.out)
        self.tokenizer = load_tokenizer(self.source)
        self.prefix = add_bos(self.tokenizer)
        self.corpus: TokenizedCorpus | None = None
        if "perplexity" in self.tasks:
            self._prepare_corpus()
        if "passkey" in self.tasks:
            need = pk.min_prompt_length(self.tokenizer, self.prefix)
            if o.lengths[0] < need:
                raise EvalError(f"--context-lengths {o.lengths[0]} is too short for a passkey prompt "
                                f"(at least {need} tokens with this tokenizer)")
        self.store = ResultStore(o.out)
        self.hashes = self.settings()
        self.todo = {c.spec: (self._ppl_todo(c) if "perplexity" in self.tasks else {},
                              self._pk_todo(c) if "passkey" in self.tasks else {}) for c in o.patterns}
        self.nothing_to_do = not any(any(v.values()) for pair in self.todo.values() for v in pair)
        if self.nothing_to_do:
            _log(f"nothing to compute: every unit is already in {self.store.path}")
            return
        _log(f"loading {self.source.label} on {self.device} ({str(self.dtype).removeprefix('torch.')})")
        self.model = load_model(self.source, self.device, self.dtype)
        self.max_pos = max_positions(self.model.config)
        text_config = self.model.config.get_text_config()
        self.kv_heads = int(getattr(text_config, "num_key_value_heads", None)
                            or getattr(text_config, "num_attention_heads", 1))
        self.num_layers = int(text_config.num_hidden_layers)
        for length in o.lengths:
            if self.max_pos is not None and length > self.max_pos:
                warnings.warn(f"context length {length} is beyond the model's trained length "
                              f"(max_position_embeddings={self.max_pos}); full attention may break down there",
                              stacklevel=2)
        self._check_patchable()
        self.env = environment_info(self.device)
        torch.manual_seed(o.seed)

    def _check_patchable(self) -> None:
        """Patch and unpatch once per sparse pattern, so an unsupported model stops here, not mid-run."""
        sparse = [c for c in self.opts.patterns if not c.is_baseline]
        if not sparse:
            return
        patch_model, unpatch_model = _patch_api()
        for choice in sparse:
            try:
                patch_model(self.model, choice.patch_target, backend=self.opts.backend)
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
                raise EvalError(f"cannot apply {choice.label!r} to {self.source.label}: {err}") from err
            finally:
                if getattr(self.model.config, "hf_sparse", None) is not None:
                    unpatch_model(self.model)

    def _prepare_corpus(self) -> None:
        o = self.opts
        min_len = o.lengths[0]
        _log(f"reading {self.data.describe()}")
        corpus = tokenize_documents(iter_documents(self.data), self.tokenizer, min_len,
                                    max_docs=o.max_docs or None, prefix=len(self.prefix), progress=o.progress)
        if not corpus.docs:
            raise EvalError(f"dataset {self.data.describe()} has no usable document: {corpus.examined} read, "
                            f"{corpus.skipped_short} shorter than the shortest context length ({min_len} tokens)")
        if corpus.skipped_short:
            _log(f"skipped {corpus.skipped_short} document(s) shorter than {min_len} tokens")
        for length in o.lengths:
            n = corpus.count_at(length, len(self.prefix))
            if n == 0:
                _log(f"warning: no document reaches {length} tokens; that length gets no perplexity")
        self.corpus = corpus
        self.stats.docs_used = len(corpus.docs)
        self.stats.docs_skipped_short = corpus.skipped_short

    # -- settings that change the numbers (resume keys) -------------------------------------------
    def settings(self) -> dict[str, str]:
        o = self.opts
        common = {"model": self.source.label, "model_path": self.source.path, "gguf": self.source.gguf_file,
                  "dtype": str(self.dtype), "device_type": self.device.type, "backend": o.backend}
        ppl = {**common, "task": "perplexity", "data": self.data.identity(), "protocol": o.protocol,
               "buckets": o.position_buckets, "prefix": self.prefix}
        pks = {**common, "task": "passkey", "seed": o.seed, "new_tokens": pk.NEW_TOKENS, "prefix": self.prefix}
        return {"perplexity": fingerprint(ppl), "passkey": fingerprint(pks)}

    def base_record(self, task: str, choice: PatternChoice, length: int) -> dict[str, Any]:
        beyond = self.max_pos is not None and length > self.max_pos
        return {
            "task": task, "setting": self.hashes[task], "time": _now(),
            "model": self.source.label, "dataset": self.data.describe() if task == "perplexity" else None,
            "pattern": choice.label, "pattern_spec": choice.spec, "length": length,
            "density": plan_density(choice.patch_target, length, self.kv_heads),
            "dense_kv_heads": dense_kv_heads(choice.patch_target, self.num_layers, self.kv_heads),
            "kv_heads_total": self.num_layers * self.kv_heads,
            "backend": None if choice.is_baseline else self.opts.backend,
            "dtype": str(self.dtype).removeprefix("torch."), "device": self.env["device_name"],
            "max_position_embeddings": self.max_pos, "beyond_trained_length": beyond,
            "versions": {k: self.env[k] for k in ("python", "torch", "transformers", "triton", "hf_sparse")},
            "commit": self.env["commit"],
        }

    # -- the work ---------------------------------------------------------------------------------
    def execute(self) -> RunStats:
        o = self.opts
        if self.nothing_to_do:
            return self.stats
        self.store.append({
            "task": "run", "time": _now(), "tasks": list(self.tasks), "settings": self.hashes,
            "model": self.source.label, "dataset": self.data.describe() if self.corpus else None,
            "protocol": o.protocol, "patterns": [{"label": c.label, "spec": c.spec} for c in o.patterns],
            "lengths": o.lengths, "depths": o.depths, "trials": o.trials, "position_buckets": o.position_buckets,
            "dtype": str(self.dtype).removeprefix("torch."), "backend": o.backend,
            "max_position_embeddings": self.max_pos, "env": self.env,
            "docs": None if self.corpus is None else {
                "used": len(self.corpus.docs), "read": self.corpus.examined,
                "skipped_short": self.corpus.skipped_short,
                "per_length": {str(L): self.corpus.count_at(L, len(self.prefix)) for L in o.lengths}},
        })
        counts = {spec: sum(len(v) for part in pair for v in part.values()) for spec, pair in self.todo.items()}
        total, done, start = sum(counts.values()), 0, time.perf_counter()
        for i, choice in enumerate(o.patterns, 1):
            ppl_todo, pk_todo = self.todo[choice.spec]
            if not counts[choice.spec]:
                continue
            # one line per pattern: progress that a log file (CI, nohup) shows too, not only a terminal's bars
            _log(f"[{i}/{len(o.patterns)}] {choice.label}: {counts[choice.spec]} units "
                 f"({done}/{total} done, {time.perf_counter() - start:.0f} s)")
            done += counts[choice.spec]
            with applied(self.model, choice, o.backend):
                for length, units in ppl_todo.items():
                    self._run_ppl(choice, length, units)
                for length, items in pk_todo.items():
                    self._run_passkey(choice, length, items)
        return self.stats

    def _ppl_key(self, choice: PatternChoice, length: int, unit: PplUnit) -> str:
        return unit_key("perplexity", self.hashes["perplexity"], choice.spec, length, f"{unit.doc_id}#{unit.item}")

    def _ppl_todo(self, choice: PatternChoice) -> dict[int, list[PplUnit]]:
        todo = {}
        for length in self.opts.lengths:
            units = make_units(self.corpus.docs, length, protocol=self.opts.protocol, prefix=self.prefix,
                               max_windows=self.opts.max_windows or None)
            left = [u for u in units if not self.store.has(self._ppl_key(choice, length, u))]
            self.stats.resumed["perplexity"] += len(units) - len(left)
            todo[length] = left
        return todo

    def _run_ppl(self, choice: PatternChoice, length: int, units: list[PplUnit]) -> None:
        if not units:
            return
        o, edges = self.opts, bucket_edges(length, self.opts.position_buckets)
        batches = [units[i:i + o.batch_size] for i in range(0, len(units), o.batch_size)]
        if self.device.type == "cuda":  # compile / autotune outside the timed region
            token_nll(self.model, torch.tensor([batches[0][0].ids], device=self.device))
        bar = _bar(len(units), f"perplexity {choice.label} L={length}", o.progress)
        for batch in batches:
            ids = torch.tensor([u.ids for u in batch], device=self.device)
            try:
                with CostMeter(self.device) as meter:
                    nll = token_nll(self.model, ids)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                self.stats.failed += len(batch)
                _log(f"out of memory: {choice.label} at L={length} (batch {len(batch)}); try --batch-size 1")
                break
            nll = nll.cpu()
            for unit, row in zip(batch, nll):
                sums, counts = bucket_sums(row, edges)
                total, tokens = float(row.double().sum()), int(row.numel())
                self.store.append({
                    **self.base_record("perplexity", choice, length),
                    "key": self._ppl_key(choice, length, unit), "doc": unit.doc_id, "item": unit.item,
                    "protocol": o.protocol, "tokens": tokens, "nll_sum": total, "ppl": perplexity(total, tokens),
                    "bucket_edges": edges, "bucket_nll": sums, "bucket_tokens": counts,
                    "batch_size": len(batch), "seconds": meter.seconds / len(batch),
                    "tokens_per_s": len(batch) * length / meter.seconds if meter.seconds > 0 else None,
                    "peak_mem_bytes": meter.peak_mem_bytes, "rss_max_bytes": meter.rss_max_bytes,
                })
                self.stats.computed["perplexity"] += 1
            bar.update(len(batch))
        bar.close()

    def _pk_key(self, choice: PatternChoice, length: int, depth: float, trial: int) -> str:
        return unit_key("passkey", self.hashes["passkey"], choice.spec, length, f"d{depth:.4f}#t{trial}")

    def _pk_todo(self, choice: PatternChoice) -> dict[int, list[tuple[float, int]]]:
        todo = {}
        for length in self.opts.lengths:
            items = [(d, t) for d in self.opts.depths for t in range(self.opts.trials)]
            left = [(d, t) for d, t in items if not self.store.has(self._pk_key(choice, length, d, t))]
            self.stats.resumed["passkey"] += len(items) - len(left)
            todo[length] = left
        return todo

    def _run_passkey(self, choice: PatternChoice, length: int, items: list[tuple[float, int]]) -> None:
        if not items:
            return
        bar = _bar(len(items), f"passkey {choice.label} L={length}", self.opts.progress)
        for depth, trial in items:
            key = pk.make_passkey(self.opts.seed, length, depth, trial)
            prompt = pk.build_prompt(self.tokenizer, length, depth, key, self.prefix)
            try:
                with CostMeter(self.device) as meter:
                    text, cache = pk.generate_with_cache(self.model, self.tokenizer, prompt.ids, self.device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                self.stats.failed += 1
                _log(f"out of memory: passkey {choice.label} at L={length}")
                break
            answer = pk.read_answer(text)
            self.store.append({
                **self.base_record("passkey", choice, length),
                "key": self._pk_key(choice, length, depth, trial), "depth": depth, "trial": trial,
                "passkey": key, "prompt_tokens": len(prompt.ids), "key_position": prompt.key_position,
                "generated": text, "answer": answer, "correct": answer == key, "cache_bytes": _cache_bytes(cache),
                "seconds": meter.seconds, "tokens_per_s": len(prompt.ids) / meter.seconds if meter.seconds > 0 else None,
                "peak_mem_bytes": meter.peak_mem_bytes, "rss_max_bytes": meter.rss_max_bytes,
            })
            self.stats.computed["passkey"] += 1
            bar.update(1)
        bar.close()


def _cache_bytes(cache) -> int | None:
    """Bytes of the KV cache that ``generate`` kept (``hf_sparse.patches.cache.cache_bytes``), None without one."""
    if cache is None:
        return None
    from hf_sparse.patches.cache import cache_bytes

    return cache_bytes(cache)


def run_eval(opts: RunOptions, tasks: tuple[str, ...] = TASKS) -> RunStats:
    """Check, load, evaluate; results go to ``opts.out/results.jsonl`` unit by unit."""
    start = time.perf_counter()
    run = _Run(opts, tasks)
    run.prepare()
    stats = run.execute()
    done = ", ".join(f"{t}: {stats.computed[t]} computed, {stats.resumed[t]} already done" for t in tasks)
    _log(f"{done}" + (f"; {stats.failed} failed" if stats.failed else "") + f" ({time.perf_counter() - start:.0f} s)")
    return stats
