"""Reallocation executor: runs a `ReallocPlan` over torch.distributed (gloo on CPU, NCCL on CUDA).

Every rank of the world calls `reallocate(plan, src, dst)` with its own parameter slices (plain tensors
by plain HF name, `shards.local_tensors`), in the same order of plans. Three phases:

    1. local copies           dst[name][piece] = src[name][piece]           (no traffic)
    2. point-to-point         one message per bucket of (sender -> one receiver) pieces, posted with
                              batch_isend_irecv in waves (the w-th bucket of every route), so at most
                              one bucket per route is in flight on a rank
    3. broadcasts             one broadcast per bucket of (sender -> several receivers) pieces, in the
                              plan's global order, over a group cached per rank set

A bucket packs its pieces into one flat buffer (pieces of one dtype; `plan.bucket_bytes` caps its
size), so a rank holds at most its own source and destination slices plus the buckets it is sending or
receiving; no rank ever builds a whole model unless its destination slice is the whole model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from reflow.realloc.plan import ReallocPlan, Transfer

_GROUPS: dict[tuple[int, ...], object] = {}


def group_for(ranks: tuple[int, ...]):
    """A process group over `ranks`, created once. new_group is collective over the whole world, so every
    rank must ask for the same groups in the same order: the executor asks for all of a plan's groups,
    sorted, before using any."""
    if len(ranks) == dist.get_world_size():
        return None
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks]


@dataclass
class ReallocStats:
    """What this rank did: traffic, messages, temporary memory and time."""

    sent_bytes: int = 0
    received_bytes: int = 0
    messages: int = 0
    copies: int = 0
    buffer_peak_bytes: int = 0  # largest total of flat buffers alive at once on this rank
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _pack(pieces: list[Transfer], src: dict[str, torch.Tensor], src_boxes) -> torch.Tensor:
    parts = [src[t.name][t.box.slices(src_boxes[t.name])].reshape(-1) for t in pieces]
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _unpack(buf: torch.Tensor, pieces: list[Transfer], dst: dict[str, torch.Tensor], dst_boxes) -> None:
    off = 0
    for t in pieces:
        n = t.numel
        view = dst[t.name][t.box.slices(dst_boxes[t.name])]
        view.copy_(buf[off:off + n].view(view.shape))
        off += n


def _bucket_dtype(pieces, src, dst):
    t = pieces[0]
    ref = src.get(t.name) if src and t.name in src else dst[t.name]
    return ref.dtype, ref.device


@torch.no_grad()
def reallocate(plan: ReallocPlan, src: dict[str, torch.Tensor] | None, dst: dict[str, torch.Tensor] | None) -> ReallocStats:
    """Fill this rank's destination slices `dst` from the source slices `src` of all ranks.

    src: this rank's source slices (None/empty if it holds no source); dst: this rank's destination
    tensors to overwrite, shaped as `plan.dst.box(rank, name)` (None/empty if it receives nothing).
    """
    t0 = time.perf_counter()
    me = dist.get_rank()
    src, dst = src or {}, dst or {}
    src_boxes = {n: plan.src.box(me, n) for n in src}
    dst_boxes = {n: plan.dst.box(me, n) for n in dst}
    for n, box in dst_boxes.items():
        if box is not None and tuple(dst[n].shape) != box.shape:
            raise ValueError(f"rank {me}: destination tensor '{n}' has shape {list(dst[n].shape)}, "
                             f"the plan expects {list(box.shape)} ({plan.dst.describe()})")
    stats = ReallocStats()

    for c in plan.copies:
        if c.rank == me:
            dst[c.name][c.box.slices(dst_boxes[c.name])].copy_(src[c.name][c.box.slices(src_boxes[c.name])])
            stats.copies += 1

    buckets = plan.buckets()
    # every rank creates the plan's broadcast groups, in the same (sorted) order
    for sender, receivers in buckets:
        if len(receivers) > 1:
            group_for(tuple(sorted((sender, *receivers))))

    # point-to-point in waves: wave w holds the w-th bucket of every (sender -> receiver) route, the same
    # on every rank, so each rank posts a wave's sends and receives, waits, and frees its buffers before the
    # next (matching operations are always in the same wave: no deadlock, bounded temporary memory)
    routes = [(route, bl) for route, bl in buckets.items() if len(route[1]) == 1 and me in (route[0], route[1][0])]
    for wave in range(max((len(bl) for _, bl in routes), default=0)):
        ops, recvs, live = [], [], 0
        for (sender, (receiver,)), bucket_list in routes:
            if wave >= len(bucket_list):
                continue
            pieces = bucket_list[wave]
            if me == sender:
                buf = _pack(pieces, src, src_boxes)
                ops.append(dist.P2POp(dist.isend, buf, receiver))
                stats.sent_bytes += buf.numel() * buf.element_size()
            else:
                dtype, device = _bucket_dtype(pieces, src, dst)
                buf = torch.empty(sum(t.numel for t in pieces), dtype=dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, sender))
                recvs.append((buf, pieces))
                stats.received_bytes += buf.numel() * buf.element_size()
            live += buf.numel() * buf.element_size()
            stats.messages += 1
        stats.buffer_peak_bytes = max(stats.buffer_peak_bytes, live)
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for buf, pieces in recvs:
            _unpack(buf, pieces, dst, dst_boxes)
        del ops, recvs

    # broadcasts, in the plan's order (the same on every rank)
    for (sender, receivers), bucket_list in buckets.items():
        if len(receivers) == 1:
            continue
        members = tuple(sorted((sender, *receivers)))
        if me not in members:
            continue
        group = group_for(members)
        for pieces in bucket_list:
            if me == sender:
                buf = _pack(pieces, src, src_boxes)
                stats.sent_bytes += buf.numel() * buf.element_size() * len(receivers)
            else:
                dtype, device = _bucket_dtype(pieces, src, dst)
                buf = torch.empty(sum(t.numel for t in pieces), dtype=dtype, device=device)
                stats.received_bytes += buf.numel() * buf.element_size()
            stats.buffer_peak_bytes = max(stats.buffer_peak_bytes, buf.numel() * buf.element_size())
            dist.broadcast(buf, src=sender, group=group)
            if me != sender:
                _unpack(buf, pieces, dst, dst_boxes)
            stats.messages += 1
    stats.seconds = time.perf_counter() - t0
    return stats
