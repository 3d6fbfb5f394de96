"""A user's own algorithm, as the README shows: an advantage estimator and a graph, in the file that also
holds the reward function (so every worker imports it when it loads the reward)."""

from reflow.algorithms.advantages import broadcast_to_tokens
from reflow.algorithms.registry import register_advantage
from reflow.runtime.graph import Call, Graph
from reflow.runtime.graphs import GRAPHS


@register_advantage("centered_test")
def centered(*, rewards, seqlens, action_mask, **_):
    """A_i = r_i - mean(r) over the whole step, on every action token."""
    adv = broadcast_to_tokens(rewards - rewards.mean(), seqlens, action_mask)
    return adv, adv


def centered_graph(ref=True, old_logprobs=False):
    return Graph("centered_test", [
        Call("actor_gen", "actor", "generate", ("prompts",), ("responses",)),
        Call("reward", "reward", "infer", ("responses",), ("scores",)),
        Call("actor_train", "actor", "train", ("responses", "scores")),
    ])


GRAPHS["centered_test"] = centered_graph


def reward(prompts, responses, answers):
    return [float(len(r) % 3) for r in responses]

