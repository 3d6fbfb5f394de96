"""GRPOVI variance increase: hand examples, feasibility, and the fast pass against the brute-force enumeration."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reflow.algorithms.grpovi import variance_increase, variance_increase_bruteforce, variance_increase_groups

F64 = torch.float64


def t(xs):
    return torch.tensor(xs, dtype=F64)


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=F64)


def wvar(z, p):
    mean = (p * z).sum()
    return float((p * (z - mean) ** 2).sum())


def assert_feasible(z, r, p, low, high):
    """Bounds, weighted mean kept, order of r kept, ties kept (equal rewards -> equal z)."""
    scale = max(1.0, abs(low), abs(high))
    assert z.shape == r.shape
    assert bool((z >= low).all()) and bool((z <= high).all())
    assert abs(float((p * z).sum() - (p * r).sum())) <= 1e-9 * scale
    gt = r[:, None] > r[None, :]
    eq = r[:, None] == r[None, :]
    assert bool((z[:, None] >= z[None, :] - 1e-12 * scale)[gt].all()), "order of r not kept"
    assert bool((z[:, None] == z[None, :])[eq].all()), "tied rewards got different z"
    assert wvar(z, p) >= wvar(r, p) - 1e-12 * scale**2, "variance decreased"


def check_against_bruteforce(r, p, low, high):
    z = variance_increase(r, p, low, high)
    zb = variance_increase_bruteforce(r, p, low, high)
    assert_feasible(z, r, p, low, high)
    assert_feasible(zb, r, p, low, high)
    scale = max(1.0, abs(low), abs(high))
    obj, obj_b = float((p * z**2).sum()), float((p * zb**2).sum())
    assert obj == pytest.approx(obj_b, abs=1e-9 * scale**2)
    assert_same_optimum(z, zb, p, scale)
    return z


def assert_same_optimum(z, zb, p, scale=1.0):
    """The maximiser is unique in exact arithmetic (see the module docstring), so z must match; but a
    sample of negligible weight is barely constrained (a middle block of weight Q carries rounding of
    order eps / Q, and a block lighter than the ~1e-14 threshold slack may sit on either side, as may
    one whose weight is below the rounding of the objective), so compare in the p-weighted norm over
    samples heavier than that, and entry-wise where p >= 1e-4."""
    seen = p > 1e-11
    assert float((p * (z - zb) ** 2)[seen].sum()) ** 0.5 <= 1e-7 * scale
    heavy = p >= 1e-4
    assert torch.allclose(z[heavy], zb[heavy], atol=1e-6 * scale, rtol=0)


# ----------------------------------------------------------------- hand-computed examples
@pytest.mark.parametrize(
    "r, p, expected",
    [
        # already extreme: c = 1/4, a* = 1/4 = A_1, b* = 3/4 = B_1 -> unchanged
        ((1.0, 0.0, 0.0, 0.0), None, (1.0, 0.0, 0.0, 0.0)),
        # c = 1/2: k* = 1 (A_1 = 1/3 <= 1/2 < 2/3), j* = 1, alpha = (1/2 - 1/3) / (1/3) = 1/2
        ((0.8, 0.5, 0.2), None, (1.0, 0.5, 0.0)),
        # c = 0.45: k* = 1, j* = 2 (B_2 = 1/2 <= 0.55), alpha = (0.45 - 0.25) / 0.25 = 0.8
        ((0.9, 0.6, 0.3, 0.0), None, (1.0, 0.8, 0.0, 0.0)),
        # same rewards, p = (.1, .2, .3, .4): c = 0.3 = A_2 and b* = 0.7 = B_2, both tight -> two levels
        ((0.9, 0.6, 0.3, 0.0), (0.1, 0.2, 0.3, 0.4), (1.0, 1.0, 0.0, 0.0)),
        # order of the input does not matter
        ((0.3, 0.9, 0.0, 0.6), None, (0.0, 1.0, 0.0, 0.8)),
        # ties kept: block {0.7, 0.7} has weight 2/3 > a* = 1/2, so it gets alpha = 0.5 / (2/3) = 0.75
        ((0.7, 0.7, 0.1), None, (0.75, 0.75, 0.0)),
        # all equal: no signal, stays put (the letter of "ties in a fixed order" would give (1, 0))
        ((0.5, 0.5), None, (0.5, 0.5)),
        ((0.3,), None, (0.3,)),
    ],
)
def test_hand_examples(r, p, expected):
    r = t(r)
    p = uniform(len(r)) if p is None else t(p)
    z = variance_increase(r, p, 0.0, 1.0)
    torch.testing.assert_close(z, t(expected), atol=1e-12, rtol=0)
    torch.testing.assert_close(variance_increase_bruteforce(r, p, 0.0, 1.0), t(expected), atol=1e-12, rtol=0)
    assert_feasible(z, r, p, 0.0, 1.0)


def test_other_bounds_and_weights_by_hand():
    # [m, M] = [-1, 3], r = (2, 1, 0, -1), p = (.4, .3, .2, .1): c = 0.8 + 0.3 - 0.1 = 1.0,
    # a* = (1 + 1) / 4 = 0.5 -> k* = 1 (A_1 = .4); b* = 0.5 -> j* = 2 (B_2 = .3, B_3 = .6 > .5);
    # alpha = (1 - 3 * .4 + 1 * .3) / .3 = 1/3
    z = variance_increase(t([2.0, 1.0, 0.0, -1.0]), t([0.4, 0.3, 0.2, 0.1]), -1.0, 3.0)
    torch.testing.assert_close(z, t([3.0, 1 / 3, -1.0, -1.0]), atol=1e-12, rtol=0)


def test_n_one_and_rewards_at_bounds():
    for x in (0.0, 0.4, 1.0):
        assert variance_increase(t([x]), t([1.0]), 0.0, 1.0).item() == x
    r = t([1.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(variance_increase(r, uniform(5), 0.0, 1.0), r)
    r = t([1.0, 1.0, 1.0])
    torch.testing.assert_close(variance_increase(r, t([0.2, 0.3, 0.5]), 0.0, 1.0), r)


def test_all_equal_rewards_keep_zero_advantage():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 16):
        r = torch.full((n,), 0.37, dtype=F64)
        p = torch.softmax(torch.randn(n, generator=g, dtype=F64) * 3, 0)
        torch.testing.assert_close(variance_increase(r, p, 0.0, 1.0), r)


def test_peaked_weights():
    # one p_i ~ 1: the mean is pinned near that sample's reward, the rest is pushed to the bounds
    r = t([0.9, 0.6, 0.3, 0.1])
    for scale in (10.0, 30.0, 300.0):
        p = torch.softmax(t([0.0, 1.0, 0.0, 0.0]) * scale, 0)
        z = variance_increase(r, p, 0.0, 1.0)
        assert_feasible(z, r, p, 0.0, 1.0)
        assert z[0].item() == 1.0 and z[3].item() == 0.0
        assert z[1].item() == pytest.approx(0.6, abs=1e-3)
    p = torch.softmax(t([0.0, 1.0, 0.0, 0.0]) * 20, 0)
    check_against_bruteforce(r, p, 0.0, 1.0)


def test_dtype_device_and_float32():
    r = torch.tensor([0.9, 0.6, 0.3, 0.0])
    z = variance_increase(r, torch.full((4,), 0.25), 0.0, 1.0)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.tensor([1.0, 0.8, 0.0, 0.0]))


def test_errors_name_the_bounds():
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        variance_increase(t([1.5, 0.2]), uniform(2), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        variance_increase(t([-1e-9, 0.2]), uniform(2), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        variance_increase_groups(t([1.5, 0.2]), t([0.0, 0.0]), torch.tensor([0, 0]), 0.0, 1.0)
    with pytest.raises(ValueError, match="low <= high"):
        variance_increase(t([0.5]), t([1.0]), 1.0, 0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        variance_increase(t([0.5, 0.2]), t([0.5, 0.6]), 0.0, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        variance_increase(t([0.5, 0.2]), t([1.5, -0.5]), 0.0, 1.0)


def test_degenerate_bounds_low_equals_high():
    r = t([2.0, 2.0])
    torch.testing.assert_close(variance_increase(r, uniform(2), 2.0, 2.0), r)


# ----------------------------------------------------------------- against the brute force (hypothesis)
BOUNDS = [(0.0, 1.0), (-1.0, 1.0), (-3.0, 0.5), (2.0, 7.0)]
DISCRETE = [(0.0, 1.0), (0.0, 0.5, 1.0), (0.0, 0.25, 0.5, 0.75, 1.0), (0.1, 0.4), (0.0, 0.3, 0.3001)]


@st.composite
def groups(draw):
    n = draw(st.integers(1, 12))
    low, high = draw(st.sampled_from(BOUNDS))
    kind = draw(st.sampled_from(["discrete", "continuous", "bounds", "mixed", "equal"]))
    unit = st.floats(0.0, 1.0, allow_nan=False)
    if kind == "discrete":
        u = draw(st.lists(st.sampled_from(draw(st.sampled_from(DISCRETE))), min_size=n, max_size=n))
    elif kind == "continuous":
        u = draw(st.lists(unit, min_size=n, max_size=n))
    elif kind == "bounds":
        u = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    elif kind == "mixed":
        u = draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), unit), min_size=n, max_size=n))
    else:
        u = [draw(unit)] * n
    r = (low + t(u) * (high - low)).clamp(low, high)
    scale = draw(st.sampled_from([0.0, 0.5, 2.0, 8.0, 20.0]))  # 20: one p_i ~ 1, others down to ~1e-9
    logits = t(draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=n, max_size=n)))
    p = torch.softmax(logits * scale, 0)
    return r, p, low, high


@settings(max_examples=500, deadline=None)
@given(groups())
def test_fast_matches_bruteforce(case):
    check_against_bruteforce(*case)


@settings(max_examples=100, deadline=None)
@given(groups(), st.randoms(use_true_random=False))
def test_permutation_equivariant(case, rnd):
    r, p, low, high = case
    perm = list(range(len(r)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    z = variance_increase(r, p, low, high)
    zp = variance_increase(r[perm], p[perm], low, high)
    assert_same_optimum(zp, z[perm], p[perm], max(1.0, abs(low), abs(high)))
    if bool((p >= 1e-6).all()):
        torch.testing.assert_close(zp, z[perm], atol=1e-9, rtol=0)


def test_many_random_groups_against_bruteforce():
    """1500 seeded groups through the batched wrapper, each checked against the brute force."""
    g = torch.Generator().manual_seed(1)
    n_groups, low, high = 1500, 0.0, 1.0
    sizes = torch.randint(1, 13, (n_groups,), generator=g)
    gid = torch.repeat_interleave(torch.arange(n_groups), sizes)
    B = len(gid)
    levels = torch.randint(1, 6, (n_groups,), generator=g)[gid]  # few levels -> many ties
    discrete = torch.randint(0, 1000, (B,), generator=g) % (levels + 1) / levels
    cont = torch.rand(B, generator=g, dtype=F64)
    r = torch.where(torch.rand(B, generator=g) < 0.5, discrete.to(F64), cont)
    logit_scale = torch.tensor([0.0, 1.0, 5.0, 15.0])[torch.randint(0, 4, (n_groups,), generator=g)]  # 15: peaked
    lw = torch.randn(B, generator=g, dtype=F64) * logit_scale[gid]
    perm = torch.randperm(B, generator=g)  # interleave the groups
    r, lw, gid = r[perm], lw[perm], gid[perm]
    z = variance_increase_groups(r, lw, gid, low, high)
    for k in range(n_groups):
        idx = (gid == k).nonzero(as_tuple=True)[0]
        p = torch.softmax(lw[idx], 0)
        zb = variance_increase_bruteforce(r[idx], p, low, high)
        assert_feasible(z[idx], r[idx], p, low, high)
        assert float((p * z[idx] ** 2).sum()) == pytest.approx(float((p * zb**2).sum()), abs=1e-9)
        assert_same_optimum(z[idx], zb, p)


# ----------------------------------------------------------------- group wrapper
def test_groups_interleaved_equal_per_group_calls():
    r = t([0.9, 0.1, 0.6, 0.5, 0.3, 0.5, 0.0, 0.2])
    lw = t([-3.0, -7.0, -4.0, -2.0, -5.0, -6.0, -1.0, -2.5])  # ref sequence log-probs
    gid = torch.tensor([4, 9, 4, 9, 4, 9, 4, 9])
    z = variance_increase_groups(r, lw, gid, 0.0, 1.0)
    for label in (4, 9):
        idx = (gid == label).nonzero(as_tuple=True)[0]
        ref = variance_increase(r[idx], torch.softmax(lw[idx], 0), 0.0, 1.0)
        torch.testing.assert_close(z[idx], ref, atol=1e-12, rtol=0)
    # softmax weights: shifting one group's log-probs by a constant changes nothing
    lw2 = torch.where(gid == 9, lw - 100.0, lw)
    torch.testing.assert_close(variance_increase_groups(r, lw2, gid, 0.0, 1.0), z, atol=1e-12, rtol=0)
    # and the weights really are the softmax: uniform log-weights = uniform p
    zu = variance_increase_groups(r, torch.zeros(8, dtype=F64), gid, 0.0, 1.0)
    torch.testing.assert_close(zu[gid == 4], variance_increase(r[gid == 4], uniform(4), 0.0, 1.0))


def test_groups_of_mixed_sizes_and_dtype():
    g = torch.Generator().manual_seed(3)
    sizes = [1, 2, 3, 7, 9, 16, 33, 4]
    gid = torch.repeat_interleave(torch.arange(len(sizes)) * 10 + 5, torch.tensor(sizes))
    perm = torch.randperm(len(gid), generator=g)
    gid = gid[perm]
    r = (torch.randint(0, 4, (len(gid),), generator=g) / 3).float()
    lw = torch.randn(len(gid), generator=g) * 2
    z = variance_increase_groups(r, lw, gid, 0.0, 1.0)
    assert z.dtype == torch.float32
    for label in gid.unique():
        idx = gid == label
        ref = variance_increase(r[idx].double(), torch.softmax(lw[idx].double(), 0), 0.0, 1.0)
        torch.testing.assert_close(z[idx], ref.float())


def test_groups_underflowing_weights():
    # sequence log-probs hundreds of nats apart: float64 softmax underflows to exactly 0 for some samples
    r = t([0.9, 0.6, 0.3, 0.2, 0.0, 0.6])
    lw = t([-10.0, -900.0, -2000.0, -12.0, -11.0, -float("inf")])
    gid = torch.zeros(6, dtype=torch.long)
    z = variance_increase_groups(r, lw, gid, 0.0, 1.0)
    p = torch.softmax(lw, 0)
    assert (p == 0).sum() >= 3
    assert bool(torch.isfinite(z).all())
    assert_feasible(z, r, p, 0.0, 1.0)
    zb = variance_increase_bruteforce(r, p, 0.0, 1.0)
    assert float((p * z**2).sum()) == pytest.approx(float((p * zb**2).sum()), abs=1e-12)
    with pytest.raises(ValueError, match="-inf"):
        variance_increase_groups(t([0.5, 0.5]), t([-float("inf")] * 2), torch.tensor([0, 0]), 0.0, 1.0)


def test_grpovi_estimator_is_grpo_on_the_variance_increased_rewards():
    from reflow.algorithms.advantages import grpo as grpo_est
    from reflow.algorithms.registry import get_advantage

    rewards = torch.tensor([0.8, 0.5, 0.2, 1.0, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    ref_seq = torch.zeros(6)  # uniform weights in each group
    seqlens = torch.tensor([3, 2, 4, 2, 2, 3])
    mask = torch.cat([torch.tensor([0] + [1] * (n - 1)) for n in seqlens.tolist()])
    adv, _ = get_advantage("grpovi")(rewards=rewards, group_ids=group_ids, seqlens=seqlens, action_mask=mask,
                                     ref_seq_logprobs=ref_seq, reward_low=0.0, reward_high=1.0)
    # hand: group 0 (0.8, 0.5, 0.2) -> z = (1, 0.5, 0); group 1 is already at the bounds
    z = torch.tensor([1.0, 0.5, 0.0, 1.0, 1.0, 0.0])
    expected, _ = grpo_est(rewards=z, group_ids=group_ids, seqlens=seqlens, action_mask=mask)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert (adv[mask == 0] == 0).all()
