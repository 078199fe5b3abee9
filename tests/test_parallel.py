"""Context parallel (``hf_sparse.parallel``): sharded attention equals the single-process result.

The distributed cases run in 2 and 4 gloo processes, started once per world size
(:mod:`parallel_workers`); every rank compares its shard of the output and of dQ, dK, dV with
:func:`hf_sparse.sparse_attention` on the whole sequence (reference backend) computed from the same
seed. The plan tests check what travels: the halo, the globals and the drawn blocks, not the sequence.
"""

from __future__ import annotations

import pytest
import torch
from helpers import COMPOSED, Parity, needs_interpreter
from parallel_workers import attention_case_names, spawn

from hf_sparse import BigBird, Dense, Longformer, PerHead, SlidingWindow, Strided, parallel, sparse_attention
from hf_sparse.layout import random_table
from hf_sparse.ops import _backward_impl, _forward_impl
from hf_sparse.parallel.attention import _keys, _merge
from hf_sparse.parallel.plan import shard_plan

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


CASES = [(case, world) for world in (2, 4) for case in attention_case_names(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every attention case on 4 ranks and on a 2-rank subgroup, in one start of 4 processes:
    ``{"CASE@W": worst errors over the ranks}``."""
    return spawn(4, "attention_case", [f"{c}@{w}" for c, w in CASES], tmp_path_factory.mktemp("parallel"))


@pytest.mark.parametrize("case,world", CASES, ids=[f"{c}-{w}" for c, w in CASES])
def test_sharded_equals_whole(results, world, case):
    res = results[f"{case}@{world}"]
    assert "error" not in res, res.get("error")
    if case == "capped-refused":
        assert res == {"refused": 1.0}
        return
    tol = TOL[torch.float32] if case.startswith("sw5") else TOL[torch.float64]
    assert set(res) == {"out", "dq", "dk", "dv"}
    bad = {k: v for k, v in res.items() if v > tol}
    assert not bad, f"{case} on {world} ranks: max abs errors {res}"


# ---------------------------------------------------------------------------------------------
# the plan: what each rank receives
def test_window_moves_only_the_halo():
    """1M tokens on 8 ranks, window 4096 + 4 globals: each rank receives W - 1 + 4 keys, whatever T is."""
    n, world, w = 1 << 20, 8, 4096
    plan = shard_plan(Longformer(window=w, global_tokens=4), parallel.balanced_lengths(n, world), kv_heads=8)
    assert plan.received(0) == (0, 0)
    for r in range(1, world):
        assert plan.received(r) == (w - 1 + 4, 0)
        assert plan.overlapped(r)
        # the halo's call runs on the first W - 1 query rows only; the global keys reach every row
        own, globals_, halo = plan.pieces(r)
        assert (own.rows, globals_.rows, halo.rows) == ((0, n // world),) * 2 + ((0, w - 1),)
    # shards of 2000 tokens: the last rank's 4095-key halo comes from the three ranks before it
    short = shard_plan(SlidingWindow(window=w), (2000,) * 4, kv_heads=1)
    assert short.shared[3] == ((1905, 6000),)
    assert [short.shared_from(3, r) for r in range(3)] == [((1905, 2000),), ((2000, 4000),), ((4000, 6000),)]


def test_bigbird_moves_the_drawn_blocks_per_head():
    """BigBird: halo blocks and global blocks for every head, and per KV head exactly the random blocks
    that head's query blocks draw outside the rank's runs -- checked against the table itself."""
    pattern = BigBird(block=64, window_blocks=3, global_blocks=1, random_blocks=3)
    n, world, hkv, layer = 64 * 256, 4, 2, 5
    plan = shard_plan(pattern, parallel.balanced_lengths(n, world, multiple_of=64), kv_heads=hkv, layer=layer)
    table = random_table(pattern, layer=layer, kv_heads=hkv, num_q_blocks=256, num_k_blocks=256)
    for r in range(1, world):
        s, e = plan.shard(r)
        assert plan.shared[r] == ((0, 64), (s - 128, s))
        for h in range(hkv):
            drawn = {int(x) for x in table[h, s // 64 : e // 64].flatten() if x >= 0}
            assert set(plan.blocks[r][h]) == {kb for kb in drawn if 1 <= kb < s // 64 - 2}
        shared, extra = plan.received(r)
        assert extra == 64 * sum(len(b) for b in plan.blocks[r])
        assert extra <= 64 * hkv * 3 * (e - s) // 64  # at most r blocks per query block and head
    assert plan.received_bytes(3, batch=1, head_dim=128) == 1 * 256 * 2 * (192 * hkv + plan.received(3)[1])


def test_reaching_everywhere_gathers_earlier_shards():
    for pattern in (Dense(), Strided(stride=64), Parity()):
        plan = shard_plan(pattern, (100, 100, 100), kv_heads=1)
        assert [plan.shared[r] for r in range(3)] == [(), ((0, 100),), ((0, 200),)]


def test_balanced_lengths():
    assert parallel.balanced_lengths(1000, 3) == (333, 333, 334)
    assert parallel.balanced_lengths(1000, 3, multiple_of=64) == (320, 320, 360)
    assert parallel.balanced_lengths(10, 4, multiple_of=64) == (0, 0, 0, 10)
    with pytest.raises(ValueError, match="multiple_of"):
        parallel.balanced_lengths(10, 2, multiple_of=0)


# ---------------------------------------------------------------------------------------------
# the pieces, without processes: each rank's calls over keys cut from the whole sequence
def _simulate(pattern, lengths, *, hq=4, hkv=2, d=8, layer=1, dtype=torch.float64, backend="reference"):
    """Every rank's pieces with buffers filled from the whole sequence (what the exchange delivers), forward
    and backward with the merged output; returns (errors of out, dq, dk, dv) against the whole sequence."""
    n = sum(lengths)
    g = torch.Generator().manual_seed(n)
    q, k, v, do = (torch.randn(1, h, n, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv, hq))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ref = sparse_attention(q, k, v, pattern, layer=layer, backend="reference")
    ref.backward(do)
    plan = shard_plan(pattern, tuple(lengths), kv_heads=hkv, layer=layer)
    kv = torch.cat([k, v], -1).detach()
    out, dq, dkv = torch.zeros_like(ref), torch.zeros_like(q), torch.zeros_like(kv)
    for r in range(len(lengths)):
        s, e = plan.shard(r)
        if e == s:
            continue
        shared_pos = torch.cat([torch.arange(a, b) for a, b in plan.shared[r]] or [torch.zeros(0, dtype=torch.long)])
        shared = kv[:, :, shared_pos].permute(2, 1, 0, 3).clone().requires_grad_()
        view = plan.compact_view(r)
        packed, slots = None, 0
        if view is not None:
            pos = view._positions  # [Hkv, slots * blk]
            cells = kv[:, torch.arange(hkv)[:, None], pos.clamp(0)] * (pos >= 0)[None, :, :, None]
            packed = cells.permute(1, 2, 0, 3).reshape(hkv, view.slots, view.block, 1, 2 * d).clone().requires_grad_()
            slots = view.num_slots
        mine = [x.detach()[:, :, s:e].clone().requires_grad_() for x in (q, k, v)]
        parts, keys = [], []
        for piece in plan.pieces(r):
            kp, vp = _keys(piece, mine[1], mine[2], shared, packed, slots)
            keys.append((piece, kp, vp))
            rows = slice(*piece.rows)
            with torch.no_grad():  # as inside the autograd function
                parts.append(_forward_impl(mine[0][:, :, rows], kp, vp, None, None, piece.pattern, d**-0.5, 0.0,
                                           piece.q_offset, layer, backend))
        with torch.no_grad():
            o, lse = _merge(plan.pieces(r), parts, e - s)
        out[:, :, s:e] = o
        for piece, kp, vp in keys:  # the backward the autograd function runs, piece by piece
            rows = slice(*piece.rows)
            g_q, g_k, g_v = _backward_impl(do[:, :, s:e][:, :, rows], mine[0][:, :, rows], kp.detach(), vp.detach(),
                                           o[:, :, rows], lse[:, :, rows].contiguous(), None, None, piece.pattern,
                                           d**-0.5, 0.0,
                                           piece.q_offset, layer, backend)
            dq[:, :, s:e][:, :, rows] += g_q.detach()
            torch.autograd.backward([kp, vp], [g_k, g_v], retain_graph=True)
        dkv[:, :, s:e] += torch.cat([mine[1].grad, mine[2].grad], -1) if mine[1].grad is not None else 0
        if shared.grad is not None:
            dkv[:, :, shared_pos] += shared.grad.permute(2, 1, 0, 3)
        if packed is not None and packed.grad is not None:
            flat = packed.grad.reshape(hkv, -1, 1, 2 * d).permute(2, 0, 1, 3)  # [1, Hkv, slots * blk, 2D]
            ok = pos >= 0
            for h in range(hkv):
                dkv[:, h].index_add_(1, pos[h][ok[h]], flat[:, h][:, ok[h]])
    want_kv = torch.cat([k.grad, v.grad], -1)
    return tuple(float((a - b).detach().abs().max()) for a, b in ((out, ref), (dq, q.grad), (dkv, want_kv)))


def _sim_id(x) -> str:
    return x.spec()[:24] if hasattr(x, "spec") else "-".join(map(str, x))


SIMULATED = [
    (BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2), (64, 32, 33, 31)),
    (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=3, causal=False), (20, 20, 21, 30)),
    (Longformer(window=7, global_tokens=3), (0, 20, 21, 30)),
    (PerHead(SlidingWindow(window=9), ((0, Dense()), (1, Strided(stride=6, window=2)))), (30, 40)),
    (PerHead(SlidingWindow(window=9), ((1, BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2)),)),
     (40, 24, 30)),
    (COMPOSED[5], (16, 17, 19, 21)),
    (Parity(), (12, 13, 14)),
]
KERNEL_CASES = SIMULATED[:6]  # those with kernel primitives (a predicate-only pattern runs on the reference)


@pytest.mark.parametrize("pattern,lengths", SIMULATED, ids=_sim_id)
def test_pieces_reference(pattern, lengths, one_thread):
    errs = _simulate(pattern, lengths)
    assert max(errs) < 1e-10, errs


@needs_interpreter
@pytest.mark.parametrize("pattern,lengths", KERNEL_CASES, ids=_sim_id)
def test_pieces_kernels(pattern, lengths):
    """The kernels (forward, backward) take the shifted and packed patterns of the pieces like any other."""
    errs = _simulate(pattern, lengths, d=16, dtype=torch.float32, backend="triton")
    assert max(errs) < 2e-5, errs


# ---------------------------------------------------------------------------------------------
def test_errors_name_the_fix():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.sparse_attention(q, q, q, "sliding_window:window=4")
    with pytest.raises(ValueError, match="T_rank=8 but k has 6"):
        parallel.sparse_attention(q, q[:, :, :6], q[:, :, :6], "sliding_window:window=4")
    with pytest.raises(ValueError, match="backend='dense'"):
        parallel.sparse_attention(q, q, q, "dense", backend="dense")
