"""Block layouts against ``Pattern.allowed``: key ranges cover every allowed pair, tiles are exact,
``kv_full`` tiles need no mask, pair counts are exact, and the transpose matches the kv lists."""

from __future__ import annotations

import pytest
import torch
from helpers import COMPOSED, pid

from hf_sparse import (
    BigBird,
    Dense,
    Longformer,
    SlidingWindow,
    Union,
    attended_pairs,
    block_layout,
    key_ranges,
)
from hf_sparse.layout import random_block_size, random_key_blocks, rule_sets

pytestmark = pytest.mark.usefixtures("one_thread")



PATTERNS = [
    Dense(),
    Dense(causal=False),
    SlidingWindow(window=1),
    SlidingWindow(window=5),
    SlidingWindow(window=40),
    SlidingWindow(window=200),  # >= T
    SlidingWindow(window=6, causal=False),
    Longformer(window=9, global_tokens=3),
    Longformer(window=4, global_tokens=0),
    Longformer(window=3, global_tokens=20),  # more global tokens than the window
    Longformer(window=9, global_tokens=3, causal=False),
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
    BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=0),
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2, causal=False),
    *COMPOSED,
]


def allowed_mask(pattern, t_q: int, t_k: int, *, q_offset: int = 0, kv_heads: int = 1, layer: int = 0):
    """``[H, Tq, Tk]``: the token-level truth."""
    q = q_offset + torch.arange(t_q).view(1, -1, 1)
    k = torch.arange(t_k).view(1, 1, -1)
    heads = torch.arange(kv_heads).view(-1, 1, 1)
    return pattern.allowed(q, k, layer=layer, kv_head=heads, num_keys=t_k).expand(kv_heads, t_q, t_k)


