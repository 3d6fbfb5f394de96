"""`reflow train`: RL from a reward (PPO, GRPO and its relatives), as a graph of calls run by the executor.

    actor_gen -> reward [-> process_reward] [-> ref_inf] [-> actor_inf] [-> critic_inf]
              -> actor_train [-> critic_train] [-> ref_ema]          (reflow.runtime.graphs.rl_graph)

This file is what RL adds to the step loop: the prompts of a step (and PPO-ptx's SFT rows), adaptive KL
control and the checks that must fail before any model is loaded.
"""

from __future__ import annotations

from reflow.algorithms.losses import AdaptiveKLController
from reflow.config.schema import RLConfig
from reflow.data.sampler import PromptSampler
from reflow.experiments.loop import StepLoop
from reflow.models.load import check_model_dir, load_tokenizer
from reflow.rewards.registry import load_reward_fn
from reflow.runtime.calls.policy import grpovi_bounds
from reflow.runtime.data import WorkerData
from reflow.runtime.graphs import graph_for
from reflow.runtime.roles import model_configs
from reflow.utils import checkpoint as ckpt_lib


class RLExperiment(StepLoop):
    name = "train"
    curve_keys = ["eval/accuracy", "reward/mean", "actor/kl", "response_len/mean"]

    def __init__(self, cfg: RLConfig, resume: str | bool | None = None):
        self.cfg = cfg
        # Everything that can fail on user input fails here, before a model is built.
        resume_dir = ckpt_lib.find_resume(cfg.output_dir, resume) if resume else None
        check_model_dir(cfg.actor.path, "actor.path")
        if cfg.reward.model:
            check_model_dir(cfg.reward.model, "reward.model")
        self.graph = graph_for(cfg)
        reward_fn = load_reward_fn(cfg.reward.fn) if cfg.reward.fn else None
        data = WorkerData(cfg, load_tokenizer(cfg.actor.path))
        grpovi_bounds(cfg, reward_fn)
        _ = data.train_prompts, data.eval_prompts, data.ptx  # bad rows fail now, in this order
        self.skipped_rows = data.skipped
        self.total_steps = cfg.trainer.steps
        self.samplers = {"prompts": PromptSampler(len(data.train_prompts), cfg.seed, cfg.data.shuffle)}
        if cfg.algo.ptx_coef > 0:
            self.samplers["ptx"] = PromptSampler(len(data.ptx), cfg.seed + 1, cfg.data.shuffle)
        self.kl_ctl = AdaptiveKLController(cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.start(resume_dir, model_configs(cfg, self.graph))

    @property
    def optimizer_steps(self) -> int:
        a = self.cfg.algo
        return self.total_steps * a.ppo_epochs * a.mini_batches

    def step_meta(self) -> dict:
        cfg = self.cfg
        meta = {"prompts": self.samplers["prompts"].next(cfg.rollout.prompts_per_step), "kl_coef": self.kl_ctl.value}
        if "ptx" in self.samplers:  # one batch of SFT rows per optimizer step
            n = cfg.algo.ppo_epochs * min(cfg.algo.mini_batches, cfg.rollout.prompts_per_step * cfg.rollout.n)
            meta["ptx"] = [self.samplers["ptx"].next(cfg.algo.ptx_batch_size) for _ in range(n)]
        return meta

    def after_step(self, metrics: dict) -> dict:
        if metrics.get("actor/kl") is not None:
            self.kl_ctl.update(metrics["actor/kl"], 1)
        step_time = metrics["time/step"]
        metrics["kl_coef"] = self.kl_ctl.value
        metrics["throughput/samples_per_s"] = metrics.get("samples", 0.0) / step_time
        if metrics.get("time/actor_gen"):
            metrics["throughput/gen_tokens_per_s"] = metrics.get("gen_tokens", 0.0) / metrics["time/actor_gen"]
        return metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl"])


def run_rl(cfg: RLConfig, resume=None) -> dict:
    with RLExperiment(cfg, resume) as exp:
        return exp.run()

