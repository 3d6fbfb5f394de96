"""Multi-turn rollouts: episodes of [model turn, tool observation]* against an environment (reflow.envs).

Turns are batched across episodes: round k decodes the k-th turn of every episode still running in one
`GenerationEngine.generate` call (each episode with its own context and budget), then calls `env.step` on
every new message at once in a thread pool, so a round costs one batched decode plus the *slowest* tool call,
not the sum of them. `batched=False` runs one episode at a time instead (the baseline of bench/multiturn.py).

    context of episode i after round k:  prompt_i [+ reset obs] + m_i1 + o_i1 + ... + m_ik (+ o_ik if it goes on)
    budget of m_ik:                      min(max_turn_tokens, max_new_tokens - |m_i1| - ... - |m_i,k-1|)
    an episode ends when step says done, after max_turns turns, or when its max_new_tokens are spent;
    step is called on every message, the last one included (its observation is then dropped, so a sample
    always ends with a model token, where the score lands)

An episode's K/V is kept from one turn to the next (`KVStore`, keep_kv=True): a turn feeds only its new
tokens (the previous turn's last token and the observation) on top of them instead of prefilling the whole
context again; memory holds every running episode's context K/V between rounds.

Sampling is keyed: turn k of sample id s draws its noise from (seed_of(k), s, position in the turn), where
the caller's seed_of(k) mixes the run seed, the step and k; the tokens of an episode therefore do not depend
on which episodes share a round, in which order, on how many replicas split them, or on `batched`.

Tokens of the packed sample (`episodes_to_batch`), T_i = its length:
    input_ids [T_i]    the whole transcript
    action_mask [T_i]  1 on model-generated tokens only: tool observations are context, not actions (no loss)
    gen_logprobs [T_i] the sampler's log-probs on action tokens, 0 elsewhere
    env_rewards [T_i]  step's reward on the last token of its turn, 0 elsewhere
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from reflow.data.batch import SampleBatch
from reflow.envs.base import EnvError, check_step_result, describe_episode
from reflow.engines.generate import GenerationEngine, KVStore, SamplingParams
from reflow.rewards.registry import compute_rewards


@dataclass
class Limits:
    max_turns: int
    max_turn_tokens: int
    max_new_tokens: int  # model tokens of the whole episode
    max_obs_tokens: int  # an observation longer than this is cut (tool output can be unbounded)


@dataclass
class Episode:
    """One episode. `tokens` follow the prompt (and the reset observation, counted in `prompt_ids`)."""

    key: int  # the sample id: keys the sampling noise, names the episode in errors
    prompt_text: str
    prompt_ids: list[int]
    env: object
    tokens: list[int] = field(default_factory=list)
    action: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: dict[int, float] = field(default_factory=dict)  # index in `tokens` of a turn's last token -> reward
    messages: list[str] = field(default_factory=list)
    turns: int = 0
    generated: int = 0
    done: bool = False  # the env said done (else a limit ended it: `truncated`)
    finished: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.tokens

    @property
    def name(self) -> str:
        return describe_episode(self.key, self.prompt_text)


@dataclass
class RolloutTimes:
    generate_s: float = 0.0  # batched decoding
    tool_s: float = 0.0  # wall time of the env.step phases (waiting on tools)
    rounds: int = 0

    @property
    def tool_fraction(self) -> float:
        total = self.generate_s + self.tool_s
        return self.tool_s / total if total else 0.0


def _pool_map(pool: ThreadPoolExecutor | None, fn, items: list) -> list:
    return list(pool.map(fn, items)) if pool is not None and len(items) > 1 else [fn(x) for x in items]


def start_episodes(envs: Sequence[object], rows: Sequence[dict], prompt_ids: Sequence[list[int]],
                   keys: Sequence[int], tokenizer, spec: str, pool: ThreadPoolExecutor | None = None) -> list[Episode]:
    """One Episode per row: env.reset(row), whose observation (if any) is appended to the prompt."""
    eps = [Episode(int(k), str(r.get("prompt", "")), list(p), e) for e, r, p, k in zip(envs, rows, prompt_ids, keys)]

    def reset(args):
        ep, row = args
        try:
            obs = ep.env.reset(row)
        except Exception as e:
            raise EnvError(f"rollout.env {spec!r}: reset raised {type(e).__name__}: {e} on {ep.name}") from e
        if obs is not None and not isinstance(obs, str):
            raise EnvError(f"rollout.env {spec!r}: reset returned a {type(obs).__name__} on {ep.name}; "
                           "return the opening observation (str) or None")
        if obs:
            ep.prompt_ids = ep.prompt_ids + tokenizer.encode(obs, add_special_tokens=False)

    _pool_map(pool, reset, list(zip(eps, rows)))
    return eps


def run_round(engine: GenerationEngine, eps: list[Episode], params: SamplingParams, limits: Limits, tokenizer,
              seed: int, spec: str, pool: ThreadPoolExecutor | None, times: RolloutTimes,
              store: KVStore | None = None) -> None:
    """One turn of every running episode of `eps` (all of the same turn number): a batched decode, then the
    env steps concurrently; finished episodes are marked, the others get their observation. store: the
    episodes' K/V from their previous turn (continued, then replaced by this turn's; finished episodes' dropped)."""
    if not eps:
        return
    budgets = [min(limits.max_turn_tokens, limits.max_new_tokens - ep.generated) for ep in eps]
    t0 = time.perf_counter()
    gens = engine.generate([ep.context for ep in eps], params, None, budgets, keys=[ep.key for ep in eps], seed=seed,
                           kv_store=store)
    t1 = time.perf_counter()
    messages = []
    for ep, g in zip(eps, gens):
        ep.tokens += g.tokens
        ep.action += [1] * len(g.tokens)
        ep.logprobs += g.logprobs
        ep.generated += len(g.tokens)
        ep.turns += 1
        messages.append(tokenizer.decode(g.tokens, skip_special_tokens=True))
        ep.messages.append(messages[-1])

    def step(args):
        ep, msg = args
        try:
            result = ep.env.step(msg)
        except Exception as e:
            raise EnvError(f"rollout.env {spec!r}: step raised {type(e).__name__}: {e} on {ep.name}, "
                           f"turn {ep.turns}") from e
        return check_step_result(result, spec, ep.name)

    results = _pool_map(pool, step, list(zip(eps, messages)))
    times.generate_s += t1 - t0
    times.tool_s += time.perf_counter() - t1
    times.rounds += 1
    for ep, (obs, reward, done) in zip(eps, results):
        if reward and ep.tokens:
            last = len(ep.tokens) - 1
            ep.rewards[last] = ep.rewards.get(last, 0.0) + reward
        ep.done = done
        if done or ep.turns >= limits.max_turns or ep.generated >= limits.max_new_tokens:
            ep.finished = True
            if store is not None:
                store.drop(ep.key)
            continue
        obs_ids = tokenizer.encode(obs, add_special_tokens=False)[: limits.max_obs_tokens] if obs else []
        ep.tokens += obs_ids
        ep.action += [0] * len(obs_ids)
        ep.logprobs += [0.0] * len(obs_ids)


