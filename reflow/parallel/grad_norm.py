"""Global gradient-norm clipping over a model whose parameters are plain tensors and/or DTensors.

    ||g||^2 = sum over ranks of the layout of  sum_p ||local(g_p)||^2 / replicas(p)
replicas(p) = how many ranks of the layout hold the same piece: for a DTensor, the product of the
sizes of its Replicate mesh dims (times the data/tensor ranks outside its mesh); for a plain tensor,
every data- and tensor-parallel rank of its pipeline stage (d * t). Under pipeline parallel, a
parameter outside the stage's layers (embeddings, final norm, head; summed over stages, FSDP2 shards
or not) is also held by every stage: its replicas are p times more; a stage's own layers are held by
that stage alone, so the sum over the layout's ranks adds the stages up. Each piece thus counts once.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from reflow.parallel.context import ParallelContext


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float, ctx: ParallelContext | None) -> float:
    """Clip the gradients of `model` to a global norm of `max_norm` (0 = no clipping); returns the norm.

    Under pipeline parallel, parameters outside the stage's layers (embeddings, final norm, head) are on
    every stage with equal (summed) gradients, so they count once: replicas = p * d * t.
    """
    stage = getattr(model, "_reflow_stage", None)
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    params = [p for _, p in named]
    if ctx is None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))  # 0 = no clipping
    total = torch.zeros((), dtype=torch.float64)
    for name, p in named:
        replica_group = ctx.layout.d * ctx.layout.t
        if stage is not None and not stage.owned(name):
            replica_group *= ctx.layout.p
        g = p.grad
        if isinstance(g, DTensor):
            mesh_size = g.device_mesh.size()
            replicated = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            local = g.to_local()
            reps = replicated * (replica_group // mesh_size)  # ranks outside the DTensor's mesh hold copies too
        else:
            local, reps = g, replica_group
        total += local.double().pow(2).sum().cpu() / reps
    ctx.all_reduce(total)
    norm = float(total.sqrt())
    if max_norm and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in params:
                (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return norm
