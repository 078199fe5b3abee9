"""The distance cap of dense heads (``dense:max_distance=N``, ReRoPE) against an oracle that applies the rotation.

The oracle never uses :mod:`hf_sparse.cap` or :mod:`hf_sparse.patches.rope`: from unrotated queries and keys it
scores every pair at its capped relative distance (RoPE is relative, so the query is rotated by the distance and
the key stays at 0), ``min(i - j, N)`` on capped dense heads, ``min(i, M) - j`` on the global-only keys of a
capped Longformer head, ``i - j`` elsewhere, and runs dense masked softmax in float64. Checked: the reference
and dense paths, forward and gradients, with padding and after cached keys; the Triton kernels in the
interpreter; decoding by positions; a tiny Llama patched with a plan whose dense heads are capped (against the
same oracle on the model's own projections and rotary embedding), generation, ``none`` bit for bit; plan files
and ``--dense-cap``; the errors.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import HAS_CUDA, HAS_TRITON, needs_interpreter
from test_distance_cap import check_bf16_rule, dense_grid, use_oracle_attention

from hf_sparse import Longformer, PerHead, SlidingWindow, parse_pattern, sparse_attention
from hf_sparse.decode import attention_with_positions
from hf_sparse.patterns import Dense

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the oracle
def rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 50.0) -> torch.Tensor:
    """``x [..., D]`` rotated to positions ``pos`` (broadcasting with ``x[..., 0]``; rotate_half layout)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[..., None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x.double() * cos + torch.cat([-x2, x1], -1).double() * sin)


def head_pattern(pattern, kv_head: int):
    return pattern.pattern_of(kv_head) if isinstance(pattern, PerHead) else pattern


