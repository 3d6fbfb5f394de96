"""Rollout correction (TIS, MIS; token, sequence, geometric) against hand computations."""

import math

import pytest
import torch

from reflow.algorithms.rollout_correction import rollout_correction

NAN = float("nan")


def case(ratios=(1.5, 1.2, 0.6, 2.5)):
    """Two samples of 1 prompt + 2 action tokens; train / gen ratios per action token; garbage on the prompts.

    Sequence ratios: 1.5 * 1.2 = 1.8 and 0.6 * 2.5 = 1.5.
    """
    gen = torch.tensor([NAN, -1.0, -2.0, NAN, -0.5, -1.5])
    train = gen.clone()
    train[[1, 2, 4, 5]] += torch.tensor(ratios).log()
    return train, gen, torch.tensor([0, 1, 1, 0, 1, 1]), torch.tensor([3, 3])


def check(out, weights, keep):
    w, k, _ = out
    torch.testing.assert_close(w, torch.tensor(weights), atol=1e-5, rtol=0)
    assert k.tolist() == keep


def test_token_tis_truncates_each_token_ratio():
    out = rollout_correction(*case(), mode="tis", level="token", threshold=2.0)
    check(out, [0, 1.5, 1.2, 0, 0.6, 2.0], [False, True, True, False, True, True])
    assert out[2]["truncated_frac"].item() == pytest.approx(1 / 4)
    assert not out[0].requires_grad


def test_sequence_tis_uses_the_product_of_the_token_ratios():
    check(rollout_correction(*case(), mode="tis", level="sequence", threshold=2.0),
          [0, 1.8, 1.8, 0, 1.5, 1.5], [False, True, True, False, True, True])
    check(rollout_correction(*case(), mode="tis", level="sequence", threshold=1.6),
          [0, 1.6, 1.6, 0, 1.5, 1.5], [False, True, True, False, True, True])


def test_token_mis_drops_tokens_outside_the_bounds():
    # bounds [1 / 2, 2] (lower defaults to 1 / upper): 2.5 is out
    out = rollout_correction(*case(), mode="mis", level="token", upper=2.0)
    check(out, [0, 1.5, 1.2, 0, 0.6, 0], [False, True, True, False, True, False])
    assert out[2]["kept_frac"].item() == pytest.approx(3 / 4)
    assert out[2]["weight_mean"].item() == pytest.approx((1.5 + 1.2 + 0.6) / 3, abs=1e-6)
    # an explicit lower bound of 0.7 drops the 0.6 token too
    check(rollout_correction(*case(), mode="mis", level="token", lower=0.7, upper=2.0),
          [0, 1.5, 1.2, 0, 0, 0], [False, True, True, False, False, False])


def test_sequence_mis_drops_whole_sequences():
    # sequence ratios 1.8 and 1.5 against [1 / 1.6, 1.6]: the first sequence goes, whole
    check(rollout_correction(*case(), mode="mis", level="sequence", upper=1.6),
          [0, 0, 0, 0, 1.5, 1.5], [False, False, False, False, True, True])


def test_geometric_mis_filters_on_the_per_token_drift_with_unit_weights():
    # geometric means sqrt(1.8) = 1.342 and sqrt(1.5) = 1.225 against [1 / 1.3, 1.3]
    check(rollout_correction(*case(), mode="mis", level="geometric", upper=1.3),
          [0, 0, 0, 0, 1.0, 1.0], [False, False, False, False, True, True])


def test_geometric_mean_is_length_free_where_the_product_is_not():
    """1000 tokens drifting 1% each: the product is e^10 (out of any sequence bound); the geometric mean is 1.01."""
    T = 1000
    gen = torch.full((T,), -1.0)
    train = gen + math.log(1.01)
    mask, seqlens = torch.ones(T), torch.tensor([T])
    assert not rollout_correction(train, gen, mask, seqlens, mode="mis", level="sequence", upper=2.0)[1].any()
    assert rollout_correction(train, gen, mask, seqlens, mode="mis", level="geometric", upper=1.02)[1].all()


def test_huge_log_ratios_stay_finite():
    train, gen, mask, seqlens = case()
    train[1] = 1e4  # a broken generator log-prob
    for level in ("token", "sequence"):
        w, _, stats = rollout_correction(train, gen, mask, seqlens, mode="tis", level=level, threshold=2.0)
        assert torch.isfinite(w).all() and w[1].item() == 2.0
        w, keep, _ = rollout_correction(train, gen, mask, seqlens, mode="mis", level=level, upper=2.0)
        assert torch.isfinite(w).all() and not keep[1]


def test_mismatch_kl_is_the_mean_negative_log_ratio():
    _, _, stats = rollout_correction(*case(), mode="tis")
    expected = -sum(math.log(x) for x in (1.5, 1.2, 0.6, 2.5)) / 4
    assert stats["mismatch_kl"].item() == pytest.approx(expected, abs=1e-6)


def test_bad_arguments_say_what_to_do():
    args = case()
    with pytest.raises(ValueError, match="unknown rollout correction 'is'"):
        rollout_correction(*args, mode="is")
    with pytest.raises(ValueError, match="unknown rollout correction level 'batch'"):
        rollout_correction(*args, mode="tis", level="batch")
    with pytest.raises(ValueError, match="not an importance weight"):
        rollout_correction(*args, mode="tis", level="geometric")
    with pytest.raises(ValueError, match="lower < upper"):
        rollout_correction(*args, mode="mis", lower=2.0, upper=1.5)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        rollout_correction(*args, mode="tis", threshold=0.0)
