"""Patterns: ``allowed`` against dense constructions written from the docstrings, BigBird's random
blocks by their properties, and ``parse_pattern`` (round trips and error messages).

The expected masks below are built with plain Python loops over ``(i, j)`` from the rules stated in
``hf_sparse/patterns.py``; they never call ``allowed``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import Parity, pid

from hf_sparse import BigBird, Dense, Longformer, SlidingWindow, parse_pattern
from hf_sparse.patterns import bigbird_random_blocks

pytestmark = pytest.mark.usefixtures("one_thread")



# ---------------------------------------------------------------------------------------------
# independent dense constructions
def expected_mask(pattern, t_q: int, t_k: int) -> np.ndarray:
    """``[t_q, t_k]`` bool from the docstring rules (no random blocks)."""
    out = np.zeros((t_q, t_k), dtype=bool)
    for i, j in itertools.product(range(t_q), range(t_k)):
        out[i, j] = _rule(pattern, i, j)
    return out


def _rule(p, i: int, j: int) -> bool:
    if isinstance(p, Dense):
        return j <= i if p.causal else True
    if isinstance(p, SlidingWindow):
        return (i - p.window < j <= i) if p.causal else abs(i - j) < p.window
    if isinstance(p, Longformer):
        g = p.global_tokens
        if p.causal:
            return (i - p.window < j or j < g) and j <= i
        return abs(i - j) < p.window or j < g or i < g
    if isinstance(p, BigBird):
        qb, kb = i // p.block, j // p.block
        if p.causal:
            return (qb - p.window_blocks < kb <= qb or kb < p.global_blocks) and j <= i
        return abs(qb - kb) < p.window_blocks or kb < p.global_blocks or qb < p.global_blocks
    raise TypeError(p)


def allowed_matrix(p, t_q: int, t_k: int, **kw) -> np.ndarray:
    q = torch.arange(t_q).view(-1, 1)
    k = torch.arange(t_k).view(1, -1)
    return p.allowed(q, k, **kw).numpy()


def bigbird_candidates(p: BigBird, qb: int, num_k_blocks: int | None = None) -> set[int]:
    """Key blocks a random draw may pick for query block ``qb`` (from the docstring)."""
    if p.causal:
        return {kb for kb in range(qb + 1) if kb < qb - p.window_blocks + 1 and kb >= p.global_blocks}
    if qb < p.global_blocks:
        return set()  # a global query block sees every block already
    return {kb for kb in range(num_k_blocks) if abs(qb - kb) >= p.window_blocks and kb >= p.global_blocks}


# ---------------------------------------------------------------------------------------------
DETERMINISTIC = [
    Dense(),
    Dense(causal=False),
    SlidingWindow(window=1),
    SlidingWindow(window=3),
    SlidingWindow(window=7),
    SlidingWindow(window=40),  # >= T
    SlidingWindow(window=1, causal=False),
    SlidingWindow(window=4, causal=False),
    Longformer(window=4, global_tokens=2),
    Longformer(window=5, global_tokens=0),
    Longformer(window=3, global_tokens=9),  # more global tokens than the window
    Longformer(window=1, global_tokens=1),
    Longformer(window=4, global_tokens=3, causal=False),
    Longformer(window=2, global_tokens=0, causal=False),
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=0),
    BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=0),
    BigBird(block=16, window_blocks=3, global_blocks=2, random_blocks=0),
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=0, causal=False),
]


@pytest.mark.parametrize("pattern", DETERMINISTIC, ids=pid)
@pytest.mark.parametrize("t_q,t_k", [(37, 37), (20, 33)], ids=["T37", "TQ20-TK33"])
def test_allowed_matches_docstring_rule(pattern, t_q, t_k):
    if isinstance(pattern, BigBird):
        t_q, t_k = 3 * t_q, 3 * t_k  # several blocks of 16
    got = allowed_matrix(pattern, t_q, t_k, num_keys=t_k)
    want = expected_mask(pattern, t_q, t_k)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{pattern}: {len(bad)} pairs differ, first (i, j) = {tuple(bad[0])}"


def test_window_picture_from_docstring():
    picture = """
        x . . . . .
        x x . . . .
        x x x . . .
        . x x x . .
        . . x x x .
        . . . x x x
    """
    want = np.array([[c == "x" for c in line.split()] for line in picture.strip().splitlines()])
    assert (allowed_matrix(SlidingWindow(window=3), 6, 6) == want).all()


def test_sliding_window_at_least_length_is_dense_causal():
    t = 50
    for w in (t, t + 1, 10_000):
        assert (allowed_matrix(SlidingWindow(window=w), t, t) == allowed_matrix(Dense(), t, t)).all()


def test_longformer_without_global_tokens_is_sliding_window():
    for causal in (True, False):
        a = allowed_matrix(Longformer(window=5, global_tokens=0, causal=causal), 30, 30)
        b = allowed_matrix(SlidingWindow(window=5, causal=causal), 30, 30)
        assert (a == b).all()


def test_window_one_sees_only_itself():
    assert (allowed_matrix(SlidingWindow(window=1), 9, 9) == np.eye(9, dtype=bool)).all()


# ---------------------------------------------------------------------------------------------
# broadcasting
@pytest.mark.parametrize(
    "pattern",
    [
        Dense(),
        SlidingWindow(window=3),
        Longformer(window=3, global_tokens=2),
        BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2),
    ],
    ids=pid,
)
def test_allowed_broadcasts(pattern):
    t = 70
    base = allowed_matrix(pattern, t, t, num_keys=t)  # [T, T]
    q, k = torch.arange(t), torch.arange(t)
    # [1, T, 1] x [1, 1, T] with a [H, 1, 1] head tensor: broadcasts to [H, T, T] (patterns that do
    # not depend on the head may leave the head dimension at 1)
    heads = torch.arange(3).view(-1, 1, 1)
    got = pattern.allowed(q.view(1, -1, 1), k.view(1, 1, -1), kv_head=heads, num_keys=t)
    assert got.dtype == torch.bool
    assert got.shape in ((1, t, t), (3, t, t))
    got = got.expand(3, t, t)
    assert (got[0].numpy() == base).all()
    for h in (1, 2):
        one = pattern.allowed(q.view(-1, 1), k.view(1, -1), kv_head=h, num_keys=t)
        assert torch.equal(got[h], one)
    # scalars give a 0-d tensor; python lists are accepted
    assert pattern.allowed(5, 3, num_keys=t).shape == ()
    assert bool(pattern.allowed(5, 3, num_keys=t)) == bool(base[5, 3])
    row = pattern.allowed(40, list(range(t)), num_keys=t)
    assert (row.numpy() == base[40]).all()
    # a batch of independent query/key position vectors
    qs = torch.tensor([[0, 17, 33], [69, 50, 20]])
    ks = torch.tensor([[0, 16, 1], [68, 2, 19]])
    got = pattern.allowed(qs, ks, num_keys=t)
    assert got.shape == (2, 3)
    assert got.tolist() == [[bool(base[i, j]) for i, j in zip(qr, kr)] for qr, kr in zip(qs.tolist(), ks.tolist())]


def test_only_non_causal_bigbird_needs_num_keys():
    BigBird(block=16).allowed(torch.arange(4), torch.arange(4))  # causal: no num_keys needed
    with pytest.raises(ValueError, match="num_keys"):
        BigBird(block=16, causal=False).allowed(torch.arange(4), torch.arange(4))


# ---------------------------------------------------------------------------------------------
# BigBird random blocks: properties
BIGBIRD_RANDOM = [
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2),
    BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=3),
    BigBird(block=16, window_blocks=3, global_blocks=2, random_blocks=4, seed=11),
    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2, causal=False),
    BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=3, causal=False),
]


def _block_view(mask: np.ndarray, block: int) -> np.ndarray:
    """``[nqb, nkb]``: does any pair of the tile attend?"""
    t_q, t_k = mask.shape
    nqb, nkb = -(-t_q // block), -(-t_k // block)
    out = np.zeros((nqb, nkb), dtype=bool)
    for qb, kb in itertools.product(range(nqb), range(nkb)):
        out[qb, kb] = mask[qb * block : (qb + 1) * block, kb * block : (kb + 1) * block].any()
    return out


@pytest.mark.parametrize("pattern", BIGBIRD_RANDOM, ids=pid)
@pytest.mark.parametrize("t", [16 * 9, 16 * 9 - 5], ids=["T144", "T139"])
def test_bigbird_random_blocks_properties(pattern, t):
    b, r = pattern.block, pattern.random_blocks
    nqb = nkb = -(-t // b)
    for layer, head in [(0, 0), (0, 1), (3, 0)]:
        got = allowed_matrix(pattern, t, t, layer=layer, kv_head=head, num_keys=t)
        base = expected_mask(pattern, t, t)
        assert not (base & ~got).any(), "random blocks must only add pairs"
        extra = got & ~base
        blocks = _block_view(extra, b)
        table = bigbird_random_blocks(
            pattern, layer, head, torch.arange(nqb), num_k_blocks=None if pattern.causal else nkb
        )
        assert table.shape == (nqb, r)
        for qb in range(nqb):
            cand = bigbird_candidates(pattern, qb, nkb)
            drawn = [int(x) for x in table[qb] if x >= 0]
            assert len(drawn) == len(set(drawn)), f"qb={qb}: repeated blocks {drawn}"
            assert len(drawn) == min(r, len(cand)), f"qb={qb}: {len(drawn)} drawn from {len(cand)} candidates"
            assert set(drawn) <= cand, f"qb={qb}: {drawn} not within candidates {sorted(cand)}"
            assert (table[qb, len(drawn) :] == -1).all(), "missing draws are -1, at the end"
            # the extra pairs in allowed are exactly the drawn blocks, each one whole
            assert set(np.flatnonzero(blocks[qb]).tolist()) == set(drawn)
            for kb in drawn:
                tile = got[qb * b : (qb + 1) * b, kb * b : (kb + 1) * b]
                assert tile.all(), f"random block {kb} of query block {qb} is not fully visible"


@pytest.mark.parametrize("pattern", BIGBIRD_RANDOM, ids=pid)
def test_bigbird_random_blocks_are_a_pure_function(pattern):
    nqb = 40
    nkb = None if pattern.causal else nqb
    args = dict(layer=2, kv_heads=3, num_q_blocks=nqb, num_k_blocks=nkb)
    a, b = pattern.random_table(**args), pattern.random_table(**args)
    assert a.dtype == torch.int32 and a.shape == (3, nqb, pattern.random_blocks)
    assert torch.equal(a, b), "not deterministic across calls"
    # the same value for the same (seed, layer, kv_head, qb), however it is asked for
    for h, qb in [(0, 0), (1, 17), (2, 39)]:
        one = bigbird_random_blocks(pattern, 2, h, qb, num_k_blocks=nkb)
        assert torch.equal(one.to(torch.int32), a[h, qb])
    # an equal pattern built separately gives the same table
    twin = parse_pattern(pattern.spec())
    assert torch.equal(twin.random_table(**args), a)


def test_a_plan_draws_extra_blocks_for_every_head_of_an_equal_pattern():
    # two KV heads given equal (not identical) BigBird patterns: each draws its own row, and the reference
    # path equals the dense mask of the predicate
    from hf_sparse import sparse_attention
    from hf_sparse.layout import random_table

    bb = "bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=2"
    plan = parse_pattern(f"per_head[sliding_window:window=9;1={bb};3={bb}]")
    table = random_table(plan, layer=0, kv_heads=4, num_q_blocks=4, num_k_blocks=4)
    alone = parse_pattern(bb).random_table(layer=0, kv_heads=4, num_q_blocks=4, num_k_blocks=None)
    assert torch.equal(table[[1, 3]], alone[[1, 3]].long()) and (table[[0, 2]] == -1).all()
    assert (table[3] >= 0).any()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 53, 16, generator=g) for h in (8, 4, 4))
    ref = sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(ref, sparse_attention(q, k, v, plan, backend="dense"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_bigbird_random_blocks_vary_with_seed_layer_and_head(causal):
    p = BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=3, causal=causal)
    nqb = 64
    nkb = None if causal else nqb

    def table(pattern, layer):
        return pattern.random_table(layer=layer, kv_heads=2, num_q_blocks=nqb, num_k_blocks=nkb)

    t0 = table(p, 0)
    assert not torch.equal(t0[0], t0[1]), "kv heads draw the same blocks"
    assert not torch.equal(t0, table(p, 1)), "layers draw the same blocks"
    reseeded = BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=3, causal=causal, seed=1)
    assert not torch.equal(t0, table(reseeded, 0)), "seeds draw the same blocks"
    # and the difference is not confined to a few query blocks
    differ = (t0[0] != t0[1]).any(-1).float().mean()
    assert differ > 0.5


def test_bigbird_causal_random_blocks_have_the_prefix_property():
    p = BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=3, seed=5)
    big = p.random_table(layer=1, kv_heads=2, num_q_blocks=50)
    for n in (1, 7, 20, 49):
        assert torch.equal(p.random_table(layer=1, kv_heads=2, num_q_blocks=n), big[:, :n])
    # the token-level mask of a short sequence is the top-left corner of a long one's
    long = allowed_matrix(p, 16 * 12, 16 * 12, layer=1, kv_head=1)
    short = allowed_matrix(p, 16 * 5 + 3, 16 * 5 + 3, layer=1, kv_head=1)
    assert (long[: short.shape[0], : short.shape[1]] == short).all()


def test_bigbird_random_blocks_cover_the_candidates_evenly():
    # Floyd's algorithm over a uniform hash: over many (seed, head) pairs each of the 40 candidate
    # blocks of query block 43 is drawn about as often as any other.
    p = BigBird(block=16, window_blocks=3, global_blocks=1, random_blocks=3)
    qb, counts = 43, np.zeros(64, dtype=np.int64)
    for seed in range(50):
        q = BigBird(block=16, window_blocks=3, global_blocks=1, random_blocks=3, seed=seed)
        drawn = bigbird_random_blocks(q, 0, torch.arange(40), qb)
        counts += np.bincount(drawn.flatten().numpy(), minlength=64)
    cand = sorted(bigbird_candidates(p, qb))
    assert len(cand) == 40
    assert counts[[i for i in range(64) if i not in cand]].sum() == 0
    expected = 50 * 40 * 3 / 40
    assert counts[cand].min() > 0.5 * expected and counts[cand].max() < 1.5 * expected, counts[cand]


# ---------------------------------------------------------------------------------------------
# parse_pattern
PARSE_CASES = [
    ("dense", Dense()),
    ("full", Dense()),
    ("causal", Dense()),
    ("dense:causal=false", Dense(causal=False)),
    ("sliding_window:window=128", SlidingWindow(window=128)),
    ("sliding:window=8", SlidingWindow(window=8)),
    ("window:window=8,causal=false", SlidingWindow(window=8, causal=False)),
    ("sliding-window:window=8", SlidingWindow(window=8)),
    ("longformer:window=1024,global_tokens=4", Longformer(window=1024, global_tokens=4)),
    (" longformer : window = 16 , global_tokens = 0 ", Longformer(window=16, global_tokens=0)),
    ("BigBird", BigBird()),
    (
        "bigbird:block=32,window_blocks=2,global_blocks=0,random_blocks=1,seed=7,causal=false",
        BigBird(block=32, window_blocks=2, global_blocks=0, random_blocks=1, seed=7, causal=False),
    ),
    ("bigbird:block=64,", BigBird(block=64)),
]


@pytest.mark.parametrize("text,want", PARSE_CASES, ids=[" ".join(t.split()) for t, _ in PARSE_CASES])
def test_parse_pattern_strings(text, want):
    got = parse_pattern(text)
    assert got == want and type(got) is type(want)


def test_parse_pattern_dicts_and_objects():
    assert parse_pattern({"type": "sliding_window", "window": 512}) == SlidingWindow(window=512)
    assert parse_pattern({"name": "full"}) == Dense()
    assert parse_pattern({"type": "longformer", "global_tokens": 0}) == Longformer(global_tokens=0)
    p = BigBird(block=16)
    assert parse_pattern(p) is p


ROUND_TRIP = [
    Dense(),
    Dense(causal=False),
    SlidingWindow(window=1),
    SlidingWindow(window=4096, causal=False),
    Longformer(window=256, global_tokens=0),
    Longformer(window=3, global_tokens=9, causal=False),
    BigBird(),
    BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=0, seed=123, causal=False),
]


@pytest.mark.parametrize("pattern", ROUND_TRIP, ids=pid)
def test_parse_pattern_round_trip(pattern):
    assert parse_pattern(pattern.spec()) == pattern
    assert parse_pattern(str(pattern)) == pattern
    d = pattern.to_dict()
    assert d["type"] == pattern.name
    assert parse_pattern(d) == pattern
    assert pattern.to_dict() == d, "to_dict must not be mutated by parse_pattern"
    assert hash(parse_pattern(pattern.spec())) == hash(pattern)


BAD_SPECS = [
    ("sliding_window:window=0", r"window must be an integer >= 1, got 0"),
    ({"type": "longformer", "window": 0}, r"window .*got 0"),
    ("longformer:global_tokens=-1", r"global_tokens .*got -1"),
    ("bigbird:random_blocks=-2", r"random_blocks .*got -2"),
    ("bigbird:global_blocks=-1", r"global_blocks .*got -1"),
    ("bigbird:window_blocks=0", r"window_blocks .*got 0"),
    ("bigbird:seed=-3", r"seed .*got -3"),
    ("bigbird:block=48", r"power of two.*got 48"),
    ("bigbird:block=8", r"power of two >= 16 and <= 4096, got 8"),
    ("sparse_transformer:window=4", r"unknown pattern 'sparse_transformer'"),
    ({"type": "strided_transformer"}, r"unknown pattern 'strided_transformer'"),
    # upper bounds: values that would overflow the kernels' positions or exhaust memory or time
    ("sliding_window:window=99999999999999999999999", r"window must be at most 1073741824, got 99999999999999999999999"),
    ("longformer:global_tokens=99999999999999999999999", r"global_tokens must be at most 1073741824"),
    ("bigbird:block=1073741824", r"block must be a power of two >= 16 and <= 4096, got 1073741824"),
    ("bigbird:random_blocks=1000000,block=16", r"random_blocks must be at most 64, got 1000000"),
    ("bigbird:seed=4294967296", r"seed must be at most 4294967295"),
    ("bigbird:window_blocks=67108865", r"window_blocks must be at most 67108864"),
    ("strided:stride=0", r"stride must be an integer >= 1, got 0"),
    ("strided:stride=4,window=2000000000", r"window must be at most 1073741824"),
    ("fixed:block=8,summary=9", r"summary must be at most block \(8\), got 9"),
    ("fixed:block=0", r"block must be an integer >= 1, got 0"),
    ("sliding_window:window=1e40", r"window must be an integer .*got '1e40'"),
    # each option once
    ("sliding_window:window=4,window=8", r"option 'window' is given twice"),
    ("bigbird:seed=1,block=16,seed=1", r"option 'seed' is given twice"),
    # unions
    ("sliding_window:window=4|", r"empty member around '\|'"),
    ("sliding_window:window=4|sliding_window:window=4,causal=false", r"all be causal or all non-causal"),
    ("sliding_window:width=4", r"unknown option\(s\) width"),
    ({"type": "bigbird", "blocks": 64}, r"unknown option\(s\) blocks"),
    ("sliding_window:window", r"option 'window' must look like name=value"),
    ("sliding_window:=4", r"option '=4' must look like name=value"),
    ("sliding_window:window=abc", r"window='abc' is not a number"),
    ("sliding_window:window=2.5", r"window must be an integer .*got '2.5'"),
    ({"type": "sliding_window", "window": 2.0}, r"window must be an integer .*got 2.0"),
    ({"type": "sliding_window", "window": True}, r"window must be an integer .*got True"),
    ("dense:causal=2", r"causal=.2. must be true or false"),
    ("dense:causal=maybe", r"causal=.maybe. must be true or false"),
    ({"window": 4}, r"has no 'type'"),
    (42, r"cannot make a pattern from 42"),
]


@pytest.mark.parametrize("spec,match", BAD_SPECS, ids=[str(s).replace(" ", "") for s, _ in BAD_SPECS])
def test_parse_pattern_rejects_bad_values(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(spec)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SlidingWindow(window=0), r"got 0"),
        (lambda: SlidingWindow(window=-5), r"got -5"),
        (lambda: Longformer(global_tokens=-1), r"got -1"),
        (lambda: BigBird(block=100), r"got 100"),
        (lambda: BigBird(random_blocks=-1), r"got -1"),
        (lambda: Dense(causal="yes"), r"got 'yes'"),
    ],
    ids=["window0", "window-5", "global-1", "block100", "random-1", "causal-str"],
)
def test_constructors_validate(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_patterns_are_frozen():
    p = SlidingWindow(window=4)
    with pytest.raises(AttributeError):
        p.window = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# strided, fixed, unions, per-head plans and registration: against loops over the rules
from hf_sparse import Fixed, PerHead, Strided, Union, register_pattern, registered_patterns  # noqa: E402
from hf_sparse.patterns import Pattern  # noqa: E402


def strided_rule(stride: int, window: int, i: int, j: int) -> bool:
    return j <= i and (i - j < window or (i - j) % stride == 0)


def fixed_rule(block: int, summary: int, i: int, j: int) -> bool:
    return j <= i and (j // block == i // block or j % block >= block - summary)


@pytest.mark.parametrize("stride,window", [(1, 1), (3, 2), (4, 4), (5, 1), (7, 11), (64, 64)])
def test_strided_matches_rule(stride, window):
    t = 70
    want = np.array([[strided_rule(stride, window, i, j) for j in range(t)] for i in range(t)])
    assert (allowed_matrix(Strided(stride=stride, window=window), t, t) == want).all()


def test_strided_window_defaults_to_stride():
    assert Strided(stride=16) == Strided(stride=16, window=16)
    assert parse_pattern("strided:stride=16").spec() == "strided:stride=16,window=16"


@pytest.mark.parametrize("block,summary", [(1, 1), (4, 1), (5, 2), (16, 16), (32, 3)])
def test_fixed_matches_rule(block, summary):
    t = 70
    want = np.array([[fixed_rule(block, summary, i, j) for j in range(t)] for i in range(t)])
    assert (allowed_matrix(Fixed(block=block, summary=summary), t, t) == want).all()


def test_docstring_pictures_of_strided_and_fixed():
    m = allowed_matrix(Strided(stride=3, window=2), 8, 8)
    assert "".join("x" if v else "." for v in m[7]) == ".x..x.xx"
    m = allowed_matrix(Fixed(block=4, summary=1), 10, 10)
    assert "".join("x" if v else "." for v in m[9]) == "...x...xxx"


UNIONS = [
    "sliding_window:window=4|strided:stride=5",
    "longformer:window=3,global_tokens=2|strided:stride=4,window=1",
    "bigbird:block=16,random_blocks=2|sliding_window:window=40",
    "fixed:block=8,summary=2|sliding_window:window=3",
    "fixed:block=6,summary=2|dense",
]


@pytest.mark.parametrize("spec", UNIONS)
def test_union_is_or_of_members(spec):
    u = parse_pattern(spec)
    assert isinstance(u, Union) and len(u.members) == 2
    t = 90
    q, k = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)
    for layer, head in [(0, 0), (3, 1)]:
        got = u.allowed(q, k, layer=layer, kv_head=head)
        want = u.members[0].allowed(q, k, layer=layer, kv_head=head) | u.members[1].allowed(q, k, layer=layer, kv_head=head)
        assert torch.equal(got, want)
    assert parse_pattern(u.spec()) == u and parse_pattern(u.to_dict()) == u


def test_union_operator_flattens_and_round_trips():
    a, b, c = SlidingWindow(window=8), Strided(stride=4), Longformer(window=2, global_tokens=1)
    u = a | b | c
    assert u == Union((a, b, c)) and (a | a) == a
    assert parse_pattern(u.spec()) == u
    assert parse_pattern("sliding_window:window=8|strided:stride=4") == a | b


def test_union_primitives_merge_or_refuse():
    assert (SlidingWindow(window=8) | SlidingWindow(window=16)).primitives() == SlidingWindow(window=16).primitives()
    p = (Longformer(window=8, global_tokens=2) | Strided(stride=4, window=1)).primitives()
    assert (p.window, p.global_tokens, p.stride) == (8, 2, 4)
    assert (Strided(stride=4) | Strided(stride=6)).primitives() is None  # two strides: reference path only
    assert (BigBird(block=16) | BigBird(block=32)).primitives() is None
    assert (Fixed(block=6, summary=1) | SlidingWindow(window=4)).primitives() is None  # 6 is no power of two
    bb = BigBird(block=16).primitives()
    assert bb.random_disjoint and not (BigBird(block=16) | SlidingWindow(window=100)).primitives().random_disjoint


def test_per_head_selects_each_heads_pattern():
    plan = PerHead(SlidingWindow(window=3), ((0, Dense()), (2, Strided(stride=3, window=1))))
    t = 20
    q, k = torch.arange(t).view(1, -1, 1), torch.arange(t).view(1, 1, -1)
    got = plan.allowed(q, k, kv_head=torch.arange(4).view(-1, 1, 1))
    for h, p in enumerate([Dense(), SlidingWindow(window=3), Strided(stride=3, window=1), SlidingWindow(window=3)]):
        assert torch.equal(got[h], p.allowed(q[0], k[0]))
        assert torch.equal(plan.allowed(q[0], k[0], kv_head=h), got[h])
    assert parse_pattern(plan.spec()) == plan and parse_pattern(plan.to_dict()) == plan
    assert plan.cache_policy() is None  # the dense head keeps everything
    assert PerHead(SlidingWindow(window=3), ((1, Longformer(window=2, global_tokens=4)),)).cache_policy() == (4, 3)


@pytest.mark.parametrize("make,match", [
    (lambda: PerHead(Dense(), ((0, Dense()), (0, Dense()))), r"head\(s\) \[0\] given twice"),
    (lambda: PerHead(Dense(), ((-1, Dense()),)), r"integer >= 0, got -1"),
    (lambda: PerHead(Dense(), ((0, Dense(causal=False)),)), r"must be causal like the default"),
    (lambda: PerHead(Dense(), ((5, Dense()),)).head_primitives(4), r"KV head\(s\) \[5\], but the layer has 4"),
    (lambda: parse_pattern("per_head[dense;x=dense]"), r"must look like KV_HEAD=pattern"),
    (lambda: PerHead(Dense(), ((0, Dense()),)) | Dense(), r"cannot hold a per-head plan"),
])
def test_per_head_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_register_pattern_from_outside():
    register_pattern("parity_test", Parity, replace=True)
    assert "parity_test" in registered_patterns()
    p = parse_pattern("parity_test")
    assert isinstance(p, Parity) and p.primitives() is None and p.cache_policy() is None
    assert parse_pattern(p.spec()) == p
    twin = dataclass(frozen=True)(type("Twin", (Parity,), {"name": "parity_test"}))
    with pytest.raises(ValueError, match=r"'parity_test' is taken by Parity"):
        register_pattern("parity_test", twin)
    loose = dataclass(type("Loose", (Pattern,), {"name": "loose_test"}))
    with pytest.raises(ValueError, match=r"must be frozen"):
        register_pattern("loose_test", loose)
    with pytest.raises(ValueError, match=r"set the class attribute name = 'other_name'"):
        register_pattern("other_name", Parity)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunked_matches_rule(chunk):
    t = 70
    want = np.array([[j <= i and j // chunk == i // chunk for j in range(t)] for i in range(t)])
    assert (allowed_matrix(parse_pattern(f"chunked:chunk={chunk}"), t, t) == want).all()
    assert parse_pattern(f"chunked:chunk={chunk}").cache_policy() == (0, chunk)
