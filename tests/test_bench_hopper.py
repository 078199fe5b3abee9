"""``python -m hf_sparse.eval.bench_hopper``: the mask arithmetic it hands FA4 and Flex's FLASH backend,
and on the CPU its arguments, rows, deadline and per-variant failures (the GPU variants skipped with a reason)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hf_sparse.eval import bench_hopper as bh

from hf_sparse import BigBird, Fixed, Longformer, PerHead, SlidingWindow, Strided, block_mask, sparse_attention

pytestmark = pytest.mark.usefixtures("one_thread")

# the benchmark's patterns at a scale a 768-token dense oracle can hold (tiles of bh.TILE = 128 tokens), and
# Fixed for the key-column rule
PATTERNS = [
    SlidingWindow(window=200),
    Longformer(window=300, global_tokens=64),
    BigBird(block=128, random_blocks=3),
    Strided(stride=96, window=64),
    SlidingWindow(window=160) | Strided(stride=256),
    Fixed(block=128, summary=16),
]
T = 768


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.spec()[:40])
def test_rules_hold_in_every_partial_tile(pattern):
    """FA4 and Flex FLASH evaluate the rules' mask_mod in the partial tiles only: there it must equal the
    pattern's predicate, full tiles must be all visible and unlisted tiles all hidden."""
    hkv = 2
    bm = block_mask(pattern, T, T, heads=hkv, kv_heads=hkv, block_size=bh.TILE)
    pos = torch.arange(T)
    rules = bh.rules_visible(pos[:, None], pos[None, :], int, bh.rule_constants(pattern))
    nt = T // bh.TILE
    for h in range(hkv):
        allowed = pattern.allowed(pos[:, None], pos[None, :], kv_head=h, num_keys=T)
        tiles = torch.zeros(nt, nt, dtype=torch.long)  # 0 unlisted, 1 partial, 2 full
        for kind, cnt, idx in ((1, bm.kv_num_blocks, bm.kv_indices), (2, bm.full_kv_num_blocks, bm.full_kv_indices)):
            hh = min(h, cnt.shape[1] - 1)
            for m in range(nt):
                tiles[m, idx[0, hh, m, : int(cnt[0, hh, m])].long()] = kind
        per_token = tiles.repeat_interleave(bh.TILE, 0).repeat_interleave(bh.TILE, 1)
        assert (tiles == 1).any()
        assert torch.equal(rules[per_token == 1], allowed[per_token == 1]), f"head {h}: rules differ in a partial tile"
        assert allowed[per_token == 2].all() and not allowed[per_token == 0].any()


