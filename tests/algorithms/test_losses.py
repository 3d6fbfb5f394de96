"""Policy, value, KL and reward-model losses against hand computations."""

import math

import pytest
import torch

from reflow.algorithms.aggregation import AGG_MODES, Norm
from reflow.algorithms.losses import (
    AdaptiveKLController,
    completion_logprobs,
    dpo_loss,
    entropy_bonus,
    kl_loss,
    kl_penalty,
    pairwise_reward_loss,
    ppo_policy_loss,
    ptx_loss,
    sequence_nll,
    sft_loss,
    value_loss,
)

NAN, INF = float("nan"), float("inf")
ONE = torch.tensor([6])  # ppo_case as a single packed sample
N5 = Norm(tokens=5.0, samples=1.0)


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


def test_k3_clamps_the_log_ratio_to_20():
    logp = torch.tensor([0.0, 0.0, -1e4, -INF], requires_grad=True)
    ref = torch.tensor([1e4, -1e4, 0.0, 0.0])
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    big, small = math.exp(20) - 1 - 20, math.exp(-20) - 1 + 20  # log r = ref - logp at +20 and -20
    torch.testing.assert_close(k3, torch.tensor([big, small, big, big]))
    k3.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(4))  # beyond the bound: no gradient, and no NaN


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
    loss, stats = ppo_policy_loss(logp, old, adv, mask, ONE, N5, clip_low=0.2, clip_high=0.2)
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
    loss, stats = ppo_policy_loss(logp, old, adv, mask, ONE, N5, clip_low=0.1, clip_high=0.6)
    per_token = [-2.0, -1.5, 1.5, -0.6, 1.8]
    assert loss.item() == pytest.approx(sum(per_token) / 5.0, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 5)


def test_ppo_gradient_is_zero_on_clipped_tokens():
    logp, old, adv, mask, _ = ppo_case()
    logp = logp.clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, ONE, N5)
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
    norm = Norm(tokens=denom, samples=3.0)
    seqlens, lens = torch.tensor([5, 4, 3]), ([5], [4, 3])  # two micro-batches: sample 0 | samples 1, 2
    a, b = slice(0, 5), slice(5, n)

    whole, whole_stats = ppo_policy_loss(logp, old, adv, mask, seqlens, norm)
    halves = [ppo_policy_loss(logp[s], old[s], adv[s], mask[s], torch.tensor(ls), norm) for s, ls in zip((a, b), lens)]
    assert (halves[0][0] + halves[1][0]).item() == pytest.approx(whole.item(), abs=1e-6)
    assert (halves[0][1]["clipfrac"] + halves[1][1]["clipfrac"]).item() == pytest.approx(whole_stats["clipfrac"].item())

    v_whole, _ = value_loss(values, old_values, returns, mask, seqlens, norm)
    v_halves = [value_loss(values[s], old_values[s], returns[s], mask[s], torch.tensor(ls), norm)[0]
                for s, ls in zip((a, b), lens)]
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
    loss, stats = value_loss(values, old, returns, mask, torch.tensor([4]), Norm(4.0, 1.0), clip=0.2)
    # token 0: V moved 1.0 toward R=2, clipped V = 0.2: errors 1 vs 3.24 -> 3.24 (clipping stops the gain)
    # token 1: V moved away from R=0: errors 1 vs 0.04 -> 1 (the unclipped, larger error)
    # tokens 2, 3: within the clip range, both errors equal 0
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 4.0, abs=1e-6)
    assert stats["value_error"].item() == pytest.approx((1.0 + 1.0) / 4.0, abs=1e-6)
    assert stats["value_clipfrac"].item() == pytest.approx(1 / 4)  # token 0
    unclipped, _ = value_loss(values, old, returns, mask, torch.tensor([4]), Norm(4.0, 1.0), clip=None)
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


# ----------------------------------------------------------------- PPO: aggregation, dual clip, masking
PPO_PER_TOKEN = [-2.0, -1.2, 1.5, -0.6, 1.6]  # test_ppo_policy_loss_by_hand, clip 0.2


