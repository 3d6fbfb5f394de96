"""The algorithms of the field as graphs of calls (see graph.py). Adding an algorithm = a graph here (which
calls, which keys) + its loss / advantage functions in reflow.algorithms; the runtime does the rest.

    keys: prompts (dataset) -> responses (tokens, masks, generation log-probs) -> scores, ref_logprobs,
          old_logprobs, values -> consumed by the train calls (which compute advantages themselves, on the
          whole batch, so every plan gives the same advantages)
"""

from __future__ import annotations

from reflow.runtime.graph import Call, Graph


def _policy_gradient(name: str, ref: bool = True, old_logprobs: bool = False, extra: list[Call] = ()) -> Graph:
    """GRPO and its relatives: the actor generates, a reward scores, (a reference scores), the actor trains."""
    calls = [
        Call("actor_gen", "actor", "generate", ("prompts",), ("responses",)),
        Call("reward", "reward", "infer", ("responses",), ("scores",)),
        *extra,
    ]
    train_in = ["responses", "scores"] + [k for c in extra for k in c.outputs if k.endswith("scores")]
    if ref:
        calls.append(Call("ref_inf", "ref", "infer", ("responses",), ("ref_logprobs",)))
        train_in.append("ref_logprobs")
    if old_logprobs:
        calls.append(Call("actor_inf", "actor", "infer", ("responses",), ("old_logprobs",)))
        train_in.append("old_logprobs")
    calls.append(Call("actor_train", "actor", "train", tuple(train_in)))
    return Graph(name, calls)


def ppo(ref: bool = True, old_logprobs: bool = False) -> Graph:
    """PPO, the six calls of DeepSpeed-Chat / ReaL (+ actor_inf when the batch is reused: epochs or mini-batches)."""
    calls = [
        Call("actor_gen", "actor", "generate", ("prompts",), ("responses",)),
        Call("reward", "reward", "infer", ("responses",), ("scores",)),
    ]
    inputs = ["responses", "scores"]
    if ref:
        calls.append(Call("ref_inf", "ref", "infer", ("responses",), ("ref_logprobs",)))
        inputs.append("ref_logprobs")
    if old_logprobs:
        calls.append(Call("actor_inf", "actor", "infer", ("responses",), ("old_logprobs",)))
    calls.append(Call("critic_inf", "critic", "infer", ("responses",), ("values",)))
    inputs.append("values")
    calls.append(Call("actor_train", "actor", "train", tuple(inputs + (["old_logprobs"] if old_logprobs else []))))
    calls.append(Call("critic_train", "critic", "train", tuple(inputs)))
    return Graph("ppo", calls)


def grpo(ref: bool = True, old_logprobs: bool = False) -> Graph:
    return _policy_gradient("grpo", ref, old_logprobs)


def grpovi(ref: bool = True, old_logprobs: bool = False) -> Graph:
    """GRPO with the variance-increasing group weights: same calls, another advantage estimator."""
    return _policy_gradient("grpovi", ref, old_logprobs)


def rloo(ref: bool = True, old_logprobs: bool = False) -> Graph:
    return _policy_gradient("rloo", ref, old_logprobs)


def reinforce_pp(ref: bool = True, old_logprobs: bool = False) -> Graph:
    return _policy_gradient("reinforce++", ref, old_logprobs)


def remax(ref: bool = True, old_logprobs: bool = False) -> Graph:
    """ReMax: an extra greedy generation per prompt; its reward is the baseline of the prompt's samples."""
    extra = [Call("actor_gen_greedy", "actor", "generate", ("prompts",), ("greedy_responses",), {"greedy": True}),
             Call("reward_greedy", "reward", "infer", ("greedy_responses",), ("baseline_scores",))]
    return _policy_gradient("remax", ref, old_logprobs, extra)


def dpo() -> Graph:
    """DPO: the reference scores the preference pairs once, the actor trains on them."""
    return Graph("dpo", [Call("ref_inf", "ref", "infer", ("pairs",), ("ref_logprobs",)),
                         Call("actor_train", "actor", "train", ("pairs", "ref_logprobs"))], dataset_keys=("pairs",))


# advantage estimator (algo.adv_estimator) -> graph
GRAPHS = {"gae": ppo, "grpo": grpo, "drgrpo": grpo, "grpovi": grpovi, "rloo": rloo, "reinforce++": reinforce_pp,
          "reinforce++-baseline": reinforce_pp, "remax": remax}


def graph_for(cfg) -> Graph:
    """The graph of an RL config: the advantage estimator picks the algorithm; a reference role exists when
    a KL term is used; actor_inf when a batch is reused (several epochs or mini-batches)."""
    a = cfg.algo
    ref = bool(a.kl_coef > 0 or a.kl_target is not None or a.kl_metric)
    old = a.ppo_epochs * a.mini_batches > 1
    return GRAPHS[a.estimator](ref=ref, old_logprobs=old)
