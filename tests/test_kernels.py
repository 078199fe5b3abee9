"""The Triton kernels against the PyTorch reference.

* CPU: under ``TRITON_INTERPRET=1`` the kernels themselves run in Triton's interpreter (tiny shapes,
  float32 / float16: the interpreter's bf16 ``tl.dot`` is wrong). Outputs and gradients of every
  pattern, GQA ratios 1/3/4, lengths off the tile grid, padding, ``q_offset``, softcap.
* GPU (``gpu`` marker): bf16 kernels against a float32 reference, with flash-attention's rule: the
  kernel's error is at most about twice PyTorch's own bf16 error on the same inputs, forward and
  gradients, up to 32k tokens.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, HAS_TRITON, needs_interpreter, padded_rows, pid

from hf_sparse import BigBird, Dense, Longformer, SlidingWindow, sparse_attention
from hf_sparse.reference import SeqLayout, blockwise_backward, blockwise_forward

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA GPU and triton")


def shape_id(b, hq, hkv, t, d) -> str:
    return f"B{b}-T{t}-HQ{hq}-HKV{hkv}-D{d}"


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do)


def _compare(triton_vals, ref_vals, atol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, triton_vals, ref_vals):
        diff = (a.float() - b.float()).abs()
        worst = divmod(int(diff.argmax()), 1)[0]
        msg = f"{name}: max {diff.max():.3e} mean {diff.mean():.3e} at flat index {worst}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert diff.max() <= atol, msg


def _against_reference(q, k, v, do, pattern, *, grads_of, atol=2e-5, **kwargs):
    """Run ``sparse_attention`` on the kernels and on the reference path; compare the outputs and the
    gradients with respect to ``grads_of``. Returns the kernels' ``(out, *grads)``."""
    outs = []
    for backend in ("triton", "reference"):
        o = sparse_attention(q, k, v, pattern, backend=backend, **kwargs)
        outs.append((o, *_grads(o, grads_of, do)))
    _compare(outs[0], outs[1], atol=atol)
    return outs[0]


# ---------------------------------------------------------------------------------------------
# CPU, through Triton's interpreter
PATTERNS_CPU = [
    Dense(),
    SlidingWindow(window=1),
    SlidingWindow(window=7),
    SlidingWindow(window=64),  # window >= T: dense causal
    Longformer(window=9, global_tokens=3),
    Longformer(window=5, global_tokens=20),  # globals wider than a tile
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
    SlidingWindow(window=6, causal=False),
    Longformer(window=6, global_tokens=3, causal=False),
    BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False),
]
SHAPES_CPU = [(2, 4, 4, 37, 16), (1, 3, 1, 40, 32), (1, 8, 2, 33, 16)]  # GQA ratios 1, 3, 4


def _qkv(b, hq, hkv, t, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    return mk(hq).requires_grad_(), mk(hkv).requires_grad_(), mk(hkv).requires_grad_(), mk(hq)


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS_CPU, ids=pid)
def test_interpreter_matches_reference(pattern):
    for i, (b, hq, hkv, t, d) in enumerate(SHAPES_CPU):
        q, k, v, do = _qkv(b, hq, hkv, t, d, seed=i)
        _against_reference(q, k, v, do, pattern, grads_of=(q, k, v))


@needs_interpreter
@pytest.mark.parametrize("pattern", [Dense(), SlidingWindow(window=5), Longformer(window=6, global_tokens=2),
                                     BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1)], ids=pid)
def test_interpreter_padding_and_offset(pattern):
    b, hq, hkv, t, d = 3, 4, 2, 40, 16
    q, k, v, do = _qkv(b, hq, hkv, t, d, seed=3)
    kpm = padded_rows(b, t, right=30)  # left, right, both
    for kwargs in (dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, q_offset=t - 9), dict(q_offset=t - 9)):
        qq = q[:, :, -9:] if "q_offset" in kwargs else q
        dd = do[:, :, -9:] if "q_offset" in kwargs else do
        _against_reference(qq, k, v, dd, pattern, grads_of=(q, k, v), **kwargs)


