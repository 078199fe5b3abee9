"""``hf_sparse.parallel.sparse_attention``: one sequence sharded over ranks, exact sparse attention.

Per call, each rank: posts the exchange of the keys others need from it and of those it needs
(:mod:`.exchange`), attends to its own keys while they travel (when :meth:`ShardPlan.overlapped`),
waits, attends to each received run and to the packed extra blocks, and merges the partial results
by their log-sum-exp -- the same merge ring attention does, exact in any order. The backward runs
each piece's backward with the merged output and log-sum-exp (FlashAttention's recomputation),
sends the gradients of the received keys back to their owners while it computes its own keys'
part, and adds what comes back.

Each piece is one call of the single-process implementation (:func:`hf_sparse.ops` forward and
backward: the Triton kernels on CUDA, the reference on the CPU) with the pattern seen from that
piece (:mod:`.views`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cap import cap_acts, uncapped
from ..ops import _backward_impl, _forward_impl, merge_attention, resolve_backend, validate_qkv
from ..patterns import Pattern, parse_pattern
from ..patterns.base import declares_cap
from ..reference import empty_rows_neg_inf
from .exchange import RankExchange, rank_exchange
from .plan import Piece, ShardPlan, shard_plan, uses_layer

__all__ = ["sparse_attention", "resolve_group"]

_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@dataclass(frozen=True, eq=False)
class _Call:
    plan: ShardPlan
    rank: int
    exchange: RankExchange
    scale: float
    softcap: float
    layer: int
    backend: str


def _keys(piece: Piece, k, v, shared, packed, view_slots: int):
    """The keys and values of one piece, ``[B, Hkv, Tk, D]`` each (views where no copy is needed)."""
    dk = k.shape[-1]
    if piece.compact:
        h, s, blk, b, dt = packed.shape
        kv = packed.view(h, s * blk, b, dt).permute(2, 0, 1, 3)[:, :, :view_slots]
        return kv[..., :dk], kv[..., dk:]
    parts = []
    sv = shared.permute(2, 1, 0, 3) if shared is not None else None  # [B, Hkv, n, Dk+Dv]
    if piece.before[1] > piece.before[0]:
        parts.append((sv[:, :, piece.before[0] : piece.before[1], :dk], sv[:, :, piece.before[0] : piece.before[1], dk:]))
    if piece.own:
        parts.append((k, v))
    if piece.after[1] > piece.after[0]:
        parts.append((sv[:, :, piece.after[0] : piece.after[1], :dk], sv[:, :, piece.after[0] : piece.after[1], dk:]))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)


def _piece_forward(call: _Call, piece: Piece, q, kp, vp):
    r0, r1 = piece.rows
    return _forward_impl(q[:, :, r0:r1], kp, vp, None, None, piece.pattern, call.scale, call.softcap, piece.q_offset,
                         call.layer, call.backend)


def _merge(pieces, parts, t: int):
    """``(out, lse)`` over the union of the pieces' keys, in the backends' convention (``lse = +inf``: a row
    that saw nothing, so that its probabilities ``exp(s - lse)`` in the backward are 0). Pieces that reach
    only some rows are merged into those rows."""
    inf = float("inf")

    def merge(pairs):
        if len(pairs) == 1:
            return pairs[0]
        o, lse = merge_attention([(o, empty_rows_neg_inf(lse)) for o, lse in pairs])
        return o, torch.where(lse == -inf, inf, lse)

    whole = [part for piece, part in zip(pieces, parts) if piece.rows == (0, t)]
    out, lse = merge(whole)
    for piece, part in zip(pieces, parts):
        r0, r1 = piece.rows
        if (r0, r1) != (0, t):
            out[:, :, r0:r1], lse[:, :, r0:r1] = merge([(out[:, :, r0:r1], lse[:, :, r0:r1]), part])
    return out, lse


def _forward(q, k, v, call: _Call):
    """``(out, lse, shared, packed)``: the merged attention and the received buffers (kept for backward)."""
    ex = call.exchange
    if q.shape[2] == 0:  # an empty shard owns no keys and asks for none
        lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          device=q.device)
        return q.new_zeros((*q.shape[:3], v.shape[-1])), lse, k.new_empty((0, *k.shape[1::-1], 0)), None
    pieces = call.plan.pieces(call.rank)
    pending, shared, tiles_in = ex.send_keys(k, v)
    parts, done = [], 0
    if call.plan.overlapped(call.rank):  # own keys first, while the others travel
        parts.append(_piece_forward(call, pieces[0], q, k, v))
        done = 1
    pending.wait()
    packed = ex.packed(tiles_in, shared)
    slots = _compact_slots(call)
    for piece in pieces[done:]:
        kp, vp = _keys(piece, k, v, shared, packed, slots)
        parts.append(_piece_forward(call, piece, q, kp, vp))
    out, lse = _merge(pieces, parts, q.shape[2])
    return out, lse, shared, packed


def _compact_slots(call: _Call) -> int:
    view = call.plan.compact_view(call.rank)
    return view.num_slots if view is not None else 0


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        out, lse, shared, packed = _forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse, shared, packed)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, shared, packed = ctx.saved_tensors
        if q.shape[2] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None
        call: _Call = ctx.call
        ex = call.exchange
        do = d_out.contiguous()
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, hkv, t, dk = k.shape
        dt = dk + v.shape[-1]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = torch.zeros((t, hkv, b, dt), dtype=acc, device=q.device)  # my keys, exchange layout
        d_shared = torch.zeros(shared.shape, dtype=acc, device=q.device)
        d_packed = torch.zeros(packed.shape, dtype=acc, device=q.device) if packed is not None else None
        pieces = call.plan.pieces(call.rank)
        slots = _compact_slots(call)
        own_first = call.plan.overlapped(call.rank)

        def run(piece: Piece):
            kp, vp = _keys(piece, k, v, shared, packed, slots)
            r = slice(*piece.rows)
            # (the kernels index the log-sum-exp as a contiguous [B, H, rows] tensor)
            g_q, g_k, g_v = _backward_impl(do[:, :, r], q[:, :, r], kp, vp, out[:, :, r], lse[:, :, r].contiguous(),
                                           None, None, piece.pattern, call.scale, call.softcap, piece.q_offset,
                                           call.layer, call.backend)
            dq[:, :, r] += g_q
            g = torch.cat([g_k, g_v], -1).permute(2, 1, 0, 3)  # [Tk, Hkv, B, Dk+Dv]
            if piece.compact:
                h, s, blk, bb, _ = d_packed.shape
                d_packed.view(h, s * blk, bb, dt)[:, :slots] += g.permute(1, 0, 2, 3)
                return
            at = 0
            for lo, hi, target in ((*piece.before, d_shared), (0, t if piece.own else 0, dkv),
                                   (*piece.after, d_shared)):
                if hi > lo:
                    target[lo:hi] += g[at : at + hi - lo]
                    at += hi - lo

        for piece in pieces[1 if own_first else 0 :]:
            run(piece)
        pending, received = ex.send_grads(d_shared, d_packed, k.dtype, b, hkv, dt, q.device)
        if own_first:  # my own keys while the gradients travel
            run(pieces[0])
        pending.wait()
        ex.add_grads(dkv, received)
        dkv = dkv.permute(2, 1, 0, 3)
        return dq.to(q.dtype), dkv[..., :dk].to(k.dtype), dkv[..., dk:].to(v.dtype), None


# ---------------------------------------------------------------------------------------------
def resolve_group(group):
    """A ``ProcessGroup`` from ``None`` (the default group), a process group or a one-dimensional
    ``DeviceMesh`` (e.g. ``mesh["cp"]`` of a 2-D data x context mesh)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("hf_sparse.parallel needs torch.distributed: call torch.distributed.init_process_group "
                           "(torchrun and accelerate launch set up its environment) before attention runs")
    if group is None:
        return dist.group.WORLD
    get_group = getattr(group, "get_group", None)
    if get_group is not None:  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"group: a {group.ndim}-D DeviceMesh; pass the context-parallel dimension, e.g. "
                             "mesh['cp'] of init_device_mesh('cuda', (dp, cp), mesh_dim_names=('dp', 'cp'))")
        return get_group()
    return group


