"""Advantage estimators against hand computations and a plain per-sample reference loop."""

import statistics

import pytest
import torch

from reflow.algorithms.advantages import broadcast_to_tokens, gae, group_baseline, grpo, masked_whiten


def packed(prompt_lens, response_lens):
    """seqlens and action_mask of samples made of a prompt followed by a response."""
    seqlens = torch.tensor([p + r for p, r in zip(prompt_lens, response_lens)])
    mask = torch.cat([torch.cat([torch.zeros(p), torch.ones(r)]) for p, r in zip(prompt_lens, response_lens)])
    return seqlens, mask.long()


# ----------------------------------------------------------------- GRPO
def test_group_baseline_by_hand_on_two_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 5.0, 3.0])
    groups = torch.tensor([7, 7, 7, 9, 9, 9])
    eps = 1e-6
    expected = []
    for g in ([1.0, 0.0, 1.0], [2.0, 5.0, 3.0]):
        mean, std = statistics.mean(g), statistics.stdev(g)  # unbiased (n - 1)
        expected += [(r - mean) / (std + eps) for r in g]
    out = group_baseline(rewards, groups, eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)
    # group 7: mean 2/3, unbiased std 1/sqrt(3)
    assert out[1].item() == pytest.approx(-(2 / 3) / (1 / 3**0.5 + eps), abs=1e-6)


def test_group_baseline_groups_need_not_be_contiguous():
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0])
    groups = torch.tensor([0, 1, 0, 1])
    out = group_baseline(rewards, groups)
    ref = group_baseline(rewards[[0, 2, 1, 3]], groups[[0, 2, 1, 3]])[[0, 2, 1, 3]]
    torch.testing.assert_close(out, ref)
    assert out[0] > 0 > out[2] and out[3] > 0 > out[1]


def test_dr_grpo_only_centres():
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 5.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = group_baseline(rewards, groups, norm_std=False)
    torch.testing.assert_close(out, torch.tensor([1 / 3, -2 / 3, 1 / 3, -4 / 3, 5 / 3, -1 / 3]))


def test_single_sample_group_scores_zero():
    out = group_baseline(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert out[0].item() == 0.0
    assert out[1].item() < 0 < out[2].item()


def test_equal_rewards_in_a_group_score_zero_not_nan():
    out = group_baseline(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]))
    assert torch.equal(out, torch.zeros(3))


def test_grpo_broadcasts_the_score_to_action_tokens_only():
    seqlens, mask = packed([2, 3, 1], [2, 1, 3])
    rewards = torch.tensor([1.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 1])
    adv, ret = grpo(rewards=rewards, group_ids=groups, seqlens=seqlens, action_mask=mask)
    s = group_baseline(rewards, groups)
    expected = torch.tensor([0, 0, s[0], s[0], 0, 0, 0, s[1], 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected)
    assert s[0] > 0 > s[1]
    assert torch.equal(ret, adv)


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([2, -1]), torch.tensor([3, 2]), torch.tensor([0, 1, 1, 1, 0]))
    assert out.tolist() == [0.0, 2.0, 2.0, -1.0, 0.0]


# ----------------------------------------------------------------- GAE
def gae_reference(token_rewards, values, last_values, truncated, seqlens, action_mask, gamma, lam):
    """One sample at a time, one action token at a time, plain Python floats."""
    adv = [0.0] * len(values)
    start = 0
    for i, n in enumerate(seqlens.tolist()):
        acts = [t for t in range(start, start + n) if action_mask[t]]
        next_value = float(last_values[i]) if truncated[i] else 0.0
        next_adv = 0.0
        for t in reversed(acts):
            delta = float(token_rewards[t]) + gamma * next_value - float(values[t])
            next_adv = delta + gamma * lam * next_adv
            adv[t] = next_adv
            next_value = float(values[t])
        start += n
    adv = torch.tensor(adv)
    return adv, (adv + values) * action_mask


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    seqlens, mask = packed([3, 1, 5, 2, 4], [4, 6, 1, 3, 5])
    T = int(seqlens.sum())
    token_rewards = torch.randn(T, generator=g) * mask
    values = torch.randn(T, generator=g) * mask
    last_values = torch.randn(5, generator=g)
    truncated = torch.tensor([True, False, True, False, True])
    return dict(token_rewards=token_rewards, values=values, last_values=last_values, truncated=truncated,
                seqlens=seqlens, action_mask=mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_a_per_sample_reference_loop(seed):
    case = random_case(seed)
    adv, ret = gae(**case, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = gae_reference(**case, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=0)
    assert (adv[case["action_mask"] == 0] == 0).all()


def test_gae_last_token_bootstraps_only_when_truncated():
    case = random_case(2)
    gamma = 0.9
    adv, _ = gae(**case, gamma=gamma, lam=0.8)
    last = (torch.nn.functional.pad(case["seqlens"].cumsum(0), (1, 0))[1:] - 1).tolist()  # responses end samples
    r, v, lv = case["token_rewards"], case["values"], case["last_values"]
    for i, t in enumerate(last):
        if case["truncated"][i]:
            expected = r[t] + gamma * lv[i] - v[t]
        else:
            expected = r[t] - v[t]
        assert adv[t].item() == pytest.approx(expected.item(), abs=1e-6), f"sample {i}"


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    seqlens, mask = packed([2], [3])
    r = torch.tensor([0, 0, 1.0, 2.0, 3.0])
    v = torch.tensor([0, 0, 0.5, 0.25, 0.125])
    adv, ret = gae(token_rewards=r, values=v, last_values=torch.tensor([10.0]), truncated=torch.tensor([False]),
                   seqlens=seqlens, action_mask=mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([0, 0, 6 - 0.5, 5 - 0.25, 3 - 0.125]))
    torch.testing.assert_close(ret, torch.tensor([0, 0, 6.0, 5.0, 3.0]))


def test_gae_returns_are_advantages_plus_values_on_actions():
    case = random_case(3)
    adv, ret = gae(**case, gamma=0.9, lam=0.8)
    m = case["action_mask"].bool()
    torch.testing.assert_close(ret[m], adv[m] + case["values"][m])
    assert (ret[~m] == 0).all()


def test_gae_without_actions_is_zero():
    seqlens, mask = packed([3, 2], [0, 0])
    adv, ret = gae(token_rewards=torch.ones(5), values=torch.ones(5), last_values=torch.ones(2),
                   truncated=torch.tensor([True, False]), seqlens=seqlens, action_mask=mask)
    assert torch.equal(adv, torch.zeros(5)) and torch.equal(ret, torch.zeros(5))


# ----------------------------------------------------------------- whitening
def test_masked_whiten_standardises_over_the_mask_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, generator=g) * 3 + 5
    mask = torch.zeros(20, dtype=torch.long)
    mask[[1, 2, 5, 8, 9, 13, 17, 19]] = 1
    x_out = x.clone()
    x_out[mask == 0] = 1000.0  # values outside the mask must not matter
    out = masked_whiten(x_out, mask)
    m = mask.bool()
    assert out[m].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out[m].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (out[~m] == 0).all()
    torch.testing.assert_close(out, masked_whiten(x, mask))
