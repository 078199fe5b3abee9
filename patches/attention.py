"""The ``"hf_sparse"`` attention backend: one attention function and one mask function.

transformers looks both up by the name in ``config._attn_implementation``:

* :func:`hf_sparse_mask` is called by ``create_causal_mask`` / ``create_sliding_window_causal_mask``
  once per forward and per layer type. Patched layers need only the 2D key padding mask
  (``[B, past + q]``, True = real token, or ``None`` without padding): ``O(T)``, like the flash-attention
  masks. It is classified here, once, as left/right padding or a mask with holes (one host sync,
  :func:`hf_sparse.patches.masks.key_padding_mask`), so the attention function can skip the check. When only some layers are patched (``layers=``), the other
  layers still need the mask of the model's own implementation (with its own sliding window): the
  function then returns a :class:`HybridMask` carrying both, the native one built on first use by
  ``ALL_MASK_ATTENTION_FUNCTIONS[previous](**same arguments)``.
* :func:`hf_sparse_attention` is called by every attention module. Patched layers run
  :func:`hf_sparse.sparse_attention` (the keys already include the cache, so query ``i`` sits at key
  slot ``Skv - Sq + i``); the others are handed to the previous implementation with the native mask.
  A patched layer whose cache is bounded (:class:`~hf_sparse.patches.cache.SparseWindowLayer`: sinks
  plus a ring buffer, slots not in position order) reads the query and key positions that the layer's
  last update recorded: one decode token runs :func:`hf_sparse.decode.attention_with_positions` (the
  decode kernel on CUDA); several tokens (a chunk) run ``sparse_attention`` on the slots sorted by
  position (:func:`_chunk_over_bounded`); the prefill of an empty cache, whose keys are the prompt
  itself, runs the prefill kernels as usual.

A packed row (several documents, marked by ``cu_seq_lens_q/k`` or by ``position_ids`` that restart
when there is no padding mask) runs each document on its own, from its own first token
(:mod:`hf_sparse.patches.packing`); packed rows over cached keys raise.

Positions count real tokens (padding is not a position), which is what HF's ``generate`` gives as
``position_ids`` under left padding. The 2D mask is kept unsliced (``past + q`` columns) so the
attention function can compare it with the number of keys it got: fewer keys than tokens means the
cache dropped old keys, and the function raises instead of attending to the wrong positions.

The ``sliding_window`` argument that Mistral, Qwen and Gemma pass is ignored on patched layers: the
pattern replaces the model's attention there (``"dense"`` carries the model's own window, see
:func:`hf_sparse.patches.options.native_windows`).

Masks with holes, custom 4D masks and ``output_attentions`` are served by :mod:`hf_sparse.patches.masks`.
"""

from __future__ import annotations

import torch

from hf_sparse.decode import attention_with_positions
from hf_sparse.ops import BACKENDS, sparse_attention
from hf_sparse.patterns import Pattern

from ._compat import ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, attentions_requested, eager_attention_for
from .cache import WINDOW_LAYER_ATTR, GroupedInputs, window_layer_fits
from .masks import attention_with_holes, attention_with_weights, custom_mask, has_holes, key_padding_mask
from .options import ATTN_NAME, SparseOptions, options_of
from .packing import forget_layout, packed_attention, packed_layout
from .rope import cap_inputs, cap_pattern, packed_cap_pattern, padded_cap_inputs, position_bound

__all__ = ["ATTN_NAME", "HybridMask", "SparseOptions", "hf_sparse_attention", "hf_sparse_mask", "options_of"]

_POSITION_BOUND = "_hf_sparse_position_bound"


# ---------------------------------------------------------------------------------------------
# mask
class HybridMask:
    """What layers get when only some are patched: the 2D key padding mask for patched layers
    (``padding``, ``None`` without padding) and, built on first use, the mask of the model's own
    implementation for the others (``native``). The modeling code passes it along untouched."""

    __slots__ = ("padding", "_native", "_build")

    def __init__(self, padding: torch.Tensor | None, build_native):
        self.padding = padding
        self._native = None
        self._build = build_native

    @property
    def native(self):
        if self._build is not None:
            self._native, self._build = self._build(), None
        return self._native

    def __repr__(self) -> str:
        pad = None if self.padding is None else tuple(self.padding.shape)
        return f"HybridMask(padding={pad}, native={'pending' if self._build is not None else type(self._native).__name__})"


