"""Process-group workers of the context-parallel tests (spawned, so at module level of an importable file).

:func:`spawn` starts ``world`` gloo processes once and runs a list of named cases in each; every rank
checks its own shard against the single-process result it computes itself from the same seed, and
writes its errors to a JSON file per rank; the parent reads them back, one dictionary per case.
"""

from __future__ import annotations

import json
import os
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def spawn(world: int, job: str, cases: list[str], folder: Path) -> dict[str, dict]:
    """Run ``cases`` of ``job`` (a function name in this module) on ``world`` gloo processes; the worst
    error of every case over the ranks (``{"out": .., "dq": ..}``, or ``{"error": message}``)."""
    failed = None
    try:
        mp.spawn(_main, args=(world, job, cases, str(folder)), nprocs=world, join=True)
    except ProcessException as err:  # one rank failed (or died); the others were stopped
        failed = str(err).strip().splitlines()[-1]
    merged: dict[str, dict] = {}
    for r in range(world):
        path = folder / f"rank{r}.json"
        for name, res in (json.loads(path.read_text()) if path.exists() else {}).items():
            into = merged.setdefault(name, {})
            for key, val in res.items():
                into[key] = val if key == "error" or key not in into else max(into[key], val)
    for name in cases:
        if failed and "error" not in merged.get(name, {}):
            merged.setdefault(name, {})["error"] = failed
    return merged


def _main(rank: int, world: int, job: str, cases: list[str], folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    groups = {world: None}
    if world == 4:
        groups[2] = dist.new_group([1, 3])  # every rank takes part in making it
    results = {}
    try:
        for case in cases:
            name, _, size = case.partition("@")
            size = int(size or world)
            if groups[size] is not None and rank not in (1, 3):
                continue
            try:
                results[case] = globals()[job](name, groups[size])
            except Exception as err:  # reported per case (the other ranks are stopped)
                where = traceback.extract_tb(err.__traceback__)[-1]
                results[case] = {"error": f"{type(err).__name__}: {err} ({where.filename}:{where.lineno})"}
                raise
    finally:
        Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# attention cases: (pattern, shard lengths per world size, B, Hq, Hkv, D, layer, dtype)
def _attention_cases():
    from helpers import COMPOSED, Parity

    from hf_sparse import BigBird, Dense, Longformer, PerHead, SlidingWindow, Strided

    bigbird = BigBird(block=16, window_blocks=2, global_blocks=1, random_blocks=2, seed=3)
    return {
        # windows shorter and longer than a shard; shards of odd lengths that do not divide by the world size
        "sw5": (SlidingWindow(window=5), {2: (37, 30), 4: (17, 20, 13, 21)}),
        "sw45-longer-than-shard": (SlidingWindow(window=45), {2: (23, 44), 4: (11, 19, 9, 30)}),
        "sw6-noncausal": (SlidingWindow(window=6, causal=False), {2: (31, 36), 4: (15, 16, 17, 19)}),
        "lf7-g3": (Longformer(window=7, global_tokens=3), {2: (32, 35), 4: (16, 16, 16, 19)}),
        "lf9-g5-noncausal": (Longformer(window=9, global_tokens=5, causal=False), {2: (30, 37), 4: (3, 20, 20, 24)}),
        "bigbird-aligned": (bigbird, {2: (48, 43), 4: (32, 16, 16, 27)}),
        "bigbird-odd": (bigbird, {2: (37, 54), 4: (21, 30, 17, 23)}),
        "bigbird-noncausal": (BigBird(block=16, window_blocks=1, global_blocks=1, random_blocks=3, causal=False),
                              {2: (45, 46), 4: (20, 20, 21, 30)}),
        "dense": (Dense(), {2: (30, 31), 4: (10, 20, 15, 16)}),
        "strided": (Strided(stride=5, window=3), {2: (29, 32), 4: (14, 15, 16, 16)}),
        "union-lf-bigbird": (COMPOSED[5], {2: (33, 40), 4: (16, 17, 19, 21)}),
        "union-sw-strided": (COMPOSED[4], {2: (33, 40), 4: (16, 17, 19, 21)}),
        "per-head-plan": (COMPOSED[6], {2: (33, 40), 4: (16, 17, 19, 21)}),
        "per-head-bigbird": (PerHead(SlidingWindow(window=9), ((1, bigbird),)), {2: (40, 41), 4: (20, 17, 23, 21)}),
        "predicate-only": (Parity(), {2: (25, 26), 4: (12, 13, 13, 13)}),
        "empty-shard": (Longformer(window=7, global_tokens=3), {2: (0, 41), 4: (20, 0, 11, 10)}),
        # a distance cap that no query reaches changes nothing (one that acts is refused, test_parallel.py)
        "capped-within": (Longformer(window=7, global_tokens=3, max_distance=80), {2: (32, 35), 4: (16, 16, 16, 19)}),
    }


_SHAPES = {  # B, Hq, Hkv, D, layer, dtype
    "default": (1, 4, 2, 8, 1, torch.float64),
    "bigbird-odd": (2, 6, 3, 8, 2, torch.float64),
    "sw5": (2, 4, 1, 8, 0, torch.float32),
}


def attention_case(name: str, group) -> dict:
    """Outputs and gradients of this rank's shard against the single-process reference on the whole sequence."""
    from hf_sparse import parallel, sparse_attention

    if name == "capped-refused":
        return _refused(group)
    base, _, how = name.partition(":")
    if how == "mesh":  # the cp dimension of a 2 x 2 (dp, cp) DeviceMesh, as in data x context parallel training
        from torch.distributed.device_mesh import init_device_mesh

        group = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))["cp"]
    pg = parallel.resolve_group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    pattern, lengths = _attention_cases()[base]
    lengths = lengths[world]
    b, hq, hkv, d, layer, dtype = _SHAPES.get(base, _SHAPES["default"])
    n = sum(lengths)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # str hash differs between processes
    q, k, v, do = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv, hq))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ref = sparse_attention(q, k, v, pattern, layer=layer, backend="reference")
    ref.backward(do)
    s = sum(lengths[:rank])
    e = s + lengths[rank]
    mine = [x.detach()[:, :, s:e].clone().requires_grad_() for x in (q, k, v)]
    given = lengths if how != "gathered" else None
    out = parallel.sparse_attention(*mine, pattern, group=group, shard_lengths=given, layer=layer, backend="reference")
    out.backward(do[:, :, s:e])
    got = {"out": out, "dq": mine[0].grad, "dk": mine[1].grad, "dv": mine[2].grad}
    want = {"out": ref[:, :, s:e], "dq": q.grad[:, :, s:e], "dk": k.grad[:, :, s:e], "dv": v.grad[:, :, s:e]}
    res = {key: float((got[key].double() - want[key].double()).detach().abs().max()) if e > s else 0.0 for key in got}
    if e > s and any(got[key] is None for key in got):
        raise AssertionError(f"{name}: a gradient is missing")
    return res


