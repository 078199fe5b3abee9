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

Per-head plans (``patch_model(..., head_patterns=...)``): the KV heads of a layer are grouped by what
their pattern keeps (:func:`head_groups`; a dense head keeps everything, a window head its window),
and a :class:`HeadGroupsLayer` gives each group its own layer over its heads only, so one dense head
no longer makes the whole layer keep its history; the attention runs once per group (not per head)
and the outputs are joined in head order. A layer whose heads all keep the same uses one plain layer.

Static forms (fixed shapes for ``torch.compile`` / CUDA graphs): :mod:`hf_sparse.patches.static_cache`.

Rolling back (``crop``, which assisted and speculative decoding call after each verification): after
``activate_past_recording()`` (which ``generate`` calls before assisted decoding, transformers >= 5.15) a
layer records each update -- the slots it overwrites and its own tokens -- until the next ``crop``, which
undoes any number of those tokens exactly, however far the ring has turned. Without recording, ``crop``
is exact when no token the rolled-back queries can see was overwritten (the layer has seen at most
``G + W`` tokens, or one token is removed, or the ring overwrote none of the positions still in the
window); otherwise it raises, before changing anything, with the numbers and the fix. When some of the
tokens were padding, each row's new length is read from the next forward's 2D mask. transformers' own
``DynamicSlidingWindowLayer`` rolls back while recording or before its window is full.

Limits: no offloading, in-place writes (inference only: autograd through a cached decode step is not
supported).

Using it: ``generate`` gets it by default after :func:`~hf_sparse.patches.patch_model` (the model's
``_prepare_cache_for_generation`` is wrapped, see :mod:`hf_sparse.patches.model`); a user can pass
``SparseCache(model)`` explicitly as ``past_key_values=`` (5.17) / ``cache=`` (5.24). Any other
``DynamicCache`` gives patched layers a full history, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from hf_sparse.patterns import Pattern, PerHead

from .options import options_of

__all__ = ["PositionedLayer", "SparseWindowLayer", "HeadGroupsLayer", "SparseCache", "AttentionInputs",
           "GroupedInputs", "HeadGroup", "head_groups", "cache_layer_for", "install_sparse_layers", "cache_bytes",
           "generated_cache", "window_layer_fits", "ring_slots", "new_positions", "write_slots", "kv_heads_of",
           "WINDOW_LAYER_ATTR"]

_GROW = 256  # the buffers grow in steps of this many slots, up to sinks + window

# Set on a patched attention module by the forward pre-hook (hf_sparse.patches.history) for the length
# of one forward: its bounded cache layer, whose last update says where the returned keys sit. The
# attention function pops it.
WINDOW_LAYER_ATTR = "_hf_sparse_window_layer"


@dataclass
class AttentionInputs:
    """What the attention function needs from the last update of a :class:`PositionedLayer`."""

    keys: torch.Tensor  # the key tensor update returned (identity check against what the attention got)
    q_pos: torch.Tensor  # [B, Tq] positions of the new tokens, -1 = padding
    k_pos: torch.Tensor  # [B, Tk] positions of the returned key slots, -1 = empty
    prefix: bool  # the keys are exactly the new tokens (prefill on an empty cache): the kernels can run
    # where attention probabilities (output_attentions) put each returned key: [B, Tk] columns of
    # [0, width) (-1: none), for a static layer whose returned keys are not its slots; None: as returned
    columns: torch.Tensor | None = None
    width: int = 0

    def matches(self, key: torch.Tensor) -> bool:
        """Whether ``key`` (what the attention got) is what the update returned."""
        return self.keys is key or tuple(self.k_pos.shape) == (key.shape[0], key.shape[2])


