"""Simulator: a plan's iteration time and per-rank peak memory, by scheduling the graph's calls on their
meshes for a few iterations.

Rules (those of reflow.runtime.executor and the workers):

    * calls are issued in the graph's order; a rank runs its tasks in issue order, so calls whose meshes
      overlap serialise in graph order and calls on disjoint meshes overlap in time
    * a call starts when its inputs are ready (the calls producing them have ended), its role's previous
      call has ended (within an iteration; and a role's first call of iteration i+1 after its last call
      of iteration i), and every rank it needs is free
    * a generate / infer call that needs a copy of its role's weights (reflow.runtime.plan.needs_copy) first
      reallocates them: a task on the owner's ranks and the call's ranks together (time from
      planner.realloc), then the call
    * barrier=True (the controller's behaviour: it waits for all of a step's tasks): iteration i+1 starts
      when iteration i has ended; barrier=False lets the next iteration's calls start as soon as the rules
      above allow (steady state measured over the last iterations)

    * asynchronous training (staleness k > 0, reflow.experiments.rl): the graph's rollout phase of iteration
      i + k is issued before the train phase of iteration i, so generation of later steps overlaps training
      of earlier ones where their ranks differ; there is no barrier between iterations (only the issue order)

    * inter-stage fusion (Problem.inter_stage, with no staleness): a generate call with per-sample consumers
      (reflow.runtime.executor.streamed) runs as its segments, one per chunk, and each consumer as its chunk
      tasks, submitted with the generate call in the controller's order; a chunk task waits for its segment
      (not the whole call) and, on a reallocated copy, the first one for the reallocation (reflow.planner.stream)

    iteration time = (end of the last iteration - end of the first) / (iterations - 1); asynchronously, the
    rollouts of the first k + 1 iterations are issued before the first ends and the last k iterations are
    train phases alone, so the rate is taken over iterations 0 .. n - 1 - k (each with one rollout and one
    train phase), with at least k + 3 iterations simulated

Sample data moving between workers: a call's inputs are the outputs of the calls producing its input keys,
held where reflow.runtime puts them (each generate replica's first rank returns its part; any other call
returns its whole output from its first rank), and every rank of the consumer fetches them whole. When
any of them is held on another rank than a consumer rank, the call pays hw.data_hop (a fetch from another
worker's object store, measured by `reflow profile`) plus the bytes, SAMPLE_BYTES_PER_TOKEN per token per
input call, at the link's bandwidth (the fetches of the ranks run in parallel):

    data(c) = data_hop + n_inputs x batch x (P + G) x SAMPLE_BYTES_PER_TOKEN / bw     (0 when all local)

(G: the mean response length, Workload.mean_gen; a consumer's chunk task moves its chunk's samples.)

Both schedulers take the same tasks (the calls, reallocations and chunks above, each with the tasks it waits
for: its inputs, its role's previous call, the previous task on each of its ranks, and with the barrier the
previous iteration): `simulate` starts each at the end of the last of them (devices that compute
independently), `simulate_shared` slows tasks down while more ranks of a node are busy than it has cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from reflow.planner.cost import CallCost, Workload, call_cost, fused_costs
from reflow.planner.hardware import GB, Hardware
from reflow.planner.memory import MemoryReport, plan_memory
from reflow.planner.models import ModelShape
from reflow.planner.realloc import ReallocCost, adapters_only, realloc_cost, realloc_cost_exact
from reflow.planner.stream import build_stream
from reflow.runtime.executor import streamed
from reflow.runtime.plan import needs_copy
from reflow.runtime.graph import Graph
from reflow.runtime.plan import Placement, Plan


@dataclass
class Problem:
    """What a plan is evaluated for: the graph, each role's model (None: no model, e.g. a reward
    function), the hardware, the workload and the number of devices."""

    graph: Graph
    models: dict[str, ModelShape | None]
    hw: Hardware
    workload: Workload
    world_size: int
    exact_realloc: bool = False  # byte counts from plan_reallocation (small models) instead of the analytic ones
    barrier: bool = True
    iterations: int = 3
    staleness: int = 0  # rollout.max_staleness: the rollout phase of iteration i + k is issued before the train phase of i
    fuse: bool = True  # the search fuses two roles' train calls placed on the same ranks with p >= 2 (plan `fuse`)
    inter_stage: bool = False  # fusion.inter_stage: generate calls stream chunks of `chunk` samples to their consumers
    chunk: int = 8  # fusion.chunk: samples per chunk per generation replica
    migrate: bool = False  # fusion.migrate_below > 0: generate calls need dXt1p1 (plan search keeps them there)
    _cache: dict = field(default_factory=dict, repr=False)

    def model_configs(self) -> dict:
        return {r: m.config for r, m in self.models.items() if m is not None and m.config is not None}


@dataclass
class Event:
    iteration: int
    name: str  # a call, or "<call>:reallocate"
    ranks: tuple[int, ...]
    start: float
    end: float
    chunk: int | None = None  # the segment of a streamed generate call / the chunk task of a consumer


@dataclass
class Evaluation:
    plan: Plan
    time: float  # steady-state seconds per iteration
    memory: MemoryReport
    call_times: dict[str, CallCost]
    realloc: dict[str, ReallocCost]
    timeline: list[Event]
    stream_chunk: int | None = None  # samples per chunk when generate calls stream (fusion.inter_stage), else None

    @property
    def feasible(self) -> bool:
        return self.memory.feasible

    @property
    def reason(self) -> str:
        return self.memory.reason

    def summary(self) -> str:
        mem = self.memory.max_peak() / GB
        fusion = f", inter-stage fusion (chunk {self.stream_chunk})" if self.stream_chunk else ""
        head = f"{self.plan.name}: {self.time:.2f} s/iteration{fusion}, peak {mem:.1f} GB/rank"
        return head + ("" if self.feasible else f"  [over memory: {self.reason}]")

    def table(self, graph: Graph) -> str:
        lines = [f"{'call':<14} {'placement':<22} {'realloc s':>9} {'call s':>9}  parts"]
        for name in graph.order:
            c, r = self.call_times[name], self.realloc.get(name)
            parts = ", ".join(f"{k} {v:.2f}" for k, v in c.parts.items() if isinstance(v, float) and v >= 0.005)
            lines.append(f"{name:<14} {str(self.plan.calls[name]):<22} {(r.time if r else 0):>9.2f} {c.time:>9.2f}  {parts}")
        return "\n".join(lines)


def _owner(problem: Problem, plan: Plan, role: str) -> Placement:
    return plan.owner(problem.graph, role)


SAMPLE_BYTES_PER_TOKEN = 16  # a producer's per-token output: token ids (int64) and a float per token


def output_holders(kind: str, pl: Placement) -> set[int]:
    """The ranks holding a call's output in the runtime: the first rank of each generate replica (layout
    coordinates: replica r starts at ranks[r * t]), or the call's first rank for the other kinds."""
    if kind == "generate":
        return {pl.ranks[r * pl.layout.t] for r in range(pl.layout.d)}
    return {pl.ranks[0]}


