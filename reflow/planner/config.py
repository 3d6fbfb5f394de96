"""A planning problem from an RL config (`reflow train` YAML): the graph the config runs, each role's model
shape from its HF folder, and the workload of one step.

    problem = problem_for_config(load_config(RLConfig, path), devices=4, hw="cpu")
    result = search(problem)                       # reflow.planner.search

Workload: batch = rollout.prompts_per_step x rollout.n sequences of data.max_prompt_len prompt tokens and
rollout.max_new_tokens generated ones (upper bounds: the planner assumes every sequence is that long);
mini_batches x ppo_epochs optimizer steps per train call; the actor's micro_batch_tokens and
gradient_checkpointing; rollout.batch_size sequences decoded together at most. Bytes per value: 2 for a
bfloat16 / float16 role dtype, 4 for float32.
"""

from __future__ import annotations

from reflow.planner.cost import Workload
from reflow.planner.hardware import Hardware, hardware
from reflow.planner.models import ModelShape
from reflow.planner.simulator import Problem


def workload_for_config(cfg) -> Workload:
    r, a, actor = cfg.rollout, cfg.algo, cfg.actor
    return Workload(batch=r.prompts_per_step * r.n, prompt_len=cfg.data.max_prompt_len, gen_len=r.max_new_tokens,
                    mini_batches=a.mini_batches, epochs=a.ppo_epochs, micro_tokens=actor.micro_batch_tokens,
                    checkpointing=actor.gradient_checkpointing, decode_batch=r.batch_size)


def problem_for_config(cfg, devices: int | None = None, hw: str | Hardware = "cpu", **hw_overrides) -> Problem:
    """The Problem of an RLConfig on `devices` devices (default: runtime.workers) of hardware `hw`."""
    from transformers import AutoConfig

    from reflow.models.load import check_model_dir
    from reflow.runtime.graphs import graph_for

    graph = graph_for(cfg)
    paths = {"actor": cfg.actor.path, "ref": cfg.ref.path or cfg.actor.path,
             "critic": cfg.critic.path or cfg.actor.path, "reward": cfg.reward.model}
    heads = {"critic": "value", "reward": "score"}
    dtypes = {"actor": cfg.actor.dtype, "ref": cfg.ref.dtype, "critic": cfg.critic.dtype, "reward": "float32"}
    models = {}
    for role in graph.roles:
        path = paths.get(role)
        if not path:
            models[role] = None  # a reward function
            continue
        config = AutoConfig.from_pretrained(check_model_dir(path, f"{role} path"))
        nbytes = 4 if dtypes.get(role, "float32") == "float32" else 2
        models[role] = ModelShape.of(config, heads.get(role, "lm"), dtype_bytes=nbytes)
    n = devices or max(1, cfg.runtime.workers)
    return Problem(graph, models, hardware(hw, **hw_overrides), workload_for_config(cfg), n)
