"""Host launchers for the Triton kernels (host logic only: shapes, tables, grids, configs).

``forward`` returns ``(out, lse)`` and ``backward`` returns ``(dq, dk, dv)`` for any pattern whose rules
are :class:`~hf_sparse.primitives.Primitives` (read through :mod:`.plan`, never by pattern class); ``forward`` hands calls with few queries to the decode kernel
(:mod:`hf_sparse.kernels.decode`), which also serves ``decode_forward`` (keys by explicit positions)
and ``ring_append`` (one decode step's write into a bounded cache). Nothing here allocates more than ``O(T * D)`` per head: the only tables
are the extra (random) blocks ``[Hkv, num_q_blocks, R]`` and their reverse (CSR) form, and a per-head
plan's ``[Hkv, 8]`` rule table.
"""

from __future__ import annotations

from .decoding import decode_forward, ring_append
from .gradients import backward
from .launch import _tma_compatible
from .plan import kernel_plan, kernel_unfit
from .prefill import forward

__all__ = ["forward", "backward", "decode_forward", "ring_append", "kernel_plan", "kernel_unfit", "_tma_compatible"]
