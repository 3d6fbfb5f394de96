"""Policy losses beyond PPO's clipped surrogate: GSPO, CISPO, Clip-Cov, KL-Cov. Registered by name.

Same conventions as `reflow.algorithms.losses` (where `ppo_policy_loss`, registered as "ppo", lives): per-token
tensors [T] flat over the packed micro-batch, `seqlens` [B], `mask` [T] the action tokens, a `Norm` of
mini-batch-wide normalisers, loss = aggregate(w_t L_t, mask, seqlens, norm, agg) with w = rollout_weights
(detached rollout-correction weights, 1 if None). Stats are sums over the micro-batch / norm.tokens, so
they add up over micro-batches. log r_t = logp_t - old_logp_t is clamped to [-20, 20] before any exp.

    name       per-token loss L_t                                                          paper
    gspo       max(-A s_it, -A clip(s_it, 1 - eps_l, 1 + eps_h)),  s_it = sg[s_i] pi_t / sg[pi_t]  Zheng et al. 2025
    cispo      -sg(clip(r_t, 1 - eps_l, 1 + eps_h)) A_t logp_t                          MiniMax-M1, 2025
    clip_cov   PPO's L_t, set to 0 on a random few high-covariance tokens               Cui et al. 2025
    kl_cov     -A_t r_t + coef |log r_t| on the top-k covariance tokens, -A_t r_t elsewhere  Cui et al. 2025

Clip-Cov and KL-Cov pick tokens by the covariance of log-prob and advantage over the tokens they are given,
as verl does per micro-batch: their value depends on how the mini-batch is cut, unlike the other losses.
"""

from __future__ import annotations

import torch

from reflow.algorithms.aggregation import Norm, aggregate, per_sample_sum, sample_index
from reflow.algorithms.losses import masked, weighted
from reflow.algorithms.registry import register_policy_loss

LOG_RATIO_BOUND = 20.0


def _log_ratio(logp, old_logp, m):
    """[T] log r = logp - old_logp, clamped to +-20, 0 off the mask."""
    return masked((logp.float() - old_logp.float()).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND), m)


