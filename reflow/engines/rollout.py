"""Rollouts as data: generations packed into SampleBatches, accuracy (the reward's success, or exact match),
greedy evaluation of a model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from reflow.data.batch import SampleBatch
from reflow.data.datasets import PromptExample
from reflow.engines.generate import Generation, GenerationEngine, SamplingParams
from reflow.rewards.registry import compute_rewards, correct

log = logging.getLogger("reflow")


def decode_response(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def batch_from_generations(gens: list[Generation], examples: list[PromptExample], group_ids: list[int],
                           ids: Sequence[int], tokenizer, versions: list[list[int]] | None = None) -> SampleBatch:
    """Pack generations (prompt + response) into a SampleBatch with the rollout keys.

    tokens : input_ids, action_mask (response), gen_logprobs (sampler's log-probs at action positions),
             with `versions` (one list per generation, one entry per response token) also versions: the
             policy version of each response token, -1 on prompt tokens
    samples: group_id, prompt_len, response_len, truncated (cut at max_new_tokens, no EOS)
    meta   : prompt, response, answer
    """
    input_ids, action_mask, gen_lp, vers = [], [], [], []
    for j, g in enumerate(gens):
        p, r = len(g.prompt_ids), len(g.tokens)
        input_ids.append(torch.tensor(g.prompt_ids + g.tokens, dtype=torch.long))
        action_mask.append(torch.tensor([0] * p + [1] * r, dtype=torch.long))
        gen_lp.append(torch.tensor([0.0] * p + g.logprobs, dtype=torch.float))
        if versions is not None:
            vers.append(torch.tensor([-1] * p + list(versions[j]), dtype=torch.long))
    tokens = {"input_ids": input_ids, "action_mask": action_mask, "gen_logprobs": gen_lp}
    if versions is not None:
        tokens["versions"] = vers
    return SampleBatch.from_sequences(
        ids,
        tokens,
        samples={
            "group_id": torch.tensor(group_ids, dtype=torch.long),
            "prompt_len": torch.tensor([len(g.prompt_ids) for g in gens]),
            "response_len": torch.tensor([len(g.tokens) for g in gens]),
            "truncated": torch.tensor([not g.finished for g in gens]),
        },
        meta={
            "prompt": [e.prompt_text for e in examples],
            "response": [decode_response(tokenizer, g.tokens) for g in gens],
            "answer": [e.answer for e in examples],
        },
    )


def generations_from_batch(batch: SampleBatch) -> tuple[list[Generation], list[list[int]]]:
    """The inverse of `batch_from_generations` (with versions): (generations in batch order, each one's
    per-token versions). A generation is finished when it ended with EOS (`truncated` is False)."""
    gens, versions = [], []
    ids, lps, vers = batch.unpack("input_ids"), batch.unpack("gen_logprobs"), batch.unpack("versions")
    for j, p in enumerate(batch.samples["prompt_len"].tolist()):
        gens.append(Generation(j, ids[j][:p].tolist(), ids[j][p:].tolist(), lps[j][p:].tolist(),
                               not bool(batch.samples["truncated"][j])))
        versions.append(vers[j][p:].tolist())
    return gens, versions


def continue_generations(engine: GenerationEngine, gens: list[Generation], versions: list[list[int]],
                         budget: int, version: int, params: SamplingParams, keys: Sequence[int],
                         seed: int) -> tuple[list[Generation], list[list[int]]]:
    """Partial rollout: decode every unfinished generation (no EOS yet, fewer than `budget` tokens) on up to
    `budget` response tokens in all with the engine's (new) weights, re-prefilling prompt + tokens so far.
    Keyed draws continue at each response's position, so with unchanged weights the tokens are those of one
    uninterrupted call. The new tokens (and their log-probs) are recorded with policy version `version`.
    Returns (generations, per-token versions), in the order given."""
    todo = [j for j, g in enumerate(gens) if not g.finished and len(g.tokens) < budget]
    gens, versions = list(gens), [list(v) for v in versions]
    if not todo:
        return gens, versions
    more = engine.generate([gens[j].prompt_ids + gens[j].tokens for j in todo], params,
                           max_new_tokens=[budget - len(gens[j].tokens) for j in todo],
                           keys=[keys[j] for j in todo], seed=seed,
                           start_positions=[len(gens[j].tokens) for j in todo])
    for j, m in zip(todo, more):
        g = gens[j]
        gens[j] = Generation(g.index, g.prompt_ids, g.tokens + m.tokens, g.logprobs + m.logprobs, m.finished)
        versions[j] += [version] * len(m.tokens)
    return gens, versions


def correct_count(responses: Sequence[str], answers: Sequence[str | None], reward_fn: Callable | None = None,
                  rewards: Sequence[float] | None = None) -> tuple[int, int]:
    """(correct, counted) for an accuracy: with a reward function, the `rewards` it gave that count as correct
    (registry.correct: >= its correct_at, else its maximum), counted = all, or (0, 0) when it declares neither;
    without one, exact match against the answer on the rows that have one."""
    if reward_fn is not None:
        right = correct(reward_fn, rewards)
        return (0, 0) if right is None else (sum(right), len(right))
    pairs = [(r, a) for r, a in zip(responses, answers) if a is not None]
    return sum(r.strip() == str(a).strip() for r, a in pairs), len(pairs)


@dataclass
class EvalResult:
    accuracy: float | None
    reward: float | None
    response_len: float
    n: int
    samples: list[tuple[str, str, str | None]]  # (prompt, response, answer), first few

    def metrics(self, prefix: str = "eval/") -> dict[str, float | None]:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}reward": self.reward,
                f"{prefix}response_len": self.response_len}


def evaluate(model, tokenizer, examples: list[PromptExample], *, max_new_tokens: int,
             reward_fn: Callable | None = None, batch_size: int = 256, show: int = 3) -> EvalResult:
    """Greedy-decode every eval prompt; mean reward and accuracy (see correct_count: the reward function's
    success when there is one, else exact match where answers exist); the first `show` samples kept."""
    engine = GenerationEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, batch_size)
    gens = engine.generate([e.prompt_ids for e in examples], SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    responses = [decode_response(tokenizer, g.tokens) for g in gens]
    answers = [e.answer for e in examples]
    reward, r = None, None
    if reward_fn is not None:
        r = compute_rewards(reward_fn, [e.prompt_text for e in examples], responses, answers)
        reward = sum(r) / len(r)
    right, counted = correct_count(responses, answers, reward_fn, r)
    return EvalResult(
        accuracy=right / counted if counted else None,
        reward=reward,
        response_len=sum(len(g.tokens) for g in gens) / max(1, len(gens)),
        n=len(examples),
        samples=[(e.prompt_text, r, e.answer) for e, r in zip(examples[:show], responses[:show])],
    )
