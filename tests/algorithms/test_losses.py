"""Policy, value, KL and reward-model losses against hand computations."""

import math

import pytest
import torch

from reflow.algorithms.losses import (
    AdaptiveKLController,
    kl_penalty,
    pairwise_reward_loss,
    ppo_policy_loss,
    sequence_nll,
    value_loss,
)


# ----------------------------------------------------------------- KL estimators
def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    log_r = [-0.5, 1.0, 0.0]  # ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(x) - 1 - x for x in log_r]))


def test_k3_is_never_negative_and_zero_only_at_equal_logprobs():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all() and (k3 > 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(1000))
    assert torch.isfinite(kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]), "k3")).all()  # clamped exp


def test_unknown_kl_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ----------------------------------------------------------------- PPO
def ppo_case():
    """Five tokens; ratios 1.5 and 0.6 fall outside [0.8, 1.2]; the last token is masked out."""
    ratio = torch.tensor([1.0, 1.5, 1.5, 0.6, 0.6, 3.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -1.0])
    logp = old + ratio.log()
    adv = torch.tensor([2.0, 1.0, -1.0, 1.0, -2.0, 5.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    return logp, old, adv, mask, ratio


def test_ppo_policy_loss_by_hand():
    logp, old, adv, mask, _ = ppo_case()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, denom=5.0, clip_low=0.2, clip_high=0.2)
    per_token = [
        -2.0,         # ratio 1,   A  2: -1 * 2
        -1.2,         # ratio 1.5, A  1: clipped to 1.2 (no gain beyond the trust region)
        1.5,          # ratio 1.5, A -1: unclipped 1.5 * -1 is the min, so no clipping for a worse ratio
        -0.6,         # ratio 0.6, A  1: unclipped 0.6 is the min
        1.6,          # ratio 0.6, A -2: clipped to 0.8 * -2
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 5.0, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)  # tokens 1 and 4
    log_r = (logp - old)[:5]
    assert stats["approx_kl_old"].item() == pytest.approx((0.5 * log_r**2).sum().item() / 5.0, abs=1e-6)


def test_ppo_asymmetric_clip_bounds():
    logp, old, adv, mask, _ = ppo_case()
    # clip-higher (DAPO): 1 + 0.6 lets the ratio-1.5 token with A > 0 through, 1 - 0.1 clips 0.6 to 0.9
    loss, stats = ppo_policy_loss(logp, old, adv, mask, denom=5.0, clip_low=0.1, clip_high=0.6)
    per_token = [-2.0, -1.5, 1.5, -0.6, 1.8]
    assert loss.item() == pytest.approx(sum(per_token) / 5.0, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 5)


def test_ppo_gradient_is_zero_on_clipped_tokens():
    logp, old, adv, mask, _ = ppo_case()
    logp = logp.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, denom=5.0)
    loss.backward()
    grad = logp.grad
    assert grad[1] == 0 and grad[4] == 0 and grad[5] == 0  # clipped, clipped, masked
    assert grad[0].item() == pytest.approx(-2.0 / 5)  # d(-ratio*A)/dlogp = -ratio*A at ratio 1
    assert grad[2].item() == pytest.approx(1.5 / 5)


def test_losses_over_two_halves_with_a_shared_denom_sum_to_the_whole():
    g = torch.Generator().manual_seed(0)
    n = 12
    logp, old = torch.randn(n, generator=g) * 0.3 - 1, torch.randn(n, generator=g) * 0.3 - 1
    adv, mask = torch.randn(n, generator=g), (torch.rand(n, generator=g) > 0.3).long()
    values, old_values, returns = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    denom = float(mask.sum())
    a, b = slice(0, 5), slice(5, n)

    whole, whole_stats = ppo_policy_loss(logp, old, adv, mask, denom)
    halves = [ppo_policy_loss(logp[s], old[s], adv[s], mask[s], denom) for s in (a, b)]
    assert (halves[0][0] + halves[1][0]).item() == pytest.approx(whole.item(), abs=1e-6)
    assert (halves[0][1]["clipfrac"] + halves[1][1]["clipfrac"]).item() == pytest.approx(whole_stats["clipfrac"].item())

    v_whole, _ = value_loss(values, old_values, returns, mask, denom)
    v_halves = [value_loss(values[s], old_values[s], returns[s], mask[s], denom)[0] for s in (a, b)]
    assert (v_halves[0] + v_halves[1]).item() == pytest.approx(v_whole.item(), abs=1e-6)

    nll = sequence_nll(logp, mask, denom)
    assert (sequence_nll(logp[a], mask[a], denom) + sequence_nll(logp[b], mask[b], denom)).item() == pytest.approx(
        nll.item(), abs=1e-6)
    assert nll.item() == pytest.approx(-logp[mask.bool()].mean().item(), abs=1e-6)


# ----------------------------------------------------------------- value loss
def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    values = torch.tensor([1.0, 1.0, 0.1, 0.5])
    old = torch.tensor([0.0, 0.0, 0.0, 0.4])
    returns = torch.tensor([2.0, 0.0, 0.1, 0.5])
    mask = torch.ones(4)
    loss, stats = value_loss(values, old, returns, mask, denom=4.0, clip=0.2)
    # token 0: V moved 1.0 toward R=2, clipped V = 0.2: errors 1 vs 3.24 -> 3.24 (clipping stops the gain)
    # token 1: V moved away from R=0: errors 1 vs 0.04 -> 1 (the unclipped, larger error)
    # tokens 2, 3: within the clip range, both errors equal 0
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 4.0, abs=1e-6)
    assert stats["value_error"].item() == pytest.approx((1.0 + 1.0) / 4.0, abs=1e-6)
    unclipped, _ = value_loss(values, old, returns, mask, denom=4.0, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0) / 4.0, abs=1e-6)


# ----------------------------------------------------------------- reward model
def test_pairwise_reward_loss_and_accuracy():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])
    loss, stats = pairwise_reward_loss(chosen, rejected, denom=3.0)
    margins = [1.0, -0.5, 0.0]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 3.0  # -log sigmoid(m)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1.5 / 3)  # a tie counts half
    assert stats["margin"].item() == pytest.approx(0.5 / 3)


# ----------------------------------------------------------------- adaptive KL
def test_adaptive_kl_moves_toward_the_target():
    up = AdaptiveKLController(0.1, target=1.0, horizon=100)
    up.update(kl=1.1, n_steps=10)  # KL above target -> more penalty: err 0.1
    assert up.value == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    down = AdaptiveKLController(0.1, target=1.0, horizon=100)
    down.update(kl=0.0, n_steps=10)  # err clipped at -0.2
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))
    far = AdaptiveKLController(0.1, target=1.0, horizon=100)
    far.update(kl=50.0, n_steps=10)  # err clipped at +0.2
    assert far.value == pytest.approx(0.1 * 1.02)


def test_fixed_kl_coefficient_without_target():
    c = AdaptiveKLController(0.05)
    for kl in (0.0, 10.0, 1e6):
        c.update(kl, n_steps=1000)
    assert c.value == 0.05


def test_adaptive_kl_state_round_trip():
    c = AdaptiveKLController(0.1, target=1.0, horizon=10)
    c.update(2.0, 5)
    d = AdaptiveKLController(0.1, target=1.0, horizon=10)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value != 0.1


def test_pair_accuracy_counts_ties_as_half():
    from reflow.algorithms.losses import pair_accuracy

    assert pair_accuracy(torch.tensor([1.0, 0.0, -2.0])).tolist() == [1.0, 0.5, 0.0]
