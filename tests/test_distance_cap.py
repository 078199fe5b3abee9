"""The distance cap of global keys (``max_distance``) against an oracle that applies the rotation explicitly.

The oracle never uses :mod:`hf_sparse.cap`, :mod:`hf_sparse.patches.rope` or the ``without_globals`` pattern:
it rotates unrotated queries and keys with its own RoPE (queries once at ``i`` and once at ``min(i, N)``),
says which pairs only the global rule shows from each pattern's own definition, and runs dense masked
softmax in float64. Checked: the reference and the dense paths, forward and gradients (through the rotation
back to the unrotated queries); the Triton kernels in the interpreter (forward, backward, decode by
positions); decoding over a bounded cache; tiny Llama models (Llama 3 and YaRN scaled RoPE, Phi-3's partial
rotary) patched with the cap against the model's own rotary embedding at clamped positions; the default
``auto``; and the errors.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import HAS_CUDA, HAS_TRITON, needs_interpreter

from hf_sparse import BigBird, Longformer, PerHead, SlidingWindow, Strided, parse_pattern, sparse_attention
from hf_sparse.decode import attention_with_positions
from hf_sparse.patterns import option_ranges
from hf_sparse.patterns.bigbird import bigbird_random_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the oracle
def rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 50.0) -> torch.Tensor:
    """``x [B, H, T, D]`` rotated to positions ``pos [B, T]`` (rotate_half layout), in float64."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None, :, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def seen_without_globals(p, q, k, head, layer):
    """What the pattern shows through its rules other than the global prefix, from its own definition."""
    if isinstance(p, Longformer):
        return (k > q - p.window) & (k <= q)
    if isinstance(p, BigBird):
        qb, kb = q // p.block, k // p.block
        rnd = bigbird_random_blocks(p, layer, head, qb.clamp_min(0))
        return ((kb > qb - p.window_blocks) | (rnd == kb.unsqueeze(-1)).any(-1)) & (k <= q)
    if isinstance(p, (SlidingWindow, Strided)):
        return p.allowed(q, k, kv_head=head)
    if hasattr(p, "members"):
        return torch.stack(torch.broadcast_tensors(*(seen_without_globals(m, q, k, head, layer) for m in p.members))).any(0)
    raise AssertionError(p)


def global_only(pattern, q, k, heads, layer):
    """``[Hkv, Tq, Tk]``: the pairs a capped global prefix shows and no other rule does."""
    out = []
    for h in range(heads):
        p = pattern.pattern_of(h) if isinstance(pattern, PerHead) else pattern
        if not isinstance(getattr(p, "max_distance", None), int) and not any(
                isinstance(getattr(m, "max_distance", None), int) for m in getattr(p, "members", ())):
            out.append(torch.zeros(q.shape[0], k.shape[1], dtype=torch.bool))
            continue
        head = torch.tensor(h)
        out.append(p.allowed(q, k, kv_head=head, layer=layer) & ~seen_without_globals(p, q, k, head, layer))
    return torch.stack([o.expand(q.shape[0], k.shape[1]) for o in out])


