"""The algorithms of the field as graphs of calls (see graph.py). Adding an algorithm = a graph (which calls,
which implementations, which batch fields) + where needed a registered call (reflow.runtime.calls) or an
advantage estimator / loss (reflow.algorithms); the executor does the rest. A user's graph lives in their
own file: `algo.graph=my_file.py:my_graph` (a function cfg -> Graph).

    RL keys: prompts (dataset indices) -> the rollout fields (input_ids, action_mask, gen_logprobs, group_id,
             response, ...) -> score, ref_logprobs, old_logprobs, values, last_values -> the train calls
             (which compute advantages themselves, on the whole batch, so every plan gives the same ones)
"""

from __future__ import annotations

from reflow.runtime.calls.rollout import ROLLOUT_FIELDS
from reflow.runtime.graph import Call, Graph

TOKENS = ("input_ids", "action_mask")  # what a forward call reads


def _rl_evals(cfg) -> Graph | None:
    if not cfg.data.eval:
        return None
    max_new = cfg.trainer.eval_max_new_tokens or cfg.rollout.max_new_tokens
    return Graph("eval", [Call("eval_generate", "actor", "generate", "eval_generate", ("eval_prompts",),
                               options={"placed_like": "actor_gen", "max_new_tokens": max_new, "reward": True,
                                        "batch_size": cfg.rollout.batch_size})],
                 dataset_keys=("eval_prompts",))


def _scoring(cfg, source: str, prefix: str = "") -> list[Call]:
    """The reward calls on a rollout: a reward function or model, plus process rewards."""
    p = prefix
    if cfg.reward.model:
        calls = [Call(f"reward{'_' + p.rstrip('_') if p else ''}", "reward", "infer", "score_model",
                      (p + "input_ids",), ("score",), prefix=p)]
    else:
        calls = [Call(f"reward{'_' + p.rstrip('_') if p else ''}", "reward", "infer", "score_fn",
                      (p + "prompt", p + "response", p + "answer"), ("score",), prefix=p)]
    if cfg.reward.prm and not prefix:
        calls.append(Call("process_reward", "reward", "infer", "process_reward",
                          ("input_ids", "prompt_len", "response", "prompt"), ("prm_rewards",)))
    return calls


def rl_graph(cfg, name: str) -> Graph:
    """PPO (with a critic: GAE) and GRPO with its relatives (a critic-free estimator), as one graph builder:

        actor_gen -> reward [-> process_reward] [-> ref_inf] [-> actor_inf] [-> critic_inf]
                  -> actor_train [-> critic_train] [-> ref_ema]
    plus ReMax's greedy rollout and its reward (its baseline), keyed by group."""
    a = cfg.algo
    ref = bool(a.kl_coef > 0 or a.kl_target is not None or a.kl_metric)
    old = a.ppo_epochs * a.mini_batches > 1
    calls = [Call("actor_gen", "actor", "generate", "generate", ("prompts",), ROLLOUT_FIELDS)]
    calls += _scoring(cfg, "actor_gen")
    train_in = [*ROLLOUT_FIELDS, "score"] + (["prm_rewards"] if cfg.reward.prm else [])
    if a.estimator == "remax":
        calls.append(Call("actor_gen_greedy", "actor", "generate", "generate", ("prompts",),
                          ("prompt", "response", "answer", "input_ids", "group_id"), {"greedy": True},
                          prefix="greedy_"))
        calls += _scoring(cfg, "actor_gen_greedy", prefix="greedy_")
        train_in.append("greedy_score")
    if ref:
        calls.append(Call("ref_inf", "ref", "infer", "logprobs", TOKENS, ("ref_logprobs",)))
        train_in.append("ref_logprobs")
    if old:
        calls.append(Call("actor_inf", "actor", "infer", "logprobs", TOKENS, ("old_logprobs",)))
    critic_in = list(train_in)
    if a.uses_critic:
        calls.append(Call("critic_inf", "critic", "infer", "values", TOKENS, ("values", "last_values")))
        train_in += ["values", "last_values"]
        critic_in += ["values", "last_values"]
    calls.append(Call("actor_train", "actor", "train", "train_policy",
                      tuple(train_in + (["old_logprobs"] if old else []))))
    if a.uses_critic:
        calls.append(Call("critic_train", "critic", "train", "train_critic", tuple(critic_in)))
    if ref and a.ref_ema is not None:
        calls.append(Call("ref_ema", "ref", "update", "ema_update", options={"decay": a.ref_ema,
                                                                            "every": a.ref_ema_every},
                          weights="actor"))
    unread = [k for c in calls for k in c.published if not any(k in d.inputs for d in calls)]
    return Graph(name, calls, results=tuple(unread), evals=_rl_evals(cfg))


