"""Probe: is a short kernel call's benchmark time GPU time or host time, and which kernel takes it?

    python scripts/probe_timing.py [--patterns bigbird] [--shape 9/3/64] [--seq-len 65536]
                                   [--impls hf_sparse,flex] [--backward]

For ours and FlexAttention (same block mask as the kernel benchmark), forward, it prints:
``do_bench`` median (what bench-kernels reports: one call between events after an L2 flush),
the same for 20 back-to-back calls divided by 20 (the queue stays full, host time hides), the sum
of the CUDA kernels' durations per call from ``torch.profiler``, and the host time to enqueue one call.
The four longest kernels are listed with their share. ``--backward`` times forward + backward instead (a
fresh gradient of ones each call), so the dQ and dK/dV kernels appear apart: for example a per-head plan
against its parts,

    python scripts/probe_timing.py --backward --impls hf_sparse --shape 32/8/128 \\
        --patterns "per_head[sliding_window:window=4096;0=dense;1=dense]"
    python scripts/probe_timing.py --backward --impls hf_sparse --shape 8/2/128 --patterns dense
    python scripts/probe_timing.py --backward --impls hf_sparse --shape 24/6/128 --patterns sliding_window:window=4096
"""

from __future__ import annotations

import argparse
import time

import torch
from hf_sparse.eval.bench_kernels import _bench, flex_block_mask, flex_options, pattern_layout

from hf_sparse import parse_pattern, sparse_attention
from hf_sparse.patterns.base import split_outside_brackets


def kernel_ms(fn, calls: int = 20) -> tuple[float, dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:60]] = per.get(ev.name[:60], 0.0) + ev.device_time / 1e3 / calls
    return sum(per.values()), per


def host_us(fn, calls: int = 50) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default="bigbird")
    ap.add_argument("--shape", default="9/3/64")
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--impls", default="hf_sparse,flex", help="comma-separated: hf_sparse, flex")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    args = ap.parse_args()
    wanted = set(args.impls.split(","))
    if not wanted <= {"hf_sparse", "flex"}:
        ap.error(f"--impls {args.impls!r}: choose from hf_sparse, flex")
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    hq, hkv, d = (int(x) for x in args.shape.split("/"))
    t = args.seq_len
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=args.backward)
               for h in (hq, hkv, hkv))
    for spec in split_outside_brackets(args.patterns, ";"):
        pat = parse_pattern(spec)
        lay, _ = pattern_layout(pat, t, hkv, dev)
        bm = flex_block_mask(pat, lay, t, hq, hkv, dev)
        opts = flex_options(lay)
        impls = {
            "hf_sparse": lambda p=pat: sparse_attention(q, k, v, p, backend="triton"),
            "flex": lambda bm=bm, o=opts: flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=o),
        }
        impls = {name: fn for name, fn in impls.items() if name in wanted}
        if args.backward:
            impls = {name: (lambda fn=fn: fn().backward(torch.ones_like(q))) for name, fn in impls.items()}
        with torch.set_grad_enabled(args.backward):
            for name, fn in impls.items():
                fn()
                med = _bench(fn)[0]
                med20 = _bench(lambda fn=fn: [fn() for _ in range(20)])[0] / 20
                kms, per = kernel_ms(fn)
                hu = host_us(fn)
                top = ", ".join(f"{n}: {ms * 1e3:.1f} us ({ms / kms:.0%})"
                                for n, ms in sorted(per.items(), key=lambda x: -x[1])[:4])
                what = "fwd+bwd" if args.backward else "fwd"
                print(f"{name:>9} {what} {spec[:28]:<28} {hq}/{hkv}/{d} T={t}: do_bench {med:.4f} ms | 20 calls/20 {med20:.4f}"
                      f" ms | kernels {kms:.4f} ms | host {hu:.1f} us/call | {top}", flush=True)


if __name__ == "__main__":
    main()
