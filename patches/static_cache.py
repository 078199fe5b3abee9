"""Static bounded caches: fixed shapes for ``torch.compile`` and CUDA graphs.

:class:`SparseStaticCache` is the fixed-shape form of :class:`~hf_sparse.patches.cache.SparseCache`:
every buffer is allocated once, at its final size, and updated in place, so a decode step has no
shape and no Python value that depends on the step number. ``torch.compile(model.forward,
mode="reduce-overhead")`` then captures the decode step once and replays it as a CUDA graph.

Each patched layer gets a :class:`StaticWindowLayer` (per group of KV heads for a per-head plan):

* a window (``SlidingWindow(W)``, ``Longformer(W, G)``): the layout of the dynamic layer, ``G`` sink
  slots and a ring of ``W`` slots, position ``p >= G`` at slot ``G + (p - G) % W``;
* a full history (dense, BigBird, strides): ``max_cache_len`` slots, position ``p`` at slot ``p``;

plus one write-sink slot that takes the tokens no later query sees (its position stays ``-1``). The
buffers hold ``slots + 1`` entries; ``keys``, ``values`` and ``positions`` are views of their first
``slots`` (``[B, H, slots, D]``: for a full history transformers' ``StaticCache`` shape,
``[B, H, max_cache_len, D]``). Next to them live ``real_counts [B]`` (real tokens per row) and the
number of tokens seen (a 0-dim tensor, as in transformers' ``StaticLayer``), all marked as static
addresses for CUDA graphs.

An update

* of one token (decode): writes it into its slot (which held position ``n - W``, invisible to the
  query at ``n``), advances the counts in place and returns the ``slots`` views; the attention runs
  :func:`hf_sparse.decode.attention_with_positions` over them (on CUDA the decode kernel, a
  ``torch.library`` custom op under ``torch.compile``; tiles of empty slots are skipped, so a full
  history buffer larger than the sequence costs nothing extra);
* of several tokens on an empty cache (the prompt): returns the prompt's own keys (the prefill kernels
  run on them) and stores what later queries can see;
* of several tokens on a filled cache (chunked prefill): returns ``[buffer | chunk]`` and stores the
  chunk; with ``prefill_chunk_size`` a 128k prompt fills the cache chunk by chunk, each chunk
  attending over ``slots + chunk`` keys, never over the whole prompt.

``output_attentions=True`` returns probabilities over the slots (``[B, H, q, slots]``, 0 outside the
pattern and on empty slots) at every step of a full-history layer, the prompt's included, as
transformers' static cache does; a window layer's prefill and chunks return them over the keys they
attended (its ring cannot hold a long prompt's keys at once).

Positions count real tokens per row from the padding mask of the new tokens (the mask function hands
patched layers the last ``q`` columns of the 2D mask when the cache is static, so its shape does not
grow with the step either).

Using it (after :func:`~hf_sparse.patches.patch_model`, every layer patched)::

    out = model.generate(ids, max_new_tokens=256, cache_implementation="static")   # builds a SparseStaticCache

    cache = SparseStaticCache(model, max_cache_len=ids.shape[1] + 256, max_batch_size=1)
    out = model.generate(ids, max_new_tokens=256, past_key_values=cache)           # 5.24 also names it cache=

``generate`` compiles the decode step by itself when the cache is static and the model is on CUDA
(transformers' ``CompileConfig``: Inductor, ``mode="reduce-overhead"``), exactly as for its own
``StaticCache``; ``cache_implementation="static"`` on a patched model builds this cache instead of
transformers' (the model's ``_prepare_static_cache`` is wrapped by ``patch_model``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache

from hf_sparse.patterns import Pattern

from .cache import (
    AttentionInputs,
    HeadGroupsLayer,
    PositionedLayer,
    head_groups,
    install_sparse_layers,
    kv_heads_of,
    new_positions,
    ring_slots,
    write_slots,
)
from .options import ATTN_NAME, options_of

__all__ = ["StaticWindowLayer", "SparseStaticCache", "static_layer_for", "prepare_static_cache_for_generation"]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class StaticWindowLayer(PositionedLayer):
    """One layer's (or one group of KV heads') fixed-shape cache: ``sinks`` + a ring of ``window`` slots,
    or, with ``window=None`` (or when ``sinks + window >= max_cache_len``), every position up to
    ``max_cache_len`` at its own slot. See the module docstring for the layout and the updates.

    Attributes after allocation: ``keys``/``values`` ``[B, H, slots, D]`` and ``positions [B, slots]`` (views
    of the buffers, which hold one write-sink slot more), ``real_counts [B]``; all updated in place.
    """

    is_compileable = True
    _k = _v = _pos = None  # [B, H, slots + 1, D] / [B, slots + 1]: the buffers, the last slot a write sink

    def __init__(self, max_cache_len: int, window: int | None = None, sinks: int = 0):
        super().__init__()
        for name, value, low in (("max_cache_len", max_cache_len, 1), ("sinks", sinks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"StaticWindowLayer: {name} must be an integer >= {low}, got {value!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"StaticWindowLayer: window must be None (full history) or an integer >= 1, got {window!r}")
        self.max_cache_len = max_cache_len
        self.full = window is None or sinks + window >= max_cache_len
        # a full history is a ring that never wraps: position p at slot p
        self.sinks, self.window = (0, max_cache_len) if self.full else (sinks, window)
        self.slots = self.sinks + self.window
        self._k = self._v = self._pos = self.real_counts = self._seen = None
        self._empty = True  # a host flag read only for prompts and chunks (q > 1), never by a decode step

    def __repr__(self) -> str:
        kind = f"full, {self.slots} slots" if self.full else f"window={self.window}, sinks={self.sinks}"
        return f"StaticWindowLayer({kind})"

    # the views of the buffers without their write-sink slot, made afresh on each access (inside a compiled
    # step too), so no two attributes alias one buffer; CacheLayerMixin.__init__ assigns None to keys / values
    keys = property(lambda self: _without_sink(self._k, self.slots), lambda self, v: _refuse_assignment("keys", v))
    values = property(lambda self: _without_sink(self._v, self.slots), lambda self, v: _refuse_assignment("values", v))
    positions = property(lambda self: _without_sink(self._pos, self.slots))

    # -- allocation ------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate every buffer at its final size (``key_states`` gives batch, heads, head dim, dtype
        and device; its length is ignored, so ``Cache.early_initialization`` works too)."""
        b, h, _, d = key_states.shape
        device = key_states.device
        self._k = key_states.new_zeros((b, h, self.slots + 1, d))
        self._v = value_states.new_zeros((b, value_states.shape[1], self.slots + 1, value_states.shape[-1]))
        self._pos = torch.full((b, self.slots + 1), -1, dtype=torch.long, device=device)
        self.real_counts = torch.zeros(b, dtype=torch.long, device=device)
        self._seen = torch.zeros((), dtype=torch.long, device=device)
        self.dtype, self.device = key_states.dtype, device
        if not _is_compiling():  # CUDA graphs replay these addresses: they must never move
            for t in (self._k, self._v, self._pos, self.real_counts, self._seen):
                torch._dynamo.mark_static_address(t)
        self._empty = True
        self.is_initialized = True

    # -- update ----------------------------------------------------------------------------------
    def _new_real(self, q: int) -> torch.Tensor | None:
        """``[B, q]``: which new tokens are real, from the padding mask the pre-hook handed over."""
        padding, self._padding = self._padding, None
        if padding is None:
            return None
        if padding.dim() != 2 or padding.shape[0] != self.real_counts.shape[0] or padding.shape[1] < q:
            raise ValueError(
                f"hf_sparse: the attention mask has shape {tuple(padding.shape)} for {q} new tokens in a batch of "
                f"{self.real_counts.shape[0]}; pass a 2D mask [batch, tokens] whose last {q} columns are the new tokens"
            )
        return padding[:, -q:]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        q_pos = new_positions(self.real_counts, self._new_real(q), q)
        n_after = self.real_counts + (q_pos >= 0).sum(1)
        columns = None  # where output_attentions puts the returned keys, when they are not the slots
        if q == 1:  # decode (or a one-token prompt): write first, then attend over the slots
            keys, values, k_pos, prefix = self.keys, self.values, self.positions, False
        elif self._empty:  # the prompt: its own keys, a plain prefix for the prefill kernels
            keys, values, k_pos, prefix = key_states, value_states, q_pos, True
            columns = q_pos if self.full else None  # a full history keeps position p at slot p
        else:  # a chunk after stored tokens: [slots | chunk] (copied before the chunk is stored)
            keys = torch.cat([self.keys, key_states.to(self._k.dtype)], dim=-2)
            values = torch.cat([self.values, value_states.to(self._v.dtype)], dim=-2)
            k_pos, prefix = torch.cat([self.positions, q_pos], dim=1), False
            if self.full:
                own = torch.arange(self.slots, device=q_pos.device).expand(q_pos.shape[0], -1)
                columns = torch.cat([torch.where(self.positions >= 0, own, -1), q_pos], dim=1)
        # keep the sinks and the last W tokens of each row (all of them for a full history); the others go to
        # the sink slot. Kept ring positions are distinct mod W, so their slots are distinct.
        g, w = self.sinks, self.window
        keep = (q_pos >= 0) & ((q_pos < g) | (q_pos >= n_after.view(-1, 1) - w))
        slot = torch.where(keep, ring_slots(q_pos.clamp_min(0), g, w), self.slots)
        write_slots(self._k, self._v, self._pos, key_states, value_states, q_pos, slot, self.slots)
        self.real_counts.copy_(n_after)
        self._seen.add_(q)
        self._empty = False
        self._attention = AttentionInputs(keys, q_pos, k_pos, prefix, columns, self.slots)
        return keys, values

    # -- CacheLayerMixin -------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # constant, like transformers' StaticLayer: no recompilation per step. One more than any 2D mask that
        # generate builds (at most max_cache_len columns), so hf_sparse_mask tells a static cache at every step
        return self.max_cache_len + 1, 0

    def get_seq_length(self):
        return self._seen if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:  # transformers 5.17 still calls it in places
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self._k.zero_()
            self._v.zero_()
            self._pos.fill_(-1)
            self.real_counts.zero_()
            self._seen.zero_()
        self._empty = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # in place: the addresses stay
            for t in (self._k, self._v, self._pos, self.real_counts):
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def _reshape_rows(self, fn) -> None:
        # the batch size changes, so the buffers cannot stay where they were (a new compiled graph follows)
        if self.is_initialized:
            self._k, self._v = fn(self._k), fn(self._v)
            self._pos, self.real_counts = fn(self._pos), fn(self.real_counts)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reshape_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reshape_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # -- hf_sparse -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        tensors = (self._k, self._v, self._pos, self.real_counts)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def position_bound(self) -> int:
        return self.max_cache_len - 1

    def fits(self, pattern: Pattern) -> bool:
        if self.full:
            return True
        policy = pattern.cache_policy()
        return policy is not None and self.window >= policy[1] and self.sinks >= policy[0]

    def live_tokens(self) -> int:
        """Largest number of stored tokens that the next query may see, over the rows (one host sync)."""
        if not self.is_initialized:
            return 0
        p, n = self.positions, self.real_counts.view(-1, 1)
        live = (p >= 0) & ((p < self.sinks) | (p > n - self.window))
        return int(live.sum(1).max())


