"""Plan search: simulated annealing over a mesh and a layout per call, scored by the simulator.

The search space:

    groups    the train calls of a role share one placement (its owner copy); every other call is a
              group of its own
    meshes    contiguous rank ranges of a power-of-2 size s, aligned to s: inside one node when
              s < devices per node, whole nodes otherwise; and all devices
    layouts   every dXtYpZ with d t p = mesh size that the role's model allows (t divides the heads,
              KV heads and intermediate size; p <= layers), t <= devices per node (tensor parallel
              stays on NVLink), p = 1 for generation; d only for a role without a model

Moves (a group picked uniformly): another mesh with a random layout (30%), another layout on the same
mesh (30%), the placement of another group of the same role (15%: removes a reallocation; for a train
group also another role's pipelined train placement: the two then fuse), the same
layout on a neighbouring mesh of the same size (10%), the mesh halved or doubled (15%).

Fusion: when the two trained roles' train calls land on the same ranks with the same layout of p >= 2 stages,
the plan fuses them (`fuse: [a, b]`, the second's stages reversed; cost.py's fused_costs); Problem.fuse=False
turns this off.

Inter-stage fusion (fusion.inter_stage, fusion.chunk; planner/stream.py): with a response-length distribution
(Workload.gen_lens) and a graph whose generate call has per-sample consumers, the setting is one more
coordinate of the state: off, or on with a chunk of FUSION_CHUNKS (and the configured one) samples. A move
picks another setting (10% of the moves), the coordinate descent tries each, and the result says which was
chosen (SearchResult.fusion, with the plan's time under every setting). Without a distribution every response
ends at the last step, nothing can overlap, and the configured setting is kept.

Annealing: cost(plan) = simulated iteration time, times (2 + GB over memory) for plans that do not fit
(so the chain can walk out of them; only plans that fit are ever returned). A move from cost c to c' is
taken when c' <= c or with probability exp(-(c' - c) / (T c)), T falling geometrically from 0.1 to 0.001
over the steps of a chain. The first chains start from the built-in plans with their layouts tuned
(coordinate descent over each group's layouts; also reported, with the built-in plans as they are, for
comparison), the later ones from the best plan so far, polished by the same coordinate descent. A plan
replaces the best one only when it is faster by more than a relative 1e-9 (ties keep the earlier plan, so a
built-in plan the search cannot beat comes back as it is rather than as an equivalent permutation). Everything is driven by random.Random(seed): the same seed gives the same plan.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import dataclasses

from reflow.parallel.layout import Layout
from reflow.planner.hardware import GB
from reflow.planner.simulator import Evaluation, Problem, evaluate
from reflow.runtime.executor import streamed
from reflow.runtime.plan import BUILTIN, Placement, Plan, reversed_stages

FUSION = "(fusion)"  # the state's key of the fusion setting (inter_stage, chunk); group keys are calls or roles
FUSION_CHUNKS = (4, 8, 16, 32)  # chunk sizes the search tries with inter-stage fusion on


# ---------------------------------------------------------------------------------------------- space
def candidate_meshes(world_size: int, per_node: int) -> list[tuple[int, ...]]:
    """Contiguous, size-aligned power-of-2 rank ranges (inside a node, or whole nodes), and all ranks."""
    out: list[tuple[int, ...]] = []
    s = 1
    while s <= world_size:
        for k in range(world_size // s):
            lo, hi = k * s, (k + 1) * s
            within = lo // per_node == (hi - 1) // per_node
            whole_nodes = lo % per_node == 0 and s % per_node == 0
            if within or whole_nodes:
                out.append(tuple(range(lo, hi)))
        s *= 2
    everyone = tuple(range(world_size))
    if everyone not in out:
        out.append(everyone)
    return out


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(size: int, model, kind: str, per_node: int, migrate: bool = False) -> list[Layout]:
    """Every layout of `size` ranks valid for the model (see the module docstring); `migrate`: long-tail
    migration (fusion.migrate_below) moves rows between generate replicas of one rank each, so t = 1 there."""
    if model is None:
        return [Layout(size, 1, 1)]
    heads = model.heads
    kv = model.kv_heads
    inter = model.intermediate
    layers = model.layers
    out = []
    for t in _divisors(size):
        if heads % t or kv % t or inter % t or t > per_node or (migrate and kind == "generate" and t > 1):
            continue
        for p in _divisors(size // t):
            if p > layers or (kind == "generate" and p > 1):
                continue
            out.append(Layout(size // (t * p), t, p))
    return out


@dataclass
class Group:
    name: str
    role: str
    kind: str  # "train", or the call's kind
    calls: list[str]
    model: object
    layouts: dict[int, list[Layout]] = field(default_factory=dict)  # mesh size -> valid layouts
    meshes: list[tuple[int, ...]] = field(default_factory=list)  # meshes with at least one valid layout


def make_groups(problem: Problem) -> list[Group]:
    g = problem.graph
    per_node = problem.hw.devices_per_node
    meshes = candidate_meshes(problem.world_size, per_node)
    out: dict[str, Group] = {}
    trained = set(g.trained_roles())
    for name in g.order:
        call = g.call(name)
        key = f"{call.role}:train" if call.kind == "train" else name
        if call.kind == "update":  # it changes its role's weights in place: it goes where they live
            key = f"{call.role}:train" if call.role in trained else g.roles[call.role][0]
        if key not in out:
            out[key] = Group(key, call.role, call.kind, [], problem.models.get(call.role))
        out[key].calls.append(name)
    for grp in out.values():
        for mesh in meshes:
            n = len(mesh)
            if n not in grp.layouts:
                grp.layouts[n] = candidate_layouts(n, grp.model, grp.kind, per_node, problem.migrate)
            if grp.layouts[n]:
                grp.meshes.append(mesh)
    return list(out.values())


def to_plan(problem: Problem, groups: list[Group], state: dict[str, Placement], name: str) -> Plan:
    calls = {}
    for grp in groups:
        for c in grp.calls:
            calls[c] = state[grp.name]
    plan = Plan(name, problem.world_size, {c: calls[c] for c in problem.graph.order})
    return fuse_train_calls(problem, plan) if problem.fuse else plan


def fuse_train_calls(problem: Problem, plan: Plan) -> Plan:
    """`plan` with its two trained roles' train calls fused (plan key `fuse`) when each role has one train call,
    both on the same ranks with the same layout of p >= 2 stages: the second call's stages reversed, and its
    role's calls placed like it too (they stay on its owner copy). Otherwise `plan` itself."""
    g = problem.graph
    if "fuse_pair" not in problem._cache:  # (first, second train call, the second's role's calls) or None
        train = [[c for c in g.roles[r] if g.call(c).kind == "train"] for r in g.trained_roles()]
        pair = None
        if len(train) == 2 and all(len(t) == 1 for t in train):
            a, b = sorted((train[0][0], train[1][0]), key=g.order.index)
            pair = a, b, set(g.roles[g.call(b).role])
        problem._cache["fuse_pair"] = pair
    if problem._cache["fuse_pair"] is None:
        return plan
    a, b, role_calls = problem._cache["fuse_pair"]
    pa, pb = plan.calls[a], plan.calls[b]
    if pa.layout.p < 2 or pa.layout != pb.layout or pa.ranks != pb.ranks:
        return plan
    flipped = Placement(reversed_stages(pa.ranks, pa.layout.p), pb.layout, pb.schedule)
    calls = {c: (flipped if c in role_calls and pl == pb else pl) for c, pl in plan.calls.items()}
    return Plan(plan.name, plan.world_size, calls, (a, b))