@needs_interpreter
def test_interpreter_fp16_softcap_odd_head_dim():
    q, k, v, do = _qkv(1, 4, 2, 35, 24, seed=5)  # head_dim 24: padded to 32 inside the kernel
    for pattern in (SlidingWindow(window=8), Dense()):
        _against_reference(q, k, v, do, pattern, grads_of=(q, k, v), softcap=5.0, scale=0.3)
    q16, k16, v16 = (x.detach().half().requires_grad_() for x in (q, k, v))
    o_tr = sparse_attention(q16, k16, v16, SlidingWindow(window=8), backend="triton")
    o_ref = sparse_attention(q16, k16, v16, SlidingWindow(window=8), backend="reference")
    assert (o_tr.float() - o_ref.float()).abs().max() < 2e-3


@needs_interpreter
@pytest.mark.parametrize("decode_rows", [64, 0], ids=["decode-kernel", "prefill-kernel"])
def test_interpreter_rows_without_keys_are_zero(decode_rows, monkeypatch):
    # queries past the keys with a short window see nothing: zeros, finite gradients (both forward kernels)
    import hf_sparse.kernels.prefill as kernels

    monkeypatch.setattr(kernels, "_DECODE_MAX_ROWS", decode_rows)
    q, k, v, do = _qkv(1, 2, 1, 20, 16, seed=7)
    qq = q[:, :, :5]
    o = sparse_attention(qq, k[:, :, :4], v[:, :, :4], SlidingWindow(window=2), q_offset=10, backend="triton")
    assert torch.equal(o, torch.zeros_like(o))
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do[:, :, :5])
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv))


# ---------------------------------------------------------------------------------------------
# GPU: bf16 against a float32 reference, flash-attention's error rule
GPU_PATTERNS = [
    Dense(),
    SlidingWindow(window=256),
    Longformer(window=512, global_tokens=4),
    BigBird(),
    BigBird(block=128, window_blocks=2, global_blocks=1, random_blocks=3),
    SlidingWindow(window=300, causal=False),
]
GPU_SHAPES = [(1, 8, 2, 1000, 64), (2, 9, 3, 4113, 64), (1, 8, 8, 2049, 128), (1, 4, 1, 32768, 128)]


def _bf16_rule(b, hq, hkv, t, d, pattern, *, key_padding_mask=None, q_offset=0):
    q, k, v, do = _qkv(b, hq, hkv, t, d, dtype=torch.bfloat16, seed=t + d, device="cuda")
    qq, dd = (q[:, :, q_offset:], do[:, :, q_offset:]) if q_offset else (q, do)
    o = sparse_attention(qq, k, v, pattern, backend="triton", key_padding_mask=key_padding_mask, q_offset=q_offset)
    ours = (o, *_grads(o, (q, k, v), dd))
    seq = SeqLayout.build(b, qq.shape[2], t, q_offset)
    if key_padding_mask is not None:
        from hf_sparse.ops import padding_layout

        seq = SeqLayout.build(b, qq.shape[2], t, q_offset, *padding_layout(key_padding_mask))
    scale = d**-0.5

    def reference(dtype, compute):
        qr, kr, vr = (x.detach().to(dtype) for x in (qq, k, v))
        out, lse = blockwise_forward(qr, kr, vr, pattern, scale=scale, softcap=0.0, seq=seq, compute_dtype=compute)
        grads = blockwise_backward(dd.to(dtype), qr, kr, vr, out, lse, pattern, scale=scale, softcap=0.0, seq=seq,
                                   compute_dtype=compute)
        dq = torch.zeros_like(q, dtype=dtype)
        dq[:, :, q_offset:] = grads[0]
        return out, dq, grads[1], grads[2]

    ref = reference(torch.float32, torch.float32)
    torch_bf16 = reference(torch.bfloat16, torch.bfloat16)
    for name, a, r, p in zip(("out", "dq", "dk", "dv"), ours, ref, torch_bf16):
        err = (a.float() - r).abs().max().item()
        err_pt = (p.float() - r).abs().max().item()
        assert torch.isfinite(a).all(), name
        print(f"{name}: ours {err:.3e} vs torch-bf16 {err_pt:.3e}")
        assert err <= 2 * err_pt + 1e-4, f"{name}: kernel error {err:.3e} > 2 x PyTorch bf16 error {err_pt:.3e}"


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: shape_id(*s))
@pytest.mark.parametrize("pattern", GPU_PATTERNS, ids=pid)
def test_gpu_bf16_error_rule(pattern, shape):
    _bf16_rule(*shape, pattern)


