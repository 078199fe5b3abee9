"""Hopper prefill benchmark: our Triton kernels beside FA4's block-sparse kernels, FlexAttention and SDPA.

    python -m hf_sparse.eval.bench_hopper [--shapes 32/8/128,9/3/64] [--lengths 65536,8192,...]
                                          [--patterns 'sliding_window:window=4096;bigbird:block=128']
                                          [--deadline-s 420] [--out results/hopper.jsonl]

For each head shape, length and pattern (bf16, B=1) it times, forward and forward+backward:

``hf_sparse``   :func:`hf_sparse.sparse_attention` (``--backend``, Triton by default).
``flex``        ``torch.compile(flex_attention)`` with :func:`hf_sparse.block_mask` (the tiles our layout
                marks full or partial), Flex's default (Triton) backend.
``flex_flash``  the same block tables through Flex's ``kernel_options={"BACKEND": "FLASH"}`` (FA4 CuTe
                kernels, where this torch offers the option); its ``mask_mod`` is the pattern's rules as
                constants, the same arithmetic ``fa4`` runs.
``fa4``         ``flash_attn.cute.flash_attn_func`` (flash-attn-4) with ``BlockSparseTensorsTorch`` built
                from the same block tables, and a CuTe ``mask_mod`` for the partial tiles
                (:func:`rules_visible`). With the dense causal row it is FA4's own dense kernel.
``sdpa``        ``F.scaled_dot_product_attention(is_causal=True)``: the dense efficiency baseline.

FLOPs count attended pairs only: ``4 * D * Hq * pairs`` forward, 3.5x that forward+backward. Every
variant runs in its own ``try`` under a time limit, so one that does not compile or run on this card
becomes a row whose ``status`` holds the exception; rows that would start after ``--deadline-s`` are
written as skipped. Outputs and gradients of every variant are compared with ours (SDPA's for the dense
rows) at the measured length, so a fast wrong kernel shows as ``MISMATCH``. Rows go to the JSONL file
with the card, versions, command and commit; a markdown table is printed (and written with --markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_sparse import Pattern, block_mask, parse_pattern, sparse_attention
from hf_sparse.layout import random_block_size
from hf_sparse.patterns.base import declares_cap, split_outside_brackets

from .bench_kernels import (
    append_row,
    flex_backward_tiles,
    flex_options,
    measure_pass,
    pattern_layout,
    provenance,
    run_and_show,
)

DEFAULT_PATTERNS = ("sliding_window:window=4096;longformer:window=4096,global_tokens=64;"
                    "bigbird:block=128,random_blocks=3;strided:stride=256,window=256;"
                    "sliding_window:window=2048|strided:stride=2048")
IMPLS = ("sdpa", "fa4", "hf_sparse", "flex", "flex_flash")
#: the variants of the dense causal rows and of the pattern rows, the reference (that the others match) first
DENSE_IMPLS = ("sdpa", "fa4")
PATTERN_IMPLS = ("hf_sparse", "fa4", "flex", "flex_flash")
#: relative max error (max |x - ref| / max |ref|) above which a variant's output or gradient is a mismatch
MISMATCH = 5e-2
TILE = 128


# -- the pattern's rules as plain arithmetic (FA4's and Flex FLASH's mask_mod) ------------------------------
def rule_constants(pattern: Pattern) -> tuple[int, ...]:
    """``(window, global_tokens, block, window_blocks, stride, column_period, column_count)`` of a causal
    pattern whose rules are the same for every head and whose extra blocks (BigBird's random blocks) lie in
    full tiles only; raises ``NotImplementedError`` naming what does not fit otherwise. A distance cap is
    left out: the benchmark runs ours with ``q_cap = q``, which scores like the uncapped pattern."""
    prims = pattern.primitives()
    if prims is None or pattern.per_head:
        raise NotImplementedError(f"{pattern.spec()}: the FA4 mask_mod here takes one rule set for all heads")
    if not prims.causal:
        raise NotImplementedError(f"{pattern.spec()}: the FA4 mask_mod here covers causal patterns only")
    if prims.random_blocks and not (prims.random_disjoint and random_block_size(pattern) == TILE):
        raise NotImplementedError(f"{pattern.spec()}: extra blocks must be disjoint from the rules and "
                                  f"{TILE} tokens wide, so that they only fill full tiles")
    return (prims.window, prims.global_tokens, max(prims.block, 1), prims.window_blocks, prims.stride,
            max(prims.column_period, 1), prims.column_count)


def rules_visible(m, n, const, rules: tuple[int, ...]):
    """Whether query ``m`` sees key ``n`` under the rules (causal; :func:`hf_sparse.primitives.rule_mask`
    in operators only, no branches), for torch tensors (``const=torch.tensor`` or ``int``) and for CuTe
    DSL values alike (``const`` makes an Int32 SSA value)."""
    window, glob, block, window_blocks, stride, period, count = rules
    vis = (n > m - const(window)) | (n < const(glob)) | (n // const(block) > m // const(block) - const(window_blocks))
    vis = vis | ((((m - n) % const(max(stride, 1))) == const(0)) & (const(int(stride > 0)) > const(0)))
    vis = vis | (n % const(period) >= const(period - count))
    return vis & (n <= m)


def flex_rules_mask_mod(rules: tuple[int, ...]):
    """A Flex ``mask_mod`` of constants only (what the FLASH backend compiles to CuTe best)."""
    def mask(b, h, q_idx, kv_idx):
        return rules_visible(q_idx, kv_idx, int, rules)

    return mask


def fa4_mask_mod(rules: tuple[int, ...]):
    """FA4's CuTe ``mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)`` of the rules."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    def const(x):
        return utils.scalar_to_ssa(x, cutlass.Int32)

    @cute.jit
    def mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        return rules_visible(m_idx, n_idx, const, rules)

    return mask


# -- the variants -------------------------------------------------------------------------------------------
def fa4_sparse_tensors(bm) -> tuple[Any, Any]:
    """FA4's forward and backward ``BlockSparseTensorsTorch`` from a Flex ``BlockMask`` (the same format:
    per query tile the partial and the full key tiles; the backward takes the transposed lists)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    size = tuple(bm.BLOCK_SIZE)
    fwd = BlockSparseTensorsTorch(mask_block_cnt=bm.kv_num_blocks, mask_block_idx=bm.kv_indices,
                                  full_block_cnt=bm.full_kv_num_blocks, full_block_idx=bm.full_kv_indices,
                                  block_size=size)
    bwd = BlockSparseTensorsTorch(mask_block_cnt=bm.q_num_blocks, mask_block_idx=bm.q_indices,
                                  full_block_cnt=bm.full_q_num_blocks, full_block_idx=bm.full_q_indices,
                                  block_size=size)
    return fwd, bwd


def fa4_fn(pattern: Pattern | None, bm):
    """``fn(q, k, v)`` on ``[B, H, T, D]`` through FA4 (``[B, T, H, D]`` views, no copies)."""
    from flash_attn.cute import flash_attn_func

    if pattern is None:
        kw: dict[str, Any] = dict(causal=True)
    else:
        fwd, bwd = fa4_sparse_tensors(bm)
        kw = dict(causal=False, mask_mod=fa4_mask_mod(rule_constants(pattern)), block_sparse_tensors=fwd,
                  block_sparse_tensors_bwd=bwd)

    def fn(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return fn


def flash_backend_offered() -> str | None:
    """``None`` when this torch's FlexAttention offers ``BACKEND="FLASH"``, else why not."""
    import importlib.util
    import typing

    from torch.nn.attention import flex_attention as fa

    if "FLASH" not in typing.get_args(getattr(fa, "_Backend", None) or ()):
        return f"not offered: torch {torch.__version__} has no FlexAttention BACKEND='FLASH'"
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        return "not available: BACKEND='FLASH' needs flash-attn-4 (flash_attn.cute)"
    return None


def fa4_missing() -> str | None:
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA/cutlass error raised at import
        return f"not available: from flash_attn.cute import flash_attn_func: {_describe(err)}"
    return None


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (0: no limit). A long call into C (a
    kernel compile) is interrupted when it returns to Python: a guard, not a hard kill."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise TimeoutError(f"ran past its limit of {seconds:.0f} s (--variant-timeout-s or --deadline-s)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((got[name].float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6))
            for name, r in ref.items() if name in got}