def run_episodes(engine: GenerationEngine, eps: list[Episode], params: SamplingParams, limits: Limits, tokenizer,
                 seed_of: Callable[[int], int], spec: str, *, batched: bool = True,
                 threads: int = 16, keep_kv: bool = True) -> RolloutTimes:
    """Play every episode to its end (in place). seed_of(k): the sampling seed of turn k (0-based).
    batched: every running episode's turn k in one round; else one episode after another.
    keep_kv: a turn continues from the K/V of the episode's previous turn, feeding only its new tokens (the
    last sampled token and the observation); else each turn prefills the whole context again."""
    times = RolloutTimes()
    store = KVStore() if keep_kv else None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        groups = [eps] if batched else [[ep] for ep in eps]
        for group in groups:
            turn = 0
            while True:
                live = [ep for ep in group if not ep.finished]
                if not live:
                    break
                run_round(engine, live, params, limits, tokenizer, seed_of(turn), spec, pool, times, store)
                turn += 1
    return times


def example_row(e) -> dict:
    """The dataset row an env's reset sees (e: a PromptExample): prompt, answer and the row's other columns."""
    return {**e.meta, "prompt": e.prompt_text, "answer": e.answer}


def greedy_episodes(engine: GenerationEngine, examples: Sequence, keys: Sequence[int], env_cls: type, spec: str,
                    limits: Limits, tokenizer, *, reward_fn: Callable | None = None,
                    threads: int = 16) -> tuple[list[Episode], list[float]]:
    """Greedy episodes of `examples` (PromptExample) against `env_cls` (evaluation): the finished episodes and
    each one's return, sum of its step rewards + reward_fn on the transcript after the prompt when given."""
    eps = start_episodes([env_cls() for _ in examples], [example_row(e) for e in examples],
                         [e.prompt_ids for e in examples], keys, tokenizer, spec)
    run_episodes(engine, eps, SamplingParams(limits.max_new_tokens, greedy=True), limits, tokenizer, lambda k: 0,
                 spec, threads=threads)
    returns = [sum(ep.rewards.values()) for ep in eps]
    if reward_fn is not None and eps:
        transcripts = [tokenizer.decode(ep.tokens, skip_special_tokens=True) for ep in eps]
        final = compute_rewards(reward_fn, [e.prompt_text for e in examples], transcripts, [e.answer for e in examples])
        returns = [x + y for x, y in zip(returns, final)]
    return eps, returns


