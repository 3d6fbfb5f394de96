"""Advantage estimators against hand computations and a plain per-sample reference loop."""

import statistics

import pytest
import torch

from reflow.algorithms.advantages import (
    batch_normalize,
    broadcast_to_tokens,
    drgrpo,
    gae,
    group_baseline,
    group_mean,
    grpo,
    last_action_index,
    masked_whiten,
    outcome_rewards,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    return_to_go,
    rloo,
    rloo_baseline,
)
from reflow.algorithms.registry import ADVANTAGE_ESTIMATORS, get_advantage

NAN, INF = float("nan"), float("inf")


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


def test_a_group_of_equal_unrepresentable_rewards_scores_exactly_zero():
    """Seven rewards of 0.7: the float32 mean is one ulp off, and std 6e-8 / eps 1e-6 would make that +0.056."""
    rewards = torch.tensor([0.7] * 7 + [0.0, 1.0, 0.5])
    groups = torch.tensor([0] * 7 + [1, 1, 1])
    zeros = torch.zeros(7)
    assert torch.equal(group_baseline(rewards, groups)[:7], zeros)
    assert torch.equal(group_baseline(rewards, groups, norm_std=False)[:7], zeros)
    assert torch.equal(rloo_baseline(rewards, groups)[:7], zeros)
    # the group with spread is scored as before
    torch.testing.assert_close(group_baseline(rewards, groups)[7:], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    seqlens, mask = packed([1] * 10, [2] * 10)
    for estimator in (grpo, drgrpo, rloo):
        adv, _ = estimator(rewards=rewards, group_ids=groups, seqlens=seqlens, action_mask=mask)
        assert torch.equal(adv[:21], torch.zeros(21)), estimator.__name__


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


# ----------------------------------------------------------------- registry
def test_registered_names():
    for name in ("grpo", "drgrpo", "rloo", "reinforce++", "reinforce++-baseline", "remax", "gae"):
        assert name in ADVANTAGE_ESTIMATORS
    assert get_advantage("reinforce++") is reinforce_pp and get_advantage("drgrpo") is drgrpo
    with pytest.raises(KeyError, match="unknown advantage estimator 'ppo'"):
        get_advantage("ppo")


def full_kwargs(seed=0):
    """Everything the RL experiment hands an estimator: each must take what it needs and ignore the rest."""
    case = random_case(seed)
    B = len(case["seqlens"])
    return dict(case, rewards=torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0]), group_ids=torch.tensor([0, 0, 1, 1, 1]),
                gamma=1.0, lam=0.95, norm_std=True, baseline_rewards=torch.zeros(B), something_new=42)


@pytest.mark.parametrize("name", sorted(["grpo", "drgrpo", "rloo", "reinforce++", "reinforce++-baseline", "remax",
                                         "gae"]))
def test_every_estimator_takes_the_common_keywords_and_stays_on_actions(name):
    kw = full_kwargs()
    adv, ret = get_advantage(name)(**kw)
    T = int(kw["seqlens"].sum())
    assert adv.shape == (T,) and ret.shape == (T,)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    off = kw["action_mask"] == 0
    assert (adv[off] == 0).all() and (ret[off] == 0).all()
    if name != "gae":
        assert torch.equal(ret, adv)  # no critic: returns = advantages


# ----------------------------------------------------------------- Dr.GRPO
def test_drgrpo_is_grpo_without_std_whatever_norm_std_says():
    seqlens, mask = packed([2, 1, 3], [2, 3, 1])
    rewards, groups = torch.tensor([1.0, 0.0, 4.0]), torch.tensor([5, 5, 6])
    adv, ret = drgrpo(rewards=rewards, group_ids=groups, seqlens=seqlens, action_mask=mask, norm_std=True)
    ref, _ = grpo(rewards=rewards, group_ids=groups, seqlens=seqlens, action_mask=mask, norm_std=False)
    torch.testing.assert_close(adv, ref)
    # group 5: mean 0.5 -> +0.5 / -0.5; group 6 has one sample -> 0
    expected = torch.tensor([0, 0, 0.5, 0.5, 0, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected)
    assert torch.equal(ret, adv)


# ----------------------------------------------------------------- RLOO
def test_rloo_baseline_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 5.0, 3.0, 7.0])
    groups = torch.tensor([7, 7, 7, 9, 9, 9, 4])
    out = rloo_baseline(rewards, groups)
    # group 7: 1 - (0 + 1)/2, 0 - (1 + 1)/2, 1 - (1 + 0)/2; group 9: 2 - 4, 5 - 2.5, 3 - 3.5; group of one: 0
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 0.5, -2.0, 2.5, -0.5, 0.0]))
    # = n/(n-1) * (r - mean)
    torch.testing.assert_close(out[:6], 1.5 * group_baseline(rewards[:6], groups[:6], norm_std=False))


