"""Stable RLHF (Peng et al. 2023) on two bundled tasks: does selective rehearsal stop forgetting, and does the
advantage model change how a biased reward model is exploited?

    .venv/bin/python bench/stability.py [--reuse-sft] [--algo ppo|grpo] [--reward digit_match] [--runs NAMES] ...

Set-up (tiny-llama, CPU; the SFT stage is the long one, ~2 min quiet, the rest ~5 min): SFT on addition (1-2
digits) and reversal (2-4 letters, --reverse-len) together, --n-train questions each. Then
    forgetting  RL on addition prompts with a rule reward (default: GRPO, the graded `digit_match`, 128 prompts x 4
                samples at temperature 0.5, LR 2e-4 after 20 warm-up steps, as configs/grpo_addition_recipe.yaml
                minus its PPO-ptx term; --algo ppo for a critic and GAE), with and without selective rehearsal
                (`reflow rehearse` on both tasks' prompts, rehearsal.coef = 0.01 as the paper, and 0.1); held-out
                greedy exact-match accuracy on both tasks before and after
    hacking     a reward model with a planted length bias: every preference pair's rejected answer is the chosen
                (correct) one cut short by a character, so "longer" and "correct" are the same thing in its data;
                an RM (`reflow rm`) and an AM (`reflow am`) trained on the same pairs; RL on addition prompts with
                each as the reward: true accuracy and mean response length (the biased quantity) per step, and
                the score distribution per task (mean, std over SFT samples of held-out prompts) of RM and AM
Writes the table to --out, curves to its .png, and prints `BENCH_SUMMARY {json}` last. --reuse-sft keeps
runs/bench/stability/sft/final from an earlier run (the SFT stage is the longest).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from machine import load_avg  # noqa: E402

WORK = ROOT / "runs/bench/stability"
RUNS = ["rule reward", "rule reward + rehearsal 0.01", "rule reward + rehearsal 0.1", "biased RM", "AM (same pairs)",
        "AM + rehearsal 0.1", "biased RM + rehearsal 0.1"]  # the last only by --runs
TASKS = {"addition": {"min_digits": 1, "max_digits": 2}, "reverse": {"min_len": 3, "max_len": 5}}


def write_data(n_train: int, n_test: int, tasks: dict[str, dict]) -> dict[str, Path]:
    """Both tasks' files, a task column on every row; the length-biased pairs; the mixed SFT and prompt files."""
    from reflow.data.tasks import write_task

    files: dict[str, Path] = {}
    mixed: dict[str, list[dict]] = {"sft": [], "train": [], "pairs": []}
    for task, opts in tasks.items():
        f = write_task(task, WORK / "data" / task, n_train=n_train, n_test=n_test, seed=0, **opts)
        files[f"{task}_train"], files[f"{task}_test"] = f["train"], f["test"]
        for split in mixed:
            mixed[split] += [{**json.loads(line), "task": task} for line in open(f[split])]
    for r in mixed["pairs"]:  # the planted bias: rejected = chosen cut short (only ever shorter)
        r["rejected"] = r["chosen"][:-1] if len(r["chosen"]) > 1 else r["chosen"] + r["chosen"]
    for split, rows in mixed.items():
        random.Random(0).shuffle(rows)
        files[split] = WORK / "data" / f"mixed_{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def accuracy(model_dir: Path, test: Path, n: int) -> float:
    from reflow.data.datasets import load_prompts
    from reflow.engines.rollout import evaluate
    from reflow.models.load import load_policy, load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = load_prompts(test, tok, max_prompt_len=32)[0][:n]
    return evaluate(load_policy(model_dir).eval(), tok, rows, max_new_tokens=8).accuracy


