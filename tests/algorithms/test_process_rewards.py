"""Process-reward refinement (Clip / Delta, Gao et al. 2024) and placement on packed batches, by hand."""

import pytest
import torch

from reflow.algorithms.advantages import return_to_go
from reflow.algorithms.process_rewards import (
    clip_refine,
    delta_refine,
    place_step_rewards,
    split_steps,
    step_end_tokens,
)


# ----------------------------------------------------------------- steps in text
def test_split_steps_by_hand():
    text = "Step 1: 2+2=4\n\n  Step 2: 4*3=12 \n   \nAnswer: 12\n"
    spans = split_steps(text)
    assert spans == [(0, 13), (17, 31), (37, 47)]
    assert [text[a:b] for a, b in spans] == ["Step 1: 2+2=4", "Step 2: 4*3=12", "Answer: 12"]


def test_split_steps_other_separator_and_edge_cases():
    text = "a. b.||c||  ||"
    assert [text[a:b] for a, b in split_steps(text, sep="||")] == ["a. b.", "c"]
    assert split_steps("") == [] and split_steps("\n \n") == []
    assert split_steps("one step") == [(0, 8)]
    with pytest.raises(ValueError):
        split_steps("x", sep="")


def test_step_end_tokens_by_hand():
    text = "ab.\ncd.\nef"
    #          "ab"    ".\n"   "cd"    "."     "\n"    "ef"     special
    offsets = [(0, 2), (2, 4), (4, 6), (6, 7), (7, 8), (8, 10), (0, 0)]
    spans = split_steps(text)
    assert spans == [(0, 3), (4, 7), (8, 10)]
    # ".\n" straddles the first boundary and closes step 0; step 1 ends on "." (the "\n" is between steps)
    assert step_end_tokens(offsets, spans) == [1, 3, 5]


def test_step_end_tokens_with_split_characters_and_truncation():
    # a multi-byte character split over two tokens that share its offsets: the later one closes the step
    offsets = [(0, 2), (2, 3), (2, 3), (3, 4), (4, 6)]
    assert step_end_tokens(offsets, [(0, 3), (4, 6)]) == [2, 4]
    with pytest.raises(ValueError, match=r"no token overlaps the step at characters \[7, 9\)"):
        step_end_tokens(offsets, [(0, 3), (7, 9)])  # text beyond the tokens (a cut-off response)


# ----------------------------------------------------------------- refinement
def test_clip_refine_by_hand():
    r = torch.tensor([0.9, 0.3, 0.6, 0.5])
    torch.testing.assert_close(clip_refine(r, eta=0.5), torch.tensor([0.0, -0.2, 0.0, 0.0]))
    assert (clip_refine(torch.rand(50), eta=0.3) <= 0).all()  # never positive: more steps cannot add reward


def test_delta_refine_by_hand_and_telescoping():
    r = torch.tensor([0.9, 0.3, 0.6])
    d = delta_refine(r)
    torch.testing.assert_close(d, torch.tensor([0.6, -0.3, 0.6]))
    # sum over steps k.. equals r_k: the process return from any step is that step's PRM score
    torch.testing.assert_close(d.flip(0).cumsum(0).flip(0), r)
    assert delta_refine(torch.tensor([0.7])).tolist() == pytest.approx([0.7])
    assert delta_refine(torch.zeros(0)).numel() == 0


def test_clip_then_delta_stays_bounded_however_many_steps():
    # a policy that repeats a step the PRM likes: plain sum grows with the steps, refined return does not
    for k in (2, 5, 20):
        r = torch.full((k,), 0.8)
        assert r.sum().item() == pytest.approx(0.8 * k)
        assert delta_refine(r).sum().item() == pytest.approx(0.8)
        assert clip_refine(r, eta=0.5).sum().item() == 0.0
        assert delta_refine(clip_refine(r, eta=0.5)).sum().item() == 0.0


# ----------------------------------------------------------------- placement on the packed batch
def packed(prompt_lens, response_lens):
    seqlens = torch.tensor([p + r for p, r in zip(prompt_lens, response_lens)])
    mask = torch.cat([torch.cat([torch.zeros(p), torch.ones(r)]) for p, r in zip(prompt_lens, response_lens)])
    return seqlens, mask.long()


def test_place_step_rewards_by_hand():
    seqlens, mask = packed([2, 1, 3], [4, 2, 3])  # samples at flat 0-5, 6-8, 9-14; responses from 2, 7, 12
    rewards = [torch.tensor([-0.5, 0.25]), torch.tensor([1.0]), torch.tensor([0.1, 0.2, 0.3])]
    positions = [[1, 3], [0], [0, 0, 2]]  # response-relative; sample 2 has two steps ending on one token
    out = place_step_rewards(rewards, positions, seqlens, mask)
    expected = torch.zeros(15)
    expected[[3, 5, 7, 12, 14]] = torch.tensor([-0.5, 0.25, 1.0, 0.1 + 0.2, 0.3])
    torch.testing.assert_close(out, expected)
    assert (out[mask == 0] == 0).all()


def test_place_step_rewards_checks_its_inputs():
    seqlens, mask = packed([2, 1], [3, 0])
    with pytest.raises(ValueError, match="each of the 2 samples"):
        place_step_rewards([torch.tensor([1.0])], [[0]], seqlens, mask)
    with pytest.raises(ValueError, match="2 step rewards but 1 step positions"):
        place_step_rewards([torch.tensor([1.0, 2.0]), torch.zeros(0)], [[0], []], seqlens, mask)
    with pytest.raises(ValueError, match="outside its 3 response tokens"):
        place_step_rewards([torch.tensor([1.0]), torch.zeros(0)], [[3], []], seqlens, mask)
    out = place_step_rewards([torch.tensor([1.0]), torch.zeros(0)], [[2], []], seqlens, mask)  # no steps: fine
    assert out.tolist() == [0, 0, 0, 0, 1.0, 0]


def test_end_to_end_refined_rewards_plus_success_give_bounded_returns():
    """Text -> steps -> tokens -> Delta rewards on a packed batch, + success on the last token -> return-to-go."""
    text = "x=1\ny=2\nz=3"
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 7), (7, 8), (8, 11)]  # "x" "=" "1" "\n" "y=2" "\n" "z=3"
    ends = step_end_tokens(offsets, split_steps(text))
    assert ends == [2, 4, 6]
    prm = torch.tensor([0.9, 0.4, 0.7])
    seqlens, mask = packed([3, 2], [7, 1])  # the response above is sample 0; sample 1 has one token, no steps
    token_rewards = place_step_rewards([delta_refine(prm), torch.zeros(0)], [ends, []], seqlens, mask)
    success = torch.tensor([1.0, 0.0])
    token_rewards[seqlens.cumsum(0) - 1] += success  # the caller adds the outcome on the last action token
    g = return_to_go(token_rewards, seqlens, mask)
    # from step k's last token on, the return is prm[k] + success (Delta telescopes)
    assert g[3 + 2].item() == pytest.approx(0.9 + 1.0)
    assert g[3 + 4].item() == pytest.approx(0.4 + 1.0)
    assert g[3 + 6].item() == pytest.approx(0.7 + 1.0)
    assert g[3].item() == pytest.approx(0.9 + 1.0)  # first response token
    assert g[10 + 2].item() == 0.0 and (g[mask == 0] == 0).all()