def attention_case_names(world: int) -> list[str]:
    """The cases of one group size (the mesh case needs the 4 ranks of a 2 x 2 mesh)."""
    return [*_attention_cases(), "lf7-g3:gathered", *(["bigbird-odd:mesh"] if world == 4 else []), "capped-refused"]


def _refused(group) -> dict:
    """A cap that queries stand past: every rank refuses before any message, with the fix in the message."""
    from hf_sparse import Longformer, parallel

    q = torch.randn(1, 2, 20, 8)
    try:
        parallel.sparse_attention(q, q, q, Longformer(window=4, global_tokens=2, max_distance=20), group=group)
    except NotImplementedError as err:
        return {"refused": float("max_distance=none" in str(err))}
    return {"refused": 0.0}


# ---------------------------------------------------------------------------------------------
# a tiny Llama, sharded vs whole
def _tiny_llama(pattern: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse import patch_model

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double()
    return patch_model(model, pattern, backend="reference")


MODEL_CASES = {
    "longformer": ("longformer:window=9,global_tokens=2", 75),
    "bigbird": ("bigbird:block=16,window_blocks=2,global_blocks=1,random_blocks=2", 83),
    "layers-unpatched": ("sliding_window:window=7", 61),
}


def model_case(name: str, group) -> dict:
    """Logits, loss and every parameter's gradient of a sharded forward/backward against the unsharded one."""
    from hf_sparse.patches.parallel import context_parallel

    spec, n = MODEL_CASES[name]
    model = _tiny_llama(spec)
    if name == "layers-unpatched":
        from hf_sparse import patch_model

        patch_model(model, spec, layers=[1], backend="reference")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2, n), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored tokens count in the normalisation too
    whole = model(input_ids=ids, labels=labels)
    whole.loss.backward()
    want = {p: x.grad.clone() for p, x in model.named_parameters()}
    model.zero_grad()
    world = dist.get_world_size(group)
    with context_parallel(model, group) as cp:
        batch = cp.shard(ids, labels=labels)
        out = model(**batch)
        out.loss.backward()
        s = sum(cp.lengths[: cp.rank])
        e = s + cp.lengths[cp.rank]
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    res = {"logits": float((out.logits - whole.logits[:, s:e]).abs().max()),
           "loss": float((loss / world - whole.loss).abs())}
    worst = 0.0
    for p, x in model.named_parameters():
        grad = x.grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        worst = max(worst, float((grad / world - want[p]).abs().max()))
    res["grads"] = worst
    res["restored"] = float(model.config._attn_implementation != "hf_sparse")  # 0: back on "hf_sparse"
    return res
