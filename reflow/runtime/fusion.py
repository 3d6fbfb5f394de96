"""A fused call (the plan's `fuse: [a, b]`): two train calls on the same ranks run as one, each optimizer step of
one paired with the same-numbered step of the other in one fused pipeline schedule (engines/fused_train.py).

The two call implementations run unchanged, each in its own thread, up to their optimizer steps: a step
(`CallContext.train_step`) hands its (engine, batch, loss, normaliser) to the coordinator, on the worker's
own thread, and waits. When both calls wait, the coordinator runs one `fused_train_step` of both and hands
each its stats; when one call has finished (fewer steps) or a step cannot fuse (a grouping key, extra loss
terms), the waiting step runs alone through its engine. Every collective thus runs on one thread, in the
same order on every rank (the threads only compute what does not communicate: advantages, metrics), and
each call returns the metrics it returns when run alone: each model's gradients are its own.

The schedule of M micro-batches per model: `search_fused_in_memory` on p ranks (the second call's stages
reversed), memory limit p micro-batches per rank (1F1B's first stage) unless the search needs more, found
once per M and the same on every rank (seeded).
"""

from __future__ import annotations

import threading
from typing import Callable

from reflow.engines.fused_train import fused_train_step
from reflow.engines.train import NonFiniteError
from reflow.parallel.fused import FusedSpec, Slot, search_fused_in_memory


def fused_spec(names: tuple[str, str], p: int, m: int) -> FusedSpec:
    """The first call's stages on schedule ranks 0..p-1, the second's reversed; a backward costs 2 forwards."""
    return FusedSpec(p, m, {names[0]: tuple(range(p)), names[1]: tuple(reversed(range(p)))},
                     {n: 1 for n in names}, {n: 2 for n in names}, {n: 1.0 for n in names})


_SCHEDULES: dict[tuple[tuple[str, str], int, int], tuple[FusedSpec, list[Slot], float | None]] = {}


def fused_schedule(names: tuple[str, str], p: int, m: int) -> tuple[FusedSpec, list[Slot], float | None]:
    """(spec, schedule, its memory limit) for M micro-batches, searched once per process (deterministic: every
    rank finds the same)."""
    key = (names, p, m)
    if key not in _SCHEDULES:
        spec = fused_spec(names, p, m)
        schedule, _, limit = search_fused_in_memory(spec)
        _SCHEDULES[key] = spec, schedule, limit
    return _SCHEDULES[key]


class PairStopped(RuntimeError):
    """Raised in a call whose fused partner's step failed (its own step did not): the partner's error is the
    cause that the fused call reports."""


