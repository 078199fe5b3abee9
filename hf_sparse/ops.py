"""``sparse_attention``: the differentiable op, its ``torch.library`` registration and backend dispatch.

Layers (as in Liger-Kernel and flash-attention): Triton kernels (:mod:`hf_sparse.kernels`) ->
host launchers -> two ``torch.library`` custom ops (forward, backward) with fake implementations, so
``torch.compile`` traces through them -> :func:`sparse_attention`, which validates its inputs.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from .patterns import Pattern, parse_pattern
from .patterns.base import declares_cap
from .reference import SeqLayout, blockwise_backward, blockwise_forward, dense_attention, empty_rows_neg_inf

__all__ = ["sparse_attention", "merge_attention", "padding_layout", "triton_supports", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference", "dense")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=256)
def _pattern_from_spec(spec: str) -> Pattern:
    return parse_pattern(spec)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supports(q: torch.Tensor, k: torch.Tensor, pattern: Pattern | None = None) -> str | None:
    """``None`` when the Triton kernels can run these inputs (and ``pattern``), else the reason they cannot."""
    if not _triton_importable():
        return "triton is not installed"
    if not (q.is_cuda or _interpreting()):
        return f"tensors are on {q.device.type} (the kernels run on CUDA, or on the CPU with TRITON_INTERPRET=1)"
    d = q.shape[-1]
    if d > 256:
        return f"head_dim {d} is larger than the kernels' 256"
    if q.dtype == torch.float64:
        return "float64 inputs run on the reference path"
    if pattern is not None:
        from .kernels.plan import kernel_unfit

        return kernel_unfit(pattern, k.shape[1])
    return None


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# custom ops
def _seq(q, k, k_shift, k_len, q_offset) -> SeqLayout:
    return SeqLayout.build(q.shape[0], q.shape[2], k.shape[2], q_offset, k_shift, k_len)


def _forward_impl(q, k, v, k_shift, k_len, pat: Pattern, scale: float, softcap: float, q_offset: int, layer: int,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on the chosen backend, contiguous (what the fake below promises on every backend)."""
    if backend == "triton":
        from .kernels import forward as triton_forward

        out = triton_forward(q, k, v, pat, scale=scale, softcap=softcap, k_shift=k_shift, k_len=k_len,
                             q_offset=q_offset, layer=layer)
    else:
        with torch.autocast(q.device.type, enabled=False):  # the reference keeps its float32 arithmetic
            out = blockwise_forward(q, k, v, pat, scale=scale, softcap=softcap,
                                    seq=_seq(q, k, k_shift, k_len, q_offset), layer=layer)
    return tuple(x.contiguous() for x in out)


