"""The one-pass backward (``KernelConfig.fuse_dq``, ``configs.set_fuse_dq``).

The dK/dV kernel also adds each (query tile, key tile) share of dQ, ``dS K``, into an fp32 buffer and the dQ
kernel does not run. The CPU tests run it in Triton's interpreter (fp32 atomics: the interpreter has no bulk
reduction) against the reference path, outputs and the three gradients, with a launcher spy that fails the
test if the dQ kernel runs or the dK/dV kernel runs unfused. The GPU tests (bf16, the copy engine's bulk
reduction and fp32 atomics) are in ``test_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_interpreter, pid

from hf_sparse import BigBird, Dense, Longformer, SlidingWindow, sparse_attention

pytestmark = [needs_interpreter, pytest.mark.usefixtures("one_thread")]

PATTERNS = [
    Dense(),
    SlidingWindow(window=7),
    SlidingWindow(window=1),
    Longformer(window=9, global_tokens=3),
    Longformer(window=5, global_tokens=20),  # globals wider than a tile
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
    SlidingWindow(window=6, causal=False),
    Longformer(window=6, global_tokens=3, causal=False),  # global query rows: dQ from every key tile
    BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False),
]


class _Spy:
    """Records the dK/dV launches' ``FUSED_DQ`` and fails on any dQ kernel launch."""

    def __init__(self, monkeypatch):
        import hf_sparse.kernels as kernels

        self.fused: list[bool] = []
        self.dq_launches = 0
        dkdv = kernels._bwd_dkdv_kernel
        dq = kernels._bwd_dq_kernel
        spy = self

        class DkDv:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.fused.append(kwargs["FUSED_DQ"])
                    return dkdv[grid](*args, **kwargs)
                return launch

        class Dq:
            def __getitem__(self, grid):
                spy.dq_launches += 1
                return dq[grid]

        monkeypatch.setattr(kernels, "_bwd_dkdv_kernel", DkDv())
        monkeypatch.setattr(kernels, "_bwd_dq_kernel", Dq())


@pytest.fixture
def fused(monkeypatch):
    from hf_sparse.kernels import configs

    spy = _Spy(monkeypatch)
    configs.set_fuse_dq(True)
    yield spy
    configs.set_fuse_dq(None)
    configs.set_tma(None)
    for name in ("fwd", "dq", "dkdv"):
        configs.override(name, None)
    assert spy.fused and all(spy.fused), f"the dK/dV kernel ran unfused: {spy.fused}"
    assert spy.dq_launches == 0, "the dQ kernel ran although the backward was fused"


def _qkv(b, hq, hkv, tq, tk, d, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, t: torch.randn(b, h, t, d, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(hq, tq), mk(hkv, tk), mk(hkv, tk)
    return q, k, v, torch.randn(b, hq, tq, d, generator=g).to(dtype)


def _check(q, k, v, do, pattern, *, atol=3e-5, **kwargs):
    """Kernels (as configured) against the reference: out, dq, dk, dv."""
    res = []
    for backend in ("triton", "reference"):
        o = sparse_attention(q, k, v, pattern, backend=backend, **kwargs)
        res.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for name, a, r in zip(("out", "dq", "dk", "dv"), *res):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = (a.float() - r.float()).abs().max().item()
        assert err <= atol, f"{name}: max error {err:.3e}"
    return res[0]


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tensor-descriptors"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_fused_backward_matches_reference(fused, pattern, tma):
    from hf_sparse.kernels import configs

    configs.set_tma(tma)
    q, k, v, do = _qkv(2, 6, 2, 45, 45, 16, seed=7)  # GQA group 3, a partial last tile
    _check(q, k, v, do, pattern)


@pytest.mark.parametrize("pattern", [SlidingWindow(window=5), Longformer(window=6, global_tokens=2),
                                     BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1)], ids=pid)
def test_fused_backward_padding_and_offset(fused, pattern):
    # padded rows (pointer atomics masked per row) and a q_offset whose first row is not tile-aligned
    b, t = 3, 40
    q, k, v, do = _qkv(b, 4, 2, t, t, 16, seed=3)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :7] = False
    kpm[1, 30:] = False
    kpm[2, :3] = False
    kpm[2, 37:] = False
    _check(q, k, v, do, pattern, key_padding_mask=kpm)
    # the kernels' gradients of padded query rows must be exactly zero, as the reference's
    out = sparse_attention(q, k, v, pattern, backend="triton", key_padding_mask=kpm)
    dq = torch.autograd.grad(out, q, do)[0]
    assert (dq[0, :, :7] == 0).all() and (dq[1, :, 30:] == 0).all()
    qq, dd = q[:, :, -9:], do[:, :, -9:]
    res = []
    for backend in ("triton", "reference"):
        o = sparse_attention(qq, k, v, pattern, backend=backend, q_offset=t - 9)
        res.append(torch.autograd.grad(o, (q, k, v), dd))
    for a, r in zip(*res):
        assert (a - r).abs().max() <= 3e-5


