"""Fused actor + critic pipeline schedules (RLHFuse intra-stage fusion): two models trained on the same p ranks,
the critic's stages in reverse rank order, so one pipeline's bubbles fill with the other's work.

    actor  stage s on rank s            activations flow rank 0 -> p-1, gradients back
    critic stage s on rank p - 1 - s    activations flow rank p-1 -> 0 (Chimera's bidirectional layout)

A schedule is a list of `Slot(slot, rank, Op(model, mb, kind, stage))`: op `kind` ("F" forward, "B" backward)
of micro-batch `mb` of `model`'s stage `stage` starts on `rank` at time `slot` (in units where a forward
takes f[model] and a backward b[model]). What a rank runs is its ops in slot order (`rank_orders`).

`check_schedule` proves a schedule runnable before anything runs, under the runtime's message rules
(sends never wait, receives block, messages of one model between two ranks arrive in the order sent):
every op present once, on its stage's rank; no two ops of a rank overlap; every op starts after the ops
it needs end (F of stage s after F of stage s-1, B of stage s after B of stage s+1 and its own F); the
per-rank orders run to the end without deadlock and every receive gets the micro-batch it expects; a
rank never holds more activations than `memory_limit` (sum of act[model] over micro-batches forwarded and
not yet backwarded). A violation raises ScheduleError naming the slot, the rank and the op.

`search_fused` finds a schedule: a greedy list scheduler (a free rank starts the ready op, backwards
first, forwards only while its memory allows) gives the start; simulated annealing then moves single ops
within a rank's order, re-timing every candidate with `timeline` (as soon as possible for those orders)
and keeping it only if it passes the checks, minimizing the makespan. Its lower bound (RLHFuse):

    lower_bound = max( max_model (M + p - 1)(f + b),  sum_model M (f + b) )     (per rank: each rank runs one
                                                                                  stage of each model)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from reflow.parallel.schedules import stage_order


class ScheduleError(ValueError):
    """A schedule that would deadlock, receive the wrong message or exceed memory; names the slot."""


@dataclass(frozen=True)
class Op:
    model: str
    mb: int
    kind: str  # "F" | "B"
    stage: int

    def __str__(self) -> str:
        return f"{self.model} {self.kind}{self.mb} (stage {self.stage})"


@dataclass(frozen=True)
class Slot:
    slot: int
    rank: int
    op: Op


@dataclass(frozen=True)
class FusedSpec:
    """Two (or more) pipelines on the same p ranks: `ranks[model][s]` runs stage s of model; M micro-batches
    each; f / b: forward / backward time of one micro-batch on one stage; act: activations one micro-batch
    leaves on a stage until its backward (any unit, the unit of the memory limit)."""

    p: int
    m: int
    ranks: dict[str, tuple[int, ...]]
    f: dict[str, int] = field(default_factory=dict)
    b: dict[str, int] = field(default_factory=dict)
    act: dict[str, float] = field(default_factory=dict)

    @classmethod
    def actor_critic(cls, p: int, m: int, f=(1, 1), b=(2, 2), act=(1.0, 1.0)) -> "FusedSpec":
        """Actor stages on ranks 0..p-1, critic stages on p-1..0."""
        return cls(p, m, {"actor": tuple(range(p)), "critic": tuple(reversed(range(p)))},
                   {"actor": f[0], "critic": f[1]}, {"actor": b[0], "critic": b[1]},
                   {"actor": act[0], "critic": act[1]})

    def duration(self, op: Op) -> int:
        return (self.f if op.kind == "F" else self.b)[op.model]

    def rank_of(self, op: Op) -> int:
        return self.ranks[op.model][op.stage]

    def ops(self) -> list[Op]:
        return [Op(model, j, kind, s) for model in self.ranks for s in range(self.p) for j in range(self.m)
                for kind in ("F", "B")]

    def needs(self, op: Op) -> list[Op]:
        """Ops that must end before `op` starts (the message it receives, and its own forward)."""
        if op.kind == "F":
            return [Op(op.model, op.mb, "F", op.stage - 1)] if op.stage > 0 else []
        out = [Op(op.model, op.mb, "F", op.stage)]
        if op.stage < self.p - 1:
            out.append(Op(op.model, op.mb, "B", op.stage + 1))
        return out

    def lower_bound(self) -> int:
        one = max((self.m + self.p - 1) * (self.f[k] + self.b[k]) for k in self.ranks)
        return max(one, sum(self.m * (self.f[k] + self.b[k]) for k in self.ranks))


def rank_orders(schedule: list[Slot], p: int) -> list[list[Op]]:
    """Each rank's ops in the order it runs them (by slot)."""
    orders: list[list[Slot]] = [[] for _ in range(p)]
    for s in schedule:
        orders[s.rank].append(s)
    return [[s.op for s in sorted(o, key=lambda s: s.slot)] for o in orders]