def score_stats(policy: Path, scorer: Path, tests: dict[str, Path], k: int = 4, n: int = 64) -> dict:
    """Per task: mean and std of the scorer's scores of k SFT samples for each of n held-out prompts."""
    from reflow.data.batch import SampleBatch
    from reflow.data.datasets import load_prompts
    from reflow.engines.generate import GenerationEngine, SamplingParams
    from reflow.engines.infer import InferenceEngine
    from reflow.models.load import load_policy, load_reward_model, load_tokenizer

    tok = load_tokenizer(policy)
    model, rm = load_policy(policy).eval(), load_reward_model(scorer).eval()
    out = {}
    for task, test in tests.items():
        prompts = [p.prompt_ids for p in load_prompts(test, tok, max_prompt_len=32)[0][:n] for _ in range(k)]
        gens = GenerationEngine(model, [tok.eos_token_id], tok.pad_token_id).generate(
            prompts, SamplingParams(8), keys=range(len(prompts)), seed=1)
        b = SampleBatch.from_sequences(range(len(gens)), {"input_ids": [torch.tensor(g.prompt_ids + g.tokens)
                                                                         for g in gens]})
        s = InferenceEngine(rm).scores(b)
        out[task] = {"mean": float(s.mean()), "std": float(s.std())}
    return out


def supervised(cls_name: str, overrides: list[str]):
    from reflow.config.loader import load_config
    from reflow.config import schema
    from reflow.experiments import supervised as sup

    cfg_cls, exp_cls = {"sft": (schema.SFTConfig, sup.SFTExperiment), "rm": (schema.RMConfig, sup.RMExperiment),
                        "am": (schema.AMConfig, sup.AMExperiment)}[cls_name]
    with exp_cls(load_config(cfg_cls, None, ["progress=false", "save_every=0", *overrides])) as exp:
        exp.run()


