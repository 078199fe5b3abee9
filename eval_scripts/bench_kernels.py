"""Kernel benchmark: hf_sparse's Triton kernels against SDPA (dense causal) and FlexAttention.

    hf-sparse-eval bench-kernels [--shapes 32/8/128,9/3/64] [--seq-lens 8192,32768,65536]
                                 [--fwd-only-seq-lens 131072] [--out results/kernels.jsonl]
    python -m hf_sparse.eval.bench_kernels ...

For each head shape, length and pattern it times, in one process: our kernels, FlexAttention
compiled with the same pattern as a ``BlockMask`` (built from :func:`hf_sparse.block_layout`, so the
same tiles are full or partial), and ``F.scaled_dot_product_attention`` with ``is_causal=True``
(cuDNN/flash, the dense baseline). Forward and forward+backward. FLOPs count only attended pairs:
``4 * D * Hq * pairs`` forward and 2.5x that backward. Each measured row is appended to the JSONL
file with the GPU, versions and commit; a table is printed at the end. Outputs of ours and Flex are
compared on every measured configuration (a wrong fast kernel is not a result).

``--left-pad N`` (ours only) marks the first ``N`` slots of the row as padding (a ``key_padding_mask``),
the path a padded batch takes; compare it with an unpadded run of ``T - N`` tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_sparse import Pattern, block_layout, block_mask, parse_pattern, sparse_attention
from hf_sparse.kernels.plan import kernel_plan
from hf_sparse.layout import random_block_size
from hf_sparse.patterns.base import declares_cap, split_outside_brackets
from hf_sparse.primitives import DENSE_WINDOW

DEFAULT_PATTERNS = "sliding_window:window=4096;longformer:window=4096,global_tokens=4;bigbird;dense"


def _env() -> dict[str, Any]:
    from .results import environment_info

    return environment_info(torch.device("cuda"))  # commit: HF_SPARSE_COMMIT on a copy without .git


def _bench(fn, *, grad_to_none=None) -> tuple[float, float, float]:
    if not torch.cuda.is_available():  # a CPU smoke run: wall clock over a few calls
        times = []
        for _ in range(5):
            for x in grad_to_none or ():
                x.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        ts = torch.tensor(times)
        return tuple(float(ts.quantile(p)) for p in (0.5, 0.2, 0.8))
    import triton

    q = triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(x) for x in q)  # median, p20, p80 in ms


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb(fn) -> float | None:
    """Memory that one call of ``fn`` holds at its peak above what was allocated before (GB; None on the CPU)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure_pass(fn, q, k, v, do, ps: str):
    """Time one pass of ``fn(q, k, v)``: ``"fwd"`` (no grad) or ``"fwd_bwd"`` (forward and ``backward(do)``).

    Returns ``(median ms, p20 ms, p80 ms, peak GB, forward output or None)``; the first call compiles."""
    if ps == "fwd":
        with torch.no_grad():
            o = fn(q, k, v)
            _sync()
            peak = _peak_gb(lambda: fn(q, k, v))
            med, p20, p80 = _bench(lambda: fn(q, k, v))
        return med, p20, p80, peak, o
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def step():
        fn(qg, kg, vg).backward(do)

    step()
    _sync()
    peak = _peak_gb(step)
    med, p20, p80 = _bench(step, grad_to_none=[qg, kg, vg])
    return med, p20, p80, peak, None


