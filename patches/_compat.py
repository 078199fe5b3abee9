"""The few places where transformers 5.x versions differ, and the version gate.

Checked against transformers 5.4, 5.17, 5.24 and 5.25. 5.4 is the floor: it is the first release whose
``create_causal_mask`` calls mask functions with ``q_length`` / ``q_offset`` (5.0-5.3 pass ``cache_position``,
and the cache layers' ``get_mask_sizes`` took it too), which :func:`hf_sparse_mask` and the bounded cache
layers implement. Everything else in :mod:`hf_sparse.patches` uses public
or long-stable names (``AttentionInterface``, ``AttentionMaskInterface``, ``set_attn_implementation``,
``cache_utils.DynamicLayer``), except the private names used below, each pinned by a test in
``tests/test_compat.py`` that fails when transformers changes it.
"""

from __future__ import annotations

import sys

try:
    import transformers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hf_sparse.patches needs transformers>=5.4 (pip install 'hf-sparse[hf]'); the core "
        "(hf_sparse.sparse_attention) works without it"
    ) from err

from packaging.version import Version

MIN_TRANSFORMERS = "5.4"


def check_transformers_version(version: str) -> None:
    """Raise a clear ``ImportError`` for transformers older than 5.4 (no registries before 5.0, another mask
    interface before 5.4)."""
    if Version(version).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(
            f"hf_sparse.patches needs transformers>={MIN_TRANSFORMERS} (its AttentionInterface/AttentionMaskInterface "
            f"registries, set_attn_implementation, and mask functions called with q_length); found transformers "
            f"{version}. Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


check_transformers_version(transformers.__version__)

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

__all__ = [
    "transformers",
    "check_transformers_version",
    "AttentionInterface",
    "AttentionMaskInterface",
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "eager_attention_for",
    "cache_of",
    "attentions_requested",
]


def eager_attention_for(module) -> object:
    """The ``eager_attention_forward`` of ``module``'s own modeling file.

    In 5.17 and 5.24 alike, modeling files look their backend up with
    ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)``: "eager" is not in the
    registry, each family brings its own eager function (Gemma 2's applies the logit soft-capping).
    """
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def cache_of(kwargs: dict):
    """The KV cache an attention module's forward was called with: ``cache=`` (5.24) or ``past_key_values=`` (5.17)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def attentions_requested() -> bool:
    """Whether the running forward was asked for ``output_attentions``.

    transformers 5.x no longer passes ``output_attentions`` to the attention function: the model's
    ``capture_outputs`` decorator puts the outputs to collect into a context variable
    (``utils.output_capturing._active_collector``, private, 5.4 through 5.25) and a forward hook on each
    attention module records its second return value. ``tests/test_compat.py`` pins this.
    """
    from transformers.utils import output_capturing

    collected = output_capturing._active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected
