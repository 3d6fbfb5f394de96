"""Runtime checkpoints that do not depend on the plan: save under one plan, resume under another.

A trained role's owner copy is sharded (FSDP2 / tensor / pipeline); its checkpoint is written whole, so
any layout can read it back:

    <ckpt>/<role>/                    HF safetensors model folder (transformers and vLLM load it)
    <ckpt>/<role>.optim.safetensors   Adam moments by parameter name: "<name>:exp_avg", "<name>:exp_avg_sq"
    <ckpt>/<role>.optim.pt            Adam step and the LR scheduler state
    <ckpt>/trainer_state.pt           written last by the controller (step, prompt sampler, KL coefficient)

Saving gathers each tensor onto the owner's first rank with the reallocation executor (a plan from the
owner sharding to d1t1p1 on that rank); loading reads only this rank's slice of every tensor from the
safetensors files (`get_slice`), by the slice its new layout gives it (`Sharding.box`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from reflow.models.empty import empty_model, materialize
from reflow.parallel.shards import Sharding, canonical_name, local_tensors
from reflow.realloc.execute import reallocate
from reflow.realloc.model import resharded_tensors
from reflow.realloc.plan import plan_reallocation

MOMENTS = ("exp_avg", "exp_avg_sq")


def _gather_plan(src: Sharding, root: int):
    """Every slice of `src` onto rank `root`, whole (one plan serves the weights and both Adam moments)."""
    dst = Sharding.of("d1t1p1", [root], src.shape_of, src.num_layers, shard_data=False)
    return plan_reallocation(src, dst, world_size=dist.get_world_size())


def _params_by_name(model) -> dict[str, torch.nn.Parameter]:
    return {canonical_name(n): p for n, p in model.named_parameters()}


def save_role(role, engine, tokenizer, ckpt: Path) -> None:
    """Every owner rank of `role` calls this; its first rank writes the files."""
    root = role.owner.ranks[0]
    me = dist.get_rank()
    full_model = None
    if me == root:
        full_model = materialize(empty_model(role.model_cls, role.config, role.dtype))
    gather = _gather_plan(role.sharding, root)
    reallocate(gather, resharded_tensors(role.model), local_tensors(full_model) if full_model else None)
    params = _params_by_name(role.model)
    moments = {}
    for m in MOMENTS:
        local = {}
        for n, p in params.items():
            t = engine.optimizer.state[p][m]
            local[n] = (t.to_local() if isinstance(t, DTensor) else t).detach()
        full = ({n: torch.empty(s, dtype=role.dtype) for n, s in role.sharding.shape_of.items()}
                if me == root else None)
        reallocate(gather, local, full)
        if full is not None:
            moments.update({f"{n}:{m}": t.contiguous() for n, t in full.items()})
    if me == root:
        full_model.save_pretrained(ckpt / role.name, safe_serialization=True)
        tokenizer.save_pretrained(ckpt / role.name)
        save_file(moments, str(ckpt / f"{role.name}.optim.safetensors"))
        step = next(iter(engine.optimizer.state.values()))["step"]
        torch.save({"step": float(step), "scheduler": engine.scheduler.state_dict()}, ckpt / f"{role.name}.optim.pt")


def load_optimizer(role, engine, ckpt: Path) -> None:
    """Fill the optimizer state of this rank's slices from a checkpoint written under any layout."""
    me = dist.get_rank()
    extra = torch.load(ckpt / f"{role.name}.optim.pt", weights_only=False)
    with safe_open(str(ckpt / f"{role.name}.optim.safetensors"), framework="pt") as f:
        for n, p in _params_by_name(role.model).items():
            box = role.sharding.box(me, n)
            state = engine.optimizer.state[p]
            state["step"] = torch.tensor(extra["step"])
            for m in MOMENTS:
                t = torch.zeros_like(p)
                local = t.to_local() if isinstance(t, DTensor) else t
                if box is not None and local.numel():
                    local.copy_(f.get_slice(f"{n}:{m}")[box.slices()])
                state[m] = t
    engine.scheduler.load_state_dict(extra["scheduler"])