def hf_sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    config=None,
    **kwargs,
):
    """Mask builder registered as ``"hf_sparse"`` in ``AttentionMaskInterface`` (see the module docstring)."""
    if config is None:
        raise ValueError("hf_sparse_mask needs config= (transformers passes the model config)")
    opts = options_of(config)
    forget_layout()  # a new forward: its packed layout (if any) is found again from its own tensors
    if kwargs.get("use_vmap"):
        # transformers sets use_vmap only for custom or/and mask functions (e.g. image tokens that attend
        # bidirectionally): a sparse pattern cannot honour them.
        raise NotImplementedError(
            "hf_sparse: this model combines the causal mask with a custom mask function (or_mask_function / "
            "and_mask_function), which a sparse pattern cannot express"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and (
            attention_mask.shape[-1] < kv_offset + kv_length):
        # a static cache (more slots than tokens): patched layers read only the new tokens' columns, so the
        # mask has one shape and layout at every decode step; it stays a tensor without padding too, so a
        # compiled decode step sees the same inputs at every step (no recompilation)
        attention_mask = attention_mask[:, -q_length:]
        padding = attention_mask.bool().contiguous()
    else:
        padding = key_padding_mask(attention_mask)
    if opts.all_layers:
        if isinstance(kv_offset, int) and kv_offset > 0:
            raise RuntimeError(
                f"hf_sparse: the cache dropped {kv_offset} of {kv_offset + kv_length - q_length} past keys (a "
                "sliding-window cache layer); patched layers need every past key. Create the cache after patch_model "
                "(or let generate or the first forward create it) so that patched layers keep every key"
            )
        return padding

    native_kwargs = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, config=config, **kwargs,
    )
    if mask_function is not None:
        native_kwargs["mask_function"] = mask_function
    previous = opts.previous

    def build_native():
        # An implementation without a mask builder gets no mask, as in transformers' _preprocess_mask_arguments.
        if previous not in ALL_MASK_ATTENTION_FUNCTIONS:
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[previous](**native_kwargs)

    # The padding mask for our layers must span the whole history, not kv_length: with layers=, this
    # call may be sized on an unpatched sliding-window cache layer.
    return HybridMask(padding, build_native)


# ---------------------------------------------------------------------------------------------
# attention
def _packed_layout(query: torch.Tensor, key: torch.Tensor, padding, kwargs: dict):
    """The documents of a packed batch (:mod:`hf_sparse.patches.packing`), or None for one sequence per row.

    ``cu_seq_lens_q/k`` mark packing explicitly; restarting ``position_ids`` mark it when there is no padding
    mask (left padding gives its padding slots made-up positions). Either needs the keys to be the queries.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    explicit = cu_q is not None or cu_k is not None
    if not explicit and (padding is not None or position_ids is None or query.shape[2] < 2):
        return None
    if torch.compiler.is_compiling():
        if explicit:
            raise NotImplementedError(
                "hf_sparse: packed sequences (cu_seq_lens_q/k) under torch.compile are not supported (the document "
                "layout is data-dependent); run the packed batch eagerly or pass one sequence per row"
            )
        return None  # position restarts are not looked for while tracing
    if explicit and padding is not None:
        raise NotImplementedError(
            "hf_sparse: cu_seq_lens_q/k together with a padding attention_mask; give one or the other"
        )
    sq, skv = query.shape[2], key.shape[2]
    layout = packed_layout(query.shape[0], sq, cu_seq_lens=cu_q if cu_q is not None else cu_k, cu_seq_lens_k=cu_k,
                           position_ids=position_ids, device=query.device)
    if layout is not None and skv != sq:
        raise NotImplementedError(
            f"hf_sparse: a packed batch ({layout.documents} documents) after {skv - sq} cached keys; packed sequences "
            "are supported without past keys only (training, scoring, a first forward)"
        )
    return layout


def _bounded_cache_inputs(module: torch.nn.Module, key: torch.Tensor, pattern: Pattern):
    """The positions recorded by the module's bounded cache layer for these keys, or None (full-history cache)."""
    window_layer = getattr(module, WINDOW_LAYER_ATTR, None)
    if window_layer is None:
        return None
    del module.__dict__[WINDOW_LAYER_ATTR]
    if not window_layer_fits(window_layer, pattern):
        raise RuntimeError(
            f"hf_sparse layer {module.layer_idx}: its cache layer {window_layer!r} was made for another pattern and "
            f"dropped keys that {pattern.spec()} needs (the model was patched again after the cache was created); "
            "create a new cache (SparseCache(model)) or let generate create one"
        )
    inputs = window_layer.take_attention_inputs()
    if inputs is None:
        return None
    if not inputs.matches(key):
        raise RuntimeError(
            f"hf_sparse layer {module.layer_idx}: its bounded cache returned other keys than the {tuple(key.shape)} "
            "the attention got; the modeling code changed the keys between cache.update and attention"
        )
    return inputs