def episodes_to_batch(eps: list[Episode], prompts: list[str], answers: list, group_ids: list[int], first_id: int,
                      tokenizer) -> SampleBatch:
    """Pack finished episodes (sample ids first_id, first_id + 1, ...) with the rollout keys plus `env_rewards`.

    tokens : input_ids, action_mask, gen_logprobs, env_rewards  [sum_i T_i]
    samples: group_id, prompt_len (prompt + reset observation), response_len (model tokens), truncated (a limit
             ended the episode, not the env), turns, env_return (sum of step rewards)
    meta   : prompt, response (the transcript after the prompt: messages and observations), answer
    """
    input_ids, action_mask, gen_lp, env_rw = [], [], [], []
    for ep in eps:
        p = len(ep.prompt_ids)
        input_ids.append(torch.tensor(ep.prompt_ids + ep.tokens, dtype=torch.long))
        action_mask.append(torch.tensor([0] * p + ep.action, dtype=torch.long))
        gen_lp.append(torch.tensor([0.0] * p + ep.logprobs, dtype=torch.float))
        r = torch.zeros(p + len(ep.tokens))
        for j, v in ep.rewards.items():
            r[p + j] = v
        env_rw.append(r)
    return SampleBatch.from_sequences(
        range(first_id, first_id + len(eps)),
        {"input_ids": input_ids, "action_mask": action_mask, "gen_logprobs": gen_lp, "env_rewards": env_rw},
        samples={
            "group_id": torch.tensor(group_ids, dtype=torch.long),
            "prompt_len": torch.tensor([len(ep.prompt_ids) for ep in eps], dtype=torch.long),
            "response_len": torch.tensor([ep.generated for ep in eps], dtype=torch.long),
            "truncated": torch.tensor([not ep.done for ep in eps]),
            "turns": torch.tensor([ep.turns for ep in eps], dtype=torch.long),
            "env_return": torch.tensor([sum(ep.rewards.values()) for ep in eps], dtype=torch.float),
        },
        meta={"prompt": list(prompts), "answer": list(answers),
              "response": [tokenizer.decode(ep.tokens, skip_special_tokens=True) for ep in eps]},
    )
