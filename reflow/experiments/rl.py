"""`reflow train`: RL from a reward (PPO, GRPO and its relatives), as a graph of calls run by the executor.

    actor_gen -> reward [-> process_reward] [-> ref_inf] [-> actor_inf] [-> critic_inf]
              -> actor_train [-> critic_train] [-> ref_ema]          (reflow.runtime.graphs.rl_graph)

This file is what RL adds to the step loop: the prompts of a step (and the SFT rows of PPO-ptx and selective
rehearsal, one batch per optimizer step), adaptive KL
control, the checks that must fail before any model is loaded, and asynchronous training.

Asynchronous training (rollout.max_staleness = k > 0) is a schedule of the same calls: the graph's rollout
phase (generation, and scoring by frozen roles) of step s + k is submitted before the train phase (the
trained roles' inference and training) of step s, so on Ray workers generation of later steps runs on its
ranks while earlier steps train on theirs, and the weights a rollout is generated with have seen the
updates of steps before s: samples are at most k updates old (recorded per sample as `policy_version`; the
train call refuses an older one). The proximal policy of AReaL's decoupled objective is the actor at train
time: with one optimizer step per train call its log-probs are the train forward's own (no extra call), else
an actor_inf call recomputes them (`old_logprobs`); rollout correction with algo.rollout_correction=tis
weights by proximal / behaviour. The pipeline restarts at every checkpoint (trainer.save_every): nothing is
in flight when one is written, so a resumed run continues exactly. In one process the same schedule runs
one call after another: the same numbers, without the overlap.

Partial rollout (rollout.partial): the generation of step t, submitted with the weights of update v0 < t - 1,
spans the updates v0 .. t-1; it is cut into n = t - v0 segments, segment j submitted before train(v0 + j)
with that step's weights, so on Ray workers it is interrupted at each weight update and its unfinished
samples continue with the new weights (re-prefilled with their tokens so far); the scoring calls follow the
last segment. Every response token records the version that emitted it (`versions`) and its behaviour
log-prob under that version (`gen_logprobs`), which the decoupled objective / rollout correction divide
the proximal policy by, token by token. The cut is after an equal share of rollout.max_new_tokens per
segment, not at a wall-clock instant, so the run is the same in one process and on Ray workers.
"""

from __future__ import annotations

import time