def capped_distance(p, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The relative distance at which head pattern ``p`` scores the pair ``(i, j)``, from its own options."""
    n = getattr(p, "max_distance", None)
    if isinstance(p, Dense) and isinstance(n, int):
        return torch.minimum(i - j, torch.tensor(n))
    if isinstance(p, Longformer) and isinstance(n, int):
        glob = (j < p.global_tokens) & (j <= i - p.window)
        return torch.where(glob, i.clamp_max(n) - j, i - j)
    return i - j


def oracle(q_u, k_u, v, pattern, real=None, rotate=rope):
    """``[B, Hq, T, Dv]`` float64: every pair scored by the query rotated by its capped distance against the
    unrotated key (``rotate(x [.., D], distance)``); ``real [B, T]``: positions count real tokens."""
    b, hq, t, d = q_u.shape
    group = hq // k_u.shape[1]
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    out = torch.zeros(b, hq, t, v.shape[-1], dtype=torch.float64)
    for r in range(b):
        pos = torch.where(real[r], real[r].long().cumsum(0) - 1, -1)
        i, j = pos.view(t, 1), pos.view(1, t)
        for h in range(hq):
            p = head_pattern(pattern, h // group)
            allowed = p.allowed(i, j) & (i >= 0) & (j >= 0)
            dist = capped_distance(p, i, j).clamp_min(0)
            q_at = rotate(q_u[r, h].unsqueeze(1).expand(t, t, d), dist)  # [i, j, D]: q_i at distance(i, j)
            s = (q_at * k_u[r, h // group].double().unsqueeze(0)).sum(-1) * d**-0.5
            p_ij = torch.softmax(s.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
            out[r, h] = p_ij @ v[r, h // group].double()
    return out


def head_caps_of(pattern, hkv):
    from hf_sparse.cap import head_caps

    return head_caps(pattern, hkv)


def model_inputs(q_u, k_u, pattern, real=None):
    """What a model hands in: ``q``, ``k`` at their positions, ``q_cap`` at ``min(i, N)``, ``k_cap`` at 0."""
    b, hq, t, _ = q_u.shape
    hkv = k_u.shape[1]
    group = hq // hkv
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    pos = torch.where(real, real.long().cumsum(1) - 1, 0)[:, None, :]
    caps = torch.tensor([n if n is not None else 2**30 for n in head_caps_of(pattern, hkv)])
    q_cap = rope(q_u, torch.minimum(pos, caps.repeat_interleave(group).view(1, hq, 1)))
    q, k, k_cap = rope(q_u, pos), rope(k_u, pos), rope(k_u, torch.zeros_like(pos))
    return tuple(x.to(q_u.dtype) for x in (q, k, q_cap, k_cap))


def unrotated(b=2, hq=4, hkv=2, t=40, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def grads(out, *inputs):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * w).sum(), inputs)


CAPPED = [
    Dense(max_distance=7),
    PerHead(SlidingWindow(window=5), ((1, Dense(max_distance=9)),)),
    PerHead(Longformer(window=5, global_tokens=2, max_distance=9), ((1, Dense(max_distance=12)),)),
    PerHead(Dense(max_distance=4), ((1, Dense(max_distance=15)),)),
]


# ---------------------------------------------------------------------------------------------
# reference and dense paths
@pytest.mark.parametrize("pattern", CAPPED, ids=lambda p: p.spec()[:48])
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_cap_matches_the_explicit_oracle_with_gradients(pattern, backend):
    q_u, k_u, v = unrotated()
    q, k, q_cap, k_cap = model_inputs(q_u, k_u, pattern)
    out = sparse_attention(q, k, v, pattern, q_cap=q_cap, k_cap=k_cap, backend=backend)
    want = oracle(q_u, k_u, v, pattern)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for got, ref in zip(grads(out, q_u, k_u, v), grads(want, q_u, k_u, v)):
        torch.testing.assert_close(got.double(), ref.double(), atol=5e-5, rtol=5e-5)
    plain = sparse_attention(q, k, v, "dense", backend=backend)
    assert (out - plain).abs().max() > 1e-2  # the cap changed what a far key scores


@pytest.mark.parametrize("pattern", CAPPED[1:3], ids=lambda p: p.spec()[:48])
def test_cap_with_left_and_right_padding_counts_real_tokens(pattern):
    real = torch.ones(2, 40, dtype=torch.bool)
    real[0, :6] = False  # left padding
    real[1, 31:] = False  # right padding: its padding queries stand where the far pass has real keys
    q_u, k_u, v = unrotated()
    q, k, q_cap, k_cap = model_inputs(q_u, k_u, pattern, real)
    with torch.no_grad():
        out = sparse_attention(q, k, v, pattern, key_padding_mask=real, q_cap=q_cap, k_cap=k_cap, backend="reference")
    want = oracle(q_u, k_u, v, pattern, real).masked_fill(~real[:, None, :, None], 0.0)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_queries_after_cached_keys_and_the_lse():
    pattern = CAPPED[1]
    q_u, k_u, v = unrotated()
    q, k, q_cap, k_cap = model_inputs(q_u, k_u, pattern)
    want = oracle(q_u, k_u, v, pattern)
    with torch.no_grad():
        for tq in (1, 3, 12):  # one decode step, a chunk standing past the cap, a chunk straddling it
            out, lse = sparse_attention(q[:, :, -tq:], k, v, pattern, q_offset=40 - tq, q_cap=q_cap[:, :, -tq:],
                                        k_cap=k_cap, backend="reference", return_lse=True)
            torch.testing.assert_close(out.double(), want[:, :, -tq:], atol=2e-5, rtol=2e-5)
            assert lse.shape == (2, 4, tq) and torch.isfinite(lse).all()


def test_within_the_cap_nothing_changes_bit_for_bit():
    q_u, k_u, v = unrotated()
    q, k, _, _ = model_inputs(q_u, k_u, Dense())
    with torch.no_grad():
        plain = sparse_attention(q, k, v, "dense", backend="reference")
        # positions 0..39, cap 39: no key stands past the cap, so no q_cap / k_cap and one pass
        capped = sparse_attention(q, k, v, "dense:max_distance=39", backend="reference")
        none = sparse_attention(q, k, v, "dense:max_distance=none", backend="reference")
    assert torch.equal(capped, plain) and torch.equal(none, plain)


# ---------------------------------------------------------------------------------------------
# Triton kernels in the interpreter
@needs_interpreter
@pytest.mark.parametrize("pattern,dtype", [(CAPPED[1], torch.float32), (CAPPED[2], torch.float32),
                                           (CAPPED[1], torch.float16)],
                         ids=["plan-fp32", "plan-longformer-fp32", "plan-fp16"])
def test_cap_on_the_kernels_forward_and_backward(pattern, dtype):
    q_u, k_u, v = unrotated(b=1, t=40)
    q, k, q_cap, k_cap = (x.to(dtype) for x in model_inputs(q_u, k_u, pattern))
    out = sparse_attention(q, k, v.to(dtype), pattern, q_cap=q_cap, k_cap=k_cap, backend="triton")
    with torch.no_grad():
        decode = sparse_attention(q[:, :, -1:], k, v.to(dtype), pattern, q_offset=39, q_cap=q_cap[:, :, -1:],
                                  k_cap=k_cap, backend="triton")
    want = oracle(q_u, k_u, v, pattern)
    tol = 2e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(decode.double(), want[:, :, -1:], atol=tol, rtol=tol)
    for got, ref in zip(grads(out.float(), q_u, k_u, v), grads(want, q_u, k_u, v)):
        torch.testing.assert_close(got.double(), ref.double(), atol=5 * tol, rtol=5 * tol)


# ---------------------------------------------------------------------------------------------
# GPU, bf16: the kernels' error at most twice PyTorch's own bf16 error (flash-attention's rule)
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA GPU and triton")


def _dense_capped(q, q_cap, k, k_cap, v, pattern, q_offset):
    """Dense masked softmax in the inputs' dtype, the far pairs of capped dense heads scored by ``q_cap`` against
    ``k_cap`` (PyTorch's own math, ``O(T^2)``)."""
    qi, kj, _, allowed = dense_grid(q, k, pattern, q_offset)
    hkv = k.shape[1]
    g, d = q.shape[1] // hkv, q.shape[3]
    caps = torch.tensor([n or 2**30 for n in head_caps_of(pattern, hkv)], device=q.device).view(hkv, 1, 1)
    far = (qi - kj >= caps) & allowed
    far, allowed = far.repeat_interleave(g, 0), allowed.repeat_interleave(g, 0)
    rep = lambda x: x.repeat_interleave(g, 1)  # noqa: E731
    s = torch.where(far, q_cap @ rep(k_cap).transpose(-1, -2), q @ rep(k).transpose(-1, -2)) * d**-0.5
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ rep(v)


def _bf16_rule(b, hq, hkv, t, d, pattern, q_offset=0, device="cuda", backend="triton"):
    g = torch.Generator(device=device).manual_seed(t + d)
    mk = lambda h, n=t: torch.randn(b, h, n, d, generator=g, device=device).bfloat16()  # noqa: E731
    q, q_cap, k, k_cap, v = mk(hq, t - q_offset), mk(hq, t - q_offset), mk(hkv), mk(hkv), mk(hkv)
    do = mk(hq, t - q_offset)

    def kernels(q_, qc, k_, kc, v_):
        return sparse_attention(q_, k_, v_, pattern, q_cap=qc, k_cap=kc, q_offset=q_offset, backend=backend)

    def dense(q_, qc, k_, kc, v_):
        return _dense_capped(q_, qc, k_, kc, v_, pattern, q_offset)

    check_bf16_rule({"q": q, "q_cap": q_cap, "k": k, "k_cap": k_cap, "v": v}, do, kernels, dense)


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_dense_cap_prefill_and_decode_kernels():
    plan = PerHead(Longformer(window=256, global_tokens=4, max_distance=None), ((1, Dense(max_distance=1024)),))
    _bf16_rule(1, 9, 3, 4113, 64, plan)
    _bf16_rule(2, 32, 8, 4096, 128, plan, q_offset=4094)  # two queries: the decode kernel


# ---------------------------------------------------------------------------------------------
# decoding by positions (the path of bounded and per-head caches)
@pytest.mark.parametrize("pattern", CAPPED[1:3], ids=lambda p: p.spec()[:48])
def test_decode_by_positions_over_shuffled_slots(pattern):
    _decode_over_shuffled_slots(pattern, "reference")


@needs_interpreter
def test_decode_by_positions_on_the_kernel():
    _decode_over_shuffled_slots(CAPPED[2], "triton")


def _decode_over_shuffled_slots(pattern, backend):
    t = 40
    q_u, k_u, v = unrotated(t=t)
    q, k, q_cap, k_cap = model_inputs(q_u, k_u, pattern)
    want = oracle(q_u, k_u, v, pattern)[:, :, -2:]
    order = torch.randperm(t, generator=torch.Generator().manual_seed(0))
    slots = torch.cat([order, torch.tensor([-1, -1])])  # every key in shuffled slots, two empty ones
    take = slots.clamp_min(0)
    with torch.no_grad():
        out = attention_with_positions(q[:, :, -2:], k[:, :, take], v[:, :, take], pattern,
                                       q_pos=torch.tensor([[t - 2, t - 1]] * 2), k_pos=slots.expand(2, -1),
                                       q_cap=q_cap[:, :, -2:], k_cap=k_cap[:, :, take], backend=backend)
    tol = 2e-5 if backend == "reference" else 2e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# patched models: a plan whose dense heads are capped, the model's own rotary embedding
N_CAP, WINDOW = 12, 6


def _plan(model, dense_pattern):
    from hf_sparse.head_plan import HeadPlan, model_identity

    return HeadPlan(f"sliding_window:window={WINDOW}", [(0, 1), (1, 0)], model_identity(model.config), 0.5,
                    dense_pattern=dense_pattern)


def _oracle_attention(plan):
    """An attention function for transformers: the per-head oracle on the layer's own projections (from its
    input) with its own rotary embedding, rotating the query by the capped distance of each pair."""
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        h = module._oracle_input
        b, t = h.shape[:2]
        hd = module.head_dim
        q_u, k_u = (proj(h).view(b, t, -1, hd).transpose(1, 2) for proj in (module.q_proj, module.k_proj))
        apply = sys.modules[type(module).__module__].apply_rotary_pos_emb

        def rotate(x, dist):  # x [i, j, D] at distances [i, j], by the model's rotary embedding
            cos, sin = module._oracle_rotary(x, dist.reshape(1, -1))
            turned, _ = apply(x.reshape(1, 1, -1, hd), x.reshape(1, 1, -1, hd), cos, sin)
            return turned.reshape(x.shape).double()

        pattern = PerHead(plan.streaming, tuple((kv, plan.dense_pattern) for layer, kv in plan.dense_heads
                                                if layer == module.layer_idx))
        out = oracle(q_u, k_u, value, pattern, rotate=rotate)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return fn


def _with_oracle(model, plan):
    use_oracle_attention(model, "dense_cap_oracle_test", _oracle_attention(plan))


def test_patched_plan_matches_the_per_head_oracle_with_its_own_rope():
    from hf_models import tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=64)
    ids = tokens(2, 36)
    plan = _plan(model, f"dense:max_distance={N_CAP}")
    _with_oracle(model, plan)
    with torch.no_grad():
        want = model(ids).logits
    patch_model(model, plan, backend="reference")
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    patch_model(model, _plan(model, "dense"), backend="reference")
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 1e-2  # the cap is what made them agree


def test_none_and_auto_within_the_trained_length_equal_the_uncapped_plan_bit_for_bit():
    from hf_models import tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=40)
    ids = tokens(2, 41)  # positions 0..40: the last one stands past auto's cap of 40 only at distance 40
    with torch.no_grad():
        patch_model(model, _plan(model, "dense"), backend="reference")
        plain = model(ids).logits
        patch_model(model, _plan(model, "dense:max_distance=none"), backend="reference")
        none = model(ids).logits
        patch_model(model, _plan(model, "dense:max_distance=auto"), backend="reference")
        assert "max_distance=40" in repr(model)
        auto = model(ids[:, :40]).logits
    assert torch.equal(none, plain)
    assert torch.equal(auto, plain[:, :40])  # no query past the cap: the plain kernels ran, nothing rotated