def random_mask(pattern, t: int, layer: int = 0, kv_heads: int = 1) -> torch.Tensor:
    """``[T, T]``: key ``k`` lies in one of the extra (random) blocks of query ``q`` for some KV head."""
    out = torch.zeros(t, t, dtype=torch.bool)
    b = random_block_size(pattern)
    if not b:
        return out
    for qb in range(-(-t // b)):
        for kb in random_key_blocks(pattern, layer=layer, kv_heads=kv_heads, q_block=qb, num_keys=t).flatten().tolist():
            if kb >= 0:
                out[qb * b : (qb + 1) * b, kb * b : (kb + 1) * b] = True
    return out


def reaches_everywhere(pattern) -> bool:
    """Strides, key columns and predicate-only rules: key_ranges gives the whole prefix (a superset)."""
    return any(p is None or p.stride or p.column_count for p in rule_sets(pattern))


# ---------------------------------------------------------------------------------------------
# key_ranges
@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
@pytest.mark.parametrize("chunk", [1, 7, 16, 64], ids=lambda c: f"C{c}")
def test_key_ranges_cover_allowed_keys(pattern, chunk):
    t = 100
    mask = allowed_mask(pattern, t, t, kv_heads=3).any(0)  # ranges serve every KV head
    local = mask & ~random_mask(pattern, t, kv_heads=3)  # key_ranges leaves the random blocks out
    for q_lo in range(0, t, chunk):
        q_hi = min(q_lo + chunk, t)
        ranges = key_ranges(pattern, q_lo, q_hi, t)
        # sorted, disjoint, non-empty, inside [0, t)
        for lo, hi in ranges:
            assert 0 <= lo < hi <= t, ranges
        for (_, hi0), (lo1, _) in zip(ranges, ranges[1:]):
            assert hi0 < lo1, f"ranges {ranges} overlap or touch"
        covered = torch.zeros(t, dtype=torch.bool)
        for lo, hi in ranges:
            covered[lo:hi] = True
        needed = local[q_lo:q_hi].any(0)
        missing = (needed & ~covered).nonzero().flatten().tolist()
        assert not missing, f"queries [{q_lo}, {q_hi}): keys {missing[:8]} allowed but not in {ranges}"
        # and the ranges are tight: every listed key is seen by some query of the run
        if reaches_everywhere(pattern):
            continue
        # (in a union, a random block may also lie inside another member's range)
        seen = mask[q_lo:q_hi].any(0) if isinstance(pattern, Union) else needed
        extra = (covered & ~seen).nonzero().flatten().tolist()
        assert not extra, f"queries [{q_lo}, {q_hi}): keys {extra[:8]} listed but never seen"


def test_key_ranges_empty_and_clipped():
    p = SlidingWindow(window=4)
    assert key_ranges(p, 5, 5, 10) == []
    assert key_ranges(p, 0, 3, 10) == [(0, 3)]
    assert key_ranges(p, 8, 10, 6) == [(5, 6)]  # clipped to the keys that exist
    assert key_ranges(Longformer(window=2, global_tokens=2), 10, 12, 12) == [(0, 2), (9, 12)]


# ---------------------------------------------------------------------------------------------
# block_layout
LAYOUT_CASES = [
    # (num_queries, num_keys, block_m, block_n, q_offset, kv_heads)
    (100, 100, 16, 16, 0, 1),
    (77, 77, 32, 16, 0, 2),
    (63, 63, 16, 32, 0, 1),
    (20, 90, 16, 16, 70, 2),  # a chunk of queries after cached keys
    (1, 50, 16, 16, 49, 1),  # one decode step
]


def _case_id(c):
    tq, tk, bm, bn, off, h = c
    return f"TQ{tq}-TK{tk}-BM{bm}-BN{bn}-OFF{off}-HKV{h}"


@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=_case_id)
def test_block_layout_matches_allowed(pattern, case, request):
    tq, tk, bm, bn, off, heads = case
    layer = 1
    lay = block_layout(pattern, tq, tk, block_m=bm, block_n=bn, kv_heads=heads, layer=layer, q_offset=off)
    mask = allowed_mask(pattern, tq, tk, q_offset=off, kv_heads=heads, layer=layer)
    nqt, nkt = -(-tq // bm), -(-tk // bn)
    assert lay.kv_count.shape == (heads, nqt)
    assert lay.kv_index.shape[:2] == (heads, nqt) and lay.kv_index.shape == lay.kv_full.shape
    assert lay.pairs.tolist() == mask.sum(dim=(1, 2)).tolist()
    for h in range(heads):
        for m in range(nqt):
            n = int(lay.kv_count[h, m])
            tiles = lay.kv_index[h, m, :n].tolist()
            assert (lay.kv_index[h, m, n:] == -1).all() and not lay.kv_full[h, m, n:].any()
            assert tiles == sorted(set(tiles)) and all(0 <= t < nkt for t in tiles)
            rows = mask[h, m * bm : (m + 1) * bm]
            # exact: a tile is listed iff some pair in it is allowed
            want = [t for t in range(nkt) if rows[:, t * bn : (t + 1) * bn].any()]
            assert tiles == want, f"head {h}, query tile {m}: listed {tiles}, needed {want}"
            for slot, t in enumerate(tiles):
                sub = rows[:, t * bn : (t + 1) * bn]
                complete = sub.shape == (bm, bn)
                assert bool(lay.kv_full[h, m, slot]) == (complete and bool(sub.all())), (
                    f"head {h}, tile ({m}, {t}): kv_full={bool(lay.kv_full[h, m, slot])} but "
                    f"complete={complete}, all allowed={bool(sub.all())}"
                )


@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_block_layout_transpose(pattern, request):
    tq = tk = 100
    lay = block_layout(pattern, tq, tk, block_m=16, block_n=32, kv_heads=2)
    nkt = -(-tk // 32)
    q_count, q_index = lay.transpose(nkt)
    assert q_count.shape == (2, nkt) and q_index.shape[:2] == (2, nkt)
    for h in range(2):
        for kt in range(nkt):
            want = [m for m in range(lay.kv_count.shape[1]) if kt in lay.kv_index[h, m, : lay.kv_count[h, m]].tolist()]
            n = int(q_count[h, kt])
            assert q_index[h, kt, :n].tolist() == want
            assert (q_index[h, kt, n:] == -1).all()
    assert int(q_count.sum()) == int(lay.kv_count.sum())


def test_block_layout_full_tiles_of_sliding_window():
    # window 64 with 16 x 16 tiles: away from the edges, tiles strictly inside the band are full and
    # only the diagonal and the far edge of the band need a mask
    lay = block_layout(SlidingWindow(window=64), 256, 256, block_m=16, block_n=16)
    m = 10
    tiles = lay.kv_index[0, m, : lay.kv_count[0, m]].tolist()
    full = lay.kv_full[0, m, : lay.kv_count[0, m]].tolist()
    assert tiles == [6, 7, 8, 9, 10]
    assert full == [False, True, True, True, False]


# ---------------------------------------------------------------------------------------------
# attended_pairs
@pytest.mark.parametrize("t", [1, 2, 63, 77, 128, 300])
def test_attended_pairs_of_wide_window_is_dense_causal(t):
    dense = t * (t + 1) // 2
    assert attended_pairs(Dense(), t) == dense
    assert attended_pairs(SlidingWindow(window=t), t) == dense
    assert attended_pairs(SlidingWindow(window=4 * t + 1), t) == dense
    assert attended_pairs(Longformer(window=t, global_tokens=3), t) == dense
    assert attended_pairs(Dense(causal=False), t) == t * t


@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_attended_pairs_counts_allowed(pattern, request):
    t, heads = 150, 2
    want = int(allowed_mask(pattern, t, t, kv_heads=heads, layer=2).sum())
    assert attended_pairs(pattern, t, kv_heads=heads, layer=2) == want
    # a chunk of 30 queries after 120 cached keys
    want = int(allowed_mask(pattern, 30, t, q_offset=120, kv_heads=heads, layer=2).sum())
    assert attended_pairs(pattern, 30, t, kv_heads=heads, layer=2, q_offset=120) == want


def test_attended_pairs_of_sliding_window_by_formula():
    t, w = 1000, 64
    assert attended_pairs(SlidingWindow(window=w), t) == w * (w + 1) // 2 + (t - w) * w


def test_block_layout_kv_heads_with_head_free_pattern():
    """A head-independent pattern gives the same layout for every KV head."""
    lay = block_layout(SlidingWindow(window=8), 64, 64, block_m=32, block_n=16, kv_heads=2)
    one = block_layout(SlidingWindow(window=8), 64, 64, block_m=32, block_n=16, kv_heads=1)
    assert torch.equal(lay.kv_index[0], one.kv_index[0]) and torch.equal(lay.kv_index[1], one.kv_index[0])
    assert lay.pairs.tolist() == [int(one.pairs)] * 2
