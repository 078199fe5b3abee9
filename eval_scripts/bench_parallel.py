"""Context-parallel benchmark: ``hf_sparse.parallel.sparse_attention`` on several GPUs against one GPU.

    torchrun --nproc-per-node 8 -m hf_sparse.eval.bench_parallel --seq-lens 262144,1048576 \\
        --world-sizes 1,2,4,8 --out results/parallel.jsonl --markdown results/parallel.md
    python -m hf_sparse.eval.bench_parallel --predict      # the memory and time model of docs/parallel.md

Measured: one attention layer (Llama-3-8B heads by default: 32 query heads, 8 KV heads, head dim
128, bf16) over one sequence of ``T`` tokens, forward and forward+backward, for each pattern and
each world size ``P`` in ``--world-sizes`` (the first ``P`` ranks of the launch form the group;
``P = 1`` is :func:`hf_sparse.sparse_attention` on one GPU, the baseline). A row holds the slowest
rank's median time, the bytes the busiest rank receives per layer, the scaling efficiency
``t_1 / (P * t_P)`` against the one-GPU row of the same length (when one GPU holds it), and, where
``--check-max`` allows, the largest difference of every rank's output from the one-GPU output.
Rows go to the JSONL file with the command, the GPUs and the versions; a table is printed at the end.

``--predict`` needs no GPU: it prints the model of docs/parallel.md (bytes per layer from the shard
plan, communication and attention time from stated bandwidth and kernel throughput, memory per GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hf_sparse import parse_pattern, sparse_attention
from hf_sparse.parallel import balanced_lengths, shard_plan
from hf_sparse.parallel import sparse_attention as parallel_attention
from hf_sparse.parallel.views import alignment
from hf_sparse.patterns.base import split_outside_brackets

DEFAULT_PATTERNS = ("sliding_window:window=4096;longformer:window=4096,global_tokens=4,max_distance=none;"
                    "bigbird:block=64,max_distance=none")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hf_sparse.eval.bench_parallel", description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="262144,1048576", help="whole-sequence lengths, comma-separated")
    ap.add_argument("--patterns", default=DEFAULT_PATTERNS, help="';'-separated pattern specs")
    ap.add_argument("--world-sizes", default="1,2,4,8", help="group sizes to time (at most the launched world)")
    ap.add_argument("--heads", default="32/8/128", help="query heads / KV heads / head dim")
    ap.add_argument("--passes", default="fwd,fwd_bwd")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check-max", type=int, default=262144,
                    help="compare outputs with one GPU up to this length (every rank holds the whole sequence)")
    ap.add_argument("--out", default="results/parallel.jsonl")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--predict", action="store_true", help="print the memory/time model (no GPU) and exit")
    ap.add_argument("--link-gbps", default="300,25",
                    help="--predict: link bandwidths in GB/s per GPU (NVLink P2P, and a 200 Gb/s network)")
    return ap


# ---------------------------------------------------------------------------------------------
# measurement
def _timed(fn, group, iters: int, warmup: int) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of the slowest rank of ``group`` per iteration."""
    times = []
    for i in range(warmup + iters):
        dist.barrier(group=group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms = torch.tensor([start.elapsed_time(end)], device="cuda")
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
        if i >= warmup:
            times.append(float(ms))
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), qs[0], qs[-1]