def from_plan(groups: list[Group], plan: Plan) -> dict[str, Placement]:
    return {grp.name: plan.calls[grp.calls[0]] for grp in groups}


def fusion_options(problem: Problem) -> list[tuple[bool, int]]:
    """The fusion settings (inter_stage, chunk) the search chooses from, off first (kept on a tie): only the
    configured one without a length distribution, with asynchronous training, or with nothing to stream."""
    if problem.workload.gen_lens is None or problem.staleness or not streamed(problem.graph, problem.graph.order):
        return [(problem.inter_stage, problem.chunk)]
    return [(False, problem.chunk)] + [(True, c) for c in sorted({problem.chunk, *FUSION_CHUNKS})]


def with_fusion(problem: Problem, fusion: tuple[bool, int]) -> Problem:
    """`problem` under fusion setting (inter_stage, chunk); it shares the cost cache (keys name the chunk)."""
    if (problem.inter_stage, problem.chunk) == fusion:
        return problem
    return dataclasses.replace(problem, inter_stage=fusion[0], chunk=fusion[1])


# ---------------------------------------------------------------------------------------------- scoring
def score(ev: Evaluation) -> float:
    return ev.time if ev.feasible else ev.time * (2.0 + ev.memory.overflow / GB)


class _Scorer:
    def __init__(self, problem: Problem, groups: list[Group]):
        self.problem, self.groups = problem, groups
        self.fusion = fusion_options(problem)
        self.problems = {f: with_fusion(problem, f) for f in self.fusion}
        self.cache: dict[tuple, Evaluation] = {}
        self.evaluations = 0

    def __call__(self, state: dict, name: str = "searched") -> Evaluation:
        fusion = state.get(FUSION, self.fusion[0])
        key = tuple(state[g.name] for g in self.groups) + (fusion,)
        ev = self.cache.get(key)
        if ev is None:
            self.evaluations += 1
            ev = evaluate(self.problems[fusion], to_plan(self.problem, self.groups, state, name))
            if len(self.cache) < 200_000:
                self.cache[key] = ev
        return ev


