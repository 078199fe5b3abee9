"""The distance cap of global keys (``max_distance=N``): LM-Infinite's ceiling on the distance to the start.

A model trained on ``L`` tokens never saw a query attend to a key more than ``L`` positions back. A
sparse pattern with global keys (Longformer's first tokens, BigBird's global blocks) makes every query
attend to them, so past ``L`` the model meets relative distances it was not trained on, and with RoPE
that breaks it (SmolLM2-135M under ``longformer:window=1024,global_tokens=4``: perplexity near 26 up
to 12k tokens, 352 at 14-16k). The cap scores a global key that the query sees *only* through the
global rule as if the query stood at position ``min(i, N)``; keys the band, a stride or a random block
shows keep their true distance. With RoPE, "the query at position ``p``" is the query rotated by
``p``; since rotations compose, the capped query is the rotated query turned once more by
``min(i, N) - i``. :mod:`hf_sparse.patches.rope` computes that from the model's own rotary embedding
(scaled variants included) and hands it in as ``q_cap``; the core takes it as a tensor, with no
knowledge of RoPE.

How it runs: two exact partial attentions merged by their log-sum-exp
(:func:`hf_sparse.merge_attention`):

1. the pattern without its capped global prefix (:func:`~hf_sparse.patterns.without_globals.without_globals`)
   on the kernels or the reference, with ``return_lse=True``: the same kernels and cost as before, minus
   the global tiles;
2. ``q_cap`` against the global keys, masked to the pairs the first pass does not hold: ``O(T * G)``
   scores (``G`` global keys), in PyTorch.

Both passes are differentiable (the first through the differentiable lse), so training works too, and
the gradient of ``q_cap`` flows back through the rotation to the query. A caller who knows that no
query stands past ``N`` gives the pattern uncapped (:func:`uncapped`; ``sparse_attention`` accepts a
capped pattern without ``q_cap`` when ``q_offset + Tq - 1 <= N``, a host-side bound): then nothing
changes, one pass on the plain kernels, bit for bit the uncapped result. ``max_distance="auto"`` is resolved by
:func:`hf_sparse.patch_model` to the model's trained length; on bare tensors it caps nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .decode import positions_attention, positions_forward
from .ops import merge_attention, padding_layout, sparse_attention
from .patterns import Pattern
from .patterns.base import declares_cap, map_patterns, set_cap
from .patterns.without_globals import without_globals

__all__ = ["head_caps", "cap_acts", "uncapped", "resolve_max_distance", "capped_attention",
           "capped_positions_attention", "check_q_cap"]


def head_caps(pattern: Pattern, kv_heads: int) -> tuple[int | None, ...]:
    """The cap ``N`` of each KV head's global prefix (``None``: no prefix, or no cap)."""
    prims = pattern.head_primitives(kv_heads)
    if any(p is None for p in prims) and declares_cap(pattern):
        raise ValueError(f"pattern {pattern.spec()!r} sets max_distance, but its rules do not merge into kernel "
                         "primitives, which the cap needs to tell global keys from the rest; give max_distance=none "
                         "or a pattern whose rules merge (see docs/patterns.md)")
    return tuple(p.max_distance if p is not None and p.global_tokens else None for p in prims)


def cap_acts(pattern: Pattern, kv_heads: int, max_position: int) -> bool:
    """Whether a query at a position up to ``max_position`` stands past the cap of some head."""
    return any(n is not None and max_position > n for n in head_caps(pattern, kv_heads))


def _drop_cap(p: Pattern) -> Pattern:
    return dataclasses.replace(p, max_distance=None) if set_cap(getattr(p, "max_distance", None)) else p


@functools.lru_cache(maxsize=256)
def uncapped(pattern: Pattern) -> Pattern:
    """``pattern`` with every ``max_distance`` turned off (what runs while no query stands past the cap)."""
    return map_patterns(pattern, _drop_cap)


def resolve_max_distance(pattern: Pattern, trained_length: int | None) -> Pattern:
    """``pattern`` with every ``max_distance="auto"`` replaced by ``trained_length`` (``None`` turns them off)."""
    def resolve(p: Pattern) -> Pattern:
        if getattr(p, "max_distance", None) != "auto":
            return p
        return dataclasses.replace(p, max_distance=trained_length if p.causal else None)

    return map_patterns(pattern, resolve)


def check_q_cap(q: torch.Tensor, q_cap, pattern: Pattern) -> None:
    if not declares_cap(pattern):
        raise ValueError(f"q_cap is given but pattern {pattern.spec()!r} sets no max_distance; drop q_cap or give "
                         "the pattern max_distance=N")
    if not isinstance(q_cap, torch.Tensor) or q_cap.shape != q.shape or q_cap.device != q.device:
        got = tuple(q_cap.shape) if isinstance(q_cap, torch.Tensor) else type(q_cap).__name__
        raise ValueError(f"q_cap must be a tensor shaped like q {tuple(q.shape)} on {q.device}, got {got}")