def _inputs(t: int, s: int, e: int, heads, seed: int):
    """This rank's shard of a sequence whose token ``i`` is the same whatever the sharding (generated in
    chunks of 4096 tokens, each from its own seed)."""
    hq, hkv, d = heads
    chunk = 4096
    parts = {name: [] for name in ("q", "k", "v", "do")}
    for c0 in range(s // chunk * chunk, e, chunk):
        g = torch.Generator(device="cuda").manual_seed(seed * 1_000_003 + c0)
        for name, h in (("q", hq), ("k", hkv), ("v", hkv), ("do", hq)):
            x = torch.randn(1, h, min(chunk, t - c0), d, device="cuda", dtype=torch.bfloat16, generator=g)
            parts[name].append(x[:, :, max(s - c0, 0) : e - c0])
    return [torch.cat(parts[n], 2).contiguous() for n in ("q", "k", "v", "do")]


def run(args) -> list[dict[str, Any]]:
    import os

    if not torch.cuda.is_available():
        raise SystemExit("bench_parallel measures on CUDA GPUs; --predict runs without one")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    from .results import environment_info

    rank, launched = dist.get_rank(), dist.get_world_size()
    env = environment_info(torch.device("cuda"))
    env["gpus"] = launched
    command = "torchrun --nproc-per-node {} -m hf_sparse.eval.bench_parallel {}".format(launched, " ".join(args.argv))
    heads = tuple(int(x) for x in args.heads.split("/"))
    sizes = [w for w in (int(x) for x in args.world_sizes.split(",")) if w <= launched]
    groups = {w: dist.new_group(list(range(w))) for w in sizes}  # every rank creates every group
    rows: list[dict[str, Any]] = []
    for spec in split_outside_brackets(args.patterns, ";"):
        pattern = parse_pattern(spec)
        for t in (int(x) for x in args.seq_lens.split(",")):
            reference = None
            if t <= args.check_max:  # every rank keeps the one-GPU output of the whole sequence
                q, k, v, _ = _inputs(t, 0, t, heads, seed=t)
                with torch.no_grad():
                    reference = sparse_attention(q, k, v, pattern)
                del q, k, v
            single = {}
            for w in sizes:
                row = _measure(args, pattern, t, w, groups[w], heads, reference, env, command)
                if row is None:
                    continue
                if w == 1:
                    single = {p: row[p]["median_ms"] for p in args.passes.split(",") if p in row}
                for p in args.passes.split(","):
                    if p in row and p in single:
                        row[p]["scaling"] = single[p] / (w * row[p]["median_ms"])
                if rank == 0:
                    rows.append(row)
                    with Path(args.out).open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
            reference = None
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return rows


def _measure(args, pattern, t: int, w: int, group, heads, reference, env, command) -> dict | None:
    rank = dist.get_rank()
    row: dict[str, Any] = {"bench": "parallel", "pattern": pattern.spec(), "tokens": t, "world": w,
                           "heads": "/".join(map(str, heads)), "dtype": "bf16", "command": command, **env}
    if rank >= w:  # not in this group: wait for it
        dist.barrier()
        return None
    lengths = balanced_lengths(t, w, multiple_of=alignment(pattern))
    s = sum(lengths[:rank])
    e = s + lengths[rank]
    plan = shard_plan(pattern, lengths, kv_heads=heads[1])
    row["shard_lengths"] = list(lengths)
    row["received_mb_max"] = max(plan.received_bytes(r, batch=1, head_dim=heads[2]) for r in range(w)) / 2**20
    try:
        q, k, v, do = _inputs(t, s, e, heads, seed=t)
        if w == 1:
            fn = lambda q, k, v: sparse_attention(q, k, v, pattern)  # noqa: E731
        else:
            fn = lambda q, k, v: parallel_attention(q, k, v, pattern, group=group, shard_lengths=lengths)  # noqa: E731
        if reference is not None and w > 1:
            with torch.no_grad():
                err = (fn(q, k, v).float() - reference[:, :, s:e].float()).abs().max().reshape(1)
            dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
            row["max_abs_diff_vs_one_gpu"] = float(err)
        torch.cuda.reset_peak_memory_stats()
        for p in args.passes.split(","):
            if p == "fwd":
                with torch.no_grad():
                    med, lo, hi = _timed(lambda: fn(q, k, v), group, args.iters, args.warmup)
            else:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                def step(qg=qg, kg=kg, vg=vg):
                    for x in (qg, kg, vg):
                        x.grad = None
                    fn(qg, kg, vg).backward(do)

                med, lo, hi = _timed(step, group, args.iters, args.warmup)
            row[p] = {"median_ms": med, "p20_ms": lo, "p80_ms": hi}
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        row["peak_gb_max"] = float(peak)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        q = k = v = do = None
        torch.cuda.empty_cache()
    dist.barrier()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| pattern | T | GPUs | fwd ms | fwd+bwd ms | scaling fwd / fwd+bwd | recv MB/layer (max) | peak GB | "
             "max diff vs 1 GPU |", "|---|---|---|---|---|---|---|---|---|"]
    def cell(r, p, key):
        return f"{r[p][key]:.2f}" if p in r and key in r[p] else "-"

    for r in rows:
        lines.append(f"| {r['pattern']} | {r['tokens']} | {r['world']} | {cell(r, 'fwd', 'median_ms')} | "
                     f"{cell(r, 'fwd_bwd', 'median_ms')} | {cell(r, 'fwd', 'scaling')} / "
                     f"{cell(r, 'fwd_bwd', 'scaling')} | {r.get('received_mb_max', 0):.1f} | "
                     f"{r.get('peak_gb_max', float('nan')):.1f} | {r.get('max_abs_diff_vs_one_gpu', '-')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the model of docs/parallel.md
#: Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads of 128, vocabulary 128256
LLAMA_8B = dict(layers=32, hidden=4096, mlp=14336, hq=32, hkv=8, d=128, vocab=128256)
#: our kernels' throughput at 64k-128k tokens, 32/8/128 bf16 (results/kernels.md, H200; H100 SXM has the same
#: dense bf16 peak): TFLOP/s of attended pairs, forward and forward+backward
KERNEL_TFLOPS = {"sliding_window": (466, 409), "longformer": (457, 397), "bigbird": (292, 250)}
#: the projections and MLP at 40% of the 989 TFLOP/s bf16 peak
DENSE_TFLOPS = 400.0


def _pairs_per_query(pattern) -> float:
    """Attended keys per query far from the start (token band W: W; BigBird: window, global and random blocks,
    half of the diagonal block)."""
    p = pattern.primitives()
    if p.random_blocks or p.window_blocks:
        return (p.window_blocks - 0.5 + p.global_tokens // p.block + p.random_blocks) * p.block
    return p.window + p.global_tokens


def _own_share(pattern, s: int, e: int) -> float:
    """The share of a shard's attended pairs whose keys the shard holds: what the own-keys call computes
    while the rest travels. Token bands: all but the halo's triangle and the globals. BigBird: the window
    blocks, and each random block with the chance that it lands in the shard (uniform over the blocks
    before the window, as the draw is)."""
    p = pattern.primitives()
    if not p.random_blocks:
        w, g = p.window, p.global_tokens
        return (w - w * w / (2 * (e - s))) / (w + g)
    blk, wb, gb, rb = p.block, p.window_blocks, p.global_tokens // p.block, p.random_blocks
    first = s // blk
    local = [max(0, qb - wb + 1 - first) / max(1, qb - wb + 1 - gb) for qb in range(first, e // blk)]
    return ((wb - 0.5) + rb * sum(local) / len(local)) / (wb - 0.5 + gb + rb)


def predict(args) -> str:
    m = LLAMA_8B
    world, tokens = 8, 1 << 20
    t_rank = tokens // world
    links = [float(x) for x in args.link_gbps.split(",")]
    params_layer = m["hidden"] * (2 * m["hq"] * m["d"] + 2 * m["hkv"] * m["d"]) + 3 * m["hidden"] * m["mlp"]
    dense_fwd_ms = 2 * params_layer * t_rank / (DENSE_TFLOPS * 1e12) * 1e3
    act = t_rank * m["hidden"] * 2 / 2**30
    out = [f"Llama-3-8B shapes, {tokens} tokens on {world} GPUs ({t_rank} per GPU), bf16, batch 1, one layer, "
           f"the busiest GPU (the last one).",
           f"Projections + MLP per GPU: {2 * params_layer * t_rank / 1e12:.1f} TFLOP forward, {dense_fwd_ms:.0f} ms at "
           f"{DENSE_TFLOPS:.0f} TFLOP/s; forward+backward {3 * dense_fwd_ms:.0f} ms.", ""]
    head = ["pattern", "received MB/layer (mean / last GPU)", "attention fwd ms", "attention fwd+bwd ms",
            "own-keys share", *(f"comm fwd ms @ {g:g} GB/s (exposed)" for g in links),
            f"exposed comm share of a step @ {links[-1]:g} GB/s"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in split_outside_brackets(args.patterns, ";"):
        pattern = parse_pattern(spec)
        lengths = balanced_lengths(tokens, world, multiple_of=alignment(pattern))
        plan = shard_plan(pattern, lengths, kv_heads=m["hkv"])
        recv = [plan.received_bytes(r, batch=1, head_dim=m["d"]) for r in range(world)]
        flops = 4 * m["d"] * m["hq"] * t_rank * _pairs_per_query(pattern)
        tf_fwd, tf_both = KERNEL_TFLOPS[pattern.name]
        attn_fwd = flops / (tf_fwd * 1e12) * 1e3
        attn_both = 3.5 * flops / (tf_both * 1e12) * 1e3
        own = _own_share(pattern, *plan.shard(world - 1))
        cells, share = [], 0.0
        for g in links:
            comm = recv[-1] / (g * 1e9) * 1e3
            exposed = max(0.0, comm - attn_fwd * own)  # the own-keys call hides this much, forward and backward
            cells.append(f"{comm:.2f} ({exposed:.2f})")
            share = 2 * exposed / (3 * dense_fwd_ms + attn_both + 2 * exposed)
        out.append(f"| {pattern.spec()} | {sum(recv) / world / 2**20:.1f} / {recv[-1] / 2**20:.1f} | {attn_fwd:.1f} | "
                   f"{attn_both:.1f} | {own:.2f} | " + " | ".join(cells) + f" | {100 * share:.1f}% |")
    out += ["", f"Memory per GPU: a layer's input is {act:.2f} GB ({act * m['layers']:.0f} GB for {m['layers']} layers "
            f"kept under activation checkpointing); FSDP over {world} GPUs: bf16 weights and gradients with float32 "
            f"Adam states and master weights, 16 bytes a parameter, {8.0 * 16 / world:.0f} GB; full float32 logits "
            f"of one GPU's tokens would take {t_rank * m['vocab'] * 4 / 2**30:.0f} GB: use a fused linear "
            "cross-entropy (Liger) or chunk the loss."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.predict:
        print(predict(args))
        return 0
    rows = run(args)
    if rows:
        from .results import show_table

        show_table(table(rows), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
