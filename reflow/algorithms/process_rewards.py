"""Dense process rewards for RL, refined as in "On Designing Effective RL Reward at Training Time for LLM
Reasoning" (Gao et al. 2024, arXiv 2410.15115).

The paper adds a process reward model's (PRM) per-step scores to the sparse success reward of PPO on
math reasoning and finds that, used as is, they do not help or even hurt: the policy learns to *hack*
them, e.g. by writing many short, correct but unnecessary steps, because every extra step that the PRM
scores positively adds to the return. Its two refinements bound the summed process reward of a
trajectory, so more steps cannot earn more:

    Clip   r~_k = min(r_k - eta, 0)                         every step reward <= 0
    Delta  r~_k = r_k - r_{k+1} (k < K),  r~_K = r_K        sum_{j >= k} r~_j = r_k  (telescoping)

and they can be combined (clip the PRM scores, then take deltas). The success reward is added by the
caller on the last action token, as for outcome rewards.

Pipeline for one response text: split_steps -> spans of the steps; score each step with a PRM;
step_end_tokens(offset_mapping, spans) -> the token that closes each step; clip_refine / delta_refine;
then place_step_rewards for the packed batch puts each refined reward on its step's last token, giving
token_rewards [T] for a token-level estimator (gae, reinforce++).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

from reflow.algorithms.advantages import action_layout


def split_steps(text: str, sep: str = "\n") -> list[tuple[int, int]]:
    """Character spans [start, end) of the reasoning steps of `text`: the pieces between separators.

    Surrounding whitespace is trimmed from each piece and empty (or whitespace-only) pieces are dropped,
    so "a\\n\\n b \\n" gives [(0, 1), (4, 5)] and text[start:end] is the step's content.
    """
    if not sep:
        raise ValueError("sep must be a non-empty string")
    spans, pos = [], 0
    for piece in text.split(sep):
        stripped = piece.strip()
        if stripped:
            start = pos + (len(piece) - len(piece.lstrip()))
            spans.append((start, start + len(stripped)))
        pos += len(piece) + len(sep)
    return spans


def step_end_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each step span [s, e), the index of the last response token that overlaps it.

    `offsets`: per response token its character span (start, end) in the response text, as a fast
    tokenizer's offset_mapping gives (sorted by start). Zero-width tokens (special tokens, (0, 0)) are
    skipped. A token that straddles a step boundary (e.g. ".\\n" closing one step) counts as the last
    token of the step it starts in. A span that no token overlaps (e.g. text cut off by truncation)
    raises ValueError.
    """
    real = [i for i, (a, b) in enumerate(offsets) if b > a]
    starts = [offsets[i][0] for i in real]
    out = []
    for s, e in spans:
        k = bisect.bisect_left(starts, e) - 1  # last token starting before the step ends
        if k < 0 or offsets[real[k]][1] <= s:
            raise ValueError(f"no token overlaps the step at characters [{s}, {e})")
        out.append(real[k])
    return out


def clip_refine(step_rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """Clip mechanism: r~_k = min(r_k - eta, 0) for step rewards [K].

    Why: bounded above by 0, the summed process reward of a trajectory can only fall as steps are added,
    so padding the solution with steps the PRM likes earns nothing; steps scored at or above the threshold
    eta are merely not penalised, steps below it are penalised by how far below they are.
    """
    return torch.clamp(step_rewards.float() - eta, max=0.0)


def delta_refine(step_rewards: torch.Tensor) -> torch.Tensor:
    """Delta mechanism: r~_k = r_k - r_{k+1} for k < K, and r~_K = r_K (step rewards [K]).

    Why: the rewards telescope, sum_{j >= k} r~_j = r_k, so the process return from any step k on is
    just the PRM score of step k (and that of the whole trajectory is r_1): it stays bounded however
    many steps follow, so repeating steps cannot accumulate reward, while a step that the PRM scores
    higher than the next one is still credited for the difference.
    """
    r = step_rewards.float()
    out = r.clone()
    out[:-1] = r[:-1] - r[1:]
    return out


def place_step_rewards(per_sample_step_rewards: Sequence[torch.Tensor], per_sample_step_token_pos: Sequence[Sequence[int]],
                       seqlens: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """token_rewards [T] with each (refined) step reward on the packed position of its step's last token.

    per_sample_step_rewards[i] [K_i] and per_sample_step_token_pos[i] (K_i ints) belong to sample i of the
    packed batch (seqlens [B], action_mask [T]); a position p is response-relative: the p-th action token
    of sample i (0 = the first response token), as step_end_tokens returns for the response's offsets.
    Rewards of steps ending on the same token add up; every other position is 0, prompt tokens included.
    The final success reward is the caller's, on the last action token.
    """
    B = len(seqlens)
    if len(per_sample_step_rewards) != B or len(per_sample_step_token_pos) != B:
        raise ValueError(f"need step rewards and positions for each of the {B} samples, got "
                         f"{len(per_sample_step_rewards)} and {len(per_sample_step_token_pos)}")
    idx, _, n = action_layout(seqlens, action_mask)
    out = torch.zeros(action_mask.shape[0], device=idx.device)
    for i, (rewards, pos) in enumerate(zip(per_sample_step_rewards, per_sample_step_token_pos)):
        rewards = torch.as_tensor(rewards, dtype=torch.float).reshape(-1)
        if len(rewards) != len(pos):
            raise ValueError(f"sample {i}: {len(rewards)} step rewards but {len(pos)} step positions")
        if not len(pos):
            continue
        p = torch.as_tensor(list(pos), dtype=torch.long, device=idx.device)
        if int(p.min()) < 0 or int(p.max()) >= int(n[i]):
            raise ValueError(f"sample {i}: step positions {p.tolist()} fall outside its {int(n[i])} response tokens")
        out.index_add_(0, idx[i, p], rewards.to(out.device))
    return out
