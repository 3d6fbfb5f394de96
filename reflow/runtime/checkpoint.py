"""Runtime checkpoints that do not depend on the plan: save under one plan, resume under another.

A trained role's owner copy is sharded (FSDP2 / tensor / pipeline); its checkpoint is written whole, so
any layout can read it back:

    <ckpt>/<role>/                    HF safetensors model folder (transformers and vLLM load it)
    <ckpt>/<role>.optim.safetensors   Adam moments by parameter name: "<name>:exp_avg", "<name>:exp_avg_sq"
    <ckpt>/<role>.optim.pt            Adam step and the LR scheduler state
    <ckpt>/ema_<role>/                the role's EMA weights (algo.actor_ema), an HF folder
    <ckpt>/trainer_state.pt           written last by the controller (step, samplers, KL coefficient)

A LoRA role (lora.rank > 0) writes only what trains: `<ckpt>/<role>/` holds its adapters in PEFT's format
(adapter_model.safetensors + adapter_config.json, naming the base folder) and the moments file those
parameters' moments; resuming loads the base from the role's configured path again. Its final export
(`optimizer=False`) is the merged model as an HF folder (W + alpha/r B A), with the adapters in `adapter/`.

In one process (runtime.workers = 0, no process group) every tensor is already whole and is written as is:
the files are the same, so a checkpoint of either transport resumes under the other.

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
from reflow.models.lora import inject, merged_copy, save_adapters
from reflow.parallel.shards import Sharding, canonical_name, local_tensors
from reflow.realloc.execute import reallocate
from reflow.realloc.model import resharded_tensors
from reflow.realloc.plan import plan_reallocation

MOMENTS = ("exp_avg", "exp_avg_sq")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(plan, local: dict[str, torch.Tensor], full: dict[str, torch.Tensor] | None) -> None:
    """Every slice onto the root, whole; in one process (no process group) the local tensors are whole."""
    if plan is None:
        if full is not None:
            for n, t in full.items():
                t.copy_(local[n])
        return
    reallocate(plan, local, full)


def _gather_plan(src: Sharding, root: int):
    """Every slice of `src` onto rank `root`, whole (one plan serves the weights and both Adam moments)."""
    if not dist.is_initialized():
        return None
    dst = Sharding.of("d1t1p1", [root], src.shape_of, src.num_layers, shard_data=False)
    return plan_reallocation(src, dst, world_size=dist.get_world_size())


def _params_by_name(model) -> dict[str, torch.nn.Parameter]:
    return {canonical_name(n): p for n, p in model.named_parameters()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


def save_role(role, engine, tokenizer, ckpt: Path, ema: bool = False) -> None:
    """Every owner rank of `role` calls this; its first rank writes the files. engine None: weights only.
    ema: the role's EMA shadow instead of its weights, as `ema_<role>/` (an HF folder)."""
    if role.lora is not None:
        return _save_lora_role(role, engine, tokenizer, ckpt)
    root = role.owner.ranks[0]
    me = _rank()
    gather = _gather_plan(role.sharding, root)
    full_model = None
    dtype = torch.float32 if ema else role.dtype  # the EMA shadow is kept (and resumed) in float32
    if me == root:
        full_model = materialize(empty_model(role.model_cls, role.config, dtype))
        if role.generation_config is not None:
            full_model.generation_config = role.generation_config
    if ema:
        weights = {canonical_name(n): _local(role.ema.shadow[n]) for n, _ in role.model.named_parameters()}
    else:
        weights = resharded_tensors(role.model) if gather is not None else \
            {n: p.detach() for n, p in _params_by_name(role.model).items()}
    _gather(gather, weights, local_tensors(full_model) if full_model is not None else None)
    if engine is not None:
        _save_moments(engine, _params_by_name(role.model), gather, root, role.sharding.shape_of, ckpt, role.name,
                      role.dtype)
    if me == root:
        folder = ckpt / (f"ema_{role.name}" if ema else role.name)
        # transformers writes only on global rank 0 of an initialised process group; the root of a role
        # owned by other ranks must write too (the instance attribute shadows that check for this model)
        full_model.should_save_on_this_rank = lambda is_main_process: True
        full_model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def _save_moments(engine, params: dict, gather, root: int, shapes: dict, ckpt: Path, name: str,
                  dtype: torch.dtype) -> None:
    """Both Adam moments of `params` (name -> parameter), gathered whole onto `root`, and the step and
    scheduler state: `<name>.optim.safetensors` and `<name>.optim.pt`."""
    moments = {}
    for m in MOMENTS:
        # a parameter without state (no update applied yet: every one skipped as non-finite) has the
        # moments Adam starts from, zeros
        local = {n: _local(engine.optimizer.state[p][m]) if m in engine.optimizer.state[p] else
                 torch.zeros_like(_local(p)) for n, p in params.items()}
        # (under pipeline parallel the root holds some parameters not at all: those take the model's dtype)
        full = ({n: torch.empty(s, dtype=local[n].dtype if n in local else dtype) for n, s in shapes.items()}
                if _rank() == root else None)
        _gather(gather, local, full)
        if full is not None:
            moments.update({f"{n}:{m}": t.contiguous() for n, t in full.items()})
    if _rank() == root:
        save_file(moments, str(ckpt / f"{name}.optim.safetensors"))
        step = next(iter(engine.optimizer.state.values()), {}).get("step", 0.0)
        torch.save({"step": float(step), "scheduler": engine.scheduler.state_dict()}, ckpt / f"{name}.optim.pt")


