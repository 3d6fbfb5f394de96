"""Execution plans: a mesh (ranks) and a layout for every call of a graph. A plan is data: printed as a
table, saved and loaded as YAML, validated before any worker starts, searched (reflow.planner).

    calls:                                   # a YAML file, passed as runtime.plan=<path>
      actor_gen:   {ranks: 0-3, layout: d4t1p1}
      actor_train: {ranks: [0, 1, 2, 3], layout: d2t1p2, schedule: 1f1b}
      ...

`schedule` (train calls with p > 1): the pipeline schedule, 1f1b (default: activations of at most p
micro-batches held) or gpipe (all M); both give the same gradients and the same bubble (parallel/schedules.py).

    fuse: [actor_train, critic_train]        # optional, top level: two train calls run as one fused call

`fuse` (RLHFuse intra-stage fusion): two train calls of different roles, placed on the same ranks with the
same layout of p >= 2 stages, run as one call whose schedule interleaves both pipelines' micro-batches
(parallel/fused.py, engines/fused_train.py). The second call's stages run on the first's ranks in reverse
stage order (its placement's ranks are rewritten so; place its role's other calls on those ranks, in that order, to run
them on the owner copy without a reallocation), so each pipeline's bubbles fill with the other's work. Same
numbers as running the two calls one after the other. Only on workers (runtime.workers >= p).

Meaning of a layout per kind: train = FSDP2 over d (the role's owner copy, with its optimizer);
generate / infer = d replicas (each holds its tensor/pipeline slice whole), the batch split over them.
Built-in plans: "colocate" (every call on every device: DeepSpeed-Chat / verl style) and "separate"
(each role on its own devices: OpenRLHF style).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reflow.parallel.layout import Layout, LayoutError, validate_layout
from reflow.parallel.schedules import SCHEDULES
from reflow.runtime.graph import Graph


class PlanError(ValueError):
    """A plan that cannot run this graph on these workers; the message names the call and what to change."""


def parse_ranks(value) -> tuple[int, ...]:
    """[0, 1, 2] or "0-3" or "0,2" -> a tuple of ranks."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    out = []
    for part in str(value).split(","):
        a, _, b = part.strip().partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return tuple(out)