@gpu
@needs_gpu
@pytest.mark.parametrize("pattern", GPU_PATTERNS[:4], ids=pid)
def test_gpu_bf16_padding_and_offset(pattern):
    b, t = 3, 3000
    kpm = torch.ones(b, t, dtype=torch.bool, device="cuda")
    kpm[0, :517] = False
    kpm[1, 2100:] = False
    kpm[2, :5] = False
    kpm[2, 2990:] = False
    _bf16_rule(b, 8, 2, t, 128, pattern, key_padding_mask=kpm)
    _bf16_rule(b, 8, 2, t, 64, pattern, key_padding_mask=kpm, q_offset=t - 700)


@gpu
@needs_gpu
@pytest.mark.parametrize("pattern", GPU_PATTERNS, ids=pid)
def test_gpu_bf16_decode_shapes(pattern):
    # one and four queries after a long prompt: the split-key decode kernel (GQA packed), and its lse in
    # the backward, by the same bf16 rule
    _bf16_rule(2, 32, 8, 8192, 128, pattern, q_offset=8191)
    _bf16_rule(1, 9, 3, 4113, 64, pattern, q_offset=4109)


@gpu
@needs_gpu
@pytest.mark.parametrize("pattern", [SlidingWindow(window=1000), Longformer(window=1000, global_tokens=4),
                                     Longformer(window=1000, global_tokens=4, causal=False)], ids=pid)
def test_gpu_decode_by_positions(pattern):
    # a bounded cache's slots (sinks, then a ring in no position order, empty slots) on the decode kernel
    # against the float32 PyTorch path
    from hf_sparse.decode import attention_with_positions

    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, s, d = 3, 32, 8, 1004, 128
    q = torch.randn(b, hq, 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, s, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    k_pos = torch.stack([torch.randperm(5000, device="cuda", generator=g)[:s] for _ in range(b)])
    k_pos[1, 100:200] = -1
    q_pos = torch.tensor([[5000], [4500], [-1]], device="cuda")
    ours = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend="triton")
    ref = attention_with_positions(q.float(), k.float(), v.float(), pattern, q_pos=q_pos, k_pos=k_pos,
                                   backend="reference")
    torch_bf16 = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend="reference")
    err, err_pt = ((x.float() - ref).abs().max().item() for x in (ours, torch_bf16))
    assert err <= 2 * err_pt + 1e-4, (err, err_pt)
    assert torch.equal(ours[2], torch.zeros_like(ours[2]))


@gpu
@needs_gpu
def test_gpu_long_sequence_memory_is_linear():
    # 128k tokens forward+backward through the sliding window: no T x T buffer anywhere
    t, d = 131072, 128
    q, k, v, do = _qkv(1, 8, 2, t, d, dtype=torch.bfloat16, seed=1, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    o = sparse_attention(q, k, v, SlidingWindow(window=4096), backend="triton")
    o.backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v, do))
    # out, lse, delta and the three gradients: a few times the inputs, O(T * D); a bf16 T x T matrix is 32 GiB
    assert extra < 3 * inputs, f"peak extra memory {extra / 2**30:.2f} GiB for {inputs / 2**30:.2f} GiB of inputs"
    assert torch.isfinite(q.grad).all()


