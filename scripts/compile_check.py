"""Compile the Triton kernels for sm_90 on a machine without a GPU and print ptxas resource usage.

    python scripts/compile_check.py [--dtype bf16] [--head-dim 128]

It runs the real launchers with CPU tensors, intercepts each kernel launch, compiles that exact
specialisation for an H100/H200 target (Triton's bundled ptxas) and reports registers, spills and
shared memory. A kernel that fails to compile here fails on the GPU too, so this costs no device time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import hf_sparse.kernels as K

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            self.sink.append((self.kernel, args, kwargs, num_warps, num_stages))
        return launch


# the PTX ISA version to emit (e.g. 88); None: Triton's choice, which its bundled ptxas may not accept
PTX_VERSION = None


def compile_one(kernel, args, kwargs, num_warps, num_stages, arch=90):
    fn = kernel  # the JITFunction
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    sig, const, attrs = {}, {}, {}
    for i, n in enumerate(names):
        v = values[n]
        p = fn.params[i]
        if p.is_constexpr:
            sig[n] = "constexpr"
            const[n] = v
        elif type(v).__name__ == "TensorDescriptor":
            from triton.runtime.jit import mangle_type
            sig[n] = mangle_type(v)
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + _TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            sig[n] = "i32"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "fp32"
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if PTX_VERSION:
        options["ptx_version"] = PTX_VERSION
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = ck.asm["ptx"]
    if os.environ.get("DUMP_TTGIR"):
        with open(os.path.join(os.environ["DUMP_TTGIR"], f"{fn.__name__}.ttgir"), "w") as f:
            f.write(ck.asm["ttgir"])
        with open(os.path.join(os.environ["DUMP_TTGIR"], f"{fn.__name__}.ptx"), "w") as f:
            f.write(ptx)
        with open(os.path.join(os.environ["DUMP_TTGIR"], f"{fn.__name__}.cubin"), "wb") as f:
            f.write(ck.asm["cubin"])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    res = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    info = res.stderr
    regs = re.findall(r"Used (\d+) registers", info)
    spill = re.findall(r"(\d+) bytes spill stores", info)
    return dict(regs=regs[-1] if regs else "?", spill_stores=spill[-1] if spill else "?",
                shared=ck.metadata.shared, wgmma="wgmma" in ptx, name=fn.__name__, ok=res.returncode == 0,
                err=info if res.returncode else "", ttgir=ck.asm["ttgir"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--patterns", default="dense,sliding_window:window=4096,longformer:window=4096,bigbird,"
                    "sliding_window:window=512,causal=false")
    ap.add_argument("--varlen", default="0,1", help="0, 1 or 0,1")
    ap.add_argument("--kernels", default="_fwd_kernel,_bwd_dq_kernel,_bwd_dkdv_kernel,_decode_kernel,_decode_combine,"
                    "_ring_append_kernel")
    ap.add_argument("--tma", default="table", choices=["table", "on", "off"],
                    help="K/V tiles through tensor descriptors: as the tile table says on Hopper, always, never")
    ap.add_argument("--ptx-version", type=int, default=None,
                    help="PTX ISA version to emit, e.g. 88 when the bundled ptxas says 'Unsupported .version'")
    ap.add_argument("--config", action="append", default=[],
                    help="override as kernel=BM,BN,warps,stages (e.g. fwd=128,64,8,3); repeatable")
    args = ap.parse_args(argv)
    from hf_sparse import parse_pattern
    from hf_sparse.kernels import configs
    from hf_sparse.patterns.base import split_outside_brackets
    if args.tma == "table":  # decide as on an H200 (the inputs here are CPU tensors)
        import hf_sparse.kernels.gradients as kb
        import hf_sparse.kernels.prefill as kp
        from hf_sparse.kernels.launch import _use_tma as use_tma

        def as_on_hopper(c, cfg, *tensors):
            configs.set_tma(cfg.tma)
            try:
                return use_tma(c, cfg, *tensors)
            finally:
                configs.set_tma(None)

        kp._use_tma = kb._use_tma = as_on_hopper
    else:
        configs.set_tma(args.tma == "on")
    configs.apply_overrides(args.config)
    global PTX_VERSION
    PTX_VERSION = args.ptx_version
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    os.environ.pop("TRITON_INTERPRET", None)
    sink = []
    # the launchers call the kernels by the names they import: record the launches there
    import hf_sparse.kernels.decoding as kdec
    import hf_sparse.kernels.gradients as kgrad
    import hf_sparse.kernels.prefill as kpre
    for mod in (kpre, kgrad, kdec):
        for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_preprocess", "_dkdv_global_finish",
                     "_decode_kernel", "_decode_combine", "_ring_append_kernel"):
            if hasattr(mod, name):
                setattr(mod, name, _Recorder(getattr(mod, name), sink))
    patterns = [parse_pattern(p) for p in split_outside_brackets(args.patterns, ";")] if ";" in args.patterns else None
    if patterns is None:
        patterns = [parse_pattern(p) for p in re.split(r",(?=[a-z_]+(?::|,|$))", args.patterns)]
    failures = 0
    print(f"triton {triton.__version__}, target sm_90, dtype {args.dtype}")
    print(f"{'kernel':<18} {'pattern':<42} {'D':>4} {'regs':>5} {'spill':>6} {'smem':>7} wgmma")
    for d in map(int, args.head_dims.split(",")):
        for pat in patterns:
            for varlen in [bool(int(x)) for x in args.varlen.split(",")]:
                sink.clear()
                q = torch.zeros(1, 4, 256, d, dtype=dtype)
                k = torch.zeros(1, 2, 256, d, dtype=dtype)
                ks = kl = None
                if varlen:
                    ks, kl = torch.zeros(1, dtype=torch.int32), torch.full((1,), 256, dtype=torch.int32)
                K.forward(q, k, k, pat, scale=0.1, k_shift=ks, k_len=kl)
                lse = torch.zeros(1, 4, 256)
                K.backward(q, q, k, k, q, lse, pat, scale=0.1, k_shift=ks, k_len=kl)
                if "decode" in args.kernels:  # a decode step over the prefill layout (any pattern)
                    K.forward(q[:, :, :1], k, k, pat, scale=0.1, k_shift=ks, k_len=kl, q_offset=255)
                if "decode" in args.kernels and not varlen and K.kernel_plan(pat, k.shape[1]).r == 0:
                    # one decode step by positions over 4096 slots (GQA packed), and the ring write of a bounded cache
                    kc = torch.zeros(1, 2, 4096, d, dtype=dtype)
                    K.decode_forward(q[:, :, :1], kc, kc, torch.zeros(1, 1, dtype=torch.long),
                                     torch.zeros(1, 4096, dtype=torch.long), pat, scale=0.1)
                    K.ring_append(kc, kc, torch.zeros(1, 4097, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                  k[:, :, :1], k[:, :, :1], None, slots=4096, sinks=4, window=4092)
                for kernel, a, kw, nw, ns in sink:
                    if kernel.fn.__name__ not in args.kernels.split(","):
                        continue
                    r = compile_one(kernel, a, kw, nw, ns)
                    failures += not r["ok"]
                    label = f"{pat.spec()[:34]}{' varlen' if varlen else ''}"
                    print(f"{r['name']:<18} {label:<42} {d:>4} {r['regs']:>5} {r['spill_stores']:>6} "
                          f"{r['shared']:>7} {r['wgmma']}{'  FAILED ' + r['err'][:300] if not r['ok'] else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