def format_ranks(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


@dataclass(frozen=True)
class Placement:
    ranks: tuple[int, ...]
    layout: Layout
    # how a pipelined train call orders its micro-batches; not where weights live, so placements that
    # differ only in it hold the same weights (no reallocation between them)
    schedule: str = field(default="1f1b", compare=False)

    def __str__(self) -> str:
        return f"{self.layout} on {format_ranks(self.ranks)}"


def reversed_stages(ranks: tuple[int, ...], p: int) -> tuple[int, ...]:
    """The ranks of a layout with p stages, its stages in reverse order (stage s's block of len/p ranks last
    but s): the fused partner's placement, stage s on the ranks of stage p - 1 - s of the first call."""
    n = len(ranks) // p
    return tuple(r for s in reversed(range(p)) for r in ranks[s * n:(s + 1) * n])


@dataclass
class Plan:
    name: str
    world_size: int
    calls: dict[str, Placement]
    fuse: tuple[str, ...] = ()  # two train calls run as one fused call (first's stage order; second reversed)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: dict, world_size: int, name: str = "custom") -> "Plan":
        calls = {}
        for call, spec in (data.get("calls") or {}).items():
            if not isinstance(spec, dict) or "ranks" not in spec or "layout" not in spec:
                raise PlanError(f"plan call '{call}': give {{ranks: ..., layout: dXtYpZ}}, got {spec!r}")
            schedule = str(spec.get("schedule", "1f1b"))
            if schedule not in SCHEDULES:
                raise PlanError(f"plan call '{call}': schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
            try:
                calls[call] = Placement(parse_ranks(spec["ranks"]), Layout.parse(str(spec["layout"])), schedule)
            except (ValueError, LayoutError) as e:
                raise PlanError(f"plan call '{call}': {e}") from None
        fuse = _fused_pair(data.get("fuse"), calls)
        return cls(data.get("name", name), int(data.get("world_size", world_size)), calls, fuse)

    @classmethod
    def load(cls, path: str | Path, world_size: int) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise PlanError(f"plan file {p} does not exist; give a path, or 'colocate' / 'separate'")
        return cls.from_dict(yaml.safe_load(p.read_text()) or {}, world_size, name=p.stem)

    def to_dict(self) -> dict:
        return {"name": self.name, "world_size": self.world_size,
                "calls": {c: {"ranks": format_ranks(p.ranks), "layout": str(p.layout),
                              **({"schedule": p.schedule} if p.layout.p > 1 else {})} for c, p in self.calls.items()},
                **({"fuse": list(self.fuse)} if self.fuse else {})}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ questions
    def owner(self, graph: Graph, role: str) -> Placement:
        """Where a role's weights live: its train call's placement (trained roles), else its first call's."""
        calls = graph.roles[role]
        train = [c for c in calls if graph.call(c).kind == "train"]
        return self.calls[(train or calls)[0]]

    def validate(self, graph: Graph, model_configs: dict | None = None) -> "Plan":
        """Raise PlanError unless every call of `graph` has a placement that fits its role's model.
        model_configs: role -> HF config (roles without a model, like a reward function, are left out)."""
        missing = [c for c in graph.order if c not in self.calls]
        if missing:
            raise PlanError(f"plan '{self.name}' places no mesh for call(s) {', '.join(missing)}; add them under calls:")
        extra = [c for c in self.calls if c not in graph.order]
        if extra:
            raise PlanError(f"plan '{self.name}' places call(s) {', '.join(extra)} that graph '{graph.name}' does not "
                            f"have (its calls: {', '.join(graph.order)})")
        for name in graph.order:
            call, pl = graph.call(name), self.calls[name]
            try:
                config = (model_configs or {}).get(call.role)
                if config is not None:
                    validate_layout(pl.layout, config, list(pl.ranks), self.world_size, source=f"the {call.role} model")
                else:
                    validate_layout(pl.layout, _NoModel, list(pl.ranks), self.world_size)
            except LayoutError as e:
                raise PlanError(f"plan call '{name}': {e}") from None
            if call.kind == "generate" and pl.layout.p > 1:
                raise PlanError(f"plan call '{name}': generation under pipeline parallel is not supported; use p1 "
                                f"(e.g. d{pl.layout.d * pl.layout.p}t{pl.layout.t}p1)")
            if config is None and call.kind != "train" and (pl.layout.t > 1 or pl.layout.p > 1):
                raise PlanError(f"plan call '{name}': role '{call.role}' has no model (a reward function); "
                                f"use d{len(pl.ranks)}t1p1 on its ranks")
        for name in graph.order:
            call = graph.call(name)
            if call.kind == "update" and self.calls[name] != self.owner(graph, call.role):
                raise PlanError(f"plan call '{name}': it updates role '{call.role}' in place, so it must run where that "
                                f"role's weights live ({self.owner(graph, call.role)}); got {self.calls[name]}")
        for role in graph.trained_roles():
            places = {self.calls[c] for c in graph.roles[role] if graph.call(c).kind == "train"}
            if len(places) > 1:
                raise PlanError(f"plan: the train calls of role '{role}' must share one placement (the owner copy), "
                                f"got {', '.join(map(str, places))}")
            schedules = {self.calls[c].schedule for c in graph.roles[role] if graph.call(c).kind == "train"}
            if len(schedules) > 1:
                raise PlanError(f"plan: the train calls of role '{role}' share one engine, so one pipeline schedule; "
                                f"got {', '.join(sorted(schedules))}: give them the same schedule")
        if self.fuse:
            self._validate_fuse(graph)
        return self

    def _validate_fuse(self, graph: Graph) -> None:
        """Both fused calls: train calls of two roles in the graph, every step, neither reading the other's output
        and none read by a call (the pair is submitted together, at the later one's place in the order)."""
        fuse = ", ".join(self.fuse)
        for name in self.fuse:
            if name not in graph.order:
                raise PlanError(f"plan fuse: [{fuse}]: '{name}' is not a call of graph '{graph.name}'; fuse two of "
                                f"its train calls or drop the fuse key")
            call = graph.call(name)
            if call.kind != "train":
                raise PlanError(f"plan fuse: [{fuse}]: '{name}' is not a train call (kind {call.kind}); only train "
                                f"calls fuse, drop the fuse key")
            if call.options.get("every"):
                raise PlanError(f"plan fuse: [{fuse}]: '{name}' runs every {call.options['every']} steps; fuse "
                                f"calls that run every step, or drop the fuse key")
            users = [m for m in graph.order if name in graph.deps[m]]
            if users:
                raise PlanError(f"plan fuse: [{fuse}]: call '{users[0]}' reads the output of '{name}'; drop the "
                                f"fuse key")
        a, b = (graph.call(n) for n in self.fuse)
        if a.role == b.role:
            raise PlanError(f"plan fuse: [{fuse}]: both train role '{a.role}' (one engine); fuse the train calls "
                            f"of two roles (actor_train, critic_train)")

    def table(self, graph: Graph) -> str:
        rows = [("call", "role", "kind", "ranks", "layout")]
        for name in graph.order:
            c, p = graph.call(name), self.calls[name]
            rows.append((name, c.role, c.kind, format_ranks(p.ranks), str(p.layout)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"plan '{self.name}' on {self.world_size} worker(s), graph '{graph.name}'"]
        for i, r in enumerate(rows):
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if self.fuse:
            lines.append(f"  fused: {' + '.join(self.fuse)} (one interleaved pipeline schedule; {self.fuse[1]}'s "
                         f"stages in reverse order)")
        return "\n".join(lines)


def _fused_pair(spec, calls: dict[str, Placement]) -> tuple[str, ...]:
    """The `fuse` key checked against the placements (the graph is checked in `validate`); rewrites the
    second call's placement to the first's ranks in reverse stage order."""
    if spec is None:
        return ()
    if not isinstance(spec, (list, tuple)) or len(spec) != 2 or len(set(map(str, spec))) != 2:
        raise PlanError(f"plan fuse: give two train calls, like fuse: [actor_train, critic_train]; got {spec!r}")
    first, second = map(str, spec)
    where = f"plan fuse: [{first}, {second}]"
    for name in (first, second):
        if name not in calls:
            raise PlanError(f"{where}: '{name}' has no placement under calls:; place it, or drop the fuse key")
    a, b = calls[first], calls[second]
    if set(a.ranks) != set(b.ranks) or a.layout != b.layout:
        raise PlanError(f"{where}: fused calls run on the same ranks with the same layout; got {a} and {b}: "
                        f"give both one of them")
    if a.layout.p < 2:
        raise PlanError(f"{where}: fusion fills pipeline bubbles, so it needs p >= 2; got {a.layout}: use a "
                        f"layout like d{max(1, a.layout.d // 2)}t{a.layout.t}p2, or drop the fuse key")
    calls[second] = Placement(reversed_stages(a.ranks, a.layout.p), a.layout, b.schedule)
    return first, second


def needs_copy(kind: str, pl: Placement, owner: Placement, trained: bool) -> bool:
    """Whether a call runs on a temporary reallocated copy of its role's weights (the worker builds one, the
    planner charges for one): every generate / infer call placed elsewhere than its role's owner copy, and
    a generate or update call on the owner placement of a trained role sharded over d > 1 (generation wants
    whole weights, not FSDP shards: replicas decode different prompts, and FSDP would all-gather every step;
    an update mixes the weights into another role's replicas, slice by slice).
    An infer call on the owner placement runs on the owner copy; a train call always does."""
    if kind == "train":
        return False
    if pl != owner:
        return True
    return kind in ("generate", "update") and trained and pl.layout.d > 1


class _NoModel:
    """Stands in for a model config when a role has none: only rank checks apply."""

    num_attention_heads = num_key_value_heads = intermediate_size = 1 << 20
    num_hidden_layers = 1 << 20


def colocate(graph: Graph, world_size: int) -> Plan:
    """Every call on every worker: train calls FSDP2 over all (d=N), generate/infer N data-parallel replicas."""
    everyone = tuple(range(world_size))
    return Plan("colocate", world_size, {c: Placement(everyone, Layout(world_size, 1, 1)) for c in graph.order})


def separate(graph: Graph, world_size: int) -> Plan:
    """Each role on its own workers (OpenRLHF style): trained roles get twice the share of frozen ones; with
    fewer workers than roles, roles share workers round-robin."""
    roles = list(graph.roles)
    weights = {r: 2 if r in graph.trained_roles() else 1 for r in roles}
    if world_size < len(roles):
        ranks = {r: (i % world_size,) for i, r in enumerate(roles)}
    else:
        share = {r: max(1, world_size * weights[r] // sum(weights.values())) for r in roles}
        while sum(share.values()) > world_size:  # rounding: take back from the largest
            share[max(share, key=share.get)] -= 1
        while sum(share.values()) < world_size:  # and give leftovers to trained roles first
            share[max(roles, key=lambda r: (weights[r], -share[r]))] += 1
        ranks, start = {}, 0
        for r in roles:
            ranks[r] = tuple(range(start, start + share[r]))
            start += share[r]
    return Plan("separate", world_size, {c: Placement(ranks[graph.call(c).role], Layout(len(ranks[graph.call(c).role]), 1, 1))
                                         for c in graph.order})


BUILTIN = {"colocate": colocate, "separate": separate}


def resolve_plan(spec, graph: Graph, world_size: int) -> Plan:
    """A config's plan: a built-in name or a YAML file path (or, from Python, a mapping like the YAML)."""
    if isinstance(spec, dict):
        return Plan.from_dict(spec, world_size)
    if spec in BUILTIN:
        return BUILTIN[spec](graph, world_size)
    return Plan.load(spec, world_size)


def check_plan_workers(plan: Plan, workers: int) -> Plan:
    """A plan (a YAML file carries its own world_size) must be for as many workers as the run starts."""
    if workers >= 1 and plan.world_size != workers:
        raise PlanError(f"plan '{plan.name}' is for {plan.world_size} worker(s) but runtime.workers={workers}; "
                        f"set runtime.workers={plan.world_size} or edit the plan's world_size and ranks")
    return plan


def placements(plan: Plan, graph: Graph) -> dict[str, Placement]:
    """Every call's placement, the eval graph's calls included: an eval call runs on the ranks of the call
    named by its `placed_like` option, in its layout, except that a generating eval folds pipeline stages
    into replicas (generation does not run under pipeline parallel): d x p replicas of t ranks each."""
    out = dict(plan.calls)
    if graph.evals is not None:
        for c in graph.evals.calls:
            like = c.options.get("placed_like")
            if like not in plan.calls:
                raise PlanError(f"eval call '{c.name}': placed_like '{like}' is not a call of the plan")
            pl = plan.calls[like]
            if c.kind == "generate" and pl.layout.p > 1:
                pl = Placement(pl.ranks, Layout(pl.layout.d * pl.layout.p, pl.layout.t, 1))
            out[c.name] = pl
    return out