# ---------------------------------------------------------------------------------------------
# slots and positions, shared by the dynamic and the static layers
def ring_slots(pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """The slot of each position in a sinks + ring layout: ``p`` for ``p < sinks``, else
    ``sinks + (p - sinks) % window`` (``pos`` must be ``>= 0``)."""
    return torch.where(pos < sinks, pos, sinks + (pos - sinks).remainder(window))


def new_positions(real_counts: torch.Tensor, real_new: torch.Tensor | None, q: int) -> torch.Tensor:
    """``[B, q]`` positions of ``q`` new tokens after ``real_counts [B]`` real ones (``-1`` where
    ``real_new [B, q]`` marks padding; ``None``: every new token is real)."""
    base = real_counts.view(-1, 1)
    if real_new is None:
        return base + torch.arange(q, device=real_counts.device).view(1, q)
    real = real_new.to(device=real_counts.device, dtype=torch.bool)
    return (base + real.long().cumsum(1) - 1).masked_fill(~real, -1)


def write_slots(k_buf, v_buf, pos_buf, k_new, v_new, q_pos, slot, sink: int) -> None:
    """Write new tokens into their slots of ``[B, H, S, D]`` buffers (``pos_buf [B, S]`` gets their
    positions); tokens whose ``slot`` is ``sink`` are dropped (written to that slot, whose position
    stays ``-1``). The kept tokens' slots must be distinct."""
    b, q = slot.shape
    if q <= sink:
        # a few tokens (decode, chunks): write each into its slot; only the sink slot is written several times
        rows = torch.arange(b, device=slot.device).view(-1, 1).expand_as(slot)
        k_buf[rows, :, slot] = k_new.transpose(1, 2).to(k_buf.dtype)
        v_buf[rows, :, slot] = v_new.transpose(1, 2).to(v_buf.dtype)
        pos_buf[rows, slot] = torch.where(slot == sink, -1, q_pos)
        return
    # a long prompt: most tokens would go to the sink slot, so gather the kept ones per slot instead
    # (the racing writes to the sink are then one integer per token, not a key and a value)
    src = torch.full((b, sink + 1), -1, dtype=torch.long, device=slot.device)
    src.scatter_(1, slot, torch.arange(q, device=slot.device).view(1, q).expand(b, q))
    src = src[:, :sink]
    has, idx = src >= 0, src.clamp_min(0)
    for buf, new in ((k_buf, k_new), (v_buf, v_new)):
        h, d = buf.shape[1], buf.shape[-1]
        got = new.gather(2, idx.view(b, 1, sink, 1).expand(b, h, sink, d)).to(buf.dtype)
        buf[:, :, :sink] = torch.where(has.view(b, 1, sink, 1), got, buf[:, :, :sink])
    pos_buf[:, :sink] = torch.where(has, q_pos.gather(1, idx), pos_buf[:, :sink])


def removed_tokens(tokens_to_remove: int, seen: int, layer) -> int:
    """How many tokens ``layer.crop(tokens_to_remove)`` removes after ``seen``: ``-n`` removes ``n``, a positive
    value is the number to keep (the form transformers < 5.18 also passes)."""
    if isinstance(tokens_to_remove, torch.Tensor) and tokens_to_remove.numel() == 1 and not (
            tokens_to_remove.is_floating_point() or tokens_to_remove.dtype == torch.bool):
        tokens_to_remove = int(tokens_to_remove)  # generate passes a tensor at times
    if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
        raise ValueError(f"hf_sparse: crop takes an integer (-n removes n tokens), got {tokens_to_remove!r}")
    n = max(seen - tokens_to_remove, 0) if tokens_to_remove > 0 else -tokens_to_remove
    if n > seen:
        raise ValueError(f"hf_sparse: crop({tokens_to_remove}) on {layer!r}: it holds only {seen} tokens")
    return n


@dataclass
class _Undo:
    """One recorded update of a :class:`SparseWindowLayer`: the state before it and what it overwrote."""

    seen: int
    real: torch.Tensor  # [B] real tokens per row before it
    pos: torch.Tensor  # [B, capacity + 1] slot positions before it
    slot: torch.Tensor  # [B, q] the slots it wrote (the sink slot for dropped tokens)
    old: list[torch.Tensor] | None  # keys and values those slots held; None: the layer was empty
    k_new: torch.Tensor
    v_new: torch.Tensor
    q_pos: torch.Tensor


class PositionedLayer(CacheLayerMixin):
    """Base of the cache layers whose key slots carry positions.

    Before each update the forward pre-hook (:mod:`hf_sparse.patches.history`) hands the layer the 2D
    padding mask of the forward (:meth:`prepare`); after the update the attention function takes what
    it needs to know about the returned keys (:meth:`take_attention_inputs`).
    """

    is_sliding = False  # the masks are sized like a full layer's (get_mask_sizes)
    is_croppable = False
    _padding: torch.Tensor | None = None
    _attention = None

    def prepare(self, padding: torch.Tensor | None) -> None:
        """The ``[B, past + q]`` (or, for static caches, ``[B, >= q]``) padding mask of this forward, or None."""
        self._padding = padding
        self._attention = None

    def take_attention_inputs(self):
        inputs, self._attention = self._attention, None
        return inputs

    def offload(self):
        raise NotImplementedError(f"hf_sparse: {type(self).__name__} does not support offloading")

    def prefetch(self):
        raise NotImplementedError(f"hf_sparse: {type(self).__name__} does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            f"hf_sparse: a sparse cache layer ({type(self).__name__}) cannot be rolled back (crop({tokens_to_remove})), "
            "which assisted/speculative decoding needs; use the dynamic cache (generate's default) or a full-history "
            "cache (past_key_values=DynamicCache())"
        )

    def nbytes(self) -> int:
        """Bytes this layer holds for keys, values and positions (allocated capacity included)."""
        raise NotImplementedError

    def position_bound(self) -> int:
        """A host-side upper bound of every position stored or just added (no device sync; for a static
        layer a constant, so a compiled step does not depend on it)."""
        raise NotImplementedError

    def fits(self, pattern: Pattern) -> bool:
        """Whether this layer keeps every key that ``pattern`` lets a later query see."""
        raise NotImplementedError


class SparseWindowLayer(PositionedLayer):
    """One layer's cache for ``SlidingWindow(window)`` (``sinks=0``) or ``Longformer(window, sinks)``.

    Attributes after an update: ``keys``/``values`` ``[B, Hkv, S, D]`` and ``positions`` ``[B, S]``
    (views of the buffers, ``S <= sinks + window``), ``real_counts`` ``[B]`` (real tokens seen per row),
    ``seen`` (tokens seen, padding included: what ``get_seq_length`` reports to ``generate``).
    """

    is_compileable = False

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
        self.record_past = False  # set by activate_past_recording: updates are recorded until the next crop
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.positions = self.real_counts = None
        self._k = self._v = self._pos = None  # buffers of capacity + 1 slots; the last one is a write sink
        self._capacity = 0
        self.seen = 0
        self._padding: torch.Tensor | None = None
        self._attention: AttentionInputs | None = None
        self._log: list[_Undo] = []  # the updates since the last crop, while recording
        self._unresolved = 0  # tokens crop removed whose rows' real counts the next forward's mask tells
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._unresolved:
            self._resolve_crop()
        q = key_states.shape[-2]
        seen_after = self.seen + q
        one_launch = q == 1 and self.seen > 0 and not self.record_past and self._use_kernel(key_states, value_states)
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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self._pos) if t is not None)

    def position_bound(self) -> int:
        return self.seen - 1

    def fits(self, pattern: Pattern) -> bool:
        policy = pattern.cache_policy()
        return policy is not None and self.window >= policy[1] and self.sinks >= policy[0]

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
        self._log = []  # the record is per row: a reordered batch starts a new one
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
        return new_positions(self.real_counts, None if padding is None else padding[:, -q:], q)

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
        keep = (q_pos >= 0) & ((q_pos < g) | (q_pos >= n_after.view(-1, 1) - w))
        # kept positions are distinct mod W (at most the last W), so their slots are distinct
        slot = torch.where(keep, ring_slots(q_pos, g, w), self._capacity)
        if self.record_past:
            self._record(k_new, v_new, q_pos, slot)
        elif self._log:  # recording was switched off (generate does, handing the cache back): commit
            self._log = []
        write_slots(self._k, self._v, self._pos, k_new, v_new, q_pos, slot, self._capacity)
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

    # -- rolling back ----------------------------------------------------------------------------
    def activate_past_recording(self, **kwargs) -> None:
        """Record every update until the next :meth:`crop`, which can then undo any of them exactly."""
        self.record_past = True

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """Whether :meth:`crop` can undo any number of the latest tokens (recording, or nothing overwritten yet)."""
        return self.record_past or self.seen <= self.max_slots

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the latest tokens: ``-n`` removes ``n`` (``0`` commits the record), a positive value is the
        number of tokens to keep (transformers < 5.18). Raises, before changing anything, when a token that
        the rolled-back queries can see was overwritten and not recorded (see the module docstring)."""
        n = self.check_crop(tokens_to_remove)
        log, self._log = self._log, []
        target = self.seen - n
        if n and log and log[0].seen <= target:
            self._undo(log, target)
        elif n:
            if log:
                self._undo(log, log[0].seen)
            self._roll_back(self.seen - target)

    def check_crop(self, tokens_to_remove: int) -> int:
        """The number of tokens ``crop(tokens_to_remove)`` removes; raises if it cannot remove them exactly."""
        n = removed_tokens(tokens_to_remove, self.seen, self)
        base = self._log[0].seen if self._log else self.seen  # the tokens before the record
        if n <= self.seen - base:
            return n
        n_unrecorded = n - (self.seen - base)
        counts = self._log[0].real if self._log else self.real_counts
        if counts is None or base <= self.max_slots or n_unrecorded == 1:
            return n  # nothing overwritten yet, or only what the query at position n - 1 does not see
        if self._unresolved or not bool((counts == base).all()):
            raise ValueError(
                f"hf_sparse: crop({tokens_to_remove}) on {self!r}: {n_unrecorded} of the tokens to remove were not "
                f"recorded and some of the {base} tokens before them were padding, so it cannot tell which positions "
                "each row loses; call cache.activate_past_recording() before the tokens to roll back arrive"
            )
        g, w, m = self.sinks, self.window, base - n_unrecorded
        first, last = max(g, m - w + 1), min(base - 1 - w, m - 1)  # positions needed after it, overwritten since
        if first <= last:
            raise ValueError(
                f"hf_sparse: crop({tokens_to_remove}) on {self!r} would roll it back to {m} tokens, but positions "
                f"{first}..{last}, which the next query sees, were overwritten when it reached {base} tokens (it keeps "
                f"{g} sinks and the last {w}). Call cache.activate_past_recording() before the tokens to roll back "
                "arrive (generate does for assisted decoding on transformers >= 5.15), or use a full-history cache "
                "(past_key_values=DynamicCache())"
            )
        return n

    def _record(self, k_new, v_new, q_pos, slot) -> None:
        """Keep what an update is about to overwrite (the slots it writes) and the update itself."""
        old = None
        if self.seen:  # an empty layer has nothing to restore
            b, q = slot.shape
            old = [buf.gather(2, slot.view(b, 1, q, 1).expand(b, buf.shape[1], q, buf.shape[-1]))
                   for buf in (self._k, self._v)]
        self._log.append(_Undo(self.seen, self.real_counts.clone(), self._pos.clone(), slot, old, k_new, v_new, q_pos))

    def _undo(self, log: list[_Undo], target: int) -> None:
        """Undo the recorded updates (newest first), then store again their tokens up to ``target`` seen."""
        for entry in reversed(log):
            if entry.old is not None:
                b, q = entry.slot.shape
                for buf, old in zip((self._k, self._v), entry.old):
                    buf.scatter_(2, entry.slot.view(b, 1, q, 1).expand_as(old), old)
        first = log[0]
        self._pos.fill_(-1)
        self._pos[:, : first.pos.shape[1]] = first.pos
        self.real_counts, self.seen = first.real, first.seen
        keep = target - first.seen
        if keep:
            k_new = torch.cat([e.k_new for e in log], dim=2)[:, :, :keep]
            v_new = torch.cat([e.v_new for e in log], dim=2)[:, :, :keep]
            q_pos = torch.cat([e.q_pos for e in log], dim=1)[:, :keep]
            n_after = self.real_counts + (q_pos >= 0).sum(1)
            recording, self.record_past = self.record_past, False
            self._store(k_new, v_new, q_pos, n_after, target)
            self.record_past = recording
            self.real_counts, self.seen = n_after, target
        self._refresh_views(min(self.max_slots, self.seen))

    def _roll_back(self, n: int) -> None:
        """Forget the last ``n`` tokens, none needed overwritten (:meth:`check_crop`). When some tokens were
        padding, which rows lose how many positions is read from the next forward's mask."""
        if self._unresolved or not bool((self.real_counts == self.seen).all()):
            self._unresolved += n
            self.seen -= n
            return
        self.seen -= n
        self._keep_positions(self.real_counts - n)

    def _resolve_crop(self) -> None:
        """The real tokens each row keeps after an unresolved crop, from the mask of this forward."""
        padding = self._padding
        if padding is None or padding.dim() != 2 or padding.shape[1] < self.seen:
            raise ValueError(
                f"hf_sparse: {self!r} was rolled back by {self._unresolved} tokens, some of them padding; the next "
                f"forward must pass its 2D attention_mask ([batch, {self.seen} + new tokens]) to tell each row's length"
            )
        self._unresolved = 0
        self._keep_positions(padding[:, : self.seen].to(self.real_counts.device).long().sum(1))

    def _keep_positions(self, m: torch.Tensor) -> None:
        """Keep each row's first ``m [B]`` real tokens (none of them overwritten): the slots whose positions
        stay live are marked again, the others emptied."""
        slots = torch.arange(self._capacity + 1, device=m.device).view(1, -1)
        g, w, last = self.sinks, self.window, m.view(-1, 1) - 1
        # the latest position p < m stored at ring slot s: s + W * floor((m - 1 - s) / W)
        p = slots + w * torch.div(last - slots, w, rounding_mode="floor")
        live_ring = (slots >= g) & (p >= g) & (p > last + 1 - w)
        live_sink = (slots < g) & (slots <= last)
        pos = torch.where(live_sink, slots, torch.where(live_ring, p, -1))
        pos[:, self._capacity] = -1
        self._pos.copy_(pos.expand_as(self._pos))
        self.real_counts = m
        self._refresh_views(min(self.max_slots, self.seen))


