"""Advantage estimators: pure functions on packed tensors (no models, no devices).

Shapes: B samples, T = total tokens of the packed batch, `action_mask` [T] marks response tokens.
Per-token tensors follow the batch convention (position t = the action of emitting token t).
Each estimator returns (advantages [T], returns [T]); both are 0 outside the action mask.

Registered estimators take keyword arguments only and ignore the ones they do not use (`**_`):
    rewards [B]            scalar score of each sample
    group_ids [B]          samples from the same prompt share a group id
    seqlens [B]            tokens per sample (prompt + response)
    action_mask [T]        1 on response tokens
    token_rewards [T]      score on the last action token, plus process rewards (or a multi-turn env's
                           per-turn rewards, on each turn's last token), minus the per-token KL
                           penalties when the KL is in the reward; 0 elsewhere
    values [T] | None, last_values [B] | None, truncated [B] bool   (critic estimators)
    gamma, lam, norm_std, baseline_rewards [B] | None
Estimators without a critic return returns = advantages.

The outcome estimators (grpo, drgrpo, rloo, remax) score sample i by r_i = sum of token_rewards over its
action tokens when token_rewards is given (as verl's outcome estimators sum token_level_rewards), so a KL
penalty in the reward and process rewards reach the advantage: r_i = score_i + sum_t prm_t - beta sum_t KL_t.
Without token_rewards (or for a sample without action tokens) r_i = rewards_i.

    name                    advantage of the action tokens of sample i
    grpo                    (r_i - mean_g r) / (std_g r + eps)                         Shao et al. 2024
    drgrpo                  r_i - mean_g r                                             Liu et al. 2025
    rloo                    r_i - mean_{j in g, j != i} r_j                            Ahmadian et al. 2024
    remax                   r_i - r(greedy response to the same prompt)               Li et al. 2023
    reinforce++             whiten_batch( sum_{s >= t} gamma^(s-t) token_rewards_s )   Hu 2025
    reinforce++-baseline    as reinforce++ with the score centred on its group mean   Hu 2025
    gae                     generalised advantage estimation with a critic            Schulman et al. 2016
"""

from __future__ import annotations

import torch

from reflow.algorithms.aggregation import per_sample_sum, sample_index
from reflow.algorithms.registry import register_advantage


def broadcast_to_tokens(per_sample: torch.Tensor, seqlens: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [T]: every action token of sample i gets per_sample[i]."""
    per_sample = per_sample.float()
    return torch.repeat_interleave(per_sample, seqlens.to(per_sample.device)) * action_mask.float().to(per_sample.device)


def _groups(group_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv [B]: each sample's group in 0..G-1, count [G]: samples per group). Groups need not be contiguous."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    inv = inv.to(device)
    G = int(inv.max()) + 1 if len(inv) else 0
    count = torch.zeros(G, device=device).index_add_(0, inv, torch.ones(len(inv), device=device))
    return inv, count


def outcome_rewards(rewards: torch.Tensor, token_rewards: torch.Tensor | None, seqlens: torch.Tensor,
                    action_mask: torch.Tensor) -> torch.Tensor:
    """[B] sequence reward of the outcome estimators: r_i = sum_{t in actions of i} token_rewards_t.

    token_rewards [T] carries the score on each sample's last action token (and any KL penalty or process
    reward on the others), so the sum is the score when nothing else is in the reward. A sample without
    action tokens, or token_rewards None, keeps rewards_i [B]. Entries off the action mask never enter.
    """
    if token_rewards is None:
        return rewards.float()
    m = action_mask.bool().to(token_rewards.device)
    zero = torch.zeros((), device=token_rewards.device)
    summed = per_sample_sum(torch.where(m, token_rewards.float(), zero), seqlens)
    has_actions = per_sample_sum(m.float(), seqlens) > 0
    return torch.where(has_actions, summed, rewards.float().to(summed.device))


def group_mean(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] mean reward of each sample's group (a group of one: the sample's own reward)."""
    r = rewards.float()
    inv, count = _groups(group_ids, r.device)
    return (torch.zeros(len(count), device=r.device).index_add_(0, inv, r) / count)[inv]