def oracle(q_u, k_u, v, pattern, caps, *, layer=0, real=None, scale=None):
    """Attention with every global-only pair scored by the query rotated to ``min(i, cap of its head)``.

    ``q_u, k_u [B, H, T, D]`` unrotated; ``real [B, T]`` marks real tokens (positions count them)."""
    b, hq, t, d = q_u.shape
    hkv = k_u.shape[1]
    g = hq // hkv
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    pos = torch.where(real, real.long().cumsum(1) - 1, 0)
    outs = []
    for i in range(b):
        p = pos[i]
        qr, kr = rope(q_u[i:i + 1].double(), p[None]), rope(k_u[i:i + 1].double(), p[None])
        cap = torch.tensor([n if n is not None else 2**30 for n in caps]).repeat_interleave(g)
        qc = torch.cat([rope(q_u[i:i + 1, h:h + 1].double(), p.clamp_max(int(cap[h]))[None]) for h in range(hq)], 1)
        qi, ki = p.view(t, 1), p.view(1, t)
        heads = torch.arange(hkv).view(hkv, 1, 1)
        allowed = pattern.allowed(qi, ki, kv_head=heads, layer=layer).expand(hkv, t, t)
        allowed = allowed & real[i].view(1, 1, t) & real[i].view(1, t, 1)
        glob = global_only(pattern, qi, ki, hkv, layer) & allowed
        kk, vv = kr.repeat_interleave(g, 1), v[i:i + 1].double().repeat_interleave(g, 1)
        sc = d**-0.5 if scale is None else scale
        s = torch.where(glob.repeat_interleave(g, 0), qc @ kk.transpose(-1, -2), qr @ kk.transpose(-1, -2)) * sc
        s = s.masked_fill(~allowed.repeat_interleave(g, 0), -math.inf)
        outs.append(torch.softmax(s, -1).nan_to_num(0.0) @ vv)
    return torch.cat(outs)


def unrotated(b=2, hq=4, hkv=2, t=70, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_()
    return mk(hq), mk(hkv), mk(hkv)


def rotated(q_u, k_u, caps, real=None):
    """What a model hands in (``q``, ``k`` at their positions) and ``q_cap``, with the oracle's RoPE."""
    b, hq, t, _ = q_u.shape
    g = hq // k_u.shape[1]
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    pos = torch.where(real, real.long().cumsum(1) - 1, 0)
    cap = torch.tensor([n if n is not None else 2**30 for n in caps]).repeat_interleave(g)
    q, k = rope(q_u, pos), rope(k_u, pos)
    q_cap = torch.cat([rope(q_u[:, h:h + 1], torch.minimum(pos, cap[h])) for h in range(hq)], 1)
    return tuple(x.to(q_u.dtype) for x in (q, k, q_cap))


CAPPED = [
    Longformer(window=6, global_tokens=3, max_distance=20),
    BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1, max_distance=33),
    Longformer(window=5, global_tokens=4, max_distance=11) | Strided(stride=7, window=1),
    PerHead(SlidingWindow(window=8), ((1, Longformer(window=4, global_tokens=2, max_distance=9)),)),
]


def _caps(pattern, hkv=2):
    from hf_sparse.cap import head_caps

    return head_caps(pattern, hkv)


def _grads(out, *inputs):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * w).sum(), inputs)


