"""reflow vs TRL's GRPOTrainer, end to end, same model, data, batch, sampling, optimizer and steps.

    .venv-bench/bin/python bench/e2e_vs_trl.py [--steps 100] [--threads 2] [--warmup 2] [--schedule interleaved]

Needs the benchmark venv (`make bench` creates .venv-bench with TRL; TRL is never a dependency of reflow).
Both sides train the demo's SFT model (runs/demo/sft/final, built with the demo's config if missing) on
data/addition/train.jsonl with GRPO in this one process, on CPU, fp32. By default the two runs are interleaved
step by step (a TRL step, then a reflow step, ...; each side's clock stops while the other steps), so that
background load on a shared machine falls on both alike; `--schedule sequential` runs TRL's whole run, then
reflow's. The settings:

    setting                  reflow (RLExperiment, configs/grpo_addition.yaml +)   TRL (GRPOConfig)
    prompts x group size     rollout.prompts_per_step=32, rollout.n=8             per_device_train_batch_size=256,
                                                                                  gradient_accumulation_steps=1 ->
                                                                                  generation_batch_size=256,
                                                                                  steps_per_generation=1, num_generations=8
    completions / opt. step  256 (one generation, one optimizer step)            256 (ditto; num_iterations=1)
    max new tokens           rollout.max_new_tokens=6                             max_completion_length=6
    sampling                 temperature 1.0, top_p 1.0, top_k 0                  temperature=1.0, top_p=1.0, top_k=0
    optimizer                AdamW lr 2e-5, betas (0.9, 0.999), eps 1e-8, wd 0,   optim=adamw_torch, same values,
                             grad clip 1.0                                        max_grad_norm=1.0
    LR schedule              cosine to 0.1 x lr over the run, no warm-up          cosine_with_min_lr, min_lr_rate=0.1
    advantages               (r - mean_g) / (std_g + 1e-6)                        scale_rewards=group: / (std_g + 1e-4)
    loss                     PPO clip 0.2, loss_agg=token-mean                    epsilon=0.2, loss_type=dapo (token mean
                                                                                  over the 256 completions' tokens)
    KL                       kl_coef=0, algo.kl_metric=false (no reference)       beta=0 (no reference model)
    reward                   exact_match                                          the same function, via an adapter
    precision, device        float32, CPU                                         bf16=False, use_cpu=True
    other                    no eval during training                              eval_strategy=no, report_to=none,
                                                                                  gradient_checkpointing=False,
                                                                                  use_vllm=False, logging_steps=1

After training, both final models are saved as HF folders, loaded back with reflow's `load_policy` and scored
by reflow's `evaluate` (greedy, 6 new tokens, the 500 held-out prompts of data/addition/test.jsonl).

Measured per step (steady state: steps after --warmup): wall time (TRL: from the end of its previous step, or
of the reflow step run in between, to `on_step_end`, so its data loading and logging count; reflow: `train_step`
plus its metrics row), samples/s, generated tokens/s (completion tokens including the EOS, counted the same way
on both sides: up to and including the first EOS, else max_new_tokens), and the time per stage. reflow's stages
are its own time/* metrics (time/actor_gen also packs the rollout into a SampleBatch and decodes the text, which
TRL does in "rollout rest"). TRL's are measured by hooks (see `TimedGRPOTrainer`):
  generate  : the model's `generate` call (patched on the model instance; TRL calls it on the unwrapped model)
  rollout   : `_prepare_inputs` when it generates (generate + tokenise/pad + decode + reward + advantages)
  reward    : `_calculate_rewards` (inside rollout)
  fwd+bwd   : `training_step` minus `_prepare_inputs` (log-prob forward with entropy, loss, backward)
  optimizer : on_pre_optimizer_step -> on_optimizer_step callback (AdamW step)
  other     : step wall minus the above (grad clipping, scheduler, logging, data loading)
Writes bench/results/e2e_vs_trl.md; the last line printed is `BENCH_SUMMARY {json}` (read by bench/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from machine import cpu_name, load_avg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench" / "e2e_vs_trl"
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS_PER_STEP, GROUP, MAX_NEW, LR = 32, 8, 6, 2e-5


def ensure_sft_model() -> Path:
    """The demo's SFT model, built exactly as bench/grpovi_vs_grpo.py does when it is missing."""
    from grpovi_vs_grpo import ensure_sft_model as ensure

    return ensure()






def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "reflow"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes in reflow/" if dirty else "")
    except OSError:
        return "unknown"


