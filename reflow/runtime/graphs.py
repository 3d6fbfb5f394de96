"""The algorithms of the field as graphs of calls (see graph.py). Adding an algorithm = a graph (which calls,
which implementations, which batch fields) + where needed a registered call (reflow.runtime.calls) or an
advantage estimator / loss (reflow.algorithms); the executor does the rest. A user's graph lives in their
own file: `algo.graph=my_file.py:my_graph` (a function cfg -> Graph).

    RL keys: prompts (dataset indices) -> the rollout fields (input_ids, action_mask, gen_logprobs, versions,
             group_id, response, ...) -> score, ref_logprobs, old_logprobs, values, last_values -> the train calls
             (which compute advantages themselves, on the whole batch, so every plan gives the same ones)
"""

from __future__ import annotations

from pathlib import Path

from reflow.runtime.calls.rollout import EPISODE_FIELDS, ROLLOUT_FIELDS
from reflow.runtime.graph import Call, Graph, GraphError
from reflow.runtime.roles import role_config

TOKENS = ("input_ids", "action_mask")  # what a forward call reads


def _rl_evals(cfg) -> Graph | None:
    if not cfg.data.eval:
        return None
    max_new = cfg.trainer.eval_max_new_tokens or cfg.rollout.max_new_tokens
    if cfg.rollout.env is not None:
        return Graph("eval", [Call("eval_generate", "actor", "generate", "eval_episodes", ("eval_prompts",),
                                   options={"placed_like": "actor_gen", "batch_size": cfg.rollout.batch_size})],
                     dataset_keys=("eval_prompts",))
    return Graph("eval", [Call("eval_generate", "actor", "generate", "eval_generate", ("eval_prompts",),
                               options={"placed_like": "actor_gen", "max_new_tokens": max_new, "reward": True,
                                        "batch_size": cfg.rollout.batch_size})],
                 dataset_keys=("eval_prompts",))


def _scoring(reward_model: bool, prm: bool, prefix: str = "") -> list[Call]:
    """The reward calls on a rollout: a reward function or model (its `score`), plus process rewards."""
    p = prefix
    name = f"reward{'_' + p.rstrip('_') if p else ''}"
    if reward_model:
        calls = [Call(name, "reward", "infer", "score_model", (p + "input_ids", p + "response_len"), ("score",),
                      prefix=p)]
    else:  # the train call reads `correct` (accuracy); the greedy baseline's score alone is used
        calls = [Call(name, "reward", "infer", "score_fn", (p + "prompt", p + "response", p + "answer",
                                                             p + "response_len"), ("score",) if p else ("score", "correct"),
                      prefix=p)]
    if prm:
        calls.append(Call("process_reward", "reward", "infer", "process_reward",
                          ("input_ids", "prompt_len", "response", "prompt"), ("prm_rewards",)))
    return calls


def ref_call(name: str, inputs, outputs, impl: str, on_actor_base: bool, **kw) -> Call:
    """The reference's call: on its own weights, or on the actor's with the LoRA adapters off (the base)."""
    if on_actor_base:
        return Call(name, "ref", "infer", impl, inputs, outputs, weights="actor",
                    **{**kw, "options": {**kw.get("options", {}), "adapters": "off"}})
    return Call(name, "ref", "infer", impl, inputs, outputs, **kw)


def ref_is_actor_base(cfg) -> bool:
    """Whether the reference is the LoRA-trained actor's base model (same folder): then it is computed from the
    actor's weights with adapters off."""
    actor = role_config(cfg, "actor")
    lora = getattr(actor, "lora", None)  # (a config built in code may hold a plain mapping here)
    if lora is None or not lora.rank:
        return False
    ref = role_config(cfg, "ref").path
    return Path(ref).resolve() == Path(actor.path).resolve()


