"""Policy, value and KL terms: pure functions on packed per-token tensors.

Every loss is a *sum* over this micro-batch's tokens divided by a normaliser `denom` that the
caller computes over the whole mini-batch (number of action tokens for token-mean). Summing the
micro-batch losses then gives exactly the mini-batch mean, however the mini-batch was cut into
micro-batches (and, once distributed, however it was spread over data-parallel ranks).
"""

from __future__ import annotations

import torch


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1/k2/k3), log r = ref_logp - logp.

        k1 = -log r        k2 = (log r)^2 / 2        k3 = r - 1 - log r   (unbiased, always >= 0)
    """
    log_ratio = ref_logp.float() - logp.float()
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # clamp keeps exp finite when the policy has drifted far on a single token
        return torch.exp(log_ratio.clamp(max=20)) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator '{kind}'; use k1, k2 or k3")


def ppo_policy_loss(logp, old_logp, advantages, mask, denom, clip_low: float = 0.2,
                    clip_high: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), token-level, summed and divided by `denom`.

        ratio_t = exp(logp_t - old_logp_t)
        L_t = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t)
    Returns the loss and sums for metrics (clipped-token count, approx KL to the old policy).
    """
    m = mask.float()
    log_ratio = (logp - old_logp).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    loss = (per_token * m).sum() / denom
    stats = {
        "clipfrac": ((clipped < unclipped).float() * m).sum().detach() / denom,
        "approx_kl_old": ((0.5 * log_ratio**2) * m).sum().detach() / denom,
    }
    return loss, stats


def value_loss(values, old_values, returns, mask, denom, clip: float | None = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (PPO2): 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), summed / denom."""
    m = mask.float()
    err = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clipped - returns) ** 2)
    loss = 0.5 * (err * m).sum() / denom
    return loss, {"value_error": ((values - returns) ** 2 * m).sum().detach() / denom}


def sequence_nll(logp, mask, denom) -> torch.Tensor:
    """SFT loss: -sum of response-token log-likelihood / denom (token-mean when denom = #tokens)."""
    return -(logp * mask.float()).sum() / denom


def pairwise_reward_loss(chosen_scores, rejected_scores, denom) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry reward-model loss: -log sigmoid(s_chosen - s_rejected), summed / denom pairs.

    Accuracy counts a tie as half right, so an untrained (constant) scorer sits at 0.5, not 0.
    """
    margin = chosen_scores - rejected_scores
    loss = -torch.nn.functional.logsigmoid(margin).sum() / denom
    return loss, {"accuracy": pair_accuracy(margin).sum().detach() / denom, "margin": margin.sum().detach() / denom}


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if chosen scores higher, 0.5 on a tie, 0 otherwise."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


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