def test_ppo_aggregation_modes_by_hand():
    logp, old, adv, mask, _ = ppo_case()
    seqlens = torch.tensor([3, 3])  # tokens 0-2 | tokens 3-5 (5 masked)
    norm = Norm(tokens=5.0, samples=2.0, max_tokens=4.0)
    s0, s1 = sum(PPO_PER_TOKEN[:3]), sum(PPO_PER_TOKEN[3:])
    hand = {
        "token-mean": (s0 + s1) / 5,
        "seq-mean-token-mean": (s0 / 3 + s1 / 2) / 2,
        "seq-mean-token-sum": (s0 + s1) / 2,
        "seq-mean-token-sum-norm": (s0 + s1) / (2 * 4),
    }
    for mode in AGG_MODES:
        loss, stats = ppo_policy_loss(logp, old, adv, mask, seqlens, norm, agg=mode)
        assert loss.item() == pytest.approx(hand[mode], abs=1e-6), mode
        assert stats["clipfrac"].item() == pytest.approx(2 / 5)  # stats stay token means whatever the mode


def dual_case():
    """Six tokens, the last masked (with a huge ratio and negative advantage)."""
    ratio = torch.tensor([5.0, 2.0, 5.0, 0.5, 4.0, 100.0])
    adv = torch.tensor([-1.0, -1.0, 1.0, -2.0, -0.5, -5.0])
    old = torch.tensor([-2.0, -1.0, -3.0, -0.5, -2.5, -6.0])
    return old + ratio.log(), old, adv, torch.tensor([1, 1, 1, 1, 1, 0])


def test_dual_clip_caps_negative_advantage_losses_by_hand():
    logp, old, adv, mask = dual_case()
    logp = logp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, torch.tensor([6]), N5, dual_clip=3.0)
    per_token = [
        3.0,    # ratio 5, A -1: PPO max(5, 1.2) = 5, capped at 3 * |A| = 3
        2.0,    # ratio 2, A -1: max(2, 1.2) = 2 < 3, untouched
        -1.2,   # ratio 5, A +1: clipped to 1.2; dual clip only acts on A < 0
        1.6,    # ratio 0.5, A -2: max(1, 1.6) = 1.6 < 6
        1.5,    # ratio 4, A -0.5: max(2, 0.6) = 2, capped at 1.5
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    assert stats["clipfrac_lower"].item() == pytest.approx(2 / 5)  # tokens 0 and 4
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)  # tokens 2 and 3
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[4] == 0 and logp.grad[2] == 0 and logp.grad[5] == 0
    assert logp.grad[1].item() == pytest.approx(2.0 / 5)  # -A * ratio / 5
    plain, plain_stats = ppo_policy_loss(logp.detach(), old, adv, mask, torch.tensor([6]), N5)
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2 + 1.6 + 2.0) / 5, abs=1e-6)
    assert plain_stats["clipfrac_lower"].item() == 0.0


@pytest.mark.parametrize("bad", [1.0, 0.5])
def test_dual_clip_must_exceed_one(bad):
    logp, old, adv, mask = dual_case()
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(logp, old, adv, mask, torch.tensor([6]), N5, dual_clip=bad)


