"""Context parallelism for sparse patterns: one long sequence sharded across ranks.

Each rank of a ``torch.distributed`` group holds a contiguous shard of the sequence (rank order =
sequence order) and calls :func:`sparse_attention` with its queries, keys and values; it gets its
shard of the output, equal to :func:`hf_sparse.sparse_attention` on the whole sequence, forward and
backward. Unlike ring attention, a rank receives only the keys its queries can see: the halo of
the window band from the ranks before it, the global prefix, and the random blocks its query blocks
draw -- ``O(W + globals + random blocks)`` per rank, not ``O(T)`` (:mod:`.plan`).

No transformers import: :mod:`hf_sparse.patches.parallel` runs a patched Hugging Face model this way.
See docs/parallel.md for the recipe with ``torchrun`` and a 2-D data x context mesh.
"""

from __future__ import annotations

from .attention import resolve_group, sparse_attention
from .plan import ShardPlan, balanced_lengths, shard_plan
from .views import CompactBlocks, Shifted, alignment

__all__ = ["sparse_attention", "shard_plan", "ShardPlan", "balanced_lengths", "alignment", "resolve_group",
           "Shifted", "CompactBlocks"]
