"""Tile sizes per kernel, head dim and pattern.

A fixed table rather than an autotuner: the first call of a model must not spend minutes timing
configurations. The table entries come from sweeps on the H200 (``docs/kernel-notes.md``);
``override`` lets a benchmark try others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = True  # K/V tiles (boundary tiles too, without padding) through tensor descriptors where allowed
    pack: bool = True  # forward/dQ: a tile's rows are (position, head) pairs of one GQA group (K/V loaded once)
    maxnreg: int = 0  # cap on registers per thread (more programs per SM for short programs); 0: the compiler's

    def launch_options(self) -> dict[str, int]:
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts


# (kernel, head_dim bucket) -> config; head_dim bucket is 64 for <= 64, else 128 (and 256 above)
_TABLE: dict[tuple[str, int], KernelConfig] = {
    # head dims 64 and 128: the winners of the H200 sweeps (docs/kernel-notes.md, tile table), all through
    # tensor descriptors (TMA) since boundary tiles use them too (far fewer registers). GQA packing (pack):
    # the dQ kernel gains from it (H200 A/B at 64k); the forward measured slower packed (head dim 64 by ~28%,
    # 128 by ~4%, same loop body; within +-1% once boundary tiles used TMA), so it runs one head per program
    ("fwd", 64): KernelConfig(64, 64, 4, 2, pack=False),
    ("fwd", 128): KernelConfig(64, 64, 4, 3, pack=False),
    ("fwd", 256): KernelConfig(64, 32, 4, 2, tma=False, pack=False),  # head dim 256: not run on a GPU
    ("dq", 64): KernelConfig(64, 64, 4, 2),
    ("dq", 128): KernelConfig(64, 64, 4, 2),
    ("dq", 256): KernelConfig(32, 32, 4, 2, tma=False, pack=False),
    ("dkdv", 64): KernelConfig(64, 64, 4, 2),
    ("dkdv", 128): KernelConfig(64, 64, 4, 2),
    ("dkdv", 256): KernelConfig(16, 32, 4, 2, tma=False),
}

# block-structured plans (kind 1: block bands, extra blocks) where BigBird's sweep beat the window tiles cut
# down to one 64-token block
_TABLE_BIGBIRD: dict[tuple[str, int], KernelConfig] = {
    ("fwd", 64): KernelConfig(64, 64, 4, 2, pack=False),
    ("fwd", 128): KernelConfig(64, 32, 4, 2, pack=False),  # H200 A/B: 1.50-1.51 vs 1.55-1.56 ms at 64k
    ("dq", 64): KernelConfig(64, 64, 4, 3, pack=False),
    ("dq", 128): KernelConfig(64, 64, 4, 2, pack=False),
}

_OVERRIDES: dict[tuple[str, int | None], KernelConfig] = {}
_SETTINGS: dict[str, bool | None] = {"tma": None, "pack": None, "split_backward": None}  # None: the default


def _set(name: str, enabled: bool | None) -> None:
    if enabled not in (None, True, False):
        raise ValueError(f"set_{name} takes True, False or None, got {enabled!r}")
    _SETTINGS[name] = enabled


def set_tma(enabled: bool | None) -> None:
    """Load K/V tiles through tensor descriptors (Hopper's copy engine, TMA): ``True`` forces it
    (a ``ValueError`` where the inputs cannot use it), ``False`` uses pointer loads everywhere, ``None``
    (default) decides per call."""
    _set("tma", enabled)


def set_pack(enabled: bool | None) -> None:
    """Forward and dQ tiles hold the query heads of one GQA group (``True``) or one head per program
    (``False``) whatever the tile table says; ``None`` (default): the table's ``pack`` flag."""
    _set("pack", enabled)


def set_split_backward(enabled: bool | None) -> None:
    """The backward of a per-head plan: one launch of the dQ and of the dK/dV kernel per group of KV
    heads that share their rules, each compiled as that rule alone (``True``; ``None``, the default, does
    the same), or one launch for all heads that reads each head's rules from a table (``False``). The
    forward always runs a plan in one launch."""
    _set("split_backward", enabled)


def split_backward_setting() -> bool | None:
    return _SETTINGS["split_backward"]


def tma_setting() -> bool | None:
    return _SETTINGS["tma"]


def pack_setting() -> bool | None:
    return _SETTINGS["pack"]


def override(kernel: str, config: KernelConfig | None, *, kind: int | None = None) -> None:
    """Force a config for ``kernel`` ("fwd", "dq", "dkdv"), for one pattern kind (0: window/dense,
    1: BigBird) or all; ``None`` removes the override."""
    if config is None:
        _OVERRIDES.pop((kernel, kind), None)
    else:
        _OVERRIDES[(kernel, kind)] = config


def parse_override(text: str) -> tuple[str, int | None, KernelConfig]:
    """``"dkdv=64,128,8,2"``, ``"dkdv@1=32,64,4,2"`` (kind 1 only) or ``"fwd=64,64,4,3,0"`` (a fifth
    number 0: pointer loads, no tensor descriptors; a sixth number 0: one query head per program instead of
    the GQA group packed into the rows; a seventh: a register cap, 0 for none) -> (kernel, kind, config)."""
    name, _, vals = text.partition("=")
    kernel, _, kind = name.partition("@")
    try:
        nums = [int(x) for x in vals.split(",")]
    except ValueError:
        nums = []
    if kernel not in ("fwd", "dq", "dkdv") or len(nums) not in (4, 5, 6, 7) or kind not in ("", "0", "1"):
        raise ValueError(f"bad kernel config {text!r}; use e.g. dkdv=64,128,8,2 (block_m,block_n,warps,stages"
                         "[,tma 0/1[,pack 0/1[,maxnreg]]]), optionally dkdv@1=... for BigBird only")
    return kernel, int(kind) if kind else None, KernelConfig(*nums[:4], *(bool(n) for n in nums[4:6]), *nums[6:])


def apply_overrides(texts) -> None:
    """``override`` for each ``parse_override`` string (the ``--config`` options of the benchmark and scripts)."""
    for text in texts:
        kernel, kind, cfg = parse_override(text)
        override(kernel, cfg, kind=kind)


def pick_config(kernel: str, *, head_dim: int, kind: int, blk: int, dtype: torch.dtype,
                interpret: bool) -> KernelConfig:
    cfg = _OVERRIDES.get((kernel, kind), _OVERRIDES.get((kernel, None)))
    if interpret and cfg is None:
        # the interpreter runs tiles in numpy: small tiles keep the CPU tests fast
        return KernelConfig(16, 16, 1, 1)
    if cfg is None:
        bucket = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
        cfg = _TABLE[(kernel, bucket)]
        if kind == 1 and blk == 64:
            cfg = _TABLE_BIGBIRD.get((kernel, bucket), cfg)
        if dtype == torch.float32:  # fp32 tiles take twice the shared memory
            cfg = replace(cfg, block_m=max(cfg.block_m // 2, 16), block_n=max(cfg.block_n // 2, 16), num_stages=2)
    if kind == 1 and (cfg.block_m > blk or cfg.block_n > blk):  # BigBird: a tile may not straddle two blocks
        bm, bn = min(cfg.block_m, blk), min(cfg.block_n, blk)
        rows = bn if kernel == "dkdv" else bm  # the M side of the kernel's matrix products
        cfg = replace(cfg, block_m=bm, block_n=bn, num_warps=min(cfg.num_warps, 4 * max(rows // 64, 1)))
    return cfg
