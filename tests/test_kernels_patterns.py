"""Strided, fixed, unions and per-head plans on the Triton kernels (interpreter) against the dense oracle.

The oracle (``backend="dense"``) builds the full mask from ``Pattern.allowed``, whose rules
``tests/test_patterns.py`` checks against loops over the issue's definitions. Forward and backward,
GQA, odd lengths, padding, ``q_offset``, the decode kernel (few queries) and decode by positions.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, HAS_TRITON, needs_interpreter, padded_rows, pid

from hf_sparse import (
    BigBird,
    Dense,
    Fixed,
    Longformer,
    PerHead,
    SlidingWindow,
    Strided,
    parse_pattern,
    sparse_attention,
)
from hf_sparse.decode import attention_with_positions
from hf_sparse.kernels.plan import kernel_plan, kernel_unfit
from hf_sparse.patterns import ceil_div

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = [
    Strided(stride=5, window=3),
    Strided(stride=16, window=1),
    Strided(stride=7),
    Fixed(block=16, summary=3),
    Fixed(block=32, summary=32),
    parse_pattern("chunked:chunk=16"),
    SlidingWindow(window=9) | Strided(stride=6, window=1),
    Longformer(window=5, global_tokens=3) | Strided(stride=11, window=2),
    # extra blocks that may overlap another member's keys: visited masked, each pair counted once
    SlidingWindow(window=40) | BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=2),
    Fixed(block=16, summary=2) | SlidingWindow(window=20),
    PerHead(SlidingWindow(window=6), ((0, Dense()),)),
    PerHead(Longformer(window=5, global_tokens=2), ((1, Strided(stride=4, window=2)),)),
    # a token band and a block band in one launch, with random blocks on one head only
    PerHead(SlidingWindow(window=7), ((0, BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2)),)),
]
SHAPES = [(2, 4, 2, 53, 16), (1, 6, 2, 70, 32)]  # GQA 2 and 3, lengths off the tile


def _qkv(b, hq, hkv, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(b, h, t, d, generator=g)
    return mk(hq).requires_grad_(), mk(hkv).requires_grad_(), mk(hkv).requires_grad_(), mk(hq)


def _run(q, k, v, do, pattern, backend, grads_of, **kw):
    o = sparse_attention(q, k, v, pattern, backend=backend, **kw)
    return (o, *torch.autograd.grad(o, grads_of, do))


def _assert_matches_oracle(q, k, v, do, pattern, grads_of, atol=3e-5, **kw):
    ours = _run(q, k, v, do, pattern, "triton", grads_of, **kw)
    want = _run(q, k, v, do, pattern, "dense", grads_of, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, want):
        diff = (a - b).abs()
        assert diff.max() <= atol, f"{pattern.spec()} {name}: max {diff.max():.2e} at {int(diff.argmax())}"


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_kernels_match_oracle(pattern):
    assert kernel_unfit(pattern, 2) is None
    for i, shape in enumerate(SHAPES):
        q, k, v, do = _qkv(*shape, seed=i)
        _assert_matches_oracle(q, k, v, do, pattern, (q, k, v))


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS[::2], ids=pid)
def test_kernels_padding_and_q_offset(pattern):
    b, hq, hkv, t, d = 3, 4, 2, 45, 16
    q, k, v, do = _qkv(b, hq, hkv, t, d, seed=3)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :7] = False
    kpm[1, 38:] = False
    kpm[2, :3] = False
    for kw in (dict(key_padding_mask=kpm), dict(q_offset=t - 20), dict(key_padding_mask=kpm, q_offset=t - 20)):
        qq, dd = (q[:, :, -20:], do[:, :, -20:]) if "q_offset" in kw else (q, do)
        _assert_matches_oracle(qq, k, v, dd, pattern, (q, k, v), **kw)


@needs_interpreter
@pytest.mark.parametrize("pattern", PATTERNS, ids=pid)
def test_decode_kernel_few_queries(pattern, monkeypatch):
    # one and three new queries after a prompt: the split-key decode kernel (and its lse for the backward)
    import hf_sparse.kernels.prefill as kernels

    calls = []
    decode = kernels._decode
    monkeypatch.setattr(kernels, "_decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    q, k, v, do = _qkv(2, 4, 2, 61, 16, seed=5)
    for tq in (1, 3):
        _assert_matches_oracle(q[:, :, -tq:], k, v, do[:, :, -tq:], pattern, (q, k, v), q_offset=61 - tq)
    assert calls


@needs_interpreter
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if not kernel_plan(p, 2).r], ids=pid)
def test_decode_by_positions(pattern):
    # slots in scrambled order with empty slots: the decode kernel by positions against the PyTorch path
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    k_pos = torch.stack([torch.randperm(60)[:48] for _ in range(2)])
    k_pos[0, :5] = -1
    q_pos = torch.tensor([[59], [57]])
    ours = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend="triton")
    want = attention_with_positions(q, k, v, pattern, q_pos=q_pos, k_pos=k_pos, backend="reference")
    assert (ours - want).abs().max() < 3e-5


@needs_interpreter
def test_predicate_only_patterns_say_what_the_kernels_need():
    p = Fixed(block=6, summary=2)  # no power of two: no kernel primitives
    q, k, v, _ = _qkv(1, 2, 1, 20, 16)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: pattern 'fixed:block=6,summary=2' is "
                                         r"defined by its predicate only; the kernels need its rules"):
        sparse_attention(q, k, v, p, backend="triton")
    out = sparse_attention(q, k, v, p, backend="auto")  # the reference path
    assert torch.allclose(out, sparse_attention(q, k, v, p, backend="dense"), atol=1e-6)
    with pytest.raises(ValueError, match=r"blocks of different sizes \[16, 32\]"):
        kernel_plan(PerHead(BigBird(block=16), ((1, BigBird(block=32)),)), 2)


# ---------------------------------------------------------------------------------------------
# stride runs: with a stride S >= (query positions of a tile) + BLOCK_N (forward, dQ) or BLOCK_M + BLOCK_N
# (dK/dV), a tile visits only the tiles of its stride runs below the window instead of the whole prefix.
# The interpreter's tiles are 16 x 16; a GQA-2 packed tile holds 8 positions: runs from S = 24 (forward,
# dQ) and S = 32 (dK/dV).
RUN_PATTERNS = [
    SlidingWindow(window=20) | Strided(stride=64, window=1),
    SlidingWindow(window=9) | Strided(stride=72, window=1),  # S not a multiple of the tile: runs straddle tiles
    Longformer(window=12, global_tokens=20) | Strided(stride=80, window=1),  # runs clipped at the global tiles
    BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2) | Strided(stride=64, window=1),
    PerHead(SlidingWindow(window=24), ((0, Strided(stride=96, window=8)),)),  # one head with runs, one without
    Strided(stride=64, window=1),  # the stride beside a band of one key
]
# the whole prefix, as before: runs in the forward and dQ only (S = 28), in none (S = 13), key columns
OLD_PATH_PATTERNS = [
    SlidingWindow(window=5) | Strided(stride=28, window=1),
    SlidingWindow(window=20) | Strided(stride=13, window=1),
    Fixed(block=16, summary=2) | Strided(stride=64, window=1),
]
RUN_SHAPES = [(1, 4, 2, 150, 16), (2, 3, 1, 130, 16)]  # GQA 2 (8 positions a tile) and 3 (6), off the tile


def _spy_runs(monkeypatch):
    """Record the stride-run tile counts the kernels compute: ``{"fwd": [...], "dkdv": [...]}``."""
    import hf_sparse.kernels.attention as kernels

    seen = {"fwd": [], "dkdv": []}
    runs = kernels._stride_runs

    def spy(*args):
        run = runs(*args)
        seen["dkdv" if args[7] else "fwd"].append(int(run[7]))
        return run

    monkeypatch.setattr(kernels, "_stride_runs", spy)
    return seen


@needs_interpreter
@pytest.mark.parametrize("shape", RUN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pattern", RUN_PATTERNS + OLD_PATH_PATTERNS, ids=pid)
def test_stride_runs_match_oracle(pattern, shape, monkeypatch):
    seen = _spy_runs(monkeypatch)
    q, k, v, do = _qkv(*shape, seed=7)
    _assert_matches_oracle(q, k, v, do, pattern, (q, k, v))
    fwd, dkdv = sum(seen["fwd"]), sum(seen["dkdv"])
    if pattern in RUN_PATTERNS:
        assert fwd > 0 and dkdv > 0, (fwd, dkdv)
    else:  # S = 28 takes runs in the forward and dQ (at most 8 positions a tile + 16 <= 28), not in dK/dV
        assert (fwd > 0, dkdv) == (pattern.primitives().stride == 28, 0), (fwd, dkdv)


@needs_interpreter
@pytest.mark.parametrize("pattern", RUN_PATTERNS[1:5], ids=pid)
def test_stride_runs_padding_and_q_offset(pattern, monkeypatch):
    seen = _spy_runs(monkeypatch)
    b, hq, hkv, t, d = 3, 4, 2, 133, 16
    q, k, v, do = _qkv(b, hq, hkv, t, d, seed=8)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :21] = False  # left padding: positions start later than the slots
    kpm[1, 117:] = False
    kpm[2, :5] = False
    for kw in (dict(key_padding_mask=kpm), dict(q_offset=t - 45), dict(key_padding_mask=kpm, q_offset=t - 45)):
        qq, dd = (q[:, :, -45:], do[:, :, -45:]) if "q_offset" in kw else (q, do)
        _assert_matches_oracle(qq, k, v, dd, pattern, (q, k, v), **kw)
    assert sum(seen["fwd"]) > 0 and sum(seen["dkdv"]) > 0


@needs_interpreter
@pytest.mark.parametrize("pattern", RUN_PATTERNS[:3:2], ids=pid)
def test_stride_runs_rectangular_tiles_one_head_per_program(pattern, monkeypatch):
    # as on the GPU, forward tiles of one head per program (32 positions here) and dK/dV tiles of other shapes,
    # with pointer loads: runs need S >= 32 + 16 (forward, dQ) and 16 + 32 (dK/dV)
    from hf_sparse.kernels import configs

    seen = _spy_runs(monkeypatch)
    for name, cfg in (("fwd", configs.KernelConfig(32, 16, 4, 2, pack=False)),
                      ("dq", configs.KernelConfig(32, 16, 4, 2, pack=False)), ("dkdv", configs.KernelConfig(16, 32, 4, 2))):
        monkeypatch.setitem(configs._OVERRIDES, (name, None), cfg)
    monkeypatch.setitem(configs._SETTINGS, "tma", False)
    q, k, v, do = _qkv(2, 4, 2, 181, 16, seed=12)
    _assert_matches_oracle(q, k, v, do, pattern, (q, k, v))
    assert sum(seen["fwd"]) > 0 and sum(seen["dkdv"]) > 0


@needs_interpreter
@pytest.mark.parametrize("runs", [True, False], ids=["runs", "prefix"])
@pytest.mark.parametrize("pattern", RUN_PATTERNS[:5:2], ids=pid)
def test_stride_runs_visit_only_tiles_with_hits(pattern, runs, monkeypatch):
    # a query tile of the forward visits exactly the key tiles that hold a pair the pattern shows (as a block
    # mask would); with the runs switched off it walks the whole prefix (GQA 2: 8 positions a tile, S % 16 == 0)
    import hf_sparse.kernels.attention as kernels

    plans = []
    plan = kernels._query_side_plan

    def spy(*args):
        out = plan(*args)
        plans.append((int(args[0]), int(args[1]), int(args[10]), int(out[5]) + int(out[12])))
        return out

    monkeypatch.setattr(kernels, "_query_side_plan", spy)
    if not runs:
        monkeypatch.setattr(kernels, "_far_rules", lambda S, CC, *_: ((S > 0) | (CC > 0), S < 0))
    t = 203
    q, k, v, _ = _qkv(1, 4, 2, t, 16, seed=9)
    out = sparse_attention(q, k, v, pattern, backend="triton")
    assert (out - sparse_attention(q, k, v, pattern, backend="dense")).abs().max() < 3e-5
    assert len(plans) == 2 * ceil_div(t, 8)
    extra = 0
    for m_lo, m_hi, hk, visited in plans:
        seen = pattern.allowed(torch.arange(m_lo, m_hi)[:, None], torch.arange(t)[None, :], kv_head=hk).any(0)
        hit_tiles = int(torch.nn.functional.pad(seen, (0, -t % 16)).view(-1, 16).any(1).sum())
        assert visited >= hit_tiles, (m_lo, hk)
        extra += visited - hit_tiles
    assert (extra == 0) == runs, extra


# ---------------------------------------------------------------------------------------------
# stride hits at decode: the decode kernel loads a key tile's K/V only when a row's stride hits a key of it (or
# another rule shows one), not every tile of the prefix. Tiles are 16 keys in the interpreter.
DECODE_STRIDE_PATTERNS = [
    Strided(stride=32, window=1),  # S a multiple of the tile
    Strided(stride=24, window=3),  # not a multiple: a stride hit's offset in its tile moves
    Strided(stride=5, window=2),  # S below the tile: every tile is hit
    SlidingWindow(window=9) | Strided(stride=40, window=1),
    Longformer(window=5, global_tokens=20) | Strided(stride=19, window=2),  # hits inside the global tiles too
    PerHead(SlidingWindow(window=12), ((0, Strided(stride=24, window=4)),)),  # one strided head, one window head
    PerHead(Strided(stride=48, window=1), ((1, Fixed(block=16, summary=2)),)),  # key columns on one head
]
DECODE_RAND_PATTERN = BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2) | Strided(stride=48, window=1)


def _spy_decode(monkeypatch):
    """Count the decode kernel's launches (through the prefill launcher, which sends few queries to it)."""
    import hf_sparse.kernels.prefill as kernels

    calls = []
    decode = kernels._decode
    monkeypatch.setattr(kernels, "_decode", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    return calls


def _assert_out_matches(ours, want, pattern, atol=3e-5):
    diff = (ours - want).abs()
    assert diff.max() <= atol, f"{pattern.spec()}: max {diff.max():.2e} at {int(diff.argmax())}"


@needs_interpreter
@pytest.mark.parametrize("pattern", DECODE_STRIDE_PATTERNS + [DECODE_RAND_PATTERN], ids=pid)
def test_decode_stride_hits_match_oracle(pattern, monkeypatch):
    # the prefill layout: one and three new queries after a prompt, then with left and right padding
    # (k_shift / k_len), whose queries sit at other positions than their slots
    calls = _spy_decode(monkeypatch)
    b, hq, hkv, t, d = 3, 4, 2, 150, 16
    q, k, v, _ = _qkv(b, hq, hkv, t, d, seed=21)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, :37] = False  # left padding, not a multiple of the tile
    kpm[1, :3] = False
    kpm[1, 141:] = False  # and right padding: the last queries of this row are padding
    for tq in (1, 3):
        for kw in (dict(q_offset=t - tq), dict(q_offset=t - tq, key_padding_mask=kpm)):
            args = (q[:, :, -tq:], k, v, pattern)
            _assert_out_matches(sparse_attention(*args, backend="triton", **kw),
                                sparse_attention(*args, backend="dense", **kw), pattern)
    assert len(calls) == 4