def packed_rl_case(seed=0):
    """Five samples with different prompt / response lengths; garbage (NaN, inf) on every prompt token."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [3, 1, 4, 2, 5], [4, 6, 2, 0, 3]
    seqlens = torch.tensor([p + r for p, r in zip(prompts, responses)])
    mask = torch.cat([torch.cat([torch.zeros(p), torch.ones(r)]) for p, r in zip(prompts, responses)]).bool()
    T = int(seqlens.sum())
    t = {k: torch.randn(T, generator=g) * 0.4 for k in ("logp", "old", "adv", "values", "old_values", "returns",
                                                        "entropy", "ref")}
    t["logp"], t["old"], t["ref"] = t["logp"] - 1, t["old"] - 1, t["ref"] - 1
    clean = {k: v.clone() for k, v in t.items()}
    for k, v in t.items():
        v[~mask] = torch.tensor([NAN, INF, -INF])[torch.arange(int((~mask).sum())) % 3]
    norm = Norm(tokens=float(mask.sum()), samples=5.0, max_tokens=8.0)
    return t, clean, mask, seqlens, norm


def all_losses(t, mask, seqlens, norm, mode):
    pg, st = ppo_policy_loss(t["logp"], t["old"], t["adv"], mask, seqlens, norm, clip_low=0.1, clip_high=0.3,
                             dual_clip=2.0, agg=mode)
    vl, vst = value_loss(t["values"], t["old_values"], t["returns"], mask, seqlens, norm, clip=0.1, agg=mode)
    return {"pg": pg, **st, "v": vl, **vst,
            "ent": entropy_bonus(t["entropy"], mask, seqlens, norm, mode),
            "kl": kl_loss(t["logp"], t["ref"], mask, seqlens, norm, "k3", mode),
            "ptx": ptx_loss(t["logp"], mask, seqlens, norm, mode)}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_prompt_garbage_never_reaches_losses_or_gradients(mode):
    t, clean, mask, seqlens, norm = packed_rl_case()
    t["logp"].requires_grad_(True)
    t["values"].requires_grad_(True)
    dirty = all_losses(t, mask, seqlens, norm, mode)
    ref = all_losses(clean, mask, seqlens, norm, mode)
    for k in ref:
        assert math.isfinite(dirty[k].item()), k
        assert dirty[k].item() == pytest.approx(ref[k].item(), abs=1e-6), k
    (dirty["pg"] + dirty["v"] + dirty["kl"] + dirty["ptx"]).backward()
    for x in (t["logp"], t["values"]):
        assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_every_loss_and_stat_is_micro_batch_exact(mode):
    t, _, mask, seqlens, norm = packed_rl_case(1)
    whole = all_losses(t, mask, seqlens, norm, mode)
    offs = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0))
    parts = []
    for i, j in ((0, 2), (2, 3), (3, 5)):  # cut at sample boundaries
        sl = slice(int(offs[i]), int(offs[j]))
        parts.append(all_losses({k: v[sl] for k, v in t.items()}, mask[sl], seqlens[i:j], norm, mode))
    for k in whole:
        assert sum(p[k].item() for p in parts) == pytest.approx(whole[k].item(), abs=1e-5), k


def test_entropy_kl_and_ptx_by_hand():
    seqlens = torch.tensor([3, 2])
    mask = torch.tensor([0, 1, 1, 0, 1])
    norm = Norm(tokens=3.0, samples=2.0)
    ent = torch.tensor([9.0, 1.0, 2.0, 9.0, 4.0])
    assert entropy_bonus(ent, mask, seqlens, norm).item() == pytest.approx(7 / 3)
    assert entropy_bonus(ent, mask, seqlens, norm, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    logp = torch.tensor([0.0, -1.0, -2.0, 0.0, -0.5])
    ref = torch.tensor([5.0, -1.5, -1.0, 5.0, -0.5])
    k1 = [0.5, -1.0, 0.0]  # logp - ref on the actions
    assert kl_loss(logp, ref, mask, seqlens, norm, "k1").item() == pytest.approx(sum(k1) / 3)
    k3 = sum(math.exp(-x) - 1 + x for x in k1)
    assert kl_loss(logp, ref, mask, seqlens, norm).item() == pytest.approx(k3 / 3, abs=1e-6)
    assert ptx_loss(logp, mask, seqlens, norm).item() == pytest.approx(3.5 / 3)
    assert sft_loss is sequence_nll
    assert sft_loss(logp, mask, 3.0).item() == pytest.approx(3.5 / 3)


# ----------------------------------------------------------------- reward model margin
def test_pairwise_reward_loss_with_a_margin():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])
    margin = torch.tensor([1.0, 0.0, 0.5])
    loss, stats = pairwise_reward_loss(chosen, rejected, denom=3.0, margin=margin)
    targets = [0.0, -0.5, -0.5]  # s_c - s_r - margin
    expected = sum(math.log1p(math.exp(-m)) for m in targets) / 3.0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1.5 / 3)  # accuracy ignores the target margin
    assert stats["margin"].item() == pytest.approx(0.5 / 3)
    no_margin, _ = pairwise_reward_loss(chosen, rejected, 3.0, margin=torch.zeros(3))
    assert no_margin.item() == pytest.approx(pairwise_reward_loss(chosen, rejected, 3.0)[0].item())


# ----------------------------------------------------------------- DPO / cDPO / IPO
def dpo_case():
    pi_c, pi_r = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    ref_c, ref_r = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.5])
    return pi_c, pi_r, ref_c, ref_r  # chosen log-ratios [0.5, 0], rejected [-0.5, 0.5]: h = [1, -0.5]


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


def test_dpo_sigmoid_by_hand():
    loss, stats = dpo_loss(*dpo_case(), denom=2.0, beta=0.5)
    assert loss.item() == pytest.approx((neg_log_sigmoid(0.5) + neg_log_sigmoid(-0.25)) / 2, abs=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx((0.25 + 0.0) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx((-0.25 + 0.25) / 2)
    assert stats["accuracy"].item() == pytest.approx(0.5)
    assert stats["margin"].item() == pytest.approx((0.5 - 0.25) / 2)


def test_conservative_dpo_by_hand():
    eps = 0.1
    loss, _ = dpo_loss(*dpo_case(), denom=2.0, beta=0.5, label_smoothing=eps)
    expected = sum((1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z) for z in (0.5, -0.25)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_by_hand():
    loss, stats = dpo_loss(*dpo_case(), denom=2.0, beta=0.5, kind="ipo")
    assert loss.item() == pytest.approx(((1 - 1) ** 2 + (-0.5 - 1) ** 2) / 2)  # (h - 1/(2 beta))^2 = (h - 1)^2
    assert stats["accuracy"].item() == pytest.approx(0.5)


def test_dpo_tie_counts_half_and_gradient_by_hand():
    pi = torch.tensor([-1.0], requires_grad=True)
    loss, stats = dpo_loss(pi, torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), denom=1.0, beta=0.2)
    assert stats["accuracy"].item() == 0.5
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert pi.grad.item() == pytest.approx(-0.2 * 0.5)  # -beta * sigma(-beta h) at h = 0


def test_dpo_halves_sum_to_the_whole():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, generator=g) - 2 for _ in range(4)]
    for kind, eps in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        whole, ws = dpo_loss(*xs, 6.0, beta=0.3, kind=kind, label_smoothing=eps)
        parts = [dpo_loss(*(x[s] for x in xs), 6.0, beta=0.3, kind=kind, label_smoothing=eps)
                 for s in (slice(0, 2), slice(2, 6))]
        assert sum(p[0].item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)
        for k in ws:
            assert sum(p[1][k].item() for p in parts) == pytest.approx(ws[k].item(), abs=1e-6)


def test_dpo_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss(*dpo_case(), 2.0, kind="kto")
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(*dpo_case(), 2.0, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*dpo_case(), 2.0, label_smoothing=0.5)


# ----------------------------------------------------------------- rollout weights, completion log-probs
def test_ppo_rollout_weights_multiply_each_token_loss():
    logp, old, adv, mask, _ = ppo_case()
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, NAN])  # the masked-out last entry is garbage
    loss, _ = ppo_policy_loss(logp, old, adv, mask, ONE, N5, clip_low=0.2, clip_high=0.2, rollout_weights=w)
    per_token = [-2.0, -1.2, 1.5, -0.6, 1.6]
    assert loss.item() == pytest.approx(sum(x * float(k) for x, k in zip(per_token, w[:5])) / 5.0, abs=1e-6)
    plain, _ = ppo_policy_loss(logp, old, adv, mask, ONE, N5)
    same, _ = ppo_policy_loss(logp, old, adv, mask, ONE, N5, rollout_weights=torch.ones(6))
    assert plain.item() == pytest.approx(same.item())


def test_completion_logprobs_sum_or_average_over_the_action_tokens():
    logp = torch.tensor([NAN, -1.0, -2.0, NAN, NAN, -3.0, INF])
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0])
    seqlens = torch.tensor([3, 1, 3])  # the middle sample has no action token
    assert completion_logprobs(logp, mask, seqlens).tolist() == [-3.0, 0.0, -3.0]
    assert completion_logprobs(logp, mask, seqlens, average=True).tolist() == [-1.5, 0.0, -3.0]


def test_ipo_on_length_averaged_logprobs_as_trl():
    """TRL's IPO: h from per-token averages of policy and reference log-probs; loss (h - 1 / (2 beta))^2."""
    seqlens = torch.tensor([3, 5])  # chosen: 2 action tokens, rejected: 4
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1])
    pol = torch.tensor([0.0, -1.0, -3.0, 0.0, -2.0, -2.0, -4.0, -4.0])
    ref = torch.tensor([0.0, -2.0, -2.0, 0.0, -1.0, -3.0, -3.0, -1.0])
    p = completion_logprobs(pol, mask, seqlens, average=True)  # [-2, -3]
    r = completion_logprobs(ref, mask, seqlens, average=True)  # [-2, -2]
    loss, _ = dpo_loss(p[0:1], p[1:2], r[0:1], r[1:2], 1.0, beta=0.5, kind="ipo")
    h = (-2.0 - -2.0) - (-3.0 - -2.0)  # 1
    assert loss.item() == pytest.approx((h - 1 / (2 * 0.5)) ** 2)  # 0: the target margin is met per token
    p_sum, r_sum = completion_logprobs(pol, mask, seqlens), completion_logprobs(ref, mask, seqlens)
    loss_sum, _ = dpo_loss(p_sum[0:1], p_sum[1:2], r_sum[0:1], r_sum[1:2], 1.0, beta=0.5, kind="ipo")
    assert loss_sum.item() == pytest.approx(((0.0 - (-12.0 + 8.0)) - 1.0) ** 2)  # sums: h = 4, loss 9
