"""Call implementations: what a graph's call does on a worker, registered by name (ReaLHF's `interface_impl`).

    @register_call("logprobs")
    def logprobs(cc: CallContext, batch: SampleBatch) -> SampleBatch: ...

A graph's `Call(impl="logprobs", inputs=(...), outputs=("ref_logprobs",))` runs it; the worker knows nothing
of roles or algorithms, it merges the call's inputs into one batch, runs the implementation on every rank
of the call's mesh and passes on what it returns:

    a SampleBatch   the new fields (the worker keeps only the call's declared outputs), from the call's
                    first rank (generate: from the first tensor-parallel rank of every replica)
    a dict          metrics of train calls ({name: float}) or, from evaluations, partial sums
                    ({name: [numerator, denominator]}) that the executor adds up over replicas and divides

Inter-stage fusion (fusion.inter_stage) needs two more facts about an implementation:

    @register_call("logprobs", per_sample=True)    each sample's output depends on that sample alone, so the
                                                   call may run on any chunk of the batch; the scalar metrics
                                                   it reports are counts (summed over chunks)
    @register_stream("generate")                   the call "generate", streamed: returns (the number of
                                                   samples this rank returns, an iterator of its parts:
                                                   SampleBatch chunks as they finish, None on other ranks)

Implementations live beside this file, one per concern (rollout, score, forward, policy, supervised,
advantage, evaluate, ema). A user registers their own in the file of their graph (`algo.graph=my_file.py:my_graph`):
the workers import that file too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

CALLS: dict[str, Callable] = {}
PER_SAMPLE: set[str] = set()
STREAMS: dict[str, Callable] = {}


def register_call(name: str, per_sample: bool = False):
    def wrap(fn):
        CALLS[name] = fn
        if per_sample:
            PER_SAMPLE.add(name)
        return fn

    return wrap


def register_stream(name: str):
    """Register the streaming version of the call `name`: fn(cc, batch, chunk) -> (samples this rank returns in
    all, an iterator of its parts)."""
    def wrap(fn):
        STREAMS[name] = fn
        return fn

    return wrap


def is_per_sample(name: str) -> bool:
    _register_builtins()
    return name in PER_SAMPLE


def get_stream(name: str) -> Callable | None:
    _register_builtins()
    return STREAMS.get(name)


def get_call(name: str) -> Callable:
    _register_builtins()
    if name not in CALLS:
        from reflow.runtime.graph import GraphError

        raise GraphError(f"call implementation '{name}' is not registered; known: {', '.join(sorted(CALLS))}. "
                       "Register yours with @register_call in the file of your graph")
    return CALLS[name]


def _register_builtins() -> None:
    from reflow.runtime.calls import advantage, ema, evaluate, forward, policy, rollout, score, supervised  # noqa: F401


@dataclass
class CallContext:
    """What an implementation sees on one rank: the call, its step and metadata, the weights it runs on
    (`model`: the owner copy or a temporary reallocated copy; None for a role without weights), the
    parallel context of its placement (None in one process), and the worker's state (roles, data, config).
    `metrics`: scalars an implementation that returns a batch reports too; they join the step's metrics."""

    call: Any
    step: int
    meta: dict
    model: Any
    ctx: Any
    worker: Any
    metrics: dict = field(default_factory=dict)  # scalars a call reports beside its batch (reward/errors)
    # runs the role's optimizer steps in place of its engine's `step` (a fused call pairs them with another
    # call's: reflow.runtime.fusion); None: the engine's own
    stepper: Callable | None = None

    def train_step(self, batch, loss_fn, norm=None, group_key=None, extra=()) -> dict[str, float]:
        """One optimizer step of the call's role (TrainEngine.step's arguments and stats)."""
        if self.stepper is not None:
            return self.stepper(batch, loss_fn, norm, group_key, extra)
        return self.role.engine.step(batch, loss_fn, norm, group_key, extra=extra)

    def record(self, what: str, start: float, end: float, **args) -> None:
        """A slice `<call>:<what>` of this rank's timeline (runtime.timeline), showing `args`."""
        self.worker._record(self.step, f"{self.call.name}:{what}", start, end, args=args)

    @property
    def cfg(self):
        return self.worker.cfg

    @property
    def role(self):
        """The Role object of the call's own role on this worker (engine, EMA shadow, ...)."""
        return self.worker.roles[self.call.role]

    @property
    def data(self):
        return self.worker.data

    @property
    def tokenizer(self):
        return self.worker.tokenizer

    @property
    def first(self) -> bool:
        """Whether this rank returns the call's output (its mesh's first rank)."""
        return self.ctx is None or self.ctx.index == 0

    def output_key(self, i: int = 0) -> str:
        return self.call.outputs[i]