def _ring_slots(history: int, slots: int, sinks: int, seed: int) -> torch.Tensor:
    """Slot positions of a ring-like cache: the sinks first, then the last ``slots - sinks`` positions of a
    ``history`` of tokens in ring order (rotated), a few of them dropped (``-1``)."""
    g = torch.Generator().manual_seed(seed)
    ring = torch.arange(max(sinks, history - (slots - sinks)), history)
    ring = torch.cat([ring, torch.full((slots - sinks - len(ring),), -1)])
    ring = ring.roll(int(torch.randint(1, len(ring), (1,), generator=g)))
    ring[torch.randperm(len(ring), generator=g)[:7]] = -1
    return torch.cat([torch.arange(sinks), ring])


@needs_interpreter
@pytest.mark.parametrize("pattern", DECODE_STRIDE_PATTERNS, ids=pid)
def test_decode_stride_hits_by_positions(pattern):
    # by positions: ring-ordered slots with empty ones, one query and three consecutive ones (a padded row)
    torch.manual_seed(1)
    b, hq, hkv, slots, d = 2, 4, 2, 120, 16
    k, v = torch.randn(b, hkv, slots, d), torch.randn(b, hkv, slots, d)
    k_pos = torch.stack([_ring_slots(200, slots, 4, seed=0), _ring_slots(131, slots, 2, seed=1)])
    for q_pos in (torch.tensor([[199], [130]]), torch.tensor([[197, 198, 199], [-1, 129, 130]])):
        q = torch.randn(b, hq, q_pos.shape[1], d)
        kw = dict(q_pos=q_pos, k_pos=k_pos)
        _assert_out_matches(attention_with_positions(q, k, v, pattern, backend="triton", **kw),
                            attention_with_positions(q, k, v, pattern, backend="reference", **kw), pattern)