def rl_graph(name: str, *, critic: bool = False, ref: bool = True, old_logprobs: bool = False, greedy: bool = False,
             reward_model: bool = False, prm: bool = False, ref_ema: tuple[float, int] | None = None,
             actor_ema: float | None = None, dynamic_sampling: bool = False, evals: Graph | None = None,
             ref_is_base: bool = False, episodes: bool = False, score: bool = True) -> Graph:
    """PPO (critic: GAE) and GRPO with its relatives (critic-free estimators), as one graph:

        actor_gen -> reward [-> process_reward] [-> ref_inf] [-> actor_inf] [-> critic_inf]
                  -> actor_train [-> critic_train] [-> ref_ema]
    greedy: ReMax's greedy rollout and its reward (the baseline), keyed by group (`greedy_score`).
    ref_ema: (decay, every) of an EMA reference that follows the actor; actor_ema: the decay of an EMA copy of
    the actor that its train call keeps (saved as ema_actor/ and final_ema/); dynamic_sampling: DAPO's group
    filter reports after each rollout round how many groups have reward spread (the loop generates more).
    ref_is_base: the reference is the LoRA actor's base model, so ref_inf runs on the actor's weights with its
    adapters off (`adapters: off`) and no second copy of the weights is loaded.
    episodes: multi-turn rollouts against rollout.env (`generate_episodes`, which adds EPISODE_FIELDS);
    score=False: no reward call, the rollout writes score = 0 (the env's rewards stand alone)."""
    if episodes:
        gen_out = (*ROLLOUT_FIELDS, *EPISODE_FIELDS) + (() if score else ("score",))
        calls = [Call("actor_gen", "actor", "generate", "generate_episodes", ("prompts",), gen_out)]
    else:
        calls = [Call("actor_gen", "actor", "generate", "generate", ("prompts",), ROLLOUT_FIELDS)]
    if score:
        calls += _scoring(reward_model, prm)
    train_in = [*ROLLOUT_FIELDS, "score"] + (["prm_rewards"] if prm else []) + (list(EPISODE_FIELDS) if episodes else [])
    if score and not reward_model:
        train_in.append("correct")
    if dynamic_sampling:
        calls.append(Call("group_filter", "reward", "infer", "count_spread", ("score", "group_id")))
    if greedy:
        calls.append(Call("actor_gen_greedy", "actor", "generate", "generate", ("prompts",),
                          ("prompt", "response", "answer", "input_ids", "response_len", "group_id"), {"greedy": True},
                          prefix="greedy_"))
        calls += _scoring(reward_model, False, prefix="greedy_")
        train_in.append("greedy_score")
    if ref:
        calls.append(ref_call("ref_inf", TOKENS, ("ref_logprobs",), "logprobs", ref_is_base))
        train_in.append("ref_logprobs")
    if old_logprobs:
        calls.append(Call("actor_inf", "actor", "infer", "logprobs", TOKENS, ("old_logprobs",)))
    critic_in = list(train_in)
    if critic:
        calls.append(Call("critic_inf", "critic", "infer", "values", TOKENS, ("values", "last_values")))
        train_in += ["values", "last_values"]
        critic_in += ["values", "last_values"]
    calls.append(Call("actor_train", "actor", "train", "train_policy",
                      tuple(train_in + (["old_logprobs"] if old_logprobs else [])),
                      options={"ema": actor_ema} if actor_ema is not None else {}))
    if critic:
        calls.append(Call("critic_train", "critic", "train", "train_critic", tuple(critic_in)))
    if ref and ref_ema is not None:
        calls.append(Call("ref_ema", "ref", "update", "ema_update", options={"decay": ref_ema[0], "every": ref_ema[1]},
                          weights="actor"))
    unread = [k for c in calls for k in c.published if not any(k in d.inputs for d in calls)]
    return Graph(name, calls, results=tuple(unread), evals=evals)


def ppo(ref: bool = True, old_logprobs: bool = False, **kw) -> Graph:
    """PPO, the six calls of DeepSpeed-Chat / ReaL (+ actor_inf when the batch is reused: epochs or mini-batches)."""
    return rl_graph("ppo", critic=True, ref=ref, old_logprobs=old_logprobs, **kw)


def grpo(ref: bool = True, old_logprobs: bool = False, **kw) -> Graph:
    return rl_graph("grpo", ref=ref, old_logprobs=old_logprobs, **kw)


def grpovi(ref: bool = True, old_logprobs: bool = False, **kw) -> Graph:
    """GRPO with the variance-increasing group weights: same calls, another advantage estimator."""
    return rl_graph("grpovi", ref=ref, old_logprobs=old_logprobs, **kw)


def rloo(ref: bool = True, old_logprobs: bool = False, **kw) -> Graph:
    return rl_graph("rloo", ref=ref, old_logprobs=old_logprobs, **kw)


def reinforce_pp(ref: bool = True, old_logprobs: bool = False, **kw) -> Graph:
    return rl_graph("reinforce++", ref=ref, old_logprobs=old_logprobs, **kw)


def remax(ref: bool = True, old_logprobs: bool = False, **kw) -> Graph:
    """ReMax: an extra greedy generation per prompt; its reward is the baseline of the prompt's samples."""
    return rl_graph("remax", ref=ref, old_logprobs=old_logprobs, greedy=True, **kw)


# advantage estimator (algo.adv_estimator) -> graph
GRAPHS = {"gae": ppo, "grpo": grpo, "drgrpo": grpo, "grpovi": grpovi, "rloo": rloo, "reinforce++": reinforce_pp,
          "reinforce++-baseline": reinforce_pp, "remax": remax}


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