# ---------------------------------------------------------------------------------------------
# reference and dense paths
@pytest.mark.parametrize("pattern", CAPPED, ids=lambda p: p.spec()[:40])
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_cap_matches_the_explicit_oracle_with_gradients(pattern, backend):
    q_u, k_u, v = unrotated(dtype=torch.float64)
    caps = _caps(pattern)
    q, k, q_cap = rotated(q_u, k_u, caps)
    out = sparse_attention(q, k, v, pattern, q_cap=q_cap, backend=backend, layer=1)
    want = oracle(q_u, k_u, v, pattern, caps, layer=1)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(_grads(out, q_u, k_u, v), _grads(want, q_u, k_u, v)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    # and the cap changes something here: without it the result differs
    plain = oracle(q_u, k_u, v, pattern, (None, None), layer=1)
    assert (plain - want).abs().max() > 1e-3


def test_cap_with_padding_counts_real_tokens():
    pattern = Longformer(window=5, global_tokens=2, max_distance=15)
    q_u, k_u, v = unrotated(b=3, t=40, dtype=torch.float64)
    real = torch.ones(3, 40, dtype=torch.bool)
    real[0, :6] = False  # left padding
    real[1, 33:] = False  # right padding
    real[2, :2] = False
    real[2, 38:] = False
    q, k, q_cap = rotated(q_u, k_u, (15, 15), real)
    out = sparse_attention(q, k, v, pattern, q_cap=q_cap, key_padding_mask=real, backend="reference")
    want = oracle(q_u, k_u, v, pattern, (15, 15), real=real)
    torch.testing.assert_close(out * real[:, None, :, None], want, atol=1e-10, rtol=1e-10)
    for a, b in zip(_grads(out * real[:, None, :, None], q_u, k_u, v), _grads(want, q_u, k_u, v)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_queries_after_cached_keys_and_the_lse():
    pattern = Longformer(window=6, global_tokens=3, max_distance=20)
    q_u, k_u, v = unrotated(dtype=torch.float64)
    q, k, q_cap = rotated(q_u, k_u, (20, 20))
    out, lse = sparse_attention(q[:, :, -9:], k, v, pattern, q_cap=q_cap[:, :, -9:], q_offset=61,
                                backend="reference", return_lse=True)
    torch.testing.assert_close(out, oracle(q_u, k_u, v, pattern, (20, 20))[:, :, -9:], atol=1e-10, rtol=1e-10)
    assert lse.shape == (2, 4, 9) and bool(torch.isfinite(lse).all())


def test_within_the_cap_nothing_changes_bit_for_bit():
    q_u, k_u, v = unrotated(t=40)
    q, k, _ = rotated(q_u, k_u, (None, None))
    capped = sparse_attention(q, k, v, "longformer:window=6,global_tokens=3,max_distance=39", backend="reference")
    plain = sparse_attention(q, k, v, "longformer:window=6,global_tokens=3,max_distance=none", backend="reference")
    assert torch.equal(capped, plain)  # the last query stands at 39: no query past the cap, no q_cap needed


# ---------------------------------------------------------------------------------------------
# Triton kernels in the interpreter
@needs_interpreter
@pytest.mark.parametrize("pattern,dtype", [(p, torch.float32) for p in CAPPED] + [(p, torch.float16) for p in CAPPED[:2]],
                         ids=lambda x: x.spec()[:40] if hasattr(x, "spec") else str(x)[6:])
def test_cap_on_the_kernels_forward_and_backward(pattern, dtype):
    q_u, k_u, v = unrotated(b=1, t=70, dtype=torch.float32)
    caps = _caps(pattern)
    q, k, q_cap = (x.to(dtype) for x in rotated(q_u, k_u, caps))
    vv = v.to(dtype)
    out = sparse_attention(q, k, vv, pattern, q_cap=q_cap, backend="triton", layer=1)
    want = oracle(q_u, k_u, v, pattern, caps, layer=1)
    tol = 2e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    for a, b in zip(_grads(out.float(), q_u, k_u, v), _grads(want, q_u, k_u, v)):
        torch.testing.assert_close(a.double(), b.double(), atol=5 * tol, rtol=5 * tol)


@needs_interpreter
def test_cap_decodes_by_positions_on_the_kernel():
    _decode_over_shuffled_slots("triton")


def test_cap_decodes_by_positions_on_the_reference():
    _decode_over_shuffled_slots("reference")


def _decode_over_shuffled_slots(backend):
    # a bounded cache's slots: the sinks, a window in ring order, empty slots; two decode queries
    pattern = Longformer(window=8, global_tokens=3, max_distance=20)
    t = 60
    q_u, k_u, v = unrotated(b=2, t=t, dtype=torch.float32)
    q, k, q_cap = rotated(q_u, k_u, (20, 20))
    want = oracle(q_u, k_u, v, pattern, (20, 20))[:, :, -2:]
    keep = torch.cat([torch.arange(3), torch.arange(t - 9, t)])  # sinks + the last window (and one spare)
    order = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))]
    slots = torch.cat([order, torch.tensor([-1, -1])])  # two empty slots
    k_pos = slots.expand(2, -1)
    take = slots.clamp_min(0)
    with torch.no_grad():
        out = attention_with_positions(q[:, :, -2:], k[:, :, take], v[:, :, take], pattern,
                                       q_pos=torch.tensor([[t - 2, t - 1]] * 2), k_pos=k_pos,
                                       q_cap=q_cap[:, :, -2:], backend=backend)
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# GPU, bf16: the kernels' error at most twice PyTorch's own bf16 error (flash-attention's rule)
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA GPU and triton")
GPU_CAPPED = [Longformer(window=256, global_tokens=4, max_distance=1024),
              BigBird(block=64, window_blocks=3, global_blocks=1, random_blocks=3, max_distance=1024)]