def tune_layouts(scorer: _Scorer, state: dict[str, Placement], rounds: int = 2) -> dict[str, Placement]:
    """Coordinate descent: each group in turn takes the best layout on its mesh, the others fixed."""
    state = dict(state)
    best = score(scorer(state))
    for _ in range(rounds):
        improved = False
        for grp in scorer.groups:
            mesh = state[grp.name].ranks
            for lay in grp.layouts.get(len(mesh)) or candidate_layouts(len(mesh), grp.model, grp.kind,
                                                                       scorer.problem.hw.devices_per_node,
                                                                       scorer.problem.migrate):
                trial = dict(state)
                trial[grp.name] = Placement(mesh, lay)
                s = score(scorer(trial))
                if s < best * (1 - 1e-9):
                    best, state, improved = s, trial, True
        for fusion in scorer.fusion if len(scorer.fusion) > 1 else ():
            s = score(scorer({**state, FUSION: fusion}))
            if s < best * (1 - 1e-9):
                best, state, improved = s, {**state, FUSION: fusion}, True
        if not improved:
            break
    return state


# ---------------------------------------------------------------------------------------------- moves
def _propose(rng: random.Random, groups: list[Group], state: dict,
             fusion: list[tuple[bool, int]] | None = None) -> dict | None:
    if fusion and len(fusion) > 1 and rng.random() < 0.1:  # another fusion setting
        other = [f for f in fusion if f != state.get(FUSION)]
        return {**state, FUSION: other[rng.randrange(len(other))]}
    grp = groups[rng.randrange(len(groups))]
    cur = state[grp.name]
    u = rng.random()
    new: Placement | None = None
    if u < 0.30:
        mesh = grp.meshes[rng.randrange(len(grp.meshes))]
        lays = grp.layouts[len(mesh)]
        new = Placement(mesh, lays[rng.randrange(len(lays))])
    elif u < 0.60:
        lays = grp.layouts.get(len(cur.ranks)) or []
        if lays:
            new = Placement(cur.ranks, lays[rng.randrange(len(lays))])
    elif u < 0.75:
        others = [g for g in groups if g.role == grp.role and g.name != grp.name]
        if grp.kind == "train":  # another role's pipelined train placement: the two train calls fuse
            others += [g for g in groups if g.kind == "train" and g.role != grp.role and state[g.name].layout.p > 1]
        if others:
            pl = state[others[rng.randrange(len(others))].name]
            if pl.layout in (grp.layouts.get(len(pl.ranks)) or []):
                new = pl
    elif u < 0.85:
        same = [m for m in grp.meshes if len(m) == len(cur.ranks) and m != cur.ranks]
        if same:
            new = Placement(same[rng.randrange(len(same))], cur.layout)
    else:
        lo, hi = cur.ranks[0], cur.ranks[-1] + 1
        near = [m for m in grp.meshes if len(m) in (2 * len(cur.ranks), len(cur.ranks) // 2)
                and (m[0] <= lo < hi <= m[-1] + 1 or lo <= m[0] <= m[-1] < hi)]
        if near:
            mesh = near[rng.randrange(len(near))]
            lays = grp.layouts[len(mesh)]
            new = Placement(mesh, lays[rng.randrange(len(lays))])
    if new is None or new == cur:
        return None
    out = dict(state)
    out[grp.name] = new
    return out


# ---------------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    plan: Plan
    evaluation: Evaluation
    baselines: dict[str, Evaluation]
    steps: int
    evaluations: int
    seconds: float
    seed: int
    best_found: Evaluation | None = None  # set when a built-in plan was returned instead (builtin_margin)
    fusion: tuple[bool, int] = (False, 8)  # the chosen fusion.inter_stage, fusion.chunk
    fusion_times: dict[tuple[bool, int], float] = field(default_factory=dict)  # the plan's time per setting considered

    @property
    def time(self) -> float:
        return self.evaluation.time

    @property
    def peak_memory(self) -> dict[int, float]:
        return self.evaluation.memory.peak

    def report(self) -> str:
        lines = [f"searched plan (seed {self.seed}, {self.steps} steps, {self.evaluations} plans simulated, "
                 f"{self.seconds:.1f} s):", self.evaluation.summary()]
        if self.best_found is not None:
            lines.append(f"  (the best other plan found, {self.best_found.time:.2f} s/iteration, is not faster than "
                         f"the built-in '{self.plan.name}' by the margin: the built-in is returned)")
        if len(self.fusion_times) > 1:
            on, chunk = self.fusion
            times = ", ".join(f"{'chunk ' + str(c) if i else 'off'} {t:.3g} s" for (i, c), t in self.fusion_times.items())
            lines.append(f"  fusion: fusion.inter_stage={str(on).lower()}" + (f" fusion.chunk={chunk}" if on else "")
                         + f" (this plan per setting: {times})")
        for name, ev in self.baselines.items():
            ratio = f"  ({ev.time / self.time:.2f}x the searched plan)" if ev.feasible else ""
            lines.append(f"  {name:<18} {ev.summary()}{ratio}")
        return "\n".join(lines)


def default_steps(problem: Problem, groups: list[Group]) -> int:
    """400 per group per doubling of the devices: ~8000 for PPO on 8 devices, ~16000 on 128."""
    return int(400 * len(groups) * (1 + math.log2(max(2, problem.world_size))))


def search(problem: Problem, *, seed: int = 0, steps: int | None = None, chains: int = 4,
           time_limit: float | None = None, builtin_margin: float = 0.05) -> SearchResult:
    """The fastest plan found that fits in memory (see the module docstring). Deterministic for a seed
    unless `time_limit` (seconds, a safety net) cuts the chains short.

    builtin_margin: a built-in plan (colocate, separate, as built) is returned instead of the plan found
    unless that plan is predicted faster by more than this fraction: a gain smaller than the cost model's
    error on measured runs (bench/planner.py) is not worth leaving the plan everyone knows. 0: always the
    fastest prediction."""
    t_start = time.perf_counter()
    groups = make_groups(problem)
    scorer = _Scorer(problem, groups)
    steps = steps or default_steps(problem, groups)

    configured = (problem.inter_stage, problem.chunk)
    first = configured if configured in scorer.fusion else scorer.fusion[0]
    baselines: dict[str, Evaluation] = {}
    starts: list[dict] = []
    for name, build in BUILTIN.items():
        plan = build(problem.graph, problem.world_size)
        baselines[name] = evaluate(problem, plan)
        tuned = tune_layouts(scorer, {**from_plan(groups, plan), FUSION: first})
        baselines[f"{name} (tuned)"] = evaluate(scorer.problems[tuned[FUSION]],
                                                to_plan(problem, groups, tuned, f"{name} (tuned)"))
        starts.append(tuned)

    rng = random.Random(seed)
    best_state, best_ev = None, None
    for st in starts:
        ev = scorer(st)
        if ev.feasible and (best_ev is None or ev.time < best_ev.time):
            best_state, best_ev = st, ev
    per_chain = max(1, steps // max(1, chains))
    done = 0
    for ch in range(chains):
        # the first chains start from the tuned built-in plans, the others from the best plan so far
        state = dict(starts[ch % len(starts)] if ch < len(starts) or best_state is None else best_state)
        cur = score(scorer(state))
        for k in range(per_chain):
            if time_limit is not None and time.perf_counter() - t_start > time_limit:
                break
            temp = 0.1 * (0.01 ** (k / per_chain))
            trial = _propose(rng, groups, state, scorer.fusion)
            done += 1
            if trial is None:
                continue
            ev = scorer(trial)
            s = score(ev)
            if s <= cur or rng.random() < math.exp(-(s - cur) / (temp * cur)):
                state, cur = trial, s
                if ev.feasible and (best_ev is None or ev.time < best_ev.time * (1 - 1e-9)):
                    best_state, best_ev = trial, ev
        if best_state is not None and ch + 1 < chains:  # polish the best so far before the next chain
            best_state = tune_layouts(scorer, best_state, rounds=1)
            best_ev = scorer(best_state)
    if best_state is None:
        reasons = "; ".join(f"{n}: {e.reason}" for n, e in baselines.items() if not e.feasible)
        raise PlanSearchError(f"no plan of {problem.world_size} devices found that fits in memory "
                              f"({problem.hw.name}); built-in plans: {reasons}")
    best_state = tune_layouts(scorer, best_state, rounds=1)
    fusion = best_state[FUSION]
    final = evaluate(scorer.problems[fusion], to_plan(problem, groups, best_state, "searched"))
    plain = [n for n, e in baselines.items() if n in BUILTIN and e.feasible]
    if plain and builtin_margin > 0:  # the best built-in plan under its best fusion setting
        known_fusion, known = None, None
        for n in plain:
            for f in scorer.fusion:
                ev = evaluate(scorer.problems[f], baselines[n].plan)
                if known is None or ev.time < known.time * (1 - 1e-9):
                    known_fusion, known = f, ev
        if final.time > known.time * (1 - builtin_margin):
            return SearchResult(known.plan, known, baselines, done, scorer.evaluations, time.perf_counter() - t_start,
                                seed, best_found=final, fusion=known_fusion,
                                fusion_times=_fusion_times(scorer, known.plan))
    return SearchResult(final.plan, final, baselines, done, scorer.evaluations, time.perf_counter() - t_start, seed,
                        fusion=fusion, fusion_times=_fusion_times(scorer, final.plan))


def _fusion_times(scorer: _Scorer, plan: Plan) -> dict[tuple[bool, int], float]:
    return {f: evaluate(p, plan).time for f, p in scorer.problems.items()}


class PlanSearchError(ValueError):
    """No plan fits: the message carries the built-in plans' memory reasons."""


def search_staleness(problem: Problem, ks: list[int], **kw) -> tuple[SearchResult, int, dict[int, float]]:
    """Asynchronous training's k (rollout.max_staleness) chosen with the plan: one `search` per k of `ks` (the
    simulator issues the rollout phase of iteration i + k before the train phase of i, so a plan that puts
    generation and training on different ranks overlaps them), the fastest plan wins, ties go to the smaller
    k (fresher samples). Returns (its result, its k, the best predicted s/iteration per k). k > 0 turns
    inter-stage fusion off, which the runtime refuses with it. The graph does not depend on k (its proximal
    log-probs come from the train forward: runtime.graphs.graph_for), so only the schedule changes."""
    best, times = None, {}
    for k in sorted(set(ks)):
        pr = dataclasses.replace(problem, staleness=k, inter_stage=problem.inter_stage and k == 0)
        res = search(pr, **kw)
        times[k] = res.time
        if best is None or res.time < best[0].time * (1 - 1e-9):
            best = res, k
    return best[0], best[1], times
