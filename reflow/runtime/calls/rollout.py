"""generate: the actor decodes responses for the step's prompts (`meta["prompts"]`: dataset indices).

Sample ids: step s with P prompts x n samples numbers its samples s*P*n .. (s+1)*P*n - 1, and the samples
of prompt j form group s*P*n + j. Data-parallel replicas take contiguous shares of the samples; keyed
sampling makes every sample's tokens a pure function of (run seed, step, sample id), so the share a replica
gets changes nothing. A group's n samples are n rows with the same prompt tokens, which the engine prefills once
(GenerationEngine share_prefill: it matches rows by token content, so a group split over replicas or refills
is still right, and prompts repeated across groups share too). samples["policy_version"]: the number of updates
the generating weights had seen when the sample started; tokens["versions"]: that number for each response
token (-1 on the prompt). With `options["greedy"]` one greedy response per prompt is decoded instead, keyed by
its group (`ids` = the group ids): ReMax's baseline, spread over the group's samples by the consumer.

Partial rollout (rollout.partial, meta["segment"] = (j, n)): the step's generation is cut into n segments,
one per weight update it spans; segment j decodes every unfinished sample up to segment_budget(j, n) response
tokens with the weights of meta["version"], the later segments continuing the previous segment's samples
(their input batch) from their tokens so far (`continue_generations`).

generate_episodes: the same samples as multi-turn episodes against rollout.env (reflow/engines/multiturn.py),
turn k of sample s keyed by (run seed, step, k) and s, so replicas and batching change nothing here either.
"""

from __future__ import annotations

import torch

from reflow.data.batch import SampleBatch
from reflow.engines.generate import Generation, GenerationEngine, SamplingParams, sample_seed
from reflow.engines.multiturn import Limits, episodes_to_batch, example_row, run_episodes, start_episodes
from reflow.engines.rollout import batch_from_generations, continue_generations, generations_from_batch
from reflow.envs import load_env
from reflow.runtime.calls import CallContext, register_call, register_stream
from reflow.runtime.migrate import Migration

ROLLOUT_FIELDS = ("input_ids", "action_mask", "gen_logprobs", "versions", "group_id", "prompt_len", "response_len",
                  "truncated", "policy_version", "prompt", "response", "answer")
# what a multi-turn rollout (rollout.env) adds: per-turn rewards on the turns' last tokens, turns per episode,
# the sum of the env's rewards
EPISODE_FIELDS = ("env_rewards", "turns", "env_return")


