"""Probe: does Triton's warp specialization (``tl.range(..., warp_specialize=True)``) help an attention loop on
the H200?  A plain non-causal attention forward (one head per program row block, K/V through host-side tensor
descriptors as in our kernels), with and without warp specialization, against cuDNN's SDPA.

    python scripts/probe_ws.py [--seq-len 16384] [--heads 32] [--variants A,B] [--no-sdpa] [--compile-only]

Run each variant in its own process under ``timeout`` on the GPU: a warp-specialized kernel that deadlocks
hangs the process (on the H200 with Triton 3.6, a run of all variants in one process never returned).

``--compile-only`` (any machine): compile for sm_90 and print whether the loop was split into partitions.
"""

from __future__ import annotations

import argparse
import re

import torch
import triton
import triton.language as tl


@triton.jit
def _attn(desc_q, desc_k, desc_v, out_ptr, T, H, sm_scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
          WS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = desc_q.load([b, h, pid_m * BM, 0]).reshape([BM, D])
    m_i = tl.full([BM], -float("inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for j in tl.range(0, T, BN, warp_specialize=WS):
        k = desc_k.load([b, h, j, 0]).reshape([BN, D])
        s = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([b, h, j, 0]).reshape([BN, D])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    rows = pid_m * BM + tl.arange(0, BM)
    out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (bh * T + rows)[:, None] * D + tl.arange(0, D)[None, :], out)


VARIANTS = {  # name: (BM, BN, warps, stages, WS)
    "ws_128x64_w4_s2": (128, 64, 4, 2, True),
    "ws_128x128_w4_s2": (128, 128, 4, 2, True),
    "plain_64x64_w4_s3": (64, 64, 4, 3, False),
    "plain_128x64_w8_s2": (128, 64, 8, 2, False),
    "plain_128x128_w8_s2": (128, 128, 8, 2, False),
}


def compile_only():
    from compile_check import compile_one  # (scripts/ is on the path when this file runs as a script)
    from triton.tools.tensor_descriptor import TensorDescriptor

    x = torch.empty(1, 1, 256, 128, dtype=torch.bfloat16)
    for name, (bm, bn, nw, ns, ws) in VARIANTS.items():
        dq = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bm, 128])
        dk = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bn, 128])
        try:
            r = compile_one(_attn, (dq, dk, dk, x, 256, 1, 0.088), dict(BM=bm, BN=bn, D=128, WS=ws), nw, ns)
            tt = r["ttgir"]
            print(f"{name:<22} partitions {len(re.findall(r'partition[0-9]+[(]', tt))} "
                  f"dots {sorted(set(re.findall(r'warp_group_dot .*?-> tensor<([0-9]+x[0-9]+)xf32', tt)))} "
                  f"{re.findall(r'requestedRegisters = array<i32: [0-9, ]*>', tt)} regs {r['regs']} "
                  f"spills {r['spill_stores']} smem {r['shared']}")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:<22} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: %(default)s")
    ap.add_argument("--no-sdpa", action="store_true")
    args = ap.parse_args()
    if args.compile_only:
        return compile_only()
    from triton.tools.tensor_descriptor import TensorDescriptor

    t, h, d = args.seq_len, args.heads, 128
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * t * t * d * h
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if not args.no_sdpa:
        ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        print(f"{'sdpa (cuDNN/flash)':<22} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF/s", flush=True)
    for name in args.variants.split(","):
        bm, bn, nw, ns, ws = VARIANTS[name]
        o = torch.empty_like(q)
        dq = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, bm, d])
        dk = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, d])
        dv = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, d])

        def call():
            _attn[(t // bm, h)](dq, dk, dv, o, t, h, d**-0.5, BM=bm, BN=bn, D=d, WS=ws,  # noqa: B023
                                num_warps=nw, num_stages=ns)  # noqa: B023

        try:
            call()
            err = (o.float() - ref.float()).abs().max().item()
            ms = triton.testing.do_bench(call)
            print(f"{name:<22} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF/s  max err vs sdpa {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:<22} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)


if __name__ == "__main__":
    main()