def _outputs(fn, q, k, v, do, with_grads: bool) -> dict[str, torch.Tensor]:
    if not with_grads:
        with torch.no_grad():
            return {"out": fn(q, k, v)}
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(qg, kg, vg)
    out.backward(do)
    return {"out": out.detach(), "dq": qg.grad, "dk": kg.grad, "dv": vg.grad}


def _unavailable(impl: str, dev: torch.device) -> str | None:
    """Why ``impl`` cannot run in this process, or None."""
    if impl in ("hf_sparse", "sdpa"):
        return None
    if dev.type != "cuda":
        return f"skipped: {impl} needs a CUDA GPU (this run: {dev.type})"
    if impl == "flex_flash":
        return flash_backend_offered()
    if impl == "fa4":
        return fa4_missing()
    return None


_FLEX: list[Any] = []


def _flex():
    """``torch.compile(flex_attention)``, made once."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention))
    return _FLEX[0]


def variant(impl: str, pat: Pattern | None, case: dict[str, Any], backend: str):
    """``(fn(q, k, v), Flex kernel options, Flex backward block)`` of one variant; ``case`` caches the
    pattern's layout, ``BlockMask`` and variants for one (shape, length, pattern), so that both passes run
    the same function (FA4 and Flex then compile once)."""
    made = case.setdefault("variants", {})
    if impl not in made:
        made[impl] = _make_variant(impl, pat, case, backend)
    return made[impl]


def _make_variant(impl: str, pat: Pattern | None, case: dict[str, Any], backend: str):
    t, hq, hkv, dev = case["t"], case["hq"], case["hkv"], case["device"]
    if pat is None:
        case.setdefault("pairs", t * (t + 1) // 2)
    elif "layout" not in case:
        case["layout"], case["pairs"] = pattern_layout(pat, t, hkv, dev)
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), None, None
    if impl == "hf_sparse":
        # a capped pattern (max_distance=N) with q_cap = q: its two passes, the output of the uncapped one
        return (lambda q, k, v: sparse_attention(q, k, v, pat, backend=backend, q_cap=q if declares_cap(pat) else None),
                None, None)
    if pat is not None and "block_mask" not in case:
        case["block_mask"] = block_mask(pat, t, t, heads=hq, kv_heads=hkv, block_size=TILE, device=dev)
    bm, lay = case.get("block_mask"), case.get("layout")
    if impl == "fa4":
        return fa4_fn(pat, bm), None, None
    opts, block = flex_options(lay), (lay.block_m if lay is not None and lay.block_m < 128 else None)
    if impl == "flex_flash":
        bm = type(bm).from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                     BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=flex_rules_mask_mod(rule_constants(pat)),
                                     seq_lengths=bm.seq_lengths)
        opts, block = {"BACKEND": "FLASH"}, None
    flex = _flex()
    return (lambda q, k, v: flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)), opts, block


def measure(impl: str, ps: str, fn, block, inputs, ref: dict[str, Any], ref_impl: str) -> dict[str, Any]:
    """Time one variant and pass, and compare its output (and gradients) with the reference variant's."""
    q, k, v, do = inputs
    with flex_backward_tiles(block):
        med, p20, p80, peak, _ = measure_pass(fn, q, k, v, do, ps)
        got = _outputs(fn, q, k, v, do, ps == "fwd_bwd")
    res: dict[str, Any] = dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_gb=peak)
    if impl == ref_impl:
        ref[ps] = got
        res["check"] = "reference"
    elif ps in ref:
        errs = _relative_errors(got, ref[ps])
        bad = {n: e for n, e in errs.items() if not e <= MISMATCH}
        res["max_rel_diff_vs_" + ref_impl] = errs
        res["check"] = "MISMATCH " + ",".join(f"{n}={e:.2g}" for n, e in bad.items()) if bad else "ok"
    else:
        res["check"] = f"not checked: no {ref_impl} result"
    return res


