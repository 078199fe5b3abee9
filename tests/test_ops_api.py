"""``sparse_attention`` input validation: every bad input raises a ``ValueError`` that names the value."""

from __future__ import annotations

import pytest
import torch

from hf_sparse import SlidingWindow, sparse_attention
from hf_sparse.ops import padding_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(b=2, hq=4, hkv=2, t=10, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, hq, t, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, t, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, t, d, generator=g, dtype=dtype),
    )


def test_valid_call_runs():
    q, k, v = qkv()
    out = sparse_attention(q, k, v, "sliding_window:window=3")
    assert out.shape == q.shape and out.dtype == q.dtype


def _bad_inputs():
    q, k, v = qkv()
    kpm = torch.ones(2, 10, dtype=torch.bool)
    holes = kpm.clone()
    holes[1, 4] = False  # a padding slot between real tokens
    return [
        ("q-3d", (q[0], k, v), {}, r"q must be a 4-D tensor \[B, H, T, D\], got \(4, 10, 8\)"),
        ("k-5d", (q, k[None], v), {}, r"k must be a 4-D tensor .*got \(1, 2, 2, 10, 8\)"),
        ("v-not-tensor", (q, k, [1.0]), {}, r"v must be a 4-D tensor .*got list"),
        ("heads-6-4", (qkv(hq=6, hkv=4)), {}, r"query heads \(6\) must be a multiple of key/value heads \(4\)"),
        (
            "dtype-mismatch",
            (q, k.double(), v),
            {},
            r"must share a dtype, got torch.float32, torch.float64, torch.float32",
        ),
        ("dtype-int", (q.long(), k.long(), v.long()), {}, r"q has dtype torch.int64"),
        ("kv-shape", (q, k, v[:, :, :7]), {}, r"k and v must have the same shape .*\(2, 2, 10, 8\) and \(2, 2, 7, 8\)"),
        ("batch", (q, k[:1], v[:1]), {}, r"must agree on batch size and head dim"),
        ("head-dim", (q, k[..., :4], v[..., :4]), {}, r"q \(2, 4, 10, 8\) and k \(2, 2, 10, 4\)"),
        (
            "kpm-1d",
            (q, k, v),
            {"key_padding_mask": kpm[0]},
            r"key_padding_mask must be \[B, Tk\] = \[2, 10\].*got \(10,\)",
        ),
        ("kpm-batch", (q, k, v), {"key_padding_mask": kpm[:1]}, r"key_padding_mask must be \[B, Tk\].*got \(1, 10\)"),
        (
            "kpm-cols",
            (q, k, v),
            {"key_padding_mask": kpm[:, :9]},
            r"key_padding_mask has 9 columns but keys have Tk=10",
        ),
        (
            "kpm-float",
            (q, k, v),
            {"key_padding_mask": kpm.float()},
            r"key_padding_mask must be bool .*got torch.float32",
        ),
        ("kpm-holes", (q, k, v), {"key_padding_mask": holes}, r"rows \[1\] have padding between real tokens"),
        ("q-offset-neg", (q, k, v), {"q_offset": -1}, r"q_offset must be a non-negative int, got -1"),
        ("q-offset-float", (q, k, v), {"q_offset": 1.5}, r"q_offset .*got 1.5"),
        ("q-offset-past-keys", (q, k, v), {"q_offset": 3, "key_padding_mask": kpm}, r"q_offset \(3\) \+ Tq \(10\)"),
        ("layer-neg", (q, k, v), {"layer": -2}, r"layer must be a non-negative int, got -2"),
        ("softcap-neg", (q, k, v), {"softcap": -1.0}, r"softcap .*got -1.0"),
        ("scale-zero", (q, k, v), {"scale": 0.0}, r"scale must be a positive finite number, got 0.0"),
        ("scale-neg", (q, k, v), {"scale": -0.125}, r"scale must be .*got -0.125"),
        ("scale-nan", (q, k, v), {"scale": float("nan")}, r"scale must be .*got nan"),
        ("backend", (q, k, v), {"backend": "flash"}, r"backend='flash' is not one of auto, triton, reference, dense"),
        ("pattern", (q, k, v), {"pattern": "sliding_window:window=0"}, r"window must be an integer >= 1, got 0"),
    ]