def _dense_capped(q, q_cap, k, v, pattern, q_offset):
    """Dense masked softmax in the inputs' dtype, global-only pairs scored with ``q_cap`` (PyTorch's own math)."""
    from hf_sparse.patterns.without_globals import without_globals

    qi, kj, heads, allowed = dense_grid(q, k, pattern, q_offset)
    g, d = q.shape[1] // k.shape[1], q.shape[3]
    rest = without_globals(pattern, capped_only=True).allowed(qi, kj, kv_head=heads).expand_as(allowed)
    glob, allowed = (x.repeat_interleave(g, 0) for x in (allowed & ~rest, allowed))
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.where(glob, q_cap @ kk.transpose(-1, -2), q @ kk.transpose(-1, -2)) * d**-0.5
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ vv


def dense_grid(q, k, pattern, q_offset):
    """Query positions ``[Tq, 1]``, key positions ``[1, Tk]``, KV heads ``[Hkv, 1, 1]`` and the pairs the
    pattern allows ``[Hkv, Tq, Tk]``, for queries at ``q_offset`` over keys from 0 (dense PyTorch oracles)."""
    tq, hkv, tk = q.shape[2], k.shape[1], k.shape[2]
    qi = torch.arange(q_offset, q_offset + tq, device=q.device).view(tq, 1)
    kj = torch.arange(tk, device=q.device).view(1, tk)
    heads = torch.arange(hkv, device=q.device).view(hkv, 1, 1)
    return qi, kj, heads, pattern.allowed(qi, kj, kv_head=heads).expand(hkv, tq, tk)


def _bf16_cap_rule(b, hq, hkv, t, d, pattern, q_offset=0):
    g = torch.Generator(device="cuda").manual_seed(t + d)
    mk = lambda h, n=t: torch.randn(b, h, n, d, generator=g, device="cuda").bfloat16()  # noqa: E731
    q, q_cap, k, v = mk(hq, t - q_offset), mk(hq, t - q_offset), mk(hkv), mk(hkv)
    do = mk(hq, t - q_offset)

    def kernels(q_, qc, k_, v_):
        return sparse_attention(q_, k_, v_, pattern, q_cap=qc, q_offset=q_offset, backend="triton")

    def dense(q_, qc, k_, v_):
        return _dense_capped(q_, qc, k_, v_, pattern, q_offset)

    check_bf16_rule({"q": q, "q_cap": q_cap, "k": k, "v": v}, do, kernels, dense)


def check_bf16_rule(inputs: dict, do, kernels, dense):
    """Outputs and gradients of ``kernels(*inputs)`` in bf16 against ``dense`` in float32: the error at most
    twice that of ``dense`` in bf16 (``inputs``: name -> bf16 tensor; ``do``: the output's gradient)."""
    def run(dtype, fn):
        x = [t_.detach().to(dtype).requires_grad_() for t_ in inputs.values()]
        out = fn(*x)
        return (out, *torch.autograd.grad(out, x, do.to(dtype)))

    ours, ref, torch_bf16 = run(torch.bfloat16, kernels), run(torch.float32, dense), run(torch.bfloat16, dense)
    for name, a, r, p in zip(("out", *(f"d{n}" for n in inputs)), ours, ref, torch_bf16):
        err, err_pt = (a.float() - r).abs().max().item(), (p.float() - r).abs().max().item()
        print(f"{name}: ours {err:.3e} vs torch-bf16 {err_pt:.3e}")
        assert torch.isfinite(a).all(), name
        assert err <= 2 * err_pt + 1e-4, f"{name}: kernel error {err:.3e} > 2 x PyTorch bf16 error {err_pt:.3e}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("pattern", GPU_CAPPED, ids=lambda p: p.spec()[:30])