def sft_graph(cfg) -> Graph:
    """SFT: one train call on the step's examples; evaluation decodes data.eval greedily."""
    evals = None
    if cfg.data.eval:
        evals = Graph("eval", [Call("eval_generate", "actor", "generate", "eval_generate", ("eval_prompts",),
                                    options={"placed_like": "actor_train", "max_new_tokens": cfg.eval_max_new_tokens})],
                      dataset_keys=("eval_prompts",))
    return Graph("sft", [Call("actor_train", "actor", "train", "train_sft", ("examples",))],
                 dataset_keys=("examples",), evals=evals)


def rm_graph(cfg) -> Graph:
    """A pairwise reward model: one train call on the step's preference pairs; held-out pair accuracy."""
    evals = None
    if cfg.eval_fraction > 0:
        evals = Graph("eval", [Call("eval_pairs", "reward", "infer", "eval_rm_pairs", ("eval_pairs",),
                                    options={"placed_like": "reward_train"})], dataset_keys=("eval_pairs",))
    return Graph("rm", [Call("reward_train", "reward", "train", "train_rm", ("examples",))],
                 dataset_keys=("examples",), evals=evals)


def dpo_graph(cfg) -> Graph:
    """DPO: the reference scores the step's pairs, the actor trains on them (ReaL's two-call DPO)."""
    eval_calls = []
    if cfg.eval_fraction > 0:
        eval_calls += [Call("eval_ref", "ref", "infer", "pair_logprobs", ("eval_pairs",), ("ref_logp",),
                            options={"placed_like": "ref_inf", "dataset": "eval_pairs"}, prefix="eval_"),
                       Call("eval_pairs", "actor", "infer", "eval_dpo_pairs", ("eval_ref_logp",),
                            options={"placed_like": "actor_train"})]
    if cfg.data.eval:
        eval_calls.append(Call("eval_generate", "actor", "generate", "eval_generate", ("eval_prompts",),
                               options={"placed_like": "actor_train", "max_new_tokens": cfg.eval_max_new_tokens}))
    evals = Graph("eval", eval_calls, dataset_keys=("eval_pairs", "eval_prompts")) if eval_calls else None
    return Graph("dpo", [Call("ref_inf", "ref", "infer", "pair_logprobs", ("examples",), ("ref_logp",)),
                         Call("actor_train", "actor", "train", "train_dpo", ("examples", "ref_logp"))],
                 dataset_keys=("examples",), evals=evals)


def graph_for(cfg) -> Graph:
    """The graph of a config: `algo.graph` (a user's file:function) or the estimator's RL graph; the graph of
    SFT, RM and DPO configs."""
    from reflow.config.schema import DPOConfig, RLConfig, RMConfig, SFTConfig

    if isinstance(cfg, SFTConfig):
        return sft_graph(cfg)
    if isinstance(cfg, RMConfig):
        return rm_graph(cfg)
    if isinstance(cfg, DPOConfig):
        return dpo_graph(cfg)
    assert isinstance(cfg, RLConfig)
    if cfg.algo.graph:
        return load_user_graph(cfg.algo.graph)(cfg)
    names = {"gae": "ppo", "drgrpo": "grpo", "reinforce++-baseline": "reinforce++"}
    return rl_graph(cfg, names.get(cfg.algo.estimator, cfg.algo.estimator))


def load_user_graph(spec: str):
    """`file.py:function` or `module:function` -> the function (its file may register calls and losses)."""
    from reflow.rewards.registry import load_reward_fn

    return load_reward_fn(spec, keywords=("cfg",))
