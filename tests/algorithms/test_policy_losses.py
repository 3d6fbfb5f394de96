"""GSPO, CISPO, Clip-Cov and KL-Cov against hand computations; the policy-loss registry."""

import inspect
import math

import pytest
import torch

from reflow.algorithms.aggregation import Norm
from reflow.algorithms.losses import ppo_policy_loss
from reflow.algorithms.policy_losses import (
    cispo_policy_loss,
    clip_cov_policy_loss,
    gspo_policy_loss,
    kl_cov_policy_loss,
    token_covariance,
)
from reflow.algorithms.registry import POLICY_LOSSES, get_policy_loss

NAN = float("nan")


# ----------------------------------------------------------------- registry
def test_policy_losses_are_registered_by_name():
    assert {"ppo", "gspo", "cispo", "clip_cov", "kl_cov"} <= set(POLICY_LOSSES)
    assert get_policy_loss("ppo") is ppo_policy_loss
    assert get_policy_loss("gspo") is gspo_policy_loss
    with pytest.raises(KeyError, match="unknown policy loss 'grpo'.*cispo"):
        get_policy_loss("grpo")


def test_every_policy_loss_has_the_common_signature():
    common = ["logp", "old_logp", "advantages", "mask", "seqlens", "norm"]
    for name, fn in POLICY_LOSSES.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:6] == common, name
        assert params["rollout_weights"].default is None, name
        # options are keyword-only and named: a misspelt option is an error, not ignored
        assert all(p.kind == p.KEYWORD_ONLY for p in list(params.values())[6:]), name


# ----------------------------------------------------------------- GSPO
def gspo_case():
    """Two samples: 1 prompt + 2 response tokens, 1 prompt + 3 response tokens; prompt entries are garbage."""
    seqlens = torch.tensor([3, 4])
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1])
    old = torch.tensor([NAN, -1.0, -2.0, NAN, -0.5, -1.5, -3.0])
    #                  sample 0: mean 0.2       sample 1: mean -0.1
    log_ratio = torch.tensor([0.0, 0.1, 0.3, 0.0, -0.2, 0.0, -0.1])
    logp = (old.nan_to_num(0.0) + log_ratio).requires_grad_()
    adv = torch.tensor([NAN, 1.0, 1.0, NAN, -2.0, -2.0, -2.0])
    return logp, old, adv, mask, seqlens


def test_gspo_clips_whole_sequences_on_the_geometric_mean_ratio():
    logp, old, adv, mask, seqlens = gspo_case()
    norm = Norm(tokens=5.0, samples=2.0)
    loss, stats = gspo_policy_loss(logp, old, adv, mask, seqlens, norm, clip_low=0.1, clip_high=0.1)
    s0, s1 = math.exp(0.2), math.exp(-0.1)  # 1.221 (above 1.1, A > 0: clipped), 0.905 (inside [0.9, 1.1])
    # per sequence token-mean: sample 0 -1.1 on both tokens; sample 1: -A s1 = 2 s1. Then / 2 sequences.
    assert loss.item() == pytest.approx((-1.1 + 2 * s1) / 2, abs=1e-6)
    # sample 1's first token alone has ratio e^-0.2 = 0.82 < 0.9: PPO would clip it, GSPO does not
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    loss.backward()
    # clipped sequence: no gradient. Sample 1: d(-A s_{1,t})/dlogp_t = -A s1, / 3 tokens / 2 sequences
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 2 * s1 / 6, 2 * s1 / 6, 2 * s1 / 6])
    torch.testing.assert_close(logp.grad, expected)
    assert s0 > 1.1


def test_gspo_gradient_is_the_sequence_level_gradient():
    """With a per-sequence advantage, GSPO-token's gradient equals that of -A_i s_i(theta), averaged over sequences."""
    logp, old, adv, mask, seqlens = gspo_case()
    loss, _ = gspo_policy_loss(logp, old, adv, mask, seqlens, Norm(5.0, 2.0), clip_low=0.5, clip_high=0.5)
    loss.backward()
    lp = logp.detach().clone().requires_grad_()
    o = old.nan_to_num(0.0)
    s0 = torch.exp((lp[1:3] - o[1:3]).mean())
    s1 = torch.exp((lp[4:7] - o[4:7]).mean())
    ((-1.0 * s0 + 2.0 * s1) / 2).backward()
    torch.testing.assert_close(logp.grad, lp.grad)