def run(args) -> list[dict[str, Any]]:
    from .results import _version, environment_info

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment_info(dev)
    versions = {m: _version(m) for m in ("flash-attn-4", "nvidia-cutlass-dsl")}
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        versions["compute_capability"] = f"{major}.{minor}"
        torch._dynamo.config.cache_size_limit = 256
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    patterns = [parse_pattern(p) for p in split_outside_brackets(args.patterns, ";")]
    shapes = [tuple(int(x) for x in s.split("/")) for s in args.shapes.split(",")]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    passes = [p for p in ("fwd", "fwd_bwd") if p in args.passes.split(",")]
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from {','.join(IMPLS)}")
    impls = [i for i in IMPLS if i in args.impls.split(",")]
    missing = {impl: _unavailable(impl, dev) for impl in impls}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m hf_sparse.eval.bench_hopper " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()

    def emit(row):
        row.update(batch=1, dtype=args.dtype, **versions, **provenance(env, command))
        rows.append(row)
        append_row(out_path, row)
        shown = f"{row['median_ms']:9.3f} ms {row['tflops']:6.1f} TF/s" if row["status"] == "ok" else row["status"]
        print(f"{row['impl']:>10} {row['pattern'][:44]:<44} T={row['seq_len']:>6} "
              f"{row['q_heads']}/{row['kv_heads']}/{row['head_dim']} {row['pass']:<7} {shown}"
              + (f" check {row['check']}" if row.get("check") else ""), flush=True)

    for hq, hkv, d in shapes:
        for t in lengths:
            gen = torch.Generator(device=dev).manual_seed(t)
            q, do = (torch.randn(1, hq, t, d, device=dev, dtype=dtype, generator=gen) for _ in range(2))
            k, v = (torch.randn(1, hkv, t, d, device=dev, dtype=dtype, generator=gen) for _ in range(2))
            sdpa_tflops: dict[str, float] = {}
            for pat in [None, *patterns]:
                family = DENSE_IMPLS if pat is None else PATTERN_IMPLS
                case: dict[str, Any] = dict(t=t, hq=hq, hkv=hkv, device=dev)
                ref: dict[str, Any] = {}
                for impl in (i for i in family if i in impls):
                    for ps in passes:
                        row = dict(impl=impl, pattern="dense_causal" if pat is None else pat.spec(), **{"pass": ps},
                                   seq_len=t, head_dim=d, q_heads=hq, kv_heads=hkv, status="ok")
                        left = args.deadline_s - (time.monotonic() - t_start) if args.deadline_s else 0
                        if missing[impl] or (args.deadline_s and left <= 0):
                            row["status"] = missing[impl] or f"skipped: --deadline-s {args.deadline_s:g} reached"
                            emit(row)
                            continue
                        try:
                            with time_limit(min((x for x in (args.variant_timeout_s, left) if x > 0), default=0)):
                                fn, opts, block = variant(impl, pat, case, args.backend)
                                row.update(measure(impl, ps, fn, block, (q, k, v, do), ref, family[0]))
                            flops = (1 if ps == "fwd" else 3.5) * 4 * d * hq * case["pairs"]
                            tflops = flops / (row["median_ms"] * 1e-3) / 1e12
                            if impl == "sdpa":
                                sdpa_tflops[ps] = tflops
                            row.update(tflops=tflops, attended_pairs=case["pairs"], density=case["pairs"] / (
                                t * (t + 1) // 2), kernel_options=opts, share_of_sdpa_tflops=(
                                tflops / sdpa_tflops[ps] if ps in sdpa_tflops else None))
                        except Exception as err:  # one failing variant (compile error, OOM, timeout) ends only itself
                            row["status"] = "failed: " + _describe(err)
                            if dev.type == "cuda":
                                with contextlib.suppress(Exception):
                                    torch.cuda.synchronize()
                                torch.cuda.empty_cache()
                        emit(row)
                case = ref = None
            q = k = v = do = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per (shape, length, pattern, pass) every variant with its time, TFLOP/s on attended pairs,
    speed against Flex (Flex ms / its ms), share of SDPA's TFLOP/s and its check against ours."""
    def key(r):
        return r["q_heads"], r["kv_heads"], r["head_dim"], r["seq_len"], r["pattern"], r["pass"]

    flex = {key(r): r for r in rows if r["impl"] == "flex" and r["status"] == "ok"}
    lines = ["| heads q/kv/D | T | pattern | pass | variant | ms | TF/s | vs flex | % of SDPA TF/s | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['q_heads']}/{r['kv_heads']}/{r['head_dim']} | {r['seq_len']} | {r['pattern']} | {r['pass']} " \
               f"| {r['impl']} "
        if r["status"] != "ok":
            lines.append(head + f"| - | - | - | - | {r['status'].replace('|', '/')} |")
            continue
        fx = flex.get(key(r))
        vs_flex = f"{fx['median_ms'] / r['median_ms']:.2f}x" if fx else "-"
        share = f"{100 * r['share_of_sdpa_tflops']:.0f}%" if r.get("share_of_sdpa_tflops") else "-"
        lines.append(head + f"| {r['median_ms']:.3f} | {r['tflops']:.0f} | {vs_flex} | {share} | {r.get('check', '')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_sparse.eval.bench_hopper", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="32/8/128,9/3/64", help="q_heads/kv_heads/head_dim list [%(default)s]")
    p.add_argument("--lengths", default="65536,8192,16384,32768,131072",
                   help="sequence lengths, run in this order (the deadline cuts the last) [%(default)s]")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help="';'-separated pattern strings [%(default)s]")
    p.add_argument("--impls", default=",".join(IMPLS), help="[%(default)s]")
    p.add_argument("--passes", default="fwd,fwd_bwd", help="[%(default)s]")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--backend", default="triton", help="hf_sparse backend [%(default)s] (reference: CPU smoke runs)")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="rows that would start after this many seconds are written as skipped [off]")
    p.add_argument("--variant-timeout-s", type=float, default=150,
                   help="time limit of one variant and pass, compile included (0: none) [%(default)s]")
    p.add_argument("--out", default="results/hopper.jsonl", help="rows are appended here [%(default)s]")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_and_show(build_parser(), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