def _spy_decode_tiles(monkeypatch, hits: bool):
    """Record the rule values ``(W, S)`` of every key tile whose K/V the decode kernel loads (``_visible`` runs
    once per such tile); without ``hits`` every tile of a stride head counts as hit (the whole prefix)."""
    import hf_sparse.kernels.decode as kernels

    seen = []
    visible = kernels._visible

    def spy(qp, kp, k_len, W, G, WB, S, *rest):
        seen.append((int(W), int(S)))
        return visible(qp, kp, k_len, W, G, WB, S, *rest)

    monkeypatch.setattr(kernels, "_visible", spy)
    if not hits:
        monkeypatch.setattr(kernels, "_stride_hit", lambda *_: True)
    return seen


def _hit_tiles(pattern, q_pos, k_pos, hkv):
    """``{(W, S): tiles}``: per KV head (by its rule values), the 16-slot tiles holding a pair the pattern shows."""
    from hf_sparse.kernels.plan import kernel_plan

    plan = kernel_plan(pattern, hkv)
    want = {}
    for hk in range(hkv):
        rules = plan.per_head[hk] if plan.per_head else plan.rules
        seen = pattern.allowed(q_pos[:, None], k_pos[None, :], kv_head=hk).any(0) & (k_pos >= 0)
        key = (rules[0], rules[3])
        want[key] = want.get(key, 0) + int(seen.view(-1, 16).any(1).sum())
    return want