@needs_interpreter
@pytest.mark.parametrize("pattern", [Dense(), SlidingWindow(window=21), Longformer(window=9, global_tokens=5),
                                     BigBird(block=32, window_blocks=2, global_blocks=1, random_blocks=1)], ids=pid)
def test_interpreter_rectangular_tiles(pattern):
    # the GPU configs use tiles with block_m != block_n (dq 128x64, dkdv 64x64 or 64x128, fwd 64x64): run the
    # same index arithmetic with rectangular tiles here, forward and both backward kernels
    from hf_sparse.kernels import configs

    tiles = {"fwd": configs.KernelConfig(32, 16, 4, 2), "dq": configs.KernelConfig(32, 16, 4, 2),
             "dkdv": configs.KernelConfig(16, 32, 4, 2)}
    try:
        for name, cfg in tiles.items():
            configs.override(name, cfg)
        b, hq, hkv, t, d = 2, 4, 2, 75, 16
        q, k, v, do = _qkv(b, hq, hkv, t, d, seed=11)
        kpm = torch.ones(b, t, dtype=torch.bool)
        kpm[1, :13] = False
        for kwargs in (dict(), dict(key_padding_mask=kpm)):
            _against_reference(q, k, v, do, pattern, grads_of=(q, k, v), **kwargs)
    finally:
        for name in tiles:
            configs.override(name, None)


@needs_interpreter
@pytest.mark.parametrize("pack", [False, True], ids=["head-per-program", "gqa-packed"])
@pytest.mark.parametrize("pattern", [SlidingWindow(window=11), Longformer(window=6, global_tokens=3, causal=False),
                                     BigBird(block=32, window_blocks=1, global_blocks=1, random_blocks=2),
                                     BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1,
                                             causal=False)], ids=pid)
def test_interpreter_gqa_packing_paths_agree(pattern, pack):
    # forward and dQ tiles hold (position, head) pairs of one GQA group, or one head: with groups of 3 (tiles
    # cut positions mid-group) and 4, 32-row tiles over 16- and 32-token BigBird blocks, padding and q_offset
    from hf_sparse.kernels import configs

    for name in ("fwd", "dq"):
        configs.override(name, configs.KernelConfig(32, 16, 4, 2, pack=pack))
    try:
        for i, (b, hq, hkv) in enumerate([(2, 6, 2), (1, 4, 1)]):
            q, k, v, do = _qkv(b, hq, hkv, 45, 16, seed=20 + i)
            kpm = torch.ones(b, 45, dtype=torch.bool)
            kpm[0, :5] = False
            qq, dd = q[:, :, 21:], do[:, :, 21:]
            _against_reference(q, k, v, do, pattern, grads_of=(q, k, v), key_padding_mask=kpm)
            _against_reference(qq, k, v, dd, pattern, grads_of=(q, k, v), q_offset=21)
    finally:
        for name in ("fwd", "dq"):
            configs.override(name, None)


@needs_interpreter
@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tensor-descriptors"])
@pytest.mark.parametrize("pattern", [Dense(), Longformer(window=9, global_tokens=3),
                                     BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
                                     SlidingWindow(window=10, causal=False)], ids=pid)
def test_interpreter_load_paths_agree(pattern, tma):
    # interior tiles load through tensor descriptors (the copy engine) on Hopper and through pointers
    # elsewhere: both paths against the reference, with a q_offset whose rows straddle a tile start
    from hf_sparse.kernels import configs

    configs.set_tma(tma)
    try:
        q, k, v, do = _qkv(1, 4, 2, 53, 16, seed=5)
        qq, dd = q[:, :, 19:], do[:, :, 19:]
        _against_reference(qq, k, v, dd, pattern, grads_of=(q, k, v), q_offset=19)
    finally:
        configs.set_tma(None)


