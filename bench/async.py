"""Asynchronous training against synchronous, at the same number of samples.

    .venv/bin/python bench/async.py [--steps 12] [--workers 2 4] [--staleness 0 1 2] [--partial 2]
                                    [--model DIR [--max-new-tokens 32]] [--out bench/results/async.md]

Workload: the demo's GRPO stage (configs/grpo_addition.yaml: the SFT model of `reflow demo`, 32 prompts x 8
samples of 2-digit addition, exact-match reward, no reference), or with --model a real model's LoRA GRPO
(configs/grpo_smollm2_chat.yaml on chat_addition: generation-heavy, as RL on real models is), on Ray CPU workers (1 thread each) with
generation and training on different ranks:

    2 workers: actor_train d1t1p1 on rank 0; actor_gen and reward d1t1p1 on rank 1 (weights move 0 -> 1)
    4 workers: actor_train d2t1p1 (FSDP2) on ranks 0-1; actor_gen d2t1p1 (2 replicas) and reward on 2-3

Each configuration runs synchronously (rollout.max_staleness=0) and with max_staleness 1 and 2 (with
rollout correction tis), and with partial rollout (rollout.partial=true) at the staleness of `--partial`
(a generation spanning k updates is cut into k segments, each continued with the newest weights; at k=1 it
is the plain asynchronous run), `--steps` steps from the same SFT model and seed, all in one Ray session.
Reported: median step time after 2 warm-up steps, samples per second, the ratio to synchronous, the reward
per step (against samples and against wall time), the staleness the train calls saw (per sample, and the
mean age of the trained tokens). Needs `make demo` first (or
runs it). Prints a markdown table, writes it to --out, and prints `BENCH_SUMMARY {json}` last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLANS = {
    2: {"actor_train": ("0", "d1t1p1"), "actor_gen": ("1", "d1t1p1"), "reward": ("1", "d1t1p1")},
    4: {"actor_train": ("0-1", "d2t1p1"), "actor_gen": ("2-3", "d2t1p1"), "reward": ("2-3", "d2t1p1")},
}


def workload(model: str | None, work: Path, max_new_tokens: int) -> tuple[Path, list[str]]:
    """(config, overrides) of the benchmark's GRPO stage: the demo's (tiny-llama SFT model, 2-digit addition)
    or, with `model`, the real-model config (configs/grpo_smollm2_chat.yaml: LoRA GRPO on chat_addition)."""
    if model is None:
        return ROOT / "configs/grpo_addition.yaml", [
            f"actor.path={ROOT / 'runs/demo/sft/final'}", f"data.train={ROOT / 'data/addition/train.jsonl'}"]
    from reflow.data.tasks import write_task

    data = work / "chat_addition"
    if not (data / "train.jsonl").is_file():
        write_task("chat_addition", data, n_train=90, n_test=8, seed=0)
    return ROOT / "configs/grpo_smollm2_chat.yaml", [
        f"actor.path={model}", f"data.train={data / 'train.jsonl'}", f"rollout.max_new_tokens={max_new_tokens}"]


def run(workers: int, k: int, steps: int, work: Path, partial: bool = False, config: Path | None = None,
        overrides: list[str] = ()) -> dict:
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.experiments.rl import RLExperiment
    from reflow.runtime.graphs import graph_for
    from reflow.runtime.plan import Plan

    name = f"w{workers}-k{k}" + ("-partial" if partial else "")
    plan = work / f"plan-{name}.yaml"
    calls = dict(PLANS[workers])
    extra = ["algo.rollout_correction=tis"] if k else []
    if config is None:
        config, overrides = workload(None, work, 0)
    cfg = load_config(RLConfig, str(config), [
        *overrides, "data.eval=null", "algo.kl_metric=false", f"trainer.steps={steps}", "trainer.save_every=0",
        "trainer.progress=false", f"runtime.workers={workers}", f"runtime.plan={plan}",
        f"rollout.max_staleness={k}", f"rollout.partial={str(partial).lower()}", f"output_dir={work / name}",
        *extra])
    if "actor_inf" in graph_for(cfg).order:  # the actor's log-probs before training (several updates per step, MIS)
        calls["actor_inf"] = calls["actor_train"]
    Plan.from_dict({"calls": {c: {"ranks": r, "layout": lay} for c, (r, lay) in calls.items()}}, workers).save(plan)
    t0 = time.perf_counter()
    with RLExperiment(cfg) as exp:
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        exp.run()
        wall = time.perf_counter() - t1
        rows = exp.history
    step_s = [r["time/step"] for r in rows]
    samples = cfg.rollout.prompts_per_step * cfg.rollout.n
    median = statistics.median(step_s[2:])
    # the two phases of a synchronous step, which asynchronous training overlaps: rollout (generation, scoring)
    # and training (the trained role's calls); (rollout + train) / max(rollout, train) bounds the speed-up
    phase = {"rollout": ("actor_gen", "reward"), "train": ("actor_inf", "actor_train")}
    phases = {p: statistics.median(sum(r.get(f"time/{c}", 0.0) for c in calls) for r in rows[2:])
              for p, calls in phase.items()}
    return {"workers": workers, "k": k, "partial": partial, "median_step_s": median, "samples_per_s": samples / median,
            "phases": phases, "gen_tokens": statistics.median(r.get("gen_tokens", 0.0) for r in rows[2:]),
            "wall_s": wall, "start_s": start, "reward": [r["reward/mean"] for r in rows],
            "staleness_max": [r.get("staleness/max", 0.0) for r in rows],
            "token_staleness_mean": statistics.mean(r.get("staleness/token_mean", 0.0) for r in rows),
            "samples_per_step": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--partial", type=int, nargs="*", default=[2], help="staleness of the partial-rollout runs")
    ap.add_argument("--model", help="a real model folder (e.g. from `reflow init-model --from-gguf smollm2`): "
                                    "LoRA GRPO on chat_addition instead of the demo's tiny model")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="with --model")
    ap.add_argument("--out", default=str(ROOT / "bench/results/async.md"))
    args = ap.parse_args()
    if args.model is None and not (ROOT / "runs/demo/sft/final/config.json").is_file():
        subprocess.run([sys.executable, "-m", "reflow.cli", "demo"], cwd=ROOT, check=True)
    import ray

    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="reflow-async-") as tmp:
        config, overrides = workload(args.model, Path(tmp), args.max_new_tokens)
        for w in args.workers:
            for k, partial in [(k, False) for k in args.staleness] + [(k, True) for k in args.partial]:
                r = run(w, k, args.steps, Path(tmp), partial, config, overrides)
                results.append(r)
                print(f"workers {w} k {k}{' partial' if partial else ''}: {r['median_step_s']:.3f} s/step, "
                      f"{r['samples_per_s']:.0f} samples/s", flush=True)
    ray.shutdown()
    sync = {r["workers"]: r for r in results if r["k"] == 0 and not r["partial"]}
    samples = results[0]["samples_per_step"]
    model = (f" --model {args.model} --max-new-tokens {args.max_new_tokens}" if args.model else "")
    what = (f"LoRA GRPO of the real model {args.model} on chat_addition (configs/grpo_smollm2_chat.yaml: 4 prompts x "
            f"8 samples, up to {args.max_new_tokens} new tokens, final_number reward)" if args.model else
            "The demo's GRPO stage (configs/grpo_addition.yaml: 32 prompts x 8 samples, 6 new tokens, tiny-llama "
            "SFT model)")
    md = ["# Asynchronous vs synchronous training (bench/async.py)", "",
          f"Command: `.venv/bin/python bench/async.py --steps {args.steps} --workers {' '.join(map(str, args.workers))} "
          f"--staleness {' '.join(map(str, args.staleness))} --partial {' '.join(map(str, args.partial))}{model}`. "
          f"{what} on Ray CPU workers of this machine, generation and training on different ranks (see the module "
          "docstring); median step time after 2 warm-up steps. The rollout and train phases are the median call "
          "times of each run's steps, response tokens the median generated per step (the train phase scales with "
          "them); in the synchronous run, (rollout + train) / max(rollout, train) is the most "
          "that overlapping them can give (the bound column).", "",
          "| workers | max_staleness | partial | s/step | samples/s | vs sync | bound | rollout / train phase s | "
          "response tokens / step | train phase ms / response token | staleness seen (max per step) | token age (mean) | "
          "mean reward, steps 1-4 / last 4 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["samples_per_s"] / sync[r["workers"]]["samples_per_s"] if r["workers"] in sync else float("nan")
        ph = r["phases"]
        bound = f"{sum(ph.values()) / max(ph.values()):.2f}x" if r["k"] == 0 and not r["partial"] else ""
        first, last = statistics.mean(r["reward"][:4]), statistics.mean(r["reward"][-4:])
        md.append(f"| {r['workers']} | {r['k']} | {'yes' if r['partial'] else 'no'} | {r['median_step_s']:.3f} | "
                  f"{r['samples_per_s']:.1f} | {ratio:.2f}x | {bound} | {ph['rollout']:.3f} / {ph['train']:.3f} | "
                  f"{r['gen_tokens']:.0f} | {1e3 * ph['train'] / max(r['gen_tokens'], 1):.1f} | {sorted(set(r['staleness_max']))} | {r['token_staleness_mean']:.2f} | {first:.3f} / {last:.3f} |")
    md += ["", f"Reward per step (the same samples per step in every run, so the x axis is samples / {samples}):", ""]
    for r in results:
        md.append(f"- workers {r['workers']}, k {r['k']}{', partial' if r['partial'] else ''}: "
                  + " ".join(f"{x:.3f}" for x in r["reward"]))
    Path(args.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print("BENCH_SUMMARY " + json.dumps({"rows": [{k: v for k, v in r.items() if k not in ("reward",)}
                                                  for r in results]}))


if __name__ == "__main__":
    main()