def _missing_q_cap(pattern: Pattern, where: str) -> ValueError:
    return ValueError(
        f"pattern {pattern.spec()!r} caps the distance of its global keys (max_distance) and {where}: pass "
        "q_cap= (the queries rotated to position min(i, max_distance); hf_sparse.patch_model does it from the "
        "model's rotary embedding), or give the pattern with max_distance=none")


def _global_only(pattern: Pattern, rest: Pattern, layer: int, num_keys: int | None):
    """The pairs ``pattern`` shows and ``rest`` does not: capped global keys seen through no other rule."""
    def visible(qp, kp, kv_head):
        kw = dict(layer=layer, kv_head=kv_head, num_keys=num_keys)
        return pattern.allowed(qp, kp, **kw) & ~rest.allowed(qp, kp, **kw)

    return visible


def capped_attention(q, q_cap, k, v, pattern: Pattern, *, scale: float, softcap: float, key_padding_mask,
                     q_offset: int, layer: int, backend: str, check_padding: bool):
    """``(out, lse)`` of ``sparse_attention`` with the cap (arguments as there, already checked)."""
    rest = without_globals(pattern, capped_only=True)
    main = sparse_attention(q, k, v, rest, scale=scale, key_padding_mask=key_padding_mask, q_offset=q_offset,
                            layer=layer, softcap=softcap, backend=backend, check_padding=check_padding,
                            return_lse=True)
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    g = min(pattern.global_tokens_total, tk)
    dev = q.device
    rows, cols = torch.arange(tq, device=dev).view(1, tq), torch.arange(g, device=dev).view(1, g)
    if key_padding_mask is None:  # the global keys are the first slots
        k_g, v_g = k[:, :, :g], v[:, :, :g]
        q_pos, k_pos = (q_offset + rows).expand(b, tq), cols.expand(b, g)
    else:  # the first real tokens of each row; positions count real tokens
        k_shift, k_len = (x.long().view(b, 1) for x in padding_layout(key_padding_mask, check=False))
        slots = (k_shift + cols).clamp_max(tk - 1)
        k_g, v_g = (t.gather(2, slots[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in (k, v))
        k_pos = torch.where(cols < k_len, cols, -1)
        q_pos = q_offset - k_shift + rows
        q_pos = torch.where((q_pos >= 0) & (q_pos < k_len), q_pos, -1)
    glob = positions_forward(q_cap.to(q.dtype), k_g, v_g, q_pos, k_pos, _global_only(pattern, rest, layer, None),
                             scale=scale, softcap=softcap)
    return merge_attention([main, glob])


def capped_positions_attention(q, q_cap, k, v, pattern: Pattern, *, q_pos, k_pos, scale: float, softcap: float,
                               layer: int, num_keys: int | None, backend: str) -> torch.Tensor:
    """:func:`hf_sparse.decode.attention_with_positions` with the cap (inputs already checked): the pattern
    without its capped prefix by positions (the decode kernel where it serves), and ``q_cap`` over the slots
    that hold capped global keys seen through no other rule."""
    if q_cap is None:
        raise _missing_q_cap(pattern, "positions are given per call (no host-side bound)")
    check_q_cap(q, q_cap, pattern)
    head_caps(pattern, k.shape[1])
    rest = without_globals(pattern, capped_only=True)
    main = positions_attention(q, k, v, rest, q_pos=q_pos, k_pos=k_pos, scale=scale, softcap=softcap, layer=layer,
                               num_keys=num_keys, backend=backend)
    glob = positions_forward(q_cap.to(q.dtype), k, v, q_pos, k_pos, _global_only(pattern, rest, layer, num_keys),
                             scale=scale, softcap=softcap)
    return merge_attention([main, glob])[0]


def route_capped(q, q_cap, k, pattern: Pattern, q_offset: int) -> bool:
    """Whether :func:`hf_sparse.sparse_attention` takes the cap: always when ``q_cap`` is given (checked; the
    caller may know positions the slots do not show), else never, and a capped pattern whose queries may stand
    past the cap raises."""
    if q_cap is not None:
        check_q_cap(q, q_cap, pattern)
        head_caps(pattern, k.shape[1])
        return True
    max_position = q_offset + q.shape[2] - 1  # positions never exceed key slots
    if cap_acts(pattern, k.shape[1], max_position):
        raise _missing_q_cap(pattern, f"queries reach position {max_position}")
    return False