_READY: set = set()


def _ready(group, device: torch.device) -> None:
    """NCCL wants every rank in a group's first point-to-point batch, and a rank with nothing to send or
    receive skips it: one all-reduce over the group first sets its communicator up on every rank."""
    if group in _READY:
        return
    if dist.get_backend(group) != "gloo":
        dist.all_reduce(torch.zeros(1, device=device), group=group)
    _READY.add(group)


def _gather_shapes(q, k, v, group, world: int) -> tuple[int, ...]:
    """Every rank's shard length, checking that batch, heads, head dims and dtype agree (one all-gather)."""
    mine = [q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3], _DTYPES[q.dtype]]
    device = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(mine, dtype=torch.long, device=device)
    rows = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(rows, t, group=group)
    rows = [r.tolist() for r in rows]
    names = ("batch", "query heads", "KV heads", "head dim", "value head dim", "dtype")
    for i, name in enumerate(names, start=1):
        seen = [r[i] for r in rows]
        if len(set(seen)) > 1:
            if name == "dtype":
                inv = {c: d for d, c in _DTYPES.items()}
                seen = [inv[x] for x in seen]
            raise ValueError(f"hf_sparse.parallel: the ranks disagree on {name}: {seen} (rank order); every rank "
                             "passes its shard [B, H, T_rank, D] of the same sequences")
    return tuple(r[0] for r in rows)


