"""Evaluation calls (a graph's `evals`, run every trainer.eval_every steps and at the end). Each returns
partial sums {metric: [numerator, denominator]} from every replica; the executor adds them up and divides,
so the result does not depend on how many replicas share the eval set.

    eval_generate   greedy decoding of data.eval: eval/reward (the reward function, when there is one),
                    eval/accuracy (the reward function's success, else exact match on rows with an answer;
                    engines.rollout.correct_count), eval/response_len
    eval_episodes   greedy multi-turn episodes of data.eval against rollout.env: eval/reward, eval/turns
    eval_rm_pairs   held-out preference pairs: eval/accuracy = share with s(chosen) > s(rejected), eval/margin
    eval_dpo_pairs  held-out pairs: eval/pair_accuracy = share with h > 0, eval/margin = mean beta * h
"""

from __future__ import annotations

from reflow.algorithms.losses import pair_accuracy
from reflow.engines.generate import GenerationEngine, SamplingParams
from reflow.engines.infer import InferenceEngine
from reflow.engines.rollout import correct_count, decode_response
from reflow.models.packing import attention_spec
from reflow.rewards.registry import compute_rewards
from reflow.runtime.calls import CallContext, register_call
from reflow.engines.multiturn import greedy_episodes
from reflow.runtime.calls.rollout import env_class, episode_limits, replica_share, turn_end_ids
from reflow.runtime.calls.supervised import dpo_inputs, preference_batch


@register_call("eval_generate")
def eval_generate(cc: CallContext, batch) -> dict | None:
    o, tok = cc.call.options, cc.tokenizer
    prompts = cc.data.eval_prompts
    a, b = replica_share(len(prompts), cc.ctx)
    engine = GenerationEngine(cc.model, [tok.eos_token_id], tok.pad_token_id, o.get("batch_size", 256))
    gens = engine.generate([e.prompt_ids for e in prompts[a:b]],
                           SamplingParams(max_new_tokens=o["max_new_tokens"], greedy=True)) if b > a else []
    if cc.ctx is not None and cc.ctx.tp_rank != 0:
        return None  # one result per replica
    responses = [decode_response(tok, g.tokens) for g in gens]
    answers = [e.answer for e in prompts[a:b]]
    out = {"eval/response_len": [sum(len(g.tokens) for g in gens), len(gens)]}
    fn, r = (cc.worker.reward_fn if o.get("reward") else None), None
    if fn is not None:
        r = compute_rewards(fn, [e.prompt_text for e in prompts[a:b]], responses, answers) if gens else []
        out["eval/reward"] = [sum(r), len(r)]
    out["eval/accuracy"] = list(correct_count(responses, answers, fn, r))
    return out


@register_call("eval_episodes")
def eval_episodes(cc: CallContext, batch) -> dict | None:
    """Greedy multi-turn episodes of data.eval against rollout.env: eval/reward (the env's return, plus
    reward.fn on the transcript when set), eval/turns, eval/response_len (model tokens)."""
    r, tok = cc.cfg.rollout, cc.tokenizer
    prompts = cc.data.eval_prompts
    a, b = replica_share(len(prompts), cc.ctx)
    engine = GenerationEngine(cc.model, turn_end_ids(tok, r.turn_end), tok.pad_token_id, cc.call.options.get("batch_size", 256))
    tp_first = cc.ctx is None or cc.ctx.tp_rank == 0  # the other tensor-parallel ranks decode along, score nothing
    eps, returns = greedy_episodes(engine, prompts[a:b], range(a, b), env_class(r.env), r.env, episode_limits(r), tok,
                                   reward_fn=cc.worker.reward_fn if tp_first else None, threads=r.env_threads)
    if not tp_first:
        return None
    return {"eval/reward": [sum(returns), len(eps)], "eval/turns": [sum(ep.turns for ep in eps), len(eps)],
            "eval/response_len": [sum(ep.generated for ep in eps), len(eps)]}


def _eval_pairs_batch(cc: CallContext):
    return preference_batch(cc.data.eval_pairs)


@register_call("eval_rm_pairs")
def eval_rm_pairs(cc: CallContext, batch) -> dict | None:
    if not cc.data.eval_pairs:  # a held-out share too small to hold a pair
        return None
    mcfg = cc.worker.role_config(cc.call.weights)
    pairs = _eval_pairs_batch(cc)
    s = InferenceEngine(cc.model, mcfg.micro_batch_tokens, attention_spec(mcfg), parallel=cc.ctx).scores(pairs)
    margin = s[0::2] - s[1::2]
    n = len(margin)
    return {"eval/accuracy": [pair_accuracy(margin).sum().item(), n], "eval/margin": [margin.sum().item(), n]} \
        if cc.first else None


@register_call("eval_dpo_pairs")
def eval_dpo_pairs(cc: CallContext, batch) -> dict | None:
    if not cc.data.eval_pairs:
        return None
    mcfg = cc.worker.role_config(cc.call.weights)
    pairs = _eval_pairs_batch(cc)
    logp, _ = InferenceEngine(cc.model, mcfg.micro_batch_tokens, attention_spec(mcfg), parallel=cc.ctx).logprobs(pairs)
    seq, ref = dpo_inputs(cc.cfg, logp, batch.select(pairs.ids).samples["ref_logp"], pairs)
    h = seq - ref
    margin = h[0::2] - h[1::2]
    n = len(margin)
    return {"eval/pair_accuracy": [pair_accuracy(margin).sum().item(), n],
            "eval/margin": [(cc.cfg.beta * margin).sum().item(), n]} if cc.first else None
