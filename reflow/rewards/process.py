"""Process reward models (PRMs) at training time: score each step of a response, refine, place on tokens.

A PRM is either
  - a function `prm(prompts, responses, steps) -> list[list[float]]` (one score per step of each response;
    `steps[i]` is the list of step texts of response i), loaded like a reward function, or
  - a reward-model folder (AutoModelForSequenceClassification, 1 label) whose head is read at the last
    token of every step.
The refined step rewards (reflow.algorithms.process_rewards) land on each step's last token, so only
token-level estimators (gae, reinforce++) see them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from reflow.algorithms.process_rewards import clip_refine, delta_refine, place_step_rewards, split_steps, step_end_tokens
from reflow.data.batch import SampleBatch
from reflow.models.packing import backbone_and_head, hidden_states
from reflow.rewards.registry import compute_step_scores, load_reward_fn


def response_char_offsets(tokenizer, tokens: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) character offsets of each response token in decode(tokens, skip_special_tokens=True).

    Built by decoding growing prefixes (O(L^2) characters, fine for the response lengths of RL); a byte
    token in the middle of a multi-byte character gets an empty span and the character goes to its last byte.
    """
    out, prev = [], 0
    for i in range(len(tokens)):
        cur = len(tokenizer.decode(list(tokens[: i + 1]), skip_special_tokens=True))
        cur = max(cur, prev)
        out.append((prev, cur))
        prev = cur
    return out


def refine(step_rewards: torch.Tensor, mode: str, eta: float) -> torch.Tensor:
    if mode in ("clip", "clip+delta"):
        step_rewards = clip_refine(step_rewards, eta)
    if mode in ("delta", "clip+delta"):
        step_rewards = delta_refine(step_rewards)
    return step_rewards


class ProcessReward:
    """A PRM at training time. `load_fn(spec)` gives the function of a function spec: by default loaded in this
    process; the worker passes one that gives a RewardSandbox where reward.sandbox says so (then `errors` is the
    number of samples of the last batch that failed and got 0.0 at every step)."""

    def __init__(self, spec: str, *, refine_mode: str, eta: float, sep: str, coef: float, load_model: Callable,
                 load_fn: Callable | None = None):
        self.spec, self.refine_mode, self.eta, self.sep, self.coef = spec, refine_mode, eta, sep, coef
        self.fn = self.model = self.errors = None
        if Path(spec).is_dir():
            self.model = load_model(spec).eval().requires_grad_(False)
        elif load_fn is not None:
            self.fn = load_fn(spec)
        else:
            self.fn = load_reward_fn(spec, keywords=("prompts", "responses", "steps"))

    def close(self) -> None:
        close = getattr(self.fn, "close", None)
        if close is not None:
            close()

    def token_rewards(self, batch: SampleBatch, tokenizer) -> torch.Tensor:
        """[T] refined, scaled step rewards on each step's last token of each response (0 elsewhere)."""
        responses = batch.meta["response"]
        gen_tokens = [ids[int(p):] for ids, p in zip(batch.unpack("input_ids"), batch.samples["prompt_len"])]
        spans, ends = [], []
        for text, toks in zip(responses, gen_tokens):
            s = split_steps(text, self.sep)
            spans.append(s)
            ends.append(step_end_tokens(response_char_offsets(tokenizer, toks.tolist()), s) if s else [])
        scores = self._score(batch, responses, spans, ends)
        refined = [refine(torch.tensor(sc, dtype=torch.float), self.refine_mode, self.eta) * self.coef
                   for sc in scores]
        return place_step_rewards(refined, ends, batch.seqlens, batch.tokens["action_mask"])

    def _score(self, batch, responses, spans, ends) -> list[list[float]]:
        if self.model is not None:
            _, head = backbone_and_head(self.model)
            with torch.no_grad():
                hidden = hidden_states(self.model, batch, "padded")
            starts = batch.offsets[:-1] + batch.samples["prompt_len"]
            return [head(hidden[(starts[i] + torch.tensor(e, dtype=torch.long))]).float()[:, 0].tolist() if e else []
                    for i, e in enumerate(ends)]
        steps = [[text[a:b] for a, b in s] for text, s in zip(responses, spans)]
        if hasattr(self.fn, "score_steps"):  # a RewardSandbox
            scores, self.errors = self.fn.score_steps(batch.meta["prompt"], responses, steps)
            return scores
        return compute_step_scores(self.fn, batch.meta["prompt"], responses, steps)
