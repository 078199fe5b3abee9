"""One attention call for Nsight Compute: warm-up outside the profiled range, then one call inside it.

    ncu --profile-from-start off --section SpeedOfLight ... python scripts/ncu_attention.py \
        --impl hf_sparse --pattern sliding_window:window=4096 --shape 32/8/128 --seq-len 16384 [--backward]

``--impl sdpa`` runs ``F.scaled_dot_product_attention`` (dense causal, ``enable_gqa=True``) exactly as the
kernel benchmark calls it, the baseline of issue 7. With ``--backward`` the profiled range holds the backward only.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_sparse import parse_pattern, sparse_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["hf_sparse", "sdpa"], default="hf_sparse")
    ap.add_argument("--pattern", default="sliding_window:window=4096")
    ap.add_argument("--shape", default="32/8/128")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    hq, hkv, d = (int(x) for x in args.shape.split("/"))
    dev = torch.device("cuda")
    mk = lambda h: torch.randn(1, h, args.seq_len, d, device=dev, dtype=torch.bfloat16,  # noqa: E731
                               requires_grad=args.backward)
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    if args.impl == "sdpa":
        call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    else:
        pat = parse_pattern(args.pattern)
        call = lambda: sparse_attention(q, k, v, pat, backend="triton")  # noqa: E731
    do = torch.randn(1, hq, args.seq_len, d, device=dev, dtype=torch.bfloat16)
    for _ in range(2):
        out = call()
        if args.backward:
            out.backward(do)
    torch.cuda.synchronize()
    if args.backward:
        out = call()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        out.backward(do)
    else:
        torch.cuda.profiler.start()
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
