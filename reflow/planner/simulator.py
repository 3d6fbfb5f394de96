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

    iteration time = (end of the last iteration - end of the first) / (iterations - 1)

Sample data moving between workers: a call's inputs are the outputs of the calls producing its input keys,
held where reflow.runtime puts them (each generate replica's first rank returns its part; any other call
returns its whole output from its first rank), and every rank of the consumer fetches them whole. When
any of them is held on another rank than a consumer rank, the call pays hw.data_hop (a fetch from another
worker's object store, measured by `reflow profile`) plus the bytes, SAMPLE_BYTES_PER_TOKEN per token per
input call, at the link's bandwidth (the fetches of the ranks run in parallel):

    data(c) = data_hop + n_inputs x batch x (P + G) x SAMPLE_BYTES_PER_TOKEN / bw     (0 when all local)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reflow.planner.cost import CallCost, Workload, call_cost, fused_costs
from reflow.planner.hardware import GB, Hardware
from reflow.planner.memory import MemoryReport, plan_memory
from reflow.planner.models import ModelShape
from reflow.planner.realloc import ReallocCost, adapters_only, realloc_cost, realloc_cost_exact
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


@dataclass
class Evaluation:
    plan: Plan
    time: float  # steady-state seconds per iteration
    memory: MemoryReport
    call_times: dict[str, CallCost]
    realloc: dict[str, ReallocCost]
    timeline: list[Event]

    @property
    def feasible(self) -> bool:
        return self.memory.feasible

    @property
    def reason(self) -> str:
        return self.memory.reason

    def summary(self) -> str:
        mem = self.memory.max_peak() / GB
        head = f"{self.plan.name}: {self.time:.2f} s/iteration, peak {mem:.1f} GB/rank"
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


def data_cost(problem: Problem, plan: Plan, name: str) -> float:
    """Seconds call `name` spends fetching inputs from other workers (module docstring; 0 when every input
    is held on the call's only rank)."""
    g, hw, wl = problem.graph, problem.hw, problem.workload
    deps = g.deps[name]
    holders = set().union(*(output_holders(g.call(d).kind, plan.calls[d]) for d in deps)) if deps else set()
    ranks = plan.calls[name].ranks
    if not holders or all(holders == {r} for r in ranks):
        return 0.0
    bw, _ = hw.link(sorted(holders | set(ranks)))
    return hw.data_hop + len(deps) * wl.batch * wl.seq_len * SAMPLE_BYTES_PER_TOKEN / bw


def call_costs(problem: Problem, plan: Plan, memory: MemoryReport) -> tuple[dict[str, CallCost], dict[str, ReallocCost]]:
    """Every call's time and every reallocation (cached per call / placement / wave size)."""
    g = problem.graph
    trained = set(g.trained_roles())
    times: dict[str, CallCost] = {}
    reallocs: dict[str, ReallocCost] = {}
    for name in g.order:
        call = g.call(name)
        m = problem.models.get(call.weights)  # the weights it runs on (an update runs on another role's)
        pl = plan.calls[name]
        owner = _owner(problem, plan, call.weights)
        copy = m is not None and needs_copy(call.kind, pl, owner, call.weights in trained)
        sharded_owner = call.kind != "train" and not copy and call.weights in trained
        conc = memory.concurrency.get(name)
        key = ("call", name, pl, conc, sharded_owner)
        if key not in problem._cache:
            problem._cache[key] = call_cost(call.kind, m, pl, problem.hw, problem.workload, conc, sharded_owner)
        times[name] = problem._cache[key]
        data = data_cost(problem, plan, name)
        if data > 0:
            c = times[name]
            times[name] = CallCost(c.time + data, {**c.parts, "data": data})
        if copy:
            fn = realloc_cost_exact if problem.exact_realloc else realloc_cost
            reallocs[name] = fn(m, owner, pl, problem.hw, src_sharded=call.weights in trained)
            if m.lora_rank and call.weights in trained:  # the copy keeps its base: every step moves the adapters
                reallocs[name] = adapters_only(reallocs[name], m.trainable_fraction)
    if plan.fuse:  # the fused pair: one interleaved pipeline schedule instead of two one after the other
        a, b = plan.fuse
        times[a], times[b] = fused_costs(times[a], times[b], plan.calls[a].layout.p)
    return times, reallocs


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


def simulate(problem: Problem, plan: Plan, times: dict[str, CallCost], reallocs: dict[str, ReallocCost],
             iterations: int | None = None, barrier: bool | None = None) -> tuple[float, list[Event]]:
    """Schedule `iterations` iterations (rules in the module docstring); (iteration time, events)."""
    g = problem.graph
    iterations = max(1, iterations or problem.iterations)
    barrier = (problem.barrier if barrier is None else barrier) and not problem.staleness
    if problem.hw.cores_per_node:
        return simulate_shared(problem, plan, times, reallocs, iterations, barrier)
    free = [0.0] * plan.world_size
    role_end: dict[str, float] = {}
    events: list[Event] = []
    start_at = 0.0
    done: dict[int, dict[str, float]] = {}
    for it, name in issue_order(g, iterations, problem.staleness):
        if barrier and it > 0 and name == g.order[0]:  # the controller waited for iteration it - 1
            start_at = max(done[it - 1].values())
        call = g.call(name)
        pl = plan.calls[name]
        mine = done.setdefault(it, {})
        # a role's calls in order (asynchronously only the owner ranks' queues order them: a train call does
        # not wait for a later step's generation, only for the weights it sent)
        role_ready = 0.0 if problem.staleness else role_end.get(call.role, 0.0)
        ready = max([start_at, role_ready] + [mine[d] for d in g.deps[name]])
        r = reallocs.get(name)
        if r is not None and r.time > 0:
            owner = _owner(problem, plan, call.weights)
            ranks = tuple(sorted(set(pl.ranks) | set(owner.ranks)))
            t0 = max([ready] + [free[x] for x in ranks])
            t1 = t0 + r.time
            for x in ranks:
                free[x] = t1
            events.append(Event(it, f"{name}:reallocate", ranks, t0, t1))
            ready = t1
        t0 = max([ready] + [free[x] for x in pl.ranks])
        t1 = t0 + times[name].time
        for x in pl.ranks:
            free[x] = t1
        events.append(Event(it, name, pl.ranks, t0, t1))
        mine[name] = role_end[call.role] = t1
    ends = [max(done[it].values()) for it in range(iterations)]
    iter_time = ends[0] if len(ends) == 1 else (ends[-1] - ends[0]) / (len(ends) - 1)
    return iter_time, [e for e in events if e.iteration == iterations - 1]


def simulate_shared(problem: Problem, plan: Plan, times: dict[str, CallCost], reallocs: dict[str, ReallocCost],
                    iterations: int, barrier: bool) -> tuple[float, list[Event]]:
    """The same rules with devices that share cores (hw.cores_per_node: CPU workers on one machine).

    Tasks (calls and reallocations) are issued in the same order with the same dependencies, and a rank
    still runs its tasks in issue order; but a task's time is work at full speed, and while more ranks
    of a node are busy than it has cores, every busy rank progresses at cores / busy of its speed (a task
    on several ranks at the slowest of its nodes' rates). Event-driven: rates change when a task starts
    or ends."""
    g, hw = problem.graph, problem.hw
    cores = float(hw.cores_per_node)
    # tasks: (iteration, name, ranks, work, dependencies as task indices)
    tasks: list[tuple[int, str, tuple[int, ...], float, list[int]]] = []
    last_on_rank: dict[int, int] = {}
    role_last: dict[str, int] = {}
    iter_tasks: dict[int, list[int]] = {}
    idx_of: dict[int, dict[str, int]] = {}
    for it, name in issue_order(g, iterations, problem.staleness):
        this_iter = iter_tasks.setdefault(it, [])
        idx = idx_of.setdefault(it, {})
        prev_iter = iter_tasks.get(it - 1, [])
        call = g.call(name)
        pl = plan.calls[name]
        deps = [idx[d] for d in g.deps[name]]
        if call.role in role_last and not problem.staleness:
            deps.append(role_last[call.role])
        if barrier:
            deps += prev_iter
        r = reallocs.get(name)
        if r is not None and r.time > 0:
            owner = _owner(problem, plan, call.weights)
            ranks = tuple(sorted(set(pl.ranks) | set(owner.ranks)))
            tasks.append((it, f"{name}:reallocate", ranks, r.time, deps + [last_on_rank[x] for x in ranks
                                                                            if x in last_on_rank]))
            k = len(tasks) - 1
            for x in ranks:
                last_on_rank[x] = k
            this_iter.append(k)
            deps = [k]
        tasks.append((it, name, pl.ranks, times[name].time, deps + [last_on_rank[x] for x in pl.ranks
                                                                     if x in last_on_rank]))
        k = len(tasks) - 1
        for x in pl.ranks:
            last_on_rank[x] = k
        idx[name] = role_last[call.role] = k
        this_iter.append(k)
    n = len(tasks)
    left = [t[3] for t in tasks]
    start = [None] * n
    end: list[float | None] = [None] * n
    running: set[int] = set()
    now = 0.0
    waiting = list(range(n))
    while waiting or running:
        for k in list(waiting):  # start every task whose predecessors have ended
            if all(end[d] is not None for d in tasks[k][4]):
                waiting.remove(k)
                start[k] = now
                if left[k] <= 0:
                    end[k] = now
                else:
                    running.add(k)
        if not running:
            if waiting and not any(all(end[d] is not None for d in tasks[k][4]) for k in waiting):
                raise RuntimeError("simulator: tasks wait on each other")  # cannot happen: deps point backwards
            continue
        busy: dict[int, int] = {}
        for k in running:
            for x in tasks[k][2]:
                node = hw.node(x)
                busy[node] = busy.get(node, 0) + 1
        rate = {k: min(min(1.0, cores / busy[hw.node(x)]) for x in tasks[k][2]) for k in running}
        dt = min(left[k] / rate[k] for k in running)
        now += dt
        for k in list(running):
            left[k] -= dt * rate[k]
            if left[k] <= 1e-12 * max(1.0, tasks[k][3]):
                running.remove(k)
                end[k] = now
    ends = [max(end[k] for k in range(n) if tasks[k][0] == it) for it in range(iterations)]
    iter_time = ends[0] if len(ends) == 1 else (ends[-1] - ends[0]) / (len(ends) - 1)
    events = [Event(t[0], t[1], t[2], start[k], end[k]) for k, t in enumerate(tasks) if t[0] == iterations - 1]
    return iter_time, events


def evaluate(problem: Problem, plan: Plan) -> Evaluation:
    """Memory, call and reallocation costs, and the simulated iteration time of `plan`."""
    memory = plan_memory(problem.graph, plan, problem.models, problem.hw, problem.workload)
    times, reallocs = call_costs(problem, plan, memory)
    t, events = simulate(problem, plan, times, reallocs)
    return Evaluation(plan, t, memory, times, reallocs, events)