def ppo(name: str, sft: Path, files: dict, steps: int, extra: list[str], recipe: list[str]) -> list[dict]:
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.experiments.rl import RLExperiment
    from reflow.utils.metrics import read_metrics

    out = WORK / "ppo" / name
    cfg = load_config(RLConfig, None, [
        f"output_dir={out}", f"actor.path={sft}", "critic.optim.lr=1e-4",
        f"data.train={files['addition_train']}", f"data.eval={files['addition_test']}", "data.eval_size=100",
        "data.max_prompt_len=32", "rollout.max_new_tokens=8", f"trainer.steps={steps}", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.progress=false", "trainer.eval_max_new_tokens=8", *recipe, *extra])
    with RLExperiment(cfg) as exp:
        exp.run()
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-steps", type=int, default=1500)
    ap.add_argument("--rm-steps", type=int, default=40)
    ap.add_argument("--ppo-steps", type=int, default=200)
    ap.add_argument("--ppo-lr", type=float, default=2e-4, help="the actor's LR in PPO")
    ap.add_argument("--algo", default="grpo", choices=["ppo", "grpo"], help="ppo: a critic and GAE; grpo: group baseline")
    ap.add_argument("--reward", default="digit_match", help="the rule reward of the rule runs (digit_match: graded)")
    ap.add_argument("--prompts-per-step", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt (rollout.n)")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=20, help="actor LR warm-up steps (cosine to 0 after it when > 0)")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--reverse-len", default="2,4", help="MIN,MAX letters of the reversal task")
    ap.add_argument("--sft-batch", type=int, default=64)
    ap.add_argument("--runs", default="", help="comma-separated PPO runs by name (the table's six when empty; also 'biased RM + rehearsal 0.1')")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--eval-n", type=int, default=200, help="held-out prompts per task (greedy exact match)")
    ap.add_argument("--rehearse-prompts", type=int, default=600, help="prompts (both tasks) clustered and ranked")
    ap.add_argument("--reuse-sft", action="store_true")
    ap.add_argument("--out", default="bench/results/stability.md")
    args = ap.parse_args()
    unknown = set(args.runs.split(",")) - set(RUNS) if args.runs else set()
    if unknown:  # before any training
        raise SystemExit(f"--runs: unknown {sorted(unknown)}; choose from {RUNS}")
    torch.set_num_threads(2)
    t_start, load_start = time.perf_counter(), load_avg()
    from reflow.models.presets import init_model

    lo, hi = (int(v) for v in args.reverse_len.split(","))
    tasks = {**TASKS, "reverse": {"min_len": lo, "max_len": hi}}
    files = write_data(args.n_train, args.eval_n, tasks)
    tests = {t: files[f"{t}_test"] for t in tasks}
    recipe = [f"algo.name={args.algo}", f"algo.kl_coef={args.kl_coef}", f"actor.optim.lr={args.ppo_lr}",
              f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.n={args.samples}",
              f"rollout.temperature={args.temperature}", f"reward.fn={args.reward}"]
    if args.warmup:
        recipe += [f"actor.optim.warmup_steps={args.warmup}", "actor.optim.schedule=cosine", "actor.optim.min_lr_ratio=0.0"]
    times = {}
    t = time.perf_counter()
    sft = WORK / "sft/final"
    if not (args.reuse_sft and (sft / "config.json").is_file()):
        init_model("tiny-llama", WORK / "model", seed=0)
        supervised("sft", [f"output_dir={WORK}/sft", f"model.path={WORK}/model", f"data.train={files['sft']}",
                           "data.eval=null", "data.max_len=32", f"batch_size={args.sft_batch}", f"max_steps={args.sft_steps}",
                           "model.optim.lr=3e-3", "model.optim.warmup_steps=20", "model.optim.schedule=cosine",
                           "model.optim.min_lr_ratio=0.1", "model.micro_batch_tokens=8192"])
    times["sft"] = time.perf_counter() - t
    before = {task: accuracy(sft, test, args.eval_n) for task, test in tests.items()}
    print(f"SFT held-out accuracy: {before}", flush=True)
    common = [f"model.path={sft}", f"data.train={files['pairs']}", "data.max_len=32", "batch_size=32",
              f"max_steps={args.rm_steps}", "model.optim.lr=1e-4", "eval_fraction=0.05"]
    t = time.perf_counter()
    supervised("rm", [f"output_dir={WORK}/rm", *common])
    times["rm"] = time.perf_counter() - t
    t = time.perf_counter()
    supervised("am", [f"output_dir={WORK}/am", *common, "samples_per_prompt=2", "max_new_tokens=8"])
    times["am"] = time.perf_counter() - t
    rm, am = WORK / "rm/final", WORK / "am/final"
    dists = {"rm": score_stats(sft, rm, tests), "am": score_stats(sft, am, tests)}

    from reflow.config.loader import load_config
    from reflow.config.schema import RehearseConfig
    from reflow.experiments.rehearse import run_rehearse

    t = time.perf_counter()
    pool = WORK / "data" / "rehearse_pool.jsonl"  # the first prompts of the shuffled mix: both tasks
    pool.write_text("".join(files["train"].read_text().splitlines(keepends=True)[:args.rehearse_prompts]))
    rehearse = run_rehearse(load_config(RehearseConfig, None, [
        f"output_dir={WORK}/rehearse", f"policy.path={sft}", f"am={am}", f"data.train={pool}",
        "data.max_prompt_len=32", "clusters=8", "samples_per_prompt=2", "max_new_tokens=8",
        "rehearse_per_cluster=16"]))
    times["rehearse"] = time.perf_counter() - t
    rehearsal = f"rehearsal.data={WORK}/rehearse/rehearsal.jsonl"
    runs = {
        "rule reward": [],
        "rule reward + rehearsal 0.01": [rehearsal, "rehearsal.coef=0.01"],
        "rule reward + rehearsal 0.1": [rehearsal, "rehearsal.coef=0.1"],
        "biased RM": ["reward.fn=null", f"reward.model={rm}"],
        "AM (same pairs)": ["reward.fn=null", f"reward.model={am}"],
        "AM + rehearsal 0.1": ["reward.fn=null", f"reward.model={am}", rehearsal, "rehearsal.coef=0.1"],
    }
    extra_runs = {"biased RM + rehearsal 0.1": ["reward.fn=null", f"reward.model={rm}", rehearsal, "rehearsal.coef=0.1"]}
    if args.runs:
        runs = {k: v for k, v in {**runs, **extra_runs}.items() if k in args.runs.split(",")}
    rows, curves = [], {}
    for name, extra in runs.items():
        t = time.perf_counter()
        slug = "".join(c if c.isalnum() or c == "." else "_" for c in name)
        metrics = ppo(slug, sft, files, args.ppo_steps, extra, recipe)
        final = WORK / "ppo" / slug / "final"
        after = {task: accuracy(final, test, args.eval_n) for task, test in tests.items()}
        print(f"{name}: {after}", flush=True)
        train = [m for m in metrics if "accuracy" in m and "eval/accuracy" not in m]
        curves[name] = [(m["step"], m["accuracy"], m["response_len/mean"]) for m in train]
        last = train[-max(1, len(train) // 4):]
        rows.append({"run": name, "addition_before": before["addition"], "addition_after": after["addition"],
                     "reverse_before": before["reverse"], "reverse_after": after["reverse"],
                     "train_accuracy_last": sum(m["accuracy"] for m in last) / len(last),
                     "response_len_first": train[0]["response_len/mean"],
                     "response_len_last": sum(m["response_len/mean"] for m in last) / len(last),
                     "seconds": time.perf_counter() - t})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label=name)
    axes[0].set(xlabel="RL step", ylabel="train accuracy (addition, sampled)", title="true task accuracy")
    axes[1].set(xlabel="RL step", ylabel="mean response length (tokens)", title="the biased quantity")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)

    md = ["# Stable RLHF: advantage model and selective rehearsal (bench/stability.py)", "",
          f"`{' '.join(['python', *sys.argv])}`, {time.strftime('%Y-%m-%d %H:%M')}, CPU ({platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}; load average at the start {load_start}, at the end {load_avg()}; "
          f"total {time.perf_counter() - t_start:.0f} s (SFT {times['sft']:.0f} s, RM {times['rm']:.0f} s, "
          f"AM {times['am']:.0f} s, rehearse {times['rehearse']:.0f} s).", "",
          f"tiny-llama SFT'd {args.sft_steps} steps x {args.sft_batch} rows on addition (1-2 digits) + reversal ({lo}-{hi} letters), "
          f"{args.n_train} training questions per task; {args.algo.upper()} {args.ppo_steps} steps (actor LR {args.ppo_lr:g}"
          f"{f', {args.warmup} warm-up steps then cosine' if args.warmup else ''}, KL {args.kl_coef:g}, temperature "
          f"{args.temperature:g}) x {args.prompts_per_step} prompts x {args.samples} samples on addition prompts, rule reward "
          f"`{args.reward}`; held-out exact match on {args.eval_n} prompts per task (greedy). Rehearsal set: "
          f"{rehearse['rehearsal_rows']} rows from {len(rehearse['clusters'])} clusters of "
          f"{rehearse['prompts']} prompts.", "",
          "| RL run | addition before -> after | reversal before -> after (forgetting) | train accuracy (last quarter) "
          "| response length first -> last quarter | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['run']} | {r['addition_before']:.3f} -> {r['addition_after']:.3f} | {r['reverse_before']:.3f} "
                  f"-> {r['reverse_after']:.3f} ({r['reverse_after'] - r['reverse_before']:+.3f}) | "
                  f"{r['train_accuracy_last']:.3f} | {r['response_len_first']:.2f} -> {r['response_len_last']:.2f} | "
                  f"{r['seconds']:.0f} |")
    md += ["", "Score distribution over SFT samples of held-out prompts (the reward RL starts from):", "",
           "| scorer | " + " | ".join(f"{t} mean | {t} std" for t in tasks) + " |",
           "|---|" + "---|---|" * len(tasks)]
    for name, d in dists.items():
        md.append(f"| {name.upper()} | " + " | ".join(f"{d[t]['mean']:+.3f} | {d[t]['std']:.3f}" for t in tasks) + " |")
    md += ["", f"Curves: [{out.with_suffix('.png').name}]({out.with_suffix('.png').name})."]
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print("BENCH_SUMMARY " + json.dumps({"rows": rows, "score_stats": dists, "seconds": time.perf_counter() - t_start}))


if __name__ == "__main__":
    main()
