"""The Hugging Face adapter (import name ``hf_sparse.patches``): everything that touches transformers.

>>> from hf_sparse.patches import patch_model, unpatch_model
>>> patch_model(model, "longformer:window=1024,global_tokens=4")   # doctest: +SKIP

See :mod:`hf_sparse.patches.model` for what patching does, :mod:`hf_sparse.patches.attention` for the
registered functions, :mod:`hf_sparse.patches.cache` for the bounded KV cache that ``generate`` uses
(``SparseCache``), :mod:`hf_sparse.patches.static_cache` for its fixed-shape form (``SparseStaticCache``,
``cache_implementation="static"``, compiled decode) and :mod:`hf_sparse.patches.history` for how
patched layers get their cache layers.
Importing this package needs transformers >= 5.4 and registers the ``"hf_sparse"`` backend (``import
hf_sparse`` imports it as soon as transformers is loaded), so ``from_pretrained(path,
attn_implementation="hf_sparse")`` restores a pattern saved with the model.
"""

from __future__ import annotations

from ._compat import MIN_TRANSFORMERS  # noqa: F401  (raises a clear ImportError on transformers < 5.4)
from .attention import ATTN_NAME, HybridMask, hf_sparse_attention, hf_sparse_mask
from .cache import HeadGroupsLayer, SparseCache, SparseWindowLayer
from .model import (
    SUPPORTED_MODEL_TYPES,
    StoredPatternWarning,
    install_load_hook,
    native_fields,
    patch_model,
    register,
    unpatch_model,
)
from .static_cache import SparseStaticCache, StaticWindowLayer

register()
install_load_hook()  # models built with attn_implementation="hf_sparse" get what patch_model gives them

__all__ = [
    "patch_model",
    "unpatch_model",
    "register",
    "native_fields",
    "ATTN_NAME",
    "SUPPORTED_MODEL_TYPES",
    "StoredPatternWarning",
    "HybridMask",
    "hf_sparse_attention",
    "hf_sparse_mask",
    "SparseCache",
    "SparseWindowLayer",
    "HeadGroupsLayer",
    "SparseStaticCache",
    "StaticWindowLayer",
]
