"""Patched layers under masks other than plain left/right padding, and ``output_attentions``.

transformers hands a patched layer one of three masks (:mod:`hf_sparse.patches.attention` routes them here):

* **a 2D key padding mask with holes** (padding between real tokens: a right-padded prompt that
  ``generate`` extends, pad ids inside a row). A masked key is simply not attended, and positions count
  real tokens -- what ``generate`` passes as ``position_ids`` -- so the pattern (window, global tokens,
  blocks) rules on the real tokens as if the holes were not there. :func:`attention_with_holes` gathers
  each row's real tokens into one run (stable order, so the run is the row without its holes), runs
  :func:`hf_sparse.sparse_attention` on it -- the Triton kernels on CUDA, ``O(T)`` extra memory -- and
  scatters the outputs back; the rows of masked queries are zero. Whether a mask has holes costs one host
  sync per forward (:func:`key_padding_mask`, called by the mask function); under ``torch.compile`` every
  padded batch takes this path (exact for any mask, and no data-dependent branch).
* **a custom 4D mask** ``[B, 1 or H, Sq, Skv]`` (bool, True = attend; or float, 0 = attend and a large
  negative value = masked), which transformers passes through untouched: the pattern and the mask both
  apply. The user passed a full matrix, so :func:`attention_with_weights` computes the scores densely on
  the PyTorch reference (``O(Sq * Skv)`` memory, warned once).
* **``output_attentions=True``**: the caller asked for the ``[B, H, Sq, Skv]`` probabilities, so the layer
  runs :func:`attention_with_weights` too (same warning) and returns them; masked pairs get 0. A static
  cache layer may ask for them over its slots instead of the keys it returned (``AttentionInputs.columns``).

Positions for the dense path: from the bounded cache's slot positions, else from the padding mask (real
tokens counted), else from ``position_ids`` under a custom 4D mask without cached keys (packed documents
each restart), else the key slots.
"""

from __future__ import annotations

import torch

from hf_sparse.ops import _warn_once, padding_layout, sparse_attention
from hf_sparse.patterns import Pattern
from hf_sparse.reference import attention_probabilities, positions_of

__all__ = ["key_padding_mask", "has_holes", "attention_with_holes", "attention_with_weights", "custom_mask"]

# The last classified mask: (tensor, version, has holes). The mask function classifies the mask of a forward
# once; every layer of that forward gets the same tensor and reads the answer here.
_LAST: list = [None]


def _holes_in(mask: torch.Tensor) -> bool:
    try:
        padding_layout(mask, check=True)  # one host sync
    except ValueError:
        return True
    return False


def has_holes(padding: torch.Tensor) -> bool:
    """Whether the ``[B, T]`` boolean mask has padding between real tokens (cached for the forward's mask)."""
    if torch.compiler.is_compiling():
        return True  # the gather path is exact for every mask and needs no data-dependent branch
    version = None if padding.is_inference() else padding._version
    kept = _LAST[0]
    if kept is not None and kept[0] is padding and kept[1] == version:
        return kept[2]
    holes = _holes_in(padding)
    _LAST[0] = (padding, version, holes)
    return holes


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``None`` without padding, else the boolean ``[B, past + q]`` mask (True = real token), classified once."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"hf_sparse takes a 2D attention_mask [batch, tokens] (1 = real token) here, got {shape}")
    mask = attention_mask.bool()
    if torch.compiler.is_compiling():
        return mask  # no data-dependent branch; an all-True mask gives the same result
    if bool(mask.all()):
        return None
    has_holes(mask)
    return mask