def test_rloo_broadcasts_to_action_tokens_only():
    seqlens, mask = packed([2, 1, 3], [1, 2, 2])
    adv, ret = rloo(rewards=torch.tensor([3.0, 1.0, 8.0]), group_ids=torch.tensor([0, 0, 1]), seqlens=seqlens,
                    action_mask=mask)
    # pair (3, 1): +2 / -2; sample 2 alone: 0
    torch.testing.assert_close(adv, torch.tensor([0, 0, 2.0, 0, -2.0, -2.0, 0, 0, 0, 0, 0]))
    assert torch.equal(ret, adv)


# ----------------------------------------------------------------- ReMax
def test_remax_subtracts_the_greedy_reward():
    seqlens, mask = packed([1, 2], [2, 1])
    adv, ret = remax(rewards=torch.tensor([1.0, 0.5]), baseline_rewards=torch.tensor([0.25, 1.0]), seqlens=seqlens,
                     action_mask=mask, group_ids=torch.tensor([0, 1]))
    torch.testing.assert_close(adv, torch.tensor([0, 0.75, 0.75, 0, 0, -0.5]))
    assert torch.equal(ret, adv)


def test_remax_without_baseline_says_what_it_needs():
    seqlens, mask = packed([1], [2])
    with pytest.raises(ValueError, match="remax.*baseline_rewards.*greedy"):
        remax(rewards=torch.tensor([1.0]), seqlens=seqlens, action_mask=mask)
    with pytest.raises(ValueError, match="shape"):
        remax(rewards=torch.tensor([1.0]), baseline_rewards=torch.tensor([1.0, 2.0]), seqlens=seqlens, action_mask=mask)


# ----------------------------------------------------------------- REINFORCE++
def rpp_case():
    """Sample 0: prompt 2, response 3; sample 1: prompt 1, response 2. Garbage rewards on prompt tokens."""
    seqlens, mask = packed([2, 1], [3, 2])
    #                     prompt       response: KL penalties, score 1 - 0.3 on the last
    r = torch.tensor([NAN, 100.0, -0.1, -0.2, 0.7, INF, 0.0, 2.0])
    return seqlens, mask, r


def test_return_to_go_by_hand_stays_inside_each_sample():
    seqlens, mask, r = rpp_case()
    g = return_to_go(r, seqlens, mask, gamma=0.5)
    # sample 0: 0.7; -0.2 + 0.5 * 0.7 = 0.15; -0.1 + 0.5 * 0.15 = -0.025. sample 1: 2; 0 + 0.5 * 2 = 1
    torch.testing.assert_close(g, torch.tensor([0, 0, -0.025, 0.15, 0.7, 0, 1.0, 2.0]))
    g1 = return_to_go(r, seqlens, mask, gamma=1.0)
    torch.testing.assert_close(g1, torch.tensor([0, 0, 0.4, 0.5, 0.7, 0, 2.0, 2.0]))