@needs_interpreter
@pytest.mark.parametrize(("pattern", "tma"), [
    (SlidingWindow(window=5), True), (Longformer(window=6, global_tokens=2), True),
    (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1), True),
    (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1), False),
], ids=lambda x: ("tensor-descriptors" if x else "pointer-loads") if isinstance(x, bool) else pid(x))
def test_interpreter_padding_contents_never_reach_the_results(pattern, tma):
    # padded query rows and key slots filled with NaN give the results of zero-filled ones: no load path
    # (the dK/dV kernel reads padded query tiles through tensor descriptors too) lets them in
    from hf_sparse.kernels import configs

    b, hq, hkv, t, d = 3, 4, 2, 40, 16
    kpm = padded_rows(b, t, right=29)
    configs.set_tma(tma)
    try:
        for tq in (t, 35, 9):  # the prefill kernels from position 0 and from 5; the decode kernel
            rows = kpm[:, t - tq:]  # a query row is padding where its slot is
            runs = []
            for fill in (float("nan"), 0.0):
                q, k, v, do = _qkv(b, hq, hkv, t, d, seed=6)
                with torch.no_grad():
                    for x, pad in ((q, ~kpm), (k, ~kpm), (v, ~kpm), (do, ~kpm)):
                        x.masked_fill_(pad[:, None, :, None], fill)
                qq, dd = q[:, :, t - tq:], do[:, :, t - tq:]
                o = sparse_attention(qq, k, v, pattern, backend="triton", key_padding_mask=kpm, q_offset=t - tq)
                runs.append((o, *_grads(o, (q, k, v), dd)))
            for name, got, want in zip(("out", "dq", "dk", "dv"), *runs):
                assert torch.isfinite(got).all(), f"{pattern.spec()} {name} tq={tq}: padding reached the result"
                torch.testing.assert_close(got, want, atol=0, rtol=0)
            assert (runs[1][0][~rows[:, None, :].expand(-1, hq, -1)] == 0).all()
        q, k, v, do = _qkv(b, hq, hkv, t, d, seed=6)
        _against_reference(q, k, v, do, pattern, grads_of=(q, k, v), key_padding_mask=kpm)
    finally:
        configs.set_tma(None)


@needs_interpreter
@pytest.mark.parametrize("d", [16, 24], ids=["d16-tensor-descriptors", "d24-pointer-loads"])
def test_interpreter_padding_contents_per_head_plan_hf_layout(d, monkeypatch):
    # [B, T, H, D] inputs (transposed views: descriptors over strided tensors, head dim 24 has none), a non-causal
    # per-head plan whose backward runs one launch per head rule, softcap, padding on either side and a row with no
    # key at all, queries from position 5 (rows before a row's first token) and the decode kernel's three: NaN in
    # the padding gives the zero-filled results, and those match the reference
    from hf_sparse import parse_pattern
    from hf_sparse.kernels import configs

    if d == 16:
        monkeypatch.setitem(configs._SETTINGS, "tma", True)
    pattern = parse_pattern("per_head[longformer:window=4,global_tokens=3,causal=false;1=sliding_window:window=6,"
                            "causal=false]")
    b, hq, hkv, t = 4, 4, 2, 40
    kpm = padded_rows(b, t, right=29)
    kpm[3] = False
    for tq in (35, 3):
        kw = dict(key_padding_mask=kpm, q_offset=t - tq, softcap=3.0)
        runs = []
        for fill in (float("nan"), 0.0):
            q, k, v, do = (x.detach().transpose(1, 2).contiguous().transpose(1, 2)
                           for x in _qkv(b, hq, hkv, t, d, seed=7))
            for x in (q, k, v, do):
                x.masked_fill_(~kpm[:, None, :, None], fill)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            o = sparse_attention(q[:, :, t - tq:], k, v, pattern, backend="triton", **kw)
            runs.append((o, *_grads(o, (q, k, v), do[:, :, t - tq:])))
        for name, got, want in zip(("out", "dq", "dk", "dv"), *runs):
            assert torch.isfinite(got).all(), f"{name} tq={tq}: padding reached the result"
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert (runs[1][0][3] == 0).all() and (runs[1][3][3] == 0).all()  # the row without keys
        o = sparse_attention(q[:, :, t - tq:], k, v, pattern, backend="reference", **kw)
        _compare(runs[1], (o, *_grads(o, (q, k, v), do[:, :, t - tq:])), atol=2e-5)