def groups_with_spread(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: True for the samples of groups (samples sharing a group id) whose rewards [B] are not all equal.

    "Equal" is exact (max == min); a group of one has no spread. This is DAPO's dynamic-sampling filter
    (0 < #correct < G for 0/1 rewards) and the test under which `group_baseline` scores a group exactly 0.
    """
    r = rewards.double()
    inv, count = _groups(group_ids, r.device)
    G = len(count)
    hi = torch.full((G,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((G,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    return (hi > lo)[inv]


def group_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[B] GRPO score: (r_i - mean(group)) / (std(group) + eps); std is the unbiased sample std.

    A group whose rewards are all equal (max == min, a group of one included) scores exactly 0. That needs
    more than the formula: seven rewards of 0.7 in float32 have a float32 mean one ulp off 0.7 and a std
    of 6e-8, which eps = 1e-6 turns into a score of +0.056 (verl's GRPO has the same flaw). The moments
    are computed in float64 and a group without spread is set to 0 explicitly. `norm_std=False` is Dr.GRPO.
    """
    r = rewards.double()
    inv, count = _groups(group_ids, r.device)
    count = count.double()
    G = len(count)
    mean = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    spread = groups_with_spread(rewards, group_ids).to(r.device)
    centred = torch.where(spread, r - mean[inv], torch.zeros((), dtype=r.dtype, device=r.device))
    if not norm_std:
        return centred.float()
    var = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, centred**2) / (count - 1).clamp(min=1)
    return (centred / (var.sqrt()[inv] + eps)).float()


def rloo_baseline(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] RLOO score: r_i - (sum_{j in g} r_j - r_i) / (n_g - 1), the mean of the *other* samples of i's group.

    Equals n_g / (n_g - 1) * (r_i - mean_g r). A group of one has no other sample: score 0. Sums run in
    float64, so a group of equal float32 rewards scores exactly 0.
    """
    r = rewards.double()
    inv, count = _groups(group_ids, r.device)
    total = torch.zeros(len(count), dtype=r.dtype, device=r.device).index_add_(0, inv, r)[inv]
    n = count.double()[inv]
    score = r - (total - r) / (n - 1).clamp(min=1)
    return torch.where(n > 1, score, torch.zeros_like(score)).float()


@register_advantage("grpo")
def grpo(*, rewards, group_ids, seqlens, action_mask, token_rewards=None, norm_std: bool = True,
         **_) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024), outcome supervision: A_{i,t} = (r_i - mean_g r) / std_g r for every token t of i.

    r = outcome_rewards(rewards, token_rewards, ...) (the summed token rewards; see the module doc).
    """
    r = outcome_rewards(rewards, token_rewards, seqlens, action_mask)
    score = group_baseline(r, group_ids, norm_std=norm_std)
    adv = broadcast_to_tokens(score, seqlens, action_mask)
    return adv, adv


@register_advantage("drgrpo")
def drgrpo(*, rewards, group_ids, seqlens, action_mask, token_rewards=None, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): A_{i,t} = r_i - mean_g r.

    GRPO without the division by the group std (which up-weights prompts that are almost always or almost
    never solved). `norm_std` is ignored: this name always centres only. Pair it with the
    "seq-mean-token-sum-norm" loss aggregation for the paper's full recipe. r as in `grpo`.
    """
    r = outcome_rewards(rewards, token_rewards, seqlens, action_mask)
    adv = broadcast_to_tokens(group_baseline(r, group_ids, norm_std=False), seqlens, action_mask)
    return adv, adv


@register_advantage("rloo")
def rloo(*, rewards, group_ids, seqlens, action_mask, token_rewards=None, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_{i,t} = r_i - 1/(n_g - 1) sum_{j in g, j != i} r_j.

    The leave-one-out baseline does not depend on sample i, so the estimate stays unbiased; a group of one
    gets 0 (verl keeps r_i there instead). Broadcast to every action token of i. r as in `grpo`.
    """
    r = outcome_rewards(rewards, token_rewards, seqlens, action_mask)
    adv = broadcast_to_tokens(rloo_baseline(r, group_ids), seqlens, action_mask)
    return adv, adv


@register_advantage("remax")
def remax(*, rewards, seqlens, action_mask, token_rewards=None, baseline_rewards=None,
          **_) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (Li et al. 2023): A_{i,t} = r_i - b_i, b_i = reward of the greedy response to sample i's prompt.

    baseline_rewards [B]: b_i for every sample (repeat it over the samples of a prompt). r as in `grpo`;
    b is the greedy response's score alone (as verl's remax: no KL or process reward of the greedy response).
    """
    if baseline_rewards is None:
        raise ValueError("the 'remax' estimator needs baseline_rewards [B]: the reward of a greedy (temperature 0) "
                         "response to each sample's prompt, scored by the same reward")
    if baseline_rewards.shape != rewards.shape:
        raise ValueError(f"baseline_rewards has shape {tuple(baseline_rewards.shape)}, rewards {tuple(rewards.shape)}")
    r = outcome_rewards(rewards, token_rewards, seqlens, action_mask)
    score = r - baseline_rewards.float().to(r.device)
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


def batch_normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(max(var, eps)) over all masked entries of the batch; 0 outside the mask.

    mean and var are the population moments over the action tokens (var divides by their count), as
    OpenRLHF normalises REINFORCE++ advantages. Unlike `masked_whiten`, values outside the mask may be
    anything (inf, NaN): they never enter.
    """
    m = mask.bool()
    zero = torch.zeros((), device=x.device)
    xf = torch.where(m, x.float(), zero)
    n = m.sum().clamp(min=1)
    mean = xf.sum() / n
    var = (torch.where(m, xf - mean, zero) ** 2).sum() / n
    return torch.where(m, (xf - mean) * var.clamp(min=eps).rsqrt(), zero)


