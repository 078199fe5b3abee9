"""Review of GQA packing in the forward and dQ kernels (rows f = position * PACK + head_in_group).

Everything runs in Triton's interpreter (``TRITON_INTERPRET=1``): the kernels against the reference path,
outputs and the gradients of q, k and v, with packing forced on (``configs.set_pack(True)``) and off
(``set_pack(False)``). The cases aim at the packed geometry: groups that do not divide the tile (3, 6),
groups as large as the tile or larger (8, 16, 24 rows per position with 16-row tiles: a tile holds a
part of one position), MQA, rectangular tile overrides (32x16, 64x16, 16x32) over 16- and 32-token
BigBird blocks, ``q_offset`` chunks whose first flat row is not tile-aligned, batch rows with different
paddings, tiny query counts on the prefill kernels (``_DECODE_MAX_ROWS = 0``), fp16, softcap, scale,
head dim 24 and non-contiguous (``[B, T, H, D]``-strided) inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_sparse import BigBird, Dense, Longformer, SlidingWindow, sparse_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET and not HAS_CUDA), reason="needs TRITON_INTERPRET=1 on a machine without CUDA"
)

pytestmark = [needs_interpreter, pytest.mark.usefixtures("one_thread")]


def _qkv(b, hq, hkv, tq, tk, d, *, dtype=torch.float32, seed=0, bthd=False):
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (leaves), do; ``bthd``: strided like HF's transposed views."""
    g = torch.Generator().manual_seed(seed)

    def mk(h, t):
        if bthd:
            return torch.randn(b, t, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(b, h, t, d, generator=g).to(dtype)

    q, k, v = mk(hq, tq), mk(hkv, tk), mk(hkv, tk)
    do = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _mask(b, tk, pads):
    """Key padding mask from ``(left, right)`` padding per batch row."""
    m = torch.ones(b, tk, dtype=torch.bool)
    for i, (left, right) in enumerate(pads):
        m[i, :left] = False
        if right:
            m[i, tk - right:] = False
    return m


def _run(q, k, v, do, pattern, backend, **kwargs):
    o = sparse_attention(q, k, v, pattern, backend=backend, **kwargs)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _errors(a, b):
    return {n: (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
            for n, x, y in zip(("out", "dq", "dk", "dv"), a, b)}


class _Setup:
    """Force packing on/off, tile overrides and the decode threshold; record the PACK each launch used."""

    def __init__(self, monkeypatch, pack, tiles=None, decode_rows=None, tma=None):
        import hf_sparse.kernels as kernels
        from hf_sparse.kernels import configs

        self.configs, self.pack, self.tiles, self.tma = configs, pack, tiles or {}, tma
        self.packs = []
        orig = kernels._pack
        monkeypatch.setattr(kernels, "_pack", lambda c, cfg: self.packs.append(orig(c, cfg)) or self.packs[-1])
        if decode_rows is not None:
            monkeypatch.setattr(kernels, "_DECODE_MAX_ROWS", decode_rows)

    def __enter__(self):
        self.configs.set_pack(self.pack)
        if self.tma is not None:
            self.configs.set_tma(self.tma)
        for name, cfg in self.tiles.items():
            self.configs.override(name, cfg)
        return self

    def __exit__(self, *exc):
        self.configs.set_pack(None)
        self.configs.set_tma(None)
        for name in ("fwd", "dq", "dkdv"):
            self.configs.override(name, None)
        return False


def _check(monkeypatch, pack, q, k, v, do, pattern, *, tiles=None, decode_rows=None, tma=None, atol=3e-5,
           **kwargs):
    """Kernels (packing forced on/off) against the reference: outputs and all three gradients. Returns
    the kernels' results and the PACK values the forward/dQ launches used."""
    with _Setup(monkeypatch, pack, tiles, decode_rows, tma) as s:
        ours = _run(q, k, v, do, pattern, "triton", **kwargs)
    ref = _run(q, k, v, do, pattern, "reference", **kwargs)
    for name, x in zip(("out", "dq", "dk", "dv"), ours):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
    errs = _errors(ours, ref)
    assert max(errs.values()) <= atol, f"pack={pack}: {errs}"
    group = q.shape[1] // k.shape[1]
    if s.packs:  # prefill kernels ran (at least the dQ kernel): forced packing reached them
        assert set(s.packs) == {group if pack else 1}, s.packs
    return ours, s.packs


def _cfg(bm, bn, pack=True):
    from hf_sparse.kernels.configs import KernelConfig

    return KernelConfig(bm, bn, 4, 2, pack=pack)


def _tiles(bm, bn, pack=True):
    return {"fwd": _cfg(bm, bn, pack), "dq": _cfg(bm, bn, pack)}


PACKS = pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])


