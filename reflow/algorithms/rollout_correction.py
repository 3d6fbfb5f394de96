"""Rollout correction: importance weights between the policy being trained and the one that generated.

The generator's log-probs (`gen_logprobs`) differ from the training engine's for the same weights (bf16
sampling, another engine's kernels) and, with asynchronous training, come from an older policy. The
policy gradient then uses samples of pi_gen to estimate a gradient under pi_train; these weights correct
for it (Liu, Li et al. 2025, "When Speed Kills Stability"; verl's rollout_corr_helper):

    log rho_t = clamp(logp_train_t - logp_gen_t, -20, 20)            per action token

    level      ratio                                              what it is
    token      rho_t                                              per-token ratio: low variance, biased
    sequence   rho_i = exp(clamp(sum_{t in y_i} log rho_t, +-20))  pi_train(y_i | x) / pi_gen(y_i | x): the
                                                                  true sequence ratio, unbiased before
                                                                  truncation, high variance
    geometric  rho_i = exp(mean_{t in y_i} log rho_t)             length-free drift per token (verl's Geo-RS);
                                                                  not an importance weight: MIS only

    mode   weight w                                      kept tokens
    tis    min(rho, threshold)                           every action token          truncated IS
    mis    rho * [lower <= rho <= upper]                 tokens (token level) or whole sequences (sequence,
           (geometric: [lower <= rho <= upper])          geometric) with the ratio inside [lower, upper]

`sequence` uses the product of the token ratios because that is the likelihood ratio of the sample, the
quantity importance sampling needs; the geometric mean is offered as a filter only, where its length
invariance matters (a product over 1000 tokens leaves any fixed bound even for a tiny per-token drift).
The weights are detached (they change the measure, not the objective). The caller multiplies them into
the per-token policy loss (`rollout_weights=` of every registered policy loss) and, for MIS, trains on
`mask & keep` (verl's modified response mask), counting the normalisers over the kept tokens.
"""

from __future__ import annotations

import torch

from reflow.algorithms.aggregation import per_sample_sum, sample_index
from reflow.algorithms.losses import masked

ROLLOUT_CORRECTIONS = ("tis", "mis")
ROLLOUT_CORRECTION_LEVELS = ("token", "sequence", "geometric")
SAFETY_BOUND = 20.0  # |log ratio| before exp, as verl: e^20 ~ 4.9e8


def rollout_correction(train_logp: torch.Tensor, gen_logp: torch.Tensor, mask: torch.Tensor, seqlens: torch.Tensor,
                       *, mode: str, level: str = "token", threshold: float = 2.0, lower: float | None = None,
                       upper: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Rollout-correction weights [T] and kept tokens [T] (see the module doc for the formulas).

    train_logp: [T] the training policy's log-probs of the generated tokens (the behaviour / proximal
    policy's `old_logprobs`); gen_logp: [T] the generator's; mask: [T] action tokens; seqlens: [B].
    mode "tis": weight = min(rho, threshold), keep = mask. mode "mis": keep = mask & lower <= rho <= upper
    (lower None: 1 / upper), weight = rho on kept tokens (1 at level "geometric"), 0 elsewhere.
    Returns (weights [T] float, detached, 0 off `keep`; keep [T] bool; stats): kept_frac (kept / action
    tokens), weight_mean (mean weight over kept tokens), truncated_frac (TIS: tokens whose weight was
    cut to `threshold`), mismatch_kl (mean of -log rho_t: a k1 estimate of KL(pi_gen || pi_train)).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction '{mode}'; choose one of: {', '.join(ROLLOUT_CORRECTIONS)}")
    if level not in ROLLOUT_CORRECTION_LEVELS:
        raise ValueError(f"unknown rollout correction level '{level}'; choose one of: "
                         f"{', '.join(ROLLOUT_CORRECTION_LEVELS)}")
    if mode == "tis" and level == "geometric":
        raise ValueError("the geometric mean of the token ratios is not an importance weight: use level 'token' "
                         "or 'sequence' with tis, or 'geometric' with mis (a length-free filter)")
    if mode == "tis" and not threshold > 0:
        raise ValueError(f"the TIS threshold must be > 0 (typically 2), got {threshold}")
    lower = 1.0 / upper if lower is None else lower
    if mode == "mis" and not 0 <= lower < upper:
        raise ValueError(f"MIS bounds need 0 <= lower < upper, got lower={lower}, upper={upper}")

    m = mask.bool()
    token_log_ratio = masked((train_logp.float() - gen_logp.float()).detach(), m)
    log_ratio = token_log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    if level != "token":
        total = per_sample_sum(token_log_ratio, seqlens)
        if level == "geometric":
            total = total / per_sample_sum(m.float(), seqlens).clamp(min=1)
        log_ratio = total.clamp(-SAFETY_BOUND, SAFETY_BOUND)[sample_index(seqlens, m.shape[0], m.device)]
    ratio = torch.exp(log_ratio)
    zero = torch.zeros((), device=ratio.device)

    if mode == "tis":
        keep = m
        weights = masked(ratio.clamp(max=threshold), m)
        truncated = m & (ratio > threshold)
    else:
        keep = m & (ratio >= lower) & (ratio <= upper)
        weights = torch.where(keep, torch.ones_like(ratio) if level == "geometric" else ratio, zero)
        truncated = torch.zeros_like(m)

    n = m.sum().clamp(min=1)
    stats = {
        "kept_frac": keep.sum() / n,
        "weight_mean": weights.sum() / keep.sum().clamp(min=1),
        "truncated_frac": truncated.sum() / n,
        "mismatch_kl": -token_log_ratio.sum() / n,
    }
    return weights, keep, stats