def data_cost(problem: Problem, plan: Plan, name: str, wl: Workload | None = None) -> float:
    """Seconds call `name` spends fetching inputs from other workers (module docstring; 0 when every input
    is held on the call's only rank); wl: the samples it fetches (default the problem's batch)."""
    g, hw, wl = problem.graph, problem.hw, wl or problem.workload
    deps = g.deps[name]
    holders = set().union(*(output_holders(g.call(d).kind, plan.calls[d]) for d in deps)) if deps else set()
    ranks = plan.calls[name].ranks
    if not holders or all(holders == {r} for r in ranks):
        return 0.0
    bw, _ = hw.link(sorted(holders | set(ranks)))
    return hw.data_hop + len(deps) * wl.batch * wl.mean_seq_len * SAMPLE_BYTES_PER_TOKEN / bw


def call_costs(problem: Problem, plan: Plan, memory: MemoryReport) -> tuple[dict[str, CallCost], dict[str, ReallocCost]]:
    """Every call's time and every reallocation (cached per call / placement / wave size)."""
    g = problem.graph
    trained = set(g.trained_roles())
    times: dict[str, CallCost] = {}
    reallocs: dict[str, ReallocCost] = {}
    on_owner: dict[str, bool] = {}  # a generate / infer call on the FSDP-sharded owner copy of a trained role
    for name in g.order:
        call = g.call(name)
        m = problem.models.get(call.weights)  # the weights it runs on (an update runs on another role's)
        pl = plan.calls[name]
        owner = _owner(problem, plan, call.weights)
        copy = m is not None and needs_copy(call.kind, pl, owner, call.weights in trained)
        sharded_owner = on_owner[name] = call.kind != "train" and not copy and call.weights in trained
        conc = memory.concurrency.get(name)
        key = ("call", name, pl, conc, sharded_owner)
        if key not in problem._cache:
            problem._cache[key] = call_cost(call.kind, m, pl, problem.hw, problem.workload, conc, sharded_owner)
        times[name] = problem._cache[key]
        data = data_cost(problem, plan, name)
        if data > 0:
            c = times[name]
            times[name] = dataclasses.replace(c, time=c.time + data, parts={**c.parts, "data": data})
        if copy:
            fn = realloc_cost_exact if problem.exact_realloc else realloc_cost
            reallocs[name] = fn(m, owner, pl, problem.hw, src_sharded=call.weights in trained)
            if m.lora_rank and call.weights in trained:  # the copy keeps its base: every step moves the adapters
                reallocs[name] = adapters_only(reallocs[name], m.trainable_fraction)
    if plan.fuse:  # the fused pair: one interleaved pipeline schedule instead of two one after the other
        a, b = plan.fuse
        times[a], times[b] = fused_costs(times[a], times[b], plan.calls[a].layout.p)
    if streaming(problem):
        for gen, users in streamed(g, g.order).items():
            _stream_costs(problem, plan, gen, users, times, on_owner)
    return times, reallocs