def _run_orders(orders: list[list[Op]], spec: FusedSpec, memory_limit: float | None,
                slots: dict[Op, int] | None = None) -> tuple[list[Slot], int]:
    """Execute the per-rank orders under the message rules, each op as soon as its rank is free and its inputs
    have ended: (schedule, makespan). Raise ScheduleError on a deadlock, a receive of the wrong micro-batch
    or a memory overflow (naming the slot from `slots`, else the position in the rank's order)."""
    pos, free = [0] * spec.p, [0] * spec.p
    end: dict[Op, int] = {}
    channels: dict[tuple, list[int]] = {}  # (src, dst, model, kind) -> micro-batches sent, not yet received
    live = [0.0] * spec.p
    out: list[Slot] = []

    def at(r: int) -> str:
        return f"slot {slots[orders[r][pos[r]]]}" if slots else f"position {pos[r]}"

    total = sum(len(o) for o in orders)
    while len(out) < total:
        progressed = False
        for r in range(spec.p):
            while pos[r] < len(orders[r]):
                op = orders[r][pos[r]]
                if op.kind == "B" and Op(op.model, op.mb, "F", op.stage) not in end:
                    raise ScheduleError(f"{at(r)}: rank {r} runs {op} before its forward")
                src_stage = op.stage - 1 if op.kind == "F" else op.stage + 1
                if 0 <= src_stage < spec.p:  # receives an activation (F) or a gradient (B)
                    queue = channels.get((spec.ranks[op.model][src_stage], r, op.model, op.kind), [])
                    if not queue:
                        break  # blocks until the sender gets there
                    if queue[0] != op.mb:
                        raise ScheduleError(f"{at(r)}: rank {r} runs {op} but the next {op.model} "
                                            f"{'activation' if op.kind == 'F' else 'gradient'} from rank "
                                            f"{spec.ranks[op.model][src_stage]} is micro-batch {queue[0]}'s")
                    queue.pop(0)
                live[r] += spec.act.get(op.model, 1.0) * (1 if op.kind == "F" else -1)
                if memory_limit is not None and live[r] > memory_limit + 1e-9:
                    raise ScheduleError(f"{at(r)}: rank {r} runs {op} and would hold {live[r]:g} of activations, "
                                        f"over the limit {memory_limit:g}")
                dst_stage = op.stage + 1 if op.kind == "F" else op.stage - 1
                if 0 <= dst_stage < spec.p:  # sends never wait
                    channels.setdefault((r, spec.ranks[op.model][dst_stage], op.model, op.kind), []).append(op.mb)
                start = max([free[r]] + [end[n] for n in spec.needs(op)])
                end[op] = free[r] = start + spec.duration(op)
                out.append(Slot(start, r, op))
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = [r for r in range(spec.p) if pos[r] < len(orders[r])]
            raise ScheduleError("deadlock: " + "; ".join(f"rank {r} at {at(r)} waits to run {orders[r][pos[r]]}"
                                                         for r in stuck))
    return sorted(out, key=lambda s: (s.slot, s.rank)), max(end.values(), default=0)


