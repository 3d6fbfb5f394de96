"""A user's own algorithm, as the README shows: an advantage estimator, a call implementation and a graph, in
one file (`algo.graph=my_algo_plugin.py:centered_graph`; every worker imports it)."""

import torch

from reflow.algorithms.advantages import broadcast_to_tokens
from reflow.algorithms.registry import register_advantage
from reflow.runtime.calls import register_call
from reflow.runtime.calls.rollout import ROLLOUT_FIELDS
from reflow.runtime.graph import Call, Graph


@register_advantage("centered_test")
def centered(*, rewards, seqlens, action_mask, **_):
    """A_i = r_i - mean(r) over the whole step, on every action token."""
    adv = broadcast_to_tokens(rewards - rewards.mean(), seqlens, action_mask)
    return adv, adv


@register_call("length_score")
def length_score(cc, batch):
    """A reward computed by a call of the user's own: the response length modulo 3."""
    return batch.with_samples(**{cc.output_key(): torch.tensor([float(len(r) % 3) for r in batch.meta["response"]])})


def centered_graph(cfg):
    return Graph("centered_test", [
        Call("actor_gen", "actor", "generate", "generate", ("prompts",), ROLLOUT_FIELDS),
        Call("reward", "reward", "infer", "length_score", ("response",), ("score",)),
        Call("actor_train", "actor", "train", "train_policy", (*ROLLOUT_FIELDS, "score")),
    ])


def reward(prompts, responses, answers):
    return [float(len(r) % 3) for r in responses]