from reflow.algorithms.losses import AdaptiveKLController
from reflow.config.schema import RLConfig
from reflow.data.sampler import PromptSampler
from reflow.experiments.loop import StepLoop
from reflow.experiments.rehearse import select_in_train
from reflow.models.load import check_model_dir, check_same_tokenizer, load_tokenizer
from reflow.rewards.registry import RewardError, compute_rewards
from reflow.rewards.sandbox import RewardSandbox, open_reward
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
        tokenizer = load_tokenizer(cfg.actor.path)
        check_same_tokenizer(tokenizer, "actor.path", cfg.actor.path,
                             {"critic.path": cfg.critic.path, "ref.path": cfg.ref.path, "reward.model": cfg.reward.model})
        self.graph = graph_for(cfg)
        # rehearsal.select: the selection pass (sampling with the actor) makes data.train and rehearsal.data
        self.rehearsal_selection = select_in_train(cfg)
        # the reward spec imports (in a one-process sandbox where reward.sandbox says so: user code does not run
        # in the controller); its signature is checked, and it is tried on a few prompts, before any model is built
        reward_fn = open_reward(cfg.reward, workers=1) if cfg.reward.fn else None
        try:
            data = WorkerData(cfg, tokenizer)
            grpovi_bounds(cfg, reward_fn)
            _ = data.train_prompts, data.eval_prompts, data.ptx, data.rehearsal  # bad rows fail now, in this order
            if reward_fn is not None:
                check_reward_fn(reward_fn, data.train_prompts[:2])
        finally:
            if isinstance(reward_fn, RewardSandbox):
                reward_fn.close()
        self.skipped_rows = data.skipped
        self.total_steps = cfg.trainer.steps
        self.samplers = {"prompts": PromptSampler(len(data.train_prompts), cfg.seed, cfg.data.shuffle)}
        if cfg.algo.ptx_coef > 0:
            self.samplers["ptx"] = PromptSampler(len(data.ptx), cfg.seed + 1, cfg.data.shuffle)
        if cfg.rehearsal.enabled:
            self.samplers["rehearsal"] = PromptSampler(len(data.rehearsal), cfg.seed + 2, cfg.data.shuffle)
        self.kl_ctl = AdaptiveKLController(cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.start(resume_dir, model_configs(cfg, self.graph))

    @property
    def optimizer_steps(self) -> int:
        a = self.cfg.algo
        return self.total_steps * a.ppo_epochs * a.mini_batches

    def step_meta(self) -> dict:
        return {**self.rollout_meta(), **self.train_meta()}

    def rollout_meta(self) -> dict:
        return {"prompts": self.samplers["prompts"].next(self.cfg.rollout.prompts_per_step)}

    def train_meta(self) -> dict:
        cfg = self.cfg
        meta = {"kl_coef": self.kl_ctl.value}
        n = cfg.algo.ppo_epochs * min(cfg.algo.mini_batches, cfg.rollout.prompts_per_step * cfg.rollout.n)
        for key, size in (("ptx", cfg.algo.ptx_batch_size), ("rehearsal", cfg.rehearsal.batch_size)):
            if key in self.samplers:  # one batch of SFT rows per optimizer step
                meta[key] = [self.samplers[key].next(size) for _ in range(n)]
        return meta

    def run_step(self) -> dict:
        """One step; with rollout.max_staleness = k > 0 asynchronously, with algo.dynamic_sampling in rounds
        (module docstring)."""
        if self.cfg.algo.dynamic_sampling:
            return self._dynamic_step()
        k = self.cfg.rollout.max_staleness
        if k == 0:
            return super().run_step()
        t0 = time.perf_counter()
        ex, s = self.executor, self.step
        rollout, train = self.graph.phases()
        window = self.settings["save_every"] or self.total_steps
        window_end = min((s // window + 1) * window, self.total_steps)
        if not hasattr(self, "_inflight"):
            self._inflight, self._next_rollout = {}, s
        cut = partial_calls(self.graph, rollout) if self.cfg.rollout.partial else []
        # partial rollout: the generation of each step in flight continues with this step's weights
        for t, f in sorted(self._inflight.items()):
            if f["segment"] < f["segments"]:
                self._submit_segment(t, f, s, cut, [n for n in rollout if n not in cut])
        while self._next_rollout <= min(s + k, window_end - 1):
            t = self._next_rollout
            # submitted before train(s): its weights have seen the s updates of steps 0 .. s-1; with partial rollout
            # its generation is cut into one segment per update before train(t), each with the newest weights
            f = {"outputs": {}, "pending": [], "segment": 0, "segments": max(1, t - s) if cut else 1,
                 "meta": self.rollout_meta()}
            self._inflight[t] = f
            self._submit_segment(t, f, s, cut, [n for n in rollout if n not in cut])
            self._next_rollout += 1
        f = self._inflight.pop(s)
        trained = ex.submit(self.graph, train, s, self.train_meta(), f["outputs"])
        return self.finish_step(ex.step_metrics(*(ex.collect(p) for p in f["pending"]), ex.collect(trained)), t0)

    def _submit_segment(self, t: int, f: dict, version: int, cut: list[str], rest: list[str]) -> None:
        """Submit the next segment of step t's cut generation calls (`cut`) with the weights of `version` (updates
        seen), and after its last one the rest of the rollout phase (`rest`: scoring, generation not cut)."""
        j, n = f["segment"], f["segments"]
        meta = {**f["meta"], "version": version}
        if cut:
            f["pending"].append(self.executor.submit(self.graph, cut, t, {**meta, "segment": (j, n)}, f["outputs"],
                                                     again=j > 0))
        if j == n - 1:
            f["pending"].append(self.executor.submit(self.graph, rest, t, meta, f["outputs"]))
        f["segment"] += 1

    def _dynamic_step(self) -> dict:
        """DAPO's dynamic sampling: rollout rounds of rollout.prompts_per_step new prompts until that many groups
        with reward spread are in hand (or algo.dynamic_sampling_rounds rounds), then one train phase on all of
        them, which keeps the first such groups. The controller learns only the count of each round."""
        t0 = time.perf_counter()
        ex, s, a = self.executor, self.step, self.cfg.algo
        rollout, train = self.graph.phases()
        outputs: dict = {}
        kept, collected = 0.0, []
        for r in range(a.dynamic_sampling_rounds):
            round_out: dict = {}
            collected.append(ex.collect(ex.submit(self.graph, rollout, s, {**self.rollout_meta(), "round": r},
                                                  round_out)))
            for name, refs in round_out.items():
                outputs.setdefault(name, []).extend(refs)
            kept += collected[-1]["metrics"].pop("dynamic/groups_with_spread", 0.0)
            if kept >= self.cfg.rollout.prompts_per_step:
                break
        trained = ex.collect(ex.submit(self.graph, train, s, self.train_meta(), outputs))
        return self.finish_step({**ex.step_metrics(*collected, trained), "dynamic/rounds": float(r + 1)}, t0)

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


def partial_calls(graph, rollout: list[str]) -> list[str]:
    """The rollout calls a partial rollout cuts into segments: the sampled generations (impl `generate`; ReMax's
    greedy baseline is decoded whole, after the last segment)."""
    return [n for n in rollout if graph.call(n).impl == "generate" and not graph.call(n).options.get("greedy")]


def check_reward_fn(reward_fn, examples) -> None:
    """Call the reward function on a few training prompts, their answers as the responses, so that one that
    raises, returns the wrong count or a non-number fails before any model loads."""
    try:
        compute_rewards(reward_fn, [e.prompt_text for e in examples], [e.answer or "" for e in examples],
                        [e.answer for e in examples])
    except RewardError as e:
        raise RewardError(f"reward.fn, tried on the first {len(examples)} training prompts before training: {e}") from e


def run_rl(cfg: RLConfig, resume=None) -> dict:
    with RLExperiment(cfg, resume) as exp:
        return exp.run()

