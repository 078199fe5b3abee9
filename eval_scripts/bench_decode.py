"""Decode benchmark: one step of a few queries over a long key history, the decode kernel against dense.

    python -m hf_sparse.eval.bench_decode [--shapes 32/8/128] [--lengths 131072,32768] [--batch 1,8]
                                          [--patterns 'strided:stride=2048,window=1;...'] [--out results/decode.jsonl]

For each head shape, length, batch and pattern (bf16) it times the attention of ``--queries`` new queries
(1: a decode step) over ``T`` keys, the queries at the last positions:

``hf_sparse``            :func:`hf_sparse.sparse_attention` with ``q_offset = T - Tq`` (keys laid out by
                         position: a full-history cache).
``hf_sparse_positions``  :func:`hf_sparse.decode.attention_with_positions` with every slot's position given
                         (a static cache's path).
``sdpa``                 ``F.scaled_dot_product_attention`` over every key (the dense baseline; one query).

A row also carries ``tiles_hit``: the share of 64-key tiles that hold a pair the pattern shows (per KV
head, averaged) -- the share of K/V a kernel that skips the other tiles reads -- and ``kv_gb_s``, the K/V
bytes of those tiles over the median time. Outputs of ours are compared with the reference backend
(``max_abs_diff``). Rows go to the JSONL file with the card, versions, commit and command; a table is
printed (and written with ``--markdown``).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_sparse import parse_pattern, sparse_attention
from hf_sparse.decode import attention_with_positions
from hf_sparse.patterns.base import split_outside_brackets

from .bench_kernels import _bench, append_row, provenance, run_and_show

DEFAULT_PATTERNS = ("strided:stride=256,window=256;sliding_window:window=2048|strided:stride=2048,window=1;"
                    "sliding_window:window=2048;dense")
IMPLS = ("hf_sparse", "hf_sparse_positions", "sdpa")
TILE = 64  # the decode kernel's key tile on the GPU


def tiles_hit(pattern, q_pos: torch.Tensor, t: int, hkv: int) -> float:
    """Share of the ``TILE``-key tiles of ``[0, t)`` that hold a pair the pattern shows to a query at ``q_pos``."""
    k = torch.arange(t)
    shares = []
    for hk in range(hkv):
        seen = torch.zeros(t, dtype=torch.bool)
        for qp in q_pos.tolist():
            seen |= pattern.allowed(torch.tensor(qp), k, kv_head=hk)
        seen = F.pad(seen, (0, -t % TILE))
        shares.append(float(seen.view(-1, TILE).any(1).float().mean()))
    return sum(shares) / hkv


def _attend(impl: str, pattern, q, k, v, q_pos, k_pos, backend: str) -> torch.Tensor:
    """One decode step of ``impl``: the queries at the last positions over every key."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if impl == "hf_sparse":
        return sparse_attention(q, k, v, pattern, backend=backend, q_offset=k.shape[2] - q.shape[2])
    return attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend=backend)


def run(args) -> list[dict[str, Any]]:
    from .results import environment_info

    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    env = environment_info(dev)
    command = "python -m hf_sparse.eval.bench_decode " + shlex.join(args.argv if args.argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    impls = args.impls.split(",")
    rows = []
    for shape in args.shapes.split(","):
        hq, hkv, d = map(int, shape.split("/"))
        for t in map(int, args.lengths.split(",")):
            for b in map(int, args.batch.split(",")):
                g = torch.Generator(device=dev).manual_seed(0)
                q = torch.randn(b, hq, args.queries, d, generator=g, device=dev, dtype=dtype)
                k = torch.randn(b, hkv, t, d, generator=g, device=dev, dtype=dtype)
                v = torch.randn(b, hkv, t, d, generator=g, device=dev, dtype=dtype)
                q_pos = torch.arange(t - args.queries, t, device=dev).expand(b, -1)
                k_pos = torch.arange(t, device=dev).expand(b, -1)
                todo = [("sdpa", "dense")] if args.queries == 1 else []
                for spec in split_outside_brackets(args.patterns, ";"):
                    todo += [(impl, parse_pattern(spec)) for impl in IMPLS[:2]]
                checks = {}  # per pattern, shared by both of ours: (reference output, share of tiles hit)
                for impl, pattern in todo:
                    if impl not in impls:
                        continue
                    fn = functools.partial(_attend, impl, pattern, q, k, v, q_pos, k_pos, args.backend)
                    with torch.no_grad():
                        o = fn()
                        diff, share = None, 1.0
                        if impl != "sdpa":
                            if pattern not in checks:
                                checks[pattern] = (
                                    sparse_attention(q.float(), k.float(), v.float(), pattern, backend="reference",
                                                     q_offset=t - args.queries),
                                    tiles_hit(pattern, q_pos[0].cpu(), t, hkv))
                            ref, share = checks[pattern]
                            diff = float((o.float() - ref).abs().max())
                        med, p20, p80 = _bench(fn)
                    kv_bytes = 2 * b * hkv * t * d * k.element_size() * share
                    row = dict(impl=impl, pattern=pattern if impl == "sdpa" else pattern.spec(), seq_len=t, batch=b,
                               queries=args.queries, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=str(dtype)[6:],
                               median_ms=med, p20_ms=p20, p80_ms=p80, tiles_hit=share,
                               kv_gb_s=kv_bytes / (med * 1e-3) / 1e9, max_abs_diff=diff,
                               **provenance(env, command))
                    append_row(out, row)
                    rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: each pattern's decode time beside dense SDPA's over the same keys."""
    sdpa = {(r["seq_len"], r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"]): r for r in rows
            if r["impl"] == "sdpa"}
    lines = ["| heads q/kv/D | T | B | impl | pattern | tiles hit | ms | K/V GB/s | vs sdpa | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = sdpa.get((r["seq_len"], r["batch"], r["q_heads"], r["kv_heads"], r["head_dim"]))
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        pattern = r["pattern"].replace("|", "\\|")  # a union's bar is no column
        lines.append(f"| {r['q_heads']}/{r['kv_heads']}/{r['head_dim']} | {r['seq_len']} | {r['batch']} | {r['impl']} | "
                     f"{pattern} | {r['tiles_hit']:.3f} | {r['median_ms']:.4f} | {r['kv_gb_s']:.0f} | "
                     f"{(base['median_ms'] / r['median_ms']) if base else float('nan'):.2f}x | {diff} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_sparse.eval.bench_decode", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="32/8/128", help="q_heads/kv_heads/head_dim list [%(default)s]")
    p.add_argument("--lengths", default="131072,32768", help="keys before the new queries [%(default)s]")
    p.add_argument("--batch", default="1,8", help="[%(default)s]")
    p.add_argument("--queries", type=int, default=1, help="new queries per step [%(default)s]")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS, help="';'-separated pattern strings [%(default)s]")
    p.add_argument("--impls", default=",".join(IMPLS), help="[%(default)s]")
    p.add_argument("--backend", default="triton", help="hf_sparse backend [%(default)s]")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu [%(default)s]")
    p.add_argument("--out", default="results/decode.jsonl", help="rows are appended here [%(default)s]")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_and_show(build_parser(), run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