@needs_interpreter
@pytest.mark.parametrize("pattern", [Longformer(window=20, global_tokens=3),
                                     BigBird(block=16, window_blocks=3, global_blocks=2, random_blocks=2),
                                     Longformer(window=12, global_tokens=20, causal=False)], ids=pid)
def test_interpreter_global_key_tiles_split_over_programs(pattern, monkeypatch):
    # dK/dV of the key tiles holding global keys is shared out over several programs (one query tile
    # each here) and summed by atomics: same gradients as the reference, padded batches included
    import hf_sparse.kernels.gradients as kernels

    monkeypatch.setattr(kernels, "_SPLIT_TILES", 1)
    b, hq, hkv, t, d = 2, 4, 2, 70, 16
    q, k, v, do = _qkv(b, hq, hkv, t, d, seed=3)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :9] = False
    kpm[1, 60:] = False
    for kwargs in (dict(), dict(key_padding_mask=kpm)):
        _against_reference(q, k, v, do, pattern, grads_of=(q, k, v), **kwargs)


@needs_interpreter
@pytest.mark.parametrize("tq", [1, 5])
@pytest.mark.parametrize("pattern", [SlidingWindow(window=7), Longformer(window=6, global_tokens=3), Dense(),
                                     SlidingWindow(window=5, causal=False),
                                     Longformer(window=4, global_tokens=2, causal=False)], ids=pid)
def test_interpreter_decode_kernel_matches_positions_reference(pattern, tq):
    # the decode kernel (GQA packed, split over slots) against the PyTorch path of attention_with_positions:
    # slots in no position order, empty slots (-1), a padded query (-1), softcap, fp32 and fp16
    from hf_sparse.decode import attention_with_positions

    g = torch.Generator().manual_seed(tq)
    b, hq, hkv, s, d = 2, 6, 2, 37, 16
    for dtype, softcap, tol in ((torch.float32, 0.0, 2e-6), (torch.float16, 5.0, 2e-3)):
        q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
        k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
        k_pos = torch.stack([torch.randperm(60, generator=g)[:s] for _ in range(b)])
        k_pos[0, :4] = -1
        q_pos = torch.stack([torch.arange(tq) + 50, torch.arange(tq) + 40])
        q_pos[1, 0] = -1
        out = [attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, softcap=softcap, backend=be)
               for be in ("triton", "reference")]
        assert (out[0].float() - out[1].float()).abs().max() < tol
        assert torch.equal(out[0][1, :, 0], torch.zeros_like(out[0][1, :, 0]))  # the padded query
        # what an empty slot holds never reaches a row (a score masked to -inf still multiplies its value)
        k[0, :, :4], v[0, :, :4] = float("nan"), float("inf")
        poisoned = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, softcap=softcap,
                                            backend="triton")
        assert torch.equal(poisoned, out[0])


@needs_interpreter
def test_decode_kernel_refusals_say_why():
    from hf_sparse.decode import attention_with_positions

    q, k, v, _ = _qkv(1, 4, 2, 20, 16, seed=2)
    pos = torch.arange(20).view(1, 20)
    with pytest.raises(ValueError, match="backend='triton' cannot run this decode: patterns with extra .random. blocks"):
        attention_with_positions(q, k, v, BigBird(block=16), q_pos=pos, k_pos=pos, backend="triton")
    with pytest.raises(ValueError, match="gradients are needed"):
        attention_with_positions(q.requires_grad_(), k, v, "dense", q_pos=pos, k_pos=pos, backend="triton")
    with pytest.raises(ValueError, match="backend='flash' is not one of"):
        attention_with_positions(q, k, v, "dense", q_pos=pos, k_pos=pos, backend="flash")
    # automatic choice on the CPU: the differentiable PyTorch path
    o = attention_with_positions(q, k, v, "dense", q_pos=pos, k_pos=pos)
    assert o.requires_grad