def test_generate_with_capped_dense_heads_equals_the_full_forward():
    from hf_models import left_padding, tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=64)
    patch_model(model, _plan(model, f"dense:max_distance={N_CAP}"), backend="reference")
    ids = tokens(2, 20)
    mask = left_padding([20, 16], 20)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], 1)
        pos = (full_mask.cumsum(1) - 1).clamp_min(0)
        full = model(out.sequences[:, :-1], attention_mask=full_mask[:, :-1], position_ids=pos[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 19:], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# plan files and hf-sparse-calibrate --dense-cap
def test_plan_file_carries_the_cap_and_eval_accepts_it(tmp_path):
    from hf_models import tiny
    from hf_sparse.eval.calibrate import build_parser, dense_cap_pattern
    from hf_sparse.eval.options import parse_patterns

    from hf_sparse.head_plan import load_plan

    model = tiny("llama", max_position_embeddings=64)
    plan = _plan(model, dense_cap_pattern("auto"))
    path = plan.save(tmp_path / "plan.json")
    assert '"dense_pattern": "dense:causal=true,max_distance=auto"' in path.read_text()
    loaded = load_plan(path)
    assert loaded == plan and loaded.dense_pattern == Dense(max_distance="auto")
    assert "dense_pattern=dense:causal=true,max_distance=auto" in loaded.spec()
    assert _plan(model, "dense").spec() != loaded.spec() and _plan(model, "dense").digest() != loaded.digest()
    (choice,) = parse_patterns(str(path))
    assert choice.plan == plan
    assert dense_cap_pattern("none") == Dense() and dense_cap_pattern("8192") == Dense(max_distance=8192)
    args = build_parser().parse_args(["--streaming", "sliding_window", "--budget", "0.5", "--out", "p.json"])
    assert dense_cap_pattern(args.dense_cap) == Dense()  # default: plain dense heads


# ---------------------------------------------------------------------------------------------
# errors
# (bad values of dense:max_distance: tests/test_distance_cap.py, test_bad_values_are_refused_with_the_range)
def test_spec_round_trips_and_plain_dense_keeps_its_spec():
    assert Dense().spec() == "dense:causal=true" and Dense().to_dict() == {"type": "dense", "causal": True}
    for text in ("dense:max_distance=8", "dense:max_distance=auto", "per_head[sliding_window:window=4;1=dense:"
                 "max_distance=7]"):
        p = parse_pattern(text)
        assert parse_pattern(p.spec()) == p and parse_pattern(p.to_dict()) == p and "max_distance=" in p.spec()


def test_a_capped_call_without_k_cap_or_with_a_wrong_one_is_refused():
    from hf_sparse.eval.calibrate import dense_cap_pattern
    from hf_sparse.eval.errors import EvalError

    q_u, k_u, v = unrotated()
    pattern = CAPPED[1]
    q, k, q_cap, k_cap = model_inputs(q_u, k_u, pattern)
    with pytest.raises(ValueError, match=r"queries reach position 39: pass q_cap="):
        sparse_attention(q, k, v, pattern, backend="reference")
    with pytest.raises(ValueError, match=r"queries reach position 39: pass k_cap="):
        sparse_attention(q, k, v, pattern, q_cap=q_cap, backend="reference")
    with pytest.raises(ValueError, match=r"k_cap is given without q_cap"):
        sparse_attention(q, k, v, pattern, k_cap=k_cap, backend="reference")
    with pytest.raises(ValueError, match=r"k_cap must be a tensor shaped like k"):
        sparse_attention(q, k, v, pattern, q_cap=q_cap, k_cap=k_cap[:, :1], backend="reference")
    with pytest.raises(ValueError, match=r"caps no dense head"):
        sparse_attention(q, k, v, "longformer:window=4,max_distance=10", q_cap=q_cap, k_cap=k_cap, backend="reference")
    with pytest.raises(ValueError, match=r"positions are given per call"):
        attention_with_positions(q, k, v, pattern, q_pos=torch.zeros(2, 40).long(), q_cap=q_cap,
                                 k_pos=torch.arange(40).expand(2, 40), backend="reference")
    with pytest.raises(ValueError, match=r"a union cannot hold a dense pattern with a distance cap \(dense:.*max_distance=8\)"):
        sparse_attention(q, k, v, "dense:max_distance=8|sliding_window:window=4", q_cap=q_cap, k_cap=k_cap,
                         backend="reference")
    with pytest.raises(EvalError, match=r"--dense-cap '-1': .*max_distance must be an integer >= 1"):
        dense_cap_pattern("-1")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_a_mask_with_holes_past_the_cap_equals_the_rows_without_their_holes(backend):
    # pad ids inside a row (positions count real tokens, as generate's do): each row's real tokens get the logits
    # they get alone, past the cap of the dense heads and the globals'
    from hf_models import tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=64)
    patch_model(model, _plan(model, "dense:max_distance=8"), backend=backend)
    ids = tokens(2, 24)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, [5, 6, 13]] = 0
    mask[1, 20] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        holes = model(ids, attention_mask=mask, position_ids=pos).logits
        for row in range(2):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real]).logits[0]
            torch.testing.assert_close(holes[row, real], alone, atol=1e-4, rtol=1e-4)
