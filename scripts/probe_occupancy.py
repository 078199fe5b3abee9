"""Probe: how many programs of each compiled kernel fit on one SM (registers, shared memory, warps)?

    python scripts/probe_occupancy.py [--shape 32/8/128] [--patterns "sliding_window:window=4096;dense"]
        [--config fwd=64,64,4,3] [--seq-len 8192] [--backward]

It runs the patterns once (so the kernels compile for these inputs), then asks the driver
(``cuOccupancyMaxActiveBlocksPerMultiprocessor``) for every compiled specialisation of the forward,
dQ and dK/dV kernels: registers, spills, shared memory, warps and resident programs per SM. The
compile check (``scripts/compile_check.py``) gives the first four without a GPU; the last one needs
the driver (its shared-memory carve-out and per-program reservation).
"""

from __future__ import annotations

import argparse
import ctypes

import torch

import hf_sparse.kernels as K
from hf_sparse import parse_pattern, sparse_attention
from hf_sparse.kernels import configs
from hf_sparse.patterns.base import split_outside_brackets


def _compiled(kernel):
    for cache in getattr(kernel, "device_caches", {}).values():
        yield from cache[0].values()


def blocks_per_sm(ck, cuda: ctypes.CDLL) -> int:
    ck._init_handles()
    n = ctypes.c_int(0)
    threads = 32 * ck.metadata.num_warps
    err = cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), ctypes.c_void_p(ck.function),
                                                           threads, ctypes.c_size_t(ck.metadata.shared))
    return n.value if err == 0 else -err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32/8/128")
    ap.add_argument("--patterns", default="sliding_window:window=4096;dense;bigbird")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    configs.apply_overrides(args.config)
    hq, hkv, d = (int(x) for x in args.shape.split("/"))
    dev = torch.device("cuda")
    mk = lambda h: torch.randn(1, h, args.seq_len, d, device=dev, dtype=torch.bfloat16,  # noqa: E731
                               requires_grad=args.backward)
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    cuda = ctypes.CDLL("libcuda.so.1")
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, shape {args.shape}, configs {args.config or 'table'}")
    print(f"{'pattern':<28} {'kernel':<18} {'regs':>5} {'spill':>6} {'smem':>7} {'warps':>5} {'stages':>6} "
          f"{'per SM':>6}")
    seen: set[int] = set()
    for spec in split_outside_brackets(args.patterns, ";"):
        out = sparse_attention(q, k, v, parse_pattern(spec), backend="triton")
        if args.backward:
            out.sum().backward()
        torch.cuda.synchronize()
        for kernel in (K.attention._fwd_kernel, K.attention._bwd_dq_kernel, K.attention._bwd_dkdv_kernel):
            for ck in _compiled(kernel):
                if id(ck) in seen:
                    continue
                seen.add(id(ck))
                per_sm = blocks_per_sm(ck, cuda)
                md = ck.metadata
                print(f"{spec[:28]:<28} {kernel.__name__:<18} {ck.n_regs:>5} {ck.n_spills:>6} {md.shared:>7} "
                      f"{md.num_warps:>5} {md.num_stages:>6} {per_sm:>6}")


if __name__ == "__main__":
    main()
