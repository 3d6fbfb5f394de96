"""A planning problem from an RL config (`reflow train` YAML): the graph the config runs, each role's model
shape from its HF folder, and the workload of one step.

    problem = problem_for_config(load_config(RLConfig, path), devices=4, hw="cpu")
    result = search(problem)                       # reflow.planner.search

Workload: batch = rollout.prompts_per_step x rollout.n sequences of P prompt tokens and at most
rollout.max_new_tokens generated ones, P = the mean length of the training prompts (tokenized; when the
data cannot be read here, data.max_prompt_len). Response lengths (Workload.gen_lens): given (`lengths`), or
measured: the metrics response_len/min, p10, ..., p90, max of the last steps of a run of this config
(output_dir/metrics.jsonl), averaged quantile by quantile; with neither, every response is assumed to use
its whole token budget (an upper bound; a model that stops early runs faster than predicted);
mini_batches x ppo_epochs optimizer steps per train call; the actor's micro_batch_tokens and
gradient_checkpointing; rollout.batch_size sequences decoded together at most. Bytes per value: 2 for a
bfloat16 / float16 role dtype, 4 for float32. Inter-stage fusion: fusion.inter_stage and fusion.chunk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from reflow.planner.cost import Workload
from reflow.planner.hardware import Hardware, hardware
from reflow.planner.models import ModelShape
from reflow.planner.simulator import Problem


def mean_prompt_len(cfg) -> int | None:
    """The mean token count of the training prompts (tokenized as the runtime does), or None when the data
    or the tokenizer cannot be read here."""
    try:
        from reflow.data.datasets import load_prompts
        from reflow.models.load import load_tokenizer

        tok = load_tokenizer(cfg.actor.path)
        examples, _ = load_prompts(cfg.data.train, tok, max_prompt_len=cfg.data.max_prompt_len,
                                   on_bad_row=cfg.data.on_bad_row)
    except Exception:  # noqa: BLE001 - planning still works from the configured upper bound
        return None
    if not examples:
        return None
    return max(1, round(sum(len(e.prompt_ids) for e in examples) / len(examples)))


def lengths_of(rows: list[dict], last: int = 8) -> tuple[float, ...] | None:
    """The response-length quantiles (levels 0, 0.1, ..., 1) in step metrics `rows`: each the mean over the
    last `last` rows that hold them all (response_len/min, p10, ..., p90, max); None without such rows."""
    from reflow.runtime.calls.policy import LENGTH_QUANTILES

    keys = [f"response_len/{q}" for q in LENGTH_QUANTILES]
    rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in keys)][-last:]
    if not rows:
        return None
    return tuple(sum(r[k] for r in rows) / len(rows) for k in keys)


def measured_lengths(metrics: str | Path, last: int = 8) -> tuple[float, ...] | None:
    """lengths_of a run's metrics.jsonl; None without the file."""
    from reflow.utils.metrics import read_metrics

    path = Path(metrics)
    return lengths_of(read_metrics(path), last) if path.is_file() else None


def workload_for_config(cfg, prompt_len: int | None = None, lengths=None) -> Workload:
    """prompt_len: tokens per prompt (default data.max_prompt_len, the upper bound); lengths: response lengths
    (Workload.gen_lens; default those measured in output_dir/metrics.jsonl, else None: the whole budget)."""
    r, a, actor = cfg.rollout, cfg.algo, cfg.actor
    if lengths is None:
        lengths = measured_lengths(Path(cfg.output_dir) / "metrics.jsonl")
    return Workload(batch=r.prompts_per_step * r.n, prompt_len=prompt_len or cfg.data.max_prompt_len,
                    gen_len=r.max_new_tokens, gen_lens=tuple(lengths) if lengths is not None else None,
                    mini_batches=a.mini_batches, epochs=a.ppo_epochs, micro_tokens=actor.micro_batch_tokens,
                    checkpointing=actor.gradient_checkpointing, decode_batch=r.batch_size,
                    share_prefill=r.n, share_prefix=r.n if actor.prefix_sharing else 1)


def problem_for_config(cfg, devices: int | None = None, hw: str | Hardware = "cpu", lengths=None,
                       **hw_overrides) -> Problem:
    """The Problem of an RLConfig on `devices` devices (default: runtime.workers) of hardware `hw`; lengths:
    response lengths (workload_for_config)."""
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
        lora = getattr(cfg, role).lora if role in ("actor", "critic") and role in graph.trained_roles() else None
        if lora is not None and lora.rank:
            models[role] = dataclasses.replace(models[role], lora_rank=lora.rank,
                                               lora_targets=tuple(lora.target_modules))
    n = devices or max(1, cfg.runtime.workers)
    return Problem(graph, models, hardware(hw, **hw_overrides), workload_for_config(cfg, mean_prompt_len(cfg), lengths),
                   n, staleness=cfg.rollout.max_staleness, inter_stage=cfg.fusion.inter_stage, chunk=cfg.fusion.chunk,
                   migrate=cfg.fusion.migrate_below > 0)
