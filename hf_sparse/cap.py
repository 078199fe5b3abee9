"""The distance caps (``max_distance=N``): LM-Infinite's on global keys, ReRoPE's on dense heads.

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

A dense head has no global keys, but past ``L`` it meets the same unseen distances. ``dense:max_distance=N``
caps them as ReRoPE and Self-Extend do: query ``i`` still sees every key ``j <= i``, scored at the distance
``min(i - j, N)``. With RoPE, a key at distance ``>= N`` is scored by the query at position ``N`` (``q_cap``:
``min(i, N) = N`` on those rows) against the key at position 0: the key rotated back by its position,
which the caller hands in as ``k_cap`` (the same shape as ``k``; :mod:`hf_sparse.patches.rope` again).

How it runs: exact partial attentions over disjoint keys, merged by their log-sum-exp
(:func:`hf_sparse.merge_attention`):

1. :func:`first_pass`: the pattern without its capped global prefix
   (:func:`~hf_sparse.patterns.without_globals.without_globals`), each capped dense head replaced by the band
   ``sliding_window:window=N``, all heads in one launch on the kernels or the reference, with
   ``return_lse=True``: the same kernels and cost as before, minus the global tiles;
2. ``q_cap`` against the global keys, masked to the pairs the first pass does not hold: ``O(T * G)``
   scores (``G`` global keys), in PyTorch;
3. for the query heads of capped dense heads, rows ``i >= N``: ``q_cap`` against ``k_cap`` over the keys
   ``j <= i - N``, a dense causal attention shifted by ``N`` that :func:`~hf_sparse.sparse_attention` runs on
   slices (kernels on GPU, reference on CPU; no ``T x T`` tensor). Decoding by positions
   (:func:`capped_positions_attention`) scores the query against every far slot: ``O(T * D)`` a step, plus
   the rotation of the cached keys back to position 0, also ``O(T * D)`` a step.

Every pass is differentiable (the kernel passes through the differentiable lse), so training works too, and
the gradients of ``q_cap`` and ``k_cap`` flow back through the rotations to the query and the key. A caller who knows that no
query stands past ``N`` gives the pattern uncapped (:func:`uncapped`; ``sparse_attention`` accepts a
capped pattern without ``q_cap`` and ``k_cap`` when ``q_offset + Tq - 1 <= N``, a host-side bound): then nothing
changes, one pass on the plain kernels, bit for bit the uncapped result. ``max_distance="auto"`` is resolved by
:func:`hf_sparse.patch_model` to the model's trained length; on bare tensors it caps nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .decode import positions_attention, positions_forward
from .ops import merge_attention, padding_layout, sparse_attention
from .patterns import Dense, Pattern, SlidingWindow
from .patterns.base import declares_cap, map_patterns, set_cap
from .patterns.without_globals import without_globals

__all__ = ["head_caps", "dense_caps", "cap_acts", "uncapped", "first_pass", "resolve_max_distance",
           "capped_attention", "capped_positions_attention", "check_q_cap", "check_k_cap"]


def head_caps(pattern: Pattern, kv_heads: int) -> tuple[int | None, ...]:
    """The cap ``N`` of each KV head (``None``: no cap): of its global prefix, or of its dense band
    (``dense:max_distance=N``, :func:`dense_caps`)."""
    prims = pattern.head_primitives(kv_heads)
    if any(p is None for p in prims) and declares_cap(pattern):
        raise ValueError(f"pattern {pattern.spec()!r} sets max_distance, but its rules do not merge into kernel "
                         "primitives, which the cap needs to tell global keys from the rest; give max_distance=none "
                         "or a pattern whose rules merge (see docs/patterns.md)")
    return tuple(None if p is None else p.dense_cap if p.dense_cap is not None
                 else p.max_distance if p.global_tokens else None for p in prims)


def dense_caps(pattern: Pattern, kv_heads: int) -> tuple[int | None, ...]:
    """The cap ``N`` of each KV head whose dense band is capped (``dense:max_distance=N``), else ``None``."""
    head_caps(pattern, kv_heads)  # the same refusal of rules that do not merge
    return tuple(None if p is None else p.dense_cap for p in pattern.head_primitives(kv_heads))


def cap_acts(pattern: Pattern, kv_heads: int, max_position: int) -> bool:
    """Whether a query at a position up to ``max_position`` stands past the cap of some head."""
    return any(n is not None and max_position > n for n in head_caps(pattern, kv_heads))


def _drop_cap(p: Pattern) -> Pattern:
    return dataclasses.replace(p, max_distance=None) if set_cap(getattr(p, "max_distance", None)) else p


@functools.lru_cache(maxsize=256)
def uncapped(pattern: Pattern) -> Pattern:
    """``pattern`` with every ``max_distance`` turned off (what runs while no query stands past the cap)."""
    return map_patterns(pattern, _drop_cap)


def _band_for_dense_cap(p: Pattern) -> Pattern:
    prims = p.primitives()
    return SlidingWindow(window=prims.dense_cap) if prims is not None and prims.dense_cap is not None else p


def first_pass(pattern: Pattern) -> Pattern:
    """What the cap's first pass runs on the kernels, every head in one launch: the pattern without its capped
    global prefixes, and with each capped dense head (``dense:max_distance=N``) replaced by the band
    ``sliding_window:window=N`` (the keys nearer than ``N``, at their true distance)."""
    return without_globals(map_patterns(pattern, _band_for_dense_cap), capped_only=True)


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
    _check_like("q_cap", q_cap, "q", q)


def _check_like(name: str, x, like_name: str, like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.shape != like.shape or x.device != like.device:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor shaped like {like_name} {tuple(like.shape)} on {like.device}, "
                         f"got {got}")


def check_k_cap(k: torch.Tensor, k_cap, pattern: Pattern) -> None:
    if not any(n is not None for n in dense_caps(pattern, k.shape[1])):
        raise ValueError(f"k_cap is given but pattern {pattern.spec()!r} caps no dense head; drop k_cap or give the "
                         "dense heads max_distance=N (dense:max_distance=N)")
    _check_like("k_cap", k_cap, "k", k)


def _missing_k_cap(pattern: Pattern, where: str) -> ValueError:
    return ValueError(
        f"pattern {pattern.spec()!r} caps the distances of its dense heads (dense:max_distance) and {where}: pass "
        "k_cap= (the keys rotated back to position 0; hf_sparse.patch_model does it from the model's rotary "
        "embedding) with q_cap=, or give those heads max_distance=none")


def _missing_q_cap(pattern: Pattern, where: str) -> ValueError:
    return ValueError(
        f"pattern {pattern.spec()!r} caps distances (max_distance) and {where}: pass q_cap= (the queries "
        "rotated to position min(i, max_distance); hf_sparse.patch_model does it from the "
        "model's rotary embedding), or give the pattern with max_distance=none")


def _global_only(pattern: Pattern, rest: Pattern, layer: int, num_keys: int | None):
    """The pairs ``pattern`` shows and ``rest`` does not: capped global keys seen through no other rule."""
    def visible(qp, kp, kv_head):
        kw = dict(layer=layer, kv_head=kv_head, num_keys=num_keys)
        return pattern.allowed(qp, kp, **kw) & ~rest.allowed(qp, kp, **kw)

    return visible


def _has_prefix_cap(caps, dense) -> bool:
    return any(c is not None and d is None for c, d in zip(caps, dense))


_DENSE = Dense()  # an instance, not the name: parsing a spec string breaks a torch.compile graph


def _far_pass(q_cap, k_cap, v, dense, *, scale: float, softcap: float, key_padding_mask, q_offset: int,
              backend: str):
    """``(out, lse)`` over the far keys of the capped dense heads (``j <= i - N``): ``q_cap`` (rows at
    position ``N``) against ``k_cap`` (keys at position 0), a dense causal attention shifted by ``N``, run by
    :func:`~hf_sparse.sparse_attention` on slices (query slot ``s`` sees the key slots ``<= s - N``; positions
    count real tokens alike on both sides). Other heads and rows: zero, ``lse = -inf``."""
    b, hq, tq = q_cap.shape[:3]
    hkv, tk, dv = k_cap.shape[1], k_cap.shape[2], v.shape[-1]
    group = hq // hkv
    acc = torch.float64 if q_cap.dtype == torch.float64 else torch.float32
    out = q_cap.new_zeros((b, hq, tq, dv))
    lse = torch.full((b, hq, tq), float("-inf"), dtype=acc, device=q_cap.device)
    for n in sorted({c for c in dense if c is not None}):
        first = max(0, n - q_offset)  # the first query slot whose position may reach N
        keys = min(tk, q_offset + tq - n)  # key slots a query may see at distance >= N
        if first >= tq or keys <= 0:
            continue
        kv = torch.tensor([h for h, c in enumerate(dense) if c == n], device=q_cap.device)
        qh = (kv.view(-1, 1) * group + torch.arange(group, device=q_cap.device)).flatten()
        mask = None if key_padding_mask is None else key_padding_mask[:, :keys]
        o, lo = sparse_attention(q_cap.index_select(1, qh)[:, :, first:], k_cap.index_select(1, kv)[:, :, :keys],
                                 v.index_select(1, kv)[:, :, :keys], _DENSE, scale=scale, softcap=softcap,
                                 key_padding_mask=mask, q_offset=q_offset + first - n, backend=backend,
                                 check_padding=False, return_lse=True)
        o = torch.cat([o.new_zeros((b, len(qh), first, dv)), o], 2)
        lo = torch.cat([lo.new_full((b, len(qh), first), float("-inf")), lo.to(acc)], 2)
        out, lse = out.index_copy(1, qh, o.to(out.dtype)), lse.index_copy(1, qh, lo)
    return out, lse


def capped_attention(q, q_cap, k, v, pattern: Pattern, *, k_cap=None, scale: float, softcap: float,
                     key_padding_mask, q_offset: int, layer: int, backend: str, check_padding: bool):
    """``(out, lse)`` of ``sparse_attention`` with the cap (arguments as there, already checked): the first
    pass (:func:`first_pass`) merged with the capped global keys and the far keys of capped dense heads."""
    kv_heads = k.shape[1]
    caps, dense = head_caps(pattern, kv_heads), dense_caps(pattern, kv_heads)
    main = sparse_attention(q, k, v, first_pass(pattern), scale=scale, key_padding_mask=key_padding_mask,
                            q_offset=q_offset, layer=layer, softcap=softcap, backend=backend,
                            check_padding=check_padding, return_lse=True)
    parts = [main]
    if _has_prefix_cap(caps, dense):
        parts.append(_global_pass(q, q_cap, k, v, pattern, scale=scale, softcap=softcap,
                                  key_padding_mask=key_padding_mask, q_offset=q_offset, layer=layer))
    if k_cap is not None:
        far, far_lse = _far_pass(q_cap.to(q.dtype), k_cap.to(k.dtype), v, dense, scale=scale, softcap=softcap,
                                 key_padding_mask=key_padding_mask, q_offset=q_offset, backend=backend)
        # a query that sees no key in the band is padding (a real one sees itself): right padding's queries
        # may stand at real positions of the shifted far pass
        parts.append((far, far_lse.masked_fill(torch.isneginf(main[1]), float("-inf"))))
    return merge_attention(parts)


def _global_pass(q, q_cap, k, v, pattern: Pattern, *, scale: float, softcap: float, key_padding_mask,
                 q_offset: int, layer: int):
    """``(out, lse)`` of ``q_cap`` over the capped global keys that no other rule shows: ``O(T * G)``."""
    rest = without_globals(pattern, capped_only=True)
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
    return positions_forward(q_cap.to(q.dtype), k_g, v_g, q_pos, k_pos, _global_only(pattern, rest, layer, None),
                             scale=scale, softcap=softcap)


def _far_pairs(dense, device):
    """``visible`` for :func:`~hf_sparse.decode.positions_forward`: the keys at distance ``>= N`` of the
    capped dense heads (``N`` per KV head), by positions."""
    limit = torch.tensor([c if c is not None else -1 for c in dense], device=device)

    def visible(qp, kp, kv_head):
        n = limit[kv_head]
        return (n > 0) & (kp >= 0) & (qp >= 0) & (kp <= qp - n)

    return visible


def capped_positions_attention(q, q_cap, k, v, pattern: Pattern, *, q_pos, k_pos, scale: float, softcap: float,
                               layer: int, num_keys: int | None, backend: str, k_cap=None) -> torch.Tensor:
    """:func:`hf_sparse.decode.attention_with_positions` with the cap (inputs already checked): the first pass by
    positions (the decode kernel where it serves), ``q_cap`` over the slots that hold capped global keys seen
    through no other rule, and ``q_cap`` over ``k_cap`` at the far slots of capped dense heads: ``O(Tq * Tk)``
    scores, what one decode step costs anyway."""
    if q_cap is None:
        raise _missing_q_cap(pattern, "positions are given per call (no host-side bound)")
    check_q_cap(q, q_cap, pattern)
    kv_heads = k.shape[1]
    caps, dense = head_caps(pattern, kv_heads), dense_caps(pattern, kv_heads)
    if any(n is not None for n in dense) and k_cap is None:
        raise _missing_k_cap(pattern, "positions are given per call (no host-side bound)")
    if k_cap is not None:
        check_k_cap(k, k_cap, pattern)
    main = positions_attention(q, k, v, first_pass(pattern), q_pos=q_pos, k_pos=k_pos, scale=scale, softcap=softcap,
                               layer=layer, num_keys=num_keys, backend=backend)
    parts = [main]
    if _has_prefix_cap(caps, dense):
        rest = without_globals(pattern, capped_only=True)
        parts.append(positions_forward(q_cap.to(q.dtype), k, v, q_pos, k_pos,
                                       _global_only(pattern, rest, layer, num_keys), scale=scale, softcap=softcap))
    if k_cap is not None:
        parts.append(positions_forward(q_cap.to(q.dtype), k_cap.to(k.dtype), v, q_pos, k_pos,
                                       _far_pairs(dense, q.device), scale=scale, softcap=softcap))
    return merge_attention(parts)[0]


def route_capped(q, q_cap, k, pattern: Pattern, q_offset: int, k_cap=None) -> bool:
    """Whether :func:`hf_sparse.sparse_attention` takes the cap: always when ``q_cap`` is given (checked; the
    caller may know positions the slots do not show), else never, and a capped pattern whose queries may stand
    past the cap raises. ``k_cap`` comes with ``q_cap``, and is needed when a capped dense head may act."""
    max_position = q_offset + q.shape[2] - 1  # positions never exceed key slots
    if q_cap is not None:
        check_q_cap(q, q_cap, pattern)
        if k_cap is not None:
            check_k_cap(k, k_cap, pattern)
        elif any(n is not None and max_position > n for n in dense_caps(pattern, k.shape[1])):
            raise _missing_k_cap(pattern, f"queries reach position {max_position}")
        return True
    if k_cap is not None:
        raise ValueError("k_cap is given without q_cap; the far keys of a capped dense head are scored with both")
    if cap_acts(pattern, k.shape[1], max_position):
        raise _missing_q_cap(pattern, f"queries reach position {max_position}")
    return False