# ---------------------------------------------------------------------------------------------
# groups that cut positions across tiles, groups >= the tile, MQA
@PACKS
@pytest.mark.parametrize(
    "hq,hkv,t,pattern",
    [
        (6, 2, 37, SlidingWindow(window=7)),  # group 3: tiles of 16 rows end mid-position
        (6, 1, 29, Longformer(window=9, global_tokens=3)),  # group 6
        (8, 1, 23, Longformer(window=6, global_tokens=5, causal=False)),  # MQA, 2 positions per tile
        (16, 1, 11, SlidingWindow(window=4)),  # group 16 == BLOCK_M: one position per tile
        (24, 2, 6, Dense()),  # group 12: tiles hold parts of two positions, one head of each KV group
    ],
    ids=["g3-sw7", "g6-lf9", "mqa8-lf6-noncausal", "g16-sw4", "g12-dense"],
)
def test_group_sizes(monkeypatch, pack, hq, hkv, t, pattern):
    q, k, v, do = _qkv(1, hq, hkv, t, t, 16, seed=hq + t)
    _check(monkeypatch, pack, q, k, v, do, pattern, decode_rows=0)


# ---------------------------------------------------------------------------------------------
# BigBird: flat tiles must never straddle a block (BLOCK_M divides the block, tiles flat-aligned)
BIGBIRD_CASES = [
    # (pattern, hq, hkv, tiles, t, q_offset)
    (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2), 6, 1, (32, 16), 50, 0),
    (BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=1, causal=False), 6, 2, (64, 16), 53, 0),
    (BigBird(block=32, window_blocks=1, global_blocks=1, random_blocks=1), 3, 1, (64, 16), 75, 0),
    (BigBird(block=32, window_blocks=2, global_blocks=0, random_blocks=1, causal=False), 4, 1, (32, 32), 70, 0),
    # a chunk after cached keys whose first flat row (q_offset * group) is not tile aligned
    (BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2), 6, 2, (32, 16), 61, 21),
    (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False), 8, 1, (16, 16), 45, 13),
]


@PACKS
@pytest.mark.parametrize("case", BIGBIRD_CASES, ids=lambda c: f"bb{c[0].block}-{'c' if c[0].causal else 'nc'}"
                         f"-g{c[1] // c[2]}-{c[3][0]}x{c[3][1]}-off{c[5]}")
def test_bigbird_blocks(monkeypatch, pack, case):
    pattern, hq, hkv, (bm, bn), t, off = case
    q, k, v, do = _qkv(1, hq, hkv, t, t, 16, seed=t + off)
    qq, dd = q[:, :, off:], do[:, :, off:]
    _check(monkeypatch, pack, qq, k, v, dd, pattern, tiles=_tiles(bm, bn, pack), q_offset=off)


# ---------------------------------------------------------------------------------------------
# padding: batch rows with left, right, both and no padding; padding plus a q_offset chunk
@PACKS
@pytest.mark.parametrize(
    "pattern,tiles",
    [
        (Longformer(window=5, global_tokens=20, causal=False), (32, 16)),  # global rows wider than a tile
        (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False), (32, 16)),
        (SlidingWindow(window=10), (64, 16)),
        (BigBird(block=32, window_blocks=1, global_blocks=1, random_blocks=1), (16, 32)),
    ],
    ids=["lf5-g20-noncausal", "bb16-noncausal", "sw10", "bb32"],
)
def test_padding_per_row(monkeypatch, pack, pattern, tiles):
    b, hq, hkv, t = 4, 3, 1, 44
    q, k, v, do = _qkv(b, hq, hkv, t, t, 16, seed=31)
    kpm = _mask(b, t, [(7, 0), (0, 13), (3, 5), (0, 0)])
    _check(monkeypatch, pack, q, k, v, do, pattern, tiles=_tiles(*tiles, pack), key_padding_mask=kpm)
    off = 30
    _check(monkeypatch, pack, q[:, :, off:], k, v, do[:, :, off:], pattern, tiles=_tiles(*tiles, pack),
           key_padding_mask=kpm, q_offset=off)


