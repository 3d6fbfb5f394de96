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

Real model (`--model DIR`, e.g. SmolLM2-135M-Instruct from `reflow init-model --from-gguf smollm2 --out DIR`):
the same two sides and timers on that model and the chat_addition task (`--data`, written there when missing;
TRL gets the rows as conversational prompts and applies the same chat template), reward `--reward`
(final_number), 8 prompts x 8 samples, at most 64 new tokens ending at EOS, temperature 1, full fine-tuning,
`--lr` on both sides. TRL generates the 64 completions in one call and trains them as 8 micro-batches of 8
(gradient accumulation, one optimizer step; old log-probs are then not recomputed, as with reflow's single
PPO epoch); reflow trains in micro-batches of `--micro-batch-tokens`. Added: the peak fp32 matmul FLOP/s
(bench/mfu.py's `peak_matmul`, before and after the runs), the FLOPs of a step by stage for what each side
computes (`step_flops`: reflow prefills a prompt once per group and shares it in training; TRL prefills every
row, decodes every row until the batch's last one ends and trains padded rows), and each side's step time
against its FLOPs / peak. Then the roofline: the memory bandwidth (bench/mfu.py's `peak_bandwidth`, a 512 MiB
read, before and after the runs) and per stage max(FLOPs / peak, bytes / bandwidth), decode step by step
(`decode_roofline`: each step reads the weights once plus the K/V of its live rows; reflow's live rows from its
responses' lengths, read off its generation engine; TRL decodes every row until the last one ends), and each
side's step time against that bound (`step_rooflines`). No held-out evaluation or final export (time). Writes
bench/results/e2e_vs_trl_real.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from machine import cpu_name, load_avg  # noqa: E402
from mfu import peak_bandwidth, peak_matmul  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench" / "e2e_vs_trl"
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS_PER_STEP, GROUP, MAX_NEW, LR = 32, 8, 6, 2e-5


@dataclass(frozen=True)
class Task:
    """What both sides train on: model folder, prompt file, reward, batch shape, sampling cap and LR.

    `trl_batch` x `trl_accum` = prompts x group: TRL generates the whole step's completions at once
    (generation_batch_size = per_device_train_batch_size x steps_per_generation) and trains them in
    `trl_accum` micro-batches of `trl_batch` completions, one optimizer step.
    """

    label: str
    model: Path
    train: Path
    reward: str
    prompts: int
    group: int
    max_new: int
    lr: float
    max_prompt_len: int
    micro_batch_tokens: int
    trl_batch: int
    trl_accum: int
    real: bool


def tiny_task() -> Task:
    return Task("demo SFT model (tiny-llama, 0.8M params), 2-digit addition", ensure_sft_model(),
                ROOT / "data/addition/train.jsonl", "exact_match", PROMPTS_PER_STEP, GROUP, MAX_NEW, LR, 16, 8192,
                PROMPTS_PER_STEP * GROUP, 1, real=False)


def real_task(model: Path, data: Path, reward: str, lr: float, micro_batch_tokens: int) -> Task:
    """A real chat model (e.g. SmolLM2-135M-Instruct from `reflow init-model --from-gguf smollm2`) on the
    chat_addition task (written to `data` when missing), 8 prompts x 8 samples, up to 64 new tokens."""
    from reflow.data.tasks import write_task

    if not (data / "train.jsonl").is_file():
        write_task("chat_addition", data, n_train=70, n_test=29)
    return Task(f"{model.name} ({model}), chat_addition in the model's chat template", model, data / "train.jsonl",
                reward, 8, 8, 64, lr, 128, micro_batch_tokens, 8, 8, real=True)


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

    def __init__(self, task: Task, steps: int, seed: int):
        from reflow.config.loader import load_config
        from reflow.config.schema import RLConfig
        from reflow.experiments.demo import CONFIG_DIR
        from reflow.experiments.rl import RLExperiment
        from reflow.utils.metrics import MetricsLogger

        self.out = RUNS / ("reflow_real" if task.real else "reflow")
        self.steps = steps
        self.task = task
        cfg = load_config(RLConfig, CONFIG_DIR / "grpo_addition.yaml", [
            f"output_dir={self.out}", f"seed={seed}", f"actor.path={task.model}", f"trainer.steps={steps}",
            f"data.train={task.train}", f"data.max_prompt_len={task.max_prompt_len}",
            f"actor.micro_batch_tokens={task.micro_batch_tokens}", "runtime.timeout_s=3600",
            f"rollout.prompts_per_step={task.prompts}", f"rollout.n={task.group}",
            f"rollout.max_new_tokens={task.max_new}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0", f"actor.optim.lr={task.lr}",
            "actor.optim.schedule=cosine", "actor.optim.min_lr_ratio=0.1", "actor.optim.warmup_steps=0",
            "algo.kl_coef=0.0", "algo.kl_metric=false", "algo.loss_agg=token-mean", "algo.ppo_epochs=1",
            "algo.mini_batches=1", f"reward.fn={task.reward}", "data.eval=null", "trainer.eval_every=0",
            "trainer.save_every=0", "trainer.progress=false"])
        t0 = time.perf_counter()
        self.exp = RLExperiment(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out)
        self.setup_s = time.perf_counter() - t0
        self.records: list[dict] = []
        # each generated response's length (tokens incl. EOS), read off the engine's stream: the metrics give
        # only their sum and quantiles, the decode roofline needs how many rows are live at every decode step
        from reflow.engines.generate import GenerationEngine

        self._stream, self._lens = GenerationEngine.stream, []

        def recorded(engine, *a, **kw):
            for gen in self._stream(engine, *a, **kw):
                self._lens.append(len(gen.tokens))
                yield gen

        GenerationEngine.stream = recorded

    def step(self) -> None:
        if len(self.records) >= self.steps:
            return
        self._lens.clear()
        t0 = time.perf_counter()
        m = self.exp.run_step()
        self.logger.log(self.exp.step, m)
        t1 = time.perf_counter()
        # every generated completion is trained on; its action tokens are its response tokens
        rec = {"gen_completions": int(m["samples"]), "gen_tokens": int(m["gen_tokens"]),
               "train_completions": int(m["samples"]), "train_tokens": int(m["gen_tokens"])}
        self.records.append({**rec, "wall": t1 - t0, "reward": m["reward/mean"], "lr": m.get("actor/lr"),
                             "response_len_max": m.get("response_len/max"), "gen_lens": list(self._lens),
                             **{k: v for k, v in m.items() if k.startswith("time/")}})
        if self.task.real:  # minutes per step: show progress
            print(f"reflow step {len(self.records)}: {t1 - t0:.1f} s, {rec['gen_tokens']} tokens", flush=True)

    def finish(self) -> dict:
        while len(self.records) < self.steps:
            self.step()
        self.logger.close()
        from reflow.engines.generate import GenerationEngine

        GenerationEngine.stream = self._stream
        if not self.task.real:  # the real model's final weights are not scored here (time), so not written
            self.exp.export_final()
        self.exp.shutdown()
        return {"name": "reflow", "records": self.records, "setup_s": self.setup_s,
                "loop_s": sum(x["wall"] for x in self.records), "final": self.out / "final",
                "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- TRL


def run_trl(task: Task, steps: int, seed: int, between_steps=None) -> dict:
    """TRL's GRPOTrainer; `between_steps()` (the other side's step, when interleaved) runs after each TRL step,
    outside TRL's timed window."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reflow.data.datasets import _read_located  # the same rows reflow reads
    from reflow.models.load import load_tokenizer
    from reflow.rewards import rules

    reward_fn = getattr(rules, task.reward)

    def text(x):  # conversational rows come as message lists; the reward scores the text
        return x[-1]["content"] if isinstance(x, list) else x

    def reward_adapter(prompts, completions, answer, **kwargs):
        """TRL's reward signature (dataset columns come as keyword lists) around reflow's reward function."""
        return reward_fn([text(p) for p in prompts], [text(c) for c in completions], answer)

    reward_adapter.__name__ = task.reward

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
            if task.real:  # minutes per step: show progress
                print(f"TRL step {len(self.records)}: {now - self.t_prev:.1f} s, {cur.get('gen_tokens')} tokens",
                      flush=True)
            self.trainer._cur = {}
            if between_steps is not None:
                between_steps()
            self.t_prev = time.perf_counter()

    t0 = time.perf_counter()  # set-up: data, config, trainer (model, optimizer, dataloader) up to the first step
    rows = [r for _, r in _read_located(task.train)]
    # chat rows go in as TRL's conversational prompts: TRL applies the same chat template (generation prompt on)
    dataset = Dataset.from_list([{"prompt": r.get("prompt", r.get("messages")), "answer": str(r["answer"])}
                                 for r in rows])
    out = RUNS / ("trl_real" if task.real else "trl")
    args = GRPOConfig(
        output_dir=str(out), seed=seed, max_steps=steps,
        per_device_train_batch_size=task.trl_batch, gradient_accumulation_steps=task.trl_accum,
        num_generations=task.group, num_iterations=1, max_completion_length=task.max_new,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=task.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0, optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = TimedGRPOTrainer(model=str(task.model), reward_funcs=reward_adapter, args=args, train_dataset=dataset,
                               processing_class=load_tokenizer(task.model), callbacks=[timer])
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
        cur["gen_prompt_width"] = kw["input_ids"].shape[1]  # left-padded prompt width
        cur["gen_prompt_tokens"] = int(kw["attention_mask"].sum()) if "attention_mask" in kw else None
        cur["gen_lens"] = lens.tolist()
        return ids

    model.generate = timed_generate
    timer.t_start = t0
    trainer.train()
    if not task.real:
        trainer.save_model(str(out / "final"))
    if not timer.records or "generate" not in timer.records[0]:
        raise RuntimeError("the patched generate was never called: TRL generated through another path")
    logged_len = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"name": "trl", "records": timer.records, "setup_s": timer.setup_s,
            "loop_s": sum(x["wall"] for x in timer.records), "final": out / "final",
            "threads": timer.threads, "logged_mean_length": logged_len}


# ---------------------------------------------------------------------------------------------- FLOPs


def model_dims(folder: Path) -> dict:
    """L layers, d hidden, A = heads x head_dim (attention width), Akv = KV heads x head_dim, V vocabulary,
    N = the body's matmul parameters
    per token (q, k, v, o and the gated MLP of every layer; embedding and LM head apart), from config.json."""
    c = json.loads((folder / "config.json").read_text())
    d, L, V, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    A, Akv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
    N = L * (2 * d * A + 2 * d * Akv + 3 * d * inter)
    return {"L": L, "d": d, "A": A, "Akv": Akv, "V": V, "N": N}


def fwd_flops(m: dict, tokens: float, head_tokens: float, attn_pairs: float) -> float:
    """Forward matmul FLOPs (2 per multiply-add): 2 N per token through the body, 2 V d per token through the
    LM head, and 4 L A per (query, key) pair attended (QK^T and AV)."""
    return 2 * m["N"] * tokens + 2 * m["V"] * m["d"] * head_tokens + 4 * m["L"] * m["A"] * attn_pairs


def causal_pairs(n: float) -> float:
    return n * (n + 1) / 2


def step_flops(m: dict, mode: str, *, prompts: int, P: int, lens: list[float], prompt_width: int = 0,
               decode_steps: int = 0) -> dict:
    """FLOPs of one GRPO step by stage: `prompts` groups whose completions (all groups together) have the lengths
    `lens` (tokens incl. EOS) after a P-token prompt. Training = 3 x its forward (backward = 2 x forward). A
    completion of length c needs c - 1 decode forwards (its first token comes from the prefill's logits, which
    are computed for the last prompt token only), at context P + j.

    mode "shared" (reflow: shared prefill, prefix sharing): prefill = one P-token prompt per group; decode =
      every completion until its EOS; training = one row per group [prompt | c_1 | ... | c_n], each response
      attending to the prompt and itself, LM head on completion tokens.
    mode "unshared" (the same work, every row on its own, no padding): prefill P per row; training P + c per row.
    mode "padded" (what TRL computes): every row left-padded to prompt_width, decoded for decode_steps - 1
      forwards (a batch decodes until its last row ends), trained at prompt_width + decode_steps with the LM head
      on decode_steps + 1 positions (TRL's logits_to_keep + 1).
    Attention counts causal (query, key) pairs only, as a block-sparse kernel would.
    """
    rows = len(lens)
    dec_tok = sum(c - 1 for c in lens)
    dec_pairs = sum((c - 1) * P + causal_pairs(c - 1) for c in lens)
    if mode == "shared":
        C = sum(lens)
        pre = prompts * fwd_flops(m, P, 1, causal_pairs(P))
        dec = fwd_flops(m, dec_tok, dec_tok, dec_pairs)
        tr = 3 * fwd_flops(m, prompts * P + C, C, prompts * causal_pairs(P) + sum(c * P + causal_pairs(c) for c in lens))
    elif mode == "unshared":
        pre = rows * fwd_flops(m, P, 1, causal_pairs(P))
        dec = fwd_flops(m, dec_tok, dec_tok, dec_pairs)
        tr = 3 * sum(fwd_flops(m, P + c, c, causal_pairs(P + c)) for c in lens)
    else:
        W, S = prompt_width, decode_steps
        pre = rows * fwd_flops(m, W, 1, causal_pairs(W))
        dec = rows * fwd_flops(m, S - 1, S - 1, (S - 1) * W + causal_pairs(S - 1))
        tr = 3 * rows * fwd_flops(m, W + S, S + 1, causal_pairs(W + S))
    return {"prefill": pre, "decode": dec, "train": tr, "total": pre + dec + tr}


def live_rows(lens: list[int]) -> list[int]:
    """live(t) for the decode steps t = 1 .. max(lens) - 1: how many completions are longer than t tokens (a
    completion of c tokens takes part in decode steps 1 .. c - 1; its first token comes from the prefill)."""
    return [sum(c > t for c in lens) for t in range(1, max(lens, default=1))]


def roofline(flops: float, nbytes: float, peak: float, bandwidth: float) -> float:
    """Seconds of a stage at the machine's limits: max(FLOPs / peak FLOP/s, bytes moved / bandwidth)."""
    return max(flops / peak, nbytes / bandwidth)


def decode_roofline(m: dict, live: list[int], contexts: list[int], weight_bytes: float, kv_token_bytes: float,
                    peak: float, bandwidth: float) -> dict:
    """The decode stage's roofline bound, step by step: sum over steps t of roofline(F_t, B_t) with
    live[t] rows decoding one token each at context contexts[t] (keys attended, the new token's included),

        F_t = fwd_flops(m, live_t, live_t, live_t x ctx_t)              (body, LM head, attention)
        B_t = weight_bytes + live_t x ctx_t x kv_token_bytes            (the weights once, each row's K/V)

    Returns bound (s), flops and bytes (summed over steps), flops_s = flops / peak, bytes_s = bytes / bandwidth,
    steps and memory_bound (steps where B_t / bandwidth > F_t / peak)."""
    out = {"bound": 0.0, "flops": 0.0, "bytes": 0.0, "steps": len(live), "memory_bound": 0}
    for n, ctx in zip(live, contexts, strict=True):
        f = fwd_flops(m, n, n, n * ctx)
        b = weight_bytes + n * ctx * kv_token_bytes
        out["bound"] += roofline(f, b, peak, bandwidth)
        out["flops"] += f
        out["bytes"] += b
        out["memory_bound"] += b / bandwidth > f / peak
    out["flops_s"], out["bytes_s"] = out["flops"] / peak, out["bytes"] / bandwidth
    return out


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


def prompt_lengths(task: Task) -> list[int]:
    """Token counts of the task's prompts as reflow renders them (chat template, generation prompt)."""
    from reflow.data.datasets import load_prompts
    from reflow.models.load import load_tokenizer

    examples, _ = load_prompts(task.train, load_tokenizer(task.model), max_prompt_len=task.max_prompt_len)
    return [len(e.prompt_ids) for e in examples]


def step_rooflines(m: dict, task: Task, P: int, steady: dict, peak: float, bandwidth: float) -> dict:
    """Per side, per stage, the mean over steady-state steps of flops_s (FLOPs / peak), bytes_s (bytes /
    bandwidth) and bound (the roofline: prefill and training max(flops_s, bytes_s) of the stage; decode step by
    step, `decode_roofline`); plus decode's memory-bound steps. fp32: weights 4 (N + V d) bytes (body and the
    LM head, which is the tied embedding; norms are < 0.1%), K/V 2 L Akv 4 bytes per token per row.

      prefill : one forward (reflow: all rows are admitted at once, rollout.batch_size >= rows; TRL: one
                generate call): its FLOPs, the weights read once
      decode  : reflow: live(t) = completions longer than t (`live_rows` of the step's response lengths), context
                P + t; TRL: every row for all its decode steps, context prompt_width + t
      train   : its FLOPs; bytes = weights x (4 x micro-batches + 7): per micro-batch the weights read in the
                forward and the backward and the gradients read and written, then AdamW's read of p, g, m, v and
                write of p, m, v (activations not counted). reflow's micro-batches: ceil(tokens / micro_batch_tokens)
                of the prefix-shared rows; TRL's: its gradient-accumulation steps."""
    wb = 4 * (m["N"] + m["V"] * m["d"])
    kvb = 2 * m["L"] * m["Akv"] * 4
    out = {}
    for side, recs in steady.items():
        per_step = []
        for x in recs:
            lens = x["gen_lens"]
            if side == "reflow":
                f = step_flops(m, "shared", prompts=task.prompts, P=P, lens=lens)
                live = live_rows(lens)
                ctx = [P + t for t in range(1, len(live) + 1)]
                micro = math.ceil((task.prompts * P + sum(lens)) / task.micro_batch_tokens)
            else:
                W, S = x["gen_prompt_width"], x["gen_decode_steps"]
                f = step_flops(m, "padded", prompts=task.prompts, P=P, lens=lens, prompt_width=W, decode_steps=S)
                live, ctx = [len(lens)] * (S - 1), [W + t for t in range(1, S)]
                micro = task.trl_accum
            dec = decode_roofline(m, live, ctx, wb, kvb, peak, bandwidth)
            stages = {"prefill": (f["prefill"] / peak, wb / bandwidth),
                      "decode": (dec["flops_s"], dec["bytes_s"]),
                      "train": (f["train"] / peak, wb * (4 * micro + 7) / bandwidth)}
            row = {k: {"flops_s": a, "bytes_s": b, "bound": max(a, b)} for k, (a, b) in stages.items()}
            row["decode"]["bound"] = dec["bound"]
            row["decode"].update(steps=dec["steps"], memory_bound=dec["memory_bound"])
            row["total"] = {k: sum(row[st][k] for st in stages) for k in ("flops_s", "bytes_s", "bound")}
            per_step.append(row)
        out[side] = {st: {k: mean([r[st][k] for r in per_step]) for k in per_step[0][st]} for st in per_step[0]}
    out["weight_bytes"], out["kv_token_bytes"] = wb, kvb
    return out


def roofline_lines(RL: dict, R: dict, T: dict, r_gen: float, r_train: float, t_gen: float, t_train: float,
                   task: Task, P: int) -> list[str]:
    """The report's roofline tables: per stage FLOPs / peak, bytes / bandwidth and the bound, both sides; then
    each side's times against them."""
    r, t = RL["reflow"], RL["trl"]

    def cells(x, stage):
        return f"{x[stage]['flops_s']:.2f} | {x[stage]['bytes_s']:.2f} | **{x[stage]['bound']:.2f}**"

    def dec(x):
        return f"{x['decode']['memory_bound']:.0f} of {x['decode']['steps']:.0f}"

    return [
        "Roofline bound per stage (s, mean over steady-state steps; `step_rooflines`): prefill and training "
        "max(FLOPs / peak, bytes / bandwidth) of the stage, decode the sum over its steps t of max(F_t / peak, "
        f"B_t / bandwidth) with B_t = the weights read once ({RL['weight_bytes'] / 1e6:.0f} MB, fp32 body + LM head) "
        f"+ live(t) x context x {RL['kv_token_bytes'] / 1e3:.2f} kB of K/V per token (2 x layers x KV width x 4 B). "
        f"reflow: live(t) = its completions longer than t tokens (from the step's response lengths), context "
        f"{P} + t; TRL: all {task.prompts * task.group} rows for every decode step until the batch's last row ends, "
        "context = left-padded prompt width + t (its cache's concatenation per step is not counted). Training "
        "bytes: weights x (4 x micro-batches + 7) (forward and backward reads, gradient read + write, AdamW).",
        "",
        "| stage | reflow FLOPs / peak | reflow bytes / bandwidth | reflow roofline | TRL FLOPs / peak "
        "| TRL bytes / bandwidth | TRL roofline |",
        "|---|---|---|---|---|---|---|",
        f"| prefill | {cells(r, 'prefill')} | {cells(t, 'prefill')} |",
        f"| decode (memory-bound steps: reflow {dec(r)}, TRL {dec(t)}) | {cells(r, 'decode')} | {cells(t, 'decode')} |",
        f"| train | {cells(r, 'train')} | {cells(t, 'train')} |",
        f"| whole step | {cells(r, 'total')} | {cells(t, 'total')} |",
        "",
        "| | reflow | TRL |",
        "|---|---|---|",
        f"| roofline bound, whole step (s) | {r['total']['bound']:.2f} | {t['total']['bound']:.2f} |",
        f"| step time / roofline bound | **{R['step_s'] / r['total']['bound']:.2f}x** "
        f"| {T['step_s'] / t['total']['bound']:.2f}x |",
        f"| generation: time / (prefill + decode roofline) | "
        f"{r_gen / (r['prefill']['bound'] + r['decode']['bound']):.2f}x "
        f"| {t_gen / (t['prefill']['bound'] + t['decode']['bound']):.2f}x |",
        f"| decode roofline / decode FLOPs bound | {r['decode']['bound'] / r['decode']['flops_s']:.2f}x "
        f"| {t['decode']['bound'] / t['decode']['flops_s']:.2f}x |",
        f"| training: time / train roofline | {r_train / r['train']['bound']:.2f}x "
        f"| {t_train / t['train']['bound']:.2f}x |",
    ]


def real_report(args, task: Task, results: dict, S: dict, peak_start: float, bw_start: tuple[float, dict],
                load_start: str, load_end: str) -> None:
    """The real-model report: the comparison table, stages, FLOPs per step by stage for what each side computes,
    and each side's step time against FLOPs / peak and against the roofline (FLOPs / peak or bytes / memory
    bandwidth, whichever is longer, decode step by step); writes bench/results/e2e_vs_trl_real.md."""
    import transformers
    import trl

    peak_end = peak_matmul([1024, 2048, 3072], 5)[0]  # again at the end: the better of the two counts
    peak = max(peak_start, peak_end)
    bw_end = peak_bandwidth()
    bw = max(bw_start[0], bw_end[0])
    m = model_dims(task.model)
    plens = prompt_lengths(task)
    P = round(mean(plens))
    R, T = S["reflow"], S["trl"]
    steady = {side: results[side]["records"][args.warmup:] or results[side]["records"] for side in results}
    n = task.prompts * task.group

    def avg(dicts):
        return {k: mean([d[k] for d in dicts]) for k in dicts[0]}

    r_lens = [x["gen_lens"] for x in steady["reflow"]]
    F = {
        "reflow: shared prefill + prefix sharing": avg([step_flops(m, "shared", prompts=task.prompts, P=P, lens=ls)
                                                        for ls in r_lens]),
        "reflow's work without sharing": avg([step_flops(m, "unshared", prompts=task.prompts, P=P, lens=ls)
                                              for ls in r_lens]),
        "TRL, as it computes (padded rows)": avg([step_flops(m, "padded", prompts=task.prompts, P=P, lens=x["gen_lens"],
                                                             prompt_width=x["gen_prompt_width"],
                                                             decode_steps=x["gen_decode_steps"])
                                                  for x in steady["trl"]]),
        "TRL's work without padding": avg([step_flops(m, "unshared", prompts=task.prompts, P=P, lens=x["gen_lens"])
                                           for x in steady["trl"]]),
    }
    f_reflow, f_trl = F["reflow: shared prefill + prefix sharing"], F["TRL, as it computes (padded rows)"]
    f_unshared = F["reflow's work without sharing"]
    r_gen, r_train = R["stages"]["time/actor_gen"], R["stages"]["time/actor_train"]
    t_gen = T["stages"]["generate (model.generate)"]
    t_train = T["stages"]["fwd+bwd (training_step - rollout)"] + T["stages"]["optimizer (AdamW step)"]
    bound_r, bound_t = f_reflow["total"] / peak, f_trl["total"] / peak
    RL = step_rooflines(m, task, P, steady, peak, bw)
    roof_r, roof_t = RL["reflow"]["total"]["bound"], RL["trl"]["total"]["bound"]
    speedup = T["step_s"] / R["step_s"]
    trl_prompt = mean([x["gen_prompt_tokens"] / x["gen_completions"] for x in results["trl"]["records"]
                       if x.get("gen_prompt_tokens") is not None])
    lines_check, ok = equal_work(results, task, args.steps)
    lens_ok = all(sum(x["gen_lens"]) == x["gen_tokens"] and len(x["gen_lens"]) == n for x in results["reflow"]["records"])
    ok &= lens_ok
    lines_check.append(f"reflow: the {n} response lengths read off the generation engine sum to its gen_tokens every "
                       f"step: {lens_ok}")
    lines_check.append(f"prompt tokens per completion: reflow {mean(plens):.1f} (dataset: {min(plens)}-{max(plens)}), "
                       f"TRL {trl_prompt:.1f} (left-padded width {mean([x['gen_prompt_width'] for x in steady['trl']]):.1f})")
    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
                f"python {platform.python_version()}")
    cmd = (f"PYTHONPATH=$PWD .venv-bench/bin/python bench/e2e_vs_trl.py --model {args.model} --steps {args.steps} "
           f"--warmup {args.warmup} --threads {args.threads} --lr {task.lr} --micro-batch-tokens "
           f"{task.micro_batch_tokens} --schedule {args.schedule}")

    def row(name, a, b, fmt):
        return f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {f'{b / a:.2f}x' if a else 'n/a'} |"

    g = 1e9
    md = [
        "# reflow vs TRL GRPOTrainer on a real model (bench/e2e_vs_trl.py --model)",
        "",
        f"device: CPU, {cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads; {versions}; "
        f"reflow at {git_state()}",
        f"command: `{cmd}`",
        f"load average (1/5/15 min) before: {load_start}; after the two runs: {load_end}",
        f"peak: best fp32 torch.mm FLOP/s (n = 1024, 2048, 3072; bench/mfu.py's `peak_matmul`), measured before and "
        f"after the runs: {peak_start / g:.1f} / {peak_end / g:.1f} -> **{peak / g:.1f} GFLOP/s**",
        f"memory bandwidth: best read of a 512 MiB fp32 tensor (x.sum(); bench/mfu.py's `peak_bandwidth`), before "
        f"and after the runs: {bw_start[0] / g:.1f} / {bw_end[0] / g:.1f} -> **{bw / g:.1f} GB/s** (a copy moves "
        f"{bw_start[1]['copy'] / g:.1f} / {bw_end[1]['copy'] / g:.1f} GB/s, read + write)",
        "",
        f"Task: {task.label}; GRPO, {args.steps} steps of {task.prompts} prompts x {task.group} samples = {n} "
        f"completions per optimizer step, at most {task.max_new} new tokens ending at EOS, temperature 1, "
        f"lr {task.lr:g} cosine to 0.1x, AdamW, full fine-tuning (every parameter, no LoRA), no KL, token-mean loss, "
        f"reward `{task.reward}`, fp32. reflow: actor.micro_batch_tokens={task.micro_batch_tokens}, shared prefill "
        f"and prefix sharing on (the defaults); TRL: the {n} completions generated in one `generate` call, trained "
        f"as {task.trl_accum} micro-batches of {task.trl_batch} (gradient accumulation, one optimizer step). "
        + ("The two runs were interleaved step by step (each side's clock stops while the other steps). "
           if args.schedule == "interleaved" else "TRL ran first, then reflow. ")
        + f"Per-step figures exclude the first {args.warmup} step(s). Held-out accuracy is not measured here (time).",
        "",
        "| metric | reflow | TRL | TRL / reflow |",
        "|---|---|---|---|",
        row("wall time per step (s)", R["step_s"], T["step_s"], "{:.1f}"),
        row("generation stage (s)", r_gen, t_gen, "{:.1f}"),
        row("training stage: forward + backward + AdamW (s)", r_train, t_train, "{:.1f}"),
        row("generated tokens per step (incl. EOS)", R["gen_tokens_per_step"], T["gen_tokens_per_step"], "{:.0f}"),
        row("generated tokens/s, end to end", R["e2e_gen_tok_per_s"], T["e2e_gen_tok_per_s"], "{:.1f}"),
        row("step time per generated token (ms; the sides sample different lengths)",
            1e3 * R["step_s"] / R["gen_tokens_per_step"], 1e3 * T["step_s"] / T["gen_tokens_per_step"], "{:.1f}"),
        row(f"mean train reward, steps 1-{min(10, args.steps)}", R["reward_first10"], T["reward_first10"], "{:.3f}"),
        "",
        *work_and_stages(lines_check, R, T),
        "",
        "FLOPs per step (GFLOP, mean over steady-state steps; 2 per multiply-add; body "
        f"{m['N'] / 1e6:.1f}M matmul parameters per token, LM head {m['V']} x {m['d']}, attention {m['L']} layers x "
        f"{m['A']} wide, causal pairs only; training = 3 x forward; see `step_flops`). The prompt is {P} tokens. "
        "Both sides' terms use each completion's own length (reflow's read off its generation engine).",
        "",
        "| stage | " + " | ".join(F) + " |",
        "|---" * (len(F) + 1) + "|",
        *[f"| {stage} | " + " | ".join(f"{f[stage] / g:.0f}" for f in F.values()) + " |"
          for stage in ("prefill", "decode", "train", "total")],
        "",
        "Step time against FLOPs / peak (the time the step would take at the measured peak matmul rate):",
        "",
        "| | reflow (its FLOPs with sharing) | TRL (its FLOPs as computed) |",
        "|---|---|---|",
        f"| FLOPs / peak, whole step (s) | {bound_r:.1f} | {bound_t:.1f} |",
        f"| step time / bound | {R['step_s'] / bound_r:.2f}x | {T['step_s'] / bound_t:.2f}x |",
        f"| generation: time / ((prefill + decode) / peak) | {r_gen / ((f_reflow['prefill'] + f_reflow['decode']) / peak):.2f}x "
        f"| {t_gen / ((f_trl['prefill'] + f_trl['decode']) / peak):.2f}x |",
        f"| training: time / (train / peak) | {r_train / (f_reflow['train'] / peak):.2f}x "
        f"| {t_train / (f_trl['train'] / peak):.2f}x |",
        f"| achieved FLOP/s over the step (GFLOP/s) | {f_reflow['total'] / R['step_s'] / g:.1f} "
        f"| {f_trl['total'] / T['step_s'] / g:.1f} |",
        "",
        *roofline_lines(RL, R, T, r_gen, r_train, t_gen, t_train, task, P),
        "",
        "Targets (issue: reflow's step <= 1/3 of TRL's at equal work; within 1.25x of the FLOPs bound with prefix "
        f"sharing): TRL / reflow step time = {speedup:.2f}x -> **{'met' if speedup >= 3 else 'not met'}** (needs >= 3x; "
        f"per generated token {(T['step_s'] / T['gen_tokens_per_step']) / (R['step_s'] / R['gen_tokens_per_step']):.2f}x); "
        f"reflow step / its bound = {R['step_s'] / bound_r:.2f}x -> "
        f"**{'met' if R['step_s'] <= 1.25 * bound_r else 'not met'}** (needs <= 1.25x); against the roofline bound "
        f"(FLOPs / peak or bytes / bandwidth, whichever is longer, decode step by step) reflow's step is "
        f"{R['step_s'] / roof_r:.2f}x -> **{'met' if R['step_s'] <= 1.25 * roof_r else 'not met'}** (TRL "
        f"{T['step_s'] / roof_t:.2f}x). The sharing alone cuts the "
        f"FLOPs reflow needs from {f_unshared['total'] / g:.0f} to "
        f"{f_reflow['total'] / g:.0f} GFLOP per step; the completions differ between the sides (sampling), so their "
        "token counts are shown above.",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "e2e_vs_trl_real.md").write_text("\n".join(md) + "\n")
    summary = {"reflow": R, "trl": T, "flops": F, "peak_flops": peak, "speedup": speedup,
               "speedup_per_token": (T["step_s"] / T["gen_tokens_per_step"]) / (R["step_s"] / R["gen_tokens_per_step"]),
               "reflow_vs_bound": R["step_s"] / bound_r, "trl_vs_bound": T["step_s"] / bound_t, "equal_work": ok,
               "bandwidth": bw, "roofline": RL, "reflow_vs_roofline": R["step_s"] / roof_r,
               "trl_vs_roofline": T["step_s"] / roof_t,
               "command": cmd, "versions": versions, "device": cpu_name(), "load_before": load_start,
               "load_after": load_end}
    print("\n".join(md))
    print("BENCH_SUMMARY " + json.dumps(summary, default=str), flush=True)
    if not ok:
        print("WARNING: the two sides did not do equal work (see above)", file=sys.stderr)
        sys.exit(1)


def equal_work(results: dict, task: Task, steps: int) -> tuple[list[str], bool]:
    """Lines saying what each side generated and trained per step, and whether both did the configured work."""
    lines_check = []
    ok = True
    n = task.prompts * task.group
    for side in ("reflow", "trl"):
        recs = results[side]["records"]
        gc = sorted({x["gen_completions"] for x in recs})
        tc = sorted({x["train_completions"] for x in recs})
        same = all(x["gen_tokens"] == x["train_tokens"] for x in recs)
        ok &= gc == [n] and tc == [n] and same
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
    if steps >= 4:  # TRL's record holds the LR of the next step; reflow's the LR its step used
        mid = steps // 2
        lines_check.append(f"LR at steps 1, {mid}, {steps}: reflow {lr_r[0]:.3g}, {lr_r[mid - 1]:.3g}, "
                           f"{lr_r[-1]:.3g}; TRL {task.lr:.3g}, {lr_t[mid - 2]:.3g}, {lr_t[-2]:.3g}")
    return lines_check, ok


def work_and_stages(lines_check: list[str], R: dict, T: dict) -> list[str]:
    """The report's equal-work list and its table of time per stage, reflow's and TRL's side by side."""
    md = ["Equal work:", "", *[f"- {x}" for x in lines_check], "",
          "Time per step by stage (s, mean over steady-state steps):", "",
          "| reflow stage | s | TRL stage | s |", "|---|---|---|---|"]
    rs, ts = list(R["stages"].items()), list(T["stages"].items())
    for i in range(max(len(rs), len(ts))):
        a = rs[i] if i < len(rs) else ("", None)
        b = ts[i] if i < len(ts) else ("", None)
        md.append(f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.4f}'} | {b[0]} | {'' if b[1] is None else f'{b[1]:.4f}'} |")
    return md


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
    ap.add_argument("--model", type=Path, help="a real HF model folder (e.g. from `reflow init-model --from-gguf "
                    "smollm2 --out DIR`): GRPO on chat_addition, 8 prompts x 8 samples, up to 64 new tokens, full "
                    "fine-tuning, with FLOPs per stage and the machine's peak; writes e2e_vs_trl_real.md")
    ap.add_argument("--data", type=Path, default=RUNS / "chat_addition",
                    help="with --model: the chat_addition folder (written there when missing)")
    ap.add_argument("--reward", default="final_number", help="with --model: a reward of reflow.rewards.rules")
    ap.add_argument("--lr", type=float, default=1e-6, help="with --model: the LR on both sides")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096,
                    help="with --model: reflow's actor.micro_batch_tokens (TRL trains a group of 8 per micro-batch)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    from reflow.models.load import quiet_transformers

    quiet_transformers()
    task = (real_task(args.model.resolve(), args.data.resolve(), args.reward, args.lr, args.micro_batch_tokens)
            if args.model else tiny_task())
    peak_start = peak_matmul([1024, 2048, 3072], 5)[0] if task.real else None
    bw_start = peak_bandwidth() if task.real else None
    load_start = load_avg()
    results = {}
    print(f"--- {args.steps} GRPO steps each, {args.schedule} ...", flush=True)
    if args.schedule == "interleaved":
        reflow_side = ReflowSide(task, args.steps, args.seed)
        results["trl"] = run_trl(task, args.steps, args.seed, between_steps=reflow_side.step)
        results["reflow"] = reflow_side.finish()
    else:
        results["trl"] = run_trl(task, args.steps, args.seed)
        torch.set_num_threads(args.threads)
        results["reflow"] = ReflowSide(task, args.steps, args.seed).finish()
    load_end = load_avg()
    S = {side: summarise(results[side], args.warmup) for side in ("reflow", "trl")}
    if task.real:
        RUNS.mkdir(parents=True, exist_ok=True)  # the raw records, to re-read without re-running
        (RUNS / "real_records.json").write_text(json.dumps({k: v["records"] for k, v in results.items()}))
        real_report(args, task, results, S, peak_start, bw_start, load_start, load_end)
        return
    acc = {"sft (start)": held_out(task.model)}
    for side in ("reflow", "trl"):
        acc[side] = held_out(results[side]["final"])

    lines_check, ok = equal_work(results, task, args.steps)

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
        *work_and_stages(lines_check, R, T),
    ]
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
