"""Roles of an experiment: which model each role is, where its weights come from, and how it trains.

    role     model class                               config (RL)         config (SFT / RM / DPO)
    actor    causal LM (AutoModelForCausalLM)          actor               model
    ref      causal LM, frozen                         ref (path: actor)   ref (path: model)      [DPO]
    critic   causal LM backbone + scalar per token     critic (path: actor)
    reward   sequence classifier (scalar at the end)   reward.model        model                  [RM, AM]
    actor    (AM: the frozen SFT policy that samples)                      policy (path: model)   [AM]
"""

from __future__ import annotations

import dataclasses

from reflow.config.schema import AMConfig, ModelConfig, RLConfig
from reflow.models.load import check_model_dir, load_critic, load_policy, load_reward_model

LOADERS = {"actor": load_policy, "ref": load_policy, "critic": load_critic, "reward": load_reward_model}


def role_config(cfg, role: str) -> ModelConfig:
    """The ModelConfig of `role` with its path resolved (None: a role without weights, a reward function)."""
    if isinstance(cfg, RLConfig):
        if role == "reward":  # a reward model is scored in float32, in the actor's micro-batches
            return ModelConfig(path=cfg.reward.model, micro_batch_tokens=cfg.actor.micro_batch_tokens)
        mcfg = getattr(cfg, role)
        return dataclasses.replace(mcfg, path=mcfg.path or cfg.actor.path)
    if role == "ref":
        return dataclasses.replace(cfg.ref, path=cfg.ref.path or cfg.model.path)
    if role == "actor" and isinstance(cfg, AMConfig):
        return dataclasses.replace(cfg.policy, path=cfg.policy.path or cfg.model.path)
    return cfg.model


def loader(role: str):
    if role not in LOADERS:
        raise KeyError(f"role '{role}' has no model loader; roles with weights are {', '.join(LOADERS)}")
    return LOADERS[role]


def model_configs(cfg, graph) -> dict:
    """role -> HF config of its model (for validating layouts before anything starts)."""
    from transformers import AutoConfig

    out = {}
    for role in graph.weight_roles():
        path = role_config(cfg, role).path
        if path:
            out[role] = AutoConfig.from_pretrained(check_model_dir(path, f"{role} path"))
    return out


def config_key(cfg, role: str) -> str:
    """The config key of a role's ModelConfig ("actor", "critic"; "model" in SFT / RM / DPO), for messages."""
    return role if isinstance(cfg, RLConfig) else ("ref" if role == "ref" else "model")


def check_lora(cfg, graph, placements: dict) -> None:
    """Before anything loads: LoRA (lora.rank > 0 on a trained role) needs PEFT, and every call on that role's
    weights must run at t1p1 (data parallel: FSDP2 for training, replicas otherwise). Tensor parallel would
    split `base_layer` but not the adapters beside it, and pipeline stages are not written for adapter layers.
    placements: call -> Placement (reflow.runtime.plan.placements). Raises PlanError naming the call and key."""
    from reflow.runtime.plan import PlanError

    lora_roles = {r for r in graph.trained_roles() if (mc := role_config(cfg, r)).path and mc.lora.rank}
    if not lora_roles:
        return
    from reflow.models.lora import require_peft

    require_peft()
    for name, pl in placements.items():
        call = graph.call(name)
        if call.weights in lora_roles and (pl.layout.t > 1 or pl.layout.p > 1):
            key = config_key(cfg, call.weights)
            raise PlanError(f"plan call '{name}': {key}.lora.rank > 0 (LoRA) composes with data parallel (FSDP2) only, "
                            f"not {pl.layout}; use d{len(pl.ranks)}t1p1 on its ranks, or set {key}.lora.rank=0")
