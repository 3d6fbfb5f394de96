"""generate: the actor decodes responses for the step's prompts (`meta["prompts"]`: dataset indices).

Sample ids: step s with P prompts x n samples numbers its samples s*P*n .. (s+1)*P*n - 1, and the samples
of prompt j form group s*P*n + j. Data-parallel replicas take contiguous shares of the samples; keyed
sampling makes every sample's tokens a pure function of (run seed, step, sample id), so the share a replica
gets changes nothing. samples["policy_version"]: the number of updates the generating weights had seen. With `options["greedy"]` one greedy response per prompt is decoded instead, keyed
by its group (`ids` = the group ids): ReMax's baseline, spread over the group's samples by the consumer.
"""

from __future__ import annotations

import torch

from reflow.data.batch import SampleBatch
from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
from reflow.engines.rollout import batch_from_generations
from reflow.runtime.calls import CallContext, register_call

ROLLOUT_FIELDS = ("input_ids", "action_mask", "gen_logprobs", "group_id", "prompt_len", "response_len", "truncated",
                  "policy_version", "prompt", "response", "answer")


def replica_share(n: int, ctx) -> tuple[int, int]:
    """[a, b): the contiguous share of n items of this rank's data-parallel replica."""
    d, k = (1, 0) if ctx is None else (ctx.layout.d, ctx.dp_rank)
    size = -(-n // d)
    return min(n, k * size), min(n, (k + 1) * size)


@register_call("generate")
def generate(cc: CallContext, batch: SampleBatch | None) -> SampleBatch | None:
    cfg, step, tok = cc.cfg, cc.step, cc.tokenizer
    r = cfg.rollout
    greedy = bool(cc.call.options.get("greedy"))
    n = 1 if greedy else r.n
    prompt_idx = cc.meta["prompts"]
    examples = [cc.data.train_prompts[i] for i in prompt_idx for _ in range(n)]
    # DAPO's dynamic sampling generates up to R rounds per step: round k numbers its samples after round k-1's
    rounds = cc.cfg.algo.dynamic_sampling_rounds if cc.cfg.algo.dynamic_sampling else 1
    first_id = (step * rounds + cc.meta.get("round", 0)) * len(prompt_idx) * r.n
    groups = [first_id + j // n for j in range(len(examples))]
    ids = groups if greedy else list(range(first_id, first_id + len(examples)))
    a, b = replica_share(len(examples), cc.ctx)
    params = SamplingParams(r.max_new_tokens, greedy=True) if greedy else \
        SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k)
    engine = GenerationEngine(cc.model, [tok.eos_token_id], tok.pad_token_id, r.batch_size)
    gens = engine.generate([e.prompt_ids for e in examples[a:b]], params, None, keys=ids[a:b],
                           seed=sample_seed(cfg.seed, step)) if b > a else []
    # ids are consecutive in both cases (samples, or greedy rows keyed by their group)
    part = batch_from_generations(gens, examples[a:b], groups[a:b], ids[a] if b > a else 0, tok)
    # the policy version (updates applied to the weights) that produced the samples, given by the executor
    part.with_samples(policy_version=torch.full((len(part),), cc.meta.get("version", step), dtype=torch.long))
    tp_first = cc.ctx is None or cc.ctx.tp_rank == 0
    return part if tp_first and len(part) else None  # one part per replica