@pytest.mark.parametrize("args,kwargs,match", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise_value_error(args, kwargs, match):
    if "pattern" in kwargs:
        kwargs = dict(kwargs)
        args = (*args, kwargs.pop("pattern"))
    with pytest.raises(ValueError, match=match):
        sparse_attention(*args, **kwargs)


@pytest.mark.parametrize(
    "backend,case",
    [
        pytest.param(
            backend,
            case,
            id=f"{case}-{backend}",
            marks=(),
        )
        for backend in ("auto", "reference", "dense")
        for case in ("heads-6-4", "kpm-cols", "q-offset-past-keys", "backend")
    ],
)
def test_validation_does_not_depend_on_backend(backend, case):
    ((_, args, kwargs, match),) = [c for c in _bad_inputs() if c[0] == case]
    if case != "backend":
        kwargs = {**kwargs, "backend": backend}
    with pytest.raises(ValueError, match=match):
        sparse_attention(*args, **kwargs)


def test_triton_backend_on_cpu_says_why(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: tensors are on cpu .*TRITON_INTERPRET=1"):
        sparse_attention(q, k, v, SlidingWindow(window=4), backend="triton")


def test_auto_backend_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(dtype=torch.float64)
    auto = sparse_attention(q, k, v, "longformer:window=3,global_tokens=2")
    ref = sparse_attention(q, k, v, "longformer:window=3,global_tokens=2", backend="reference")
    assert torch.equal(auto, ref)


def test_padding_layout():
    m = torch.tensor(
        [
            [0, 0, 1, 1, 1],  # left
            [1, 1, 1, 0, 0],  # right
            [0, 1, 1, 0, 0],  # both
            [1, 1, 1, 1, 1],  # none
            [0, 0, 0, 0, 0],  # empty
        ],
        dtype=torch.bool,
    )
    shift, length = padding_layout(m)
    assert shift.tolist() == [2, 0, 1, 0, 0] and length.tolist() == [3, 3, 2, 5, 0]
    assert shift.dtype == length.dtype == torch.int32
    with pytest.raises(ValueError, match=r"rows \[0, 2\] have padding between real tokens"):
        padding_layout(torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool))
    # check=False skips the host sync and the check
    padding_layout(torch.tensor([[1, 0, 1]], dtype=torch.bool), check=False)


def test_integer_padding_mask_is_accepted():
    q, k, v = qkv(dtype=torch.float64)
    kpm = torch.ones(2, 10, dtype=torch.long)
    kpm[0, :3] = 0
    a = sparse_attention(q, k, v, "dense", key_padding_mask=kpm, backend="reference")
    b = sparse_attention(q, k, v, "dense", key_padding_mask=kpm.bool(), backend="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("layout", ["contiguous", "hf_views"])
def test_custom_op_registration(padded, layout):
    # schema, autograd registration, fake tensor and AOT dispatch (what torch.compile relies on); "hf_views":
    # q/k/v as HF hands them in, [B, T, H, D] projections transposed to [B, H, T, D] (the fake results' strides
    # must be the real ones: Inductor asserts them)
    g = torch.Generator().manual_seed(0)

    def make(heads):
        x = torch.randn(1, 20, heads, 8, generator=g, dtype=torch.float64)
        x = x.transpose(1, 2) if layout == "hf_views" else x.transpose(1, 2).contiguous()
        return x.requires_grad_()

    q, k, v = make(2), make(1), make(1)
    shift = length = None
    if padded:
        kpm = torch.ones(1, 20, dtype=torch.bool)
        kpm[0, :3] = False
        shift, length = padding_layout(kpm)
    spec = "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=1,seed=0,causal=true"
    args = (q, k, v, shift, length, spec, 0.35, 1.0, 0, 2, "reference")
    result = torch.library.opcheck(torch.ops.hf_sparse.attn_fwd.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    out, lse = torch.ops.hf_sparse.attn_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    d_out = torch.randn(out.shape, generator=g, dtype=out.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    bwd_args = (d_out, q.detach(), k.detach(), v.detach(), out, lse, *args[3:])
    result = torch.library.opcheck(torch.ops.hf_sparse.attn_bwd.default, bwd_args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_autocast_runs_in_the_autocast_dtype():
    # under autocast, RoPE leaves q/k in float32 while v is bfloat16: the op casts all three, as SDPA does
    q = torch.randn(1, 2, 20, 16)
    k = torch.randn(1, 2, 20, 16)
    v = torch.randn(1, 2, 20, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_attention(q, k, v, "sliding_window:window=4", backend="reference")
    assert out.dtype == torch.bfloat16
    ref = sparse_attention(q.bfloat16(), k.bfloat16(), v, "sliding_window:window=4", backend="reference")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_eager_path_equals_the_custom_ops(requires_grad):
    # eager calls skip the dispatcher (an autograd.Function, or the bare forward without grad); torch.compile
    # traces the custom ops: both give the same outputs and gradients
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 30, 8, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    k = torch.randn(2, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    v = torch.randn(2, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, :4] = False
    spec = "longformer:window=5,global_tokens=2,causal=true"
    out = sparse_attention(q, k, v, spec, key_padding_mask=kpm, scale=0.4, layer=1, backend="reference")
    shift, length = padding_layout(kpm)
    ref, _ = torch.ops.hf_sparse.attn_fwd(q, k, v, shift, length, spec, 0.4, 0.0, 0, 1, "reference")
    assert torch.equal(out, ref)
    assert out.requires_grad == requires_grad
    if requires_grad:
        do = torch.randn(out.shape, generator=g, dtype=out.dtype)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do)
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b)