def test_gspo_rollout_weights_scale_each_token():
    logp, old, adv, mask, seqlens = gspo_case()
    norm = Norm(5.0, 2.0)
    w = torch.tensor([NAN, 2.0, 2.0, NAN, 0.5, 0.5, 0.5])
    plain, _ = gspo_policy_loss(logp, old, adv, mask, seqlens, norm, clip_low=0.1, clip_high=0.1)
    loss, _ = gspo_policy_loss(logp, old, adv, mask, seqlens, norm, clip_low=0.1, clip_high=0.1, rollout_weights=w)
    assert loss.item() == pytest.approx((2 * -1.1 + 0.5 * 2 * math.exp(-0.1)) / 2, abs=1e-6)
    assert plain.item() != loss.item()


# ----------------------------------------------------------------- CISPO
def cispo_case():
    ratio = torch.tensor([1.5, 0.5, 1.0])
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    old = logp.detach() - ratio.log()
    adv = torch.tensor([1.0, -1.0, 2.0])
    return logp, old, adv, torch.ones(3), torch.tensor([3])


def test_cispo_by_hand_every_token_keeps_its_gradient():
    logp, old, adv, mask, seqlens = cispo_case()
    loss, stats = cispo_policy_loss(logp, old, adv, mask, seqlens, Norm(3.0, 1.0), clip_low=None, clip_high=0.2)
    w = [1.2, 0.5, 1.0]  # 1.5 capped at 1.2; no lower bound, so 0.5 stays
    per_token = [-w[0] * 1 * -1.0, -w[1] * -1 * -2.0, -w[2] * 2 * -0.5]  # -sg(w) A logp = [1.2, -1.0, 1.0]
    assert loss.item() == pytest.approx(sum(per_token) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dlogp = -w A / 3: the token above 1 + clip_high with A > 0 still pulls (PPO would give it 0)
    torch.testing.assert_close(logp.grad, torch.tensor([-1.2, 0.5, -2.0]) / 3)


def test_cispo_lower_bound_and_agg():
    logp, old, adv, mask, seqlens = cispo_case()
    loss, stats = cispo_policy_loss(logp, old, adv, mask, seqlens, Norm(3.0, 1.0), clip_low=0.2, clip_high=0.2,
                                    agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx(1.2 - 0.8 * 2.0 + 1.0, abs=1e-6)  # 0.5 raised to 0.8; summed
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------- Clip-Cov / KL-Cov
def cov_case(log_ratio):
    """One sample: a garbage prompt token, then 4 action tokens with logp deviations [+1, -1, +1, -1]."""
    logp = torch.tensor([NAN, -0.5, -2.5, -0.5, -2.5], requires_grad=True)
    old = logp.detach() - torch.tensor([0.0, *log_ratio])
    mask = torch.tensor([0, 1, 1, 1, 1])
    return logp, old, mask, torch.tensor([5])


def test_token_covariance_by_hand():
    logp, _, mask, _ = cov_case([0.0] * 4)
    adv = torch.tensor([NAN, 3.0, 2.0, -1.0, -2.0])  # mean 0.5, deviations [2.5, 1.5, -1.5, -2.5]
    cov = token_covariance(logp, adv, mask.bool())
    assert cov[0].item() == -math.inf
    torch.testing.assert_close(cov[1:], torch.tensor([2.5, -1.5, -1.5, 2.5]))


def test_clip_cov_detaches_the_high_covariance_tokens():
    logp, old, mask, seqlens = cov_case([0.0] * 4)  # ratio 1: PPO clips nothing
    adv = torch.tensor([NAN, 3.0, 2.0, -1.0, -2.0])  # covariance [2.5, -1.5, -1.5, 2.5]
    norm = Norm(4.0, 1.0)
    # bounds (1, 5): tokens 1 and 4 are candidates; k = int(0.5 * 4) = 2 takes both
    loss, stats = clip_cov_policy_loss(logp, old, adv, mask, seqlens, norm, clip_cov_ratio=0.5, clip_cov_lb=1.0,
                                       clip_cov_ub=5.0)
    assert loss.item() == pytest.approx((0 + -2.0 + 1.0 + 0) / 4)  # PPO's -A r on the others
    assert stats["cov_clipfrac"].item() == pytest.approx(2 / 4) and stats["clipfrac"].item() == 0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.5, 0.25, 0.0]))


