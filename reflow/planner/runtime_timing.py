"""The runtime's own timings for calibration (`reflow profile`): what the micro-benchmarks (microbench.py)
cannot see, because it is the runtime's work rather than the devices'.

    call        (needs Ray) the round trip of a chain of Ray actor tasks passing a batch-sized object,
                round-robin over N actors and on one actor (the difference: moving a call's inputs between
                workers); then the runtime itself: a few PPO steps under the "separate" plan with the
                2-layer debug-llama preset and 2 prompts of 2 new tokens (compute negligible), so the step
                is the runtime's fixed cost: dispatch, data between workers, merging, engine set-up
    workload    (--config, needs Ray; replaces `call`'s runtime step) the config's own calls in the
                runtime on N workers, timed from the workers' timelines, under one_rank_plan (every call
                d1t1p1 on rank 0: no parallelism, no copies, one busy worker, not a plan one would run)
                at the config's prompts per step and a quarter of it (fit.workload_fit fits from such
                runs; bench/planner.py adds one after each round and pools them, fit.pool_runs, since
                this machine's speed drifts over minutes). This is how ReaL's profiler works too: time
                the real calls at the sizes they run at, and leave the parallel costs to the
                micro-benchmarks
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from reflow.planner.microbench import ray_session


class _Hop:
    """A Ray actor that passes a batch on (the runtime's per-call dispatch, without the model work)."""

    def hop(self, batch):
        return batch


def measure_call_overhead(workers: int, hops: int = 24, payload_bytes: int = 256 << 10) -> tuple[float, float]:
    """Seconds per call of a chain of Ray actor tasks, each waiting for the previous one's output (a batch
    of `payload_bytes`), as the controller chains calls: (round-robin over `workers` actors, so every hop
    moves the batch to another worker; all on one actor, so it stays in that worker's store). Their
    difference is what moving a call's inputs from another worker costs (Hardware.data_hop)."""
    import numpy as np
    import ray

    with ray_session(workers):
        actors = [ray.remote(num_cpus=1)(_Hop).remote() for _ in range(workers)]
        ray.get([a.hop.remote(0) for a in actors])
        batch = {"tokens": np.zeros(payload_bytes // 8, dtype=np.int64)}

        def chain(stride: int) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                ref = batch
                for k in range(hops):
                    ref = actors[(k * stride) % workers].hop.remote(ref)
                ray.get(ref)
                best = min(best, (time.perf_counter() - t0) / hops)
            return best
        cross, local = chain(1), chain(0)
        for a in actors:
            ray.kill(a)
        return cross, local


def measure_runtime_step(workers: int, steps: int = 6, warmup: int = 2) -> tuple[float, object]:
    """The runtime's own fixed cost: PPO under the built-in "separate" plan with the `debug-llama` preset
    (2 layers, hidden 32), 2 prompts x 1 sample and 2 new tokens per step, so that compute is negligible
    and the step is dispatch, data movement between workers, batch merging and engine set-up.
    Returns (median time/step after `warmup` steps, the RLConfig)."""
    import logging
    import tempfile

    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig
    from reflow.data.tasks import write_task
    from reflow.models.presets import init_model
    root = Path(tempfile.mkdtemp(prefix="reflow-profile-"))
    model = init_model("debug-llama", root / "model", seed=0)
    write_task("addition", root / "data", n_train=64, n_test=4, seed=0)
    role = {"path": str(model), "optim": {"lr": 1e-4}}
    cfg = from_dict(RLConfig, {
        "output_dir": str(root / "run"), "actor": role, "critic": {"optim": {"lr": 1e-4}},
        "reward": {"fn": "exact_match"}, "data": {"train": str(root / "data" / "train.jsonl"), "eval": None,
                                                 "max_prompt_len": 16},
        "rollout": {"prompts_per_step": 2, "n": 1, "max_new_tokens": 2},
        "algo": {"name": "ppo", "kl_coef": 0.01, "ppo_epochs": 1, "mini_batches": 1},
        "trainer": {"steps": steps, "progress": False, "save_every": 0},
        "runtime": {"workers": workers, "plan": "separate", "timeout_s": 120}})
    level = logging.getLogger("reflow").level
    logging.getLogger("reflow").setLevel(logging.WARNING)
    try:
        times, _ = timed_steps(cfg, steps)
    finally:
        logging.getLogger("reflow").setLevel(level)
    return statistics.median(times[warmup:]), cfg


def timed_steps(cfg, steps: int, metrics: list | None = None) -> tuple[list[float], list[dict]]:
    """`steps` steps of an RL config's graph under its plan, straight on the executor (no evaluation, no
    checkpoints; the KL coefficient stays at algo.kl_coef): (seconds per step, the workers' timeline);
    each step's metrics appended to `metrics` when given."""
    import time

    from reflow.data.sampler import PromptSampler
    from reflow.runtime.executor import Executor
    from reflow.runtime.graphs import graph_for
    from reflow.runtime.plan import resolve_plan

    graph = graph_for(cfg)
    a = cfg.algo
    executor = Executor(cfg, graph, resolve_plan(cfg.runtime.plan, graph, cfg.runtime.workers),
                        steps * a.ppo_epochs * a.mini_batches)
    try:
        sampler = PromptSampler(len(executor_prompts(cfg)), cfg.seed, cfg.data.shuffle)
        times = []
        for step in range(steps):
            t0 = time.perf_counter()
            row = executor.step(step, {"prompts": sampler.next(cfg.rollout.prompts_per_step), "kl_coef": cfg.algo.kl_coef})
            times.append(time.perf_counter() - t0)
            if metrics is not None:
                metrics.append(row)
        return times, executor.timeline
    finally:
        executor.shutdown()


def executor_prompts(cfg) -> list:
    from reflow.models.load import load_tokenizer
    from reflow.runtime.data import WorkerData

    return WorkerData(cfg, load_tokenizer(cfg.actor.path)).train_prompts



def one_rank_plan(graph, world_size: int):
    """Every call on rank 0 as d1t1p1: the calls run one after another, with no parallelism, no weight
    copies and no core sharing, so each call's time is its own work plus the runtime's per-call cost."""
    from reflow.parallel.layout import Layout
    from reflow.runtime.plan import Placement, Plan

    return Plan("one-rank", world_size, {c: Placement((0,), Layout(1, 1, 1)) for c in graph.order})


def measure_runtime_calls(cfg, workers: int, prompts: list[int], steps: int = 8, warmup: int = 2) -> list[dict]:
    """The workload's own calls in the runtime: `cfg` (an RLConfig) on `workers` Ray workers under
    one_rank_plan, once per prompts_per_step in `prompts` (the other
    workers idle, as in a real run's Ray session). Per run: {"prompts", "step" (median time/step after
    `warmup`), "calls" ({call: median seconds on its first rank, from the workers' timelines}), "cfg",
    "lengths" (the response-length quantiles of those steps: what the planner predicts them from)}.
    Nothing is saved (steps run without `train`)."""
    import copy
    import logging
    import shutil
    import tempfile

    from reflow.planner.config import lengths_of
    from reflow.runtime.graphs import graph_for

    root = Path(tempfile.mkdtemp(prefix="reflow-profile-calls-"))
    plan = one_rank_plan(graph_for(cfg), workers)
    plan_path = root / f"plan-{plan.name}.yaml"
    plan.save(plan_path)
    runs = []
    level = logging.getLogger("reflow").level
    logging.getLogger("reflow").setLevel(logging.WARNING)
    try:
        for n in prompts:
            c = copy.deepcopy(cfg)
            c.output_dir = str(root / f"run-{n}")
            c.rollout.prompts_per_step = n
            c.trainer.steps, c.trainer.save_every, c.trainer.progress = steps, 0, False
            c.runtime.workers, c.runtime.plan, c.runtime.timeline = workers, str(plan_path), True
            rows: list[dict] = []
            steps_s, events = timed_steps(c, steps, rows)
            steps_s = steps_s[warmup:]
            per_call: dict[str, list[float]] = {}
            first = {name: pl.ranks[0] for name, pl in plan.calls.items()}
            for e in events:
                if e["step"] >= warmup and e["rank"] == first.get(e["name"]):
                    per_call.setdefault(e["name"], []).append(e["end"] - e["start"])
            runs.append({"prompts": n, "plan": plan.name, "cfg": c, "lengths": lengths_of(rows[warmup:], steps),
                         "step_samples": steps_s, "call_samples": per_call,
                         "step": statistics.median(steps_s),
                         "calls": {k: statistics.median(v) for k, v in per_call.items()}})
    finally:
        logging.getLogger("reflow").setLevel(level)
        shutil.rmtree(root, ignore_errors=True)
    return runs