def am_graph(cfg) -> Graph:
    """An advantage model: the frozen SFT policy samples K responses for each of the step's pair prompts, the AM
    trains on the pairs and those samples (reflow/runtime/calls/advantage.py); held-out pair accuracy and
    score statistics of SFT samples of the held-out prompts."""
    sampled = ("input_ids", "action_mask", "group_id")
    evals = None
    if cfg.eval_fraction > 0:
        evals = Graph("eval", [Call("eval_sample", "actor", "generate", "sample_sft", ("eval_pairs",), sampled,
                                    options={"placed_like": "sft_sample", "dataset": "eval_pairs", "key_step": -1}),
                               Call("eval_am", "reward", "infer", "eval_am", sampled,
                                    options={"placed_like": "reward_train"})],
                      dataset_keys=("eval_pairs",))
    return Graph("am", [Call("sft_sample", "actor", "generate", "sample_sft", ("examples",), sampled),
                        Call("reward_train", "reward", "train", "train_am", ("examples", *sampled))],
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
    base = ref_is_actor_base(cfg)
    if base:
        eval_calls = [ref_call(c.name, c.inputs, c.outputs, c.impl, True, options=c.options, prefix=c.prefix)
                      if c.role == "ref" else c for c in eval_calls]
        evals = Graph("eval", eval_calls, dataset_keys=("eval_pairs", "eval_prompts")) if eval_calls else None
    return Graph("dpo", [ref_call("ref_inf", ("examples",), ("ref_logp",), "pair_logprobs", base),
                         Call("actor_train", "actor", "train", "train_dpo", ("examples", "ref_logp"))],
                 dataset_keys=("examples",), evals=evals)


def graph_for(cfg) -> Graph:
    """The graph of a config: `algo.graph` (a user's file:function) or the estimator's RL graph; the graph of
    SFT, RM, AM and DPO configs."""
    from reflow.config.schema import AMConfig, DPOConfig, RLConfig, RMConfig, SFTConfig

    if isinstance(cfg, SFTConfig):
        return sft_graph(cfg)
    if isinstance(cfg, AMConfig):  # before RMConfig: an AM config is a reward-model config with more terms
        return am_graph(cfg)
    if isinstance(cfg, RMConfig):
        return rm_graph(cfg)
    if isinstance(cfg, DPOConfig):
        return dpo_graph(cfg)
    assert isinstance(cfg, RLConfig)
    if cfg.algo.graph:
        return user_graph(cfg)
    a = cfg.algo
    ref = bool(a.kl_coef > 0 or a.kl_target is not None or a.kl_metric)
    # the trainer's log-probs of the rollout (actor_inf -> old_logprobs), needed before the train call for a
    # batch used in several optimizer steps, and for MIS (which drops tokens, so changes the normaliser). With
    # one step the proximal policy of the decoupled loss is the train forward's own, so TIS and asynchronous
    # samples need no extra forward (policy.in_step_correction).
    old = a.ppo_epochs * a.mini_batches > 1 or a.rollout_correction == "mis"
    env = cfg.rollout.env
    if env is not None:  # a missing or malformed env class fails here, before any model loads
        from reflow.envs import EnvError, load_env

        try:
            load_env(env)
        except EnvError as e:
            raise GraphError(str(e)) from None
    return GRAPHS[a.estimator](ref=ref, old_logprobs=old, episodes=env is not None,
                               score=bool(cfg.reward.fn or cfg.reward.model),
                               reward_model=bool(cfg.reward.model), prm=bool(cfg.reward.prm),
                               ref_ema=(a.ref_ema, a.ref_ema_every) if a.ref_ema is not None else None,
                               actor_ema=a.actor_ema, dynamic_sampling=a.dynamic_sampling,
                               evals=_rl_evals(cfg), ref_is_base=ref and ref_is_actor_base(cfg))


def load_user_graph(spec: str):
    """`file.py:function` or `module:function` -> the function (its file may register calls and losses)."""
    from reflow.rewards.registry import RewardError, load_reward_fn

    try:
        return load_reward_fn(spec, keywords=("cfg",), key="algo.graph")
    except RewardError as e:
        raise GraphError(str(e)) from None


def user_graph(cfg) -> Graph:
    """The Graph that algo.graph's function returns for cfg; a GraphError naming algo.graph when it raises or
    returns something else."""
    spec = cfg.algo.graph
    fn = load_user_graph(spec)
    try:
        graph = fn(cfg)
    except GraphError:
        raise
    except Exception as e:
        raise GraphError(f"algo.graph {spec!r} raised {type(e).__name__}: {e}; fix that function") from e
    if not isinstance(graph, Graph):
        raise GraphError(f"algo.graph {spec!r} returned a {type(graph).__name__}, not a Graph; return "
                         "Graph(name, [Call(...), ...]) (reflow.runtime.graph)")
    return graph
