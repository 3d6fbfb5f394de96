"""LoRA vs full fine-tuning: GRPO on the demo task from the same SFT model, same seed and steps.

    .venv/bin/python bench/lora.py [--steps 60] [--rank 8] [--lora-lr 5e-4]

Both runs use the demo's GRPO config (configs/grpo_addition.yaml, 32 prompts x 8 samples, exact-match
reward, algo.kl_metric on: one reference forward per step) in this process; the LoRA run sets
actor.lora.rank (alpha = 2 x rank, every linear layer of the decoder) and its own LR (adapters start at
B = 0 and want a larger one). Measured per run, from the worker's own tensors after training:
trainable parameters (what the optimizer holds), bytes per role (weights, gradients, Adam moments; the
reference: its own weights, or none when it is the LoRA actor's base with adapters off), seconds per
step (mean of time/step after the first), the reward curve and the held-out accuracy at the end.
Writes bench/results/lora.{md,png}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def role_memory(worker) -> dict[str, dict[str, float]]:
    """MB per role: weights, gradients (set_to_none after a step: 0 between steps, so counted as trainable
    parameter bytes, what a backward allocates) and Adam moments."""
    out = {}
    for name, role in worker.roles.items():
        if role.model is None:
            continue
        params = list(role.model.parameters())
        trainable = [p for p in params if p.requires_grad] if role.engine is not None else []
        state = [t for s in role.engine.optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.dim() > 0] if role.engine is not None else []
        out[name] = {"weights": tensor_bytes(params) / 2**20, "gradients": tensor_bytes(trainable) / 2**20,
                     "adam": tensor_bytes(state) / 2**20}
    return out


def run(name: str, steps: int, eval_every: int, overrides: list[str]) -> dict:
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.experiments.demo import CONFIG_DIR
    from reflow.experiments.rl import RLExperiment
    from reflow.utils.metrics import read_metrics

    out = ROOT / f"runs/bench/lora/{name}"
    cfg = load_config(RLConfig, CONFIG_DIR / "grpo_addition.yaml", [
        f"output_dir={out}", "seed=0", f"trainer.steps={steps}", f"trainer.eval_every={eval_every}",
        "trainer.save_every=0", "trainer.progress=false", "algo.kl_metric=true", *overrides])
    t0 = time.perf_counter()
    with RLExperiment(cfg) as exp:
        exp.run()
        worker = exp.executor.transport.worker
        actor = worker.roles["actor"]
        trainable = sum(p.numel() for g in actor.engine.optimizer.param_groups for p in g["params"])
        total = sum(p.numel() for p in actor.model.parameters())
        memory = role_memory(worker)
    rows = read_metrics(out / "metrics.jsonl")
    return {"rows": rows, "trainable": trainable, "total": total, "memory": memory, "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--sft", help="the SFT model folder (default: the demo's, built when missing)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from grpovi_vs_grpo import ensure_sft_model

    sft = [f"actor.path={args.sft or ensure_sft_model()}"]
    results = {
        "full": run("full", args.steps, args.eval_every, sft),
        f"lora r{args.rank}": run(f"lora_r{args.rank}", args.steps, args.eval_every, [*sft,
            f"actor.lora.rank={args.rank}", f"actor.lora.alpha={2 * args.rank}", f"actor.optim.lr={args.lora_lr}"]),
    }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [
        "# LoRA vs full fine-tuning (bench/lora.py)",
        "",
        f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, 2 threads; "
        f"GRPO on the demo task (configs/grpo_addition.yaml) from the demo SFT model (tiny-llama), {args.steps} steps "
        f"of 32 prompts x 8 samples, seed 0, in one process; LoRA: rank {args.rank}, alpha {2 * args.rank}, all "
        f"decoder linear layers, LR {args.lora_lr:g} (full: the config's 2e-5, cosine).",
        f"command: `.venv/bin/python bench/lora.py --steps {args.steps} --rank {args.rank} --lora-lr {args.lora_lr:g}`",
        "",
        "| run | trainable params | actor MB: weights / grads / Adam | ref MB | s per step | reward, first 10 / "
        "last 10 steps | held-out accuracy at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows = r["rows"]
        reward = [x["reward/mean"] for x in rows if x.get("reward/mean") is not None]
        step_s = [x["time/step"] for x in rows if x.get("time/step") is not None][1:]
        acc = [x["eval/accuracy"] for x in rows if x.get("eval/accuracy") is not None]
        smooth = [statistics.mean(reward[max(0, i - 9): i + 1]) for i in range(len(reward))]
        ax.plot(range(len(smooth)), smooth, label=name)
        m = r["memory"]
        a = m["actor"]
        ref = m.get("ref", {}).get("weights", 0.0)
        lines.append(f"| {name} | {r['trainable']:,} of {r['total']:,} ({r['trainable'] / r['total']:.1%}) | "
                     f"{a['weights']:.2f} / {a['gradients']:.2f} / {a['adam']:.2f} | {ref:.2f} | "
                     f"{statistics.mean(step_s):.3f} | {statistics.mean(reward[:10]):.3f} / "
                     f"{statistics.mean(reward[-10:]):.3f} | {acc[-1]:.1%} |")
    ax.set_title("training reward (10-step moving mean)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "lora.png", dpi=100)
    (OUT / "lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
