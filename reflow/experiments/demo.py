"""`reflow demo`: the three-stage run on one CPU process, end to end, in a few minutes.

    init-model (tiny-llama preset, random weights)
    -> data     (addition of two 2-digit numbers; train and held-out splits)
    -> sft      (configs/sft_addition.yaml:  learn the task from worked answers)
    -> train    (configs/grpo_addition_recipe.yaml: GRPO against a per-digit reward, with PPO-ptx)
and a summary of held-out exact-match accuracy (greedy) after each stage. Every stage is the same
code path as the corresponding CLI command; outputs go under runs/demo/ and data/addition/.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reflow.config.loader import load_config
from reflow.config.schema import RLConfig, SFTConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# today's recipe (see the file): plain GRPO, configs/grpo_addition.yaml, stays the benchmarks' workload
RL_CONFIG = "grpo_addition_recipe.yaml"
DATA_OPTIONS = dict(n_train=7600, n_test=500, seed=0, min_digits=2, max_digits=2)


def run_demo(root: str | Path = ".", overrides_sft: list[str] = (), overrides_rl: list[str] = ()) -> dict:
    from reflow.data.tasks import write_task
    from reflow.experiments.rl import RLExperiment
    from reflow.experiments.supervised import SFTExperiment
    from reflow.models.presets import init_model

    console = Console(highlight=False)
    root = Path(root)
    t0 = time.perf_counter()
    times = {}

    console.rule("[bold]reflow demo: init-model -> sft -> grpo on 2-digit addition")
    model_dir = init_model("tiny-llama", root / "runs/demo/model", seed=0)
    write_task("addition", root / "data/addition", **DATA_OPTIONS)
    console.print(f"model: tiny-llama -> {model_dir};  data: data/addition (7600 train / 500 held-out prompts)")

    t = time.perf_counter()
    sft_cfg = load_config(SFTConfig, CONFIG_DIR / "sft_addition.yaml", list(overrides_sft))
    console.rule("stage 1: sft")
    with SFTExperiment(sft_cfg) as exp:
        sft = exp.run()
    times["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    rl_cfg = load_config(RLConfig, CONFIG_DIR / RL_CONFIG, list(overrides_rl))
    console.rule("stage 2: grpo")
    with RLExperiment(rl_cfg) as exp:
        rl = exp.run()
    times["grpo"] = time.perf_counter() - t
    total = time.perf_counter() - t0

    acc_init = sft["initial_eval"]["eval/accuracy"]
    acc_sft = sft["final_eval"]["eval/accuracy"]
    acc_rl = rl["final_eval"]["eval/accuracy"]
    table = Table(title="held-out exact-match accuracy (greedy, 500 unseen prompts)")
    for col in ("stage", "accuracy", "time"):
        table.add_column(col)
    table.add_row("random init", f"{acc_init:.1%}", "")
    table.add_row("after SFT", f"{acc_sft:.1%}", f"{times['sft']:.0f}s")
    table.add_row("after GRPO", f"{acc_rl:.1%}", f"{times['grpo']:.0f}s")
    console.print(table)
    console.print(f"total {total:.0f}s.  RL changed held-out accuracy by {100 * (acc_rl - acc_sft):+.1f} points.")
    console.print("outputs: runs/demo/{sft,grpo}/ (metrics.jsonl, curves.png, checkpoints/, final/ HF folders)")
    return {"init": acc_init, "sft": acc_sft, "rl": acc_rl, "times": times, "total": total}