def test_return_to_go_matches_a_loop_on_random_packed_batches():
    case = random_case(4)
    for gamma in (1.0, 0.9):
        out = return_to_go(case["token_rewards"], case["seqlens"], case["action_mask"], gamma)
        ref = torch.zeros_like(out)
        start = 0
        for n in case["seqlens"].tolist():
            running = 0.0
            for t in reversed(range(start, start + n)):
                if case["action_mask"][t]:
                    running = float(case["token_rewards"][t]) + gamma * running
                    ref[t] = running
            start += n
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_reinforce_pp_by_hand():
    seqlens, mask, r = rpp_case()
    adv, ret = reinforce_pp(token_rewards=r, seqlens=seqlens, action_mask=mask, gamma=0.5)
    g = [-0.025, 0.15, 0.7, 1.0, 2.0]
    mean, std = statistics.mean(g), statistics.pstdev(g)  # population std over all action tokens of the batch
    expected = torch.tensor([0, 0, *[(x - mean) / std for x in g[:3]], 0, *[(x - mean) / std for x in g[3:]]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(ret, adv)


def test_reinforce_pp_normalises_over_all_action_tokens():
    case = random_case(5)
    adv, _ = reinforce_pp(**case, gamma=0.9)
    m = case["action_mask"].bool()
    assert adv[m].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[m].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (adv[~m] == 0).all()
    # garbage on the prompt tokens changes nothing
    dirty = case["token_rewards"].clone()
    dirty[~m] = float("nan")
    torch.testing.assert_close(reinforce_pp(**{**case, "token_rewards": dirty}, gamma=0.9)[0], adv)


def test_batch_normalize_constant_and_empty():
    mask = torch.tensor([0, 1, 1, 1])
    assert torch.equal(batch_normalize(torch.tensor([NAN, 2.0, 2.0, 2.0]), mask), torch.zeros(4))
    assert torch.equal(batch_normalize(torch.tensor([1.0, 2.0]), torch.zeros(2)), torch.zeros(2))


def test_last_action_index():
    seqlens, mask = packed([2, 3, 1], [2, 0, 3])
    last, has = last_action_index(seqlens, mask)
    assert last[has].tolist() == [3, 10]  # samples span 0-3, 4-6, 7-10 and has.tolist() == [True, False, True]


def test_group_mean():
    torch.testing.assert_close(group_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([2, 2, 0])),
                               torch.tensor([2.0, 2.0, 5.0]))


def rppb_case():
    """Scores [1, 0, 2], groups [0, 0, 1]; responses of 2, 3, 1 tokens after prompts of 1, 2, 2 tokens."""
    seqlens, mask = packed([1, 2, 2], [2, 3, 1])
    #            prompt | KL, score 1 | prompt     | 0, KL, score 0 | prompt   | score 2
    r = torch.tensor([9.0, -0.1, 1.0, NAN, 5.0, 0.0, -0.2, 0.0, INF, -7.0, 2.0])
    return dict(rewards=torch.tensor([1.0, 0.0, 2.0]), group_ids=torch.tensor([0, 0, 1]), token_rewards=r,
                seqlens=seqlens, action_mask=mask)


def test_reinforce_pp_baseline_by_hand():
    case = rppb_case()
    adv, ret = reinforce_pp_baseline(**case, gamma=1.0)
    # centred scores: 1 - 0.5, 0 - 0.5, 2 - 2 (group of one). Last tokens become 0.5, -0.5, 0.
    # returns-to-go: sample 0 [-0.1 + 0.5, 0.5] = [0.4, 0.5]; sample 1 [-0.7, -0.7, -0.5]; sample 2 [0]
    g = [0.4, 0.5, -0.7, -0.7, -0.5, 0.0]
    mean, std = statistics.mean(g), statistics.pstdev(g)
    z = [(x - mean) / std for x in g]
    expected = torch.tensor([0, z[0], z[1], 0, 0, z[2], z[3], z[4], 0, 0, z[5]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(ret, adv)
    m = case["action_mask"].bool()
    # as OpenRLHF: the global normalisation subtracts the batch mean and divides by the batch std
    assert adv[m].sum().item() == pytest.approx(0.0, abs=1e-5)
    assert adv[m].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_reinforce_pp_baseline_ignores_a_shift_of_all_scores_in_a_group():
    case = rppb_case()
    shifted = dict(case, rewards=case["rewards"] + 10.0, token_rewards=case["token_rewards"].clone())
    shifted["token_rewards"][[2, 7, 10]] += 10.0  # the score on each last token moves with it
    torch.testing.assert_close(reinforce_pp_baseline(**shifted)[0], reinforce_pp_baseline(**case)[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------- token rewards in the outcome estimators
def kl_in_reward_case():
    """Three samples (groups [0, 0, 1]); token rewards = score on the last action - KL penalties; prompts garbage."""
    seqlens, mask = packed([1, 1, 1], [2, 3, 1])
    #                       p    KL    score 1 | p    KL    KL    score 0 | p    score 4
    token_rewards = torch.tensor([NAN, -0.1, 1.0, INF, -0.2, -0.3, 0.0, NAN, 4.0])
    return dict(rewards=torch.tensor([1.0, 0.0, 4.0]), group_ids=torch.tensor([0, 0, 1]), seqlens=seqlens,
                action_mask=mask, token_rewards=token_rewards)


def test_outcome_rewards_sum_the_token_rewards_of_each_sample():
    case = kl_in_reward_case()
    r = outcome_rewards(case["rewards"], case["token_rewards"], case["seqlens"], case["action_mask"])
    torch.testing.assert_close(r, torch.tensor([0.9, -0.5, 4.0]))
    assert torch.equal(outcome_rewards(case["rewards"], None, case["seqlens"], case["action_mask"]), case["rewards"])
    # a sample without action tokens keeps its score
    seqlens, mask = packed([2, 1], [0, 1])
    r = outcome_rewards(torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 5.0]), seqlens, mask)
    assert r.tolist() == [3.0, 5.0]


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "remax"])
def test_outcome_estimators_see_the_kl_in_the_reward(name):
    case = kl_in_reward_case()
    case["baseline_rewards"] = torch.tensor([0.5, 0.5, 3.0])
    summed = torch.tensor([0.9, -0.5, 4.0])
    adv, _ = get_advantage(name)(**case)
    expected, _ = get_advantage(name)(**{**case, "rewards": summed, "token_rewards": None})
    torch.testing.assert_close(adv, expected)
    # score-only token rewards (the KL in the loss) give exactly the advantages of the scores
    score_only = torch.where(case["token_rewards"] > 0, case["token_rewards"], torch.zeros(()))
    plain, _ = get_advantage(name)(**{**case, "token_rewards": None})
    assert torch.equal(get_advantage(name)(**{**case, "token_rewards": score_only})[0], plain)


def test_grpo_with_kl_in_the_reward_by_hand():
    case = kl_in_reward_case()
    adv, _ = grpo(**case)
    # group 0: r = [0.9, -0.5], mean 0.2, unbiased std 0.9899; group 1 alone: 0
    s = 0.7 / (statistics.stdev([0.9, -0.5]) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([0, s, s, 0, -s, -s, -s, 0, 0.0]))
    # remax: r - b with b the greedy response's score alone
    adv, _ = remax(**case, baseline_rewards=torch.tensor([0.5, 0.5, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([0, 0.4, 0.4, 0, -1.0, -1.0, -1.0, 0, 1.0]))


def test_gae_over_a_multi_turn_sample_skips_the_observation_tokens_as_part_of_the_transition():
    # prompt (2 tokens), turn 1 (2 actions), observation (3 tokens), turn 2 (2 actions): GAE runs over the
    # action tokens only, so V of turn 2's first token (which has seen the observation) is turn 1's next value
    mask = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1])
    values = torch.tensor([9.0, 9.0, 0.1, 0.2, 7.0, 7.0, 7.0, 0.3, 0.4])
    rewards = torch.tensor([5.0, 5.0, 0.0, 0.5, 3.0, 3.0, 3.0, 0.0, 1.0])  # off-mask rewards never enter
    kw = dict(last_values=torch.tensor([0.0]), truncated=torch.tensor([False]), gamma=0.9, lam=0.8)
    adv, ret = gae(token_rewards=rewards, values=values, seqlens=torch.tensor([9]), action_mask=mask, **kw)
    act = mask.bool()
    compact, compact_ret = gae(token_rewards=rewards[act], values=values[act], seqlens=torch.tensor([4]),
                               action_mask=torch.ones(4, dtype=torch.long), **kw)
    assert torch.allclose(adv[act], compact) and torch.allclose(ret[act], compact_ret)
    assert (adv[~act] == 0).all() and (ret[~act] == 0).all()
