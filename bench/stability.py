"""Stable RLHF (Peng et al. 2023) on two bundled tasks: does selective rehearsal stop forgetting, and does the
advantage model change how a learned reward model is exploited?

    .venv/bin/python bench/stability.py [--reuse-sft] [--reuse-scorers] [--pairs mixed,length] [--runs NAMES]
                                        [--seeds 0,1] [--ppo-lr ...] ...

Set-up (tiny-llama, CPU; SFT ~2 min quiet, each scorer pair set ~2.5 min, each RL run ~1.5 min): SFT on addition
(1-2 digits) and reversal (2-4 letters, --reverse-len) together, --n-train questions each. Then an RM
(`reflow rm`) and an AM (`reflow am`) on each pair set of --pairs:
    clean   rejected = a wrong answer of the chosen's length (the task's own near miss, or one character changed)
    mixed   three pairs per question: the rejected answer wrong and of the same length, one longer, one shorter
            (length alone tells nothing)
    length  rejected = the chosen cut short by a character: "longer" and "correct" are the same thing in these
            pairs, a planted bias (the hacking measurement)
`reflow rehearse` on both tasks' prompts with each pair set's AM gives that set's rehearsal set. RL on addition
prompts (default: GRPO, the graded `digit_match`, 128 prompts x 4 samples at temperature 0.5, LR 2e-4 after 20
warm-up steps, as configs/grpo_addition_recipe.yaml minus its PPO-ptx term). A run (--runs) is a reward,
`rule reward` or `RM (P)` / `AM (P)` for pair set P, optionally `+ rehearsal C` (the SFT loss on P's rehearsal set
with coefficient C joins the actor's step), once per --seeds seed. Reported per run: held-out greedy exact match
on both tasks before and after (--eval-n prompts each, none a training question), the sampled train accuracy and
mean response length (the biased quantity) per step (curves), and per scorer its held-out pair accuracy and score
distribution per task (mean, std over SFT samples). Writes the table to --out (a "## Set-ups tried" section
already in that file is kept), curves to its .png, and prints `BENCH_SUMMARY {json}` last. --reuse-sft keeps
runs/bench/stability/sft/final from an earlier run; --reuse-scorers keeps RM / AM folders trained on the same
SFT model with the same steps and LR.
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
# A run is a reward (BASES) and optionally " + rehearsal C" (SFT loss on the rehearsal set, coefficient C).
# "RM (P)" / "AM (P)": a reward model / advantage model trained on the pairs P (PAIRS) replaces the rule reward.
BASES = ["rule reward", "RM (clean)", "AM (clean)", "RM (mixed)", "AM (mixed)", "RM (length)", "AM (length)"]
PAIRS = {"clean": "rejected = a wrong answer of the chosen's length (the scorer must learn correctness)",
         "mixed": "three pairs per question, the rejected one wrong and of the chosen's length, one character longer, "
                  "and one character shorter (length alone tells nothing; a wrong answer of any length loses)",
         "length": "rejected = the chosen cut short by a character (\"longer\" = \"correct\": a planted length bias)"}
DEFAULT_RUNS = ["rule reward", "rule reward + rehearsal 1", "RM (mixed)", "AM (mixed)", "AM (mixed) + rehearsal 0.1",
                "AM (mixed) + rehearsal 1", "RM (length)", "AM (length)"]
TASKS = {"addition": {"min_digits": 1, "max_digits": 2}, "reverse": {"min_len": 3, "max_len": 5}}
TEST_SPLIT = 200  # each task's test split; fixed so that the training data (and a cached SFT model) never move


def parse_run(name: str) -> tuple[str, float | None]:
    """'AM (clean) + rehearsal 0.3' -> ('AM (clean)', 0.3); 'RM (clean)' -> ('RM (clean)', None)."""
    base, _, coef = name.partition(" + rehearsal ")
    if base not in BASES:
        raise ValueError(f"unknown reward {base!r} in run {name!r}; choose from {BASES} (+ ' + rehearsal C')")
    try:
        return base, (float(coef) if coef else None)
    except ValueError:
        raise ValueError(f"run {name!r}: the rehearsal coefficient must be a number") from None


def same_length_wrong(rng: random.Random, task: str, chosen: str, corrupt) -> str:
    """The task's own near miss when it keeps the length, else one character of the chosen answer changed."""
    wrong = corrupt(rng, chosen)
    if len(wrong) == len(chosen) and wrong != chosen:
        return wrong
    i = rng.randrange(len(chosen))
    alphabet = ("123456789" if i == 0 and len(chosen) > 1 else "0123456789") if task == "addition" else \
        "abcdefghijklmnopqrstuvwxyz"
    return chosen[:i] + rng.choice([c for c in alphabet if c != chosen[i]]) + chosen[i + 1:]