def hf_sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"hf_sparse"`` in ``AttentionInterface``.

    ``query [B, Hq, Sq, D]``, ``key, value [B, Hkv, Skv, D]`` (cache included) -> ``([B, Sq, Hq, D], None)``.
    """
    opts = options_of(module.config)
    layer = module.layer_idx
    if not opts.patches(layer):
        native_mask = attention_mask.native if isinstance(attention_mask, HybridMask) else attention_mask
        native = ALL_ATTENTION_FUNCTIONS.get_interface(opts.previous, eager_attention_for(module))
        return native(module, query, key, value, native_mask, dropout=dropout, scaling=scaling,
                      sliding_window=sliding_window, softcap=softcap, **kwargs)

    if dropout:
        raise NotImplementedError(
            f"hf_sparse: attention dropout ({dropout}) is not supported by the sparse kernels; set "
            "config.attention_dropout = 0.0 or call model.eval()"
        )
    padding = attention_mask.padding if isinstance(attention_mask, HybridMask) else attention_mask
    sq, skv = query.shape[2], key.shape[2]
    custom = None
    if isinstance(padding, torch.Tensor) and padding.dim() == 4:  # a custom 4D mask, passed through by transformers
        custom, padding = custom_mask(padding, skv), None
    elif padding is not None and (not isinstance(padding, torch.Tensor) or padding.dim() != 2):
        raise ValueError(
            f"hf_sparse layer {layer} got an attention mask of type {type(padding).__name__} "
            f"{tuple(getattr(padding, 'shape', ()))}; patched layers take the 2D padding mask built by "
            "hf_sparse_mask or a custom 4D mask [batch, 1 or heads, queries, keys]"
        )
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    group = kwargs.pop(_GROUP, None)  # one group of KV heads of a per-head cache: its rule and keys
    pattern = opts.pattern_for(layer) if group is None else group.pattern
    # the distance cap acts once a query may stand past it: a host-side bound of the positions, found before
    # the cache inputs are taken and handed on to nested calls of this function (a per-head cache's groups)
    bound = kwargs.pop(_POSITION_BOUND, None)
    bound = position_bound(module, skv) if bound is None else bound
    kwargs[_POSITION_BOUND] = bound
    pattern, capped = cap_pattern(pattern, key.shape[1], bound)
    bounded = _bounded_cache_inputs(module, key, pattern) if group is None else group.inputs
    if isinstance(bounded, GroupedInputs):
        return _attend_groups(module, query, bounded, attention_mask, dropout=dropout, scaling=scaling,
                              sliding_window=sliding_window, softcap=softcap, **kwargs), None
    if padding is not None and bounded is None:
        _check_history(padding, skv, layer)
    wants_weights = attentions_requested()
    if wants_weights or custom is not None:
        why = "output_attentions=True" if wants_weights else "a custom 4D attention mask"
        out, weights = attention_with_weights(query, key, value, pattern, padding=padding, mask=custom,
                                              bounded=bounded, position_ids=kwargs.get("position_ids"),
                                              scale=scaling, softcap=softcap, layer=layer, why=why)
        return out, (weights if wants_weights else None)
    if bounded is not None and not bounded.prefix:
        # keys from a bounded cache: sinks + ring buffer, slots not in position order. The chunk shortcut
        # moves keys next to the sinks: it holds for token bands and globals seen alike by every head
        prims = pattern.primitives()
        q_cap = k_cap = None
        if capped:
            q_cap, k_cap = cap_inputs(module, query, key, pattern, bounded.q_pos, bounded.k_pos)
        if sq > 1 and prims is not None and prims.shifts_freely and _padding_leads(bounded.q_pos):
            out = _chunk_over_bounded(query, key, value, bounded, pattern, scale=scaling, softcap=softcap,
                                      layer=layer, backend=opts.backend, q_cap=q_cap, k_cap=k_cap)
        else:
            out = attention_with_positions(query, key, value, pattern, q_pos=bounded.q_pos,
                                           k_pos=bounded.k_pos, scale=scaling, softcap=softcap, layer=layer,
                                           backend=opts.backend, q_cap=q_cap, k_cap=k_cap)
        return out.transpose(1, 2).contiguous(), None
    if padding is not None and has_holes(padding):
        q_cap, k_cap = padded_cap_inputs(module, query, key, pattern, padding) if capped else (None, None)
        out = attention_with_holes(query, key, value, padding, pattern, scale=scaling, softcap=softcap, layer=layer,
                                   backend=opts.backend, q_cap=q_cap, k_cap=k_cap)
        return out, None
    layout = _packed_layout(query, key, padding, kwargs)
    if layout is not None:
        if capped:  # documents count positions from their own start: bound them by the longest one
            pattern = packed_cap_pattern(pattern, key.shape[1], layout)
        out = packed_attention(query, key, value, layout, pattern, scale=scaling, layer=layer, softcap=softcap,
                               backend=opts.backend)
        return out, None

    q_cap, k_cap = padded_cap_inputs(module, query, key, pattern, padding) if capped else (None, None)
    out = sparse_attention(
        query, key, value, pattern, scale=scaling, key_padding_mask=padding, q_offset=skv - sq, layer=layer,
        softcap=softcap, backend=opts.backend, check_padding=False, q_cap=q_cap, k_cap=k_cap,
    )
    return out.transpose(1, 2).contiguous(), None


def _check_history(padding: torch.Tensor, keys: int, layer: int) -> None:
    """The 2D mask must cover exactly the keys the layer got (past and new tokens)."""
    tokens = padding.shape[1]
    if tokens > keys:
        raise RuntimeError(
            f"hf_sparse layer {layer}: got {keys} keys for {tokens} tokens, so its cache dropped old keys (a "
            "sliding-window cache layer). Patched layers need a full-history cache: use the default DynamicCache "
            "(patch_model makes generate's cache keep every key for patched layers)"
        )
    if tokens < keys:
        raise NotImplementedError(
            f"hf_sparse layer {layer}: got {keys} key slots for {tokens} tokens (a static cache not made by "
            "hf_sparse); use generate(..., cache_implementation='static'), which builds hf_sparse's "
            "SparseStaticCache, pass SparseStaticCache(model, max_cache_len=...), or the default dynamic cache"
        )


_GROUP = "_hf_sparse_head_group"


def _attend_groups(module, query, grouped: GroupedInputs, attention_mask, **kwargs) -> torch.Tensor:
    """A per-head cache layer (:class:`~hf_sparse.patches.cache.HeadGroupsLayer`): each group of KV heads
    attends with its own keys and rule, through :func:`hf_sparse_attention`; outputs joined in head order."""
    kv_heads = grouped.keys.shape[1]
    outs = []
    for group in grouped.groups:
        out, weights = hf_sparse_attention(module, grouped.queries(query, group, kv_heads), group.keys, group.values,
                                           attention_mask, **kwargs, **{_GROUP: group})
        if weights is not None:
            raise NotImplementedError(
                f"hf_sparse layer {module.layer_idx}: attention weights of a per-head cache (its groups hold "
                "different keys) are not supported; pass a full-history DynamicCache() to get them"
            )
        outs.append(out)
    return grouped.join(outs, kv_heads)


def _padding_leads(q_pos: torch.Tensor) -> bool:
    """Whether every row's padding queries (position -1) come before its real ones (one host sync; while
    tracing for torch.compile: False, the positions path needs no sync)."""
    if torch.compiler.is_compiling():
        return False
    real = q_pos >= 0
    return bool((real[:, 1:] >= real[:, :-1]).all())


def _chunk_over_bounded(query, key, value, bounded, pattern: Pattern, *, scale, softcap, layer: int, backend: str,
                        q_cap=None, k_cap=None):
    """Several new tokens over a bounded cache (chunked prefill) on the prefill kernels.

    Sorting a row's slots by position (empty slots, -1, first) lays its keys out as one right-aligned
    run: the sinks, the stored window, the new tokens. A key's rank in that run is its position, except
    that the window and the new tokens are shifted down to follow the sinks directly, which changes no
    distance inside the window, and sinks are global keys at any distance. So ``sparse_attention`` with
    that run as left padding and the queries as its last slots (``q_offset = keys - queries``) computes
    the same attention, with the kernels' ``O(chunk * W)`` work instead of every (query, slot) pair.
    Holds for rules that shift freely (token bands and globals, :attr:`Primitives.shifts_freely`), the only
    ones routed here. The capped queries (``q_cap``) were rotated from the true positions, and the shift
    keeps every sink outside the band of a query it was outside of. The keys at position 0 (``k_cap``, rotated
    back from the true positions) move with their slots.
    """
    order = torch.argsort(bounded.k_pos, dim=1, stable=True)

    def by_position(t):
        return t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))

    real_keys = bounded.k_pos.gather(1, order) >= 0
    out = sparse_attention(query, by_position(key), by_position(value), pattern, key_padding_mask=real_keys,
                           q_offset=key.shape[2] - query.shape[2], scale=scale, softcap=softcap, layer=layer,
                           backend=backend, check_padding=False, q_cap=q_cap,
                           k_cap=None if k_cap is None else by_position(k_cap))
    # padding queries took the slots of earlier keys: their rows are zero, as on the positions path
    return out.masked_fill((bounded.q_pos < 0)[:, None, :, None], 0.0)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend
