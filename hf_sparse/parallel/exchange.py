"""The point-to-point exchange of one rank: keys and values out in the forward, their gradients back.

Two kinds of message travel between a pair of ranks, at most one of each per direction and step:

* *shared keys*: the positions of the sender's shard in the receiver's shared ranges, every KV head,
  laid out ``[n, Hkv, B, Dk + Dv]`` (K and V side by side). The receiver's shared buffer is the
  concatenation of these messages in sender (= position) order, so each lands in its own contiguous
  slice and the buffer lists the shared positions in order;
* *extra blocks*: one ``[blk, B, Dk + Dv]`` tile per (KV head, block) the receiver needs from the
  sender's shard, ``[n, blk, B, Dk + Dv]``; cells outside the sender's shard are zero, so a block that
  straddles two shards is the sum of its two owners' tiles. The receiver adds them into its packed
  buffer ``[Hkv, slots, blk, B, Dk + Dv]`` (see :class:`~hf_sparse.parallel.views.CompactBlocks`).

Both sides derive sizes and order from the same :class:`~hf_sparse.parallel.plan.ShardPlan`, so no
sizes are exchanged. Everything is posted at once with ``torch.distributed.batch_isend_irecv``
(NCCL on GPUs, gloo on the CPU) and waited for later, so the caller computes meanwhile. The
gradients go back along the same routes in the input dtype and are summed into the owners' keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .plan import ShardPlan

__all__ = ["RankExchange", "rank_exchange"]


@dataclass(frozen=True, eq=False)
class _Blocks:
    """Extra-block tiles between this rank and one peer: their KV heads, packed slots and, on the owner's
    side, the local position of each cell (clamped into the shard) and whether it is the owner's."""

    heads: torch.Tensor  # [n]
    slots: torch.Tensor  # [n]
    cells: torch.Tensor  # [n, blk] local positions
    mine: torch.Tensor  # [n, blk] bool

    @property
    def count(self) -> int:
        return self.heads.numel()


class _Pending:
    """Posted messages; :meth:`wait` returns once all of them are complete."""

    def __init__(self, works, keep):
        self.works, self.keep = works, keep

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.keep = [], None


class RankExchange:
    """The routes of one rank for one plan (built once per plan, rank, group and device)."""

    def __init__(self, plan: ShardPlan, rank: int, group, device: torch.device):
        self.plan, self.rank, self.group = plan, rank, group
        self.s, self.e = plan.shard(rank)
        peers = [r for r in range(plan.world) if r != rank]
        self.peer = {r: dist.get_global_rank(group, r) if group is not None else r for r in peers}
        blk = plan.block
        # receiving: shared slices by sender, extra-block tiles by sender
        self.shared_in, at = [], 0
        for src in peers:
            n = sum(b - a for a, b in plan.shared_from(rank, src))
            if n:
                self.shared_in.append((src, at, n))
            at += n
        self.shared_total = plan.shared_keys(rank)
        assert at == self.shared_total
        self.blocks_in = [(src, self._tiles(plan.blocks_from(rank, src), src, device)) for src in peers
                          if len(plan.blocks_from(rank, src))]
        view = plan.compact_view(rank)
        self.slots = view.slots if view is not None else 0
        self.blk = blk
        # sending: my positions in each peer's shared ranges and extra blocks
        self.shared_out = [(dst, tuple((a - self.s, b - self.s) for a, b in plan.shared_from(dst, rank)))
                           for dst in peers if plan.shared_from(dst, rank)]
        self.blocks_out = [(dst, self._tiles(plan.blocks_from(dst, rank), rank, device)) for dst in peers
                           if len(plan.blocks_from(dst, rank))]

    def _tiles(self, entries: torch.Tensor, owner: int, device) -> _Blocks:
        blk = self.plan.block
        s, e = self.plan.shard(owner)
        t = entries.to(device)
        cells = t[:, 1:2] * blk + torch.arange(blk, device=device)  # absolute positions
        mine = (cells >= s) & (cells < e)
        local = (cells - self.s).clamp(0, max(self.e - self.s - 1, 0))
        return _Blocks(t[:, 0], t[:, 2], local, mine)

    @property
    def idle(self) -> bool:
        return not (self.shared_in or self.blocks_in or self.shared_out or self.blocks_out)

    # -- forward: keys and values ---------------------------------------------------------------------
    def send_keys(self, k: torch.Tensor, v: torch.Tensor):
        """Post the forward exchange. Returns ``(pending, shared [n, Hkv, B, Dk+Dv], tiles by sender)``;
        the buffers are filled once ``pending.wait()`` returns."""
        b, hkv, _, dk = k.shape
        dt = dk + v.shape[-1]
        ops, keep = [], []
        for dst, ranges in self.shared_out:
            msg = torch.cat([torch.cat([k[:, :, a:c], v[:, :, a:c]], -1) for a, c in ranges], 2)
            msg = msg.permute(2, 1, 0, 3).contiguous()
            ops.append(dist.P2POp(dist.isend, msg, self.peer[dst], self.group))
            keep.append(msg)
        for dst, tiles in self.blocks_out:
            msg = self._gather_tiles(k, v, tiles)
            ops.append(dist.P2POp(dist.isend, msg, self.peer[dst], self.group))
            keep.append(msg)
        shared = k.new_empty((self.shared_total, hkv, b, dt))
        for src, at, n in self.shared_in:
            ops.append(dist.P2POp(dist.irecv, shared[at : at + n], self.peer[src], self.group))
        tiles_in = []
        for src, tiles in self.blocks_in:
            buf = k.new_empty((tiles.count, self.blk, b, dt))
            ops.append(dist.P2POp(dist.irecv, buf, self.peer[src], self.group))
            tiles_in.append((tiles, buf))
        return self._post(ops, keep), shared, tiles_in

    @staticmethod
    def _gather_tiles(k, v, tiles: _Blocks) -> torch.Tensor:
        heads = tiles.heads.view(-1, 1)
        kk = k.permute(2, 1, 0, 3)[tiles.cells, heads]  # [n, blk, B, Dk]
        vv = v.permute(2, 1, 0, 3)[tiles.cells, heads]
        return (torch.cat([kk, vv], -1) * tiles.mine.view(*tiles.mine.shape, 1, 1)).contiguous()

    def packed(self, tiles_in, shared: torch.Tensor) -> torch.Tensor | None:
        """The packed extra blocks ``[Hkv, slots, blk, B, Dk+Dv]`` from the received tiles (None: none);
        ``shared`` (``[n, Hkv, B, Dk+Dv]``) gives batch, width, dtype and device."""
        if not self.slots:
            return None
        b, dt = shared.shape[2], shared.shape[3]
        out = shared.new_zeros((self.plan.kv_heads, self.slots, self.blk, b, dt))
        for tiles, buf in tiles_in:
            out.index_put_((tiles.heads, tiles.slots), buf, accumulate=True)
        return out

    # -- backward: gradients of the keys that travelled -------------------------------------------------
    def send_grads(self, d_shared: torch.Tensor | None, d_packed: torch.Tensor | None, dtype: torch.dtype,
                   b: int, hkv: int, dt: int, device):
        """Post the gradients of the received keys back to their owners; receive those of my keys.
        Returns ``(pending, received)``, for :meth:`add_grads` once ``pending.wait()`` returns."""
        ops, keep = [], []
        for src, at, n in self.shared_in:
            msg = d_shared[at : at + n].to(dtype).contiguous()
            ops.append(dist.P2POp(dist.isend, msg, self.peer[src], self.group))
            keep.append(msg)
        for src, tiles in self.blocks_in:
            msg = d_packed[tiles.heads, tiles.slots].to(dtype).contiguous()
            ops.append(dist.P2POp(dist.isend, msg, self.peer[src], self.group))
            keep.append(msg)
        received = []
        for dst, ranges in self.shared_out:
            n = sum(c - a for a, c in ranges)
            buf = torch.empty((n, hkv, b, dt), dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, self.peer[dst], self.group))
            received.append(("shared", ranges, buf))
        for dst, tiles in self.blocks_out:
            buf = torch.empty((tiles.count, self.blk, b, dt), dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, self.peer[dst], self.group))
            received.append(("tiles", tiles, buf))
        return self._post(ops, keep), received

    @staticmethod
    def add_grads(dkv: torch.Tensor, received) -> None:
        """Sum the received gradients into ``dkv [T, Hkv, B, Dk+Dv]`` (float32) at the positions sent."""
        for kind, where, buf in received:
            if kind == "shared":
                at = 0
                for a, c in where:
                    dkv[a:c] += buf[at : at + c - a]
                    at += c - a
            else:
                g = buf.to(dkv.dtype) * where.mine.view(*where.mine.shape, 1, 1)
                dkv.index_put_((where.cells, where.heads.view(-1, 1)), g, accumulate=True)

    def _post(self, ops, keep) -> _Pending:
        if not ops:
            return _Pending([], None)
        return _Pending(dist.batch_isend_irecv(ops), keep)


@functools.lru_cache(maxsize=256)
def rank_exchange(plan: ShardPlan, rank: int, group, device: torch.device) -> RankExchange:
    """The exchange of ``rank`` for ``plan`` (cached: the routes and index tensors are built once)."""
    return RankExchange(plan, rank, group, device)