def _without_sink(buffer: torch.Tensor | None, slots: int) -> torch.Tensor | None:
    """``[B, H, slots + 1, D]`` or ``[B, slots + 1]`` without its last (write-sink) slot."""
    return None if buffer is None else buffer.narrow(2 if buffer.dim() == 4 else 1, 0, slots)


def _refuse_assignment(name: str, value) -> None:
    if value is not None:
        raise AttributeError(f"StaticWindowLayer.{name} is a view of a fixed buffer and cannot be replaced; update "
                             "the layer (update, reset, reorder_cache) instead")


def _one_static_layer(pattern: Pattern, max_cache_len: int) -> StaticWindowLayer:
    policy = pattern.cache_policy()
    if policy is None:
        return StaticWindowLayer(max_cache_len)
    sinks, window = policy
    return StaticWindowLayer(max_cache_len, window=window, sinks=sinks)


def static_layer_for(pattern: Pattern, kv_heads: int, max_cache_len: int):
    """The static cache layer of a patched layer: :class:`StaticWindowLayer` sized by the pattern's
    :meth:`~hf_sparse.Pattern.cache_policy`, per group of KV heads when a per-head plan's heads keep
    different amounts."""
    groups = head_groups(pattern, kv_heads)
    if len(groups) == 1:
        return _one_static_layer(pattern, max_cache_len)
    return HeadGroupsLayer([(heads, p, _one_static_layer(p, max_cache_len)) for heads, p in groups], kv_heads)


