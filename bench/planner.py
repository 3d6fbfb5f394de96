"""Plan search on this machine's CPU workers: predicted vs measured iteration time for several plans of the
bundled PPO workload, and whether the searched plan is no slower than the best built-in plan.

    .venv/bin/python bench/planner.py [--workers 4] [--steps 10] [--warmup 3] [--rounds 2] [--hardware hw.yaml]
                                      [--preset tiny-llama] [--out bench/results/planner.md]

1. Calibration: `reflow profile --config ppo.yaml` (reflow.planner.profile) on --workers processes ->
   hardware figures (skipped with --hardware FILE: figures from an earlier profile). Besides the
   microbenchmarks, shared cores are measured on Ray actors like the runtime's workers, and the workload's
   own calls are timed in the runtime under a calibration plan that is not one of the plans below (every
   call on rank 0, d1t1p1, at 16 and 4 prompts per step): per-kind scales and the per-call cost. The search
   uses these figures. The calibration plan runs again after each round, and the predictions use the
   figures refitted from all of its runs: this machine's speed drifts by 10-30% over minutes, and a
   calibration taken at one moment predicts that moment, not the ten minutes of measurement.
2. Workload: PPO (actor, critic, reference, reward function `exact_match`: six calls) with a random
   `tiny-llama` actor / critic (0.9M parameters, fp32), addition prompts (reflow.data.tasks), 16 prompts x 4
   samples per step, 16 new tokens, one PPO epoch and one mini-batch.
3. Plans: colocate, separate (built-in), three hand-written YAML plans, and the plan `reflow plan search`
   finds for the calibrated hardware (seed 0). Each one's prediction is the planner's simulated iteration
   time (reflow.planner.evaluate).
4. Measurement: one Ray session (started here, reused by every run), `RLExperiment(cfg).run()` per plan on
   --workers workers, --rounds times (alternating the order of the plans); iteration time = median of
   metrics "time/step" over the steps after --warmup of every run of the plan.

Writes --out (markdown: table, command, machine, load average, interpretation) and prints
`BENCH_SUMMARY {json}` last (read by bench/run_all.py). About 8-10 minutes on the project's 2-core machine (2 rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, load_avg, python_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench" / "planner"

# hand-written plans for PPO on 4 workers: call -> (ranks, layout)
CUSTOM = {
    "pairs": {  # the actor side on 0-1, the critic side on 2-3, each data parallel over its pair
        "actor_gen": ("0-1", "d2t1p1"), "reward": ("0-1", "d2t1p1"), "ref_inf": ("0-1", "d2t1p1"),
        "critic_inf": ("2-3", "d2t1p1"), "actor_train": ("0-1", "d2t1p1"), "critic_train": ("2-3", "d2t1p1")},
    "tp-gen": {  # the actor trains on 0-1 and generates tensor parallel on 2-3 (a reallocation every step)
        "actor_gen": ("2-3", "d1t2p1"), "reward": ("2", "d1t1p1"), "ref_inf": ("3", "d1t1p1"),
        "critic_inf": ("0-1", "d2t1p1"), "actor_train": ("0-1", "d2t1p1"), "critic_train": ("2-3", "d2t1p1")},
    "pipeline": {  # pipeline + data parallel actor training, 4 generation replicas, pipelined reference
        "actor_gen": ("0-3", "d4t1p1"), "reward": ("2-3", "d2t1p1"), "ref_inf": ("0-1", "d1t1p2"),
        "critic_inf": ("2-3", "d2t1p1"), "actor_train": ("0-3", "d2t1p2"), "critic_train": ("2-3", "d2t1p1")},
}


def setup(preset: str) -> Path:
    """Model, data and the PPO config (YAML) under runs/bench/planner."""
    from reflow.data.tasks import write_task
    from reflow.models.presets import init_model

    model, data = WORK / f"model-{preset}", WORK / "data"
    if not (model / "config.json").is_file():
        init_model(preset, model, seed=0)
    if not (data / "train.jsonl").is_file():
        write_task("addition", data, n_train=500, n_test=16, seed=0)
    cfg = WORK / "ppo.yaml"
    cfg.write_text(f"""# bench/planner.py: PPO on the addition task with a random {preset} actor and critic
