"""Sparse attention patterns: one module a pattern, each giving its predicate and its primitives.

Positions count real tokens from 0 (padding is not a position). The window convention is the one
of Hugging Face Mistral: a causal window ``W`` lets query ``i`` see key ``j`` when
``i - W < j <= i`` -- ``W`` keys, the query's own key included.

Built in: :class:`Dense`, :class:`SlidingWindow`, :class:`Longformer`, :class:`BigBird`,
:class:`Strided`, :class:`Fixed`; :class:`Union` (``a | b``) and :class:`PerHead` compose them. A new
pattern is a frozen dataclass subclass of :class:`Pattern` registered with :func:`register_pattern`
(see :mod:`hf_sparse.patterns.base` for the protocol).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..primitives import Primitives
from .base import (
    Pattern,
    ceil_div,
    check_options,
    option,
    option_ranges,
    parse_pattern,
    register_pattern,
    registered_patterns,
)
from .bigbird import BigBird, bigbird_random_blocks
from .dense import Dense
from .fixed import Fixed
from .longformer import Longformer
from .per_head import PerHead
from .sliding_window import SlidingWindow
from .strided import Strided
from .union import Union

__all__ = [
    "Pattern",
    "Primitives",
    "Dense",
    "SlidingWindow",
    "Longformer",
    "BigBird",
    "Strided",
    "Fixed",
    "Union",
    "PerHead",
    "parse_pattern",
    "register_pattern",
    "registered_patterns",
    "option",
    "check_options",
    "option_ranges",
    "bigbird_random_blocks",
    "ceil_div",
    "PATTERN_NAMES",
]

#: The built-in single patterns, by name.
PATTERN_NAMES = ("dense", "sliding_window", "longformer", "bigbird", "strided", "fixed")

# Every module of this package registers its pattern on import: a new built-in pattern is one module.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