def streaming(problem: Problem) -> bool:
    """Whether generate calls stream to their consumers: fusion.inter_stage (refused with staleness)."""
    return problem.inter_stage and not problem.staleness


def _stream_costs(problem: Problem, plan: Plan, gen: str, users: list[str], times: dict[str, CallCost],
                  on_owner: dict[str, bool]) -> None:
    """Cut the generate call `gen` into its chunks' segments and its consumers into chunk tasks (stream.py):
    times[gen].stream, and each consumer's time the sum over its chunk tasks (as the runtime reports it).
    on_owner: call -> whether it runs on the FSDP-sharded owner copy (call_costs)."""
    g, wl = problem.graph, problem.workload

    started: set[str] = set()

    def cost(name: str, lengths: list[int]) -> float:
        """A chunk task: the call on its samples (of their mean length) and fetching them. The call's fixed
        cost (hw.call_overhead: set-up, batch packing) is paid by its first chunk; a later one pays the
        hand-over of one more task (hw.dispatch) instead. (build_stream asks in submission order.)"""
        pl, mean = plan.calls[name], sum(lengths) / len(lengths)
        first = name not in started
        started.add(name)
        part = dataclasses.replace(wl, batch=len(lengths), gen_lens=(mean,))
        key = ("chunk", name, pl, len(lengths), mean, on_owner[name], wl, first)
        if key not in problem._cache:  # (the data hop depends on where the generate call runs: not cached)
            call, hw = g.call(name), problem.hw
            fixed = 0.0 if first else hw.call_overhead - (hw.dispatch or hw.call_overhead)
            problem._cache[key] = call_cost(call.kind, problem.models.get(call.weights), pl, hw, part, None,
                                            on_owner[name]).time - fixed
        return problem._cache[key] + data_cost(problem, plan, name, part)

    stream = build_stream(times[gen], plan.calls[gen].layout.d, problem.chunk,
                          {n: plan.calls[n].layout.d for n in users}, cost)
    times[gen] = dataclasses.replace(times[gen], stream=stream,
                                     parts={**times[gen].parts, "chunks": float(len(stream.segments))})
    for n in users:
        mine = [t for c, _, t in stream.chunks if c == n]
        times[n] = CallCost(sum(mine), {"chunks": float(len(mine))})