# ---------------------------------------------------------------------------------------------
# tiny query counts on the prefill kernels (and the default route: decode forward, packed dQ)
@PACKS
@pytest.mark.parametrize("tq", [1, 2, 3])
def test_tiny_query_counts(monkeypatch, pack, tq):
    b, hq, hkv, tk = 2, 6, 2, 40
    q, k, v, do = _qkv(b, hq, hkv, tk, tk, 16, seed=tq)
    kpm = _mask(b, tk, [(0, 0), (9, 2)])
    patterns = [Longformer(window=7, global_tokens=3),
                BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False)]
    for pattern in patterns:
        for off in (tk - tq, 17):
            for decode_rows in (0, None):
                _check(monkeypatch, pack, q[:, :, :tq], k, v, do[:, :, :tq], pattern, decode_rows=decode_rows,
                       q_offset=off, key_padding_mask=kpm, layer=1)
    # no padding, queries past the last key (real rows), window / global patterns
    _check(monkeypatch, pack, q[:, :, :tq], k[:, :, :20], v[:, :, :20], do[:, :, :tq],
           Longformer(window=12, global_tokens=2), decode_rows=0, q_offset=23)


# ---------------------------------------------------------------------------------------------
# dtypes, softcap, scale, head dim 24 (masked head dims), non-contiguous inputs, pointer/descriptor loads
@PACKS
def test_fp16_softcap_scale_head_dim_24(monkeypatch, pack):
    q, k, v, do = _qkv(2, 6, 2, 35, 35, 24, seed=5)
    kpm = _mask(2, 35, [(4, 0), (0, 6)])
    for pattern in (SlidingWindow(window=8), Longformer(window=6, global_tokens=2, causal=False)):
        _check(monkeypatch, pack, q, k, v, do, pattern, tiles=_tiles(32, 16, pack), softcap=5.0, scale=0.3,
               key_padding_mask=kpm)
    q16, k16, v16 = (x.detach().half().requires_grad_() for x in (q, k, v))
    for pattern in (Dense(), BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=1)):
        _check(monkeypatch, pack, q16, k16, v16, do.half(), pattern, atol=1e-2, softcap=3.0)


@PACKS
@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tensor-descriptors"])
def test_bthd_strided_inputs(monkeypatch, pack, tma):
    # HF hands q/k/v in as [B, T, H, D] transposed views: head and position strides swapped
    q, k, v, do = _qkv(2, 8, 2, 39, 39, 32, seed=9, bthd=True)
    for pattern in (Longformer(window=9, global_tokens=3),
                    BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=1)):
        _check(monkeypatch, pack, q[:, :, 7:], k, v, do[:, :, 7:], pattern, tma=tma, q_offset=7)


# ---------------------------------------------------------------------------------------------
# packed and unpacked kernels agree with each other (tighter than against the reference)
def test_packed_equals_unpacked(monkeypatch):
    q, k, v, do = _qkv(2, 6, 2, 47, 47, 16, seed=13)
    kpm = _mask(2, 47, [(5, 0), (0, 9)])
    pattern = BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2)
    outs = []
    for pack in (True, False):
        with _Setup(monkeypatch, pack, _tiles(32, 16, pack), decode_rows=0):
            outs.append(_run(q, k, v, do, pattern, "triton", key_padding_mask=kpm))
    errs = _errors(*outs)
    assert max(errs.values()) <= 5e-6, errs


# ---------------------------------------------------------------------------------------------
# bug found in review: causal BigBird with queries past the last key (no padding). The forward puts causal
# random blocks in its unmasked loop; a random block that lies partly past Tk is then read unmasked (pointer
# loads: past the end of k/v; tensor descriptors: zeros) and its missing keys enter the softmax. Not
# specific to packing (both settings fail); the decode kernel and the backward kernels are right.
@pytest.mark.xfail(strict=True, reason="forward: causal BigBird random blocks partly past Tk are read unmasked "
                   "(queries past the keys, no padding)")
@PACKS
@pytest.mark.parametrize("tma", [False, None], ids=["pointer-loads", "auto-loads"])
def test_bigbird_causal_random_block_past_the_keys(monkeypatch, pack, tma):
    # one query at position 32 (block 2) over 20 keys: seed 1 draws random block 1 = keys 16..31 for
    # query block 2, of which only 16..19 exist
    pattern = BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=1, seed=1)
    assert pattern.random_table(layer=0, kv_heads=1, num_q_blocks=3)[0, 2, 0] == 1
    q, k, v, do = _qkv(1, 1, 1, 1, 20, 16, seed=1)
    _check(monkeypatch, pack, q, k, v, do, pattern, tma=tma, decode_rows=0, q_offset=32)