def replica_share(n: int, ctx) -> tuple[int, int]:
    """[a, b): the contiguous share of n items of this rank's data-parallel replica."""
    d, k = (1, 0) if ctx is None else (ctx.layout.d, ctx.dp_rank)
    size = -(-n // d)
    return min(n, k * size), min(n, (k + 1) * size)


def _samples(cc: CallContext, n: int) -> tuple[list, list[int], list[int]]:
    """(examples, group ids, sample ids) of the step's P prompts x n samples (see the module docstring)."""
    prompt_idx = cc.meta["prompts"]
    examples = [cc.data.train_prompts[i] for i in prompt_idx for _ in range(n)]
    # DAPO's dynamic sampling generates up to R rounds per step: round k numbers its samples after round k-1's
    rounds = cc.cfg.algo.dynamic_sampling_rounds if cc.cfg.algo.dynamic_sampling else 1
    first_id = (cc.step * rounds + cc.meta.get("round", 0)) * len(prompt_idx) * cc.cfg.rollout.n
    groups = [first_id + j // n for j in range(len(examples))]
    return examples, groups, list(range(first_id, first_id + len(examples)))


def _generation(cc: CallContext):
    """What this replica decodes: (its examples, group ids and sample ids, sampling params, engine)."""
    cfg, r = cc.cfg, cc.cfg.rollout
    greedy = bool(cc.call.options.get("greedy"))
    examples, groups, ids = _samples(cc, 1 if greedy else r.n)
    ids = groups if greedy else ids
    a, b = replica_share(len(examples), cc.ctx)
    params = SamplingParams(r.max_new_tokens, greedy=True) if greedy else \
        SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k)
    engine = GenerationEngine(cc.model, [cc.tokenizer.eos_token_id], cc.tokenizer.pad_token_id, r.batch_size)
    return examples[a:b], groups[a:b], ids[a:b], params, engine


def _part(cc: CallContext, gens: list, examples: list, groups: list[int], ids: list[int],
          versions: list[list[int]] | None = None, started: torch.Tensor | None = None) -> SampleBatch | None:
    """Generations (gens[i] of examples[g.index]) -> this replica's part, in sample-id order; None on ranks that
    return nothing (all but the first tensor-parallel rank of a replica). `versions`: each generation's
    per-token policy versions (default: every token by this call's version, meta["version"], the updates
    applied to the weights); `started`: the version each sample started with, in sample-id order (default: this
    call's)."""
    version = cc.meta.get("version", cc.step)
    if versions is None:
        versions = [[version] * len(g.tokens) for g in gens]
    order = sorted(range(len(gens)), key=lambda i: ids[gens[i].index])
    gens, versions = [gens[i] for i in order], [versions[i] for i in order]
    at = [g.index for g in gens]
    part = batch_from_generations(gens, [examples[i] for i in at], [groups[i] for i in at], [ids[i] for i in at],
                                  cc.tokenizer, versions)
    if started is None:
        started = torch.full((len(part),), version)
    part.with_samples(policy_version=started.to(torch.long))
    tp_first = cc.ctx is None or cc.ctx.tp_rank == 0
    return part if tp_first and len(part) else None


@register_call("generate")
def generate(cc: CallContext, batch: SampleBatch | None) -> SampleBatch | None:
    examples, groups, ids, params, engine = _generation(cc)
    version = cc.meta.get("version", cc.step)
    j, n = cc.meta.get("segment", (0, 1))
    if j == 0:  # the samples start here
        gens = [Generation(i, list(e.prompt_ids), [], [], False) for i, e in enumerate(examples)]
        versions: list[list[int]] = [[] for _ in gens]
    else:  # this replica's share of the samples the previous segment left
        gens, versions = generations_from_batch(batch.select(ids)) if ids else ([], [])
    gens, versions = continue_generations(engine, gens, versions, segment_budget(params.max_new_tokens, j, n),
                                          version, params, ids, sample_seed(cc.cfg.seed, cc.step))
    started = batch.select(ids).samples["policy_version"] if j else None
    return _part(cc, gens, examples, groups, ids, versions, started)  # one part per replica


@register_stream("generate")
def generate_chunks(cc: CallContext, batch: SampleBatch | None, chunk: int):
    """`generate`, streamed -> (the number of samples this rank returns, an iterator of its parts): parts of
    `chunk` samples in the order they finish (the last may be smaller), each in sample-id order. Keyed sampling
    makes every sample the same as under `generate`. With fusion.migrate_below the replicas move their long tail
    onto fewer replicas (reflow/runtime/migrate.py): a replica then returns fewer or more samples than it said
    (the batch's total is the same), and the timeline gets a slice `<call>:migrate` on each replica that took
    part, with the sample ids it sent and received."""
    examples, groups, ids, params, engine = _generation(cc)
    tp_first = cc.ctx is None or cc.ctx.tp_rank == 0
    migration = _migration(cc, len(examples))
    greedy = bool(cc.call.options.get("greedy"))

    def steer(unfinished, take):
        rows = migration(unfinished, take)
        if rows:  # adopted rows are engine rows len(examples) + j: give them their examples, groups and ids
            every, every_groups, every_ids = _samples(cc, 1 if greedy else cc.cfg.rollout.n)
            at = {k: j for j, k in enumerate(every_groups if greedy else every_ids)}  # sampling key -> sample
            for h in rows:
                examples.append(every[at[h.key]])
                groups.append(every_groups[at[h.key]])
                ids.append(h.key)
        return rows

    def parts():
        done = []
        stream = engine.stream([e.prompt_ids for e in examples], params, None, keys=ids,
                               seed=sample_seed(cc.cfg.seed, cc.step),
                               steer=None if migration is None else steer) if examples else iter(())
        for g in stream:
            done.append(g)
            if len(done) == chunk:
                yield _part(cc, done, examples, groups, ids)
                done = []
        if migration is not None:
            migration.finish()
            if migration.joined:
                cc.record("migrate", *migration.joined, sent=migration.sent, received=migration.received)
        if done:
            yield _part(cc, done, examples, groups, ids)

    return (len(examples) if tp_first else 0), parts()


def _migration(cc: CallContext, rows: int) -> Migration | None:
    """This replica's part in long-tail migration (fusion.migrate_below), or None: off, or a single replica."""
    below = getattr(getattr(cc.cfg, "fusion", None), "migrate_below", 0)
    if not below or cc.ctx is None or cc.ctx.layout.d == 1:
        return None
    batch = len(cc.meta["prompts"]) * (1 if cc.call.options.get("greedy") else cc.cfg.rollout.n)
    store = Migration.store_for(cc.worker.store, cc.call.name, cc.step, cc.meta.get("round", 0))
    return Migration(store, cc.ctx.dp_rank, cc.ctx.layout.d, batch, rows, below, cc.cfg.rollout.batch_size)


def segment_budget(max_new_tokens: int, j: int, n: int) -> int:
    """Response tokens a sample may have after segment j of n of a partial rollout: ceil(max_new_tokens (j+1) / n),
    max_new_tokens after the last."""
    return -(-max_new_tokens * (j + 1) // n)


@register_call("generate_episodes")
def generate_episodes(cc: CallContext, batch: SampleBatch | None) -> SampleBatch | None:
    """Multi-turn rollouts against rollout.env (reflow/engines/multiturn.py): the step's P x n episodes, this
    replica's contiguous share, turn k of sample s keyed by (run seed, step, k) and s. Writes the rollout
    fields plus EPISODE_FIELDS, and `score` = 0 when the graph asks it to (no reward.fn or reward.model: the
    env's rewards are the whole reward). Reports time/env_tool_fraction: the share of the rollout's wall time spent
    in env.step rounds."""
    cfg, step, tok, r = cc.cfg, cc.step, cc.tokenizer, cc.cfg.rollout
    examples, groups, ids = _samples(cc, r.n)
    a, b = replica_share(len(examples), cc.ctx)
    mine = examples[a:b]
    env_cls = env_class(r.env)
    eps = start_episodes([env_cls() for _ in mine], [example_row(e) for e in mine], [e.prompt_ids for e in mine],
                         ids[a:b], tok, r.env)
    engine = GenerationEngine(cc.model, turn_end_ids(tok, r.turn_end), tok.pad_token_id, r.batch_size)
    times = run_episodes(engine, eps, SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k),
                         episode_limits(r), tok, lambda k: sample_seed(cfg.seed, step, k), r.env,
                         threads=r.env_threads)
    part = episodes_to_batch(eps, [e.prompt_text for e in mine], [e.answer for e in mine], groups[a:b],
                             ids[a] if b > a else 0, tok)
    version = cc.meta.get("version", step)
    part.with_samples(policy_version=torch.full((len(part),), version, dtype=torch.long))
    part.with_tokens(versions=torch.where(part.tokens["action_mask"].bool(), version, -1))
    if "score" in cc.call.outputs:
        part.with_samples(score=torch.zeros(len(part)))
    tp_first = cc.ctx is None or cc.ctx.tp_rank == 0
    if tp_first:  # partial sums over replicas: the share of rollout wall time spent waiting on env.step
        cc.metrics["time/env_tool_fraction"] = [times.tool_s, times.tool_s + times.generate_s]
    return part if tp_first and len(part) else None


_ENV_CLASSES: dict[str, type] = {}


def env_class(spec: str) -> type:
    """rollout.env's class, loaded once per process (loading a file executes it)."""
    if spec not in _ENV_CLASSES:
        _ENV_CLASSES[spec] = load_env(spec)
    return _ENV_CLASSES[spec]


def episode_limits(r) -> Limits:
    return Limits(max_turns=r.max_turns, max_turn_tokens=r.max_turn_tokens or r.max_new_tokens,
                  max_new_tokens=r.max_new_tokens, max_obs_tokens=r.max_obs_tokens)


def turn_end_ids(tok, turn_end: str | None) -> list[int]:
    """The tokens that end a model turn: EOS, and rollout.turn_end when it is set (it must be one token)."""
    ids = [tok.eos_token_id]
    if turn_end is not None:
        enc = tok.encode(turn_end, add_special_tokens=False)
        if len(enc) != 1:
            from reflow.config.loader import ConfigError

            raise ConfigError(f"rollout.turn_end={turn_end!r} is {len(enc)} tokens for this tokenizer; it must be "
                              "exactly one (e.g. a newline, or a special token of the model)")
        ids += enc
    return ids
