"""Execution-plan search: predict how fast a plan runs, whether it fits, and find a faster one.

    hardware.py   Hardware figures + presets (a100-80g, h100-80g, cpu); collective time formulas
    models.py     ModelShape from any HF Llama / Qwen2 config (parameters, FLOPs, KV bytes); LLaMA
                  7B/13B/34B/70B configs without weights; param_shapes (as HF names them)
    cost.py       Workload; time of a generate / infer / train call under a layout on its ranks
    realloc.py    when a call needs a reallocated copy, and what moving it costs (analytic; or exact
                  through reflow.realloc.plan.plan_reallocation)
    memory.py     per-rank peak memory of a plan; over-memory plans rejected with the reason
    simulator.py  Problem (graph, models, hardware, workload, devices); schedules the calls of several
                  iterations on their meshes -> iteration time, per-rank peak memory, timeline
    stream.py     inter-stage fusion: a streamed generate call cut at its chunks' completions (from the
                  response-length distribution), its per-sample consumers as chunk tasks
    search.py     simulated annealing over meshes and layouts per call (and the fusion setting) -> the
                  best plan that fits, with the built-in plans' predicted times for comparison
    config.py     a Problem from an RL config (`reflow train` YAML), with the response lengths a run of it
                  measured
    whatif.py     PPO with LLaMA 7B..70B on 16..128 simulated A100s: searched vs built-in plans
    profile.py    calibration (`reflow profile`): measure these devices, fit the Hardware figures
                  (Hardware.save / Hardware.load: the YAML `reflow plan search --hardware` reads), from
      microbench.py      the devices' micro-benchmarks (compute, decode, AdamW, copies, collectives,
                         reallocation, tensor parallel, FSDP, the cores Ray actors share)
      runtime_timing.py  the runtime's own costs (Ray call chains, the workload's calls on one rank)
      fit.py             least squares from those measurements to the Hardware figures

    from reflow.planner import search, evaluate
    from reflow.planner.whatif import ppo_problem
    result = search(ppo_problem("13b", 32), seed=0)
    print(result.report()); result.plan.save("plan.yaml")

The hardware presets are commonly cited figures, not measurements: predictions are for an idealised
implementation; `reflow profile` calibrates them on the current devices (bench/planner.py compares the
calibrated predictions with measured runtime iterations).
"""

from reflow.planner.cost import CallCost, Workload, call_cost
from reflow.planner.hardware import PRESETS, Hardware, hardware
from reflow.planner.memory import MemoryReport, plan_memory
from reflow.planner.models import ModelShape, llama_config, param_shapes
from reflow.planner.realloc import realloc_cost, realloc_cost_exact
from reflow.runtime.plan import needs_copy
from reflow.planner.search import PlanSearchError, SearchResult, search
from reflow.planner.simulator import Evaluation, Problem, evaluate, simulate

__all__ = ["CallCost", "Evaluation", "Hardware", "MemoryReport", "ModelShape", "PRESETS", "PlanSearchError",
           "Problem", "SearchResult", "Workload", "call_cost", "evaluate", "hardware", "llama_config",
           "needs_copy", "param_shapes", "plan_memory", "realloc_cost", "realloc_cost_exact", "search", "simulate"]