def test_gpu_bf16_cap_prefill_and_decode_kernels(pattern):
    _bf16_cap_rule(1, 9, 3, 4113, 64, pattern)
    _bf16_cap_rule(1, 32, 8, 4096, 128, pattern)
    _bf16_cap_rule(2, 32, 8, 8192, 128, pattern, q_offset=8190)  # two queries: the decode kernel


@pytest.mark.gpu
@needs_gpu
def test_gpu_cap_decode_by_positions():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv, s, d = 3, 32, 8, 1004, 128
    pattern = Longformer(window=1000, global_tokens=4, max_distance=2048)
    q, q_cap = (torch.randn(b, hq, 1, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    k_pos = torch.cat([torch.arange(4, device="cuda").expand(b, 4),
                       torch.stack([4000 + torch.randperm(1000, device="cuda", generator=g) for _ in range(b)])], 1)
    k_pos[1, 100:200] = -1
    q_pos = torch.tensor([[4999], [4990], [-1]], device="cuda")
    kw = dict(q_pos=q_pos, k_pos=k_pos)
    ours = attention_with_positions(q, k, v, pattern, q_cap=q_cap, backend="triton", **kw)
    ref = attention_with_positions(q.float(), k.float(), v.float(), pattern, q_cap=q_cap.float(), backend="reference",
                                   **kw)
    torch_bf16 = attention_with_positions(q, k, v, pattern, q_cap=q_cap, backend="reference", **kw)
    err, err_pt = ((x.float() - ref).abs().max().item() for x in (ours, torch_bf16))
    assert err <= 2 * err_pt + 1e-4, (err, err_pt)
    assert torch.equal(ours[2], torch.zeros_like(ours[2]))


# ---------------------------------------------------------------------------------------------
# patched models: the model's own rotary embedding
def _oracle_attention(n, window, globals_):
    """An attention function for transformers that recomputes the queries from the layer's input, rotates
    them with the model's rotary embedding at min(position, n) and runs dense masked softmax."""
    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        h = module._oracle_input
        b, t = h.shape[:2]
        hd = module.head_dim
        if hasattr(module, "qkv_proj"):  # Phi-3: fused projections, queries first
            q_u = module.qkv_proj(h)[..., : module.config.num_attention_heads * hd]
        else:
            q_u = module.q_proj(h)
        q_u = q_u.view(b, t, -1, hd).transpose(1, 2)
        apply = sys.modules[type(module).__module__].apply_rotary_pos_emb
        pos = torch.arange(t).view(1, t)
        cos, sin = module._oracle_rotary(q_u, pos.clamp_max(n))
        q_cap, _ = apply(q_u, q_u, cos, sin)
        group = query.shape[1] // key.shape[1]
        kk, vv = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        i, j = pos.view(t, 1), pos.view(1, t)
        allowed = (j <= i) & ((j > i - window) | (j < globals_))
        glob = (j < globals_) & (j <= i - window)
        s = torch.where(glob, q_cap @ kk.transpose(-1, -2), query @ kk.transpose(-1, -2)) * scaling
        s = s.masked_fill(~allowed, -math.inf)
        return (torch.softmax(s.float(), -1).to(vv.dtype) @ vv).transpose(1, 2).contiguous(), None

    return fn


def use_oracle_attention(model, name: str, fn) -> None:
    """Run ``model`` on the attention function ``fn``, registered as ``name``; each attention module gets the
    model's rotary embedding (``_oracle_rotary``) and, at every forward, its input (``_oracle_input``)."""
    import transformers

    rotary = model.model.rotary_emb
    for module in model.modules():
        if hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention"):
            module.__dict__["_oracle_rotary"] = rotary
            module.register_forward_pre_hook(lambda m, a, kw: m.__dict__.__setitem__(
                "_oracle_input", kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    transformers.AttentionInterface.register(name, fn)
    model.set_attn_implementation(name)


@pytest.mark.parametrize("family,rope_parameters", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    ("phi3", None),
], ids=["llama3-scaled", "yarn", "phi3-partial-rotary"])
def test_patched_model_matches_the_oracle_with_its_own_rope(family, rope_parameters):
    from hf_models import tiny, tokens

    from hf_sparse import patch_model

    extra = {"rope_parameters": rope_parameters} if rope_parameters else {"partial_rotary_factor": 0.5}
    model = tiny(family, max_position_embeddings=64, **extra)
    ids = tokens(2, 48)
    n, window, globals_ = 20, 6, 3
    use_oracle_attention(model, "cap_oracle_test", _oracle_attention(n, window, globals_))
    with torch.no_grad():
        want = model(ids).logits
    patch_model(model, f"longformer:window={window},global_tokens={globals_},max_distance={n}", backend="reference")
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    patch_model(model, f"longformer:window={window},global_tokens={globals_},max_distance=none", backend="reference")
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 1e-2  # the cap is what made them agree


def test_auto_is_the_trained_length_and_costs_nothing_within_it():
    from hf_models import tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=40)
    patch_model(model, "longformer:window=6,global_tokens=3", backend="reference")
    assert model.config.hf_sparse["pattern"]["max_distance"] == "auto"  # saved as auto: follows the config
    assert "max_distance=40" in repr(model)
    ids = tokens(1, 60)
    with torch.no_grad():
        auto_short, auto_long = model(ids[:, :41]).logits, model(ids).logits
        patch_model(model, "longformer:window=6,global_tokens=3,max_distance=none", backend="reference")
        plain_short, plain_long = model(ids[:, :41]).logits, model(ids).logits
    assert torch.equal(auto_short, plain_short)  # positions 0..40: none past the cap, the plain kernels ran
    assert (auto_long[:, 41:] - plain_long[:, 41:]).abs().max() > 1e-3
    torch.testing.assert_close(auto_long[:, :41], plain_long[:, :41], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["longformer:window=6,global_tokens=3,max_distance=20",
                                     "per_head[sliding_window:window=6;1=longformer:window=5,global_tokens=2,"
                                     "max_distance=18]"])
def test_generate_over_the_bounded_cache_equals_the_full_forward(pattern):
    from hf_models import left_padding, tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=64)
    patch_model(model, pattern, backend="reference")
    ids = tokens(2, 30)
    mask = left_padding([30, 26], 30)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, 16, dtype=mask.dtype)], 1)
        pos = (full_mask.cumsum(1) - 1).clamp_min(0)
        full = model(seq[:, :-1], attention_mask=full_mask[:, :-1], position_ids=pos[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 29:], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_over_the_bounded_cache():
    from hf_models import cache_kwargs, tiny, tokens
    from hf_sparse.patches import SparseCache

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=64)
    patch_model(model, "longformer:window=6,global_tokens=3,max_distance=20", backend="reference")
    ids = tokens(1, 50)
    cache = SparseCache(model)
    with torch.no_grad():
        parts = [model(ids[:, a:b], **cache_kwargs(cache)).logits for a, b in ((0, 18), (18, 35), (35, 50))]
        full = model(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# spec, options and errors
def test_spec_round_trips_and_shows_the_cap():
    for text in ("longformer:window=8,global_tokens=2,max_distance=100", "bigbird:max_distance=none",
                 "longformer:window=8", "per_head[sliding_window:window=4;1=longformer:window=3,max_distance=7]"):
        p = parse_pattern(text)
        assert parse_pattern(p.spec()) == p and parse_pattern(p.to_dict()) == p
        assert "max_distance=" in p.spec()
    assert parse_pattern("longformer").max_distance == "auto"
    assert parse_pattern("bigbird:max_distance=none").max_distance is None
    assert option_ranges(Longformer)["max_distance"] == "integer in [1, 1073741824], auto, none"
    from hf_sparse.patterns.without_globals import without_globals

    rest = without_globals(CAPPED[2], capped_only=True)
    assert parse_pattern(rest.spec()) == rest


@pytest.mark.parametrize("text,match", [
    ("longformer:max_distance=0", r"max_distance must be an integer >= 1, got 0"),
    ("longformer:max_distance=-3", r"max_distance must be an integer >= 1"),
    ("longformer:max_distance=2000000000", r"max_distance must be at most 1073741824"),
    ("longformer:max_distance=far", r"max_distance='far' is not a number; give an integer or auto or none"),
    ("bigbird:max_distance=true", r"max_distance='true' is not a number"),
    ("longformer:causal=false,max_distance=64", r"needs causal=true"),
    ("longformer:window=4,max_distance=none|bigbird", r"cap their distance differently \(max_distance auto, none\)"),
    ("dense:max_distance=-3", r"max_distance must be an integer >= 1, got -3"),
    ("dense:max_distance=0", r"max_distance must be an integer >= 1, got 0"),
    ("dense:causal=false,max_distance=64", r"needs causal=true"),
    ("dense:max_distance=far", r"max_distance='far' is not a number"),
])
def test_bad_values_are_refused_with_the_range(text, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(text)


def test_bad_values_from_python_are_refused():
    for bad in (True, 0, 2.5, "far"):
        with pytest.raises(ValueError, match=r"max_distance must be"):
            Longformer(max_distance=bad)


def test_a_capped_call_without_q_cap_or_with_a_wrong_one_is_refused():
    q_u, k_u, v = unrotated(t=40)
    q, k, q_cap = rotated(q_u, k_u, (10, 10))
    with pytest.raises(ValueError, match=r"queries reach position 39: pass q_cap="):
        sparse_attention(q, k, v, "longformer:window=4,global_tokens=2,max_distance=10", backend="reference")
    with pytest.raises(ValueError, match=r"sets no max_distance"):
        sparse_attention(q, k, v, "longformer:window=4,max_distance=none", q_cap=q_cap, backend="reference")
    with pytest.raises(ValueError, match=r"q_cap must be a tensor shaped like q"):
        sparse_attention(q, k, v, "longformer:window=4,max_distance=10", q_cap=q_cap[:, :2], backend="reference")
    with pytest.raises(ValueError, match=r"positions are given per call"):
        attention_with_positions(q, k, v, "longformer:window=4,max_distance=10", q_pos=torch.zeros(2, 40).long(),
                                 k_pos=torch.arange(40).expand(2, 40), backend="reference")
    with pytest.raises(ValueError, match=r"rules do not merge into kernel primitives"):
        sparse_attention(q, k, v, "longformer:window=4,max_distance=10|strided:stride=5|strided:stride=3",
                         q_cap=q_cap, backend="reference")


def test_auto_needs_the_trained_length():
    from hf_models import tiny

    from hf_sparse import patch_model

    model = tiny("llama")
    model.config.__dict__["max_position_embeddings"] = None  # (the config class refuses None when set)
    with pytest.raises(ValueError, match=r"max_distance=auto is the model's trained length"):
        patch_model(model, "longformer:window=4", backend="reference")
    patch_model(model, "longformer:window=4,max_distance=none", backend="reference")  # the way out


def test_packed_documents_longer_than_the_cap_are_refused():
    from hf_models import tiny, tokens

    from hf_sparse import patch_model

    model = tiny("llama", max_position_embeddings=64)
    patch_model(model, "longformer:window=4,global_tokens=2,max_distance=12", backend="reference")
    ids = tokens(1, 40)
    with torch.no_grad():  # documents of at most 13 tokens: positions up to 12, none past the cap
        model(ids, position_ids=torch.cat([torch.arange(13)] * 3 + [torch.arange(1)]).view(1, 40))
        with pytest.raises(NotImplementedError, match=r"packed batch holds a document of 20 tokens"):
            model(ids, position_ids=torch.cat([torch.arange(10), torch.arange(10), torch.arange(20)]).view(1, 40))