@needs_interpreter
@pytest.mark.parametrize("hits", [True, False], ids=["hits", "prefix"])
@pytest.mark.parametrize("pattern", [DECODE_STRIDE_PATTERNS[i] for i in (0, 1, 3, 5)], ids=pid)
def test_decode_stride_hits_visit_only_tiles_with_hits(pattern, hits, monkeypatch):
    # one decode query (a GQA group of 2 rows) visits exactly the key tiles that hold a pair the pattern shows,
    # in the prefill layout and by positions; with the stride test switched off it walks the whole prefix
    from collections import Counter

    hkv, t, d = 2, 208, 16
    q, k, v = (x.detach() for x in _qkv(1, 4, hkv, t, d, seed=22)[:3])
    q = q[:, :, -1:]
    seen = _spy_decode_tiles(monkeypatch, hits)
    out = sparse_attention(q, k, v, pattern, backend="triton", q_offset=t - 1)
    _assert_out_matches(out, sparse_attention(q, k, v, pattern, backend="dense", q_offset=t - 1), pattern)
    layouts = [(Counter(seen), _hit_tiles(pattern, torch.tensor([t - 1]), torch.arange(t), hkv))]
    seen.clear()
    k_pos = _ring_slots(300, t, 4, seed=3)[None]
    q_pos = torch.tensor([[299]])
    kw = dict(q_pos=q_pos, k_pos=k_pos)
    out = attention_with_positions(q, k, v, pattern, backend="triton", **kw)
    _assert_out_matches(out, attention_with_positions(q, k, v, pattern, backend="reference", **kw), pattern)
    layouts.append((Counter(seen), _hit_tiles(pattern, q_pos[0], k_pos[0], hkv)))
    for visited, want in layouts:
        assert set(visited) == set(want), (visited, want)
        for key, n in want.items():
            assert visited[key] >= n, (key, visited, want)
        extra = sum(visited.values()) - sum(want.values())
        assert (extra == 0) == hits, (visited, want)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 against a float32 reference, flash-attention's "at most twice PyTorch's bf16 error" rule