def test_clip_cov_draws_k_of_the_candidates_and_skips_ppo_clipped_tokens():
    adv = torch.tensor([NAN, 3.0, 2.0, -1.0, -2.0])
    logp, old, mask, seqlens = cov_case([0.0] * 4)
    norm = Norm(4.0, 1.0)
    picked = set()
    for seed in range(20):  # k = max(1, int(0.25 * 4)) = 1 of the two candidates, at random
        loss, stats = clip_cov_policy_loss(logp, old, adv, mask, seqlens, norm, clip_cov_ratio=0.25,
                                           generator=torch.Generator().manual_seed(seed))
        assert stats["cov_clipfrac"].item() == pytest.approx(1 / 4)
        picked.add(round(loss.item(), 4))
    assert picked == {round((-2.0 + 1.0 + 2.0) / 4, 4), round((-3.0 - 2.0 + 1.0) / 4, 4)}
    # token 1 (A = 3 > 0, ratio 1.5 > 1.2) is already clipped by PPO: only token 4 is left to detach
    logp, old, mask, seqlens = cov_case([0.405465, 0.0, 0.0, 0.0])
    loss, stats = clip_cov_policy_loss(logp, old, adv, mask, seqlens, norm, clip_cov_ratio=0.5)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4) and stats["cov_clipfrac"].item() == pytest.approx(1 / 4)
    assert loss.item() == pytest.approx((-3.0 * 1.2 - 2.0 + 1.0 + 0) / 4, abs=1e-5)


def test_kl_cov_penalises_the_top_covariance_tokens():
    log_ratio = [0.1, 0.2, -0.3, 0.4]
    logp, old, mask, seqlens = cov_case(log_ratio)
    adv = torch.tensor([NAN, 3.0, 2.0, -1.0, -1.0])  # covariance [2.25, -1.25, -1.75, 1.75]
    loss, stats = kl_cov_policy_loss(logp, old, adv, mask, seqlens, Norm(4.0, 1.0), kl_cov_ratio=0.5,
                                     ppo_kl_coef=2.0)
    r = [math.exp(x) for x in log_ratio]
    per_token = [-3 * r[0] + 2 * 0.1, -2 * r[1], r[2], r[3] + 2 * 0.4]  # k = 2: tokens 1 and 4
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-5)
    assert stats["kl_cov_frac"].item() == pytest.approx(2 / 4)
    loss.backward()
    expected = torch.tensor([0.0, -3 * r[0] + 2, -2 * r[1], r[2], r[3] + 2]) / 4
    torch.testing.assert_close(logp.grad, expected)
    # k = max(1, int(0.2 * 4)) = 1: only the largest covariance, token 1
    loss, stats = kl_cov_policy_loss(logp, old, adv, mask, seqlens, Norm(4.0, 1.0), kl_cov_ratio=0.2)
    assert loss.item() == pytest.approx((-3 * r[0] + 0.1 - 2 * r[1] + r[2] + r[3]) / 4, abs=1e-5)


def test_cov_losses_reject_a_non_positive_ratio():
    logp, old, mask, seqlens = cov_case([0.0] * 4)
    adv = torch.zeros(5)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        clip_cov_policy_loss(logp, old, adv, mask, seqlens, Norm(4.0, 1.0), clip_cov_ratio=0.0)
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        kl_cov_policy_loss(logp, old, adv, mask, seqlens, Norm(4.0, 1.0), kl_cov_ratio=0.0)


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo", "clip_cov", "kl_cov"])
def test_garbage_off_the_mask_never_reaches_loss_or_gradient(name):
    logp, old, mask, seqlens = cov_case([0.1, -0.1, 0.2, 0.0])
    adv = torch.tensor([NAN, 1.0, -1.0, 0.5, 2.0])
    loss, stats = get_policy_loss(name)(logp, old, adv, mask, seqlens, Norm(4.0, 1.0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    assert logp.grad[0].item() == 0 and torch.isfinite(logp.grad).all()
