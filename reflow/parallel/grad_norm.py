"""Global gradient-norm clipping over a model whose parameters are plain tensors and/or DTensors.

    ||g||^2 = sum over ranks of the layout of  sum_p ||local(g_p)||^2 / replicas(p)
replicas(p) = how many ranks of the layout hold the same piece: for a DTensor, the product of the
sizes of its Replicate mesh dims (times the data/tensor ranks outside its mesh); for a plain tensor,
every data- and tensor-parallel rank of its pipeline stage (d * t). Each piece thus counts once.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from reflow.parallel.context import ParallelContext


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, ctx: ParallelContext | None) -> float:
    params = [p for p in params if p.grad is not None]
    if ctx is None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))  # 0 = no clipping
    replica_group = ctx.layout.d * ctx.layout.t
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
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
