"""Experiments as graphs of model function calls.

A call is (name, role, kind, impl, input keys, output keys, options). `impl` names the registered
implementation the worker runs (reflow.runtime.calls: generate, score_fn, logprobs, values, train_policy,
...); the keys are the batch fields the call reads and writes (`input_ids`, `score`, `ref_logprobs`, ...),
so a graph says exactly which data flows where. The graph is derived from the keys:
a call depends on the calls producing its inputs; keys no call produces come from the dataset. When a
graph is built it reports, before anything runs:

    a key produced by two calls                      a cycle (names the calls on it)
    an input neither produced nor a dataset key      an output nobody consumes (and not a result)

    kind      what the call does on its mesh                      role weights
    generate  decode responses for prompts                       a (temporary) copy in the call's layout
    infer     forward only: log-probs, values, rewards           same
    train     one optimizer step (or several mini-batches)       the role's owner copy (its train layout)
    update    changes a role's weights from another role's       a copy of `weights`' role in the call's layout
              (the EMA reference follows the actor)

`weights`: the role whose weights the call runs on (default: its own role). `prefix`: the call's output
fields appear to consumers under `prefix + field` (ReMax's greedy rollout: `greedy_score`), so two calls
can run one implementation without their keys colliding. `evals`: calls that run at evaluation time
only, a graph of their own (greedy decoding of the eval prompts, held-out pair accuracy); each is placed
like the step call named by its `placed_like` option.

A role's calls keep their declared order within a step, and a role's first call of step i runs after
its last call of step i-1 (the executor submits them in that order and each worker runs its tasks in
submission order: weight versions stay consistent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("generate", "infer", "train", "update")


class GraphError(ValueError):
    """A graph that cannot run; the message names the call and key."""


@dataclass(frozen=True)
class Call:
    name: str
    role: str
    kind: str
    impl: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    options: dict = field(default_factory=dict, hash=False, compare=False)
    weights: str | None = None  # the role whose weights the call runs on (None: its own role)
    prefix: str = ""  # consumers see this call's output fields as prefix + field

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GraphError(f"call '{self.name}': kind '{self.kind}' is not one of {', '.join(KINDS)}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.weights is None:
            object.__setattr__(self, "weights", self.role)

    @property
    def published(self) -> tuple[str, ...]:
        """The keys other calls know this call's outputs by."""
        return tuple(self.prefix + k for k in self.outputs)


@dataclass
class Graph:
    """calls in declaration order; dataset_keys: what the dataset provides; results: outputs kept after
    the step even if no call consumes them (metrics of train calls need no key)."""

    name: str
    calls: list[Call]
    dataset_keys: tuple[str, ...] = ("prompts",)
    results: tuple[str, ...] = ()
    evals: "Graph | None" = None  # run at evaluation time only

    def __post_init__(self):
        names = [c.name for c in self.calls]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise GraphError(f"graph '{self.name}': two calls are named '{dup}'")
        self.producer: dict[str, str] = {}
        for c in self.calls:
            for k in c.published:
                if k in self.producer:
                    raise GraphError(f"graph '{self.name}': key '{k}' is produced by both '{self.producer[k]}' "
                                     f"and '{c.name}'; rename one output")
                if k in self.dataset_keys:
                    raise GraphError(f"graph '{self.name}': call '{c.name}' outputs '{k}', a dataset key")
                self.producer[k] = c.name
        for c in self.calls:
            for k in c.inputs:
                if k not in self.producer and k not in self.dataset_keys:
                    raise GraphError(f"graph '{self.name}': call '{c.name}' needs '{k}', which no call produces and "
                                     f"the dataset does not provide (dataset keys: {', '.join(self.dataset_keys)})")
        consumed = {k for c in self.calls for k in c.inputs} | set(self.results)
        for c in self.calls:
            for k in c.published:
                if k not in consumed:
                    raise GraphError(f"graph '{self.name}': output '{k}' of call '{c.name}' is never consumed; "
                                     "drop it or list it in the graph's results")
        self.deps: dict[str, list[str]] = {
            c.name: sorted({self.producer[k] for k in c.inputs if k in self.producer}, key=names.index)
            for c in self.calls}
        self.order = self._topological_order()

    def _topological_order(self) -> list[str]:
        """Kahn's algorithm, ties broken by declaration order (so the order is stable and readable)."""
        names = [c.name for c in self.calls]
        indeg = {n: len(self.deps[n]) for n in names}
        users = {n: [m for m in names if n in self.deps[m]] for n in names}
        ready = [n for n in names if indeg[n] == 0]
        order = []
        while ready:
            n = ready.pop(0)
            order.append(n)
            for m in users[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
            ready.sort(key=names.index)
        if len(order) < len(names):
            stuck = [n for n in names if n not in order]  # cycles and what depends on them
            while True:  # peel off calls nothing left depends on: what remains is on a cycle
                sinks = [n for n in stuck if not any(n in self.deps[m] for m in stuck)]
                if not sinks:
                    break
                stuck = [n for n in stuck if n not in sinks]
            raise GraphError(f"graph '{self.name}': calls {', '.join(stuck)} form a cycle through their keys")
        return order

    def call(self, name: str) -> Call:
        evals = self.evals.calls if self.evals is not None else []
        return next(c for c in [*self.calls, *evals] if c.name == name)

    @property
    def roles(self) -> dict[str, list[str]]:
        """Each role's calls in execution order."""
        out: dict[str, list[str]] = {}
        for n in self.order:
            out.setdefault(self.call(n).role, []).append(n)
        return out

    def trained_roles(self) -> list[str]:
        return [r for r, calls in self.roles.items() if any(self.call(c).kind == "train" for c in calls)]

    def phases(self) -> tuple[list[str], list[str]]:
        """(rollout, train): the calls that make a step's samples (generation, and scoring by roles nothing
        trains) and those that use or change trained weights (their inference, training, updates), each in
        execution order. Asynchronous training runs the rollout phase of later steps before the train phase
        of earlier ones; no rollout call reads a train call's output."""
        trained = set(self.trained_roles())
        train = [n for n in self.order
                 if self.call(n).kind in ("train", "update") or
                 (self.call(n).kind != "generate" and self.call(n).weights in trained)]
        rollout = [n for n in self.order if n not in train]
        for n in rollout:
            late = [d for d in self.deps[n] if d in train]
            if late:
                raise GraphError(f"graph '{self.name}': call '{n}' makes samples but reads '{late[0]}', which uses "
                                 "trained weights; asynchronous training cannot run it ahead")
        return rollout, train

    def weight_roles(self) -> list[str]:
        """Roles whose weights some call runs on or updates, in execution order. A role all of whose calls run
        on another role's weights has none of its own (a LoRA actor's reference: the actor with adapters off)."""
        calls = [*self.calls, *(self.evals.calls if self.evals is not None else [])]
        used = {c.weights for c in calls} | {c.role for c in calls if c.kind in ("train", "update")}
        out = [r for r in self.roles if r in used]
        for c in calls:
            if c.weights not in out:
                out.append(c.weights)
        return out

    def describe(self) -> str:
        lines = [f"graph {self.name}:"]
        for n in self.order:
            c = self.call(n)
            lines.append(f"  {c.name:<16} {c.role:<7} {c.kind:<8} {c.impl:<14} {', '.join(c.inputs) or '-'} -> "
                         f"{', '.join(c.outputs) or '(metrics)'}")
        return "\n".join(lines)
