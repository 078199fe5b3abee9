"""Context parallel for a patched Hugging Face model: one long sequence sharded across ranks.

>>> patch_model(model, "sliding_window:window=4096")                 # doctest: +SKIP
>>> cp = context_parallel(model, group)                              # doctest: +SKIP
>>> out = model(**cp.shard(input_ids, labels=input_ids))             # this rank's tokens only
>>> out.loss.backward()                                              # then average gradients over ranks

Each rank runs the whole model on its contiguous shard of the sequence. Embeddings, norms, MLPs and
the projections are per token, so they run locally; RoPE gets the shard's absolute positions
(``position_ids``); attention runs :func:`hf_sparse.parallel.sparse_attention`, which fetches from the
other ranks only the keys the pattern lets this shard's queries see, and sends their gradients back
in the backward. Layers that ``patch_model(layers=...)`` left unpatched attend densely (or with the
model's own sliding window) through the same function, receiving every earlier shard.

How: :func:`context_parallel` registers an attention and a mask function under ``"hf_sparse_parallel"``
(``AttentionInterface`` / ``AttentionMaskInterface``) and switches the model to it with
``set_attn_implementation``; :meth:`ContextParallel.close` switches it back to ``"hf_sparse"``.
:meth:`ContextParallel.shard` cuts a batch of full sequences into this rank's part: ``input_ids``,
``position_ids``, ``use_cache=False`` and, given labels, ``shift_labels`` (the next token of each
position, taken before cutting, so the last token of a shard predicts the first of the next) with
``num_items_in_batch`` set so that the *mean* over ranks of the loss is the unsharded loss and the
mean of the gradients is the unsharded gradient -- what DDP and FSDP compute when the context ranks
are part of their data-parallel group (docs/parallel.md).

Not supported under context parallel: padding (pack or cut the sequences to one length), packed
documents (``cu_seq_lens``), a KV cache (training and scoring only), attention dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hf_sparse.parallel import alignment, balanced_lengths, resolve_group, sparse_attention
from hf_sparse.patterns import Dense, Pattern, SlidingWindow

from ._compat import AttentionInterface, AttentionMaskInterface
from .model import _attention_modules
from .options import ATTN_NAME, options_of

__all__ = ["PARALLEL_ATTN_NAME", "ContextParallel", "context_parallel", "hf_sparse_parallel_attention",
           "hf_sparse_parallel_mask"]

PARALLEL_ATTN_NAME = "hf_sparse_parallel"
_STATE = "hf_sparse_context_parallel"  # attribute of each attention module while the model runs sharded


@dataclass
class _State:
    group: object
    lengths: tuple[int, ...] | None = None


def _state_of(module) -> _State:
    state = vars(module).get(_STATE)
    if state is None:
        raise RuntimeError(
            f"config._attn_implementation is {PARALLEL_ATTN_NAME!r} but this attention module has no context-parallel "
            "group; switch models with hf_sparse.patches.parallel.context_parallel(model, group), not by hand"
        )
    return state


def _layer_pattern(module, sliding_window: int | None) -> Pattern:
    opts = options_of(module.config)
    if opts.patches(module.layer_idx):
        return opts.pattern_for(module.layer_idx)
    # a layer patch_model(layers=...) left alone: the model's own attention, sharded like the others
    return SlidingWindow(window=int(sliding_window)) if sliding_window else Dense()


def hf_sparse_parallel_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, sliding_window: int | None = None,
                                 softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"hf_sparse_parallel"``: ``query [B, Hq, T_rank, D]`` of this rank's
    shard -> ``([B, T_rank, Hq, D], None)``, see the module docstring."""
    state = _state_of(module)
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            f"hf_sparse context parallel: layer {module.layer_idx} got {key.shape[2]} keys for {query.shape[2]} queries "
            "(a KV cache); context parallel runs training and scoring forwards: pass use_cache=False"
        )
    if dropout:
        raise NotImplementedError(f"hf_sparse context parallel: attention dropout ({dropout}) is not supported; set "
                                  "config.attention_dropout = 0.0")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise NotImplementedError("hf_sparse context parallel: packed documents (cu_seq_lens) are not supported; "
                                  "give one sequence per row")
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    out = sparse_attention(query, key, value, _layer_pattern(module, sliding_window), group=state.group,
                           shard_lengths=state.lengths, scale=scaling, softcap=softcap, layer=module.layer_idx,
                           backend=options_of(module.config).backend)
    return out.transpose(1, 2).contiguous(), None