def test_fused_backward_softcap_scale_odd_head_dim_fp16(fused):
    # head dim 24: the fp32 dQ buffer has 32 columns (the tile's), the result is cut back to 24
    q, k, v, do = _qkv(1, 4, 2, 35, 35, 24, seed=5)
    for pattern in (SlidingWindow(window=8), Dense()):
        dq = _check(q, k, v, do, pattern, softcap=5.0, scale=0.3)[1]
        assert dq.shape == q.shape and dq.is_contiguous()
    q16, k16, v16 = (x.detach().half().requires_grad_() for x in (q, k, v))
    ours = _check(q16, k16, v16, do.half(), SlidingWindow(window=8), atol=4e-3)
    assert all(x.dtype == torch.float16 for x in ours)


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=["16x32", "32x16"])
@pytest.mark.parametrize("pattern", [Longformer(window=20, global_tokens=3),
                                     BigBird(block=32, window_blocks=2, global_blocks=1, random_blocks=1),
                                     Longformer(window=12, global_tokens=20, causal=False)], ids=pid)
def test_fused_backward_tiles_and_split_global_tiles(fused, pattern, tiles, monkeypatch):
    # the fused mode from the tile config (atomics, mode 2), rectangular dK/dV tiles, and the key tiles
    # holding global keys shared out over programs of one query tile each (their dQ shares add up too)
    import hf_sparse.kernels as kernels
    from hf_sparse.kernels import configs

    configs.set_fuse_dq(None)
    configs.override("dkdv", configs.KernelConfig(*tiles, 4, 2, fuse_dq=2))
    monkeypatch.setattr(kernels, "_SPLIT_TILES", 1)
    b, t = 2, 70
    q, k, v, do = _qkv(b, 4, 2, t, t, 16, seed=3)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :9] = False
    kpm[1, 60:] = False
    _check(q, k, v, do, pattern)
    _check(q, k, v, do, pattern, key_padding_mask=kpm)


def test_set_fuse_dq_off_runs_the_dq_kernel(monkeypatch):
    # set_fuse_dq(False) wins over a fused tile config; both give the reference's gradients
    from hf_sparse.kernels import configs

    spy = _Spy(monkeypatch)
    configs.override("dkdv", configs.KernelConfig(16, 16, 1, 1, fuse_dq=2))
    q, k, v, do = _qkv(1, 4, 2, 30, 30, 16, seed=2)
    try:
        configs.set_fuse_dq(False)
        _check(q, k, v, do, SlidingWindow(window=6))
        assert spy.fused == [False] and spy.dq_launches == 1
        configs.set_fuse_dq(None)
        _check(q, k, v, do, SlidingWindow(window=6))
        assert spy.fused == [False, True] and spy.dq_launches == 1
    finally:
        configs.set_fuse_dq(None)
        configs.override("dkdv", None)
    with pytest.raises(ValueError, match="set_fuse_dq takes True, False or None"):
        configs.set_fuse_dq("on")