@torch.compiler.disable  # the exchange is host-driven: under torch.compile each call runs eagerly (a graph break)
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | str | dict = "dense",
    *,
    group=None,
    shard_lengths: tuple[int, ...] | list[int] | None = None,
    scale: float | None = None,
    layer: int = 0,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse attention over one sequence split across the ranks of ``group``; differentiable.

    Each rank passes its contiguous shard of the sequence and gets its shard of the output, equal to
    :func:`hf_sparse.sparse_attention` on the whole sequence (same pattern, positions counted from the
    sequence's start). Rank ``r`` of ``group`` holds the ``r``-th shard; shards may differ in length
    (and be empty)::

        rank 0: tokens [0, 1000)   rank 1: [1000, 2000)   rank 2: [2000, 2997)

    Args:
        q: ``[B, Hq, T_rank, D]``, this rank's queries.
        k, v: ``[B, Hkv, T_rank, D]``, this rank's keys and values (the same positions), ``Hq % Hkv == 0``.
        pattern: any pattern :func:`hf_sparse.sparse_attention` takes: windows, Longformer, BigBird,
            strides, unions, per-head plans, predicate-only patterns.
        group: a ``ProcessGroup``, a one-dimensional ``DeviceMesh`` or ``None`` (the default group).
        shard_lengths: every rank's ``T_rank`` in rank order. Without it, one all-gather per call finds
            them (and checks that shapes and dtypes agree); pass it to save that host sync.
        scale, layer, softcap, backend: as in :func:`hf_sparse.sparse_attention` (``"dense"`` is the
            single-process oracle and is not offered here).

    Communication per rank and layer: the keys its queries can see on other ranks, and nothing else --
    the last ``W - 1`` keys before its shard for a causal window (from as many previous ranks as
    that spans), the global prefix, and per KV head the BigBird random blocks its query blocks draw;
    patterns that reach every earlier key (strides, key columns, dense, predicate-only) receive all
    earlier shards. The backward sends the gradients of those keys back the same way.
    """
    pat = parse_pattern(pattern)
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = (x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in (q, k, v))
    validate_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"each rank's queries are the positions of its keys: q has T_rank={q.shape[2]} but k has "
                         f"{k.shape[2]}")
    if backend == "dense":
        raise ValueError("backend='dense' is the single-process O(T^2) oracle; use 'auto', 'triton' or 'reference'")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap < 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}; leave it None for D ** -0.5")
    pg = resolve_group(group)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    _ready(pg, q.device)
    if shard_lengths is None:
        lengths = _gather_shapes(q, k, v, pg, world)
    else:
        lengths = tuple(shard_lengths)
        if len(lengths) != world or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in lengths):
            raise ValueError(f"shard_lengths must list {world} non-negative ints (one per rank), got {shard_lengths!r}")
        if lengths[rank] != q.shape[2]:
            raise ValueError(f"shard_lengths[{rank}] = {lengths[rank]} but this rank's shard has T_rank={q.shape[2]}")
    if declares_cap(pat):  # max_distance: nothing changes while no query stands past the cap
        if cap_acts(pat, k.shape[1], sum(lengths) - 1):
            raise NotImplementedError(
                f"pattern {pat.spec()!r} caps the distance of its global keys (max_distance) and the sequence "
                f"reaches position {sum(lengths) - 1}; hf_sparse.parallel does not apply the cap: give the pattern "
                "max_distance=none, or keep the sequence within the cap")
        pat = uncapped(pat)
    chosen = resolve_backend(backend, q, k, pat)
    plan = shard_plan(pat, lengths, kv_heads=k.shape[1], layer=layer if uses_layer(pat) else 0)
    call = _Call(plan, rank, rank_exchange(plan, rank, pg, q.device), scale, float(softcap or 0.0), layer, chosen)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ContextParallelAttention.apply(q, k, v, call)
    return _forward(q, k, v, call)[0]