class _Step:
    def __init__(self, engine, args: tuple):
        self.engine, self.args = engine, args
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class FusedCalls:
    """Runs `bodies` (call name -> a function running that call's implementation with `stepper(name)` as its
    CallContext.stepper) concurrently, pairing their optimizer steps; returns name -> its result or raises
    the error of a call whose own step or code failed (a non-finite step: the model whose step was)."""

    def __init__(self, names: tuple[str, str], p: int):
        self.names, self.p = names, p
        self.cond = threading.Condition()
        self.waiting: dict[str, _Step] = {}
        self.finished: set[str] = set()
        self.fused_steps = self.lone_steps = 0

    def stepper(self, name: str, engine) -> Callable:
        def step(batch, loss_fn, norm, group_key, extra):
            s = _Step(engine, (batch, loss_fn, norm, group_key, tuple(extra)))
            with self.cond:
                self.waiting[name] = s
                self.cond.notify_all()
            s.done.wait()
            if s.error is not None:
                raise s.error
            return s.result

        return step

    def run(self, bodies: dict[str, Callable]) -> dict:
        results: dict = {}
        errors: dict[str, BaseException] = {}

        def thread(name: str):
            try:
                results[name] = bodies[name]()
            except BaseException as e:  # noqa: BLE001 - handed to the worker's thread
                errors[name] = e
            finally:
                with self.cond:
                    self.finished.add(name)
                    self.cond.notify_all()

        threads = [threading.Thread(target=thread, args=(n,), name=f"reflow-{n}", daemon=True) for n in self.names]
        for t in threads:
            t.start()
        while True:
            with self.cond:
                self.cond.wait_for(lambda: all(n in self.waiting or n in self.finished for n in self.names))
                steps = {n: self.waiting.pop(n) for n in self.names if n in self.waiting}
            if not steps:
                break
            self._run_steps(steps)
        for t in threads:
            t.join()
        for n in sorted(errors, key=lambda n: isinstance(errors[n], PairStopped)):  # the cause before its echo
            raise errors[n]
        return results

    def _run_steps(self, steps: dict[str, _Step]) -> None:
        fusable = len(steps) == 2 and all(s.args[3] is None and not s.args[4] for s in steps.values())
        try:
            if fusable:
                jobs = {n: (s.engine, s.args[0], s.args[1], s.args[2]) for n, s in steps.items()}
                out = fused_train_step(jobs, None, lambda m: fused_schedule(self.names, self.p, m))
                for n, s in steps.items():
                    s.result = out[n]
                self.fused_steps += 1
            else:
                for n, s in steps.items():
                    batch, loss_fn, norm, group_key, extra = s.args
                    try:
                        s.result = s.engine.step(batch, loss_fn, norm, group_key, extra=extra)
                    except NonFiniteError as e:
                        e.models = (n,)
                        raise
                    self.lone_steps += 1
        except BaseException as e:  # noqa: BLE001 - the calls whose step failed raise it, the others stop
            failed = getattr(e, "models", None) or tuple(steps)
            for n, s in steps.items():
                s.error = e if n in failed else PairStopped(f"stopped: the step of '{failed[0]}' it was paired "
                                                            f"with failed ({type(e).__name__})")
        for s in steps.values():
            s.done.set()


def check_fuse(cfg, graph, plan) -> None:
    """A run's settings that a fused pair needs, checked before anything starts (PlanError naming the key): both
    roles cut a batch into the same micro-batches (one schedule of M per model), on every step the same batch."""
    from reflow.runtime.plan import PlanError
    from reflow.runtime.roles import config_key, role_config

    if not plan.fuse:
        return
    roles = [graph.call(n).role for n in plan.fuse]
    tokens = [role_config(cfg, r).micro_batch_tokens for r in roles]
    if tokens[0] != tokens[1]:
        raise PlanError(f"plan fuse: [{', '.join(plan.fuse)}]: {config_key(cfg, roles[0])}.micro_batch_tokens="
                        f"{tokens[0]} but {config_key(cfg, roles[1])}.micro_batch_tokens={tokens[1]}; fused pipelines "
                        "cut their batches alike: give both the same value")
    sharing = [role_config(cfg, r).prefix_sharing for r in roles]
    if sharing[0] != sharing[1]:  # sharing keeps groups whole and counts their prompt once: other cuts
        raise PlanError(f"plan fuse: [{', '.join(plan.fuse)}]: {config_key(cfg, roles[0])}.prefix_sharing={sharing[0]} "
                        f"but {config_key(cfg, roles[1])}.prefix_sharing={sharing[1]}; fused pipelines cut their "
                        "batches alike: give both the same value")
    algo, pair = getattr(cfg, "algo", None), ", ".join(plan.fuse)
    if algo is not None and getattr(algo, "dynamic_sampling", False):
        raise PlanError(f"plan fuse: [{pair}]: algo.dynamic_sampling trains the actor on a subset of the critic's "
                        "batch, so their micro-batches differ; drop the fuse key or dynamic sampling")
    # an SFT term joins the actor's step as a second pass the fused schedule does not hold
    for key, on in (("algo.ptx_coef", algo is not None and getattr(algo, "ptx_coef", 0) > 0),
                    ("rehearsal", getattr(getattr(cfg, "rehearsal", None), "enabled", False))):
        if on:
            raise PlanError(f"plan fuse: [{pair}]: {key} adds an SFT term to the actor's steps, which a fused "
                            "step cannot interleave; drop the fuse key or the SFT term")
