"""The kernel plan: a pattern's primitives as the Triton kernels' arguments (host side, cached).

The kernels never see a pattern class. They take rule values ``W, G, WB, S, CP, CC`` (token window,
global prefix, window blocks, stride, column period and count), a ``KIND`` constexpr whose bits say
which rules to compile in (see :mod:`hf_sparse.kernels.attention`), the block ``BLK`` and the number
``R`` of extra key blocks per query block. A per-head plan sets ``PER_HEAD`` and hands the kernels a
small ``[Hkv, 8]`` int32 table of each head's rule values, so every head runs in the same launch.
Its ``groups`` list the KV heads that share their rules, each with the uniform plan of its rule: the
backward runs one launch per group (see :func:`hf_sparse.kernels.configs.set_split_backward`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ..layout import random_block_size
from ..patterns import Pattern
from ..primitives import Primitives

__all__ = ["KernelPlan", "kernel_plan", "kernel_unfit", "head_table", "head_map"]

TOKEN_BAND, BLOCK_BAND, STRIDE, COLUMNS, RAND_MASKED = 1, 2, 4, 8, 16
_TOKEN_BLK = 256  # a token-only plan ignores BLK; it only has to be a multiple of every tile size


@dataclass(frozen=True)
class KernelPlan:
    kind: int  # KIND bits
    causal: bool
    blk: int
    r: int  # extra key blocks per query block (the width of the random table)
    rules: tuple[int, int, int, int, int, int]  # W, G, WB, S, CP, CC (head 0's for a per-head plan)
    per_head: tuple[tuple[int, ...], ...] | None  # every head's rules, when they differ
    g_max: int  # the longest global prefix of any head
    # per-head plans: (KV heads, their uniform plan) for each distinct rule set, in order of first head
    groups: tuple[tuple[tuple[int, ...], KernelPlan], ...] = ()

    @property
    def config_kind(self) -> int:
        """Which tile table serves this plan: 1 when rules work in blocks (tiles may not straddle one)."""
        return 1 if self.kind & BLOCK_BAND or self.r else 0


def _rules(p: Primitives) -> tuple[int, int, int, int, int, int]:
    return (p.window, p.global_tokens, p.window_blocks, p.stride, p.column_period, p.column_count)


def _bits(p: Primitives) -> int:
    bits = TOKEN_BAND if p.window else 0
    bits |= BLOCK_BAND if p.window_blocks else 0
    bits |= STRIDE if p.stride else 0
    bits |= COLUMNS if p.column_count else 0
    bits |= RAND_MASKED if p.random_blocks and not p.random_disjoint else 0
    return bits


def _signature(p: Primitives) -> tuple:
    """What the kernels compile and read of a head's rules (heads alike in it share a uniform launch)."""
    return _rules(p), _bits(p), p.random_blocks > 0, p.block if p.block_structured else 0


@functools.lru_cache(maxsize=256)
def _plan(pattern: Pattern, kv_heads: int) -> KernelPlan | str:
    heads = pattern.head_primitives(kv_heads) if pattern.per_head else (pattern.primitives(),)
    if any(p is None for p in heads):
        return (f"pattern {pattern.spec()!r} is defined by its predicate only; the kernels need its rules as "
                "hf_sparse.Primitives (Pattern.primitives()): it runs on backend='reference'")
    blocks = {p.block for p in heads if p.block_structured}
    if len(blocks) > 1:
        return f"the heads of {pattern.spec()!r} use blocks of different sizes {sorted(blocks)}; the kernels take one"
    plan = _plan_of(heads, pattern)
    if isinstance(plan, str) or plan.per_head is None:
        return plan
    members: dict[tuple, list[int]] = {}
    for h, p in enumerate(heads):
        members.setdefault(_signature(p), []).append(h)
    groups = []
    for hs in members.values():
        sub = _plan_of((heads[hs[0]],), pattern)
        if isinstance(sub, str):
            return sub
        # the random tables are the whole plan's: their width and block
        sub = replace(sub, r=plan.r if sub.r else 0, blk=plan.blk if sub.r else sub.blk)
        groups.append((tuple(hs), sub))
    return replace(plan, groups=tuple(groups))


def _plan_of(heads: tuple[Primitives, ...], pattern: Pattern) -> KernelPlan | str:
    """The plan of these heads' rules (one launch for all of them)."""
    blocks = {p.block for p in heads if p.block_structured}
    kind = 0
    for p in heads:
        kind |= _bits(p)
    if not kind & (TOKEN_BAND | BLOCK_BAND):
        kind |= TOKEN_BAND  # W = 0: an empty band, so the loops have a window range to start from
    if not pattern.causal and kind & TOKEN_BAND and kind & BLOCK_BAND:
        return f"non-causal {pattern.spec()!r} mixes a token band and a block band; the kernels merge them when causal"
    rules = [_rules(p) for p in heads]
    per_head = tuple(r + (0, 0) for r in rules) if len(set(rules)) > 1 else None
    return KernelPlan(kind=kind, causal=pattern.causal, blk=blocks.pop() if blocks else _TOKEN_BLK,
                      r=max(p.random_blocks for p in heads), rules=rules[0], per_head=per_head,
                      g_max=max(p.global_tokens for p in heads))


def kernel_unfit(pattern: Pattern, kv_heads: int) -> str | None:
    """``None`` when the kernels can run ``pattern`` with ``kv_heads`` KV heads, else the reason."""
    plan = _plan(pattern, kv_heads)
    return plan if isinstance(plan, str) else None


def kernel_plan(pattern: Pattern, kv_heads: int) -> KernelPlan:
    """The plan of ``pattern`` (cached); ``ValueError`` when the kernels cannot run it."""
    plan = _plan(pattern, kv_heads)
    if isinstance(plan, str):
        raise ValueError(plan)
    assert plan.r == 0 or random_block_size(pattern) == plan.blk
    return plan


@functools.lru_cache(maxsize=64)
def head_table(plan: KernelPlan, device: torch.device) -> torch.Tensor:
    """The ``[Hkv, 8]`` int32 rule table of a per-head plan (a one-element dummy otherwise)."""
    if plan.per_head is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return torch.tensor(plan.per_head, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def head_map(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The int32 list of KV heads one launch of a split plan covers."""
    return torch.tensor(heads, dtype=torch.int32, device=device)
