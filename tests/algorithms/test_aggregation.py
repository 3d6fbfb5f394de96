"""Loss aggregation modes against hand computations; micro-batch exactness; masking of packed samples."""

import math

import pytest
import torch

from reflow.algorithms.aggregation import AGG_MODES, Norm, aggregate, per_sample_sum, sample_index

NAN, INF = float("nan"), float("inf")


def case():
    """Four packed samples (prompt, response) = (2, 3), (1, 1), (3, 0), (1, 2); garbage on prompt tokens.

    Action values: sample 0 [1, 2, 3], sample 1 [4], sample 2 none, sample 3 [5, 7].
    """
    seqlens = torch.tensor([5, 2, 3, 3])
    x = torch.tensor([NAN, INF, 1.0, 2.0, 3.0, -INF, 4.0, 1e9, NAN, -3.0, 1e6, 5.0, 7.0])
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1])
    norm = Norm(tokens=6.0, samples=4.0, max_tokens=8.0)
    return x, mask, seqlens, norm


HAND = {
    "token-mean": 22 / 6,                            # (1 + 2 + 3 + 4 + 5 + 7) / 6 tokens
    "seq-mean-token-mean": (6 / 3 + 4 / 1 + 0 + 12 / 2) / 4,  # = 3; the empty sample counts 0
    "seq-mean-token-sum": (6 + 4 + 0 + 12) / 4,      # = 5.5
    "seq-mean-token-sum-norm": 22 / (4 * 8),         # Dr.GRPO: / (samples * max_tokens)
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_by_hand_ignores_prompt_garbage(mode):
    x, mask, seqlens, norm = case()
    out = aggregate(x, mask, seqlens, norm, mode)
    assert math.isfinite(out.item())
    assert out.item() == pytest.approx(HAND[mode], abs=1e-6)


def test_hand_values_cover_every_mode():
    assert set(HAND) == set(AGG_MODES)
    assert HAND["seq-mean-token-mean"] == 3.0 and HAND["seq-mean-token-sum"] == 5.5


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_micro_batches_with_the_mini_batch_norm_sum_to_the_whole(mode, cut):
    x, mask, seqlens, norm = case()
    whole = aggregate(x, mask, seqlens, norm, mode)
    t = int(seqlens[:cut].sum())
    a = aggregate(x[:t], mask[:t], seqlens[:cut], norm, mode)
    b = aggregate(x[t:], mask[t:], seqlens[cut:], norm, mode)
    assert (a + b).item() == pytest.approx(whole.item(), abs=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_exactness_on_random_batches(mode):
    g = torch.Generator().manual_seed(0)
    prompts, responses = [3, 1, 4, 2, 5, 1, 2], [4, 6, 0, 3, 2, 7, 1]
    seqlens = torch.tensor([p + r for p, r in zip(prompts, responses)])
    mask = torch.cat([torch.cat([torch.zeros(p), torch.ones(r)]) for p, r in zip(prompts, responses)]).long()
    x = torch.randn(int(seqlens.sum()), generator=g)
    norm = Norm(tokens=float(mask.sum()), samples=7.0, max_tokens=10.0)
    whole = aggregate(x, mask, seqlens, norm, mode)
    cuts = [0, 2, 3, 6, 7]  # micro-batches of 2, 1, 3, 1 samples
    offs = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0))
    parts = [aggregate(x[offs[i]:offs[j]], mask[offs[i]:offs[j]], seqlens[i:j], norm, mode)
             for i, j in zip(cuts[:-1], cuts[1:])]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)


def test_seq_mean_token_mean_weighs_samples_not_tokens():
    # one long sample of 1s, one short sample of 0s: token-mean leans to the long one, seq-mean does not
    seqlens = torch.tensor([4, 1])
    x = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    mask = torch.ones(5)
    norm = Norm(tokens=5, samples=2)
    assert aggregate(x, mask, seqlens, norm, "token-mean").item() == pytest.approx(0.8)
    assert aggregate(x, mask, seqlens, norm, "seq-mean-token-mean").item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gradient_reaches_action_tokens_only(mode):
    x, mask, seqlens, norm = case()
    x = x.clone().requires_grad_(True)
    aggregate(x, mask, seqlens, norm, mode).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[mask == 0] == 0).all()
    if mode == "seq-mean-token-mean":  # d/dx = 1 / (n_i * samples)
        expected = [0, 0, 1 / 12, 1 / 12, 1 / 12, 0, 1 / 4, 0, 0, 0, 0, 1 / 8, 1 / 8]
        torch.testing.assert_close(x.grad, torch.tensor(expected))


def test_unknown_mode_lists_the_modes():
    x, mask, seqlens, norm = case()
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"):
        aggregate(x, mask, seqlens, norm, "sum")


def test_seqlens_must_cover_the_tokens():
    x, mask, _, norm = case()
    with pytest.raises(ValueError, match="seqlens sum to 12"):
        aggregate(x, mask, torch.tensor([5, 2, 3, 2]), norm, "seq-mean-token-mean")


def test_sample_helpers():
    assert sample_index(torch.tensor([2, 0, 3]), 5).tolist() == [0, 0, 2, 2, 2]
    assert per_sample_sum(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([2, 0, 3])).tolist() == [3.0, 0.0, 12.0]


def test_norm_defaults_and_engine_reexport():
    from reflow.engines.train import Norm as EngineNorm

    assert EngineNorm is Norm
    n = Norm(tokens=3.0, samples=2.0)
    assert n.max_tokens == 1.0 and n == Norm(3.0, 2.0, 1.0)
