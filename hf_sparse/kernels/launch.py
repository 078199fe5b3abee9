"""Host helpers shared by the launchers: the :class:`Problem` parameter object, tile configs, TMA."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton

from ..patterns import Pattern
from .configs import KernelConfig, pick_config, split_backward_setting, tma_setting
from .plan import KernelPlan, head_map, head_table, kernel_plan
from .tables import _dummy, _tables

try:  # host-side tensor descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Problem:
    """One attention call as the prefill and backward launchers see it: shapes, the kernel plan, the
    padding layout (or dummies), the extra-block tables and the per-head rule table. A launch over some
    of the KV heads (:meth:`launches`) lists them in ``hmap`` (``nh`` of them; else ``nh == hkv``)."""

    b: int
    hq: int
    hkv: int
    tq: int
    tk: int
    d: int
    block_d: int
    plan: KernelPlan
    varlen: bool
    k_shift: torch.Tensor
    k_len: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    hp: torch.Tensor
    nh: int
    hmap: torch.Tensor

    @classmethod
    def of(cls, q, k, pattern: Pattern, layer: int, q_offset: int, k_shift, k_len) -> Problem:
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        plan = kernel_plan(pattern, hkv)
        varlen = k_shift is not None
        dummy = _dummy(q.device)
        return cls(b=b, hq=hq, hkv=hkv, tq=tq, tk=tk, d=d, block_d=max(triton.next_power_of_2(d), 16), plan=plan,
                   varlen=varlen, k_shift=k_shift if varlen else dummy, k_len=k_len if varlen else dummy,
                   tables=_tables(plan, pattern, layer, hkv, q_offset + tq, tk, k_len, q.device),
                   hp=head_table(plan, q.device), nh=hkv, hmap=dummy)

    def launches(self) -> list[Problem]:
        """The backward's launches: one per group of KV heads that share their rules in a per-head plan
        (each compiled as that rule alone), unless ``configs.set_split_backward(False)``; else this one."""
        if not self.plan.groups or split_backward_setting() is False:
            return [self]
        device = self.hmap.device
        return [replace(self, plan=sub, hp=head_table(sub, device), nh=len(heads), hmap=head_map(heads, device))
                for heads, sub in self.plan.groups]


def _tma_compatible(x: torch.Tensor) -> bool:
    """The copy engine needs a 16-byte aligned base, 16-byte aligned strides and a contiguous last dim."""
    strides, shape = x.stride(), x.shape
    if strides[-1] != 1 or x.data_ptr() % 16 or shape[-1] <= 0:
        return False
    size = x.element_size()
    for st, n in zip(strides[:-1], shape[:-1]):  # (a plain loop: this runs on every launch)
        if n <= 0 or (st * size) % 16 or (st <= 0 and n != 1):
            return False
    return True


def _use_tma(c: Problem, cfg: KernelConfig, *tensors: torch.Tensor) -> bool:
    """Whether the kernels load K/V tiles through tensor descriptors: ``configs.set_tma`` decides, else the
    config's ``tma`` and whether the GPU and inputs allow it. Boundary tiles use them too, unless keys are
    padded inside the tensor (the kernels decide that per loop)."""
    setting = tma_setting()
    if setting is False or (setting is None and not cfg.tma):
        return False
    ok = TensorDescriptor is not None and c.d == c.block_d and all(_tma_compatible(x) for x in tensors)
    if setting is True and not ok:
        raise ValueError("set_tma(True) but these inputs cannot use tensor descriptors (head dim "
                         f"{c.d} must be a power of two >= 16, strides 16-byte aligned, last dim contiguous); "
                         "use set_tma(None)")
    if not ok:
        return False
    if setting is True or _interpret():
        return True
    return tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9


def _descs(use: bool, rows: int, block_d: int, *tensors: torch.Tensor) -> list:
    """``[B, H, T, D]`` descriptors with ``[1, 1, rows, D]`` boxes, or the tensors themselves (unused)."""
    if not use:
        return list(tensors)
    return [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, block_d]) for x in tensors]


def _cfg(kernel: str, c: Problem, dtype: torch.dtype) -> KernelConfig:
    return pick_config(kernel, head_dim=c.d, kind=c.plan.config_kind, blk=c.plan.blk, dtype=dtype,
                       interpret=_interpret())
