"""LoRA adapters on a role's model, through the PEFT library (Hu et al. 2021). Each target linear layer

    y = W x + (alpha / r) * B (A dropout(x)),     W: [out, in] frozen,  A: [r, in],  B: [out, r] (zeros at start)

trains only A and B (and, on a critic, its new scalar head `score`, which has no base to adapt). reflow keeps
the plain HF model object that PEFT injects its layers into (`PeftModel.get_base_model()`): the engines,
FSDP2 and reallocation see an HF model whose target layers hold `base_layer.weight` and
`lora_A.default.weight` / `lora_B.default.weight` parameters, and its forward is the PeftModel's forward.

    peft = add_adapters(model, lora_cfg, key="actor.lora")   # PeftModel; peft.get_base_model() is `model`
    with adapters_off(model): ...                             # the base model (PEFT's disable_adapter)
    gen = merged_copy(model)                                  # W + (alpha / r) B A, non-target weights shared

Checkpoints hold the adapters in PEFT's format (adapter_model.safetensors + adapter_config.json, written and
read by PEFT's own functions), so `PeftModel.from_pretrained(base, folder)` loads them.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from reflow.models.load import ModelError

# PEFT asks transformers whether checkpointing is on through a name transformers 5 deprecates, on every wrap
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

EXTRA = "pip install 'reflow[lora]'"
# PEFT keeps a trained copy of these heads when the base model has them (a critic's or reward model's new
# scalar head: there is nothing to adapt, it starts at zero and trains whole)
SCALAR_HEADS = ("score",)


class LoraError(ModelError):
    """A LoRA setting that does not fit the model, or PEFT missing; the message names the key or the extra."""


def require_peft():
    """The peft module, or a LoraError naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise LoraError(f"lora.rank > 0 (LoRA) needs the PEFT library, which is not installed: {EXTRA}") from None
    return peft


def peft_config(lora_cfg, model: torch.nn.Module, base_path: str | None = None):
    """reflow's LoraConfig (rank, alpha, dropout, target_modules) -> peft.LoraConfig for `model`."""
    peft = require_peft()
    heads = [h for h in SCALAR_HEADS if getattr(model, h, None) is not None]
    return peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                           target_modules=list(lora_cfg.target_modules), modules_to_save=heads or None,
                           base_model_name_or_path=str(base_path) if base_path is not None else None)


def add_adapters(model: torch.nn.Module, lora_cfg, key: str = "lora", base_path: str | None = None,
                 adapter_dir: str | Path | None = None):
    """Inject LoRA layers into `model` in place -> the PeftModel wrapping it (`.get_base_model()` is `model`).
    Only the adapters (and a scalar head) require grad. adapter_dir: start from saved adapters (PEFT format)
    instead of fresh ones (A random, B zero). A target that matches no module is a LoraError naming `key`."""
    peft = require_peft()
    try:
        if adapter_dir is not None:
            wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        else:
            wrapped = peft.get_peft_model(model, peft_config(lora_cfg, model, base_path))
    except ValueError as e:
        if "not found in the base model" not in str(e) and "Target module" not in str(e):
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LoraError(f"{key}.target_modules={list(lora_cfg.target_modules)} matches no layer of "
                        f"{type(model).__name__}; its linear layers are {', '.join(linear)}") from None
    return wrapped


def has_adapters(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Run `model` as its base model inside: every LoRA layer passes its input to `base_layer` alone and a
    kept head copy falls back to the original head. This is what `PeftModel.disable_adapter()` does, on any
    copy of the model (the owner copy, a reallocated one) whether or not a PeftModel wraps it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters LoRA trains (adapters, kept heads), in the model's order (a LoRA model is never
    cut into pipeline stages, so these are the plain names reallocation and checkpoints use)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _delta(layer) -> torch.Tensor:
    """(alpha / r) B A of a LoRA layer's active adapter, as PEFT's merge computes it (`get_delta_weight`)."""
    (name,) = layer.active_adapters
    return layer.get_delta_weight(name)


@torch.no_grad()
def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model (the class under the LoRA layers) equal to PEFT's `merge_and_unload()` of `model`:
    target weights W + (alpha / r) B A in new tensors, every other parameter and buffer the same tensor as in
    `model` (no copy). Extra memory: the target layers' weights. `model` keeps its adapters and base weights
    untouched (merging in place and unmerging would move the base by rounding every step)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    from reflow.models.empty import empty_model

    plain = empty_model(type(model), model.config, next(model.parameters()).dtype)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            owner = plain.get_submodule(name)
            owner.weight = torch.nn.Parameter(base.weight + _delta(module), requires_grad=False)
            if base.bias is not None:
                owner.bias = base.bias
        elif isinstance(module, ModulesToSaveWrapper):
            head = module.modules_to_save[module.active_adapters[0]]
            owner = plain.get_submodule(name)
            for attr, p in head.named_parameters(recurse=False):
                setattr(owner, attr, p)
    lora_owned = {n for n, _ in plain.named_parameters(remove_duplicate=False) if not _on_meta(plain, n)}
    shared = dict(model.named_parameters(remove_duplicate=False))
    for n, _ in list(plain.named_parameters(remove_duplicate=False)):
        if n in lora_owned:
            continue
        owner_name, _, attr = n.rpartition(".")
        setattr(plain.get_submodule(owner_name) if owner_name else plain, attr, shared[n])
    device = next(model.parameters()).device
    for b in plain.buffers():  # rotary frequencies, computed from the config by the constructor
        b.data = b.data.to(device)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.train(model.training)


def _on_meta(model: torch.nn.Module, name: str) -> bool:
    return model.get_parameter(name).device.type == "meta"


def inject(model: torch.nn.Module, config) -> torch.nn.Module:
    """Add the adapter layers of a peft.LoraConfig to `model` (e.g. an empty one that a reallocation fills) ->
    `model`. PEFT may edit the config it is given, so it gets a copy."""
    import copy

    require_peft().get_peft_model(model, copy.deepcopy(config))
    return model


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def save_adapters(folder: str | Path, tensors: dict[str, torch.Tensor], peft_model) -> Path:
    """Write whole adapter tensors (canonical names of the model's trained parameters -> tensors) as PEFT does
    (`PeftModel.save_pretrained`: PEFT's own key mapping and config writer) into `folder`."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefixed = {f"base_model.model.{n}": t.contiguous() for n, t in tensors.items()}
    state = get_peft_model_state_dict(peft_model, state_dict=prefixed)
    save_file(state, str(folder / ADAPTER_FILES[0]), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(folder))
    return folder


def is_adapter_folder(folder: str | Path) -> bool:
    return all((Path(folder) / f).is_file() for f in ADAPTER_FILES)