GPU_PATTERNS = [
    Strided(stride=128, window=256),
    SlidingWindow(window=512) | Strided(stride=512, window=1),
    Fixed(block=128, summary=16),
    SlidingWindow(window=1024) | BigBird(block=64, window_blocks=1, global_blocks=0, random_blocks=3),
    PerHead(SlidingWindow(window=256), ((0, Dense()),)),
    PerHead(SlidingWindow(window=256), ((0, BigBird()), (1, Strided(stride=64, window=64)))),
    # stride runs: past the global tiles, with overlapping extra blocks, a stride that is no multiple of the tile
    Longformer(window=256, global_tokens=100) | Strided(stride=768, window=1),
    SlidingWindow(window=128) | BigBird(block=64, window_blocks=1, global_blocks=1, random_blocks=3)
    | Strided(stride=1000, window=1),
]


# per-head plans over four KV heads whose heads of one rule are not neighbours: the backward runs one launch
# per rule (dense + window; globals whose dK/dV is summed over split programs; random blocks on two heads)
SPLIT_PLANS = [
    parse_pattern("per_head[sliding_window:window=6;0=dense;2=dense]"),
    parse_pattern("per_head[longformer:window=5,global_tokens=3;1=sliding_window:window=7;3=dense]"),
    parse_pattern("per_head[sliding_window:window=9;1=bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=2;"
                  "3=bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=2;2=strided:stride=5,window=2]"),
]
SPLIT_SHAPES = [(1, 8, 4, 53, 16), (2, 12, 4, 70, 16)]  # GQA 2 and 3