DECODE_PATTERNS = [Dense(), SlidingWindow(window=9), Longformer(window=7, global_tokens=3),
                   BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
                   BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False),
                   SlidingWindow(window=6, causal=False), Longformer(window=5, global_tokens=4, causal=False)]


@needs_interpreter
@pytest.mark.parametrize("pattern", DECODE_PATTERNS, ids=pid)
def test_interpreter_few_queries_run_the_decode_kernel(pattern, monkeypatch):
    # sparse_attention with a few queries (decode, the first chunk after a prompt) runs the split-key decode
    # kernel; its log-sum-exp feeds the usual backward. Against the reference: outputs and gradients, padded
    # rows, queries at the end and at the start (global query rows of non-causal patterns)
    import hf_sparse.kernels.prefill as kernels

    calls = []
    decode = kernels._decode
    monkeypatch.setattr(kernels, "_decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    b, hq, hkv, t, d = 2, 4, 2, 90, 16
    q, k, v, do = _qkv(b, hq, hkv, t, d, seed=9)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :11] = False
    kpm[1, 85:] = False
    for tq, q_offset, kwargs in ((1, 89, {}), (3, 80, dict(key_padding_mask=kpm)), (2, 11, dict(key_padding_mask=kpm))):
        qq, dd = q[:, :, :tq], do[:, :, :tq]
        _against_reference(qq, k, v, dd, pattern, grads_of=(q, k, v), q_offset=q_offset, layer=1, **kwargs)
    assert len(calls) == 3


@needs_interpreter
@pytest.mark.parametrize("decode_rows", [64, 0], ids=["decode-kernel", "prefill-kernel"])
def test_interpreter_queries_past_the_keys_and_empty_inputs(decode_rows, monkeypatch):
    # without padding, queries placed after the last key (q_offset + Tq > Tk) are real rows that see every
    # key their pattern allows (both forward kernels); zero queries or zero keys give empty / zero outputs
    import hf_sparse.kernels.prefill as kernels

    monkeypatch.setattr(kernels, "_DECODE_MAX_ROWS", decode_rows)
    q, k, v, do = _qkv(1, 2, 1, 16, 16, seed=4)
    for pattern in (Dense(), SlidingWindow(window=20)):
        ours = _against_reference(q[:, :, :3], k[:, :, :4], v[:, :, :4], do[:, :, :3], pattern, grads_of=(q, k, v),
                                  q_offset=10)
        assert ours[0].abs().sum() > 0
    for qq, kk in ((q[:, :, :0], k), (q[:, :, :2], k[:, :, :0])):
        outs = [sparse_attention(qq, kk, kk, "dense", backend=backend) for backend in ("triton", "reference")]
        assert outs[0].shape == outs[1].shape == qq.shape and torch.equal(outs[0], outs[1])


