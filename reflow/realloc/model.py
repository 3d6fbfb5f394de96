"""Reallocation of real modules: from a train engine's FSDP2/DTensor-sharded model into a generation or
inference model under another layout and mesh, and CPU offload of roles that are never trained.

    dst_model = build_destination(AutoModelForCausalLM, config, dst_ctx, shard_data=False)  # meta, then only
                                                                                          # this rank's slices
    stats = reallocate_model(src_model, src_sharding, dst_model, dst_sharding, world_size=...)
    ... generate with dst_model ...
    del dst_model                      # temporary copies are dropped after their call; the trained copy
                                       # (src_model, with its optimizer) never moved

Every rank of the world calls these in the same order (the plan's broadcast groups are created
collectively); ranks outside the source pass src_model=None, ranks outside the destination get None.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from reflow.models.empty import empty_model, materialize
from reflow.parallel.parallelize import parallelize
from reflow.parallel.shards import Sharding, local_tensors
from reflow.realloc.execute import ReallocStats, reallocate
from reflow.realloc.plan import DEFAULT_BUCKET_BYTES, ReallocPlan, plan_reallocation


def resharded_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`local_tensors` after putting every FSDP2 unit back into its sharded state (a root left unsharded
    after a forward pass would otherwise show whole tensors)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return local_tensors(model)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (what they really occupy, padding included)."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def build_destination(model_cls, config, ctx, shard_data: bool = False, device=None,
                      dtype: torch.dtype = torch.float32, prepare=None) -> torch.nn.Module | None:
    """An uninitialised model holding only this rank's slices under `ctx` (None off its ranks).
    prepare(model): changes the empty model before it is parallelized (a LoRA role's adapter layers)."""
    if ctx is None or ctx.index is None:
        return None
    model = empty_model(model_cls, config, dtype)
    if prepare is not None:
        prepare(model)
    parallelize(model, ctx, shard_data=shard_data)
    device = device or (torch.device("cuda", torch.cuda.current_device()) if ctx.device_type == "cuda" else "cpu")
    return materialize(model, device)


def reallocate_model(src_model: torch.nn.Module | None, src: Sharding, dst_model: torch.nn.Module | None,
                     dst: Sharding, *, ranks_per_node: int = 8, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                     plan: ReallocPlan | None = None) -> ReallocStats:
    """Plan and run the move of `src_model`'s weights (this rank's part, or None) into `dst_model`.
    `plan`: a plan made earlier for the same (src, dst), so a move repeated every step is planned once."""
    if plan is None:
        plan = plan_reallocation(src, dst, world_size=dist.get_world_size(), ranks_per_node=ranks_per_node,
                                 bucket_bytes=bucket_bytes)
    src_t = resharded_tensors(src_model) if src_model is not None else None
    dst_t = local_tensors(dst_model) if dst_model is not None else None
    if len(plan.src.shapes) < len(src_t or dst_t or ()):  # a plan over some parameters (a LoRA role's adapters)
        src_t, dst_t = ({n: t for n, t in ts.items() if n in plan.src.shape_of} if ts is not None else None
                        for ts in (src_t, dst_t))
    stats = reallocate(plan, src_t, dst_t)
    stats.extra["resident_bytes"] = storage_bytes([*(src_t or {}).values(), *(dst_t or {}).values()])
    return stats


class Offloaded:
    """A frozen role's weights parked in host memory between its calls (reference, reward models).

    offload(): copy every local parameter slice to (pinned, on CUDA) host memory and free its device
    storage; reload(): allocate and copy back. The module object, its sharding and its parameters' identity
    (tied weights included) stay, so engines holding it keep working after reload. Not for FSDP2 modules
    (they manage their own storage): frozen roles run replicated or tensor-parallel.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.host: dict[str, torch.Tensor] | None = None

    def offload(self) -> None:
        if self.host is not None:
            return
        self.host = {}
        for n, p in self.model.named_parameters():
            t = p.to_local() if isinstance(p, DTensor) else p.data
            self.host[n] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda").copy_(t)
            if isinstance(p, DTensor):  # a DTensor's local storage is its own allocation: shrink it in place
                p._local_tensor.untyped_storage().resize_(0)
            else:  # a plain parameter (possibly memory-mapped from safetensors): point it at an empty tensor
                p.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def reload(self) -> None:
        if self.host is None:
            return
        for n, p in self.model.named_parameters():
            h = self.host[n]
            if isinstance(p, DTensor):
                p._local_tensor.untyped_storage().resize_(h.numel() * h.element_size())
                p._local_tensor.copy_(h, non_blocking=True)
            else:
                p.data = h.to(p.device, non_blocking=True) if p.device.type != "cpu" else h
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.host = None

    @property
    def device_bytes(self) -> int:
        return storage_bytes(local_tensors(self.model).values())
