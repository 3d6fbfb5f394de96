"""DAPO's overlong reward shaping and dynamic-sampling filter against hand computations."""

import pytest
import torch

from reflow.algorithms.dapo import groups_with_spread, overlong_penalty


def test_overlong_penalty_follows_dapo_eq_13():
    # L_max = 20, L_cache = 5: free up to 15, then -1/5 per token down to -1 at 20, -1 beyond
    lengths = torch.tensor([10, 15, 16, 18, 20, 25])
    out = overlong_penalty(lengths, max_length=20, cache=5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 20, 5, factor=0.5), 0.5 * out)


def test_overlong_penalty_checks_the_cache():
    with pytest.raises(ValueError, match="0 < cache <= max_length"):
        overlong_penalty(torch.tensor([3]), max_length=4, cache=5)
    with pytest.raises(ValueError, match="0 < cache <= max_length"):
        overlong_penalty(torch.tensor([3]), max_length=4, cache=0)


def test_groups_with_spread_keeps_only_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.7, 0.7, 2.0, 0.3])
    groups = torch.tensor([0, 0, 0, 5, 5, 5, 2, 2, 3, 5])  # groups need not be contiguous
    assert groups_with_spread(rewards, groups).tolist() == [False, False, False, True, True, True,
                                                            False, False, False, True]


def test_groups_with_spread_agrees_with_zero_grpo_advantage():
    from reflow.algorithms.advantages import group_baseline

    rewards = torch.tensor([0.7] * 7 + [0.1, 0.9])
    groups = torch.tensor([0] * 7 + [1, 1])
    keep = groups_with_spread(rewards, groups)
    assert keep.tolist() == [False] * 7 + [True, True]
    assert torch.equal(group_baseline(rewards, groups)[~keep], torch.zeros(7))