def _by_row(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]`` with its token axis permuted per row by ``order [B, T]``."""
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def attention_with_holes(query, key, value, padding: torch.Tensor, pattern: Pattern, **kwargs) -> torch.Tensor:
    """``sparse_attention`` of the real tokens of each row: ``[B, H, T, D]`` in, ``[B, Sq, Hq, Dv]`` out.

    ``padding [B, Skv]`` marks the real keys (cache included); the queries are the last ``Sq`` slots. A stable
    sort moves each row's real tokens to its end, in order: the row becomes left padding, whose positions
    count real tokens, and the real queries become the last real keys (``q_offset = Skv - Sq``). ``kwargs`` go
    to :func:`hf_sparse.sparse_attention` (``scale``, ``softcap``, ``layer``, ``backend``, ``q_cap``, ``k_cap``).
    """
    sq, skv = query.shape[2], key.shape[2]
    real_q = padding[:, skv - sq:]
    k_order = torch.argsort(padding.to(torch.int8), dim=1, stable=True)
    q_order = torch.argsort(real_q.to(torch.int8), dim=1, stable=True)
    if kwargs.get("q_cap") is not None:  # the distance cap's rotated queries travel with the queries
        kwargs["q_cap"] = _by_row(kwargs["q_cap"], q_order)
    if kwargs.get("k_cap") is not None:  # and the keys turned back to position 0 with the keys
        kwargs["k_cap"] = _by_row(kwargs["k_cap"], k_order)
    out = sparse_attention(_by_row(query, q_order), _by_row(key, k_order), _by_row(value, k_order), pattern,
                           key_padding_mask=padding.gather(1, k_order), q_offset=skv - sq, check_padding=False,
                           **kwargs)
    out = _by_row(out, torch.argsort(q_order, dim=1)).masked_fill(~real_q[:, None, :, None], 0.0)
    return out.transpose(1, 2).contiguous()


def custom_mask(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """A custom 4D attention mask as booleans (True = attend), cut to the ``keys`` the layer has.

    Float masks are additive in transformers: 0 attends, a large negative value masks. Other values are
    biases, which the sparse backend does not apply: refused rather than ignored.
    """
    mask = mask[..., :keys]
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if bool(((mask != 0) & ~masked).any()):
        raise NotImplementedError(
            "hf_sparse: this 4D attention_mask holds additive biases (values other than 0 and a large negative "
            "number); patched layers take a boolean mask or a 0 / -inf float mask"
        )
    return ~masked


def _warn_dense(what: str) -> None:
    _warn_once(
        f"hf_sparse: {what}: patched layers compute these layers densely on the PyTorch reference path, "
        "restricted to the pattern, with O(batch * heads * queries * keys) memory for the scores; without it "
        "they run the sparse path"
    )


def attention_with_weights(query, key, value, pattern: Pattern, *, padding=None, mask=None, bounded=None,
                           position_ids=None, scale, softcap, layer: int, why: str):
    """Dense attention restricted to the pattern (and to ``mask``): ``([B, Sq, Hq, Dv], [B, Hq, Sq, Skv])``.

    ``why`` names the request in the one-time warning (``"output_attentions=True"``, ``"a custom 4D mask"``).
    """
    _warn_dense(why)
    b, sq, skv = query.shape[0], query.shape[2], key.shape[2]
    if bounded is not None:
        q_pos, k_pos = bounded.q_pos, bounded.k_pos
    elif padding is not None:
        k_pos = positions_of(padding)
        q_pos = k_pos[:, skv - sq:]
    elif mask is not None and position_ids is not None and sq == skv and position_ids.shape[-1] == sq:
        q_pos = k_pos = position_ids.to(query.device).long().expand(b, sq)
    else:
        k_pos = torch.arange(skv, device=query.device).expand(b, skv)
        q_pos = k_pos[:, skv - sq:]
    if mask is not None:
        # the patterns are causal: under a custom mask a key at a later slot is never attended either
        slots = torch.arange(skv, device=query.device)
        mask = mask & (slots[None, :] <= slots[skv - sq:, None])
    out, weights = attention_probabilities(query, key, value, pattern, q_pos=q_pos, k_pos=k_pos, scale=scale,
                                           softcap=softcap or 0.0, layer=layer, mask=mask)
    if bounded is not None and bounded.columns is not None:
        weights = _on_columns(weights, bounded.columns, bounded.width)
    return out.transpose(1, 2).contiguous(), weights


def _on_columns(weights: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    """``weights [B, H, Sq, Skv]`` moved to ``width`` columns: key ``j`` of row ``b`` to column ``columns[b, j]``
    (distinct for the keys that have one; ``-1``: a padding key, whose weight is 0, goes nowhere)."""
    b, h, sq, skv = weights.shape
    index = columns.masked_fill(columns < 0, width).view(b, 1, 1, skv).expand(b, h, sq, skv)
    return weights.new_zeros((b, h, sq, width + 1)).scatter_(3, index, weights)[..., :width]