class SparseStaticCache(StaticCache):
    """A transformers ``StaticCache`` whose patched layers keep only what the pattern can still see, in
    fixed-shape buffers (see the module docstring).

    Args:
        model_or_config: a model patched by :func:`~hf_sparse.patches.patch_model` (its config carries
            ``hf_sparse``), or its config.
        max_cache_len: the most tokens one row will hold, prompt and generated tokens together (padding
            included, as for transformers' static cache). Window layers keep ``sinks + window`` slots
            whatever it is, full-history layers (dense, BigBird) ``max_cache_len`` (each plus one write-sink
            slot that ``keys`` / ``values`` do not show).
        max_batch_size: with a model, allocate every buffer now, for this batch size (on the model's
            device and dtype); otherwise the buffers are allocated by the first update.

    Every layer must be patched (``layers=None``): the masks of a partly patched model grow with the
    sequence, which a compiled decode step cannot take.
    """

    def __init__(self, model_or_config, max_cache_len: int, max_batch_size: int | None = None):
        config = getattr(model_or_config, "config", model_or_config)
        if not isinstance(getattr(config, "hf_sparse", None), dict):
            raise ValueError("SparseStaticCache(model, max_cache_len=...) needs a model patched by "
                             "hf_sparse.patch_model (its config has no hf_sparse entry)")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"SparseStaticCache: max_cache_len must be an integer >= 1 (prompt + new tokens), got "
                             f"{max_cache_len!r}")
        opts = options_of(config)
        if not opts.all_layers:
            raise NotImplementedError(
                f"SparseStaticCache needs every layer patched, but this model patches layers {sorted(opts.layers)} only: "
                "the unpatched layers' masks grow with the sequence. Patch every layer (layers=None) or decode with "
                "the dynamic SparseCache (generate's default, cache_implementation=None)"
            )
        super().__init__(config=config, max_cache_len=max_cache_len)
        install_sparse_layers(self, config, layer_for=lambda p, heads: static_layer_for(p, heads, max_cache_len))
        if max_batch_size is not None and hasattr(model_or_config, "config"):
            self.allocate(model_or_config, max_batch_size)

    def allocate(self, model, batch_size: int) -> None:
        """Allocate every layer's buffers now, for ``batch_size`` rows on the model's device and dtype."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SparseStaticCache: max_batch_size must be an integer >= 1, got {batch_size!r}")
        text = model.config.get_text_config(decoder=True)
        heads = kv_heads_of(model.config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        probe = torch.zeros((batch_size, heads, 0, head_dim), dtype=model.dtype, device=model.device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(probe, probe)


def prepare_static_cache_for_generation(self, cache_implementation: str, batch_size: int, max_cache_len: int,
                                        *args, **kwargs):
    """``generate``'s ``_prepare_static_cache`` on a patched model (installed by ``patch_model``): a
    :class:`SparseStaticCache`, allocated now, sized like transformers' own (the longest ``max_cache_len``
    this model has used, so a second call does not recompile); any other model gets transformers' cache.

    The arguments after ``max_cache_len`` differ by release (5.4: ``model_kwargs``; 5.25 adds
    ``prefill_chunk_size`` before it) and are only passed on; ``generate`` names them all."""
    ours = isinstance(getattr(self.config, "hf_sparse", None), dict) and self.config._attn_implementation == ATTN_NAME
    if not ours or self.config.is_encoder_decoder:
        return type(self)._prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs)
    if "offloaded" in cache_implementation:
        raise NotImplementedError(
            f"hf_sparse: cache_implementation={cache_implementation!r} offloads the cache, which the bounded sparse "
            "layers do not support (they are small already); use cache_implementation='static'"
        )
    length = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
    cache = SparseStaticCache(self, max_cache_len=length, max_batch_size=batch_size)
    self._previous_max_cache_length = length
    return cache