# ---------------------------------------------------------------------------------------------
# per-head groups
@dataclass
class HeadGroup:
    """The keys of some KV heads of a layer, as their own cache layer returned them."""

    kv_heads: tuple[int, ...]  # the layer's KV heads in this group, ascending
    pattern: Pattern  # their rule, with the group's heads numbered from 0
    keys: torch.Tensor
    values: torch.Tensor
    inputs: AttentionInputs | None  # None: a full-history layer (slot = token, padding included)


@dataclass
class GroupedInputs:
    """What the attention function needs from a :class:`HeadGroupsLayer` update: one entry per group,
    and how query heads map to them (``group_size = Hq // Hkv`` query heads per KV head)."""

    keys: torch.Tensor
    groups: list[HeadGroup] = field(default_factory=list)

    def matches(self, key: torch.Tensor) -> bool:
        return self.keys is key or tuple(self.keys.shape) == tuple(key.shape)

    @staticmethod
    def _runs(heads: tuple[int, ...]) -> list[tuple[int, int]]:
        """Contiguous runs ``[start, stop)`` of ascending head indices."""
        runs, start = [], heads[0]
        for a, b in zip(heads, heads[1:] + (None,)):
            if b != a + 1:
                runs.append((start, a + 1))
                start = b
        return runs

    def queries(self, query: torch.Tensor, group: HeadGroup, kv_heads: int) -> torch.Tensor:
        """The query heads ``[B, Hq_g, Tq, D]`` of ``group``'s KV heads (a view when they are contiguous)."""
        per = query.shape[1] // kv_heads
        parts = [query[:, a * per : b * per] for a, b in self._runs(group.kv_heads)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def join(self, outputs: list[torch.Tensor], kv_heads: int) -> torch.Tensor:
        """The groups' outputs ``[B, Tq, Hq_g, D]`` joined in head order into ``[B, Tq, Hq, D]``."""
        pieces = []
        for group, out in zip(self.groups, outputs):
            per = out.shape[2] // len(group.kv_heads)
            at = 0
            for a, b in self._runs(group.kv_heads):
                pieces.append((a, out[:, :, at : at + (b - a) * per]))
                at += (b - a) * per
        pieces.sort(key=lambda p: p[0])
        return torch.cat([p for _, p in pieces], 2).contiguous()


def _depends_on_head(pattern: Pattern) -> bool:
    """True when a head's rule may depend on its index (extra random blocks are drawn per KV head), or is
    unknown (a predicate-only pattern): such a head cannot be renumbered inside a group."""
    prims = pattern.primitives()
    return prims is None or bool(prims.random_blocks)


def head_groups(pattern: Pattern, kv_heads: int) -> list[tuple[tuple[int, ...], Pattern]]:
    """The KV heads of a layer grouped by what their pattern keeps (:meth:`~hf_sparse.Pattern.cache_policy`),
    each group with its rule (heads numbered from 0 inside the group), in order of first head.

    A pattern that does not differ per head, or a plan whose heads all keep the same, is one group. So is
    a plan with a head whose rule depends on its index (BigBird's random blocks): it keeps the layer's
    longest policy for every head, as a layer without groups does.
    """
    every = tuple(range(kv_heads))
    pattern_of = getattr(pattern, "pattern_of", None)
    if not pattern.per_head or pattern_of is None:
        return [(every, pattern)]
    pats = [pattern_of(h) for h in every]
    by_policy: dict = {}
    for h, p in enumerate(pats):
        by_policy.setdefault(p.cache_policy(), []).append(h)
    if len(by_policy) == 1 or any(_depends_on_head(p) for p in pats):
        return [(every, pattern)]
    groups = []
    for heads in by_policy.values():
        first = pats[heads[0]]
        others = tuple((i, pats[h]) for i, h in enumerate(heads) if pats[h] != first)
        groups.append((tuple(heads), PerHead(first, others) if others else first))
    return sorted(groups, key=lambda g: g[0][0])


class HeadGroupsLayer(PositionedLayer):
    """One layer's cache kept per group of KV heads (:func:`head_groups`): each group is a cache layer
    of its own over its heads only (bounded for window heads, full history for dense ones).

    ``update`` splits the new keys by group, updates each group's layer and returns the new keys
    themselves; the attention function reads each group's keys from :meth:`take_attention_inputs`
    (a :class:`GroupedInputs`) and runs once per group.
    """

    def __init__(self, groups: list[tuple[tuple[int, ...], Pattern, CacheLayerMixin]], kv_heads: int):
        super().__init__()
        covered = sorted(h for heads, _, _ in groups for h in heads)
        if covered != list(range(kv_heads)):
            raise ValueError(f"HeadGroupsLayer: the groups must cover KV heads 0..{kv_heads - 1} once each, got "
                             f"{[heads for heads, _, _ in groups]}")
        self.groups = groups
        self.kv_heads = kv_heads

    def __repr__(self) -> str:
        inner = ", ".join(f"{list(heads)}: {layer!r}" for heads, _, layer in self.groups)
        return f"HeadGroupsLayer({inner})"

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return all(layer.is_compileable for _, _, layer in self.groups)

    @property
    def layers(self) -> list[CacheLayerMixin]:
        return [layer for _, _, layer in self.groups]

    def _split(self, x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        parts = [x[:, a:b] for a, b in GroupedInputs._runs(heads)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for heads, _, layer in self.groups:
            layer.lazy_initialization(self._split(key_states, heads), self._split(value_states, heads))
        self.is_initialized = True

    def prepare(self, padding: torch.Tensor | None) -> None:
        super().prepare(padding)
        for layer in self.layers:
            if isinstance(layer, PositionedLayer):
                layer.prepare(padding)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._padding = None
        parts = []
        for heads, pattern, layer in self.groups:
            keys, values = layer.update(self._split(key_states, heads), self._split(value_states, heads))
            inputs = layer.take_attention_inputs() if isinstance(layer, PositionedLayer) else None
            parts.append(HeadGroup(heads, pattern, keys, values, inputs))
        self.is_initialized = True
        self._attention = GroupedInputs(key_states, parts)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.layers[0].get_mask_sizes(query_length)

    def get_seq_length(self):
        return self.layers[0].get_seq_length()

    def get_max_length(self) -> int:
        return self.layers[0].get_max_length()

    def get_max_cache_shape(self) -> int:  # transformers 5.17 still calls it in places
        return self.get_max_length()

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:  # every group can, or none is touched
            if hasattr(layer, "check_crop"):
                layer.check_crop(tokens_to_remove)
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def activate_past_recording(self, **kwargs) -> None:
        activate_recording(self.layers, **kwargs)

    @property
    def record_past(self) -> bool:
        return any(getattr(layer, "record_past", False) for layer in self.layers)

    @record_past.setter
    def record_past(self, value: bool) -> None:  # generate switches recording off when it hands the cache back
        for layer in self.layers:
            if hasattr(layer, "record_past"):
                layer.record_past = value

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return all(layer.is_croppable for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def nbytes(self) -> int:
        return sum(layer_bytes(layer) for layer in self.layers)

    def position_bound(self) -> int:
        layer = self.layers[0]
        return layer.position_bound() if isinstance(layer, PositionedLayer) else layer.get_seq_length() - 1

    def fits(self, pattern: Pattern) -> bool:
        groups = head_groups(pattern, self.kv_heads)
        return [g[0] for g in groups] == [g[0] for g in self.groups] and all(
            _keeps(layer, p) for (_, p), (_, _, layer) in zip(groups, self.groups))

    def live_tokens(self) -> list[int]:
        """:meth:`SparseWindowLayer.live_tokens` of each group (the full history for full-history groups)."""
        return [layer.live_tokens() if hasattr(layer, "live_tokens") else layer.get_seq_length()
                for layer in self.layers]


def activate_recording(layers, **kwargs) -> None:
    """``activate_past_recording`` on each of ``layers`` that has it."""
    for layer in layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording(**kwargs)


def _keeps(layer: CacheLayerMixin, pattern: Pattern) -> bool:
    return layer.fits(pattern) if isinstance(layer, PositionedLayer) else not getattr(layer, "is_sliding", False)


def window_layer_fits(layer: PositionedLayer, pattern: Pattern) -> bool:
    """Whether ``layer`` keeps every key that ``pattern`` lets a later query see."""
    return layer.fits(pattern)


# ---------------------------------------------------------------------------------------------
# building the layers
def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_heads_of(config) -> int:
    text = _text_config(config)
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def _one_layer(pattern: Pattern) -> CacheLayerMixin:
    policy = pattern.cache_policy()
    if policy is None:
        return DynamicLayer()
    sinks, window = policy
    return SparseWindowLayer(window=window, sinks=sinks)


def cache_layer_for(pattern: Pattern, kv_heads: int = 1) -> CacheLayerMixin:
    """The cache layer a patched layer gets, from :meth:`~hf_sparse.Pattern.cache_policy`: bounded (sinks and
    a window) when later queries see only those, else the full history; per group of KV heads
    (:class:`HeadGroupsLayer`) when the heads of a per-head plan keep different amounts."""
    groups = head_groups(pattern, kv_heads)
    if len(groups) == 1:
        return _one_layer(pattern)
    return HeadGroupsLayer([(heads, p, _one_layer(p)) for heads, p in groups], kv_heads)


def _num_layers(config) -> int:
    return _text_config(config).num_hidden_layers


def install_sparse_layers(cache, config, layer_for=None) -> None:
    """Give the patched layers of an empty cache their :func:`cache_layer_for` layer, in place.

    Unpatched layers keep what the cache has (the model's own full or sliding layers). Raises if a
    patched layer already holds tokens: a cache cannot be converted once filled. ``layer_for(pattern,
    kv_heads)``: another layer factory (the static one of :mod:`hf_sparse.patches.static_cache`).
    """
    opts = options_of(config)
    n = _num_layers(config)
    kv_heads = kv_heads_of(config)
    layer_for = layer_for or cache_layer_for
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
        layers[i] = layer_for(opts.pattern_for(i), kv_heads)


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

    def activate_past_recording(self, **kwargs) -> None:
        """Make every layer that can record its updates until the next ``crop`` (see the module docstring):
        ``generate`` calls it before assisted decoding from transformers 5.15 on; call it yourself before
        rolling back on older releases."""
        activate_recording(self.layers, **kwargs)


def layer_bytes(layer) -> int:
    """Bytes one cache layer holds for keys and values (and positions; allocated capacity included)."""
    if isinstance(layer, PositionedLayer):
        return layer.nbytes()
    tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def cache_bytes(cache) -> int:
    """Bytes held by the KV tensors of a transformers cache: bounded layers at their full capacity, per-head
    groups each at its own size, static layers as allocated."""
    return sum(layer_bytes(layer) for layer in getattr(cache, "layers", []))


def generated_cache(out):
    """The cache of a ``generate(..., return_dict_in_generate=True)`` output (transformers 5.24 names it
    ``cache``, 5.17 ``past_key_values``)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values