def test_parse_kernel_config_override():
    from hf_sparse.kernels.configs import KernelConfig, parse_override

    assert parse_override("dkdv=64,128,8,2") == ("dkdv", None, KernelConfig(64, 128, 8, 2, True))
    assert parse_override("fwd@1=64,64,4,3,0") == ("fwd", 1, KernelConfig(64, 64, 4, 3, False))
    assert parse_override("dq=64,64,4,3,1,0") == ("dq", None, KernelConfig(64, 64, 4, 3, True, False))
    assert parse_override("fwd=64,64,4,2,1,0,168") == ("fwd", None, KernelConfig(64, 64, 4, 2, True, False, 168))
    assert KernelConfig(64, 64, 4, 2, maxnreg=168).launch_options() == dict(num_warps=4, num_stages=2, maxnreg=168)
    assert KernelConfig(64, 64, 4, 2).launch_options() == dict(num_warps=4, num_stages=2)
    from hf_sparse.kernels import configs

    configs.apply_overrides(["dkdv@1=32,64,4,3"])  # the --config options of the benchmark and scripts
    try:
        assert configs.pick_config("dkdv", head_dim=128, kind=1, blk=64, dtype=torch.bfloat16,
                                   interpret=False) == KernelConfig(32, 64, 4, 3)
        assert configs.pick_config("dkdv", head_dim=128, kind=0, blk=64, dtype=torch.bfloat16,
                                   interpret=False) != KernelConfig(32, 64, 4, 3)
    finally:
        configs.override("dkdv", None, kind=1)
    for bad in ("dkdv=64,128,8", "attn=64,64,4,3", "fwd@2=64,64,4,3", "fwd=a,b,c,d"):
        with pytest.raises(ValueError, match="bad kernel config"):
            parse_override(bad)


@needs_interpreter
def test_forcing_tensor_descriptors_on_unfit_inputs_says_why():
    from hf_sparse.kernels import configs

    q, k, v, _ = _qkv(1, 2, 1, 40, 24, seed=1)  # head dim 24: tiles are padded to 32, no descriptor
    configs.set_tma(True)
    try:
        with pytest.raises(ValueError, match=r"set_tma\(True\) but .*head dim 24"):
            sparse_attention(q, k, v, "sliding_window:window=4", backend="triton")
    finally:
        configs.set_tma(None)
    o = sparse_attention(q, k, v, "sliding_window:window=4", backend="triton")  # automatic: pointer loads
    r = sparse_attention(q, k, v, "sliding_window:window=4", backend="reference")
    assert (o - r).abs().max() < 2e-5
    with pytest.raises(ValueError, match="set_tma takes True, False or None"):
        configs.set_tma("yes")
    with pytest.raises(ValueError, match="set_pack takes True, False or None"):
        configs.set_pack("on")


@needs_interpreter
@pytest.mark.parametrize("pattern", ["longformer:window=8,global_tokens=2", "bigbird:block=16,window_blocks=1,"
                                     "global_blocks=1,random_blocks=1"])
def test_interpreter_training_steps_match_reference(pattern):
    # Liger's convergence check: a patched tiny model trained a few steps on the kernels gives the same
    # losses (and weights) as the same model trained on the reference path
    transformers = pytest.importorskip("transformers")
    from hf_sparse import patch_model

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    losses, weights = {}, {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        patch_model(model, pattern, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses[backend] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
        weights[backend] = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert losses["triton"] == pytest.approx(losses["reference"], abs=1e-5), losses
    assert losses["triton"][-1] < losses["triton"][0]
    assert torch.allclose(weights["triton"], weights["reference"], atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_tensor_descriptor_eligibility():
    from hf_sparse.kernels import _tma_compatible

    x = torch.zeros(2, 8, 4, 64, dtype=torch.bfloat16)
    assert _tma_compatible(x)
    assert _tma_compatible(torch.zeros(2, 64, 4, 64, dtype=torch.bfloat16).transpose(1, 2))  # HF's q/k/v views
    assert not _tma_compatible(x[..., 1:33])  # base 2 bytes past alignment
    assert _tma_compatible(torch.zeros(2, 8, 4, 24, dtype=torch.bfloat16)[..., :20])  # 48-byte rows (head dims: _use_tma)
    assert not _tma_compatible(x.transpose(2, 3))  # last dim not contiguous
    assert not _tma_compatible(torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16).expand(2, 8, 4, 64))  # stride 0
    assert not _tma_compatible(torch.zeros(2, 0, 4, 64, dtype=torch.bfloat16))
    assert not _tma_compatible(torch.zeros(2, 8, 4, 12, dtype=torch.bfloat16))  # 24-byte rows
