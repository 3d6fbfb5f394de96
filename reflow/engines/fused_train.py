"""Fused training of two pipelined models on the same ranks (RLHFuse intra-stage fusion): one optimizer step of
each, their micro-batches' forwards and backwards interleaved by a checked schedule (parallel/fused.py).

    jobs = {"actor": (actor_engine, actor_batch, actor_loss), "critic": (critic_engine, critic_batch, critic_loss)}
    stats = fused_train_step(jobs, spec, schedule)          # {"actor": {...}, "critic": {...}}

The actor's layout has stage s on rank ranks[s], the critic's stage s on ranks[p - 1 - s] (its layout built
on the reversed rank list), so each rank runs one stage of each. Each model's gradients, and so its
update and stats, equal those of its own `TrainEngine.step`: its micro-batches, normaliser and backwards
are the same, only their order interleaves with the other model's.
"""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from reflow.algorithms.aggregation import Norm
from reflow.data.batch import SampleBatch
from reflow.engines.train import NonFiniteError, TrainEngine
from reflow.parallel.fused import FusedSpec, Slot, check_schedule, rank_orders


def fused_train_step(jobs: dict[str, tuple[TrainEngine, SampleBatch, Callable] | tuple[TrainEngine, SampleBatch,
                                                                                     Callable, Norm | None]],
                     spec: FusedSpec | None,
                     schedule: list[Slot] | Callable[[int], tuple[FusedSpec, list[Slot], float | None]],
                     memory_limit: float | None = None) -> dict[str, dict[str, float]]:
    """One optimizer step of every model in `jobs` (its whole mini-batch on every rank, as `step` takes it, and
    optionally its loss normaliser), run in `schedule`'s order on this rank; returns each model's stats. A
    non-finite step (on_nonfinite="stop") raises its NonFiniteError with `.models`: the models whose step was.
    `schedule` may be a function of the micro-batch count M -> (spec, schedule, memory limit) (spec then None):
    the schedule for the M the models cut their batches into, checked under its limit."""
    if spec is not None:
        check_schedule(schedule, spec, memory_limit)  # before any compute: deadlock, message order, memory
    stages, forwards, totals, where, cuts = {}, {}, {}, {}, {}
    for name, (engine, batch, loss_fn, *norm) in jobs.items():
        stage = getattr(engine.model, "_reflow_stage", None)
        p = spec.p if spec is not None else stage.p if stage is not None else 0
        if stage is None or stage.p != p or p < 2:
            raise ValueError(f"fused training: model '{name}' must be pipelined with p={p} (layout dXtYp{p})")
        engine.model.train()
        norm, part, key, shared = engine.norm_and_part(batch, norm[0] if norm else None, None, False)
        totals[name] = {}
        cuts[name], forwards[name] = engine.pipeline_forward(stage, part, loss_fn, norm, key, totals[name], "loss",
                                                             shared)
        stages[name] = stage
    if spec is None:
        spec, schedule, memory_limit = schedule(len(next(iter(cuts.values()))))
        check_schedule(schedule, spec, memory_limit)
    if set(jobs) != set(spec.ranks):
        raise ValueError(f"fused schedule is for models {sorted(spec.ranks)}, got jobs for {sorted(jobs)}")
    for name, mbs in cuts.items():
        stage = stages[name]
        if len(mbs) != spec.m:
            raise ValueError(f"fused schedule is for M={spec.m} micro-batches but model '{name}' cut its batch into "
                             f"{len(mbs)}; build the schedule for M={len(mbs)} or change micro_batch_tokens")
        for s, r in enumerate(spec.ranks[name]):  # schedule rank r -> global rank
            if where.setdefault(r, stage.ranks[s]) != stage.ranks[s]:
                raise ValueError(f"fused training: stage {s} of '{name}' runs on rank {stage.ranks[s]}, the schedule "
                                 f"puts it with rank {where[r]}; build the critic's layout on the reversed rank list")
        stage.start_step()
    me = next(r for r, g in where.items() if g == dist.get_rank())
    order = rank_orders(schedule, spec.p)[me]
    last_b = {op.model: i for i, op in enumerate(order) if op.kind == "B"}
    for i, op in enumerate(order):
        stage = stages[op.model]
        if op.kind == "F":
            stage.hold(op.mb, forwards[op.model](op.mb))
        else:
            stage.backward_one(op.mb, last=i == last_b[op.model])
    for stage in stages.values():
        stage.outbox.wait()
    out, bad = {}, {}
    for name in jobs:  # every model's step ends (its collectives run on every rank), then a non-finite one raises
        try:
            out[name] = jobs[name][0].finish_step(totals[name])
        except NonFiniteError as e:
            bad[name] = e
    if bad:  # one error for the pair; with both non-finite its message names each model's values
        error = next(iter(bad.values())) if len(bad) == 1 else \
            NonFiniteError("; ".join(f"{name}: {e}" for name, e in bad.items()))
        error.models = tuple(bad)  # which models' steps were non-finite: the runtime names their calls
        raise error
    return out