def _per_token_mean(x: torch.Tensor, m: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Detached sum of x over the mask / norm.tokens (a token-mean metric that adds up over micro-batches)."""
    return masked(x.detach().float(), m).sum() / norm.tokens


@register_policy_loss("gspo")
def gspo_policy_loss(logp, old_logp, advantages, mask, seqlens, norm: Norm, *, clip_low: float = 3e-4,
                     clip_high: float = 4e-4, agg: str = "seq-mean-token-mean",
                     rollout_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), in its GSPO-token form.

        log s_i  = (1 / |y_i|) sum_{t in y_i} (logp_t - old_logp_t)      s_i: geometric mean of the token ratios
        s_{i,t}  = sg[s_i] * pi_t / sg[pi_t]                              value s_i, gradient s_i * grad logp_t
        L_t      = max(-A_t s_{i,t}, -A_t clip(s_{i,t}, 1 - clip_low, 1 + clip_high))
    The whole sequence is clipped or not (one ratio per sequence); with an advantage that is constant over
    the sequence (every outcome estimator) and agg = "seq-mean-token-mean", the gradient is exactly GSPO's
    sequence-level one, (1 / |y_i|) sum_t s_i A_i grad logp_t. The paper's ranges are small because s_i
    is a per-token geometric mean: 3e-4 / 4e-4. Its objective averages per sequence, hence the default
    `agg`; other modes are allowed and change how sequences are weighted.

    logp, old_logp, advantages, mask: [T]; seqlens [B]. Stats: clipfrac (tokens whose sequence ratio is
    clipped, sums / norm.tokens), approx_kl_old (mean 0.5 (logp - old_logp)^2).
    """
    m = mask.bool()
    adv = masked(advantages.float(), m)
    log_ratio = _log_ratio(logp, old_logp, m)
    tokens = per_sample_sum(m.float(), seqlens).clamp(min=1)
    seq_log_ratio = per_sample_sum(log_ratio, seqlens) / tokens  # [B] log s_i
    idx = sample_index(seqlens, m.shape[0], m.device)
    lp = masked(logp.float(), m)
    ratio = torch.exp(seq_log_ratio.detach()[idx] + lp - lp.detach())  # [T] s_{i,t}
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    loss = aggregate(weighted(per_token, rollout_weights, m), m, seqlens, norm, agg)
    stats = {
        "clipfrac": _per_token_mean((loss_clipped > loss_unclipped).float(), m, norm),
        "approx_kl_old": _per_token_mean(0.5 * log_ratio**2, m, norm),
    }
    return loss, stats


@register_policy_loss("cispo")
def cispo_policy_loss(logp, old_logp, advantages, mask, seqlens, norm: Norm, *, clip_low: float | None = None,
                      clip_high: float = 0.28, agg: str = "token-mean",
                      rollout_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, Chen et al. 2025): clip the importance weight, not the update.

        r_t = exp(logp_t - old_logp_t)
        L_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t
    PPO's clip zeroes the gradient of a token whose ratio left the trust region (often the rare "fork"
    tokens of a reasoning chain); here every token keeps its REINFORCE gradient A_t grad logp_t, only
    scaled by the stop-gradient, clipped weight. clip_low None: no lower bound, as the paper (which tunes
    only the upper one; 0.28 is DAPO's clip-higher value). The loss *value* is not a surrogate that equals
    -A at r = 1: only its gradient matters.

    logp, old_logp, advantages, mask: [T]; seqlens [B]. Stats: clipfrac (tokens whose weight was clipped),
    approx_kl_old.
    """
    m = mask.bool()
    adv = masked(advantages.float(), m)
    log_ratio = _log_ratio(logp, old_logp, m)
    ratio = torch.exp(log_ratio).detach()
    weight = ratio.clamp(min=None if clip_low is None else 1 - clip_low, max=1 + clip_high)
    per_token = -weight * adv * masked(logp.float(), m)
    loss = aggregate(weighted(per_token, rollout_weights, m), m, seqlens, norm, agg)
    stats = {
        "clipfrac": _per_token_mean((weight != ratio).float(), m, norm),
        "approx_kl_old": _per_token_mean(0.5 * log_ratio**2, m, norm),
    }
    return loss, stats


def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[T] (logp_t - mean logp) * (A_t - mean A), means over the masked tokens; -inf off the mask.

    The per-token covariance of the Entropy Mechanism paper (Cui et al. 2025): entropy falls fastest through
    tokens whose log-prob and advantage are large together. logp is detached.
    """
    lp, adv = logp.detach().float(), advantages.float()
    n = m.sum().clamp(min=1)
    lp_mean = masked(lp, m).sum() / n
    adv_mean = masked(adv, m).sum() / n
    cov = (lp - lp_mean) * (adv - adv_mean)
    return torch.where(m, cov, torch.full((), -torch.inf, device=cov.device))


@register_policy_loss("clip_cov")
def clip_cov_policy_loss(logp, old_logp, advantages, mask, seqlens, norm: Norm, *, clip_low: float = 0.2,
                         clip_high: float = 0.2, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0,
                         clip_cov_ub: float = 5.0, agg: str = "token-mean",
                         generator: torch.Generator | None = None,
                         rollout_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"; verl's clip_cov).

        L_t  = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))          PPO's surrogate
        C_t  = (logp_t - mean logp) (A_t - mean A)                                   over the masked tokens
        candidates: masked tokens not already clipped by PPO with clip_cov_lb < C_t < clip_cov_ub
        k    = max(1, floor(clip_cov_ratio * N)), N = masked tokens given
        min(k, #candidates) candidates drawn uniformly at random get L_t = 0 (value and gradient)
    Cutting the gradient of a few high-covariance tokens slows the entropy collapse those tokens drive.
    `generator` draws the tokens (None: torch's global generator); seed it per step for reproducible runs.

    logp, old_logp, advantages, mask: [T]; seqlens [B]. Stats: clipfrac (PPO clip), cov_clipfrac (tokens
    detached by Clip-Cov), approx_kl_old; all sums / norm.tokens.
    """
    if not clip_cov_ratio > 0:
        raise ValueError(f"clip_cov_ratio must be > 0 (typically 2e-4), got {clip_cov_ratio}")
    m = mask.bool()
    adv = masked(advantages.float(), m)
    log_ratio = _log_ratio(logp, old_logp, m)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    ppo_clipped = (loss_clipped > loss_unclipped) & m
    cov = token_covariance(logp, adv, m)
    candidates = (m & ~ppo_clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)).nonzero(as_tuple=True)[0]
    k = max(1, int(clip_cov_ratio * int(m.sum())))
    if len(candidates) > k:
        pick = torch.randperm(len(candidates), generator=generator)[:k].to(candidates.device)
        candidates = candidates[pick]
    detached = torch.zeros_like(m)
    detached[candidates] = True
    per_token = torch.where(detached, torch.zeros((), device=adv.device), torch.maximum(loss_unclipped, loss_clipped))
    loss = aggregate(weighted(per_token, rollout_weights, m), m, seqlens, norm, agg)
    stats = {
        "clipfrac": _per_token_mean(ppo_clipped.float(), m, norm),
        "cov_clipfrac": _per_token_mean(detached.float(), m, norm),
        "approx_kl_old": _per_token_mean(0.5 * log_ratio**2, m, norm),
    }
    return loss, stats


@register_policy_loss("kl_cov")
def kl_cov_policy_loss(logp, old_logp, advantages, mask, seqlens, norm: Norm, *, kl_cov_ratio: float = 2e-4,
                       ppo_kl_coef: float = 1.0, agg: str = "token-mean",
                       rollout_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"; verl's kl_cov).

        r_t  = exp(logp_t - old_logp_t)
        C_t  = (logp_t - mean logp) (A_t - mean A)                                   over the masked tokens
        top  = the k = max(1, floor(kl_cov_ratio * N)) masked tokens of largest C_t  (N = masked tokens given)
        L_t  = -A_t r_t + ppo_kl_coef * |logp_t - old_logp_t|   on top
        L_t  = -A_t r_t                                         elsewhere (no ratio clipping at all)
    A KL penalty on the few tokens that drive the entropy down most, instead of a clip on all of them.
    Ties in C_t are broken by torch.topk.

    logp, old_logp, advantages, mask: [T]; seqlens [B]. Stats: kl_cov_frac (tokens penalised),
    approx_kl_old; sums / norm.tokens.
    """
    if not kl_cov_ratio > 0:
        raise ValueError(f"kl_cov_ratio must be > 0 (typically 2e-4), got {kl_cov_ratio}")
    m = mask.bool()
    adv = masked(advantages.float(), m)
    log_ratio = _log_ratio(logp, old_logp, m)
    per_token = -adv * torch.exp(log_ratio)
    top = torch.zeros_like(m)
    n = int(m.sum())
    if n:
        k = max(1, int(kl_cov_ratio * n))
        top[torch.topk(token_covariance(logp, adv, m), k).indices] = True
    per_token = per_token + torch.where(top, ppo_kl_coef * log_ratio.abs(), torch.zeros((), device=adv.device))
    loss = aggregate(weighted(per_token, rollout_weights, m), m, seqlens, norm, agg)
    stats = {
        "kl_cov_frac": _per_token_mean(top.float(), m, norm),
        "approx_kl_old": _per_token_mean(0.5 * log_ratio**2, m, norm),
    }
    return loss, stats