def hf_sparse_parallel_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                            mask_function=None, attention_mask: torch.Tensor | None = None, config=None, **kwargs):
    """Mask builder registered as ``"hf_sparse_parallel"``: no mask (the pattern is the mask); refuses padding."""
    if kwargs.get("use_vmap"):
        raise NotImplementedError("hf_sparse context parallel: this model adds a custom mask function, which a "
                                  "sparse pattern cannot express")
    if attention_mask is not None and not torch.compiler.is_compiling():
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or not bool(attention_mask.all()):
            raise ValueError(
                "hf_sparse context parallel takes sequences without padding (attention_mask all ones or None); pad "
                "nothing: cut or pack the sequences to one length before sharding"
            )
    return None


def register() -> None:
    """Register the attention and mask functions under ``"hf_sparse_parallel"`` (idempotent, global)."""
    AttentionInterface.register(PARALLEL_ATTN_NAME, hf_sparse_parallel_attention)
    AttentionMaskInterface.register(PARALLEL_ATTN_NAME, hf_sparse_parallel_mask)


class ContextParallel:
    """A patched model running sharded over ``group`` (made by :func:`context_parallel`)."""

    def __init__(self, model, group):
        self.model = model
        self.group = resolve_group(group)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._state = _State(self.group)
        opts = options_of(model.config)
        layers = range(model.config.num_hidden_layers)
        #: shard boundaries fall on multiples of this (the patterns' block or column period), so every rank
        #: attends to its own keys while the halo travels
        self.multiple_of = math.lcm(*(alignment(opts.pattern_for(i)) for i in layers if opts.patches(i)), 1)

    @property
    def lengths(self) -> tuple[int, ...] | None:
        """The shard lengths of the last :meth:`shard` (every rank's, in rank order)."""
        return self._state.lengths

    def shard(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
              multiple_of: int | None = None) -> dict:
        """This rank's part of a batch of full sequences ``input_ids [B, N]`` (the same on every rank), as
        keyword arguments of the model's forward. See the module docstring for what the keys hold."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"shard: input_ids must be [batch, tokens] full sequences, got {got}")
        b, n = input_ids.shape
        lengths = balanced_lengths(n, self.world, multiple_of=multiple_of or self.multiple_of)
        s = sum(lengths[: self.rank])
        e = s + lengths[self.rank]
        self._state.lengths = lengths
        positions = torch.arange(s, e, device=input_ids.device).expand(b, -1).contiguous()
        batch = {"input_ids": input_ids[:, s:e].contiguous(), "position_ids": positions, "use_cache": False}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"shard: labels {tuple(labels.shape)} must have the shape of input_ids {(b, n)}")
            shift = torch.full_like(labels, -100)
            shift[:, :-1] = labels[:, 1:]
            items = (shift != -100).sum()
            batch.update(labels=labels[:, s:e].contiguous(), shift_labels=shift[:, s:e].contiguous(),
                         num_items_in_batch=items.float() / self.world)
        return batch

    def close(self) -> None:
        """Switch the model back to (unsharded) ``"hf_sparse"`` attention."""
        for m in _attention_modules(self.model):
            vars(m).pop(_STATE, None)
        if self.model.config._attn_implementation == PARALLEL_ATTN_NAME:
            self.model.set_attn_implementation(ATTN_NAME)

    def __enter__(self) -> ContextParallel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def context_parallel(model, group=None) -> ContextParallel:
    """Run a model patched by :func:`hf_sparse.patch_model` with its sequences sharded over ``group`` (a
    ``ProcessGroup``, a one-dimensional ``DeviceMesh`` such as ``mesh["cp"]``, or ``None`` for the default
    group). Returns a :class:`ContextParallel`, also a context manager that switches back on exit."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in (ATTN_NAME, PARALLEL_ATTN_NAME) or not isinstance(getattr(config, "hf_sparse", None), dict):
        raise ValueError(f"context_parallel needs a model patched with hf_sparse.patch_model(model, pattern) first "
                         f"(its attention implementation is {current!r})")
    cp = ContextParallel(model, group)
    register()
    model.set_attn_implementation(PARALLEL_ATTN_NAME)
    if model.config._attn_implementation != PARALLEL_ATTN_NAME:
        raise RuntimeError(f"set_attn_implementation({PARALLEL_ATTN_NAME!r}) left {type(model).__name__} on "
                           f"{model.config._attn_implementation!r}")
    for m in _attention_modules(model):
        vars(m)[_STATE] = cp._state
    return cp
