"""The advantage model's loss terms: Bradley-Terry on pairs, per-prompt centring under SFT samples, the
per-task L2 bound, and their additivity over micro-batches (reflow/algorithms/advantage_model.py)."""

import math

import torch

from reflow.algorithms.advantage_model import CHOSEN, REJECTED, SAMPLED, advantage_model_loss, bound_weights
from reflow.algorithms.losses import pairwise_reward_loss

# two prompts (groups 0, 1): chosen, rejected, then 3 SFT samples each
KIND = torch.tensor([CHOSEN, REJECTED, SAMPLED, SAMPLED, SAMPLED] * 2)
GROUP = torch.tensor([0] * 5 + [1] * 5)
SCORES = torch.tensor([1.0, -0.5, 0.3, 0.6, 0.0, 2.0, 1.0, -1.0, -2.0, 0.0])


def loss(scores, centre=0.0, bound=0.0, w=None, kind=KIND, group=GROUP, pairs=2.0):
    w = torch.zeros(len(scores)) if w is None else w
    return advantage_model_loss(scores, kind, group, w, pairs=pairs, centre_coef=centre, bound_coef=bound)


def test_without_centring_and_bound_the_loss_is_the_pairwise_reward_loss():
    l, stats = loss(SCORES)
    bt, bt_stats = pairwise_reward_loss(SCORES[KIND == CHOSEN], SCORES[KIND == REJECTED], 2.0)
    assert torch.allclose(l, bt) and torch.allclose(stats["bt_loss"], bt)
    assert stats["accuracy"] == bt_stats["accuracy"] == 1.0


def test_the_centre_term_is_the_mean_over_prompts_of_the_squared_mean_of_their_sft_sample_scores():
    _, stats = loss(SCORES, centre=1.0)
    expected = ((0.3 + 0.6 + 0.0) / 3) ** 2 / 2 + ((-1.0 - 2.0 + 0.0) / 3) ** 2 / 2
    assert math.isclose(float(stats["centre"]), expected, rel_tol=1e-6)
    l0, _ = loss(SCORES)
    l1, _ = loss(SCORES, centre=0.5)
    assert math.isclose(float(l1 - l0), 0.5 * expected, rel_tol=1e-5)


def test_centring_pulls_each_prompts_sft_mean_to_zero_and_leaves_pair_margins_to_the_pairwise_term():
    s = SCORES.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(s, centre=1.0)[0] - loss(s)[0], s)  # the centre term's gradient
    # d/ds_j (mean_i)^2 / P = 2 mean_i / (K P) on prompt i's samples, 0 on chosen / rejected
    assert torch.allclose(g[KIND != SAMPLED], torch.zeros(4))
    assert torch.allclose(g[2:5], torch.full((3,), 2 * 0.3 / (3 * 2)))
    assert torch.allclose(g[7:10], torch.full((3,), 2 * -1.0 / (3 * 2)))
    # gradient descent on the centre term alone drives every prompt's sample mean to zero
    x = SCORES.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        (loss(x, centre=1.0)[0] - loss(x)[0]).backward()
        opt.step()
    x = x.detach()
    assert abs(float(x[2:5].mean())) < 1e-3 and abs(float(x[7:10].mean())) < 1e-3
    assert torch.allclose(x[KIND != SAMPLED], SCORES[KIND != SAMPLED])  # pairs untouched by the centre term


def test_bound_weights_average_squared_scores_within_each_task_then_over_tasks():
    w = bound_weights(["a", "a", "a", "b"])
    assert torch.allclose(w, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(float((w * s ** 2).sum()), 0.5 * ((1 + 4 + 9) / 3 + 16), rel_tol=1e-6)
    assert torch.allclose(bound_weights([None] * 4), torch.full((4,), 0.25))  # no task column: one task


def test_the_bound_term_is_the_weighted_sum_of_squared_scores_scaled_by_its_coefficient():
    w = bound_weights(["a"] * 5 + ["b"] * 5)
    l0, _ = loss(SCORES, w=w)
    l1, stats = loss(SCORES, bound=0.1, w=w)
    expected = 0.5 * float((SCORES[:5] ** 2).mean() + (SCORES[5:] ** 2).mean())
    assert math.isclose(float(stats["bound"]), expected, rel_tol=1e-6)
    assert math.isclose(float(l1 - l0), 0.1 * expected, rel_tol=1e-5)


def test_micro_batches_of_whole_groups_add_up_to_the_loss_and_stats_of_the_whole_step():
    w = bound_weights(["a"] * 5 + ["b"] * 5)
    whole, ws = loss(SCORES, centre=1.0, bound=0.1, w=w)
    parts = [loss(SCORES[sl], centre=1.0, bound=0.1, w=w[sl], kind=KIND[sl], group=GROUP[sl])
             for sl in (slice(0, 5), slice(5, 10))]
    assert torch.allclose(whole, parts[0][0] + parts[1][0])
    for k in ws:
        assert torch.allclose(ws[k], parts[0][1][k] + parts[1][1][k]), k
