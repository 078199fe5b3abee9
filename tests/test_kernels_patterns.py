"""Strided, fixed, unions and per-head plans on the Triton kernels (interpreter) against the dense oracle.

The oracle (``backend="dense"``) builds the full mask from ``Pattern.allowed``, whose rules
``tests/test_patterns.py`` checks against loops over the issue's definitions. Forward and backward,
GQA, odd lengths, padding, ``q_offset``, the decode kernel (few queries) and decode by positions.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, HAS_TRITON, needs_interpreter, pid

from hf_sparse import (
    BigBird,
    Dense,
    Fixed,
    Longformer,
    PerHead,
    SlidingWindow,
    Strided,
    parse_pattern,
    sparse_attention,
)
from hf_sparse.decode import attention_with_positions
from hf_sparse.kernels.plan import kernel_plan, kernel_unfit

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = [
    Strided(stride=5, window=3),
    Strided(stride=16, window=1),
    Strided(stride=7),
    Fixed(block=16, summary=3),
    Fixed(block=32, summary=32),
    parse_pattern("chunked:chunk=16"),
    SlidingWindow(window=9) | Strided(stride=6, window=1),
    Longformer(window=5, global_tokens=3) | Strided(stride=11, window=2),
    # extra blocks that may overlap another member's keys: visited masked, each pair counted once
    SlidingWindow(window=40) | BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=2),
    Fixed(block=16, summary=2) | SlidingWindow(window=20),
    PerHead(SlidingWindow(window=6), ((0, Dense()),)),
    PerHead(Longformer(window=5, global_tokens=2), ((1, Strided(stride=4, window=2)),)),
    # a token band and a block band in one launch, with random blocks on one head only
    PerHead(SlidingWindow(window=7), ((0, BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2)),)),
]
SHAPES = [(2, 4, 2, 53, 16), (1, 6, 2, 70, 32)]  # GQA 2 and 3, lengths off the tile


def _qkv(b, hq, hkv, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g)
    return mk(hq).requires_grad_(), mk(hkv).requires_grad_(), mk(hkv).requires_grad_(), mk(hq)


def _run(q, k, v, do, pattern, backend, grads_of, **kw):
    o = sparse_attention(q, k, v, pattern, backend=backend, **kw)
    return (o, *torch.autograd.grad(o, grads_of, do))


def _assert_matches_oracle(q, k, v, do, pattern, grads_of, atol=3e-5, **kw):
    ours = _run(q, k, v, do, pattern, "triton", grads_of, **kw)
    want = _run(q, k, v, do, pattern, "dense", grads_of, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, want):
        diff = (a - b).abs()
        assert diff.max() <= atol, f"{pattern.spec()} {name}: max {diff.max():.2e} at {int(diff.argmax())}"


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_kernels_match_oracle(pattern):
    assert kernel_unfit(pattern, 2) is None
    for i, shape in enumerate(SHAPES):
        q, k, v, do = _qkv(*shape, seed=i)
        _assert_matches_oracle(q, k, v, do, pattern, (q, k, v))


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS[::2], ids=pid)
def test_kernels_padding_and_q_offset(pattern):
    b, hq, hkv, t, d = 3, 4, 2, 45, 16
    q, k, v, do = _qkv(b, hq, hkv, t, d, seed=3)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :7] = False
    kpm[1, 38:] = False
    kpm[2, :3] = False
    for kw in (dict(key_padding_mask=kpm), dict(q_offset=t - 20), dict(key_padding_mask=kpm, q_offset=t - 20)):
        qq, dd = (q[:, :, -20:], do[:, :, -20:]) if "q_offset" in kw else (q, do)
        _assert_matches_oracle(qq, k, v, dd, pattern, (q, k, v), **kw)


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_decode_kernel_few_queries(pattern, monkeypatch):
    # one and three new queries after a prompt: the split-key decode kernel (and its lse for the backward)
    import hf_sparse.kernels.prefill as kernels

    calls = []
    decode = kernels._decode
    monkeypatch.setattr(kernels, "_decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    q, k, v, do = _qkv(2, 4, 2, 61, 16, seed=5)
    for tq in (1, 3):
        _assert_matches_oracle(q[:, :, -tq:], k, v, do[:, :, -tq:], pattern, (q, k, v), q_offset=61 - tq)
    assert calls


@needs_interpreter
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if not kernel_plan(p, 2).r], ids=pid)
def test_decode_by_positions(pattern):
    # slots in scrambled order with empty slots: the decode kernel by positions against the PyTorch path
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    k_pos = torch.stack([torch.randperm(60)[:48] for _ in range(2)])
    k_pos[0, :5] = -1
    q_pos = torch.tensor([[59], [57]])
    ours = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend="triton")
    want = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend="reference")
    assert (ours - want).abs().max() < 3e-5


@needs_interpreter
def test_predicate_only_patterns_say_what_the_kernels_need():
    p = Fixed(block=6, summary=2)  # no power of two: no kernel primitives
    q, k, v, _ = _qkv(1, 2, 1, 20, 16)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: pattern 'fixed:block=6,summary=2' is "
                                         r"defined by its predicate only; the kernels need its rules"):
        sparse_attention(q, k, v, p, backend="triton")
    out = sparse_attention(q, k, v, p, backend="auto")  # the reference path
    assert torch.allclose(out, sparse_attention(q, k, v, p, backend="dense"), atol=1e-6)
    with pytest.raises(ValueError, match=r"blocks of different sizes \[16, 32\]"):
        kernel_plan(PerHead(BigBird(block=16), ((1, BigBird(block=32)),)), 2)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 against a float32 reference, flash-attention's "at most twice PyTorch's bf16 error" rule
GPU_PATTERNS = [
    Strided(stride=128, window=256),
    SlidingWindow(window=512) | Strided(stride=512, window=1),
    Fixed(block=128, summary=16),
    SlidingWindow(window=1024) | BigBird(block=64, window_blocks=1, global_blocks=0, random_blocks=3),
    PerHead(SlidingWindow(window=256), ((0, Dense()),)),
    PerHead(SlidingWindow(window=256), ((0, BigBird()), (1, Strided(stride=64, window=64)))),
]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("shape", [(2, 9, 3, 4113, 64), (1, 8, 2, 8192, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pattern", GPU_PATTERNS, ids=pid)
def test_gpu_bf16_error_rule(pattern, shape):
    from test_kernels import _bf16_rule

    _bf16_rule(*shape, pattern)
    b, hq, hkv, t, d = shape
    _bf16_rule(b, hq, hkv, t, d, pattern, q_offset=t - 3)  # the decode kernel
