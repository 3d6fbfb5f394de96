"""Models without weights: parameters on the meta device, buffers real.

    model = empty_model(AutoModelForCausalLM, config)   # no parameter memory at all
    parallelize(model, ctx)                             # shard the meta parameters under a layout
    materialize(model, device)                          # allocate only this rank's slices

Reallocation builds its destination modules this way, so a rank never holds more than its own slices.
Buffers (rotary inv_freq, computed from the config at construction) stay real: `to_empty` would leave
them uninitialised, so `materialize` restores them, and re-ties parameters shared by several modules.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device (buffers stay where they are built)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # (a meta one may be a tied weight: keep it)
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def empty_model(model_cls, config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An HF model of `model_cls` (an Auto class or a model class) for `config`, parameters on meta."""
    with parameters_on_meta():
        if hasattr(model_cls, "from_config"):
            model = model_cls.from_config(config, dtype=dtype, attn_implementation="sdpa")
        else:
            model = model_cls(config)
    for p in model.parameters():  # parameters only: buffers (rotary frequencies) keep their own dtype
        p.data = p.data.to(dtype)
    return model


def materialize(model: torch.nn.Module, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Allocate (uninitialised) storage for the meta parameters this rank holds; keep the buffers."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    # to_empty replaces parameters module by module, which would untie shared ones (tied embeddings)
    tied: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)
    model.to_empty(device=device)
    for first, *others in (names for names in tied.values() if len(names) > 1):
        shared = model.get_parameter(first)
        for n in others:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n].to(b.device))
    return model
