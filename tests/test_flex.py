"""FlexAttention export against the dense oracle: ``block_mask`` and ``Pattern.mask_mod`` (eager, CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import pid

from hf_sparse import (
    BigBird,
    Dense,
    Fixed,
    Longformer,
    PerHead,
    SlidingWindow,
    Strided,
    block_mask,
    sparse_attention,
)

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = [
    Dense(),
    SlidingWindow(window=9),
    Longformer(window=7, global_tokens=3),
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
    Strided(stride=5, window=3),
    Fixed(block=16, summary=3),
    Fixed(block=6, summary=2),  # predicate only: its allowed() is the mask_mod
    SlidingWindow(window=9) | Strided(stride=7, window=1),
    SlidingWindow(window=30) | BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=2),
    PerHead(SlidingWindow(window=6), ((0, Dense()), (1, Strided(stride=4, window=2)))),
    SlidingWindow(window=5, causal=False),
    BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False),
]


def _oracle_mask(pattern, t, hkv, layer=0):
    q = torch.arange(t).view(1, -1, 1)
    k = torch.arange(t).view(1, 1, -1)
    return pattern.allowed(q, k, layer=layer, kv_head=torch.arange(hkv).view(-1, 1, 1), num_keys=t).expand(hkv, t, t)


@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_mask_mod_equals_allowed(pattern):
    # the rules-based mask_mod (what Flex compiles) evaluated on every pair, per query head
    t, hq, hkv = 70, 4, 2
    mm = pattern.mask_mod(layer=3, kv_heads=hkv, group=hq // hkv, num_keys=t)
    q = torch.arange(t).view(1, -1, 1)
    k = torch.arange(t).view(1, 1, -1)
    want = _oracle_mask(pattern, t, hkv, layer=3).repeat_interleave(hq // hkv, 0)
    got = torch.stack([mm(0, torch.tensor(h), q[0], k[0]) for h in range(hq)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_flex_with_block_mask_equals_oracle(pattern):
    b, hq, hkv, t, d = 1, 4, 2, 64, 16
    torch.manual_seed(0)
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    bm = block_mask(pattern, t, t, heads=hq, kv_heads=hkv, block_size=16)
    got = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    want = sparse_attention(q, k, v, pattern, backend="dense")
    assert (got - want).abs().max() < 1e-5
