"""``sparse_attention(..., return_lse=True)`` and ``merge_attention`` against the dense oracle.

The log-sum-exp output is what exact partial attentions are merged by (context parallel shards, the distance
cap's second pass). Checked: values (with GQA, padding, empty rows), gradients through ``out`` and ``lse``
together on the reference and the Triton kernels (interpreter), and that two disjoint partial attentions
merge into the whole one, values and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import needs_interpreter

from hf_sparse import Longformer, Pattern, SlidingWindow, Strided, merge_attention, sparse_attention
from hf_sparse.patterns import option

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class FarKeys(Pattern):
    """Predicate only: the keys a causal window of ``window`` does not see (its complement in the past)."""

    window: int = option(4, minimum=1)
    causal: bool = option(True)
    name = "far_keys_test"

    def allowed(self, q_idx, k_idx, *, layer=0, kv_head=0, num_keys=None):
        q, k = torch.as_tensor(q_idx).long(), torch.as_tensor(k_idx).long()
        return (k >= 0) & (k <= q - self.window)


def _inputs(b=2, hq=4, hkv=2, t=37, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_()
    return mk(hq), mk(hkv), mk(hkv)


def _loss_grads(q, k, v, pattern, backend, **kw):
    out, lse = sparse_attention(q, k, v, pattern, backend=backend, return_lse=True, **kw)
    finite = torch.isfinite(lse)
    # weights that make both outputs matter, and an lse term that a wrong d_lse would change
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out.float() * w).sum() + (torch.where(finite, lse, 0.0) * 0.7).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


CASES = [SlidingWindow(window=7), Longformer(window=5, global_tokens=3), Strided(stride=5, window=3)]


@pytest.mark.parametrize("pattern", CASES, ids=lambda p: p.spec())
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_lse_and_its_gradient_match_the_oracle_on_the_reference(pattern, padded):
    q, k, v = _inputs()
    kw = {}
    if padded:  # row 0 left-padded by 5, row 1 right-padded by 3
        m = torch.ones(2, 37, dtype=torch.bool)
        m[0, :5] = False
        m[1, -3:] = False
        kw["key_padding_mask"] = m
    want = _loss_grads(q, k, v, pattern, "dense", **kw)
    got = _loss_grads(q, k, v, pattern, "reference", **kw)
    # padded query rows see no key: lse is -inf there on both paths
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    if padded:
        assert bool(torch.isinf(got[1][0, :, :5]).all()) and bool((got[1][0, :, :5] < 0).all())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        a, b = torch.nan_to_num(a, neginf=0.0), torch.nan_to_num(b, neginf=0.0)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)


@needs_interpreter
@pytest.mark.parametrize("pattern", CASES[:2], ids=lambda p: p.spec())
@pytest.mark.parametrize("tq", [37, 3], ids=["prefill", "decode-kernel"])
def test_lse_and_its_gradient_match_the_oracle_on_the_kernels(pattern, tq):
    q, k, v = _inputs()
    if tq != 37:  # few queries after cached keys: the decode kernel's lse (forward only there)
        qs = q.detach()[:, :, -tq:].clone()
        out, lse = sparse_attention(qs, k.detach(), v.detach(), pattern, backend="triton", q_offset=37 - tq,
                                    return_lse=True)
        ref_out, ref_lse = sparse_attention(qs, k.detach(), v.detach(), pattern, backend="dense",
                                            q_offset=37 - tq, return_lse=True)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        return
    want = _loss_grads(q, k, v, pattern, "dense")
    got = _loss_grads(q, k, v, pattern, "triton")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=name)  # TF32-free interpreter, fp32


def test_disjoint_parts_merge_into_the_whole_attention():
    q, k, v = _inputs(t=41)
    window, far = SlidingWindow(window=6), FarKeys(window=6)  # together: dense causal, no key twice
    near = sparse_attention(q, k, v, window, backend="reference", return_lse=True)
    rest = sparse_attention(q, k, v, far, backend="reference", return_lse=True)
    out, lse = merge_attention([near, rest])
    want, want_lse = sparse_attention(q, k, v, "dense", backend="dense", return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    # the first rows see no far key at all: that part is empty there, and the merge still holds
    assert bool(torch.isinf(rest[1][:, :, :6]).all())
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    g_merged = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v))
    g_whole = torch.autograd.grad((want * w).sum() + want_lse.sum(), (q, k, v))
    for a, b in zip(g_merged, g_whole):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_merge_of_rows_that_no_part_sees_is_zero_with_finite_gradients():
    q, k, v = _inputs(t=9)
    m = torch.ones(2, 9, dtype=torch.bool)
    m[0, :4] = False  # row 0: the first four query rows are padding and see nothing
    parts = [sparse_attention(q, k, v, p, backend="reference", key_padding_mask=m, return_lse=True)
             for p in (SlidingWindow(window=3), FarKeys(window=3))]
    out, lse = merge_attention(parts)
    assert bool((out[0, :, :4] == 0).all()) and bool(torch.isneginf(lse[0, :, :4]).all())
    grads = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_merge_refuses_nothing():
    with pytest.raises(ValueError, match="at least one"):
        merge_attention([])
