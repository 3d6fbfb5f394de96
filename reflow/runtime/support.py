"""What the Ray runtime (runtime.workers >= 1) runs today, checked before Ray or any worker starts.

    warnings = check_supported(cfg, resume=args.resume)   # ConfigError naming the key, else what is ignored

The one-process loop (runtime.workers = 0) runs every feature; the runtime runs the step's graph of calls
(generation, rewards, reference / critic inference, actor / critic training) and not yet the features
below. A config that needs one of them fails at once with a line that names the key, instead of running
something other than what was asked for; settings the runtime only skips come back as warnings.
"""

from __future__ import annotations

from reflow.config.loader import ConfigError
from reflow.config.schema import RLConfig
from reflow.runtime.plan import Plan, PlanError

_HOW = "set runtime.workers=0 (the one-process loop) to use it"


def check_supported(cfg: RLConfig, resume=None) -> list[str]:  # noqa: ARG001 (resume: any checkpoint works)
    """Raise ConfigError for the first setting the runtime cannot run yet; return warnings (one line each)
    for settings it skips. `resume`: the command's --resume value (any runtime checkpoint resumes under
    any plan, so it needs no check here)."""
    a, w = cfg.algo, cfg.runtime.workers
    where = f"under runtime.workers={w}"
    unsupported = [
        (a.ptx_coef > 0, f"algo.ptx_coef={a.ptx_coef} (PPO-ptx)"),
        (cfg.reward.prm is not None, f"reward.prm={cfg.reward.prm} (process rewards)"),
        (a.actor_ema is not None, f"algo.actor_ema={a.actor_ema} (EMA actor)"),
        (a.ref_ema is not None, f"algo.ref_ema={a.ref_ema} (EMA reference)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"{what} is not supported {where} yet; {_HOW}")
    if a.estimator == "grpovi":  # the workers' advantage math needs the bounds; fail here, not in a worker
        from reflow.experiments.common import grpovi_bounds
        from reflow.rewards.registry import load_reward_fn

        grpovi_bounds(cfg, load_reward_fn(cfg.reward.fn) if cfg.reward.fn else None)
    if cfg.reward.fn:  # an unknown or malformed reward function fails now, not in a worker
        from reflow.rewards.registry import load_reward_fn

        load_reward_fn(cfg.reward.fn)

    warnings = []
    if cfg.data.eval:
        warnings.append(f"evaluation is not run {where} yet: data.eval ({cfg.data.eval}) is ignored; "
                        f"evaluate the model with `reflow eval`")
    return warnings


def check_plan_workers(plan: Plan, workers: int) -> Plan:
    """A plan (a YAML file carries its own world_size) must be for as many workers as the run starts."""
    if workers >= 1 and plan.world_size != workers:
        raise PlanError(f"plan '{plan.name}' is for {plan.world_size} worker(s) but runtime.workers={workers}; "
                        f"set runtime.workers={plan.world_size} or edit the plan's world_size and ranks")
    return plan