def issue_order(g: Graph, iterations: int, staleness: int = 0) -> list[tuple[int, str]]:
    """(iteration, call) in the order the executor submits them: iteration by iteration, or asynchronously
    (staleness k) the rollout phase of iteration i + k before the train phase of iteration i."""
    if staleness == 0:
        return [(it, n) for it in range(iterations) for n in g.order]
    rollout, train = g.phases()
    out = [(it, n) for it in range(min(staleness, iterations)) for n in rollout]
    for it in range(iterations):
        if it + staleness < iterations:
            out += [(it + staleness, n) for n in rollout]
        out += [(it, n) for n in train]
    return out


@dataclass
class Task:
    """One task of the schedule: a call, a reallocation, a streamed generate call's segment or a consumer's
    chunk; work: seconds at full speed; deps: indices of the tasks it waits for."""

    iteration: int
    name: str
    ranks: tuple[int, ...]
    work: float
    deps: list[int]
    chunk: int | None = None


def tasks(problem: Problem, plan: Plan, times: dict[str, CallCost], reallocs: dict[str, ReallocCost],
          iterations: int, barrier: bool) -> list[Task]:
    """The tasks of `iterations` iterations in issue order, with their dependencies (module docstring)."""
    g = problem.graph
    out: list[Task] = []
    last_on_rank: dict[int, int] = {}
    role_last: dict[str, int] = {}
    barrier_deps: dict[int, list[int]] = {}  # iteration -> the last task on each rank before it
    idx_of: dict[int, dict[str, int]] = {}
    consumers = {n for c in times.values() if c.stream is not None for n, _, _ in c.stream.chunks}
    calls = {n: g.call(n) for n in g.order}  # (Graph.call looks a call up by scanning)

    def add(it: int, name: str, ranks: tuple[int, ...], work: float, deps: list[int], chunk: int | None = None) -> int:
        out.append(Task(it, name, ranks, work, deps + [last_on_rank[x] for x in ranks if x in last_on_rank], chunk))
        k = len(out) - 1
        for x in ranks:
            last_on_rank[x] = k
        return k

    def call_deps(it: int, name: str, inputs: list[int]) -> list[int]:
        """A call's inputs, its role's previous call and the barrier; its reallocation (then what it waits for).
        Asynchronously only the owner ranks' queues order a role's calls: a train call does not wait for a
        later step's generation, only for the weights it sent."""
        call = calls[name]
        deps = list(inputs)
        if call.role in role_last and not problem.staleness:
            deps.append(role_last[call.role])
        if barrier:
            deps += barrier_deps[it]
        r = reallocs.get(name)
        if r is not None and r.time > 0:
            owner = _owner(problem, plan, call.weights)
            ranks = tuple(sorted(set(plan.calls[name].ranks) | set(owner.ranks)))
            deps = [add(it, f"{name}:reallocate", ranks, r.time, deps)]
        return deps

    for it, name in issue_order(g, iterations, problem.staleness):
        if it not in barrier_deps:  # the previous iteration has ended when the last task on every rank has
            barrier_deps[it] = sorted(set(last_on_rank.values()))
        idx = idx_of.setdefault(it, {})
        if name in consumers:  # issued with its generate call
            continue
        call, pl, cost = calls[name], plan.calls[name], times[name]
        before = dict(role_last)
        deps = call_deps(it, name, [idx[d] for d in g.deps[name]])
        if cost.stream is None:
            idx[name] = role_last[call.role] = add(it, name, pl.ranks, cost.time, deps)
            continue
        segs = []
        for k, t in enumerate(cost.stream.segments):
            segs.append(add(it, name, pl.ranks, t, deps if k == 0 else [], chunk=k))
        idx[name] = role_last[call.role] = segs[-1]
        started: dict[str, int] = {}  # consumer -> chunk tasks so far
        for n, k, t in cost.stream.chunks:
            role = calls[n].role
            if n not in started:  # its role's previous call before the stream (actor_inf does not wait for
                role_last.pop(role, None)  # actor_gen to end); its reallocation
                if role in before:
                    role_last[role] = before[role]
                deps = call_deps(it, n, [segs[k]])
            else:
                deps = [segs[k]]
            idx[n] = role_last[role] = add(it, n, plan.calls[n].ranks, t, deps, chunk=started.get(n, 0))
            started[n] = started.get(n, 0) + 1
    return out