def provenance(env: dict[str, Any], command: str) -> dict[str, Any]:
    """The fields every benchmark row carries: card, versions, commit, command and time."""
    return dict(gpu=env["device_name"], torch=env["torch"], triton=env["triton"], commit=env["commit"],
                command=command, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSONL row, written at once (a run cut short keeps the rows it finished)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _is_dense(pattern: Pattern) -> bool:
    prims = pattern.primitives()
    return prims is not None and prims.window >= DENSE_WINDOW


def _tile(pattern: Pattern) -> int:
    return random_block_size(pattern) or 128


def pattern_layout(pattern: Pattern, t: int, hkv: int, device):
    """``(layout or None, attended pairs per query head)``; dense attention skips the O(T^2) layout walk."""
    if _is_dense(pattern):
        pairs = t * (t + 1) // 2 if pattern.causal else t * t
        return None, pairs
    tile = _tile(pattern)
    heads = hkv if pattern.per_head or random_block_size(pattern) else 1
    lay = block_layout(pattern, t, t, block_m=tile, block_n=tile, kv_heads=heads, device=device)
    return lay, int(lay.pairs.sum()) // heads


def flex_block_mask(pattern: Pattern, lay, t: int, hq: int, hkv: int, device) -> Any:
    """A FlexAttention ``BlockMask`` of the pattern (:func:`hf_sparse.block_mask`, with our tiles)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if lay is None:  # dense causal
        return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, t, t, device=device)
    return block_mask(pattern, t, t, heads=hq, kv_heads=hkv, block_size=lay.block_m, device=device)


def flex_options(lay) -> dict | None:
    """Flex's own tiles, except where its defaults (128-row tiles) cannot divide a 64-token sparse
    block: then 64-row tiles on 4 warps (one warpgroup per 64 rows, the shape that runs best on Hopper)."""
    if lay is None or lay.block_m >= 128:
        return None
    b_ = lay.block_m
    return dict(BLOCK_M=b_, BLOCK_N=b_, BLOCK_M1=b_, BLOCK_N1=b_, BLOCK_M2=b_, BLOCK_N2=b_, num_warps=4,
                num_stages=2)


@contextlib.contextmanager
def flex_backward_tiles(block: int | None):
    """Give Flex's backward one config whose tiles divide a sparse block smaller than 128.

    Inductor filters its backward configs against the sparse block size *before* it applies
    ``kernel_options``; on sm90 its default (64, 128, 128, 64) does not divide 64-token blocks, so the
    compile ends in ``NoValidChoicesError``. For such blocks we hand it (block,)*4 tiles, 3 stages and
    4 warps: its own sm90 choice for small head dims."""
    if block is None or block >= 128:
        yield
        return
    from torch._inductor.choices import InductorChoices
    from torch._inductor.template_heuristics.triton import FlexBwDConfig

    original = InductorChoices.get_flex_attention_bwd_configs
    InductorChoices.get_flex_attention_bwd_configs = lambda self, *a, **kw: [FlexBwDConfig(block, block, block,
                                                                                         block, 3, 4)]
    try:
        yield
    finally:
        InductorChoices.get_flex_attention_bwd_configs = original


def sweep(args, dev, shape: tuple[int, int, int]) -> dict[str, str]:
    """Time fwd / fwd+bwd for candidate tile configs on one head shape; keep the fastest per (kernel,
    kind) as the override for the runs of that shape."""
    from hf_sparse.kernels import configs

    chosen: dict[str, str] = {}
    t = args.sweep_seq_len
    for hq, hkv, d in [shape]:
        q = torch.randn(1, hq, t, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, t, d, device=dev, dtype=torch.bfloat16)
        do = torch.randn_like(q)
        for spec in split_outside_brackets(args.sweep_patterns, ";"):
            pat = parse_pattern(spec)
            plan = kernel_plan(pat, hkv)
            kind = plan.config_kind
            for item in args.sweep.split(";"):
                kernel = item.partition("=")[0].partition("@")[0]
                cands = [configs.parse_override(f"{kernel}={c}")[2] for c in item.partition("=")[2].split("|")]
                best = None
                for cfg in cands:
                    if kind == 1 and (cfg.block_m > plan.blk or cfg.block_n > plan.blk):
                        continue
                    configs.override(kernel, cfg, kind=kind)
                    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                    try:
                        if kernel == "fwd":
                            with torch.no_grad():
                                ms = _bench(lambda: sparse_attention(q, k, v, pat, backend="triton"))[0]  # noqa: B023
                        else:
                            ms = _bench(lambda: sparse_attention(qg, kg, vg, pat, backend="triton").backward(do),  # noqa: B023
                                        grad_to_none=[qg, kg, vg])[0]
                    except Exception as err_:
                        print(f"sweep {kernel} {cfg} failed: {type(err_).__name__}", flush=True)
                        continue
                    print(f"sweep {hq}/{hkv}/{d} {spec} T={t} {kernel} {cfg}: {ms:.3f} ms", flush=True)
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is not None:
                    configs.override(kernel, best[1], kind=kind)
                    c = best[1]
                    chosen[f"{kernel}@{kind}"] = f"{c.block_m},{c.block_n},{c.num_warps},{c.num_stages},{int(c.tma)},{int(c.pack)},{c.maxnreg}"
        q = k = v = do = None
        torch.cuda.empty_cache()
    return chosen


def run(args) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        raise SystemExit("bench-kernels needs a CUDA GPU")
    from hf_sparse.kernels import configs

    configs.apply_overrides(args.config)
    configs.set_tma({"auto": None, "on": True, "off": False}[args.tma])
    configs.set_pack({"auto": None, "on": True, "off": False}[args.pack])
    configs.set_split_backward({"auto": None, "on": True, "off": False}[args.split_backward])
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 256
    flex = torch.compile(flex_attention)
    dev = torch.device("cuda")
    env = _env()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    patterns = [parse_pattern(p) for p in split_outside_brackets(args.patterns, ";")]
    shapes = [tuple(int(x) for x in s.split("/")) for s in args.shapes.split(",")]
    lens = [int(x) for x in args.seq_lens.split(",") if x]
    fwd_only = [int(x) for x in args.fwd_only_seq_lens.split(",") if x]
    impls = args.impls.split(",")
    if args.left_pad and impls != ["hf_sparse"]:
        raise SystemExit(f"--left-pad {args.left_pad} times our kernels only (the others would attend the padding "
                         "slots); add --impls hf_sparse")
    flex_lens = {int(x) for x in args.flex_seq_lens.split(",") if x} if args.flex_seq_lens else None
    rows: list[dict[str, Any]] = []
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = "hf-sparse-eval bench-kernels " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    t_start = time.monotonic()
    order = list(dict.fromkeys(lens + fwd_only))  # the order given: put the lengths that matter first
    for hq, hkv, d in shapes:
        sweep_here = args.sweep and (not args.sweep_shapes or f"{hq}/{hkv}/{d}" in args.sweep_shapes.split(","))
        chosen = sweep(args, dev, (hq, hkv, d)) if sweep_here else {}
        if chosen:
            print(f"configs for {hq}/{hkv}/{d}: {chosen}", flush=True)
        for t in order:
            passes = ["fwd"] if t in fwd_only and t not in lens else ["fwd", "fwd_bwd"]
            passes = [p for p in passes if p in args.passes.split(",")]
            gen = torch.Generator(device=dev).manual_seed(t)
            q = torch.randn(1, hq, t, d, device=dev, dtype=dtype, generator=gen)
            k = torch.randn(1, hkv, t, d, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(1, hkv, t, d, device=dev, dtype=dtype, generator=gen)
            do = torch.randn(1, hq, t, d, device=dev, dtype=dtype, generator=gen)
            if not 0 <= args.left_pad < t:
                raise SystemExit(f"--left-pad {args.left_pad} must be below the sequence length {t}")
            # padding: the first --left-pad key slots (and query rows) of the row are not tokens
            kpm = None
            if args.left_pad:
                kpm = torch.ones(1, t, dtype=torch.bool, device=dev)
                kpm[:, :args.left_pad] = False
            real = t - args.left_pad
            dense_pairs = real * (real + 1) // 2
            cases: list[tuple[str, Pattern | None]] = []
            if "sdpa" in impls:
                cases.append(("sdpa", None))
            for pat in patterns:
                for impl in ("hf_sparse", "flex"):
                    if impl in impls and not (impl == "flex" and flex_lens is not None and t not in flex_lens):
                        cases.append((impl, pat))
            ref_out: dict[str, torch.Tensor] = {}
            layouts: dict[str, Any] = {}
            for impl, pat in cases:
                opts = None
                if args.deadline_s and time.monotonic() - t_start > args.deadline_s and impl == "flex":
                    print(f"deadline: flex {pat.spec()} T={t} {hq}/{hkv}/{d} not run", flush=True)
                    continue
                if impl == "sdpa":
                    fn = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)
                    pairs = dense_pairs
                    spec = "dense_causal"
                else:
                    spec = pat.spec()
                    if spec not in layouts:
                        layouts[spec] = pattern_layout(pat, real, hkv, dev)
                    lay, pairs = layouts[spec]
                    if impl == "hf_sparse":
                        # a capped pattern (max_distance=N) runs its two passes; q_cap = q costs the same as a
                        # rotated copy and keeps the output equal to the uncapped one, which Flex checks
                        fn = lambda q_, k_, v_, p=pat, m=kpm: sparse_attention(  # noqa: E731
                            q_, k_, v_, p, backend="triton", q_cap=q_ if declares_cap(p) else None,
                            key_padding_mask=m)
                    else:
                        bm = flex_block_mask(pat, lay, t, hq, hkv, dev)
                        opts = flex_options(lay)
                        fn = lambda q_, k_, v_, bm=bm, o=opts: flex(  # noqa: E731
                            q_, k_, v_, block_mask=bm, enable_gqa=True, kernel_options=o)
                flex_block = lay.block_m if impl == "flex" and lay is not None else None
                with flex_backward_tiles(flex_block):  # Flex compiles its backward inside
                    for ps in passes:
                        torch.cuda.synchronize()
                        try:
                            med, p20, p80, peak, o = measure_pass(fn, q, k, v, do, ps)
                            err = None
                            if o is not None and impl != "sdpa":
                                ref_out.setdefault(spec, o.float())
                                err = float((o.float() - ref_out[spec]).abs().max())
                            o = None
                            flops = (1 if ps == "fwd" else 3.5) * 4 * d * hq * pairs
                        except Exception as err_:  # one failing case (OOM, a compile error) must not end the run
                            print(f"FAILED: {impl} {spec} T={t} {hq}/{hkv}/{d} {ps}: {type(err_).__name__}: "
                                  f"{str(err_).splitlines()[0][:300] if str(err_) else ''}", flush=True)
                            torch.cuda.empty_cache()
                            continue
                        row = dict(
                            impl=impl, pattern=spec, **{"pass": ps}, seq_len=t, head_dim=d, q_heads=hq, kv_heads=hkv,
                            tma=args.tma if impl == "hf_sparse" else None,
                            pack=args.pack if impl == "hf_sparse" else None,
                            split_backward=args.split_backward if impl == "hf_sparse" else None,
                            left_pad=args.left_pad,
                            flex_kernel_options=opts if impl == "flex" else None,
                            batch=1, dtype=args.dtype, median_ms=med, p20_ms=p20, p80_ms=p80,
                            tflops=flops / (med * 1e-3) / 1e12, attended_pairs=pairs, density=pairs / dense_pairs,
                            peak_mem_gb=peak, max_abs_diff_vs_first_impl=err,
                            tile_configs=chosen or None, **provenance(env, command),
                        )
                        rows.append(row)
                        append_row(out_path, row)
                        print(f"{impl:>9} {spec[:40]:<40} T={t:>6} {hq}/{hkv}/{d} {ps:<7} {med:8.3f} ms "
                              f"{row['tflops']:6.1f} TF/s mem {peak:6.2f} GB"
                              + (f" diff {err:.2e}" if err is not None else ""), flush=True)
            q = k = v = do = None  # free before the next length
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: ours vs Flex vs SDPA per (shape, length, pattern, pass)."""
    idx = {(r["impl"], r["pattern"], r["pass"], r["seq_len"], r["q_heads"], r["kv_heads"], r["head_dim"]): r
           for r in rows}
    lines = ["| heads q/kv/D | T | pattern | pass | ours ms | ours TF/s | flex ms | vs flex | sdpa ms | vs sdpa "
             "| ours peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] != "hf_sparse":
            continue
        key = (r["pattern"], r["pass"], r["seq_len"], r["q_heads"], r["kv_heads"], r["head_dim"])
        fx = idx.get(("flex", *key))
        sd = idx.get(("sdpa", "dense_causal", *key[1:]))
        lines.append(
            f"| {r['q_heads']}/{r['kv_heads']}/{r['head_dim']} | {r['seq_len']} | {r['pattern']} | {r['pass']} | "
            f"{r['median_ms']:.3f} | {r['tflops']:.0f} | {fx['median_ms'] if fx else float('nan'):.3f} | "
            f"{(fx['median_ms'] / r['median_ms']) if fx else float('nan'):.2f}x | "
            f"{sd['median_ms'] if sd else float('nan'):.3f} | "
            f"{(sd['median_ms'] / r['median_ms']) if sd else float('nan'):.2f}x | {r['peak_mem_gb']:.2f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-sparse-eval bench-kernels", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="32/8/128,9/3/64", help="q_heads/kv_heads/head_dim list [%(default)s]")
    p.add_argument("--seq-lens", default="65536,32768,8192",
                   help="forward and forward+backward, run in this order [%(default)s]")
    p.add_argument("--fwd-only-seq-lens", default="131072", help="forward only [%(default)s]")
    p.add_argument("--flex-seq-lens", default="", help="time FlexAttention only at these lengths (default: all)")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help="';'-separated pattern strings [%(default)s]")
    p.add_argument("--impls", default="hf_sparse,flex,sdpa", help="[%(default)s]")
    p.add_argument("--passes", default="fwd,fwd_bwd", help="[%(default)s]")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--out", default="results/kernels.jsonl", help="rows are appended here [%(default)s]")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--config", action="append", default=[],
                   help="tile config override, e.g. dkdv=64,128,8,2 or dkdv@1=32,64,4,2 (BigBird only); repeatable")
    p.add_argument("--tma", default="auto", choices=["auto", "on", "off"],
                   help="our K/V tiles through tensor descriptors (Hopper TMA) [%(default)s]")
    p.add_argument("--pack", default="auto", choices=["auto", "on", "off"],
                   help="forward/dQ tiles hold a GQA group's query heads (on) or one head (off) [%(default)s]")
    p.add_argument("--left-pad", type=int, default=0,
                   help="ours only: the first N slots of the row are padding (a key_padding_mask); compare with "
                        "an unpadded run of T - N [%(default)s]")
    p.add_argument("--split-backward", default="auto", choices=["auto", "on", "off"],
                   help="a per-head plan's backward: one launch per group of heads with the same rules (on, auto) "
                        "or one launch for all heads (off) [%(default)s]")
    p.add_argument("--sweep", default="", help="candidates per kernel before the run, e.g. "
                   "'dq=64,64,4,3|128,64,8,2;dkdv=32,64,8,2|64,128,8,2' (timed at --sweep-seq-len)")
    p.add_argument("--sweep-seq-len", type=int, default=65536)
    p.add_argument("--sweep-shapes", default="", help="sweep only these q/kv/D shapes (default: all)")
    p.add_argument("--sweep-patterns", default="sliding_window:window=4096;bigbird")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="after this many seconds, skip the remaining FlexAttention runs (compiles are slow) [off]")
    return p


def run_and_show(parser: argparse.ArgumentParser, run_fn, table_fn, argv: list[str] | None) -> int:
    """A benchmark command: parse ``argv``, run, print the table (and write it to ``--markdown``)."""
    args = parser.parse_args(argv)
    args.argv = argv
    from .results import show_table

    show_table(table_fn(run_fn(args)), args.markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_and_show(build_parser(), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