def check_schedule(schedule: list[Slot], spec: FusedSpec, memory_limit: float | None = None) -> None:
    """Raise ScheduleError (naming the slot) unless `schedule` is complete, well timed, deadlock-free, receives
    every message in order and keeps each rank under `memory_limit`."""
    seen: dict[Op, Slot] = {}
    for s in schedule:
        if s.op in seen:
            raise ScheduleError(f"slot {s.slot}: {s.op} is scheduled twice (also at slot {seen[s.op].slot})")
        if s.rank != spec.rank_of(s.op):
            raise ScheduleError(f"slot {s.slot}: {s.op} is on rank {s.rank}, but that stage lives on rank "
                                f"{spec.rank_of(s.op)}")
        seen[s.op] = s
    missing = [op for op in spec.ops() if op not in seen]
    if missing:
        raise ScheduleError(f"the schedule leaves out {len(missing)} op(s), e.g. {missing[0]}")
    slots = {op: s.slot for op, s in seen.items()}
    orders = rank_orders(schedule, spec.p)
    _run_orders(orders, spec, memory_limit, slots)  # deadlock, message order, memory (in run order)
    for r, order in enumerate(orders):
        for a, b in zip(order, order[1:]):
            if slots[b] < slots[a] + spec.duration(a):
                raise ScheduleError(f"slot {slots[b]}: rank {r} starts {b} while {a} (slot {slots[a]}) still runs")
    for op, s in slots.items():
        for need in spec.needs(op):
            if s < slots[need] + spec.duration(need):
                raise ScheduleError(f"slot {s}: rank {spec.rank_of(op)} starts {op} before {need} ends "
                                    f"(slot {slots[need] + spec.duration(need)})")


def timeline(orders: list[list[Op]], spec: FusedSpec) -> tuple[list[Slot], int]:
    """(schedule, makespan): every op of the per-rank `orders` as soon as its rank is free and its inputs have
    ended (ScheduleError if the orders cannot run)."""
    return _run_orders(orders, spec, None)


def sequential_1f1b(spec: FusedSpec) -> tuple[list[Slot], int]:
    """The unfused reference: each model's 1F1B pipeline, one model after the other (its own call)."""
    orders: list[list[Op]] = [[] for _ in range(spec.p)]
    for model, ranks in spec.ranks.items():
        for s, r in enumerate(ranks):
            orders[r] += [Op(model, j, kind, s) for kind, j in stage_order("1f1b", s, spec.p, spec.m)]
    return timeline(orders, spec)


def greedy(spec: FusedSpec, memory_limit: float | None = None) -> list[list[Op]]:
    """List scheduling: at each time a free rank starts a ready op (its inputs ended, the previous micro-batch
    of the same model, stage and kind started, so messages arrive in order), backwards before forwards and
    forwards only within its memory; returns the per-rank orders."""
    todo = {r: [op for op in spec.ops() if spec.rank_of(op) == r] for r in range(spec.p)}
    started: dict[Op, int] = {}
    free = [0] * spec.p
    live = [0.0] * spec.p
    orders: list[list[Op]] = [[] for _ in range(spec.p)]
    t = 0
    while any(todo.values()):
        for r in range(spec.p):
            if free[r] > t:
                continue
            ready = [op for op in todo[r]
                     if all(n in started and started[n] + spec.duration(n) <= t for n in spec.needs(op))
                     and (op.mb == 0 or Op(op.model, op.mb - 1, op.kind, op.stage) in started)
                     and (op.kind == "B" or memory_limit is None
                          or live[r] + spec.act.get(op.model, 1.0) <= memory_limit + 1e-9)]
            if not ready:
                continue
            # backwards first (they free memory); then the model with more work left on this rank
            left = {k: sum(1 for o in todo[r] if o.model == k) for k in spec.ranks}
            op = min(ready, key=lambda o: (o.kind != "B", -left[o.model], o.mb))
            started[op] = t
            free[r] = t + spec.duration(op)
            live[r] += spec.act.get(op.model, 1.0) * (1 if op.kind == "F" else -1)
            todo[r].remove(op)
            orders[r].append(op)
        nxt = [f for f in free if f > t]
        if not nxt:
            if any(todo.values()):
                raise ScheduleError(f"no schedule under the memory limit {memory_limit:g}: at time {t} every rank "
                                    "waits (raise the limit to at least one micro-batch of each model per rank)")
            break
        t = min(nxt)
    return orders


