"""DAPO's reward-side pieces (Yu et al. 2025, "DAPO: an open-source LLM RL system at scale").

Clip-higher (asymmetric clip_low / clip_high) and the token-mean loss are options of `ppo_policy_loss`;
these are the other two:

- overlong reward shaping (the paper's Eq. 13): a soft length penalty over the last L_cache tokens of
  the budget, added to the score, a graded length signal instead of the reward noise of scoring a sound
  but truncated response like a wrong one;
- the dynamic-sampling filter, `groups_with_spread` (defined with the group statistics in `advantages`):
  a group whose rewards are all equal has zero GRPO advantage everywhere and only dilutes the batch, so
  DAPO drops it and samples more prompts until the batch is full. Filter on the outcome score: with a KL
  penalty in the reward almost no group is flat.
"""

from __future__ import annotations

import torch

from reflow.algorithms.advantages import groups_with_spread

__all__ = ["groups_with_spread", "overlong_penalty"]


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int, factor: float = 1.0) -> torch.Tensor:
    """[B] soft overlong punishment of responses with `lengths` [B] tokens (DAPO Eq. 13, times `factor`):

        R(L) = 0                               L <= L_max - L_cache
               (L_max - L_cache - L) / L_cache  L_max - L_cache < L <= L_max      (falls linearly to -1)
               -1                               L > L_max
    with L_max = max_length (the response budget, e.g. max_new_tokens) and L_cache = cache. verl's DAPO
    reward manager applies the middle branch with a `penalty_factor` (here `factor`) and has no third one
    (its responses cannot exceed the budget); here it is kept so a longer length cannot score below -factor.
    """
    if not 0 < cache <= max_length:
        raise ValueError(f"the overlong cache must satisfy 0 < cache <= max_length, got cache={cache}, "
                         f"max_length={max_length}")
    L = lengths.double()
    penalty = ((max_length - cache - L) / cache).clamp(min=-1.0, max=0.0)
    return (factor * penalty).float()
