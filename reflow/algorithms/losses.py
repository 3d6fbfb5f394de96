"""Policy, value, KL and preference losses: pure functions on packed per-token tensors.

Every loss is a *sum* over this micro-batch divided by normalisers that the caller computes over the
whole mini-batch: a `Norm` (tokens, samples, max_tokens) for per-token losses aggregated by
`reflow.algorithms.aggregation.aggregate`, or a plain `denom` (pairs, tokens) for the others. Summing the
micro-batch losses then gives exactly the mini-batch value, however the mini-batch was cut into
micro-batches (and, once distributed, however it was spread over data-parallel ranks). Metrics follow
the same rule: sums over the micro-batch / mini-batch normaliser, so they add up too.

Shapes: T = tokens of the packed micro-batch, B = its samples (`seqlens` [B], sum = T), `mask` [T] the
action tokens; P = preference pairs. Entries outside `mask` never reach a loss, a metric or a gradient,
even when they hold inf or NaN.
"""

from __future__ import annotations

import torch

from reflow.algorithms.aggregation import Norm, aggregate, per_sample_sum
from reflow.algorithms.registry import register_policy_loss


K3_LOG_RATIO_BOUND = 20.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1/k2/k3), log r = ref_logp - logp.

        k1 = -log r        k2 = (log r)^2 / 2        k3 = r - 1 - log r   (unbiased, always >= 0)

    k3 first clamps log r to [-20, 20] (as verl's kl_penalty_forward, "low_var_kl"), so one token on which
    the policy has drifted far (or a -inf log-prob) gives a finite value, at most e^20 - 21, with no
    gradient beyond the bound, instead of overflowing exp and poisoning the whole loss. verl also caps the
    k3 value at 10; reflow does not: the cap would drop the KL gradient of exactly the tokens that have
    drifted furthest from the reference (k3 > 10: log r below -11 or above 2.6), which the KL term is
    there to pull back.
    """
    log_ratio = ref_logp.float() - logp.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_ratio = log_ratio.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator '{kind}'; use k1, k2 or k3")


def masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where m, 0 elsewhere (a where, not a product: garbage outside the mask cannot turn into NaN)."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def weighted(per_token: torch.Tensor, weights: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """per_token * weights on the mask (weights detached; None = no weighting); 0 off the mask."""
    if weights is None:
        return per_token
    return per_token * masked(weights.detach().to(per_token), m)


@register_policy_loss("ppo")
def ppo_policy_loss(logp, old_logp, advantages, mask, seqlens, norm: Norm, *, clip_low: float = 0.2,
                    clip_high: float = 0.2, dual_clip: float | None = None, agg: str = "token-mean",
                    rollout_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), optionally dual-clipped (Ye et al. 2020), aggregated by `agg`.

        ratio_t = exp(logp_t - old_logp_t)                         (log-ratio clamped to +-20)
        L_t     = max(-ratio_t A_t, -clip(ratio_t, 1 - clip_low, 1 + clip_high) A_t)
        dual clip, A_t < 0 only:  L_t = min(L_t, -dual_clip * A_t) = min(L_t, dual_clip * |A_t|)
    With A < 0 and a ratio far above 1 + clip_high the plain PPO loss -ratio * A grows without bound; dual
    clip caps it at dual_clip * |A| (zero gradient beyond ratio = dual_clip). dual_clip must be > 1.

    logp, old_logp, advantages, mask: [T]; seqlens [B]; loss = aggregate(w_t L_t, mask, seqlens, norm, agg)
    with w = rollout_weights [T] (detached rollout-correction weights, see `rollout_correction`; 1 if None).
    Stats (token means: sums / norm.tokens, whatever `agg`): clipfrac (tokens whose clipped term is the
    larger loss), clipfrac_lower (tokens capped by the dual clip), approx_kl_old (mean 0.5 * log-ratio^2).
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (typically 3), got {dual_clip}")
    m = mask.bool()
    adv = masked(advantages.float(), m)
    log_ratio = masked((logp.float() - old_logp.float()).clamp(-20, 20), m)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    lower = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -adv * dual_clip
        lower = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    loss = aggregate(weighted(per_token, rollout_weights, m), m, seqlens, norm, agg)
    stats = {
        "clipfrac": ((loss_clipped > loss_unclipped) & m).float().sum().detach() / norm.tokens,
        "clipfrac_lower": (lower & m).float().sum().detach() / norm.tokens,
        "approx_kl_old": (0.5 * log_ratio.detach() ** 2).sum() / norm.tokens,
    }
    return loss, stats


def value_loss(values, old_values, returns, mask, seqlens, norm: Norm, clip: float | None = 0.2,
               agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2), aggregated by `agg`:

        L_t = 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -clip, clip) - R_t)^2)
    (clip=None: 0.5 * (V_t - R_t)^2). All inputs [T] except seqlens [B]. Stats (sums / norm.tokens):
    value_error = mean (V - R)^2, value_clipfrac = share of tokens where the clipped error is the larger.
    """
    m = mask.bool()
    v, r = masked(values.float(), m), masked(returns.float(), m)
    err = (v - r) ** 2
    per_token, clipped_wins = err, torch.zeros_like(m)
    if clip is not None:
        v_old = masked(old_values.float(), m)
        err_clipped = (v_old + (v - v_old).clamp(-clip, clip) - r) ** 2
        per_token = torch.maximum(err, err_clipped)
        clipped_wins = err_clipped > err
    loss = 0.5 * aggregate(per_token, m, seqlens, norm, agg)
    stats = {
        "value_error": err.detach().sum() / norm.tokens,
        "value_clipfrac": (clipped_wins & m).float().sum().detach() / norm.tokens,
    }
    return loss, stats


def entropy_bonus(entropy, mask, seqlens, norm: Norm, agg: str = "token-mean") -> torch.Tensor:
    """Aggregated policy entropy H = agg(entropy_t) (entropy [T]); the actor loss subtracts coef * H."""
    return aggregate(entropy.float(), mask, seqlens, norm, agg)


def kl_loss(logp, ref_logp, mask, seqlens, norm: Norm, kind: str = "k3", agg: str = "token-mean") -> torch.Tensor:
    """KL(pi || ref) as a loss term (GRPO's placement): agg(kl_penalty(logp, ref_logp, kind)), inputs [T]."""
    m = mask.bool()
    return aggregate(kl_penalty(masked(logp.float(), m), masked(ref_logp.float(), m), kind), m, seqlens, norm, agg)


def sequence_nll(logp, mask, denom) -> torch.Tensor:
    """SFT loss: -sum of response-token log-likelihood / denom (token-mean when denom = #tokens)."""
    return -masked(logp, mask.bool()).sum() / denom


sft_loss = sequence_nll


def ptx_loss(logp, mask, seqlens, norm: Norm, agg: str = "token-mean") -> torch.Tensor:
    """PPO-ptx (Ouyang et al. 2022) pre-training / SFT term: agg(-logp_t) over the ptx batch's target tokens.

    `norm` counts the ptx mini-batch (its tokens and samples), not the RL one; the actor loss adds
    ptx_coef * this.
    """
    return aggregate(-logp, mask, seqlens, norm, agg)


def pairwise_reward_loss(chosen_scores, rejected_scores, denom,
                         margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry reward-model loss: -log sigmoid(s_chosen - s_rejected - margin), summed / denom pairs.

    `margin` [P] (optional, Llama 2's RM): how much better chosen is (e.g. from a preference-strength
    rating); the RM must separate the pair by at least that much before the loss flattens out.
    Accuracy counts a tie as half right, so an untrained (constant) scorer sits at 0.5, not 0; accuracy
    and the reported margin use s_chosen - s_rejected, without the target margin.
    """
    diff = chosen_scores - rejected_scores
    target = diff if margin is None else diff - margin.to(diff)
    loss = -torch.nn.functional.logsigmoid(target).sum() / denom
    return loss, {"accuracy": pair_accuracy(diff).sum().detach() / denom, "margin": diff.sum().detach() / denom}


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if chosen scores higher, 0.5 on a tie, 0 otherwise."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


DPO_KINDS = ("sigmoid", "ipo")


def completion_logprobs(token_logp: torch.Tensor, mask: torch.Tensor, seqlens: torch.Tensor, *,
                        average: bool = False) -> torch.Tensor:
    """[B] log-prob of each sample's completion from per-token log-probs [T] over the action tokens `mask` [T].

        average=False   log pi(y | x)               = sum_t m_t logp_t              (DPO)
        average=True    log pi(y | x) / |y|         = sum_t m_t logp_t / sum_t m_t  (IPO as TRL computes it)
    A sample without action tokens gets 0. Entries off the mask never enter (even inf or NaN).
    """
    m = mask.bool()
    total = per_sample_sum(masked(token_logp, m), seqlens)
    if not average:
        return total
    return total / per_sample_sum(m.to(total.dtype), seqlens).clamp(min=1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, denom, *,
             beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Direct preference losses on sequence log-probabilities [P] of the chosen / rejected responses.

        h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
        sigmoid  DPO (Rafailov et al. 2023):      -log sigma(beta h)
                 conservative DPO, eps = label_smoothing (labels flipped with probability eps):
                                                  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
        ipo      IPO (Azar et al. 2023):          (h - 1 / (2 beta))^2     (beta is the paper's tau)
    Each summed over the pairs / denom. IPO regresses h to a finite target instead of pushing it to
    infinity. The log-probs are the caller's: DPO takes sums over the completion's tokens; TRL's IPO (its
    DPOTrainer, loss_type="ipo") takes per-token averages, log pi(y | x) / |y|, for policy and reference
    alike, so that its target 1 / (2 beta) means a per-token margin whatever the length. Build either
    with `completion_logprobs(..., average=True | False)`; with sums, a beta tuned for TRL's IPO is off by
    the completion length.
    Stats (sums / denom): rewards/chosen = beta (pi_c - ref_c), rewards/rejected = beta (pi_r - ref_r),
    accuracy (chosen reward above rejected; a tie counts 0.5), margin = rewards/chosen - rewards/rejected.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"unknown DPO loss '{kind}'; choose one of: {', '.join(DPO_KINDS)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind == "ipo" and label_smoothing:
        raise ValueError("label_smoothing (conservative DPO) applies to kind='sigmoid' only")
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen - rejected
    logsig = torch.nn.functional.logsigmoid
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * logsig(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * logsig(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    r_c, r_r = beta * chosen.detach(), beta * rejected.detach()
    stats = {
        "rewards/chosen": r_c.sum() / denom,
        "rewards/rejected": r_r.sum() / denom,
        "accuracy": pair_accuracy(r_c - r_r).sum() / denom,
        "margin": (r_c - r_r).sum() / denom,
    }
    return losses.sum() / denom, stats


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): beta *= 1 + clip(KL/target - 1, +-0.2) * n/horizon."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:  # fixed coefficient
            return
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = s["value"]
