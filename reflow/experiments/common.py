"""Pieces shared by the experiments: prompt sampling, rollouts into SampleBatches, evaluation, set-up."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from reflow.data.batch import SampleBatch
from reflow.data.datasets import PromptExample
from reflow.engines.generate import Generation, GenerationEngine, SamplingParams
from reflow.rewards.registry import compute_rewards

log = logging.getLogger("reflow")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class PromptSampler:
    """Epoch-wise shuffled prompt order; its state (epoch, position) is saved with checkpoints."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            take = min(k - len(out), self.n - self.pos)
            out += self._order[self.pos:self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._order = self._make_order()


def decode_response(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def batch_from_generations(gens: list[Generation], examples: list[PromptExample], group_ids: list[int],
                           first_id: int, tokenizer) -> SampleBatch:
    """Pack generations (prompt + response) into a SampleBatch with the rollout keys.

    tokens : input_ids, action_mask (response), gen_logprobs (sampler's log-probs at action positions)
    samples: group_id, prompt_len, response_len, truncated (cut at max_new_tokens, no EOS)
    meta   : prompt, response, answer
    """
    input_ids, action_mask, gen_lp = [], [], []
    for g in gens:
        p, r = len(g.prompt_ids), len(g.tokens)
        input_ids.append(torch.tensor(g.prompt_ids + g.tokens, dtype=torch.long))
        action_mask.append(torch.tensor([0] * p + [1] * r, dtype=torch.long))
        gen_lp.append(torch.tensor([0.0] * p + g.logprobs, dtype=torch.float))
    return SampleBatch.from_sequences(
        range(first_id, first_id + len(gens)),
        {"input_ids": input_ids, "action_mask": action_mask, "gen_logprobs": gen_lp},
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


def exact_match_accuracy(responses: Sequence[str], answers: Sequence[str | None]) -> float | None:
    """Share of responses equal to the answer (whitespace-stripped); None if the data has no answers."""
    pairs = [(r, a) for r, a in zip(responses, answers) if a is not None]
    if not pairs:
        return None
    return sum(r.strip() == str(a).strip() for r, a in pairs) / len(pairs)


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
             reward_fn: Callable | None = None, batch_size: int = 256) -> EvalResult:
    """Greedy-decode every eval prompt; exact-match accuracy (when answers exist) and mean reward."""
    engine = GenerationEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, batch_size)
    gens = engine.generate([e.prompt_ids for e in examples], SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    responses = [decode_response(tokenizer, g.tokens) for g in gens]
    answers = [e.answer for e in examples]
    reward = None
    if reward_fn is not None:
        r = compute_rewards(reward_fn, [e.prompt_text for e in examples], responses, answers)
        reward = sum(r) / len(r)
    return EvalResult(
        accuracy=exact_match_accuracy(responses, answers),
        reward=reward,
        response_len=sum(len(g.tokens) for g in gens) / max(1, len(gens)),
        n=len(examples),
        samples=[(e.prompt_text, r, e.answer) for e, r in zip(examples[:3], responses[:3])],
    )


def grpovi_bounds(cfg, reward_fn) -> tuple[float, float] | None:
    """GRPOVI's reward bounds [low, high]: algo.grpovi_low/high, else the reward function's `reward_range`;
    None for other estimators. A ConfigError (before anything is loaded) when neither gives low < high."""
    from reflow.config.loader import ConfigError
    from reflow.rewards.registry import reward_range

    a = cfg.algo
    if a.estimator != "grpovi":
        return None
    declared = reward_range(reward_fn) if reward_fn is not None else None
    low = a.grpovi_low if a.grpovi_low is not None else (declared[0] if declared else None)
    high = a.grpovi_high if a.grpovi_high is not None else (declared[1] if declared else None)
    if low is None or high is None or not low < high:
        raise ConfigError("algo.adv_estimator=grpovi needs reward bounds: set algo.grpovi_low and "
                          "algo.grpovi_high (low < high), or give the reward function a reward_range attribute")
    return float(low), float(high)
