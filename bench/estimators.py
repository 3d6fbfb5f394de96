"""Today's RL recipes on the demo task: GRPO, DAPO, GSPO and CISPO from the same SFT model, same seeds and budget.

    .venv/bin/python bench/estimators.py [--steps 200] [--seeds 0 1 2]

Each recipe is configs/grpo_addition.yaml (the demo's GRPO stage: 32 prompts x 8 samples, exact-match reward)
plus its keys:

    grpo   as the demo runs it (PPO clip 0.2/0.2, token-mean)
    dapo   clip-higher (0.2 / 0.28), dynamic sampling (up to 3 rounds), overlong shaping (cache 2 of 6 tokens),
           token-mean, no KL
    gspo   sequence-level ratio and clipping (3e-4 / 4e-4), seq-mean-token-mean
    cispo  clipped stop-gradient IS weight (upper 0.28) on every token's log-prob

Writes bench/results/estimators.{md,png}: held-out exact-match accuracy (greedy, 500 prompts) per eval step,
mean and spread over seeds, training reward, seconds per run (dynamic sampling generates more per step).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from grpovi_vs_grpo import ensure_sft_model, series  # noqa: E402 (bench/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
RECIPES = {
    "grpo": [],
    "dapo": ["algo.clip_low=0.2", "algo.clip_high=0.28", "algo.dynamic_sampling=true", "algo.overlong_cache=2",
             "algo.loss_agg=token-mean"],
    "gspo": ["algo.policy_loss=gspo", "algo.loss_agg=seq-mean-token-mean"],
    "cispo": ["algo.policy_loss=cispo"],
}


def run(name: str, seed: int, steps: int, eval_every: int) -> list[dict]:
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.experiments.demo import CONFIG_DIR
    from reflow.experiments.rl import RLExperiment
    from reflow.utils.metrics import read_metrics

    out = ROOT / f"runs/bench/estimators/{name}_seed{seed}"
    cfg = load_config(RLConfig, CONFIG_DIR / "grpo_addition.yaml", [
        f"output_dir={out}", f"seed={seed}", f"trainer.steps={steps}", f"trainer.eval_every={eval_every}",
        "trainer.save_every=0", "trainer.progress=false", *RECIPES[name]])
    with RLExperiment(cfg) as exp:
        exp.run()
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ensure_sft_model()
    results: dict[str, list[list[dict]]] = {r: [] for r in args.recipes}
    wall = {r: 0.0 for r in args.recipes}
    for seed in args.seeds:
        for name in args.recipes:
            t = time.perf_counter()
            results[name].append(run(name, seed, args.steps, args.eval_every))
            wall[name] += time.perf_counter() - t

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(series(results[args.recipes[0]][0], "eval/accuracy"))
    lines = ["# RL recipes on the demo task (bench/estimators.py)", "",
             f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}; seeds {args.seeds}; "
             f"{args.steps} steps of 32 prompts x 8 samples (dapo: up to 3 rounds of them per step); exact-match "
             "reward; model: the demo's SFT model (60.2% held-out).",
             f"command: `.venv/bin/python bench/estimators.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}`",
             "", "| recipe | held-out accuracy at steps " + ", ".join(map(str, steps)) + " (mean over seeds) "
             "| final: mean (min-max) | train reward, last 10 steps | s per run |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        acc = [series(r, "eval/accuracy") for r in runs]
        mean_acc = [statistics.mean(a[s] for a in acc) for s in steps]
        ax.plot(steps, mean_acc, marker="o", label=name)
        finals = [a[steps[-1]] for a in acc]
        rew = [series(r, "reward/mean") for r in runs]
        last = statistics.mean(statistics.mean(list(r.values())[-10:]) for r in rew)
        lines.append(f"| {name} | {' / '.join(f'{x:.3f}' for x in mean_acc)} | {statistics.mean(finals):.3f} "
                     f"({min(finals):.3f}-{max(finals):.3f}) | {last:.3f} | {wall[name] / len(runs):.0f} |")
    ax.set_title("held-out exact-match accuracy (mean over seeds)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "estimators.png", dpi=100)
    (OUT / "estimators.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
