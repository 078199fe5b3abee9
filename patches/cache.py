"""Bounded KV caches for patched layers: keep only what the pattern can still see.

A query at position ``n`` under ``SlidingWindow(W)`` sees keys ``n - W < j <= n``; under
``Longformer(W, G)`` also the first ``G`` positions. Once a token is written, every later query is at
a higher position, so a layer never needs more than the ``G`` sinks plus the last ``W - 1`` tokens.
:class:`SparseWindowLayer` keeps exactly that, per batch row; BigBird (random blocks reach anywhere
into the past) and dense layers keep the full history in a plain ``DynamicLayer``.

Layout of one :class:`SparseWindowLayer` (per row, ``[B, Hkv, S, D]`` with ``S <= G + W``)::

    slot:     0 .. G-1            G .. G+W-1
              sinks: position p   ring: position p >= G at slot G + (p - G) % W

Slots follow positions, not arrival order, so left padding needs no special case: padding tokens
have no position and are never stored, and the sinks of a row are its first ``G`` *real* tokens,
wherever its padding put them. ``positions`` (``[B, S]``, ``-1`` = empty) travels with the keys.

The transformers contract is that ``cache.update`` runs before the attention and returns the keys the
attention sees, new tokens included. :meth:`SparseWindowLayer.update` therefore

* on the first call (prefill) returns the new keys themselves -- a plain prefix, so the attention runs
  the prefill kernels of :func:`hf_sparse.sparse_attention` -- and then stores the last ``W`` tokens
  and the sinks;
* for one new token (decode) writes it into its ring slot first (that slot held position ``n - W``,
  which the query at ``n`` cannot see) and returns the buffer: no copy of the cache per step;
* for several new tokens on a non-empty cache (chunked prefill) returns ``[stored | new]`` and stores
  afterwards.

After each update the slot of position ``n - W`` is marked empty, so at most ``G + W - 1`` tokens are
live; the buffer has ``G + W`` slots (the extra one receives the next token). On CUDA a decode step
does all of this in one Triton launch (:func:`hf_sparse.kernels.ring_append`; ``kernel=`` chooses).
The attention function (:mod:`hf_sparse.patches.attention`) reads the query and key positions of the
last update from the layer: a decode token runs :func:`hf_sparse.decode.attention_with_positions` on
the bounded slots, a chunk runs ``sparse_attention`` on the slots sorted by position.

Positions count real tokens (padding is not a position), from the 2D attention mask that the
forward pre-hook (:mod:`hf_sparse.patches.history`) hands to the layer before each update; without a
mask every token is real. RoPE is whatever the model applied: keys are stored after it, queries arrive
with it, so positions stay absolute.

Limits: no ``crop`` (assisted/speculative decoding needs to roll back: use a full-history
``DynamicCache()``), no offloading, no static shapes (``torch.compile`` of the decode step), in-place
writes (inference only: autograd through a cached decode step is not supported).

Using it: ``generate`` gets it by default after :func:`~hf_sparse.patches.patch_model` (the model's
``_prepare_cache_for_generation`` is wrapped, see :mod:`hf_sparse.patches.model`); a user can pass
``SparseCache(model)`` explicitly as ``past_key_values=`` (5.17) / ``cache=`` (5.24). Any other
``DynamicCache`` gives patched layers a full history, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from hf_sparse.patterns import Pattern

from .options import options_of

__all__ = ["SparseWindowLayer", "SparseCache", "AttentionInputs", "cache_layer_for", "install_sparse_layers",
           "cache_bytes", "generated_cache", "window_layer_fits", "WINDOW_LAYER_ATTR"]

_GROW = 256  # the buffers grow in steps of this many slots, up to sinks + window

# Set on a patched attention module by the forward pre-hook (hf_sparse.patches.history) for the length
# of one forward: its bounded cache layer, whose last update says where the returned keys sit. The
# attention function pops it.
WINDOW_LAYER_ATTR = "_hf_sparse_window_layer"


@dataclass
class AttentionInputs:
    """What the attention function needs from the last :meth:`SparseWindowLayer.update`."""

    keys: torch.Tensor  # the key tensor update returned (identity check against what the attention got)
    q_pos: torch.Tensor  # [B, Tq] positions of the new tokens, -1 = padding
    k_pos: torch.Tensor  # [B, Tk] positions of the returned key slots, -1 = empty
    prefix: bool  # the keys are exactly the new tokens (prefill on an empty cache): the kernels can run


class SparseWindowLayer(CacheLayerMixin):
    """One layer's cache for ``SlidingWindow(window)`` (``sinks=0``) or ``Longformer(window, sinks)``.

    Attributes after an update: ``keys``/``values`` ``[B, Hkv, S, D]`` and ``positions`` ``[B, S]``
    (views of the buffers, ``S <= sinks + window``), ``real_counts`` ``[B]`` (real tokens seen per row),
    ``seen`` (tokens seen, padding included: what ``get_seq_length`` reports to ``generate``).
    """

    is_sliding = False  # the masks are sized on the whole history (get_mask_sizes), like a full layer
    is_compileable = False
    is_croppable = False

    def __init__(self, window: int, sinks: int = 0, kernel: bool | None = None, **kwargs):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SparseWindowLayer: window must be an integer >= 1, got {window!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"SparseWindowLayer: sinks must be an integer >= 0, got {sinks!r}")
        if kernel not in (None, True, False):
            raise ValueError(f"SparseWindowLayer: kernel must be True, False or None (automatic), got {kernel!r}")
        self.window, self.sinks = window, sinks
        self.max_slots = sinks + window
        self.kernel = kernel  # decode steps through one Triton launch (None: on CUDA when Triton is there)
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.positions = self.real_counts = None
        self._k = self._v = self._pos = None  # buffers of capacity + 1 slots; the last one is a write sink
        self._capacity = 0
        self.seen = 0
        self._padding: torch.Tensor | None = None
        self._attention: AttentionInputs | None = None
        self.is_initialized = False

    def __repr__(self) -> str:
        return f"SparseWindowLayer(window={self.window}, sinks={self.sinks}, seen={self.seen})"

    # -- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_zeros((b, h, 1, d))
        self._v = value_states.new_zeros((b, value_states.shape[1], 1, value_states.shape[-1]))
        self._pos = torch.full((b, 1), -1, dtype=torch.long, device=self.device)
        self.real_counts = torch.zeros(b, dtype=torch.long, device=self.device)
        self._capacity = 0
        self._refresh_views(0)
        self.is_initialized = True

    def prepare(self, padding: torch.Tensor | None) -> None:
        """Called by the pre-hook before the layer's update: the ``[B, past + q]`` padding mask or None."""
        self._padding = padding
        self._attention = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        seen_after = self.seen + q
        one_launch = q == 1 and self.seen > 0 and self._use_kernel(key_states, value_states)
        if not one_launch:
            q_pos = self._new_positions(q, key_states.device)
            n_after = self.real_counts + (q_pos >= 0).sum(1)
        if self.seen == 0:  # prefill on an empty cache: the keys are the new tokens
            self._store(key_states, value_states, q_pos, n_after, seen_after)
            keys, values, k_pos, prefix = key_states, value_states, q_pos, True
        elif one_launch:  # decode in one Triton launch: the steps of the branch below
            from hf_sparse.kernels import ring_append

            padding = self._take_padding(1)
            used = min(self.max_slots, seen_after)
            self._grow(used)
            q_pos, k_pos = ring_append(self._k, self._v, self._pos, self.real_counts, key_states, value_states,
                                       None if padding is None else padding[:, -1], slots=used, sinks=self.sinks,
                                       window=self.window)
            n_after = self.real_counts  # advanced in place
            self._refresh_views(used)
            keys, values, prefix = self.keys, self.values, False
        elif q == 1:  # decode: the new token's slot held position n - W, invisible to it
            self._store(key_states, value_states, q_pos, n_after, seen_after, mark_dead=False)
            keys, values, k_pos, prefix = self.keys, self.values, self.positions.clone(), False
            self._mark_dead(n_after)
        else:  # several tokens after a non-empty cache: [stored | new], then store
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            k_pos = torch.cat([self.positions, q_pos], dim=1)
            prefix = False
            self._store(key_states, value_states, q_pos, n_after, seen_after)
        self.real_counts, self.seen = n_after, seen_after
        self._attention = AttentionInputs(keys, q_pos, k_pos, prefix)
        return keys, values

    def take_attention_inputs(self) -> AttentionInputs | None:
        inputs, self._attention = self._attention, None
        return inputs

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The masks cover the whole history: the 2D padding mask is what patched layers read.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any sequence length; the memory is bounded, not the length

    def get_max_cache_shape(self) -> int:  # transformers 5.17 still calls it in places
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "hf_sparse: a bounded sparse cache (SparseWindowLayer) drops old tokens and cannot be rolled back, which "
            "assisted/speculative decoding needs; pass a full-history cache instead (past_key_values=DynamicCache())"
        )

    def offload(self):
        raise NotImplementedError("hf_sparse: SparseWindowLayer does not support offloading (it is already bounded)")

    def prefetch(self):
        raise NotImplementedError("hf_sparse: SparseWindowLayer does not support offloading (it is already bounded)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # -- internals -------------------------------------------------------------------------------
    def _select_rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self._k, self._v, self._pos = fn(self._k), fn(self._v), fn(self._pos)
        self.real_counts = fn(self.real_counts)
        self._refresh_views(self.keys.shape[-2])

    def _refresh_views(self, used: int) -> None:
        self.keys, self.values, self.positions = self._k[:, :, :used], self._v[:, :, :used], self._pos[:, :used]

    def _use_kernel(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a decode step writes the cache in one Triton launch (``ring_append``)."""
        fits = k.shape[1:] == v.shape[1:]  # the kernel copies keys and values with one head layout
        if self.kernel is not None:
            if self.kernel and not fits:
                raise NotImplementedError(
                    f"SparseWindowLayer(kernel=True): keys {tuple(k.shape)} and values {tuple(v.shape)} differ in "
                    "heads or head dim, which the one-launch write does not take; use kernel=None or False"
                )
            return self.kernel
        from hf_sparse.ops import triton_supports

        return fits and k.is_cuda and triton_supports(k, k) is None

    def _take_padding(self, q: int) -> torch.Tensor | None:
        """The ``[B, seen + q]`` padding mask the pre-hook handed over (checked), or None."""
        padding, self._padding = self._padding, None
        if padding is not None and (padding.dim() != 2 or padding.shape[0] != self.real_counts.shape[0]
                                    or padding.shape[1] != self.seen + q):
            raise ValueError(
                f"hf_sparse: the attention mask has shape {tuple(padding.shape)} but the cache has seen {self.seen} "
                f"tokens and {q} arrive: pass a 2D mask covering past and new tokens ([batch, {self.seen + q}])"
            )
        return padding

    def _new_positions(self, q: int, device: torch.device) -> torch.Tensor:
        """``[B, q]`` positions of the new tokens (real tokens counted per row), ``-1`` for padding."""
        padding = self._take_padding(q)
        base = self.real_counts.view(-1, 1)
        if padding is None:
            return base + torch.arange(q, device=device).view(1, q)
        new_real = padding[:, -q:].to(device=device, dtype=torch.bool)
        pos = base + new_real.long().cumsum(1) - 1
        return pos.masked_fill(~new_real, -1)

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        cap = min(self.max_slots, -(-needed // _GROW) * _GROW)  # at most _GROW - 1 spare slots
        b, h, _, d = self._k.shape
        k = self._k.new_zeros((b, h, cap + 1, d))
        v = self._v.new_zeros((b, self._v.shape[1], cap + 1, self._v.shape[-1]))
        pos = torch.full((b, cap + 1), -1, dtype=torch.long, device=self._pos.device)
        old = self._capacity
        if old:
            k[:, :, :old] = self._k[:, :, :old]
            v[:, :, :old] = self._v[:, :, :old]
            pos[:, :old] = self._pos[:, :old]
        self._k, self._v, self._pos, self._capacity = k, v, pos, cap

    def _store(self, k_new, v_new, q_pos, n_after, seen_after: int, mark_dead: bool = True) -> None:
        """Write the new tokens that later queries may see into their slots (the rest into the sink slot)."""
        g, w = self.sinks, self.window
        used = min(self.max_slots, seen_after)  # no row has more real tokens than tokens seen
        self._grow(used)
        sink = self._capacity
        keep = (q_pos >= 0) & ((q_pos < g) | (q_pos >= n_after.view(-1, 1) - w))
        slot = torch.where(q_pos < g, q_pos, g + (q_pos - g).remainder(w))
        slot = torch.where(keep, slot, torch.full_like(slot, sink))
        b, q = slot.shape
        if q <= self.max_slots:
            # a few tokens (decode, chunks): write each into its slot. Kept positions are distinct mod W, so
            # their slots are distinct; only the sink slot is written several times.
            rows = torch.arange(b, device=slot.device).view(-1, 1).expand_as(slot)
            self._k[rows, :, slot] = k_new.transpose(1, 2).to(self._k.dtype)
            self._v[rows, :, slot] = v_new.transpose(1, 2).to(self._v.dtype)
            self._pos[rows, slot] = q_pos
        else:
            # a long prompt: most tokens would go to the sink slot, so gather the kept ones per slot instead
            # (the racing writes to the sink are then one integer per token, not a key and a value)
            cap = self._capacity
            src = torch.full((b, cap + 1), -1, dtype=torch.long, device=slot.device)
            src.scatter_(1, slot, torch.arange(q, device=slot.device).view(1, q).expand(b, q))
            src = src[:, :cap]
            has, idx = src >= 0, src.clamp_min(0)
            for buf, new in ((self._k, k_new), (self._v, v_new)):
                h, d = buf.shape[1], buf.shape[-1]
                got = new.gather(2, idx.view(b, 1, cap, 1).expand(b, h, cap, d)).to(buf.dtype)
                buf[:, :, :cap] = torch.where(has.view(b, 1, cap, 1), got, buf[:, :, :cap])
            self._pos[:, :cap] = torch.where(has, q_pos.gather(1, idx), self._pos[:, :cap])
        self._pos[:, sink] = -1
        self._refresh_views(used)
        if mark_dead:
            self._mark_dead(n_after)

    def _mark_dead(self, n_after: torch.Tensor) -> None:
        # position n - W sits in the slot that the next token takes; no later query sees it
        g = self.sinks
        dead = (self._pos >= g) & (self._pos <= n_after.view(-1, 1) - self.window)
        self._pos.masked_fill_(dead, -1)

    def live_tokens(self) -> int:
        """Largest number of stored tokens that a later query may see, over the rows (one host sync)."""
        return 0 if self.positions is None else int((self.positions >= 0).sum(1).max())


def cache_layer_for(pattern: Pattern) -> CacheLayerMixin:
    """The cache layer a patched layer gets, from :meth:`~hf_sparse.Pattern.cache_policy`: bounded (sinks and
    a window) when later queries see only those, else the full history."""
    policy = pattern.cache_policy()
    if policy is None:
        return DynamicLayer()
    sinks, window = policy
    return SparseWindowLayer(window=window, sinks=sinks)


def window_layer_fits(layer: SparseWindowLayer, pattern: Pattern) -> bool:
    """Whether ``layer`` keeps every key that ``pattern`` lets a later query see."""
    policy = pattern.cache_policy()
    return policy is not None and layer.window >= policy[1] and layer.sinks >= policy[0]


def _num_layers(config) -> int:
    return config.get_text_config(decoder=True).num_hidden_layers


def install_sparse_layers(cache, config) -> None:
    """Give the patched layers of an empty ``DynamicCache`` their :func:`cache_layer_for` layer, in place.

    Unpatched layers keep what the cache has (the model's own full or sliding layers). Raises if a
    patched layer already holds tokens: a cache cannot be converted once filled.
    """
    opts = options_of(config)
    n = _num_layers(config)
    layers = cache.layers
    replicate = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
    while len(layers) < n:  # a cache built without config grows lazily: materialise it
        layers.append(replicate())
    for i in range(n):
        if not opts.patches(i):
            continue
        current = layers[i]
        held = current.get_seq_length() if getattr(current, "is_initialized", False) else 0
        if held:
            raise RuntimeError(
                f"hf_sparse layer {i}: the cache already holds {held} tokens; a filled cache cannot be made sparse. "
                "Create it before the first forward (SparseCache(model)) or let generate create it"
            )
        layers[i] = cache_layer_for(opts.pattern_for(i))


class SparseCache(DynamicCache):
    """A ``DynamicCache`` whose patched layers keep only what the pattern can still see.

    ``SparseCache(model)`` after :func:`~hf_sparse.patches.patch_model`: ``SlidingWindow`` and
    ``Longformer`` layers get a :class:`SparseWindowLayer` (``G + W`` slots), ``BigBird`` and ``Dense``
    layers a full ``DynamicLayer``, unpatched layers what ``DynamicCache(config=model.config)`` gives
    them. ``generate`` builds one by default; pass it explicitly to keep it across calls::

        cache = SparseCache(model)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=256)   # 5.24 also names it cache=
    """

    def __init__(self, model_or_config):
        config = getattr(model_or_config, "config", model_or_config)
        if not isinstance(getattr(config, "hf_sparse", None), dict):
            raise ValueError(
                "SparseCache(model) needs a model patched by hf_sparse.patch_model (its config has no hf_sparse entry)"
            )
        super().__init__(config=config)
        install_sparse_layers(self, config)

    def cache_bytes(self) -> int:
        """Bytes held by keys and values (and positions) of every layer, allocated capacity included."""
        return cache_bytes(self)


def cache_bytes(cache) -> int:
    """Bytes held by the KV tensors of a transformers cache (buffers of bounded layers at full capacity)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        tensors = (layer._k, layer._v, layer._pos) if isinstance(layer, SparseWindowLayer) else (
            getattr(layer, "keys", None), getattr(layer, "values", None))
        for t in tensors:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def generated_cache(out):
    """The cache of a ``generate(..., return_dict_in_generate=True)`` output (transformers 5.24 names it
    ``cache``, 5.17 ``past_key_values``)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values
