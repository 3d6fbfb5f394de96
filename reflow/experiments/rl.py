"""`reflow train`: RL from a reward (GRPO, PPO) in one process.

One step is the design's graph of model function calls, run in dependency order:

    prompts -> actor_gen -> responses -> reward     -> scores        \
                                      -> ref_inf    -> ref_logprobs   -> advantages -> actor_train
                                      -> actor_inf  -> old_logprobs   |               -> critic_train
                                      -> critic_inf -> values        /

Every call is a method that takes and returns a SampleBatch, so the runtime issue can move each one
onto its own mesh and layout without rewriting it. Algorithm math lives in reflow.algorithms.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from reflow.algorithms import advantages as adv_lib
from reflow.algorithms.aggregation import Norm, aggregate
from reflow.algorithms.losses import (AdaptiveKLController, kl_loss, kl_penalty, ppo_policy_loss, sequence_nll,
                                      value_loss)
from reflow.algorithms.registry import get_advantage
from reflow.config.loader import save_config
from reflow.config.schema import RLConfig
from reflow.data.batch import SampleBatch
from reflow.data.datasets import load_prompts, load_sft
from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import TrainEngine
from reflow.experiments.common import (PromptSampler, batch_from_generations, evaluate, exact_match_accuracy,
                                       grpovi_bounds, seed_everything)
from reflow.models.load import (check_model_dir, load_critic, load_policy, load_reward_model, load_tokenizer,
                                save_model)
from reflow.models.ema import EMAWeights, ema_update_
from reflow.models.packing import token_logprobs, token_values
from reflow.rewards.process import ProcessReward
from reflow.rewards.registry import RewardError, compute_rewards, load_reward_fn
from reflow.utils import checkpoint as ckpt_lib
from reflow.utils.console import RunConsole
from reflow.utils.metrics import MetricsLogger, StageTimer, read_metrics, truncate_metrics
from reflow.utils.plot import plot_curves

log = logging.getLogger("reflow")


def train_engine_for(model, mcfg, total_steps: int) -> TrainEngine:
    o = mcfg.optim
    return TrainEngine(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, grad_clip=o.grad_clip,
                       warmup_steps=o.warmup_steps, total_steps=total_steps, schedule=o.schedule,
                       min_lr_ratio=o.min_lr_ratio, micro_batch_tokens=mcfg.micro_batch_tokens, attention=mcfg.attention,
                       gradient_checkpointing=mcfg.gradient_checkpointing, precision=mcfg.precision)


class RLExperiment:
    def __init__(self, cfg: RLConfig, resume: str | bool | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        # Everything that can fail on user input fails here, before a model is built.
        resume_dir = ckpt_lib.find_resume(self.out, resume) if resume else None
        check_model_dir(cfg.actor.path, "actor.path")
        self.tokenizer = load_tokenizer(cfg.actor.path)
        self.reward_fn = load_reward_fn(cfg.reward.fn) if cfg.reward.fn else None
        if cfg.reward.model:
            check_model_dir(cfg.reward.model, "reward.model")
        self.train_set, skipped = load_prompts(cfg.data.train, self.tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                               on_bad_row=cfg.data.on_bad_row)
        self.eval_set = []
        if cfg.data.eval:
            self.eval_set, skipped_eval = load_prompts(cfg.data.eval, self.tokenizer,
                                                       max_prompt_len=cfg.data.max_prompt_len,
                                                       on_bad_row=cfg.data.on_bad_row)
            skipped += skipped_eval
            self.eval_set = self.eval_set[: cfg.data.eval_size] if cfg.data.eval_size else self.eval_set
        self.ptx_set = []
        if cfg.algo.ptx_coef > 0:
            self.ptx_set, skipped_ptx = load_sft(cfg.data.ptx, self.tokenizer, max_len=cfg.data.max_len,
                                                 on_bad_row=cfg.data.on_bad_row)
            skipped += skipped_ptx
        self.skipped_rows = skipped
        self.grpovi_bounds = grpovi_bounds(cfg, self.reward_fn)
        if self.reward_fn is not None:  # a reward function that is broken fails now, not after generation
            first = self.train_set[0]
            compute_rewards(self.reward_fn, [first.prompt_text], [first.answer or ""], [first.answer])

        seed_everything(cfg.seed)
        actor_src = resume_dir / "actor" if resume_dir else cfg.actor.path
        self.actor = load_policy(actor_src, cfg.actor.dtype)
        total_updates = cfg.trainer.steps * cfg.algo.ppo_epochs * cfg.algo.mini_batches
        self.actor_engine = train_engine_for(self.actor, cfg.actor, total_updates)
        self.gen_engine = GenerationEngine(self.actor, [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id,
                                           cfg.rollout.batch_size)
        self.ref = None
        if cfg.algo.kl_coef > 0 or cfg.algo.kl_target is not None or cfg.algo.kl_metric:
            # with an EMA reference the reference changes during training, so a resume loads its saved copy
            ref_src = resume_dir / "ref" if (resume_dir and cfg.algo.ref_ema is not None) else (cfg.ref.path or cfg.actor.path)
            self.ref = load_policy(ref_src, cfg.ref.dtype).eval().requires_grad_(False)
        self.critic = self.critic_engine = None
        if cfg.algo.uses_critic:
            critic_src = resume_dir / "critic" if resume_dir else (cfg.critic.path or cfg.actor.path)
            self.critic = load_critic(critic_src, cfg.critic.dtype)
            self.critic_engine = train_engine_for(self.critic, cfg.critic, total_updates)
        self.reward_model = None
        if cfg.reward.model:
            self.reward_model = load_reward_model(cfg.reward.model).eval().requires_grad_(False)
        self.prm = None
        if cfg.reward.prm:
            self.prm = ProcessReward(cfg.reward.prm, refine_mode=cfg.reward.prm_refine, eta=cfg.reward.prm_eta,
                                     sep=cfg.reward.prm_sep, coef=cfg.reward.prm_coef, load_model=load_reward_model)
        self.kl_ctl = AdaptiveKLController(cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.actor_ema = EMAWeights(self.actor, cfg.algo.actor_ema) if cfg.algo.actor_ema is not None else None
        self.sampler = PromptSampler(len(self.train_set), cfg.seed, cfg.data.shuffle)
        self.ptx_sampler = PromptSampler(len(self.ptx_set), cfg.seed + 1, cfg.data.shuffle) if self.ptx_set else None
        self.step = 0
        if resume_dir:
            self._load_state(resume_dir)
        self.sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                       cfg.rollout.top_k)

    # ------------------------------------------------------------------ calls
    def actor_gen(self, prompt_idx: list[int]) -> SampleBatch:
        n = self.cfg.rollout.n
        examples = [self.train_set[i] for i in prompt_idx for _ in range(n)]
        first_id = self.step * len(examples)
        # Keyed sampling: sample first_id + j's tokens are a pure function of (run seed, step, sample id), so
        # they do not depend on how the step's prompts are batched or split over generation replicas, and a
        # resumed run (same step, same ids) draws exactly what the uninterrupted run drew.
        gens = self.gen_engine.generate([e.prompt_ids for e in examples], self.sampling,
                                        keys=range(first_id, first_id + len(examples)),
                                        seed=sample_seed(self.cfg.seed, self.step))
        groups = [first_id + j // n for j in range(len(examples))]
        return batch_from_generations(gens, examples, groups, first_id, self.tokenizer)

    def actor_gen_greedy(self, prompt_idx: list[int]) -> SampleBatch:
        """ReMax's extra call: one greedy response per prompt (its reward is the baseline of the prompt's samples)."""
        examples = [self.train_set[i] for i in prompt_idx]
        greedy = SamplingParams(self.sampling.max_new_tokens, greedy=True)
        gens = self.gen_engine.generate([e.prompt_ids for e in examples], greedy)
        return batch_from_generations(gens, examples, list(range(len(gens))), 0, self.tokenizer)

    def reward(self, batch: SampleBatch) -> SampleBatch:
        if self.reward_model is not None:
            scores = InferenceEngine(self.reward_model, self.cfg.actor.micro_batch_tokens).scores(batch)
        else:
            scores = torch.tensor(compute_rewards(self.reward_fn, batch.meta["prompt"], batch.meta["response"],
                                                  batch.meta["answer"]), dtype=torch.float)
        if self.cfg.reward.clip is not None:
            scores = scores.clamp(-self.cfg.reward.clip, self.cfg.reward.clip)
        batch.with_samples(score=scores)
        if self.prm is not None:  # dense per-step rewards on top of the outcome score
            batch.with_tokens(prm_rewards=self.prm.token_rewards(batch, self.tokenizer))
        return batch

    def ref_inf(self, batch: SampleBatch) -> SampleBatch:
        engine = InferenceEngine(self.ref, self.cfg.ref.micro_batch_tokens, self.cfg.ref.attention)
        return batch.with_tokens(ref_logprobs=engine.logprobs(batch, self.cfg.rollout.temperature)[0])

    def actor_inf(self, batch: SampleBatch) -> SampleBatch:
        engine = InferenceEngine(self.actor, self.cfg.actor.micro_batch_tokens, self.cfg.actor.attention)
        return batch.with_tokens(old_logprobs=engine.logprobs(batch, self.cfg.rollout.temperature)[0])

    def critic_inf(self, batch: SampleBatch) -> SampleBatch:
        engine = InferenceEngine(self.critic, self.cfg.critic.micro_batch_tokens, self.cfg.critic.attention)
        values, last_values = engine.values(batch)
        return batch.with_tokens(values=values).with_samples(last_values=last_values)

    def advantages(self, batch: SampleBatch) -> SampleBatch:
        a = self.cfg.algo
        mask = batch.tokens["action_mask"]
        score_tok = torch.zeros(batch.num_tokens)
        score_tok[batch.offsets[1:] - 1] = batch.samples["score"]  # the score lands on the last action
        token_rewards = score_tok * mask
        if "prm_rewards" in batch.tokens:
            token_rewards = token_rewards + batch.tokens["prm_rewards"]
        if self.ref is not None and a.kl_placement == "reward":
            kl = kl_penalty(batch.tokens["gen_logprobs"], batch.tokens["ref_logprobs"], "k1")
            token_rewards = token_rewards - self.kl_ctl.value * kl * mask
        if self.grpovi_bounds is not None:
            low, high = self.grpovi_bounds
            bad = ((batch.samples["score"] < low - 1e-4) | (batch.samples["score"] > high + 1e-4)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise RewardError(f"reward {float(batch.samples['score'][i]):g} of sample {i} is outside the GRPOVI "
                                  f"bounds [{low:g}, {high:g}]; fix the reward function's reward_range or set "
                                  "algo.grpovi_low / algo.grpovi_high")
        adv, ret = get_advantage(a.estimator)(
            rewards=batch.samples["score"], group_ids=batch.samples["group_id"], seqlens=batch.seqlens,
            action_mask=mask, token_rewards=token_rewards, values=batch.tokens.get("values"),
            last_values=batch.samples.get("last_values"), truncated=batch.samples["truncated"],
            gamma=a.gamma, lam=a.lam, norm_std=a.norm_std, baseline_rewards=batch.samples.get("baseline_score"),
            ref_seq_logprobs=self._ref_seq_logprobs(batch),
            reward_low=self.grpovi_bounds[0] if self.grpovi_bounds else None,
            reward_high=self.grpovi_bounds[1] if self.grpovi_bounds else None)
        if a.estimator == "gae" and a.whiten_advantages:
            adv = adv_lib.masked_whiten(adv, mask)
        return batch.with_tokens(advantages=adv, returns=ret)

    @staticmethod
    def _ref_seq_logprobs(batch: SampleBatch) -> torch.Tensor | None:
        """[B] reference log-prob of each whole response (GRPOVI weights the group by its softmax)."""
        if "ref_logprobs" not in batch.tokens:
            return None
        return torch.zeros(len(batch)).index_add_(0, batch.sample_index(), batch.tokens["ref_logprobs"])

    def _actor_loss(self, model, mb: SampleBatch, norm: Norm):
        a = self.cfg.algo
        mask = mb.tokens["action_mask"]
        logp, ent = token_logprobs(model, mb, temperature=self.cfg.rollout.temperature, with_entropy=True,
                                   attention=self.cfg.actor.attention)
        # On-policy single update: the old policy *is* the current one, so its log-probs are logp.detach()
        # (ratio = 1, gradient = policy gradient) and the extra actor_inf forward is skipped.
        old = mb.tokens["old_logprobs"] if "old_logprobs" in mb.tokens else logp.detach()
        loss, stats = ppo_policy_loss(logp, old, mb.tokens["advantages"], mask, mb.seqlens, norm, clip_low=a.clip_low,
                                      clip_high=a.clip_high, dual_clip=a.dual_clip, agg=a.loss_agg)
        stats = {"pg_loss": loss.detach(), **stats,
                 "entropy": aggregate(ent.detach(), mask, mb.seqlens, norm, "token-mean")}
        if self.ref is not None:
            kl = kl_loss(logp, mb.tokens["ref_logprobs"], mask, mb.seqlens, norm, kind=a.kl_estimator, agg=a.loss_agg)
            stats["kl"] = kl.detach()
            if a.kl_placement == "loss":
                loss = loss + self.kl_ctl.value * kl
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate(ent, mask, mb.seqlens, norm, a.loss_agg)
        return loss, stats

    def _ptx_loss(self, model, mb: SampleBatch, norm: Norm):
        """PPO-ptx: ptx_coef * token-mean SFT NLL on a batch of the ptx data, added to the actor's gradient."""
        logp, _ = token_logprobs(model, mb, attention=self.cfg.actor.attention)
        nll = sequence_nll(logp, mb.tokens["action_mask"], norm.tokens)
        return self.cfg.algo.ptx_coef * nll, {"ptx_nll": nll.detach()}

    def _ptx_batch(self) -> SampleBatch:
        examples = [self.ptx_set[i] for i in self.ptx_sampler.next(self.cfg.algo.ptx_batch_size)]
        return SampleBatch.from_sequences(
            range(len(examples)),
            {"input_ids": [torch.tensor(e.prompt_ids + e.response_ids) for e in examples],
             "action_mask": [torch.tensor([0] * len(e.prompt_ids) + [1] * len(e.response_ids)) for e in examples]})

    def _critic_loss(self, model, mb: SampleBatch, norm: Norm):
        values = token_values(model, mb, self.cfg.critic.attention)
        return value_loss(values, mb.tokens["values"], mb.tokens["returns"], mb.tokens["action_mask"], mb.seqlens,
                          norm, clip=self.cfg.algo.value_clip, agg=self.cfg.algo.loss_agg)

    def _train(self, engine: TrainEngine, batch: SampleBatch, loss_fn, prefix: str, ptx: bool = False) -> dict[str, float]:
        a = self.cfg.algo
        sums: dict[str, float] = {}
        n = 0
        for _ in range(a.ppo_epochs):
            for mini in batch.chunks(a.mini_batches):
                mask = mini.tokens["action_mask"]
                norm = Norm(tokens=float(mask.sum()), samples=float(len(mini)), max_tokens=float(self.cfg.rollout.max_new_tokens))
                extra = []
                if ptx:  # the SFT term joins the same optimizer step
                    pb = self._ptx_batch()
                    extra.append((pb, self._ptx_loss, Norm(float(pb.tokens["action_mask"].sum()), float(len(pb)))))
                for k, v in engine.step(mini, loss_fn, norm, extra=extra).items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        return {f"{prefix}/{k}": v / n for k, v in sums.items()}

    def actor_train(self, batch: SampleBatch) -> dict[str, float]:
        return self._train(self.actor_engine, batch, self._actor_loss, "actor", ptx=bool(self.ptx_set))

    def critic_train(self, batch: SampleBatch) -> dict[str, float]:
        return self._train(self.critic_engine, batch, self._critic_loss, "critic")

    # ------------------------------------------------------------------ the step
    def train_step(self) -> dict[str, float]:
        timer = StageTimer()
        t0 = time.perf_counter()
        cfg = self.cfg
        prompt_idx = self.sampler.next(cfg.rollout.prompts_per_step)
        with timer("actor_gen"):
            batch = self.actor_gen(prompt_idx)
        with timer("reward"):
            batch = self.reward(batch)
        if cfg.algo.estimator == "remax":
            with timer("actor_gen_greedy"):
                greedy = self.reward(self.actor_gen_greedy(prompt_idx))
            batch.with_samples(baseline_score=greedy.samples["score"].repeat_interleave(cfg.rollout.n))
        if self.ref is not None:
            with timer("ref_inf"):
                batch = self.ref_inf(batch)
        if cfg.algo.ppo_epochs * cfg.algo.mini_batches > 1:
            with timer("actor_inf"):
                batch = self.actor_inf(batch)
        if self.critic is not None:
            with timer("critic_inf"):
                batch = self.critic_inf(batch)
        with timer("advantages"):
            batch = self.advantages(batch)
        with timer("actor_train"):
            metrics = self.actor_train(batch)
        if self.critic is not None:
            with timer("critic_train"):
                metrics.update(self.critic_train(batch))
        if "actor/kl" in metrics:
            self.kl_ctl.update(metrics["actor/kl"], 1)
        if cfg.algo.ref_ema is not None and (self.step + 1) % cfg.algo.ref_ema_every == 0:
            ema_update_(self.ref, self.actor, cfg.algo.ref_ema)
        if self.actor_ema is not None:
            self.actor_ema.update(self.actor)
        step_time = time.perf_counter() - t0
        scores = batch.samples["score"]
        resp_len = batch.samples["response_len"].float()
        metrics.update({
            "reward/mean": scores.mean().item(),
            "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
            "reward/prm_sum": (batch.tokens["prm_rewards"].sum() / len(batch)).item() if "prm_rewards" in batch.tokens else None,
            "accuracy": exact_match_accuracy(batch.meta["response"], batch.meta["answer"]),
            "response_len/mean": resp_len.mean().item(),
            "response_len/max": resp_len.max().item(),
            "truncated": batch.samples["truncated"].float().mean().item(),
            "kl_coef": self.kl_ctl.value,
            **timer.times,
            "time/step": step_time,
            "throughput/gen_tokens_per_s": resp_len.sum().item() / timer.times["time/actor_gen"],
            "throughput/samples_per_s": len(batch) / step_time,
        })
        return metrics

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        resumed = self.step > 0
        if resumed:
            truncate_metrics(out / "metrics.jsonl", self.step)
        logger = MetricsLogger(out, cfg.trainer.tensorboard, append=resumed)
        eval_tokens = cfg.trainer.eval_max_new_tokens or cfg.rollout.max_new_tokens
        console = RunConsole("train", cfg.trainer.steps, enabled=cfg.trainer.progress)
        if self.skipped_rows:
            console.print(f"skipped {self.skipped_rows} bad data rows (data.on_bad_row=skip)")
        results: dict = {}

        def do_eval(step):
            if not self.eval_set:
                return None
            r = evaluate(self.actor, self.tokenizer, self.eval_set, max_new_tokens=eval_tokens,
                         reward_fn=self.reward_fn, batch_size=cfg.rollout.batch_size)
            logger.log(step, r.metrics())
            console.print(f"step {step:>4}  eval accuracy {r.accuracy if r.accuracy is None else f'{r.accuracy:.3f}'}"
                          f"  reward {r.reward if r.reward is None else f'{r.reward:.3f}'}  (n={r.n})")
            return r

        with console:
            if not resumed:
                results["initial_eval"] = do_eval(0)
            console.advance(self.step)
            while self.step < cfg.trainer.steps:
                metrics = self.train_step()
                self.step += 1
                logger.log(self.step, metrics)
                console.step(self.step, metrics)
                last = self.step == cfg.trainer.steps
                if (cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0) and not last:
                    do_eval(self.step)
                if (cfg.trainer.save_every and self.step % cfg.trainer.save_every == 0) or last:
                    self.save_checkpoint()
            results["final_eval"] = do_eval(self.step)
        logger.close()
        save_model(self.actor, self.tokenizer, out / "final")
        if self.actor_ema is not None:
            self._save_ema(out / "final_ema")
        rows = read_metrics(out / "metrics.jsonl")
        plot_curves(rows, ["eval/accuracy", "reward/mean", "actor/kl", "response_len/mean"], out / "curves.png",
                    title=f"{cfg.algo.name}: {out}")
        return results

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        d = ckpt_lib.checkpoint_dir(self.out, self.step)
        save_model(self.actor, self.tokenizer, d / "actor")
        if self.critic is not None:
            save_model(self.critic, None, d / "critic")
        if self.cfg.algo.ref_ema is not None:
            save_model(self.ref, None, d / "ref")
        if self.actor_ema is not None:
            self._save_ema(d / "ema_actor")
        ckpt_lib.save_state(d, {
            "step": self.step,
            "actor_engine": self.actor_engine.state_dict(),
            "critic_engine": self.critic_engine.state_dict() if self.critic_engine else None,
            "sampler": self.sampler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "rng": ckpt_lib.rng_state(),
            "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler else None,
            "actor_ema": self.actor_ema.state_dict() if self.actor_ema else None,
        })
        ckpt_lib.prune(self.out, self.cfg.trainer.keep_checkpoints)
        return d

    def _load_state(self, d: Path) -> None:
        s = ckpt_lib.load_state(d)
        self.step = s["step"]
        self.actor_engine.load_state_dict(s["actor_engine"])
        if self.critic_engine is not None and s["critic_engine"] is not None:
            self.critic_engine.load_state_dict(s["critic_engine"])
        self.sampler.load_state_dict(s["sampler"])
        self.kl_ctl.load_state_dict(s["kl_ctl"])
        ckpt_lib.set_rng_state(s["rng"])
        if self.ptx_sampler is not None and s.get("ptx_sampler"):
            self.ptx_sampler.load_state_dict(s["ptx_sampler"])
        if self.actor_ema is not None and s.get("actor_ema"):
            self.actor_ema.load_state_dict(s["actor_ema"])

    def _save_ema(self, out: Path) -> None:
        """The EMA weights as their own HF folder (swap them into the actor, save, swap back)."""
        live = {n: p.detach().clone() for n, p in self.actor.named_parameters()}
        self.actor_ema.copy_to(self.actor)
        save_model(self.actor, self.tokenizer, out)
        with torch.no_grad():
            for n, p in self.actor.named_parameters():
                p.copy_(live[n])
