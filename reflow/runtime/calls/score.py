"""Rewards: a reward function on the decoded text, a reward model on the tokens, and process rewards.

    score_fn      r_i = fn(prompts, responses, answers)[i]          (clipped to [-c, c] with reward.clip, plus
                  DAPO's overlong penalty with algo.overlong_cache); sandboxed, it also reports reward/errors.
                  Its optional second output `correct`: 1.0 where the unshaped r_i >= the function's
                  correct_at (reflow.rewards.registry), else 0.0; NaN everywhere when it declares none
    score_model   r_i = RM(prompt_i + response_i) at the last token  (same clip)
    process_reward  dense per-step rewards of a PRM, refined (Clip / Delta) and placed on each step's last
                  token: tokens["prm_rewards"] [T]

Each writes the field named by the call's first output (`score`, or `score` under ReMax's `greedy_` prefix).
"""

from __future__ import annotations

import torch

from reflow.algorithms.dapo import overlong_penalty
from reflow.data.batch import SampleBatch
from reflow.engines.infer import InferenceEngine
from reflow.runtime.calls import CallContext, register_call
from reflow.rewards.registry import compute_rewards, correct
from reflow.rewards.sandbox import RewardSandbox


def _clip(cc: CallContext, scores: torch.Tensor, batch: SampleBatch) -> torch.Tensor:
    """reward.clip, then DAPO's overlong shaping (algo.overlong_cache) on the response lengths."""
    c = cc.cfg.reward.clip
    scores = scores if c is None else scores.clamp(-c, c)
    a = cc.cfg.algo
    if a.overlong_cache is not None:
        scores = scores + overlong_penalty(batch.samples["response_len"], cc.cfg.rollout.max_new_tokens,
                                           a.overlong_cache, a.overlong_factor)
    return scores


@register_call("score_fn", per_sample=True)
def score_fn(cc: CallContext, batch: SampleBatch) -> SampleBatch:
    if not cc.first:  # a reward function is computed once per call, on its first rank
        return None
    fn, columns = cc.worker.reward_fn, (batch.meta["prompt"], batch.meta["response"], batch.meta["answer"])
    if isinstance(fn, RewardSandbox):  # failed samples get reward.on_error; their count is a metric
        rewards, cc.metrics["reward/errors"] = fn.score(*columns)
    else:
        rewards = compute_rewards(fn, *columns)
    scores = torch.tensor(rewards, dtype=torch.float)
    out = {cc.output_key(): _clip(cc, scores, batch)}
    if "correct" in cc.call.outputs:  # judged on the function's own rewards, before clipping and shaping
        right = correct(fn, rewards)
        out[cc.output_key(cc.call.outputs.index("correct"))] = (
            torch.full((len(rewards),), float("nan")) if right is None else torch.tensor(right, dtype=torch.float))
    return batch.with_samples(**out)


@register_call("score_model", per_sample=True)
def score_model(cc: CallContext, batch: SampleBatch) -> SampleBatch:
    mcfg = cc.worker.role_config(cc.call.weights)
    scores = InferenceEngine(cc.model, mcfg.micro_batch_tokens, parallel=cc.ctx).scores(batch)
    return batch.with_samples(**{cc.output_key(): _clip(cc, scores, batch)})


@register_call("process_reward", per_sample=True)
def process_reward(cc: CallContext, batch: SampleBatch) -> SampleBatch:
    if not cc.first:
        return None
    prm = cc.worker.process_reward
    rewards = prm.token_rewards(batch, cc.tokenizer)
    if prm.errors is not None:
        cc.metrics["reward/prm_errors"] = prm.errors
    return batch.with_tokens(**{cc.output_key(): rewards})
