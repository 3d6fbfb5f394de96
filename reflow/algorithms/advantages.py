"""Advantage estimators: pure functions on packed tensors (no models, no devices).

Shapes: B samples, T = total tokens of the packed batch, `action_mask` [T] marks response tokens.
Per-token tensors follow the batch convention (position t = the action of emitting token t).
Each estimator returns (advantages [T], returns [T]); both are 0 outside the action mask.
"""

from __future__ import annotations

import torch

from reflow.algorithms.registry import register_advantage


def broadcast_to_tokens(per_sample: torch.Tensor, seqlens: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [T]: every action token of sample i gets per_sample[i]."""
    return torch.repeat_interleave(per_sample.float(), seqlens) * action_mask.float()


def group_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[B] GRPO score: (r_i - mean(group)) / (std(group) + eps); std is the unbiased sample std.

    A group of one sample has mean = its reward, so its score is 0. `norm_std=False` is Dr.GRPO.
    """
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if len(inv) else 0
    count = torch.zeros(G).index_add_(0, inv, torch.ones_like(rewards, dtype=torch.float))
    mean = torch.zeros(G).index_add_(0, inv, rewards.float()) / count
    centred = rewards.float() - mean[inv]
    if not norm_std:
        return centred
    var = torch.zeros(G).index_add_(0, inv, centred**2) / (count - 1).clamp(min=1)
    return centred / (var.sqrt()[inv] + eps)


@register_advantage("grpo")
def grpo(*, rewards, group_ids, seqlens, action_mask, norm_std: bool = True, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024), outcome supervision: A_{i,t} = (r_i - mean_g r) / std_g r for every token t of i."""
    score = group_baseline(rewards, group_ids, norm_std=norm_std)
    adv = broadcast_to_tokens(score, seqlens, action_mask)
    return adv, adv


@register_advantage("gae")
def gae(*, token_rewards, values, last_values, truncated, seqlens, action_mask, gamma: float = 1.0,
        lam: float = 0.95, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each sample's action tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V_t
    token_rewards [T] (KL penalties and the final score), values [T] (V_t = V(x_<t)), last_values [B]
    (V of the whole sequence). After the last action, V_{T} = last_values for a sample cut off at
    max length (`truncated` [B] True: the episode goes on, so bootstrap) and 0 for one that ended with EOS.
    """
    mask = action_mask.bool()
    adv = torch.zeros_like(values, dtype=torch.float)
    offsets = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0))
    # Padded [B, Lmax] view of the action tokens so the backward recursion is vectorised over samples.
    pos = [mask[offsets[i]:offsets[i + 1]].nonzero(as_tuple=True)[0] + offsets[i] for i in range(len(seqlens))]
    lmax = max((len(p) for p in pos), default=0)
    if lmax == 0:
        return adv, adv.clone()
    idx = torch.zeros(len(pos), lmax, dtype=torch.long)
    real = torch.zeros(len(pos), lmax, dtype=torch.bool)
    for i, p in enumerate(pos):
        idx[i, : len(p)], real[i, : len(p)] = p, True
    r = token_rewards.float()[idx] * real
    v = values.float()[idx] * real
    boot = torch.where(truncated.bool(), last_values.float(), torch.zeros_like(last_values, dtype=torch.float))
    lengths = real.sum(1)
    a = torch.zeros(len(pos), lmax)
    next_adv = torch.zeros(len(pos))
    for t in reversed(range(lmax)):
        is_last = lengths - 1 == t
        next_v = torch.where(is_last, boot, v[:, t + 1] if t + 1 < lmax else torch.zeros(len(pos)))
        next_adv = torch.where(is_last, torch.zeros_like(next_adv), next_adv)
        delta = r[:, t] + gamma * next_v - v[:, t]
        next_adv = torch.where(real[:, t], delta + gamma * lam * next_adv, torch.zeros_like(next_adv))
        a[:, t] = next_adv
    adv[idx[real]] = a[real]
    returns = (adv + values.float()) * mask
    return adv, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population std); 0 outside the mask."""
    m = mask.bool()
    vals = x[m].float()
    if vals.numel() < 2:
        return x * m
    return ((x - vals.mean()) / (vals.std(unbiased=False) + eps)) * m
