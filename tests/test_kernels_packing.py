"""GQA packing in the forward and dQ kernels (rows f = position * PACK + head_in_group), adversarial cases.

Everything runs in Triton's interpreter (``TRITON_INTERPRET=1``): the kernels against the reference path,
outputs and the gradients of q, k and v, with packing forced on (``configs.set_pack(True)``) and off
(``set_pack(False)``). The cases aim at the packed geometry: groups that do not divide the tile (3, 6),
groups close to or as large as the tile (8, 12, 16 rows per position with 16-row tiles: a tile may hold
part of a position only), MQA, rectangular tile overrides (32x16, 64x16, 16x32) over 16- and 32-token
BigBird blocks, ``q_offset`` chunks whose first flat row is not tile-aligned, batch rows with different
paddings, tiny query counts on the prefill kernels (``_DECODE_MAX_ROWS = 0``), fp16, softcap, scale,
head dim 24 and non-contiguous (``[B, T, H, D]``-strided) inputs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_interpreter

from hf_sparse import BigBird, Dense, Longformer, SlidingWindow, sparse_attention

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
        import hf_sparse.kernels.prefill as kernels
        from hf_sparse.kernels import configs

        self.configs, self.pack, self.tiles, self.tma = configs, pack, tiles or {}, tma
        self.packs = []
        orig = kernels._query_side_launch

        def recording(*args):
            grid, launch = orig(*args)
            self.packs.append(launch["PACK"])
            return grid, launch

        monkeypatch.setattr(kernels, "_query_side_launch", recording)
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
        (24, 2, 6, Dense()),  # group 12: a 16-row tile holds parts of two positions (12 + 4 heads)
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
    b, hq, hkv, t = 3, 3, 1, 40
    q, k, v, do = _qkv(b, hq, hkv, t, t, 16, seed=31)
    kpm = _mask(b, t, [(7, 0), (0, 13), (3, 5)])
    _check(monkeypatch, pack, q, k, v, do, pattern, tiles=_tiles(*tiles, pack), key_padding_mask=kpm)
    off = 27
    _check(monkeypatch, pack, q[:, :, off:], k, v, do[:, :, off:], pattern, tiles=_tiles(*tiles, pack),
           key_padding_mask=kpm, q_offset=off)


# ---------------------------------------------------------------------------------------------
# tiny query counts on the prefill kernels (and the default route: decode forward, packed dQ)
@PACKS
@pytest.mark.parametrize("tq,off", [(1, 39), (3, 17)], ids=["tq1", "tq3"])
def test_tiny_query_counts(monkeypatch, pack, tq, off):
    # group 3: the chunk's first flat row (off * 3) is not tile aligned; padded and unpadded batch rows
    b, hq, hkv, tk = 2, 6, 2, 40
    q, k, v, do = _qkv(b, hq, hkv, tq, tk, 16, seed=tq)
    kpm = _mask(b, tk, [(0, 0), (9, 0)])
    for pattern in (Longformer(window=7, global_tokens=3),
                    BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=2, causal=False)):
        _check(monkeypatch, pack, q, k, v, do, pattern, decode_rows=0, q_offset=off, key_padding_mask=kpm, layer=1)
    _check(monkeypatch, pack, q, k, v, do, SlidingWindow(window=9), q_offset=off, key_padding_mask=kpm)  # decode fwd
    # no padding, queries past the last key (real rows)
    _check(monkeypatch, pack, q, k[:, :, :20], v[:, :, :20], do, Longformer(window=12, global_tokens=2),
           decode_rows=0, q_offset=23)


# ---------------------------------------------------------------------------------------------
# dtypes, softcap, scale, head dim 24 (masked head dims), non-contiguous inputs, pointer/descriptor loads
def test_fp16_softcap_scale_head_dim_24(monkeypatch):
    q, k, v, do = _qkv(2, 6, 2, 35, 35, 24, seed=5)
    kpm = _mask(2, 35, [(4, 0), (0, 6)])
    _check(monkeypatch, True, q, k, v, do, Longformer(window=6, global_tokens=2, causal=False),
           tiles=_tiles(32, 16), softcap=5.0, scale=0.3, key_padding_mask=kpm)
    q16, k16, v16 = (x.detach().half().requires_grad_() for x in (q, k, v))
    _check(monkeypatch, True, q16, k16, v16, do.half(), BigBird(block=16, window_blocks=1, global_blocks=1,
                                                                random_blocks=1), atol=1e-2, softcap=3.0)


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tensor-descriptors"])
def test_bthd_strided_inputs(monkeypatch, tma):
    # HF hands q/k/v in as [B, T, H, D] transposed views: head and position strides swapped
    q, k, v, do = _qkv(2, 4, 1, 39, 39, 32, seed=9, bthd=True)
    pattern = Longformer(window=9, global_tokens=3) if tma else BigBird(block=16, window_blocks=2, global_blocks=1,
                                                                          random_blocks=1)
    _check(monkeypatch, True, q[:, :, 7:], k, v, do[:, :, 7:], pattern, tma=tma, q_offset=7)


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
# found in review (fixed): causal BigBird with queries past the last key (no padding, q_offset + Tq > Tk). The
# kernels ran causal random blocks in their unmasked loop; a random block lying partly past Tk was read
# without a mask (pointer loads: past the end of k/v; tensor descriptors: zeros) and the missing keys
# entered the softmax. Such calls now send those tiles' random blocks to the masked loop (``PAST_KEYS``).
@PACKS
@pytest.mark.parametrize("tma", [False, None], ids=["pointer-loads", "auto-loads"])
@pytest.mark.parametrize("hq,tq,decode_rows", [(1, 1, 0), (8, 9, None)], ids=["1-query-prefill", "72-rows"])
def test_bigbird_causal_random_block_past_the_keys(monkeypatch, pack, tma, hq, tq, decode_rows):
    # queries at positions 32.. (block 2) over 20 keys: seed 1 draws random block 1 = keys 16..31 for query
    # block 2, of which only 16..19 exist. k and v are views of 32-row buffers, so the unmasked read of
    # rows 20..31 stays inside memory (and sees keys that must not count)
    pattern = BigBird(block=16, window_blocks=1, global_blocks=0, random_blocks=1, seed=1)
    assert pattern.random_table(layer=0, kv_heads=1, num_q_blocks=3)[0, 2, 0] == 1
    q, k_full, v_full, do = _qkv(1, hq, 1, tq, 32, 16, seed=1)
    _check(monkeypatch, pack, q, k_full[:, :, :20], v_full[:, :, :20], do, pattern, tma=tma, decode_rows=decode_rows,
           q_offset=32)
