"""What-if planning: PPO on a cluster one does not have, from model shapes and hardware presets.

    rows = whatif_table()                  # LLaMA 7B/13B/34B/70B actor on 16..128 simulated A100-80G
    print(format_table(rows))

Setup (ReaL-style PPO): the actor and the reference have the size of the row (LLaMA-2 7B/13B/70B,
CodeLlama-34B shapes), the critic and the reward model are LLaMA-7B shaped (critic: value head, reward:
score head); bf16 weights in calls, fp32 master weights + Adam in the train calls (memory.py).
Workload: 1024 sequences per iteration, 256 prompt + 256 generated tokens each (the DeepSpeed-Chat
benchmark setting: 1024 query-answer pairs of 256 + 256 tokens per step), one optimizer step per train
call, micro-batches of 8192 tokens, activation checkpointing in training.

Every row: the searched plan's predicted seconds per iteration, next to the built-in plans (colocate,
separate) as reflow.runtime.plan builds them (all calls d=N data parallel; often over memory for large
models: shown with the reason) and with their layouts tuned per call (same meshes, best layout of each
call: what a careful user would write by hand).

Published figures: only what the search corpus of this project holds, quoted with their setups, which
are not this table's setup (other GPUs, model sizes or lengths): they are context, not a validation.
    OpenRLHF  seconds for 1024 prompts, 1 PPO epoch, A800 GPUs (blog.gitcode.com summary of the
              OpenRLHF/DeepSpeed-Chat comparison; lengths and critic/reward sizes not stated there)
    ReaL      the ReaLHF docs (openpsi-project.github.io/ReaLHF/intro.html) give only a whole-run estimate
              for 4 x 70B models (4 iterations x 400 steps): ReaL 17.0 h, DeepSpeed-Chat 141.5 h,
              OpenRLHF 152.8 h; the GPU count is not stated there -> no per-row figure ("n/a")
    verl      only throughput ratios found (1.53x-20.57x over DeepSpeed-Chat / OpenRLHF / NeMo-Aligner,
              HybridFlow paper summaries), no absolute times -> "n/a"
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from reflow.planner.cost import Workload
from reflow.planner.hardware import hardware
from reflow.planner.models import ModelShape, llama_config
from reflow.planner.search import PlanSearchError, search
from reflow.planner.simulator import Problem
from reflow.runtime.graph import Graph
from reflow.runtime.graphs import ppo

WHATIF_WORKLOAD = Workload(batch=1024, prompt_len=256, gen_len=256, mini_batches=1, epochs=1,
                           micro_tokens=8192, checkpointing=True)

# (actor size, GPUs) -> published figure, with its setup (see the module docstring)
PUBLISHED = {
    ("7b", 16): "OpenRLHF 471.1 s, DSChat 855.1 s (A800; 1024 prompts, 1 PPO epoch)",
    ("13b", 32): "OpenRLHF 608.9 s, DSChat 1528.9 s (A800; 1024 prompts, 1 PPO epoch)",
    ("34b", 32): "OpenRLHF 1526.4 s, DSChat 3635.0 s (A800; 1024 prompts, 1 PPO epoch)",
    ("70b", 32): "OpenRLHF 4488.5 s, DSChat 10407.0 s (A800; 1024 prompts, 1 PPO epoch)",
}


def ppo_problem(size: str, devices: int, hw="a100-80g", workload: Workload | None = None,
                critic_size: str = "7b", reward_size: str = "7b", graph: Graph | None = None) -> Problem:
    """PPO with a `size` actor and reference, `critic_size` critic and `reward_size` reward model."""
    actor = ModelShape.of(llama_config(size), "lm")
    models = {"actor": actor, "ref": actor, "critic": ModelShape.of(llama_config(critic_size), "value"),
              "reward": ModelShape.of(llama_config(reward_size), "score")}
    return Problem(graph or ppo(), models, hardware(hw), workload or WHATIF_WORKLOAD, devices)


@dataclass
class WhatIfRow:
    size: str
    devices: int
    searched: float | None  # seconds per iteration (None: no plan fits)
    colocate: float | None  # as built (None: over memory)
    separate: float | None
    colocate_tuned: float | None
    separate_tuned: float | None
    plan: str  # the searched plan, compact
    note: str  # why a column is empty
    published: str
    search_seconds: float

    @property
    def best_builtin(self) -> float | None:
        vals = [v for v in (self.colocate, self.separate) if v is not None]
        return min(vals) if vals else None

    @property
    def best_tuned(self) -> float | None:
        vals = [v for v in (self.colocate_tuned, self.separate_tuned) if v is not None]
        return min(vals) if vals else None


def _compact(plan, graph) -> str:
    return "; ".join(f"{n}={plan.calls[n]}" for n in graph.order)


def whatif_table(sizes=("7b", "13b", "34b", "70b"), devices=(16, 32, 64, 128), hw="a100-80g",
                 workload: Workload | None = None, critic_size: str = "7b", seed: int = 0,
                 steps: int | None = None, progress=None) -> list[WhatIfRow]:
    """Search a plan for every (size, devices) and compare it with the built-in plans (module docstring).
    progress: optional callable(row) called as rows complete."""
    rows = []
    for size in sizes:
        for n in devices:
            problem = ppo_problem(size, n, hw, workload, critic_size)
            t0 = time.perf_counter()
            try:
                res = search(problem, seed=seed, steps=steps)
            except PlanSearchError as e:
                row = WhatIfRow(size, n, None, None, None, None, None, "-", str(e)[:300],
                                PUBLISHED.get((size, n), "n/a"), time.perf_counter() - t0)
            else:
                b = res.baselines
                t = lambda k: b[k].time if b[k].feasible else None  # noqa: E731
                notes = [f"{k}: {e.reason}" for k, e in b.items() if not e.feasible and "tuned" not in k]
                row = WhatIfRow(size, n, res.time, t("colocate"), t("separate"), t("colocate (tuned)"),
                                t("separate (tuned)"), _compact(res.plan, problem.graph), " | ".join(notes)[:400],
                                PUBLISHED.get((size, n), "n/a"), res.seconds)
            rows.append(row)
            if progress:
                progress(row)
    return rows


def format_table(rows: list[WhatIfRow]) -> str:
    """A markdown table of the rows (seconds per iteration; 'OOM' = over memory as built)."""
    f = lambda v: f"{v:.1f}" if v is not None else "OOM"  # noqa: E731
    out = ["| actor | GPUs | searched s | colocate s | separate s | colocate tuned s | separate tuned s | "
           "speed-up vs best built-in | vs best tuned | published (other setups) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.searched is None:
            out.append(f"| {r.size} | {r.devices} | no plan fits | OOM | OOM | OOM | OOM | - | - | {r.published} |")
            continue
        sp = f"{r.best_builtin / r.searched:.2f}x" if r.best_builtin else "built-ins OOM"
        st = f"{r.best_tuned / r.searched:.2f}x" if r.best_tuned else "-"
        out.append(f"| {r.size} | {r.devices} | {f(r.searched)} | {f(r.colocate)} | {f(r.separate)} | "
                   f"{f(r.colocate_tuned)} | {f(r.separate_tuned)} | {sp} | {st} | {r.published} |")
    return "\n".join(out)
