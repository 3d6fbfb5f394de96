"""Supervised training calls: SFT, the pairwise reward model, DPO (and DPO's reference scoring).

The step's examples come as dataset indices (`meta["examples"]`); every rank builds the same batch from its
copy of the data, and the train engine gives each data-parallel rank its share.

    train_sft     L = -(1 / #response tokens) sum_i sum_{t in response_i} log pi(x_t | x_<t)
    train_rm      L = -(1 / #pairs) sum_pairs log sigmoid(s(x + y_chosen) - s(x + y_rejected))   (Bradley-Terry)
    pair_logprobs samples[out] [2P] = log ref(y | x), summed over the response tokens of each pair half
    train_dpo     h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))    (IPO with ipo_average:
                  log-probs per token of the completion, TRL's definition)
                  sigmoid: -log sigma(beta h) (label smoothing eps: -(1-eps) log sigma(beta h) - eps log sigma(-beta h))
                  ipo    : (h - 1 / (2 beta))^2
Preference batches interleave the pairs: sample 2i = chosen of pair i, 2i + 1 = rejected, group_id = i, so
a pair never straddles two micro-batches or data-parallel ranks.
"""

from __future__ import annotations

import torch

from reflow.algorithms.aggregation import Norm
from reflow.algorithms.losses import dpo_loss, pairwise_reward_loss, sequence_nll
from reflow.data.batch import SampleBatch
from reflow.engines.infer import InferenceEngine
from reflow.models.packing import attention_spec, sequence_scores, token_logprobs
from reflow.runtime.calls import CallContext, register_call


def sft_batch(examples) -> SampleBatch:
    """(prompt, response) examples -> input_ids, action_mask on the response (on its assistant turns only for a
    conversation: `response_mask`)."""
    return SampleBatch.from_sequences(
        range(len(examples)),
        {"input_ids": [torch.tensor(e.prompt_ids + e.response_ids) for e in examples],
         "action_mask": [torch.tensor([0] * len(e.prompt_ids) + (e.response_mask or [1] * len(e.response_ids)))
                         for e in examples]})


def preference_batch(examples) -> SampleBatch:
    """Chosen and rejected interleaved (2i, 2i+1), action_mask on the responses, group_id = pair index."""
    seqs, masks = [], []
    for e in examples:
        for resp in (e.chosen_ids, e.rejected_ids):
            seqs.append(torch.tensor(e.prompt_ids + resp))
            masks.append(torch.tensor([0] * len(e.prompt_ids) + [1] * len(resp)))
    return SampleBatch.from_sequences(range(len(seqs)), {"input_ids": seqs, "action_mask": masks},
                                      samples={"group_id": torch.arange(len(seqs)) // 2})


def sequence_logprobs(token_logp: torch.Tensor, batch: SampleBatch) -> torch.Tensor:
    """[T] per-token log-probs (0 off the action mask) -> [B] per-sample sums."""
    return torch.zeros(len(batch), dtype=token_logp.dtype, device=token_logp.device).index_add_(
        0, batch.sample_index().to(token_logp.device), token_logp)


def dpo_inputs(cfg, token_logp: torch.Tensor, ref_sums: torch.Tensor, batch: SampleBatch):
    """([B] policy, [B] reference) completion log-probs as the DPO loss takes them: sums, or for IPO with
    ipo_average (TRL's definition) per-token means, so that beta is per token (the reference's stored sums
    are divided by the same completion lengths)."""
    seq = sequence_logprobs(token_logp, batch)
    ref = ref_sums.to(seq.device)
    if cfg.loss == "ipo" and cfg.ipo_average:
        lengths = sequence_logprobs(batch.tokens["action_mask"].to(seq), batch).clamp(min=1)
        return seq / lengths, ref / lengths
    return seq, ref


def examples(cc: CallContext, dataset: str) -> list:
    """The step's examples of a dataset (meta["examples"]: indices), or all of it (evaluation)."""
    rows = getattr(cc.data, dataset)
    return [rows[i] for i in cc.meta["examples"]] if "examples" in cc.meta else list(rows)


@register_call("train_sft")
def train_sft(cc: CallContext, batch: SampleBatch | None) -> dict:
    attention = attention_spec(cc.worker.role_config(cc.call.role))

    def loss_fn(model, mb, norm):
        logp, _ = token_logprobs(model, mb, attention=attention)
        return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}

    batch = sft_batch(examples(cc, "sft"))
    return {**cc.train_step(batch, loss_fn), "tokens": float(batch.num_tokens)}


@register_call("train_rm")
def train_rm(cc: CallContext, batch: SampleBatch | None) -> dict:
    attention = attention_spec(cc.worker.role_config(cc.call.role))
    pairs = preference_batch(examples(cc, "pairs"))

    def loss_fn(model, mb, norm):
        s = sequence_scores(model, mb, attention)  # pairs stay whole: group_key = "group_id"
        return pairwise_reward_loss(s[0::2], s[1::2], norm.samples)

    norm = Norm(tokens=float(pairs.num_tokens), samples=len(pairs) / 2)  # samples = pairs
    return {**cc.train_step(pairs, loss_fn, norm, "group_id"), "tokens": float(pairs.num_tokens)}


@register_call("pair_logprobs")
def pair_logprobs(cc: CallContext, batch: SampleBatch | None) -> SampleBatch:
    mcfg = cc.worker.role_config(cc.call.weights)
    rows = examples(cc, cc.call.options.get("dataset", "pairs"))
    if not rows:  # an empty held-out share
        return None
    pairs = preference_batch(rows)
    logp, _ = InferenceEngine(cc.model, mcfg.micro_batch_tokens, attention_spec(mcfg), parallel=cc.ctx).logprobs(pairs)
    return pairs.with_samples(**{cc.output_key(): sequence_logprobs(logp, pairs)})


@register_call("train_dpo")
def train_dpo(cc: CallContext, batch: SampleBatch) -> dict:
    cfg = cc.cfg
    attention = attention_spec(cc.worker.role_config(cc.call.role))
    pairs = preference_batch(examples(cc, "pairs"))
    pairs.with_samples(ref_logp=batch.select(pairs.ids).samples["ref_logp"])

    def loss_fn(model, mb, norm):
        logp, _ = token_logprobs(model, mb, attention=attention)
        seq, ref = dpo_inputs(cfg, logp, mb.samples["ref_logp"], mb)
        return dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], norm.samples, beta=cfg.beta, kind=cfg.loss,
                        label_smoothing=cfg.label_smoothing)

    norm = Norm(tokens=float(pairs.tokens["action_mask"].sum()), samples=len(pairs) / 2)  # samples = pairs
    return {**cc.train_step(pairs, loss_fn, norm, "group_id"), "tokens": float(pairs.num_tokens)}
