"""Loss aggregation: per-token terms of a packed micro-batch -> one scalar, exact under micro-batching.

Shapes: B samples, T = sum(seqlens) tokens of the packed micro-batch; `mask` [T] marks the tokens that
count (the action tokens). Every mode divides a *sum* over this micro-batch by normalisers that the
caller computes once for the whole mini-batch (`Norm`), so summing the values of the micro-batches of a
mini-batch gives exactly the value on the whole mini-batch, however it was cut (no sample is ever cut
in two: micro-batches hold whole samples).

    mode                      value                                                   (verl's loss_agg_mode)
    token-mean                sum_i sum_t m x / N_tok
    seq-mean-token-mean       sum_i ( sum_t m x / n_i ) / N_seq                      n_i = action tokens of i
    seq-mean-token-sum        sum_i   sum_t m x         / N_seq
    seq-mean-token-sum-norm   sum_i   sum_t m x         / (N_seq * L_max)            Dr.GRPO (Liu et al. 2025)

N_tok = norm.tokens, N_seq = norm.samples, L_max = norm.max_tokens (a constant such as max_new_tokens:
Dr.GRPO divides by a constant, not by each response's length, to remove the length bias of token-mean
within a sequence). A sample without action tokens contributes 0. Values outside `mask` never enter,
even when they are inf or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Norm:
    """Mini-batch-wide normalisers handed to loss functions."""

    tokens: float  # action tokens in the mini-batch (token-mean losses)
    samples: float  # samples in the mini-batch (sequence-mean losses)
    max_tokens: float = 1.0  # constant length normaliser of seq-mean-token-sum-norm (e.g. max_new_tokens)


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def sample_index(seqlens: torch.Tensor, num_tokens: int, device=None) -> torch.Tensor:
    """[T] which sample each flat token belongs to; checks that sum(seqlens) == T."""
    seqlens = torch.as_tensor(seqlens, dtype=torch.long)
    if int(seqlens.sum()) != num_tokens:
        raise ValueError(f"seqlens sum to {int(seqlens.sum())} but the per-token tensors have {num_tokens} rows")
    seqlens = seqlens.to(device)
    return torch.repeat_interleave(torch.arange(len(seqlens), device=device), seqlens, output_size=num_tokens)


def per_sample_sum(x: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
    """[T] -> [B]: sum of each sample's rows (x must already be zero where it should not count)."""
    idx = sample_index(seqlens, x.shape[0], x.device)
    return torch.zeros(len(seqlens), dtype=x.dtype, device=x.device).index_add(0, idx, x)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, seqlens: torch.Tensor, norm: Norm,
              mode: str = "token-mean") -> torch.Tensor:
    """Scalar aggregate of `per_token` [T] over `mask` [T] (samples given by `seqlens` [B]); see the module doc."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation '{mode}'; choose one of: {', '.join(AGG_MODES)}")
    m = mask.bool()
    x = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token-mean":
        return x.sum() / norm.tokens
    if mode == "seq-mean-token-sum":
        return x.sum() / norm.samples
    if mode == "seq-mean-token-sum-norm":
        return x.sum() / (norm.samples * norm.max_tokens)
    # seq-mean-token-mean: each sample's own token-mean, then the mean over the mini-batch's samples
    sums = per_sample_sum(x, seqlens)
    counts = per_sample_sum(m.to(sums.dtype), seqlens)
    return (sums / counts.clamp(min=1)).sum() / norm.samples