output_dir: {WORK / 'run'}
actor: {{path: {model}, micro_batch_tokens: 4096, optim: {{lr: 1.0e-4}}}}
critic: {{micro_batch_tokens: 4096, optim: {{lr: 1.0e-4}}}}
reward: {{fn: exact_match}}
data: {{train: {data / 'train.jsonl'}, eval: null, max_prompt_len: 16}}
rollout: {{prompts_per_step: 16, n: 4, max_new_tokens: 16}}
algo: {{name: ppo, kl_coef: 0.01, ppo_epochs: 1, mini_batches: 1}}
trainer: {{steps: 10, progress: false}}
runtime: {{workers: 4}}
""")
    return cfg


def measure(cfg_path: Path, plan: str, workers: int, steps: int, warmup: int, tag: str) -> dict:
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.experiments.rl import RLExperiment

    cfg = load_config(RLConfig, str(cfg_path), [f"runtime.workers={workers}", f"runtime.plan={plan}",
                                                 f"trainer.steps={steps}", f"output_dir={WORK / ('run-' + tag)}",
                                                 "trainer.save_every=0", "runtime.timeline=true"])
    t0 = time.perf_counter()
    exp = RLExperiment(cfg)
    started = time.perf_counter() - t0
    try:
        exp.run()  # (it saves a checkpoint at the last step: cheap for this model)
        history = exp.history
    finally:
        exp.shutdown()
    times = [m["time/step"] for m in history]
    kept = times[warmup:]
    return {"times": times, "median": statistics.median(kept), "min": min(kept), "max": max(kept),
            "startup": started}


def figures(hw) -> str:
    return (f"{hw.flops / 1e9:.1f} GFLOP/s, scales generate {hw.generate_scale:.2f} infer {hw.infer_scale:.2f} "
            f"train {hw.train_scale:.2f}, layer overhead {hw.layer_overhead * 1e6:.0f} us, decode step overhead "
            f"{hw.step_overhead * 1e3:.2f} ms, link {hw.intra_bw / 1e9:.2f} GB/s + {hw.intra_lat * 1e6:.0f} us, "
            f"optimizer {hw.optimizer_overhead * 1e3:.1f} ms, reallocation {hw.realloc_overhead * 1e3:.0f} ms, "
            f"call {hw.call_overhead * 1e3:.1f} ms, cores {hw.cores_per_node or 0:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps per plan (the first --warmup are not counted)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs per plan, in alternating plan order")
    ap.add_argument("--hardware", help="hardware YAML from `reflow profile` (default: profile now)")
    ap.add_argument("--preset", default="tiny-llama", help="model preset of the actor / critic")
    ap.add_argument("--seed", type=int, default=0, help="search seed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)
    t_start = time.perf_counter()
    load_start = load_avg()
    WORK.mkdir(parents=True, exist_ok=True)

    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.planner.config import problem_for_config
    from reflow.planner.hardware import GB, Hardware
    from reflow.planner.fit import workload_fit
    from reflow.planner.profile import measured_for_yaml, profile
    from reflow.planner.runtime_timing import measure_runtime_calls
    from reflow.planner.search import search
    from reflow.planner.simulator import evaluate
    from reflow.runtime.plan import BUILTIN, Plan

    cfg_path = setup(args.preset)
    meas = None
    if args.hardware:
        hw = Hardware.load(args.hardware)
        hw_path = Path(args.hardware)
        profile_s = 0.0
        print(f"hardware from {hw_path}")
    else:
        t0 = time.perf_counter()
        fit, meas = profile(args.workers, args.preset, config=load_config(RLConfig, str(cfg_path)))
        profile_s = time.perf_counter() - t0
        hw = fit.hardware
        hw_path = WORK / "hardware.yaml"
        hw.save(hw_path, measured_for_yaml(meas, fit))
        print(fit.report())
        print(f"profile: {profile_s:.0f} s -> {hw_path}")
    print("fitted:", figures(hw))

    cfg = load_config(RLConfig, str(cfg_path), [f"runtime.workers={args.workers}"])
    # the response lengths the calibration runs generated (what the figures were fitted with), else the budget
    lengths = meas["workload_runs"][0].get("lengths") if meas is not None else None
    problem = problem_for_config(cfg, args.workers, hw, lengths=lengths)
    graph = problem.graph
    configs = problem.model_configs()
    t0 = time.perf_counter()
    res = search(problem, seed=args.seed)
    search_s = time.perf_counter() - t0
    plans: dict[str, Plan] = {name: build(graph, args.workers) for name, build in BUILTIN.items()}
    if args.workers == 4:
        for name, spec in CUSTOM.items():
            plans[name] = Plan.from_dict({"calls": {c: {"ranks": r, "layout": lay} for c, (r, lay) in spec.items()}},
                                         args.workers, name=name)
    plans["searched"] = res.plan
    files = {}
    for name, plan in plans.items():
        plan.validate(graph, configs)
        path = WORK / f"plan-{name}.yaml"
        plan.save(path)
        files[name] = path
    print(res.report())
    print(plans["searched"].table(graph))

    import ray

    ray.init(num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}})
    calib = list(meas["workload_runs"]) if meas is not None else []
    kept: dict[str, list[float]] = {name: [] for name in plans}
    runs: dict[str, list[list[float]]] = {name: [] for name in plans}
    loads: dict[str, list[str]] = {name: [] for name in plans}
    try:
        for rnd in range(args.rounds):  # rounds in alternating order: slow drifts of the machine's load even out
            order = list(plans) if rnd % 2 == 0 else list(reversed(plans))
            for name in order:
                m = measure(cfg_path, str(files[name]), args.workers, args.steps, args.warmup, f"{name}-{rnd}")
                kept[name] += m["times"][args.warmup:]
                runs[name].append(m["times"])
                loads[name].append(load_avg().split()[0])
                print(f"round {rnd} {name:<10} median {m['median']:.3f} s  steps {[round(t, 3) for t in m['times']]} "
                      f"(start-up {m['startup']:.0f} s, load {loads[name][-1]})", flush=True)
            if meas is not None:  # the calibration plan again after each round (see the module docstring)
                full = cfg.rollout.prompts_per_step
                calib += measure_runtime_calls(cfg, args.workers, sorted({full, max(1, full // 4)}, reverse=True))
                step = next(r["step"] for r in reversed(calib) if r["prompts"] == full)
                print(f"round {rnd} calibration (one-rank plan): step {step:.3f} s", flush=True)
    finally:
        ray.shutdown()
    if meas is not None:  # the figures from every calibration run, spread over the measurement's time
        fit = workload_fit(meas, calib, args.workers, hw.name)
        hw = fit.hardware
        hw.save(hw_path, measured_for_yaml(meas, fit))
        print(fit.report())
        print("fitted (pooled calibration):", figures(hw))
        problem = dataclasses.replace(problem, hw=hw, _cache={})
    rows = []
    for name, plan in plans.items():
        pred = evaluate(problem, plan)
        med = statistics.median(kept[name])
        q = statistics.quantiles(kept[name], n=4) if len(kept[name]) >= 2 else [med, med, med]
        rows.append({"plan": name, "predicted": pred.time, "measured": med, "q1": q[0], "q3": q[2],
                     "round_medians": [statistics.median(t[args.warmup:]) for t in runs[name]],
                     "error": (pred.time - med) / med, "times": runs[name], "load": "/".join(loads[name]),
                     "peak_gb": pred.memory.max_peak() / GB,
                     "placements": "; ".join(f"{c}={plan.calls[c]}" for c in graph.order)})
        r = rows[-1]
        print(f"{name:<10} predicted {pred.time:.3f} s  measured {med:.3f} s (quartiles {r['q1']:.3f}-{r['q3']:.3f}; "
              f"per round {', '.join(f'{x:.3f}' for x in r['round_medians'])})  error {r['error']:+.0%}", flush=True)

    builtin = [r for r in rows if r["plan"] in BUILTIN]
    best_builtin = min(builtin, key=lambda r: r["measured"])
    searched = next(r for r in rows if r["plan"] == "searched")
    same_as = [n for n in BUILTIN if plans[n].calls == plans["searched"].calls]  # the search may return a built-in
    ok = searched["measured"] <= best_builtin["measured"] or best_builtin["plan"] in same_as
    within = [r for r in rows if abs(r["error"]) <= 0.15]
    worst = max(rows, key=lambda r: abs(r["error"]))
    total = time.perf_counter() - t_start
    cmd = f"{python_cmd()} bench/planner.py" + (f" --hardware {args.hardware}" if args.hardware else "")

    md = ["# Plan search: predicted vs measured iteration time (bench/planner.py)", "",
          f"command: `{cmd}` ({total / 60:.1f} min: profile {profile_s:.0f} s, search {search_s:.1f} s, "
          f"{len(rows)} plans x {args.steps} steps)", "",
          f"- machine: CPU, {cpu_name()}, {os.cpu_count()} cores; {args.workers} Ray workers (gloo, 1 thread each); "
          f"python {platform.python_version()}",
          f"- load average (1/5/15 min): {load_start} at the start, {load_avg()} at the end; per plan below",
          f"- workload: PPO (6 calls), random {args.preset} actor and critic (fp32), reward function exact_match, "
          "16 prompts x 4 samples per step, prompts <= 16 tokens, 16 new tokens, 1 epoch, 1 mini-batch",
          f"- calibrated hardware (reflow profile, {hw_path.name}): {figures(hw)}"
          + (f"; the workload's calibration plan (one-rank) measured {len(calib) // 2} times (in the profile and "
             "after each round) and pooled" if meas is not None else ""),
          f"- measured: median of metrics `time/step` over steps {args.warmup + 1}..{args.steps} of {args.rounds} run(s) "
          "per plan (plans in alternating order per round; quartiles and per-round medians shown); predicted: "
          "reflow.planner.evaluate with the calibrated figures"
          + (" (refitted from the pooled calibration runs)" if meas is not None else ""), "",
          "| plan | predicted s | measured s (median) | quartiles s | per-round medians s | error | load (1 min) after each run | placements |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['plan']} | {r['predicted']:.3f} | {r['measured']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} | "
                  f"{', '.join(f'{x:.3f}' for x in r['round_medians'])} | {r['error']:+.0%} | {r['load']} | "
                  f"{r['placements']} |")
    md += ["",
           f"- within 15%: {len(within)} of {len(rows)} plans; largest error {worst['error']:+.0%} ({worst['plan']})",
           f"- searched plan measured {searched['measured']:.3f} s vs best built-in ({best_builtin['plan']}) "
           f"{best_builtin['measured']:.3f} s: {'no slower' if ok else '**slower**'} "
           f"({best_builtin['measured'] / searched['measured']:.2f}x)"
           + (f"; the search returned the built-in plan {same_as[0]} itself (the same placements measured in "
              "two rows: their difference is this machine's noise)" if same_as else ""),
           "", "Search report:", "", "```", res.report(), "```", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    summary = {"rows": [{k: v for k, v in r.items() if k != "placements"} for r in rows],
               "within_15": len(within), "plans": len(rows), "searched_no_slower": ok, "searched_is_builtin": same_as,
               "best_builtin": best_builtin["plan"], "hardware": hw.to_dict()}
    print("BENCH_SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
