"""Cost of a pattern: attention density, wall time and peak memory of a unit."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from hf_sparse import Pattern, attended_pairs
from hf_sparse.head_plan import HeadPlan
from hf_sparse.layout import random_block_size
from hf_sparse.primitives import DENSE_WINDOW

__all__ = ["density", "plan_density", "dense_kv_heads", "CostMeter"]


@functools.lru_cache(maxsize=256)
def density(pattern: Pattern | None, length: int, kv_heads: int = 1) -> float:
    """Attended (query, key) pairs over dense causal pairs ``L (L + 1) / 2`` per KV head, for layer 0.

    ``None`` (the unpatched model) is 1.0. Random blocks differ per layer and head; layer 0 over all
    KV heads stands for the model (the counts of other layers differ by a few blocks at most).
    """
    if pattern is None:
        return 1.0
    if not (pattern.per_head or random_block_size(pattern)):
        kv_heads = 1  # every head attends the same pairs
    pairs = attended_pairs(pattern, length, kv_heads=kv_heads)
    return pairs / (kv_heads * length * (length + 1) / 2)


def plan_density(target: Pattern | HeadPlan | None, length: int, kv_heads: int = 1) -> float:
    """:func:`density` of a pattern, or of a head plan: its dense and its streaming heads' densities weighted
    by how many heads run each."""
    if not isinstance(target, HeadPlan):
        return density(target, length, kv_heads)
    n, total = len(target.dense_heads), target.total_heads
    return (n * density(target.dense_pattern, length, kv_heads)
            + (total - n) * density(target.streaming, length, kv_heads)) / total


def dense_kv_heads(target: Pattern | HeadPlan | None, num_layers: int, kv_heads: int) -> int:
    """How many KV heads of the model (all layers) attend densely: all of them unpatched (``None``) or under
    ``dense``, a plan's dense heads, else the heads whose rules reach every earlier key, in every layer."""
    if target is None:
        return num_layers * kv_heads
    if isinstance(target, HeadPlan):
        return len(target.dense_heads)
    # through the pattern protocol: a head is dense when its band reaches every earlier key
    return num_layers * sum(p is not None and p.window >= DENSE_WINDOW for p in target.head_primitives(kv_heads))


def _rss_max_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class CostMeter:
    """Times a block and reads its peak memory.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` during the block (reset on entry). The CPU
    has no per-block peak without extra dependencies, so there ``peak_mem_bytes`` is None and
    ``rss_max_bytes`` is the process's resident-set high-water mark so far (it only grows).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.peak_mem_bytes: int | None = None
        self.rss_max_bytes: int | None = None

    def __enter__(self) -> CostMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mem_bytes = int(torch.cuda.max_memory_allocated(self.device))
        self.seconds = time.perf_counter() - self._t0
        self.rss_max_bytes = _rss_max_bytes()