def write_data(n_train: int, n_eval: int, tasks: dict[str, dict]) -> dict[str, Path]:
    """Both tasks' files, a task column on every row; the length-biased and the clean pairs; the mixed SFT and
    prompt files; per task a held-out file of n_eval prompts (the test split, then more questions drawn apart,
    none of them a training question)."""
    from reflow.data.tasks import get_task, write_task

    files: dict[str, Path] = {}
    mixed: dict[str, list[dict]] = {"sft": [], "train": [], "pairs_length": [], "pairs_clean": [], "pairs_mixed": []}
    for task, opts in tasks.items():
        f = write_task(task, WORK / "data" / task, n_train=n_train, n_test=TEST_SPLIT, seed=0, **opts)
        files[f"{task}_train"], files[f"{task}_test"] = f["train"], f["test"]
        for split in ("sft", "train"):
            mixed[split] += [{**json.loads(line), "task": task} for line in open(f[split])]
        pairs = [{**json.loads(line), "task": task} for line in open(f["pairs"])]
        # length: the planted bias, rejected = chosen cut short (only ever shorter)
        mixed["pairs_length"] += [{**r, "rejected": r["chosen"][:-1] if len(r["chosen"]) > 1 else r["chosen"] * 2}
                                  for r in pairs]
        rng = random.Random(f"clean:{task}")  # clean: a wrong answer of the same length
        mixed["pairs_clean"] += [{**r, "rejected": same_length_wrong(rng, task, r["chosen"], get_task(task).corrupt)}
                                 for r in pairs]
        rng = random.Random(f"mixed:{task}")
        alphabet = "0123456789" if task == "addition" else "abcdefghijklmnopqrstuvwxyz"
        for r in pairs:  # mixed: wrong answers as long as, longer than and shorter than the correct one
            wrong = same_length_wrong(rng, task, r["chosen"], get_task(task).corrupt)
            longer = wrong + rng.choice(alphabet)
            shorter = r["chosen"][:-1] if len(r["chosen"]) > 1 else r["chosen"] + rng.choice(alphabet) * 2
            mixed["pairs_mixed"] += [{**r, "rejected": x} for x in (wrong, longer, shorter)]
        seen = {json.loads(line)["prompt"] for name in ("train", "test") for line in open(f[name])}
        rows = [json.loads(line) for line in open(f["test"])][:n_eval]
        if len(rows) < n_eval:  # more held-out questions: another draw, minus every train and test prompt
            extra = write_task(task, WORK / "data" / f"{task}_more", n_train=1, n_test=3 * n_eval, seed=1, **opts)
            rows += [r for r in map(json.loads, open(extra["test"])) if r["prompt"] not in seen][:n_eval - len(rows)]
        if len(rows) < n_eval:
            raise SystemExit(f"{task}: only {len(rows)} held-out questions, asked for --eval-n {n_eval}")
        files[f"{task}_heldout"] = WORK / "data" / f"{task}_heldout.jsonl"
        files[f"{task}_heldout"].write_text("".join(json.dumps(r) + "\n" for r in rows))
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