def _iteration_time(ts: list[Task], end: list[float], iterations: int, staleness: int = 0) -> float:
    """The steady-state time per iteration (module docstring)."""
    ends = [max(end[k] for k in range(len(ts)) if ts[k].iteration == it) for it in range(iterations)]
    last = len(ends) - 1 - staleness
    return ends[0] if last < 1 else (ends[last] - ends[0]) / last


def _events(ts: list[Task], start: list[float], end: list[float], iterations: int) -> list[Event]:
    return [Event(t.iteration, t.name, t.ranks, start[k], end[k], t.chunk) for k, t in enumerate(ts)
            if t.iteration == iterations - 1]


def simulate(problem: Problem, plan: Plan, times: dict[str, CallCost], reallocs: dict[str, ReallocCost],
             iterations: int | None = None, barrier: bool | None = None) -> tuple[float, list[Event]]:
    """Schedule `iterations` iterations (rules in the module docstring); (iteration time, events)."""
    iterations = max(1, iterations or problem.iterations)
    if problem.staleness:  # enough iterations for a steady state between the first k and the last k
        iterations = max(iterations, problem.staleness + 3)
    barrier = (problem.barrier if barrier is None else barrier) and not problem.staleness
    ts = tasks(problem, plan, times, reallocs, iterations, barrier)
    if problem.hw.cores_per_node:
        return simulate_shared(problem, ts, iterations)
    start: list[float] = []
    end: list[float] = []
    for t in ts:  # deps point backwards: every task starts when the last it waits for has ended
        start.append(max((end[d] for d in t.deps), default=0.0))
        end.append(start[-1] + t.work)
    return _iteration_time(ts, end, iterations, problem.staleness), _events(ts, start, end, iterations)


def simulate_shared(problem: Problem, ts: list[Task], iterations: int) -> tuple[float, list[Event]]:
    """The same tasks on devices that share cores (hw.cores_per_node: CPU workers on one machine).

    A task's work is its time at full speed, and while more ranks of a node are busy than it has cores,
    every busy rank progresses at cores / busy of its speed (a task on several ranks at the slowest of its
    nodes' rates). Event-driven: rates change when a task starts or ends."""
    hw = problem.hw
    cores = float(hw.cores_per_node)
    n = len(ts)
    left = [t.work for t in ts]
    start: list[float] = [0.0] * n
    end: list[float | None] = [None] * n
    running: set[int] = set()
    now = 0.0
    waiting = list(range(n))
    while waiting or running:
        for k in list(waiting):  # start every task whose predecessors have ended
            if all(end[d] is not None for d in ts[k].deps):
                waiting.remove(k)
                start[k] = now
                if left[k] <= 0:
                    end[k] = now
                else:
                    running.add(k)
        if not running:
            if waiting and not any(all(end[d] is not None for d in ts[k].deps) for k in waiting):
                raise RuntimeError("simulator: tasks wait on each other")  # cannot happen: deps point backwards
            continue
        busy: dict[int, int] = {}
        for k in running:
            for x in ts[k].ranks:
                node = hw.node(x)
                busy[node] = busy.get(node, 0) + 1
        rate = {k: min(min(1.0, cores / busy[hw.node(x)]) for x in ts[k].ranks) for k in running}
        dt = min(left[k] / rate[k] for k in running)
        now += dt
        for k in list(running):
            left[k] -= dt * rate[k]
            if left[k] <= 1e-12 * max(1.0, ts[k].work):
                running.remove(k)
                end[k] = now
    return _iteration_time(ts, end, iterations, problem.staleness), _events(ts, start, end, iterations)


def evaluate(problem: Problem, plan: Plan) -> Evaluation:
    """Memory, call and reallocation costs, and the simulated iteration time of `plan`."""
    memory = plan_memory(problem.graph, plan, problem.models, problem.hw, problem.workload)
    times, reallocs = call_costs(problem, plan, memory)
    t, events = simulate(problem, plan, times, reallocs)
    chunk = problem.chunk if any(c.stream is not None for c in times.values()) else None
    return Evaluation(plan, t, memory, times, reallocs, events, chunk)
