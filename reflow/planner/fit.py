"""Fitting for calibration (`reflow profile`): from the micro-benchmarks (microbench.py) and the runtime's
own timings (runtime_timing.py) to the Hardware figures, through cost.py's formulas: least squares on
relative error with non-negative coefficients (`fit_linear`), so that every figure is the one that makes
the cost model reproduce what was measured on these devices.

    forward(T)          = (L F_layer(T, S/2) + F_head(T)) / F + L layer_overhead
    forward+backward(T) = 3 x the same (backward = 2 forwards, the cost model's rule)
    decode step (b, c)  = (L F_layer(b, c) + F_head(b)) / F + L layer_overhead + step_overhead
        -> F (flops, matmul_efficiency = 1), layer_overhead, step_overhead
    collectives         all_reduce = 2 (n-1)/n B / bw + 2 ceil(log2 n) lat; broadcast = B / bw + ceil(log2 n) lat;
                        send/recv = B / bw + lat                                  -> intra_bw, intra_lat
    optimizer_overhead  = AdamW step time - 28 bytes x parameters / mem_bw
    tp_overhead         = mean over the tp forward and decode step of (measured - predicted without it) / L
    fsdp_overhead       per FSDP unit (L + 1 units), least squares over: FSDP forward - replica forward = AG +
                        (L + 1) x it, and FSDP forward+backward - replica's = 3 AG + 3 (L + 1) x it (two
                        gathers and a reduce-scatter, which costs as much as a gather)
    shared cores        measurements taken with k ranks busy at once (collectives, reallocation, FSDP)
                        are converted to full-speed time: x min(1, cores / k), since the simulator
                        shares the cores again when it schedules them
    realloc_overhead    = measured reallocation - planner.realloc's prediction with the fitted link
    data_hop            = Ray chain time per call across workers - the same chain on one worker
    dispatch            = Ray chain time per call (a chunk task of a streamed call pays it, not call_overhead)
    call_overhead       = the value that makes the simulator's time for that runtime step equal the measured
                        one (bisection); without Ray: Ray chain time / hops
    with --config:
    <kind>_scale        measured call = <kind>_scale x the model's own work for it + c, over the one-rank
                        calls (fit_call_scales; c, a per-call cost shared by all kinds, is only reported)
    call_overhead       as above, for the one-rank plan's measured step
    shared cores        with Ray: the Ray actors' figure (measure_ray_sharing) instead of the bare processes'
                        one, for the simulator and for the conversions to full-speed time

The workload's calibration runs are pooled per plan and size first (`pool_runs`): on a shared machine
the speed drifts over minutes, and runs spread over a measurement describe that time better than one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from reflow.planner.hardware import Hardware
from reflow.planner.runtime_timing import one_rank_plan


def fit_linear(rows: list[tuple[list[float], float]], relative: bool = True) -> list[float]:
    """Non-negative least squares: x >= 0 minimising sum_i w_i (a_i . x - t_i)^2, with w_i = 1 / t_i^2 when
    `relative` (every measurement counts by its relative error, so microsecond latencies and second-long
    passes weigh alike). rows: (a_i, t_i). Columns that no row uses come back 0. Active-set method
    (Lawson-Hanson) on a handful of unknowns."""
    import numpy as np

    A = np.array([a for a, _ in rows], dtype=float)
    t = np.array([y for _, y in rows], dtype=float)
    if relative:
        w = 1.0 / np.maximum(np.abs(t), 1e-12)
        A, t = A * w[:, None], t * w
    n = A.shape[1]
    scale = np.maximum(np.abs(A).max(axis=0), 1e-300)  # columns of very different magnitudes (FLOPs vs 1)
    As = A / scale
    passive: list[int] = []
    x = np.zeros(n)
    for _ in range(3 * n + 10):
        grad = As.T @ (t - As @ x)
        cand = [j for j in range(n) if j not in passive and grad[j] > 1e-12 and np.abs(As[:, j]).sum() > 0]
        if not cand:
            break
        passive.append(max(cand, key=lambda j: grad[j]))
        while True:
            z = np.zeros(n)
            sol, *_ = np.linalg.lstsq(As[:, passive], t, rcond=None)
            z[passive] = sol
            if all(z[j] > 0 for j in passive):
                x = z
                break
            neg = [j for j in passive if z[j] <= 0]
            alpha = min(x[j] / (x[j] - z[j]) for j in neg)
            x = x + alpha * (z - x)
            passive = [j for j in passive if x[j] > 1e-15]
            if not passive:
                break
    return [float(v) for v in x / scale]


@dataclass
class Fit:
    hardware: Hardware
    table: list[tuple[str, float, float]]  # (measurement, measured s, fitted s)

    def report(self) -> str:
        lines = [f"{'measurement':<44} {'measured':>11} {'fitted':>11} {'error':>7}"]
        for name, t, p in self.table:
            lines.append(f"{name:<44} {_fmt(t):>11} {_fmt(p):>11} {(p - t) / t:>+7.0%}")
        return "\n".join(lines)


def _fmt(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def fit_hardware(meas: dict, shape, name: str = "profiled", scales: dict[str, float] | None = None,
                 cores: float | None = None) -> Fit:
    """The Hardware figures from the measurements microbench.measure returns (see the module docstring).
    shape: the ModelShape of the model measured; scales: {call kind: hw.<kind>_scale} from
    fit_call_scales (the tensor-parallel residual is then taken over the scaled own work); cores: the
    shared-core figure to use instead of the one from the bare processes (measure_ray_sharing's)."""
    L = shape.layers
    rows, labels = [], []

    def pass_flops(tokens, context):
        return L * shape.layer_flops(tokens, context) + shape.head_flops(tokens)

    def pass_flops_t(tokens, context, t):  # one tensor-parallel rank's share (the head is not split)
        return L * shape.layer_flops(tokens, context) / t + shape.head_flops(tokens)

    for (b, s), t in meas["forward"]:
        rows.append(([pass_flops(b * s, s / 2), L, 0.0], t))
        labels.append(f"forward {b}x{s} tokens")
    for (b, s), t in meas["forward_backward"]:
        rows.append(([3 * pass_flops(b * s, s / 2), 3 * L, 0.0], t))
        labels.append(f"forward+backward {b}x{s} tokens")
    for (b, p, g), t in meas["decode_step"]:
        rows.append(([pass_flops(b, p + g / 2), L, 1.0], t))
        labels.append(f"decode step, batch {b}, {p}+{g} keys")
    inv_f, layer_oh, step_oh = fit_linear(rows)
    flops = 1.0 / inv_f if inv_f > 0 else 1e15
    table = [(lab, t, sum(c * x for c, x in zip(a, (inv_f, layer_oh, step_oh))))
             for lab, (a, t) in zip(labels, rows)]

    n = meas["world"]
    if cores is None and meas.get("device") == "cpu" and n > 1:
        cores = max(1.0, min(float(n), n * meas["alone"] / meas["together"]))

    def work(t, busy):
        """Elapsed time with `busy` ranks computing at once -> time at full speed (CPU cores shared)."""
        return t * min(1.0, cores / busy) if cores else t
    crow, clab = [], []
    lg = math.ceil(math.log2(n)) if n > 1 else 0
    for nbytes, t in meas["all_reduce"]:
        crow.append(([2 * (n - 1) / n * nbytes, 2 * lg], work(t, n)))
        clab.append(f"all_reduce {nbytes / 1e6:g} MB on {n}")
    for nbytes, t in meas["broadcast"]:
        crow.append(([nbytes, max(1, lg)], work(t, n)))
        clab.append(f"broadcast {nbytes / 1e6:g} MB on {n}")
    for nbytes, t in meas["send_recv"]:
        crow.append(([nbytes, 1.0], work(t, 2)))
        clab.append(f"send/recv {nbytes / 1e6:g} MB")
    if crow:
        inv_bw, lat = fit_linear(crow)
        table += [(lab, t, a[0] * inv_bw + a[1] * lat) for lab, (a, t) in zip(clab, crow)]
        bw = 1.0 / inv_bw if inv_bw > 0 else 1e12
    else:  # one device: nothing to measure
        bw, lat = 1e12, 0.0

    mem_bw = meas["copy_bytes"] / meas["copy"]
    table.append((f"copy {meas['copy_bytes'] / 2e6:.0f} MB", meas["copy"], meas["copy"]))
    opt = max(0.0, meas["optimizer"] - 28 * shape.params / mem_bw)
    table.append(("optimizer step (AdamW)", meas["optimizer"], opt + 28 * shape.params / mem_bw))
    hw = Hardware(name, flops=flops, mem_bw=mem_bw, memory=meas["memory"], intra_bw=bw, intra_lat=lat,
                  inter_bw=bw, inter_lat=lat, devices_per_node=max(n, 1), matmul_efficiency=1.0,
                  memory_efficiency=1.0, reserved=meas.get("reserved", 0.0), layer_overhead=layer_oh,
                  step_overhead=step_oh, optimizer_overhead=opt, call_overhead=meas.get("call", 0.0),
                  dispatch=meas.get("call", 0.0), data_hop=meas.get("data_hop", 0.0),
                  cores_per_node=cores, **{f"{k}_scale": v for k, v in (scales or {}).items()})
    if meas.get("realloc"):
        from reflow.planner.cost import _owner_gather, placement
        from reflow.planner.realloc import realloc_cost

        pl = placement(f"d{n}t1p1", range(n))
        w = work(meas["realloc"], n)
        pred = realloc_cost(shape, pl, pl, hw.with_(realloc_overhead=0.0), src_sharded=True).time
        hw = hw.with_(realloc_overhead=max(0.0, w - pred))
        table.append((f"reallocation d{n}t1p1 owner -> {n} replicas (work)", w, max(pred, w)))
        # per FSDP unit (layers + root) and gather / reduce-scatter: cost.py charges units x it per forward
        # on the owner copy and 3 units x it per train micro-batch (two gathers, one reduce-scatter)
        units = shape.layers + 1
        gather = _owner_gather(shape, pl, hw)
        extra = work(meas["fsdp_forward"] - meas["replica_forward"], n)
        frows = [([units], max(extra - gather, 1e-9), extra, gather)]
        if "fsdp_forward_backward" in meas:
            extra_t = work(meas["fsdp_forward_backward"] - meas["replica_forward_backward"], n)
            frows.append(([3 * units], max(extra_t - 3 * gather, 1e-9), extra_t, 3 * gather))
        oh, = fit_linear([(a, y) for a, y, _, _ in frows])
        hw = hw.with_(fsdp_overhead=oh)
        for (a, _, ex, g), what in zip(frows, ("forward", "forward+backward")):
            table.append((f"FSDP {what} d{n} - replica {what} (work)", ex, g + a[0] * oh))
    if meas.get("tp_forward") and meas.get("tp_decode_step"):
        (b, s_), t_fwd = meas["tp_forward"]
        (db, dp, dg), t_dec = meas["tp_decode_step"]
        ar = hw.all_reduce
        sc_i, sc_g = hw.infer_scale, hw.generate_scale
        pred_fwd = (sc_i * (pass_flops_t(b * s_, s_ / 2, 2) / hw.flops + L * layer_oh)
                    + 2 * L * ar(b * s_ * shape.hidden * shape.dtype_bytes, (0, 1)))
        pred_dec = (sc_g * (pass_flops_t(db, dp + dg / 2, 2) / hw.flops + L * layer_oh + step_oh)
                    + 2 * L * ar(db * shape.hidden * shape.dtype_bytes, (0, 1)))
        w_fwd, w_dec = work(t_fwd, 2), work(t_dec, 2)
        per_layer = [max(0.0, w_fwd - pred_fwd) / L, max(0.0, w_dec - pred_dec) / L]
        hw = hw.with_(tp_overhead=sum(per_layer) / 2)
        table.append((f"forward d1t2p1 {b}x{s_} tokens (work)", w_fwd, pred_fwd + L * hw.tp_overhead))
        table.append((f"decode step d1t2p1, batch {db} (work)", w_dec, pred_dec + L * hw.tp_overhead))
    if meas.get("call"):
        table.append(("call dispatch (Ray task chain, per call)", meas["call"], meas["call"]))
    if "data_hop" in meas:
        table.append(("the same chain on one worker (inputs stay local)", meas["call_local"], meas["call_local"]))
    return Fit(hw, table)



def fit_call_overhead(measured_step: float, problem, plan) -> float:
    """The per-call overhead that makes the simulator's iteration time of `plan` equal `measured_step`
    (bisection: the simulated time grows with it); 0 when the rest of the model already accounts for it."""
    import dataclasses

    from reflow.planner.simulator import evaluate

    def sim(c):
        pr = dataclasses.replace(problem, hw=problem.hw.with_(call_overhead=c), _cache={})
        return evaluate(pr, plan).time
    lo, hi = 0.0, max(measured_step, 1e-3)
    if sim(lo) >= measured_step:
        return 0.0
    while sim(hi) < measured_step:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sim(mid) < measured_step else (lo, mid)
    return (lo + hi) / 2



def fit_call_scales(runs: list[dict], workers: int, hw: Hardware) -> tuple[dict[str, float], float, list]:
    """hw.<kind>_scale per call kind from the measured calls of `runs` (measure_runtime_calls) and the cost
    model's own work p for them (call_overhead 0, scales 1): the relative non-negative least squares fit of

        measured = scale_kind x p + c

    with c a per-call cost shared by every kind (engine set-up, batch packing: what does not grow with
    the batch). c is returned for the report; the simulator's call_overhead (c plus the dispatch between
    calls) is fitted afterwards from the step time. Calls of a role without a model (reward functions)
    only carry per-call cost and are left out. Returns (scales, c, table rows (label, measured, fitted))."""
    from reflow.planner.config import problem_for_config
    from reflow.planner.simulator import evaluate

    base = hw.with_(call_overhead=0.0, generate_scale=1.0, infer_scale=1.0, train_scale=1.0)
    obs: list[tuple[str, str, float, float]] = []  # (kind, label, measured, modelled own work)
    for run in runs:
        problem = problem_for_config(run["cfg"], workers, base, lengths=run.get("lengths"))
        ev = evaluate(problem, one_rank_plan(problem.graph, workers))
        for name in problem.graph.order:
            call = problem.graph.call(name)
            if problem.models.get(call.role) is None or name not in run["calls"]:
                continue
            label = f"{name} ({call.kind}), {problem.workload.batch} sequences, one rank"
            obs.append((call.kind, label, run["calls"][name], ev.call_times[name].time))
    kinds = sorted({k for k, *_ in obs})
    if not obs:
        return {}, 0.0, []
    coef = fit_linear([([p if k == kind else 0.0 for kind in kinds] + [1.0], t) for k, _, t, p in obs])
    scales = {kind: (coef[i] or 1.0) for i, kind in enumerate(kinds)}
    c = coef[-1]
    table = [(label, t, scales[k] * p + c) for k, label, t, p in obs]
    return scales, c, table


def measured_shape(meas: dict):
    """The ModelShape of the preset model microbench.measure timed (meas["preset"], in its dtype)."""
    from reflow.models.presets import preset_config
    from reflow.models.tokenizer import build_byte_tokenizer
    from reflow.planner.models import ModelShape

    return ModelShape.of(preset_config(meas["preset"], build_byte_tokenizer()), "lm", dtype_bytes=meas["dtype_bytes"])


def pool_runs(runs: list[dict]) -> list[dict]:
    """Runs of the same plan and size taken at different times, as one each (in first-seen order): medians
    over all their steps. On a shared machine the speed drifts between runs; calibration runs spread over
    the time of a measurement (bench/planner.py) describe that time rather than one moment of it."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["plan"], r["prompts"]), []).append(r)
    out = []
    for rs in groups.values():
        steps = [x for r in rs for x in r["step_samples"]]
        calls = {k: [x for r in rs for x in r["call_samples"].get(k, [])] for k in rs[0]["call_samples"]}
        out.append(dict(rs[0], step_samples=steps, call_samples=calls, step=statistics.median(steps),
                        calls={k: statistics.median(v) for k, v in calls.items() if v}, runs=len(rs)))
    return out


def workload_fit(meas: dict, runs: list[dict], workers: int, name: str) -> Fit:
    """The figures from the micro-benchmarks `meas` (microbench.measure, plus measure_ray_sharing's
    "ray_cores") and the workload's calibration runs (measure_runtime_calls; pooled per size, the first size
    the full one): per-kind scales (fit_call_scales), the micro-benchmark fit again with them, and the
    per-call cost that makes the simulated one-rank step equal the measured one (fit_call_overhead)."""
    from reflow.planner.config import problem_for_config

    shape = measured_shape(meas)
    cores = meas.get("ray_cores")
    runs = pool_runs(runs)
    base = fit_hardware(meas, shape, name, cores=cores).hardware
    scales, per_call, rows = fit_call_scales(runs, workers, base)
    fit = fit_hardware(meas, shape, name, scales=scales, cores=cores)
    problem = problem_for_config(runs[0]["cfg"], workers, fit.hardware, lengths=runs[0].get("lengths"))
    call = fit_call_overhead(runs[0]["step"], problem, one_rank_plan(problem.graph, workers))
    fit.hardware = fit.hardware.with_(call_overhead=call)
    meas["runtime_calls"] = [{k: r[k] for k in ("prompts", "plan", "step", "calls", "runs")} for r in runs]
    meas["runtime_call_fixed"] = per_call
    n = len(runs[0]["step_samples"])
    fit.table += meas.get("sharing_rows", []) + rows + [
        (f"runtime step, the workload ({runs[0]['prompts']} prompts), one-rank plan ({n} steps)", runs[0]["step"],
         runs[0]["step"])]
    return fit