@needs_interpreter
@pytest.mark.parametrize(("pattern", "split"), [*((p, True) for p in SPLIT_PLANS), (SPLIT_PLANS[1], False)],
                         ids=lambda x: ("split" if x else "one_launch") if isinstance(x, bool) else pid(x))
def test_per_head_backward_split_or_not_matches_oracle(pattern, split):
    from hf_sparse.kernels import configs

    configs.set_split_backward(split)
    try:
        for i, shape in enumerate(SPLIT_SHAPES):
            q, k, v, do = _qkv(*shape, seed=10 + i)
            _assert_matches_oracle(q, k, v, do, pattern, (q, k, v))
        b, hq, hkv, t, d = 3, 8, 4, 45, 16
        q, k, v, do = _qkv(b, hq, hkv, t, d, seed=4)
        kpm = torch.ones(b, t, dtype=torch.bool)
        kpm[0, :7] = False
        kpm[1, 38:] = False
        _assert_matches_oracle(q[:, :, -20:], k, v, do[:, :, -20:], pattern, (q, k, v), key_padding_mask=kpm,
                               q_offset=t - 20)
    finally:
        configs.set_split_backward(None)


@needs_interpreter
@pytest.mark.parametrize("pattern", SPLIT_PLANS, ids=pid)
def test_per_head_backward_launches_once_per_rule(pattern, monkeypatch):
    # one dQ and one dK/dV launch per distinct rule, over exactly that rule's KV heads; none per head
    import hf_sparse.kernels.gradients as grads

    b, hq, hkv, t, d = 2, 8, 4, 40, 16
    launches = {"dq": [], "dkdv": []}
    for name, key in (("_bwd_dq_kernel", "dq"), ("_bwd_dkdv_kernel", "dkdv")):
        kernel = getattr(grads, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, key=key):
                def launch(*args, **kw):
                    launches[key].append((grid[1], kw["HEAD_MAP"], kw["PER_HEAD"]))
                    return kernel[grid](*args, **kw)
                return launch

        monkeypatch.setattr(grads, name, Spy())
    plan = kernel_plan(pattern, hkv)
    assert plan.per_head is not None and 2 <= len(plan.groups) < hkv
    assert sorted(h for heads, _ in plan.groups for h in heads) == list(range(hkv))
    for heads, sub in plan.groups:  # each group is its rule alone: the plan of the head's own pattern
        alone = kernel_plan(pattern.pattern_of(heads[0]), hkv)
        assert sub.per_head is None and sub.rules == alone.rules and sub.kind == alone.kind
    q, k, v, do = _qkv(b, hq, hkv, t, d)
    o = sparse_attention(q, k, v, pattern, backend="triton")
    torch.autograd.grad(o, (q, k, v), do)
    sizes = [len(heads) for heads, _ in plan.groups]
    assert [(n, m, p) for n, m, p in launches["dkdv"]] == [(b * s, True, False) for s in sizes]
    pack = {n // (b * s) for (n, _, _), s in zip(launches["dq"], sizes)}
    assert len(launches["dq"]) == len(sizes) and pack <= {1, hq // hkv}
    assert all(m and not p for _, m, p in launches["dq"])

    from hf_sparse.kernels import configs

    launches["dq"].clear()
    launches["dkdv"].clear()
    configs.set_split_backward(False)
    try:
        torch.autograd.grad(sparse_attention(q, k, v, pattern, backend="triton"), (q, k, v), do)
    finally:
        configs.set_split_backward(None)
    assert launches["dkdv"] == [(b * hkv, False, True)] and len(launches["dq"]) == 1


@needs_interpreter
@pytest.mark.parametrize("pack", [True, False], ids=["gqa-packed", "head-per-program"])
def test_per_head_split_backward_gqa_ratios_and_packing(pack, monkeypatch):
    # a split launch maps program -> (batch row, KV head from HMAP, first query head): with the GQA group packed
    # into a tile's rows (one program per KV head) or one query head per program (GROUP programs per KV head),
    # for GQA 4 and MHA, over two batch rows
    from hf_sparse.kernels import configs

    monkeypatch.setitem(configs._SETTINGS, "pack", pack)
    for i, shape in enumerate([(2, 16, 4, 29, 16), (2, 4, 4, 29, 16)]):
        q, k, v, do = _qkv(*shape, seed=30 + i)
        _assert_matches_oracle(q, k, v, do, SPLIT_PLANS[1], (q, k, v))


def _assert_lse_matches_oracle(q, grads_of, pattern, atol=3e-5, **kw):
    """Outputs, lse and the gradients of a loss that uses both (``d_lse``), kernels against the dense oracle."""
    from test_lse import _loss_grads

    k, v = grads_of[1:]
    ours, want = (_loss_grads(q, k, v, pattern, backend, **kw) for backend in ("triton", "dense"))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, want):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{pattern.spec()} {name}: rows without keys differ"
        diff = (torch.nan_to_num(a, neginf=0.0) - torch.nan_to_num(b, neginf=0.0)).abs()
        assert diff.max() <= atol, f"{pattern.spec()} {name}: max {diff.max():.2e} at {int(diff.argmax())}"


@needs_interpreter
def test_per_head_split_non_causal_globals_padding_and_lse(monkeypatch):
    # non-causal heads with globals of one key tile and of two (global query rows see every key) and a head
    # without: each launch splits its own global tiles over programs (one query tile each here) and sums them in
    # its own [B, NH, GP, D] buffer; rows padded on either side, a chunk from position 25, the lse output used
    import hf_sparse.kernels.gradients as grads

    monkeypatch.setattr(grads, "_SPLIT_TILES", 1)
    pattern = parse_pattern("per_head[longformer:window=4,global_tokens=3,causal=false;1=sliding_window:window=5,"
                            "causal=false;3=longformer:window=2,global_tokens=17,causal=false]")
    assert [heads for heads, _ in kernel_plan(pattern, 4).groups] == [(0, 2), (1,), (3,)]
    b, hq, hkv, t, d = 3, 8, 4, 45, 16
    q, k, v, _ = _qkv(b, hq, hkv, t, d, seed=31)
    kpm = padded_rows(b, t, right=38)
    _assert_lse_matches_oracle(q, (q, k, v), pattern, key_padding_mask=kpm)
    _assert_lse_matches_oracle(q[:, :, 25:], (q, k, v), pattern, key_padding_mask=kpm, q_offset=25)


@needs_interpreter
def test_per_head_split_random_heads_of_one_rule_past_the_keys():
    # BigBird heads with equal rules but 1 and 3 random blocks share a launch that reads the plan's table (as wide
    # as its widest head); queries standing past the last key, so the random blocks of the last, partial key block
    # are visited masked; softcap
    pattern = parse_pattern("per_head[sliding_window:window=7;1=bigbird:block=16,window_blocks=1,global_blocks=1,"
                            "random_blocks=1;3=bigbird:block=16,window_blocks=1,global_blocks=1,random_blocks=3;2=dense]")
    assert [(heads, sub.r) for heads, sub in kernel_plan(pattern, 4).groups] == [((0,), 0), ((1, 3), 3), ((2,), 0)]
    q, k, v, do = _qkv(2, 8, 4, 40, 16, seed=32)
    _assert_matches_oracle(q, k, v, do, pattern, (q, k, v), q_offset=9, softcap=4.0)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("shape", [(2, 9, 3, 4113, 64), (1, 8, 2, 8192, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pattern", GPU_PATTERNS, ids=pid)
def test_gpu_bf16_error_rule(pattern, shape):
    from test_kernels import _bf16_rule

    _bf16_rule(*shape, pattern)
    b, hq, hkv, t, d = shape
    _bf16_rule(b, hq, hkv, t, d, pattern, q_offset=t - 3)  # the decode kernel
