"""``python -m hf_sparse.eval.bench_decode`` on the CPU: rows, the share of tiles a pattern hits, the table."""

import json

from hf_sparse.eval import bench_decode


def test_tiles_hit_counts_the_tiles_holding_a_pair():
    import torch

    from hf_sparse import parse_pattern

    # one query at 511 through stride 128 (window 1) sees keys 511, 383, 255, 127: tiles 1, 3, 5, 7 of 8
    pattern = parse_pattern("strided:stride=128,window=1")
    assert bench_decode.tiles_hit(pattern, torch.tensor([511]), 512, 2) == 0.5
    # a window of 64 ending at 511 lies in tile 7 alone; dense sees all
    assert bench_decode.tiles_hit(parse_pattern("sliding_window:window=64"), torch.tensor([511]), 512, 1) == 1 / 8
    assert bench_decode.tiles_hit(parse_pattern("dense"), torch.tensor([511]), 512, 1) == 1.0


def test_bench_decode_writes_rows_and_a_table(tmp_path, capsys):
    out = tmp_path / "decode.jsonl"
    rc = bench_decode.main(["--device", "cpu", "--shapes", "4/2/16", "--lengths", "512", "--batch", "1",
                            "--patterns", "strided:stride=128,window=1", "--backend", "reference", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["sdpa", "hf_sparse", "hf_sparse_positions"]
    ours = rows[1:]
    assert all(r["tiles_hit"] == 0.5 and r["max_abs_diff"] < 1e-5 and r["seq_len"] == 512 for r in ours)
    assert all("bench_decode" in r["command"] and r["median_ms"] > 0 for r in rows)
    assert "strided:stride=128,window=1" in capsys.readouterr().out
