"""hf-sparse: sparse attention for pretrained Hugging Face decoders.

The core (this package) has no ``transformers`` import; :func:`patch_model` and
:func:`unpatch_model` live in :mod:`hf_sparse.patches` and are loaded on first use. Once transformers
itself is loaded, :mod:`hf_sparse.patches` is imported too, which registers the ``"hf_sparse"``
attention backend, so ``from_pretrained(path, attn_implementation="hf_sparse")`` restores a saved
pattern (:mod:`hf_sparse._autoregister`).
"""

from __future__ import annotations

from . import _autoregister
from .flex import block_mask
from .head_plan import HeadPlan, load_plan
from .layout import attended_pairs, block_layout, key_ranges
from .ops import merge_attention, sparse_attention
from .patterns import (
    BigBird,
    Dense,
    Fixed,
    Longformer,
    Pattern,
    PerHead,
    Primitives,
    SlidingWindow,
    Strided,
    Union,
    parse_pattern,
    register_pattern,
    registered_patterns,
)

__version__ = "0.1.0"

_autoregister.install()

__all__ = [
    "Pattern",
    "Dense",
    "SlidingWindow",
    "Longformer",
    "BigBird",
    "Strided",
    "Fixed",
    "Union",
    "PerHead",
    "Primitives",
    "parse_pattern",
    "register_pattern",
    "registered_patterns",
    "sparse_attention",
    "merge_attention",
    "block_layout",
    "key_ranges",
    "attended_pairs",
    "block_mask",
    "HeadPlan",
    "load_plan",
    "patch_model",
    "unpatch_model",
]


def __getattr__(name: str):
    if name in ("patch_model", "unpatch_model"):
        from . import patches

        return getattr(patches, name)
    raise AttributeError(f"module 'hf_sparse' has no attribute {name!r}")