def pair_accuracy(run_dir: Path) -> float | None:
    """The scorer's held-out pair accuracy at its last evaluation (chosen scored above rejected)."""
    from reflow.utils.metrics import read_metrics

    evals = [m["eval/accuracy"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in m]
    return evals[-1] if evals else None


def rehearsal_stats(path: Path, answers: dict[str, tuple[str, str]]) -> dict:
    """Per task: rehearsal rows and how many of them rehearse a correct answer."""
    out: dict[str, dict] = {}
    for r in map(json.loads, open(path)):
        task, answer = answers[r["prompt"]]
        d = out.setdefault(task, {"rows": 0, "correct": 0})
        d["rows"] += 1
        d["correct"] += int(r["response"].strip() == answer)
    return out


def same_scorer(run_dir: Path, sft: Path, steps: int, lr: float) -> bool:
    """Whether run_dir holds a finished RM / AM trained from sft for steps steps at LR lr."""
    import yaml

    if not (run_dir / "final" / "config.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return (cfg["model"]["path"] == str(sft) and cfg["max_steps"] == steps
            and abs(cfg["model"]["optim"]["lr"] - lr) <= 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-steps", type=int, default=1500)
    ap.add_argument("--rm-steps", type=int, default=800, help="RM and AM training steps (32 pairs each)")
    ap.add_argument("--rm-lr", type=float, default=3e-4, help="RM and AM learning rate")
    ap.add_argument("--pairs", default="mixed,length", help=f"pair sets to train an RM and an AM on: {PAIRS}")
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
    ap.add_argument("--runs", default="", help="comma-separated RL runs: a reward from " + ", ".join(BASES)
                    + ", optionally + ' + rehearsal C'; empty: " + ", ".join(DEFAULT_RUNS))
    ap.add_argument("--seeds", default="0", help="comma-separated RL seeds (config `seed=`); every run once per seed")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--eval-n", type=int, default=1000, help="held-out prompts per task (greedy exact match)")
    ap.add_argument("--rehearse-prompts", type=int, default=600, help="prompts (both tasks) clustered and ranked")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--rehearse-per-cluster", type=int, default=16)
    ap.add_argument("--rehearse-samples", type=int, default=2, help="SFT responses per prompt the AM ranks")
    ap.add_argument("--rehearse-temperature", type=float, default=1.0, help="their sampling temperature")
    ap.add_argument("--reuse-sft", action="store_true")
    ap.add_argument("--reuse-scorers", action="store_true",
                    help="keep an RM / AM folder trained on the same SFT model, pairs, steps and LR by an earlier run")
    ap.add_argument("--out", default="bench/results/stability.md")
    args = ap.parse_args()
    run_names = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else DEFAULT_RUNS
    pair_sets = [p.strip() for p in args.pairs.split(",") if p.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    try:  # every name checked before any training
        parsed = {name: parse_run(name) for name in run_names}
        if set(pair_sets) - set(PAIRS):
            raise ValueError(f"--pairs: unknown {sorted(set(pair_sets) - set(PAIRS))}; choose from {list(PAIRS)}")
        for name, (base, coef) in parsed.items():
            kind = base[4:-1] if base != "rule reward" else (pair_sets or [None])[0]
            if kind not in pair_sets and (base != "rule reward" or coef is not None):
                raise ValueError(f"run {name!r} needs the {kind or 'clean or length'} pairs: add them to --pairs")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.set_num_threads(2)
    t_start, load_start = time.perf_counter(), load_avg()
    from reflow.models.presets import init_model

    lo, hi = (int(v) for v in args.reverse_len.split(","))
    tasks = {**TASKS, "reverse": {"min_len": lo, "max_len": hi}}
    files = write_data(args.n_train, args.eval_n, tasks)
    tests = {t: files[f"{t}_heldout"] for t in tasks}
    recipe = [f"algo.name={args.algo}", f"algo.kl_coef={args.kl_coef}", f"actor.optim.lr={args.ppo_lr}",
              f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.n={args.samples}",
              f"rollout.temperature={args.temperature}", f"reward.fn={args.reward}"]
    if args.warmup:
        recipe += [f"actor.optim.warmup_steps={args.warmup}", "actor.optim.schedule=cosine", "actor.optim.min_lr_ratio=0.0"]
    times = {}
    t = time.perf_counter()
    # one SFT folder per reversal length (the default keeps the name of earlier runs' cache)
    tag = "" if (lo, hi) == (2, 4) else f"_reverse{lo}-{hi}"
    sft_root = WORK / f"sft{tag}"
    sft = sft_root / "final"
    if not (args.reuse_sft and (sft / "config.json").is_file()):
        init_model("tiny-llama", WORK / "model", seed=0)
        supervised("sft", [f"output_dir={sft_root}", f"model.path={WORK}/model", f"data.train={files['sft']}",
                           "data.eval=null", "data.max_len=32", f"batch_size={args.sft_batch}", f"max_steps={args.sft_steps}",
                           "model.optim.lr=3e-3", "model.optim.warmup_steps=20", "model.optim.schedule=cosine",
                           "model.optim.min_lr_ratio=0.1", "model.micro_batch_tokens=8192"])
    times["sft"] = time.perf_counter() - t
    before = {task: accuracy(sft, test, args.eval_n) for task, test in tests.items()}
    print(f"SFT held-out accuracy: {before}", flush=True)

    from reflow.config.loader import load_config
    from reflow.config.schema import RehearseConfig
    from reflow.experiments.rehearse import run_rehearse

    answers = {r["prompt"]: (r["task"], r["answer"]) for r in map(json.loads, open(files["train"]))}
    pool = WORK / "data" / "rehearse_pool.jsonl"  # the first prompts of the shuffled mix: both tasks
    pool.write_text("".join(files["train"].read_text().splitlines(keepends=True)[:args.rehearse_prompts]))
    scorers, times["rm"], times["am"], times["rehearse"] = {}, 0.0, 0.0, 0.0
    for kind in pair_sets:
        common = [f"model.path={sft}", f"data.train={files['pairs_' + kind]}", "data.max_len=32", "batch_size=32",
                  f"max_steps={args.rm_steps}", f"model.optim.lr={args.rm_lr:g}", "eval_fraction=0.05"]
        for what in ("rm", "am"):
            t = time.perf_counter()
            if not (args.reuse_scorers and same_scorer(WORK / f"{what}_{kind}{tag}", sft, args.rm_steps, args.rm_lr)):
                supervised(what, [f"output_dir={WORK}/{what}_{kind}{tag}", *common,
                                  *(["samples_per_prompt=2", "max_new_tokens=8"] if what == "am" else [])])
            times[what] += time.perf_counter() - t
            scorers[f"{what.upper()} ({kind})"] = WORK / f"{what}_{kind}{tag}" / "final"
        t = time.perf_counter()
        run_rehearse(load_config(RehearseConfig, None, [
            f"output_dir={WORK}/rehearse_{kind}{tag}", f"policy.path={sft}", f"am={scorers[f'AM ({kind})']}",
            f"data.train={pool}", "data.max_prompt_len=32", f"clusters={args.clusters}",
            f"samples_per_prompt={args.rehearse_samples}", f"temperature={args.rehearse_temperature}",
            "max_new_tokens=8", f"rehearse_per_cluster={args.rehearse_per_cluster}"]))
        times["rehearse"] += time.perf_counter() - t
    scorer_rows = {name: {"pair_accuracy": pair_accuracy(path.parent), **score_stats(sft, path, tests)}
                   for name, path in scorers.items()}
    rehearsal_sets = {kind: rehearsal_stats(WORK / f"rehearse_{kind}{tag}" / "rehearsal.jsonl", answers) for kind in pair_sets}

    rows, curves = [], {}
    for seed in seeds:
        for name, (base, coef) in parsed.items():
            t = time.perf_counter()
            kind = base[4:-1] if base != "rule reward" else pair_sets[0] if pair_sets else None
            extra = [f"seed={seed}"]
            if base != "rule reward":
                extra += ["reward.fn=null", f"reward.model={scorers[base]}"]
            if coef is not None:
                extra += [f"rehearsal.data={WORK}/rehearse_{kind}{tag}/rehearsal.jsonl", f"rehearsal.coef={coef:g}"]
            slug = "".join(c if c.isalnum() or c == "." else "_" for c in name) + f"{tag}_s{seed}"
            metrics = ppo(slug, sft, files, args.ppo_steps, extra, recipe)
            final = WORK / "ppo" / slug / "final"
            after = {task: accuracy(final, test, args.eval_n) for task, test in tests.items()}
            print(f"{name} seed {seed}: {after}", flush=True)
            train = [m for m in metrics if "accuracy" in m and "eval/accuracy" not in m]
            if seed == seeds[0]:
                curves[name] = [(m["step"], m["accuracy"], m["response_len/mean"]) for m in train]
            last = train[-max(1, len(train) // 4):]
            rows.append({"run": name, "seed": seed, "addition_before": before["addition"],
                         "addition_after": after["addition"], "reverse_before": before["reverse"],
                         "reverse_after": after["reverse"],
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
    axes[0].set(xlabel="RL step", ylabel="train accuracy (addition, sampled)", title=f"true task accuracy (seed {seeds[0]})")
    axes[1].set(xlabel="RL step", ylabel="mean response length (tokens)", title="the biased quantity (length)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)

    md = ["# Stable RLHF: advantage model and selective rehearsal (bench/stability.py)", "",
          f"`{' '.join(['python', *sys.argv])}`, {time.strftime('%Y-%m-%d %H:%M')}, CPU ({platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}; load average at the start {load_start}, at the end {load_avg()}; "
          f"total {time.perf_counter() - t_start:.0f} s (SFT {times['sft']:.0f} s, RMs {times['rm']:.0f} s, "
          f"AMs {times['am']:.0f} s, rehearse {times['rehearse']:.0f} s).", "",
          f"tiny-llama SFT'd {args.sft_steps} steps x {args.sft_batch} rows on addition (1-2 digits) + reversal ({lo}-{hi} letters), "
          f"{args.n_train} training questions per task; {args.algo.upper()} {args.ppo_steps} steps (actor LR {args.ppo_lr:g}"
          f"{f', {args.warmup} warm-up steps then cosine' if args.warmup else ''}, KL {args.kl_coef:g}, temperature "
          f"{args.temperature:g}) x {args.prompts_per_step} prompts x {args.samples} samples on addition prompts, rule reward "
          f"`{args.reward}`, RL seeds {', '.join(map(str, seeds))}; held-out greedy exact match on {args.eval_n} prompts per "
          f"task (none a training question). RM and AM: {args.rm_steps} steps x 32 pairs (LR {args.rm_lr:g}) of each pair set "
          + "; ".join(f"**{k}**: {PAIRS[k]}" for k in pair_sets) + f". Rehearsal set: top {args.rehearse_per_cluster} "
          f"of each of {args.clusters} clusters of {args.rehearse_prompts} prompts (both tasks), ranked by that pair set's AM "
          f"(best of {args.rehearse_samples} SFT responses at temperature {args.rehearse_temperature:g}).", "",
          "| RL run | seed | addition before -> after | reversal before -> after (forgetting) | train accuracy (last quarter) "
          "| response length first -> last quarter | s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['run']} | {r['seed']} | {r['addition_before']:.3f} -> {r['addition_after']:.3f} | "
                  f"{r['reverse_before']:.3f} -> {r['reverse_after']:.3f} ({r['reverse_after'] - r['reverse_before']:+.3f}) | "
                  f"{r['train_accuracy_last']:.3f} | {r['response_len_first']:.2f} -> {r['response_len_last']:.2f} | "
                  f"{r['seconds']:.0f} |")
    summary = {}
    if len(seeds) > 1:
        md += ["", f"Over the {len(seeds)} seeds (mean, [min, max] of the change in points):", "",
               "| RL run | addition change | reversal change | seeds with reversal within 2 points |", "|---|---|---|---|"]
        for name in parsed:
            rs = [r for r in rows if r["run"] == name]
            da = [100 * (r["addition_after"] - r["addition_before"]) for r in rs]
            dr = [100 * (r["reverse_after"] - r["reverse_before"]) for r in rs]
            summary[name] = {"addition_change": sum(da) / len(da), "reverse_change": sum(dr) / len(dr)}
            md.append(f"| {name} | {sum(da) / len(da):+.1f} [{min(da):+.1f}, {max(da):+.1f}] | {sum(dr) / len(dr):+.1f} "
                      f"[{min(dr):+.1f}, {max(dr):+.1f}] | {sum(d >= -2 for d in dr)}/{len(dr)} |")
    md += ["", "Scorers: held-out pair accuracy, and the score distribution over SFT samples of held-out prompts "
           "(the reward RL starts from):", "",
           "| scorer | pair accuracy | " + " | ".join(f"{t} mean | {t} std" for t in tasks) + " |",
           "|---|---|" + "---|---|" * len(tasks)]
    for name, d in scorer_rows.items():
        acc = f"{d['pair_accuracy']:.3f}" if d["pair_accuracy"] is not None else "-"
        md.append(f"| {name} | {acc} | " + " | ".join(f"{d[t]['mean']:+.3f} | {d[t]['std']:.3f}" for t in tasks) + " |")
    md += ["", "Rehearsal sets (rows per task, and how many rehearse the correct answer): " + "; ".join(
        f"{kind} AM: " + ", ".join(f"{t} {v['correct']}/{v['rows']} correct" for t, v in st.items())
        for kind, st in rehearsal_sets.items()) + "."]
    md += ["", f"Curves: [{out.with_suffix('.png').name}]({out.with_suffix('.png').name})."]
    kept = ""  # a hand-kept section of the results file (the set-ups tried) survives a rerun
    if out.is_file() and "\n## Set-ups tried" in out.read_text():
        kept = "\n## Set-ups tried" + out.read_text().split("\n## Set-ups tried", 1)[1]
    out.write_text("\n".join(md) + "\n" + kept)
    print("\n".join(md))
    print("BENCH_SUMMARY " + json.dumps({"rows": rows, "seed_summary": summary,
                                         "score_stats": {n: {t: d[t] for t in tasks} for n, d in scorer_rows.items()},
                                         "pair_accuracy": {n: d["pair_accuracy"] for n, d in scorer_rows.items()},
                                         "rehearsal_sets": rehearsal_sets, "seconds": time.perf_counter() - t_start}))


if __name__ == "__main__":
    main()