def _save_lora_role(role, engine, tokenizer, ckpt: Path) -> None:
    """A LoRA role: its adapters gathered whole onto the first owner rank and written in PEFT's format, with
    their Adam moments (engine given); engine None (final/): the merged HF model, adapters in `adapter/`."""
    root, me = role.owner.ranks[0], _rank()
    adapters = role.sharding.only(role.trainable)
    gather = _gather_plan(adapters, root)
    params = {n: p for n, p in _params_by_name(role.model).items() if n in adapters.shape_of}
    local = {n: _local(p) for n, p in params.items()}
    if gather is not None:
        local = {n: t for n, t in resharded_tensors(role.model).items() if n in adapters.shape_of}
    full = {n: torch.empty(s, dtype=local[n].dtype) for n, s in adapters.shape_of.items()} if me == root else None
    _gather(gather, local, full)
    folder = ckpt / role.name
    if engine is not None:
        _save_moments(engine, params, gather, root, adapters.shape_of, ckpt, role.name, role.dtype)
        if me == root:
            save_adapters(folder, full, role.peft)
    else:  # the whole model (base and adapters) onto the root, merged there
        whole = None
        if me == root:
            whole = materialize(inject(empty_model(role.model_cls, role.config, role.dtype), role.lora))
        everything = _gather_plan(role.sharding, root)
        weights = resharded_tensors(role.model) if everything is not None else \
            {n: p.detach() for n, p in _params_by_name(role.model).items()}
        _gather(everything, weights, local_tensors(whole) if whole is not None else None)
        if me == root:
            merged = merged_copy(whole)
            if role.generation_config is not None:
                merged.generation_config = role.generation_config
            merged.should_save_on_this_rank = lambda is_main_process: True  # (see save_role)
            merged.save_pretrained(folder, safe_serialization=True)
            save_adapters(folder / "adapter", full, role.peft)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder / "adapter")
    if me == root and tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _read_slices(role, path: Path, key, names=None) -> dict:
    """This rank's slice of every parameter (or of `names`) from a safetensors file written whole."""
    me = _rank()
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for n, p in _params_by_name(role.model).items():
            if names is not None and n not in names:
                continue
            box = role.sharding.box(me, n)
            t = torch.zeros_like(p)
            local = t.to_local() if isinstance(t, DTensor) else t
            if box is not None and local.numel():
                local.copy_(f.get_slice(key(n))[box.slices()])
            out[n] = t
    return out


def load_optimizer(role, engine, ckpt: Path) -> None:
    """Fill the optimizer state of this rank's slices from a checkpoint written under any layout."""
    extra = torch.load(ckpt / f"{role.name}.optim.pt", weights_only=False)
    params = _params_by_name(role.model)
    names = set(role.trainable) if role.lora is not None else None  # a LoRA role's optimizer holds its adapters
    for m in MOMENTS:
        for n, t in _read_slices(role, ckpt / f"{role.name}.optim.safetensors", lambda n: f"{n}:{m}", names).items():
            state = engine.optimizer.state[params[n]]
            state["step"] = torch.tensor(extra["step"])
            state[m] = t
    engine.scheduler.load_state_dict(extra["scheduler"])
    # the scheduler restores its position but sets the groups' LR only at its next step: set them now
    for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr()):
        group["lr"] = lr


def load_ema(role, ckpt: Path) -> None:
    """The role's EMA shadow from `ema_<role>/` of a checkpoint written under any layout."""
    slices = _read_slices(role, ckpt / f"ema_{role.name}" / "model.safetensors", lambda n: n)
    for n, _ in role.model.named_parameters():
        role.ema.shadow[n] = slices[canonical_name(n)].detach().float().cpu()
