"""Packed sequences: several documents in one row, each attending with its own pattern.

transformers and TRL mark packed ("padding-free") batches in two ways, and the attention function gets
both as keyword arguments: ``position_ids`` that restart inside a row (``DataCollatorWithFlattening``,
TRL's ``padding_free``), and optionally ``cu_seq_lens_q/k`` (cumulative document lengths over the
flattened ``B * T`` tokens) with ``max_length_q/k``, as flash-attention's varlen functions take them.
A document's pattern counts positions from its own first token: its own global tokens, its own
window, its own BigBird blocks (BigBird's random blocks are drawn from ``(seed, layer, kv_head,
query block)``, so a document gets the draw it would get alone).

How: :func:`packed_layout` finds the documents (from ``cu_seq_lens_q`` when given, else from the
position restarts, as ``transformers.masking_utils.find_packed_sequence_indices`` does) and groups
them by length; :func:`packed_attention` gathers each group into a batch of one document per row,
right-padded (``key_padding_mask``), runs :func:`hf_sparse.sparse_attention` once per group, and
gathers the outputs back into token order. Gathers are differentiable, so the backward runs the same
kernels. Memory: a group's rows are padded to its longest document, and a document joins a group
only while padding stays under half of the group's slots, so all groups together hold at most
``2 * B * T`` tokens, in at most ``log2(longest) + 1`` groups (``O(T)``, never ``T x T``).

The layout costs one host sync and is computed once per forward: the layers of a forward (and the
recomputation of gradient checkpointing) pass the same tensor, and the last layout is kept with it
(:func:`forget_layout`, called by the mask function at the start of every forward, drops it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_sparse.ops import sparse_attention
from hf_sparse.patterns import Pattern

__all__ = ["DocumentGroup", "PackedLayout", "packed_layout", "packed_attention", "forget_layout"]


@dataclass(frozen=True)
class DocumentGroup:
    """Documents that run as one batch: ``index[r, j]`` is the flat token (``b * T + t``) at position ``j``
    of the group's ``r``-th document (its first token where ``j`` is past its end); ``valid`` marks real slots."""

    index: torch.Tensor  # [n, L] int64
    valid: torch.Tensor  # [n, L] bool, right padding


@dataclass(frozen=True)
class PackedLayout:
    groups: tuple[DocumentGroup, ...]
    scatter: torch.Tensor  # [B * T] int64: each token's slot in the concatenated [n * L] slots of all groups
    documents: int


# The layout of the current forward: one (key tensor, key, layout) tuple, replaced whole so that a
# thread reading it never sees the tensor of one entry with the layout of another.
_LAST: list = [None]


def forget_layout() -> None:
    """Drop the kept layout (a new forward begins)."""
    _LAST[0] = None


