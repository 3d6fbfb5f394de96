"""Loading an environment class from `rollout.env`, and the one error type of environments."""

from __future__ import annotations

from reflow.rewards.registry import RewardError, load_reward_fn

# built-in name -> "module:Class"
BUILTIN_ENVS = {"calculator": "reflow.envs.calculator:CalculatorEnv",
                "python": "reflow.envs.python_tool:PythonEnv"}


class EnvError(RuntimeError):
    """An environment failed (or is not one): the message is one line naming the env spec and, when an
    episode was running, its sample id and prompt."""


def load_env(spec: str) -> type:
    """`rollout.env` -> the environment class: a built-in name, `file.py:Class` or `module:Class`. Checks that it
    is a class made with no arguments, with callable `reset` and `step`; an EnvError
    (one line naming rollout.env) otherwise."""
    target = BUILTIN_ENVS.get(spec.strip(), spec) if isinstance(spec, str) else spec
    try:
        # the spec grammar (and its errors) of reward functions; keywords=() skips their signature check
        cls = load_reward_fn(target, keywords=(), key="rollout.env")
    except RewardError as e:
        raise EnvError(f"{e} (built-ins: {', '.join(BUILTIN_ENVS)})") from None
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        what = f"lacks {' and '.join(missing)}" if missing else f"is a {type(cls).__name__}, not a class"
        raise EnvError(f"rollout.env {spec!r} {what}; it must be a class with reset(row) -> str | None and "
                       "step(message) -> (observation, reward, done)")
    return cls


def describe_episode(sample_id: int, prompt: str) -> str:
    """`sample 12 (prompt '37*45=')`, the prompt cut to 60 characters."""
    short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f"sample {sample_id} (prompt {short!r})"


def check_step_result(result, spec: str, episode: str) -> tuple[str, float, bool]:
    """step's return value as (observation, reward, done), or an EnvError saying what it returned."""
    import math

    ok = isinstance(result, (tuple, list)) and len(result) == 3
    if ok:
        obs, reward, done = result
        try:
            reward = float(reward)
        except (TypeError, ValueError):
            ok = False
        ok = ok and isinstance(obs, str) and math.isfinite(reward)
    if not ok:
        text = repr(result)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise EnvError(f"rollout.env {spec!r}: step returned {text} for {episode}; return (observation: str, "
                       "reward: finite float, done: bool)")
    return obs, reward, bool(done)