def search_fused(spec: FusedSpec, memory_limit: float | None = None, iters: int = 2000,
                 seed: int = 0) -> tuple[list[Slot], int]:
    """(schedule, makespan) of the best schedule found (greedy start, simulated annealing over single-op
    moves within a rank's order); the result has passed `check_schedule`."""
    rng = random.Random(seed)
    cur = greedy(spec, memory_limit)
    best_sched, best = timeline(cur, spec)
    cur_cost = best
    temp0 = max(1.0, 0.05 * best)
    for k in range(iters):
        r = rng.randrange(spec.p)
        if len(cur[r]) < 2:
            continue
        i, j = rng.randrange(len(cur[r])), rng.randrange(len(cur[r]))
        if i == j:
            continue
        trial = [list(o) for o in cur]
        trial[r].insert(j, trial[r].pop(i))
        try:
            sched, cost = _run_orders(trial, spec, memory_limit)
        except ScheduleError:
            continue
        temp = temp0 * (1 - k / iters) + 1e-9
        if cost <= cur_cost or rng.random() < math.exp((cur_cost - cost) / temp):
            cur, cur_cost = trial, cost
            if cost < best:
                best_sched, best = sched, cost
    check_schedule(best_sched, spec, memory_limit)
    return best_sched, best


def search_fused_in_memory(spec: FusedSpec, iters: int = 300, seed: int = 0) -> tuple[list[Slot], int, float | None]:
    """(schedule, makespan, memory limit) of `search_fused` under the smallest per-rank limit of p, 2p, 4p, ...
    activations (p: what 1F1B holds on its first stage) for which the greedy start finds a schedule (its
    backwards-first rule can fill every rank with forwards whose backwards wait on each other); no limit once
    it reaches every micro-batch of every model, where greedy always runs."""
    limit = float(spec.p)
    whole = sum(spec.m * spec.act.get(k, 1.0) for k in spec.ranks)
    while limit < whole:
        try:
            return (*search_fused(spec, memory_limit=limit, iters=iters, seed=seed), limit)
        except ScheduleError:
            limit *= 2
    return (*search_fused(spec, memory_limit=None, iters=iters, seed=seed), None)


def bubble_fractions(schedule: list[Slot], spec: FusedSpec) -> list[float]:
    """Per rank: idle time / makespan."""
    span = max(s.slot + spec.duration(s.op) for s in schedule)
    busy = [0] * spec.p
    for s in schedule:
        busy[s.rank] += spec.duration(s.op)
    return [1 - b / span for b in busy]


def picture(schedule: list[Slot], spec: FusedSpec) -> str:
    """The schedule as text, one line per rank, two characters per time unit: the first model's forward /
    backward of micro-batch j as Fj / Bj, the second's as fj / bj, idle as '..'."""
    span = max(s.slot + spec.duration(s.op) for s in schedule)
    first = next(iter(spec.ranks))
    rows = [[".."] * span for _ in range(spec.p)]
    for s in schedule:
        cell = f"{s.op.kind if s.op.model == first else s.op.kind.lower()}{s.op.mb % 10}"
        for t in range(s.slot, s.slot + spec.duration(s.op)):
            rows[s.rank][t] = cell
    return "\n".join(f"rank {r}: {' '.join(row)}" for r, row in enumerate(rows))