def _boundaries(batch: int, tokens: int, cu_seq_lens: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> list[int] | None:
    """Document lengths in flat token order, or None when every row holds one document."""
    total = batch * tokens
    if cu_seq_lens is not None:
        cu = cu_seq_lens.flatten().long().tolist()  # one host sync
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if not cu or cu[0] != 0 or cu[-1] != total or any(n < 0 for n in lengths):
            raise ValueError(
                f"hf_sparse: cu_seq_lens_q must rise from 0 to the {total} tokens of the batch ({batch} x {tokens}), "
                f"got {cu[:8]}{' ...' if len(cu) > 8 else ''}"
            )
        lengths = [n for n in lengths if n]
        return None if lengths == [tokens] * batch else lengths
    if position_ids is None or tokens < 2:
        return None
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    starts = torch.ones(batch, tokens, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos.diff(dim=-1) != 1
    if not bool(starts[:, 1:].any()):  # one host sync
        return None
    flat = starts.flatten().nonzero().flatten().tolist()
    return [b - a for a, b in zip(flat, flat[1:] + [total])]


def _group(lengths: list[int]) -> list[list[int]]:
    """Documents (indices into ``lengths``) grouped longest first; a group is padded to its first document's
    length, and a document joins while the group's padding stays below half of its slots."""
    order = sorted(range(len(lengths)), key=lambda d: -lengths[d])
    groups: list[list[int]] = []
    real = 0
    for d in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= 2 * (real + lengths[d]):
            groups[-1].append(d)
            real += lengths[d]
        else:
            groups.append([d])
            real = lengths[d]
    return groups


def packed_layout(batch: int, tokens: int, *, cu_seq_lens: torch.Tensor | None = None,
                  cu_seq_lens_k: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  device: torch.device | None = None) -> PackedLayout | None:
    """The documents of a packed batch of ``batch`` rows of ``tokens``, or None if it is not packed.

    ``cu_seq_lens`` (``[N + 1]``, flat over ``batch * tokens``) wins over ``position_ids`` (``[batch or 1,
    tokens]``, a document starts where a position is not its predecessor's plus one, and at every row start).
    ``cu_seq_lens_k`` must equal ``cu_seq_lens`` (packed keys are the packed queries: no cache).
    """
    key_tensor = cu_seq_lens if cu_seq_lens is not None else position_ids
    if key_tensor is None:
        return None
    version = None if key_tensor.is_inference() else key_tensor._version  # inference tensors have no counter
    key = (version, tuple(key_tensor.shape), batch, tokens, id(cu_seq_lens_k))
    kept = _LAST[0]
    if kept is not None and kept[0] is key_tensor and kept[1] == key:
        return kept[2]
    if cu_seq_lens is not None and cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens and not (
            cu_seq_lens_k.shape == cu_seq_lens.shape and torch.equal(cu_seq_lens_k.to(cu_seq_lens.device), cu_seq_lens)):
        raise NotImplementedError(
            "hf_sparse: cu_seq_lens_k differs from cu_seq_lens_q (packed queries over other packed keys, e.g. a "
            "cache); packed sequences are supported without past keys only"
        )
    lengths = _boundaries(batch, tokens, cu_seq_lens, position_ids)
    layout = None if lengths is None else _build(lengths, device if device is not None else key_tensor.device)
    _LAST[0] = (key_tensor, key, layout)
    return layout


def _build(lengths: list[int], device: torch.device) -> PackedLayout:
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    groups = []
    slot_base = [0] * len(lengths)  # each document's first slot in the concatenated groups
    base = 0
    for members in _group(lengths):
        width = lengths[members[0]]
        for row, d in enumerate(members):
            slot_base[d] = base + row * width
        base += len(members) * width
        first = torch.tensor([starts[d] for d in members], device=device)
        count = torch.tensor([lengths[d] for d in members], device=device)
        j = torch.arange(width, device=device)
        valid = j[None, :] < count[:, None]
        index = torch.where(valid, first[:, None] + j[None, :], first[:, None])
        groups.append(DocumentGroup(index, valid))
    count = torch.tensor(lengths, device=device)
    total = sum(lengths)
    within = torch.arange(total, device=device) - torch.repeat_interleave(torch.tensor(starts, device=device), count)
    scatter = torch.repeat_interleave(torch.tensor(slot_base, device=device), count) + within
    return PackedLayout(tuple(groups), scatter, len(lengths))


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
                     pattern: Pattern, **kwargs) -> torch.Tensor:
    """``sparse_attention`` of every document of ``layout`` on its own: ``[B, H, T, D]`` in, ``[B, T, Hq, D]`` out.

    ``kwargs`` go to :func:`hf_sparse.sparse_attention` (``scale``, ``softcap``, ``layer``, ``backend``).
    """
    b, hq, t, d = query.shape
    dv = value.shape[-1]

    def tokens_first(x):  # [B, H, T, D] -> [B * T, H, D]
        return x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3])

    qf, kf, vf = tokens_first(query), tokens_first(key), tokens_first(value)
    outs = []
    for g in layout.groups:
        def rows(x, g=g):  # [n, L, H, D] -> [n, H, L, D]
            return x[g.index].transpose(1, 2)

        out = sparse_attention(rows(qf), rows(kf), rows(vf), pattern, key_padding_mask=g.valid, q_offset=0,
                               check_padding=False, **kwargs)
        outs.append(out.transpose(1, 2).reshape(-1, hq, dv))
    slots = outs[0] if len(outs) == 1 else torch.cat(outs)
    return slots[layout.scatter].view(b, t, hq, dv)