@pytest.mark.parametrize("pattern", [
    PerHead(SlidingWindow(window=64), ((0, Strided(stride=8)),)),
    SlidingWindow(window=64, causal=False),
    BigBird(block=64, random_blocks=2),
], ids=["per_head", "non_causal", "bigbird_block_64"])
def test_rules_refuse_what_one_mask_mod_cannot_say(pattern):
    with pytest.raises(NotImplementedError, match="bigbird|causal|heads"):
        bh.rule_constants(pattern)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_flash_block_mask_matches_reference(monkeypatch):
    """The FLASH variant's BlockMask (our tiles, the rules as its mask_mod) through eager Flex on the CPU,
    against the reference path. Eager Flex reads the mask_mod alone, so patterns without extra blocks."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(bh, "_FLEX", [flex_attention])
    g = torch.Generator().manual_seed(0)
    t = 384
    q = torch.randn(1, 4, t, 32, generator=g)
    k, v = (torch.randn(1, 2, t, 32, generator=g) for _ in range(2))
    for pattern in (Longformer(window=100, global_tokens=16), SlidingWindow(window=100) | Strided(stride=64)):
        fn, opts, _ = bh.variant("flex_flash", pattern, dict(t=t, hq=4, hkv=2, device=torch.device("cpu")), "reference")
        assert opts == {"BACKEND": "FLASH"}
        torch.testing.assert_close(fn(q, k, v), sparse_attention(q, k, v, pattern, backend="reference"), atol=1e-5, rtol=1e-5)


def _run(tmp_path, *extra):
    out = tmp_path / "hopper.jsonl"
    argv = ["--shapes", "2/1/16", "--lengths", "128", "--patterns", "sliding_window:window=32", "--backend",
            "reference", "--out", str(out), "--markdown", str(tmp_path / "hopper.md"), *extra]
    bh.main(argv)
    return [json.loads(line) for line in out.read_text().splitlines()], (tmp_path / "hopper.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_cpu_run_writes_rows_and_skips_gpu_variants(tmp_path):
    rows, md = _run(tmp_path)
    by = {(r["impl"], r["pattern"].split(",")[0], r["pass"]): r for r in rows}
    assert len(rows) == 12  # dense: sdpa, fa4; pattern: hf_sparse, fa4, flex, flex_flash; two passes each
    for impl in ("fa4", "flex", "flex_flash"):
        assert by[(impl, "sliding_window:window=32", "fwd")]["status"] == f"skipped: {impl} needs a CUDA GPU (this run: cpu)"
    ours, sdpa = by[("hf_sparse", "sliding_window:window=32", "fwd_bwd")], by[("sdpa", "dense_causal", "fwd_bwd")]
    assert ours["status"] == sdpa["status"] == "ok" and ours["check"] == "reference"
    pairs = sum(min(i + 1, 32) for i in range(128))
    assert ours["attended_pairs"] == pairs and sdpa["attended_pairs"] == 128 * 129 // 2
    assert ours["tflops"] == pytest.approx(3.5 * 4 * 16 * 2 * pairs / (ours["median_ms"] * 1e-3) / 1e12)
    assert ours["share_of_sdpa_tflops"] == pytest.approx(ours["tflops"] / sdpa["tflops"])
    assert ours["command"].startswith("python -m hf_sparse.eval.bench_hopper --shapes 2/1/16")
    assert {"gpu", "torch", "triton", "commit", "flash-attn-4", "nvidia-cutlass-dsl"} <= ours.keys()
    assert "| 2/1/16 | 128 | sliding_window:window=32,causal=true | fwd | flex | - |" in md


def test_deadline_writes_skipped_rows(tmp_path):
    rows, _ = _run(tmp_path, "--deadline-s", "1e-9", "--impls", "sdpa,hf_sparse")
    assert [r["impl"] for r in rows] == ["sdpa", "sdpa", "hf_sparse", "hf_sparse"]
    assert all(r["status"] == "skipped: --deadline-s 1e-09 reached" for r in rows)


def test_a_failing_variant_is_a_row_not_a_crash(tmp_path, monkeypatch):
    real = bh.variant

    def broken(impl, *a, **kw):
        if impl == "hf_sparse":
            raise RuntimeError("no kernel for this card\nsecond line")
        return real(impl, *a, **kw)

    monkeypatch.setattr(bh, "variant", broken)
    rows, md = _run(tmp_path, "--impls", "sdpa,hf_sparse", "--passes", "fwd")
    assert [(r["impl"], r["status"]) for r in rows] == [
        ("sdpa", "ok"), ("hf_sparse", "failed: RuntimeError: no kernel for this card")]
    assert "failed: RuntimeError: no kernel for this card |" in md


def test_time_limit_interrupts_a_long_variant():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="limit of 0 s"), bh.time_limit(0.2):
        while True:
            time.sleep(0.01)
    assert time.monotonic() - t0 < 2


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown \\['fa3'\\]"):
        _run(tmp_path, "--impls", "sdpa,fa3")


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.spec()[:40])
def test_gpu_fa4_block_sparse_matches_reference(pattern):
    """FA4 with our block tables and the rules' CuTe mask_mod, forward and gradients, against the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flash_attn.cute", reason="needs flash-attn-4 (the optional FA4 comparison)")
    g = torch.Generator(device="cuda").manual_seed(0)
    t, hq, hkv, d = 1024, 4, 2, 128
    q, do = (torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    fn, _, _ = bh.variant("fa4", pattern, dict(t=t, hq=hq, hkv=hkv, device=q.device), "triton")
    got = bh._outputs(fn, q, k, v, do, True)
    want = bh._outputs(lambda a, b, c: sparse_attention(a.float(), b.float(), c.float(), pattern, backend="reference"),
                       q, k, v, do.float(), True)
    errs = bh._relative_errors(got, want)
    assert all(e < bh.MISMATCH for e in errs.values()), errs
