"""Calibration (`reflow profile`): measure the current devices and fit the Hardware figures the cost model
predicts from, so that its predictions are for these devices rather than for preset figures.

    reflow profile [--workers N] [--model-preset tiny-llama] [--config rl.yaml] [--out hardware.yaml]
    hw = Hardware.load("hardware.yaml")           # or: reflow plan search ... --hardware hardware.yaml

This module runs the steps in order; each is its own module:

    microbench.py      the devices, one small operation at a time on N processes: compute, decode steps,
                       AdamW, memory copies, collectives, reallocation, tensor parallel, FSDP, and the
                       cores N Ray actors really share
    runtime_timing.py  the runtime's own costs: Ray call dispatch and data hops, then either a fixed-cost
                       PPO step or (--config) the workload's own calls under a one-rank calibration plan
    fit.py             the Hardware figures from those measurements (cost.py's formulas, least squares)

The fitted figures describe one node (inter-node figures = intra-node ones, devices_per_node = N);
tiny models on CPU are dominated by the fixed overheads, which is why they are fitted rather than assumed.
Every measurement and its fitted prediction are kept under `measured:` in the YAML.
"""

from __future__ import annotations

from reflow.planner.fit import Fit, fit_call_overhead, fit_hardware, measured_shape, workload_fit
from reflow.planner.microbench import measure, measure_ray_sharing
from reflow.planner.runtime_timing import measure_call_overhead, measure_runtime_calls, measure_runtime_step


def profile(workers: int = 4, preset: str = "tiny-llama", quick: bool = False, ray_calls: bool = True,
            name: str | None = None, config=None) -> tuple[Fit, dict]:
    """Measure on `workers` local processes and fit (see the module docstring): (Fit, raw measurements)."""
    from reflow.models.presets import PRESETS, PresetError
    from reflow.parallel.launch import launch

    if preset not in PRESETS:
        raise PresetError(f"unknown model preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if config is not None:  # a bad config fails here, in one line, before minutes of measuring
        from reflow.planner.config import problem_for_config

        problem_for_config(config, workers)
    meas = launch(measure, workers, args=(preset, quick), timeout_s=300.0)[0]
    if ray_calls:
        meas["call"], meas["call_local"] = measure_call_overhead(workers)
        if workers > 1:
            meas["data_hop"] = max(0.0, meas["call"] - meas["call_local"])
    shape = measured_shape(meas)
    dev = "cuda" if meas["device"] == "cuda" else "cpu"
    cores = None
    if ray_calls and dev == "cpu" and workers > 1:  # shared cores as Ray workers see them
        threads = config.runtime.threads_per_worker if config is not None else 1
        cores, meas["sharing_rows"] = measure_ray_sharing(workers, preset, threads)
        meas["ray_cores"] = cores
    name = name or f"{dev}-profiled-{workers}"
    fit = fit_hardware(meas, shape, name, cores=cores)
    fit.table += meas.get("sharing_rows", [])
    if config is not None:  # the workload's own calls in the runtime: per-kind scales and per-call cost
        full = config.rollout.prompts_per_step
        meas["workload_runs"] = measure_runtime_calls(config, workers, sorted({full, max(1, full // 4)}, reverse=True))
        fit = workload_fit(meas, meas["workload_runs"], workers, name)
    elif ray_calls and workers > 1:
        from reflow.planner.config import problem_for_config
        from reflow.runtime.plan import separate

        step, cfg = measure_runtime_step(workers)
        problem = problem_for_config(cfg, workers, fit.hardware)
        plan = separate(problem.graph, workers)
        call = fit_call_overhead(step, problem, plan)
        fit.hardware = fit.hardware.with_(call_overhead=call)
        meas["runtime_step"] = step
        fit.table.append(("runtime step, debug model, separate plan", step, step))
    return fit, meas


def measured_for_yaml(meas: dict, fit: Fit) -> dict:
    """The raw measurements as plain YAML values, with the fitted predictions."""
    return {"preset": meas["preset"], "device": meas["device"], "world": meas["world"],
            "rows": [{"what": n, "measured_s": float(f"{t:.6g}"), "fitted_s": float(f"{p:.6g}")}
                     for n, t, p in fit.table],
            "alone_s": meas["alone"], "together_s": meas["together"]}