def _backward_impl(do, q, k, v, out, lse, k_shift, k_len, pat: Pattern, scale: float, softcap: float, q_offset: int,
                   layer: int, backend: str, d_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` on the chosen backend, contiguous. ``d_lse``: the gradient of the log-sum-exp output
    (``None`` when unused); rows that saw no key have no gradient."""
    if do is None:
        do = torch.zeros_like(out)
    if d_lse is not None:
        d_lse = torch.where(torch.isfinite(lse), d_lse.to(lse.dtype), 0.0)
    if backend == "triton":
        from .kernels import backward as triton_backward

        grads = triton_backward(do, q, k, v, out, lse, pat, scale=scale, softcap=softcap, k_shift=k_shift,
                                k_len=k_len, q_offset=q_offset, layer=layer, d_lse=d_lse)
    else:
        with torch.autocast(q.device.type, enabled=False):
            grads = blockwise_backward(do, q, k, v, out, lse, pat, scale=scale, softcap=softcap,
                                       seq=_seq(q, k, k_shift, k_len, q_offset), layer=layer, d_lse=d_lse)
    return tuple(g.contiguous() for g in grads)


@torch.library.custom_op("hf_sparse::attn_fwd", mutates_args=())
def _attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_shift: torch.Tensor | None, k_len: torch.Tensor | None,
    pattern: str, scale: float, softcap: float, q_offset: int, layer: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, k_shift, k_len, _pattern_from_spec(pattern), scale, softcap, q_offset, layer,
                         backend)


@_attn_fwd.register_fake
def _(q, k, v, k_shift, k_len, pattern, scale, softcap, q_offset, layer, backend):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.custom_op("hf_sparse::attn_bwd", mutates_args=())
def _attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    k_shift: torch.Tensor | None, k_len: torch.Tensor | None,
    pattern: str, scale: float, softcap: float, q_offset: int, layer: int, backend: str,
    d_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(do, q, k, v, out, lse, k_shift, k_len, _pattern_from_spec(pattern), scale, softcap,
                          q_offset, layer, backend, d_lse)


@_attn_bwd.register_fake
def _(do, q, k, v, out, lse, k_shift, k_len, pattern, scale, softcap, q_offset, layer, backend, d_lse=None):
    # contiguous whatever the inputs' strides (HF hands q/k/v in as transposed views): what both backends
    # return; Inductor checks the real strides against these
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, k_shift, k_len, pattern, scale, softcap, q_offset, layer, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, k_shift, k_len)
    ctx.args = (pattern, scale, softcap, q_offset, layer, backend)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, k_shift, k_len = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    dq, dk, dv = _attn_bwd(d_out, q, k, v, out, lse, k_shift, k_len, *ctx.args, d_lse)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("hf_sparse::attn_fwd", _backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' forward and backward without the dispatcher, for eager mode: the same
    implementations, ~2x less host time per call, which is what a decode step or a short sequence waits
    on. ``torch.compile`` traces the custom ops instead (``sparse_attention`` picks)."""

    @staticmethod
    def forward(ctx, q, k, v, k_shift, k_len, pat, scale, softcap, q_offset, layer, backend):
        out, lse = _forward_impl(q, k, v, k_shift, k_len, pat, scale, softcap, q_offset, layer, backend)
        ctx.save_for_backward(q, k, v, out, lse, k_shift, k_len)
        ctx.args = (pat, scale, softcap, q_offset, layer, backend)
        ctx.set_materialize_grads(False)  # an unused output (usually the lse) costs nothing in the backward
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, k_shift, k_len = ctx.saved_tensors
        d_out = None if d_out is None else d_out.contiguous()
        dq, dk, dv = _backward_impl(d_out, q, k, v, out, lse, k_shift, k_len, *ctx.args, d_lse)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
def padding_layout(key_padding_mask: torch.Tensor, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_shift, k_len)`` int32 ``[B]`` from a ``[B, Tk]`` boolean mask (True = real token).

    Real tokens must form one contiguous run per row (left padding, right padding or both). With
    ``check=True`` that is verified (one host sync); a mask with holes raises ``ValueError``.
    """
    m = key_padding_mask.bool()
    k_len = m.sum(1)
    k_shift = torch.where(k_len > 0, m.int().argmax(1), torch.zeros_like(k_len))
    if check and not torch.compiler.is_compiling():
        tk = m.shape[1]
        last = tk - 1 - m.flip(1).int().argmax(1)
        holes = (k_len > 0) & (last - k_shift + 1 != k_len)
        if bool(holes.any()):
            rows = holes.nonzero().flatten().tolist()[:5]
            raise ValueError(
                f"key_padding_mask rows {rows} have padding between real tokens; only left and/or right padding is "
                "supported (one contiguous run of True per row). Unpad or pack the sequences first."
            )
    return k_shift.to(torch.int32), k_len.to(torch.int32)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | str | dict = "dense",
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    layer: int = 0,
    softcap: float | None = None,
    backend: str = "auto",
    check_padding: bool = True,
    return_lse: bool = False,
    q_cap: torch.Tensor | None = None,
    k_cap: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to a sparse ``pattern``; differentiable in ``q``, ``k`` and ``v``.

    Args:
        q: ``[B, Hq, Tq, D]`` queries.
        k, v: ``[B, Hkv, Tk, D]`` keys and values, ``Hq % Hkv == 0``. Grouped-query attention is native:
            query head ``h`` reads KV head ``h // (Hq // Hkv)``, nothing is repeated in memory. With
            ``Hq = 32, Hkv = 8`` each KV head serves 4 query heads; ``Hkv = 1`` is multi-query attention.
        pattern: a :class:`~hf_sparse.Pattern`, a spec string (``"bigbird"``,
            ``"longformer:window=1024,global_tokens=4"``) or a dict.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: ``[B, Tk]`` bool, True for real tokens (left and/or right padding). Positions
            count real tokens only, so global tokens are the first real ones; padded keys are never seen.
        q_offset: query ``i`` is key slot ``q_offset + i`` (a chunk of queries after cached keys).
            Without padding its position is ``q_offset + i``.
        layer: layer index (BigBird draws its random blocks per layer).
        softcap: optional logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2).
        backend: ``"auto"`` (Triton on CUDA, else reference), ``"triton"``, ``"reference"`` (block-wise
            PyTorch, memory ``O(T * visited keys)``) or ``"dense"`` (the ``O(T^2)`` oracle, tests only).
            On Triton, calls with at most 64 (query, head) rows per KV head -- decode steps, small
            chunks -- run the decode kernel (one program per KV head and split of the keys).
        check_padding: verify that ``key_padding_mask`` is left/right padding only (one host sync).
        return_lse: also return the log-sum-exp of each row's (scaled, soft-capped) logits over the keys it
            sees, differentiable like the output. Two attentions over disjoint key sets merge exactly by it
            (``merge_attention``).
        q_cap: for a pattern with ``max_distance=N`` (:mod:`hf_sparse.cap`): the queries rotated to position
            ``min(i, N)`` instead of ``i``, same shape as ``q``; global keys that only the global rule shows
            are scored with it. Needed once a query stands past ``N``; ``hf_sparse.patch_model`` computes it
            from the model's rotary embedding.
        k_cap: for a pattern whose dense heads cap their distances (``dense:max_distance=N``): the keys
            rotated back to position 0, same shape as ``k``; with ``q_cap``, it scores the keys at distance
            ``N`` or more. Needed, with ``q_cap``, once a query stands past ``N``.

    Returns:
        ``[B, Hq, Tq, D]`` in the dtype of ``q``. A query row that sees no key is zero. With
        ``return_lse=True``, ``(out, lse)``: ``lse`` is ``[B, Hq, Tq]`` float32 (float64 for float64 inputs),
        natural log, ``-inf`` on rows that see no key.

    Precision: float16/bfloat16 accumulate in float32. float32 inputs on the Triton path use TF32
    tensor cores for the two matrix products; float64 always runs on the reference path. Under
    ``torch.autocast`` the inputs are cast to the autocast dtype first, as SDPA does.

    Example::

        q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        k = v = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
        out = sparse_attention(q, k, v, "sliding_window:window=1024")
    """
    pat = parse_pattern(pattern)
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        # like SDPA under autocast: run in the autocast dtype (RoPE hands us float32 q/k next to a bf16 v)
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = (x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in (q, k, v))
    _validate(q, k, v, key_padding_mask, q_offset, layer, backend, softcap)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):  # the kernels take the row max before scaling
        raise ValueError(f"scale must be a positive finite number, got {scale!r}; leave it None for D ** -0.5")
    softcap = float(softcap or 0.0)
    if key_padding_mask is not None:
        if key_padding_mask.shape[1] != k.shape[2]:
            raise ValueError(f"key_padding_mask has {key_padding_mask.shape[1]} columns but keys have Tk={k.shape[2]}")
        if q_offset + q.shape[2] > k.shape[2]:
            raise ValueError(
                f"with key_padding_mask the queries must be key slots: q_offset ({q_offset}) + Tq ({q.shape[2]}) "
                f"must be <= Tk ({k.shape[2]})"
            )
    if q_cap is not None or k_cap is not None or declares_cap(pat):
        from .cap import capped_attention, route_capped

        if route_capped(q, q_cap, k, pat, q_offset, k_cap):
            out, lse = capped_attention(q, q_cap, k, v, pat, k_cap=k_cap, scale=scale, softcap=softcap,
                                        key_padding_mask=key_padding_mask, q_offset=q_offset, layer=layer,
                                        backend=backend, check_padding=check_padding)
            return (out, lse) if return_lse else out
    if backend == "dense":
        return dense_attention(q, k, v, pat, scale=scale, softcap=softcap, key_padding_mask=key_padding_mask,
                               q_offset=q_offset, layer=layer, return_lse=return_lse)
    chosen = resolve_backend(backend, q, k, pat)
    k_shift = k_len = None
    if key_padding_mask is not None:
        k_shift, k_len = padding_layout(key_padding_mask, check=check_padding)
    args = (k_shift, k_len, pat, scale, softcap, int(q_offset), int(layer), chosen)
    if torch.compiler.is_compiling():  # traced: the custom ops, with their fake implementations
        out, lse = _attn_fwd(q, k, v, k_shift, k_len, pat.spec(), *args[3:])
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _EagerAttention.apply(q, k, v, *args)
    else:
        out, lse = _forward_impl(q, k, v, *args)
    if not return_lse:
        return out
    return out, empty_rows_neg_inf(lse)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of disjoint key sets from each set's ``(out, lse)``
    (``sparse_attention(..., return_lse=True)``): ``(out, lse)``, differentiable. Rows no part sees stay
    zero with ``lse = -inf``."""
    if not parts:
        raise ValueError("merge_attention needs at least one (out, lse) pair")
    m = torch.stack([p[1] for p in parts]).amax(0).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)  # no gradient flows through the shift: it cancels
    w = [torch.exp(p[1] - m) for p in parts]  # exp(-inf) = 0: a part that sees nothing weighs nothing
    total = sum(w)
    seen = total > 0
    total = torch.where(seen, total, 1.0)  # keeps log and division finite (and their gradients) on empty rows
    lse = torch.where(seen, m + torch.log(total), float("-inf"))
    out = sum(o.to(total.dtype) * (wi / total).unsqueeze(-1) for (o, _), wi in zip(parts, w))
    return out.to(parts[0][0].dtype), lse


def resolve_backend(backend: str, q: torch.Tensor, k: torch.Tensor, pattern: Pattern, *, what: str = "") -> str:
    """The one place a backend is chosen: ``"triton"`` or ``"reference"`` (``"dense"`` is the caller's).

    ``"triton"`` that cannot run (no Triton, CPU tensors, a pattern without kernel primitives) raises a
    ``ValueError`` saying why; ``"auto"`` takes Triton on CUDA when it can, else the reference (with a
    one-time warning on CUDA). ``what`` names the call in messages (e.g. ``"this decode"``)."""
    if backend == "reference":
        return "reference"
    reason = triton_supports(q, k, pattern)
    if backend == "triton":
        if reason is not None:
            where = f" {what}" if what else " here"
            raise ValueError(f"backend='triton' cannot run{where}: {reason}. Use backend='auto' or 'reference'.")
        return "triton"
    # auto
    if reason is None and q.is_cuda:
        return "triton"
    if q.is_cuda:
        _warn_once(f"hf_sparse: using the PyTorch reference path because {reason}")
    return "reference"


def validate_qkv(q, k, v, *, value_dim_may_differ: bool = False) -> None:
    """Shared checks of ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``: a ``ValueError`` naming the value."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {got}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    bq, hq, _, d = q.shape
    bk, hkv, _, dk = k.shape
    same = v.shape[:3] == k.shape[:3] if value_dim_may_differ else v.shape == k.shape
    if not same:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Tk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if bq != bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch size and head dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def _validate(q, k, v, key_padding_mask, q_offset, layer, backend, softcap) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    validate_qkv(q, k, v)
    bq, tk = q.shape[0], k.shape[2]
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative int, got {q_offset!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap < 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != bq:
            raise ValueError(
                f"key_padding_mask must be [B, Tk] = [{bq}, {tk}] (True = real token), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
            raise ValueError(f"key_padding_mask must be bool or integer 0/1, got {key_padding_mask.dtype}")