def action_layout(seqlens: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded view of each sample's action tokens, in order.

    Returns idx [B, L] (flat position of the k-th action token of sample i), real [B, L] (k < n_i) and
    n [B] (action tokens per sample); L = max n_i. Padding entries of idx are 0: mask them with `real`.
    """
    m = action_mask.bool()
    owner_of = sample_index(seqlens, m.shape[0], m.device)
    pos = m.nonzero(as_tuple=True)[0]
    owner = owner_of[pos]
    B = len(seqlens)
    n = torch.bincount(owner, minlength=B)
    rank = torch.arange(len(pos), device=m.device) - (n.cumsum(0) - n)[owner]
    L = int(n.max()) if len(pos) else 0
    idx = torch.zeros(B, L, dtype=torch.long, device=m.device)
    real = torch.zeros(B, L, dtype=torch.bool, device=m.device)
    idx[owner, rank] = pos
    real[owner, rank] = True
    return idx, real, n


def last_action_index(seqlens: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat position [B] of each sample's last action token, has_actions [B]); position is 0 where there is none."""
    idx, real, n = action_layout(seqlens, action_mask)
    has = n > 0
    if idx.shape[1] == 0:
        return torch.zeros(len(n), dtype=torch.long, device=idx.device), has
    return idx.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0] * has, has


def return_to_go(token_rewards: torch.Tensor, seqlens: torch.Tensor, action_mask: torch.Tensor,
                 gamma: float = 1.0) -> torch.Tensor:
    """[T] G_t = sum_{s >= t} gamma^(k(s) - k(t)) r_s over the action tokens s of t's sample (k = rank among them).

    The sum runs over each sample's own action tokens only: nothing crosses a sample boundary, and
    rewards on prompt tokens are ignored. 0 outside the action mask.
    """
    idx, real, _ = action_layout(seqlens, action_mask)
    zero = torch.zeros((), device=idx.device)
    r = torch.where(real, token_rewards.float().to(idx.device)[idx], zero)
    if gamma == 1.0:
        g = r.flip(1).cumsum(1).flip(1)
    else:
        g = torch.zeros_like(r)
        running = torch.zeros(r.shape[0], device=r.device)
        for t in reversed(range(r.shape[1])):  # padding sits after each sample's end and adds 0
            running = r[:, t] + gamma * running
            g[:, t] = running
    out = torch.zeros(action_mask.shape[0], device=idx.device)
    out[idx[real]] = g[real]
    return out


@register_advantage("reinforce++")
def reinforce_pp(*, token_rewards, seqlens, action_mask, gamma: float = 1.0, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): return-to-go of token rewards, normalised over the whole batch.

        G_t = sum_{s >= t} gamma^(s - t) r_s          r = token_rewards (score on the last token, - beta * KL_s)
        A_t = (G_t - mean) / sqrt(max(var, 1e-8))    mean, var: population moments over all action tokens

    As OpenRLHF's experience maker ("reinforce"): the global normalisation both subtracts the batch mean
    and divides by the batch std (OpenRLHF's --no_advantage_std_norm would skip the division; not
    offered here). verl's reinforce_plus_plus whitens the same way, but with the unbiased variance.
    """
    adv = batch_normalize(return_to_go(token_rewards, seqlens, action_mask, gamma), action_mask)
    return adv, adv


@register_advantage("reinforce++-baseline")
def reinforce_pp_baseline(*, rewards, group_ids, token_rewards, seqlens, action_mask, gamma: float = 1.0,
                          **_) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025): REINFORCE++ with the score centred on its group mean first.

        r'_t = token_rewards_t - [t = last action token of i] * mean_{j in g(i)} r_j
        G_t  = sum_{s >= t} gamma^(s - t) r'_s
        A_t  = (G_t - mean) / sqrt(max(var, 1e-8))   over all action tokens of the batch

    i.e. the score on the last token is replaced by r_i - mean_g r (the caller's token_rewards must carry
    the score on each sample's last action token, as the RL experiment places it; KL penalties stay as
    they are). OpenRLHF (experience_maker.compute_advantages_and_returns, "reinforce_baseline") centres
    the group without dividing by the group std ("/ std is not needed in RL variance reduction theory"),
    then applies the same global normalisation as REINFORCE++: subtract the batch mean *and* divide by
    the batch std. OpenRLHF forces gamma = 1 for this estimator; here gamma is used as given (default 1).
    A group of one sample is centred to 0 (OpenRLHF's group mean of itself; verl leaves it uncentred).
    """
    shaped = torch.where(action_mask.bool(), token_rewards.float(), torch.zeros((), device=token_rewards.device))
    last, has = last_action_index(seqlens, action_mask)
    mean = group_mean(rewards, group_ids).to(shaped.device)
    shaped = shaped.index_add(0, last[has], -mean[has])
    adv = batch_normalize(return_to_go(shaped, seqlens, action_mask, gamma), action_mask)
    return adv, adv