def mean(xs):
    return statistics.mean(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------- reflow


class ReflowSide:
    """reflow's RLExperiment (configs/grpo_addition.yaml + the overrides below), stepped one GRPO step at a time.

    `step()` is `RLExperiment.run_step()` (the body of `run()`'s loop: one step of the graph on the executor,
    in this process) plus its metrics.jsonl row; the evals and curves that run() adds around the loop are
    off, and `finish()` exports final/ as run() does.
    """

    def __init__(self, sft: Path, steps: int, seed: int):
        from reflow.config.loader import load_config
        from reflow.config.schema import RLConfig
        from reflow.experiments.demo import CONFIG_DIR
        from reflow.experiments.rl import RLExperiment
        from reflow.utils.metrics import MetricsLogger

        self.out = RUNS / "reflow"
        self.steps = steps
        cfg = load_config(RLConfig, CONFIG_DIR / "grpo_addition.yaml", [
            f"output_dir={self.out}", f"seed={seed}", f"actor.path={sft}", f"trainer.steps={steps}",
            f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.n={GROUP}", f"rollout.max_new_tokens={MAX_NEW}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", f"actor.optim.lr={LR}",
            "actor.optim.schedule=cosine", "actor.optim.min_lr_ratio=0.1", "actor.optim.warmup_steps=0",
            "algo.kl_coef=0.0", "algo.kl_metric=false", "algo.loss_agg=token-mean", "algo.ppo_epochs=1",
            "algo.mini_batches=1", "reward.fn=exact_match", "data.eval=null", "trainer.eval_every=0",
            "trainer.save_every=0", "trainer.progress=false"])
        t0 = time.perf_counter()
        self.exp = RLExperiment(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out)
        self.setup_s = time.perf_counter() - t0
        self.records: list[dict] = []

    def step(self) -> None:
        if len(self.records) >= self.steps:
            return
        t0 = time.perf_counter()
        m = self.exp.run_step()
        self.logger.log(self.exp.step, m)
        t1 = time.perf_counter()
        # every generated completion is trained on; its action tokens are its response tokens
        rec = {"gen_completions": int(m["samples"]), "gen_tokens": int(m["gen_tokens"]),
               "train_completions": int(m["samples"]), "train_tokens": int(m["gen_tokens"])}
        self.records.append({**rec, "wall": t1 - t0, "reward": m["reward/mean"], "lr": m.get("actor/lr"),
                             **{k: v for k, v in m.items() if k.startswith("time/")}})

    def finish(self) -> dict:
        while len(self.records) < self.steps:
            self.step()
        self.logger.close()
        self.exp.export_final()
        self.exp.shutdown()
        return {"name": "reflow", "records": self.records, "setup_s": self.setup_s,
                "loop_s": sum(x["wall"] for x in self.records), "final": self.out / "final",
                "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- TRL


def run_trl(sft: Path, steps: int, seed: int, between_steps=None) -> dict:
    """TRL's GRPOTrainer; `between_steps()` (the other side's step, when interleaved) runs after each TRL step,
    outside TRL's timed window."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reflow.data.datasets import _read_located  # the same rows reflow reads
    from reflow.models.load import load_tokenizer
    from reflow.rewards.rules import exact_match

    def exact_match_reward(prompts, completions, answer, **kwargs):
        """TRL's reward signature (dataset columns come as keyword lists) around reflow's exact_match."""
        return exact_match(prompts, completions, answer)

    class TimedGRPOTrainer(GRPOTrainer):
        def _prepare_inputs(self, generation_batch):
            t = time.perf_counter()
            out = super()._prepare_inputs(generation_batch)
            self._cur["rollout"] = self._cur.get("rollout", 0.0) + time.perf_counter() - t
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            t = time.perf_counter()
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._cur["reward_s"] = self._cur.get("reward_s", 0.0) + time.perf_counter() - t
            self._cur["reward_mean"] = float(torch.nanmean(out.sum(1)))
            return out

        def training_step(self, model, inputs, num_items_in_batch):
            t = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            self._cur["training_step"] = self._cur.get("training_step", 0.0) + time.perf_counter() - t
            return out

        def _compute_loss(self, model, inputs):
            self._cur["train_completions"] = self._cur.get("train_completions", 0) + inputs["completion_ids"].shape[0]
            self._cur["train_tokens"] = self._cur.get("train_tokens", 0) + int(inputs["completion_mask"].sum())
            return super()._compute_loss(model, inputs)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.records: list[dict] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t_prev = time.perf_counter()
            self.setup_s = self.t_prev - self.t_start
            self.threads = torch.get_num_threads()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            cur = self.trainer._cur
            cur["optimizer"] = cur.get("optimizer", 0.0) + time.perf_counter() - self.t_opt

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            cur = self.trainer._cur
            lr = self.trainer.lr_scheduler.get_last_lr()[0]
            self.records.append({**cur, "wall": now - self.t_prev, "lr_next": lr})
            self.trainer._cur = {}
            if between_steps is not None:
                between_steps()
            self.t_prev = time.perf_counter()

    t0 = time.perf_counter()  # set-up: data, config, trainer (model, optimizer, dataloader) up to the first step
    rows = [r for _, r in _read_located(ROOT / "data/addition/train.jsonl")]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])
    out = RUNS / "trl"
    args = GRPOConfig(
        output_dir=str(out), seed=seed, max_steps=steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, num_iterations=1, max_completion_length=MAX_NEW,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0, optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = TimedGRPOTrainer(model=str(sft), reward_funcs=exact_match_reward, args=args, train_dataset=dataset,
                               processing_class=load_tokenizer(sft), callbacks=[timer])
    trainer._cur = {}
    timer.trainer = trainer
    eos = torch.tensor(trainer.eos_token_ids)
    model = trainer.model
    orig_generate = model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        ids = orig_generate(*a, **kw)
        dt = time.perf_counter() - t
        comp = ids[:, kw["input_ids"].shape[1]:].cpu()
        is_eos = torch.isin(comp, eos)
        ended = is_eos.any(1)
        lens = torch.where(ended, is_eos.int().argmax(1) + 1, torch.full_like(ended, comp.shape[1], dtype=torch.long))
        cur = trainer._cur
        cur["generate"] = cur.get("generate", 0.0) + dt
        cur["gen_completions"] = cur.get("gen_completions", 0) + comp.shape[0]
        cur["gen_tokens"] = cur.get("gen_tokens", 0) + int(lens.sum())
        cur["gen_decode_steps"] = comp.shape[1]
        return ids

    model.generate = timed_generate
    timer.t_start = t0
    trainer.train()
    trainer.save_model(str(out / "final"))
    if not timer.records or "generate" not in timer.records[0]:
        raise RuntimeError("the patched generate was never called: TRL generated through another path")
    logged_len = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"name": "trl", "records": timer.records, "setup_s": timer.setup_s,
            "loop_s": sum(x["wall"] for x in timer.records), "final": out / "final",
            "threads": timer.threads, "logged_mean_length": logged_len}


# ---------------------------------------------------------------------------------------------- summary


def held_out(folder: Path) -> float:
    from reflow.data.datasets import load_prompts
    from reflow.engines.rollout import evaluate
    from reflow.models.load import load_policy, load_tokenizer
    from reflow.rewards.rules import exact_match

    tok = load_tokenizer(folder)
    test, _ = load_prompts(ROOT / "data/addition/test.jsonl", tok, max_prompt_len=16)
    model = load_policy(folder).eval()
    return evaluate(model, tok, test, max_new_tokens=MAX_NEW, reward_fn=exact_match, batch_size=256).accuracy


def summarise(r: dict, warmup: int) -> dict:
    recs = r["records"]
    steady = recs[warmup:] if len(recs) > warmup else recs
    wall = sum(x["wall"] for x in steady)
    s = {
        "steps": len(recs),
        "step_s": wall / len(steady),
        "samples_per_s": sum(x["train_completions"] for x in steady) / wall,
        "e2e_gen_tok_per_s": sum(x["gen_tokens"] for x in steady) / wall,
        "loop_s": r["loop_s"], "setup_s": r["setup_s"],
        "loop_gen_tok_per_s": sum(x["gen_tokens"] for x in recs) / r["loop_s"],
        "gen_tokens_per_step": mean([x["gen_tokens"] for x in steady]),
        "reward_last10": mean([x["reward"] if "reward" in x else x["reward_mean"] for x in recs[-10:]]),
        "reward_first10": mean([x["reward"] if "reward" in x else x["reward_mean"] for x in recs[:10]]),
    }
    if r["name"] == "reflow":
        gen = sum(x["time/actor_gen"] for x in steady)
        s["stage_gen_tok_per_s"] = sum(x["gen_tokens"] for x in steady) / gen
        stages = {k: mean([x.get(k, 0.0) for x in steady]) for k in
                  ("time/actor_gen", "time/reward", "time/advantages", "time/actor_train")}
        stages["other (step wall - stages)"] = s["step_s"] - sum(stages.values())
    else:
        gen = sum(x["generate"] for x in steady)
        s["stage_gen_tok_per_s"] = sum(x["gen_tokens"] for x in steady) / gen
        g = mean([x["generate"] for x in steady])
        ro = mean([x["rollout"] for x in steady])
        rw = mean([x["reward_s"] for x in steady])
        fb = mean([x["training_step"] - x["rollout"] for x in steady])
        opt = mean([x["optimizer"] for x in steady])
        stages = {"generate (model.generate)": g, "reward (_calculate_rewards)": rw,
                  "rollout rest (tokenise, pad, decode, advantages)": ro - g - rw,
                  "fwd+bwd (training_step - rollout)": fb, "optimizer (AdamW step)": opt}
        stages["other (step wall - stages)"] = s["step_s"] - ro - fb - opt
        s["decode_steps_mean"] = mean([x["gen_decode_steps"] for x in steady])
    s["stages"] = stages
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the per-step figures")
    ap.add_argument("--schedule", choices=["interleaved", "sequential"], default="interleaved",
                    help="interleaved: one TRL step, then one reflow step, and so on (both sides see the same "
                    "background load; each side's timings exclude the other's steps); sequential: TRL's whole run, "
                    "then reflow's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    from reflow.models.load import quiet_transformers

    quiet_transformers()
    sft = ensure_sft_model()
    load_start = load_avg()
    results = {}
    print(f"--- {args.steps} GRPO steps each, {args.schedule} ...", flush=True)
    if args.schedule == "interleaved":
        reflow_side = ReflowSide(sft, args.steps, args.seed)
        results["trl"] = run_trl(sft, args.steps, args.seed, between_steps=reflow_side.step)
        results["reflow"] = reflow_side.finish()
    else:
        results["trl"] = run_trl(sft, args.steps, args.seed)
        torch.set_num_threads(args.threads)
        results["reflow"] = ReflowSide(sft, args.steps, args.seed).finish()
    load_end = load_avg()
    acc = {"sft (start)": held_out(sft)}
    for side in ("reflow", "trl"):
        acc[side] = held_out(results[side]["final"])
    S = {side: summarise(results[side], args.warmup) for side in ("reflow", "trl")}

    # ---------------------------------------------------------------- equal work
    lines_check = []
    ok = True
    for side in ("reflow", "trl"):
        recs = results[side]["records"]
        gc = sorted({x["gen_completions"] for x in recs})
        tc = sorted({x["train_completions"] for x in recs})
        same = all(x["gen_tokens"] == x["train_tokens"] for x in recs)
        ok &= gc == [PROMPTS_PER_STEP * GROUP] and tc == [PROMPTS_PER_STEP * GROUP] and same
        lines_check.append(f"{side}: {len(recs)} steps; completions generated per step {gc}, trained per step {tc}; "
                           f"generated tokens == trained (loss) tokens every step: {same}; "
                           f"torch threads {results[side]['threads']}")
    trl_logged = results["trl"].get("logged_mean_length") or []
    if trl_logged:
        mine = mean([x["gen_tokens"] / x["gen_completions"] for x in results["trl"]["records"]])
        lines_check.append(f"trl: completion length by our count {mine:.3f} tokens vs TRL's logged "
                           f"completions/mean_length {mean(trl_logged):.3f}")
    lr_r = [x["lr"] for x in results["reflow"]["records"]]
    lr_t = [x["lr_next"] for x in results["trl"]["records"]]
    if args.steps >= 4:  # TRL's record holds the LR of the next step; reflow's the LR its step used
        mid = args.steps // 2
        lines_check.append(f"LR at steps 1, {mid}, {args.steps}: reflow {lr_r[0]:.3g}, {lr_r[mid - 1]:.3g}, "
                           f"{lr_r[-1]:.3g}; TRL {LR:.3g}, {lr_t[mid - 2]:.3g}, {lr_t[-2]:.3g}")

    # ---------------------------------------------------------------- table
    R, T = S["reflow"], S["trl"]

    def row(name, key, fmt, higher_better=True):
        a, b = R[key], T[key]
        return f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |"

    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
                f"python {platform.python_version()}")
    cmd = (f".venv-bench/bin/python bench/e2e_vs_trl.py --steps {args.steps} --threads {args.threads} "
           f"--warmup {args.warmup} --schedule {args.schedule}")
    md = [
        "# reflow vs TRL GRPOTrainer, end to end (bench/e2e_vs_trl.py)",
        "",
        f"device: CPU, {cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads; {versions}; "
        f"reflow at {git_state()}",
        f"command: `{cmd}` (or `make bench`)",
        f"load average (1/5/15 min) before: {load_start}; after the two runs: {load_end}",
        "",
        f"Task: GRPO on 2-digit addition from the demo SFT model (tiny-llama, 0.8M params); {args.steps} steps of "
        f"{PROMPTS_PER_STEP} prompts x {GROUP} samples = {PROMPTS_PER_STEP * GROUP} completions per optimizer step, "
        f"max {MAX_NEW} new tokens, temperature 1, lr {LR} cosine to 0.1x, no KL, token-mean loss, exact-match "
        "reward, fp32. "
        + ("The two runs were interleaved step by step (each side's clock stops while the other steps). "
           if args.schedule == "interleaved" else "TRL ran first, then reflow. ")
        + f"Per-step figures exclude the first {args.warmup} steps; ratio = reflow / TRL (> 1: reflow higher).",
        "",
        "| metric | reflow | TRL | reflow / TRL |",
        "|---|---|---|---|",
        row("wall time per step (s)", "step_s", "{:.3f}"),
        row("samples/s (completions trained per s)", "samples_per_s", "{:.1f}"),
        row("generated tokens/s, end to end (per step wall)", "e2e_gen_tok_per_s", "{:.1f}"),
        row("generated tokens/s, generation stage only", "stage_gen_tok_per_s", "{:.1f}"),
        row("generated tokens per step (incl. EOS)", "gen_tokens_per_step", "{:.0f}"),
        row(f"training loop wall, all {args.steps} steps (s)", "loop_s", "{:.1f}"),
        row("set-up before the loop (s)", "setup_s", "{:.1f}"),
        row("mean train reward, first 10 steps", "reward_first10", "{:.3f}"),
        row("mean train reward, last 10 steps", "reward_last10", "{:.3f}"),
        f"| held-out accuracy (reflow `evaluate`, greedy, 500 prompts) | {acc['reflow']:.3f} | {acc['trl']:.3f} | "
        f"start (SFT): {acc['sft (start)']:.3f} |",
        "",
        "Equal work:",
        "",
        *[f"- {x}" for x in lines_check],
        "",
        "Time per step by stage (s, mean over steady-state steps):",
        "",
        "| reflow stage | s | TRL stage | s |",
        "|---|---|---|---|",
    ]
    rs, ts = list(R["stages"].items()), list(T["stages"].items())
    for i in range(max(len(rs), len(ts))):
        a = rs[i] if i < len(rs) else ("", None)
        b = ts[i] if i < len(ts) else ("", None)
        md.append(f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.4f}'} | {b[0]} | {'' if b[1] is None else f'{b[1]:.4f}'} |")
    r_gen, t_gen = R["stages"]["time/actor_gen"], T["stages"]["generate (model.generate)"]
    r_train = R["stages"]["time/actor_train"]
    t_train = T["stages"]["fwd+bwd (training_step - rollout)"] + T["stages"]["optimizer (AdamW step)"]
    md += [
        "",
        f"Where the time goes: reflow spends {r_gen / R['step_s']:.0%} of a step generating and "
        f"{r_train / R['step_s']:.0%} training (forward + backward + AdamW); TRL {t_gen / T['step_s']:.0%} and "
        f"{t_train / T['step_s']:.0%}. Training: reflow {r_train:.3f} s vs TRL {t_train:.3f} s "
        f"({t_train / r_train:.2f}x); generation: reflow {r_gen:.3f} s vs TRL {t_gen:.3f} s ({t_gen / r_gen:.2f}x). "
        f"Even with free generation reflow's end-to-end speed-up over this TRL step would be at most "
        f"{T['step_s'] / (R['step_s'] - r_gen):.2f}x, as long as its training step costs what it does now.",
        "",
        f"TRL decodes the whole left-padded batch of 256 rows until every row has finished (mean "
        f"{T.get('decode_steps_mean', float('nan')):.2f} decode steps of the 6 allowed); reflow retires finished rows "
        "from the batch and its KV cache. Stage timings of TRL come from hooks on the trainer (see the script's docstring); "
        "reflow's are its own `time/*` metrics.",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "e2e_vs_trl.md").write_text("\n".join(md) + "\n")
    summary = {"reflow": R, "trl": T, "held_out_accuracy": acc, "equal_work": ok, "command": cmd,
               "versions": versions, "device": cpu_name(), "load_before": load_start, "load_after": load_end}
    print("\n".join(md))
    print("BENCH_SUMMARY " + json.dumps(summary, default=str), flush=True)
    if not ok:
        print("WARNING: the two sides did not do equal work (see above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
