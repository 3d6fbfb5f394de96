"""The algorithm math of an RL step on a worker: advantages and the actor/critic losses.

It is the one-process loop's own code (reflow.experiments.rl.RLExperiment), borrowed method by method
so both paths compute the same numbers; those methods only read the attributes set here (the config,
whether a reference exists, the current KL coefficient, the GRPOVI bounds).
"""

from __future__ import annotations

from reflow.config.schema import RLConfig
from reflow.experiments.rl import RLExperiment
from reflow.experiments.common import grpovi_bounds
from reflow.rewards.registry import load_reward_fn


class _KL:
    def __init__(self, value: float):
        self.value = value


class StepMath:
    advantages = RLExperiment.advantages
    _ref_seq_logprobs = staticmethod(RLExperiment._ref_seq_logprobs)
    actor_loss = RLExperiment._actor_loss
    critic_loss = RLExperiment._critic_loss
    train = RLExperiment._train

    def __init__(self, cfg: RLConfig, has_ref: bool):
        self.cfg = cfg
        self.ref = True if has_ref else None  # the loss code only asks whether a reference exists
        self.kl_ctl = _KL(cfg.algo.kl_coef)
        self.ptx_set = []
        self.grpovi_bounds = grpovi_bounds(cfg, load_reward_fn(cfg.reward.fn) if cfg.reward.fn else None)

    @property
    def kl_value(self) -> float:
        return self.kl_ctl.value

    @kl_value.setter
    def kl_value(self, v: float) -> None:
        self.kl_ctl.value = v
