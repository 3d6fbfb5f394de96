"""Finding reward functions by name and calling them safely.

A reward function is any callable with this signature::

    def my_reward(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
        return [1.0 if r.strip() == a else 0.0 for r, a in zip(responses, answers)]

It is called with keyword arguments, once per batch, and must return one
finite number per response, in order (a list, tuple, 1-D numpy array or 1-D
torch tensor). ``answers`` holds the dataset's ``answer`` column (``None``
where a row has none). An optional attribute ``my_reward.reward_range = (low,
high)`` declares the possible values.

What counts as a correct response (the ``accuracy`` metrics of training, eval
and ``reflow eval``) is the reward's own: a response is correct when its reward
is at least ``my_reward.correct_at`` (a number) when declared, else when it
reaches the reward's maximum, the ``high`` of ``reward_range``. A function that
declares neither has no accuracy (reported as missing, with one warning)::

    my_reward.correct_at = 1.0       # e.g. a 0.1 format bonus is not a correct answer

The config names it with a spec string: a builtin (``"exact_match"``,
``"format"``, ``"exact_match_with_format"``, ``"digit_match"``, ``"final_number"``, ``"code_exec"``), ``"package.module:function"``
(importable from ``PYTHONPATH``), or ``"path/to/file.py:function"``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from reflow.rewards.code_exec import code_exec
from reflow.rewards.rules import digit_match, exact_match, exact_match_with_format, final_number, format_reward

RewardFn = Callable[..., Any]
log = logging.getLogger("reflow")

BUILTIN: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "format": format_reward,
    "exact_match_with_format": exact_match_with_format,
    "digit_match": digit_match,
    "final_number": final_number,
    "code_exec": code_exec,
}

_SPEC_ATTR = "reflow_spec"  # remembered on loaded functions so errors use the user's own spelling
_SPEC_HELP = "use a builtin (" + ", ".join(BUILTIN) + "), 'package.module:function' or 'path/to/file.py:function'"


class RewardError(ValueError):
    """A user-facing problem loading or running a reward function."""


class RewardShapeError(RewardError):
    """The function returned the wrong container or the wrong number of values for its batch: a bug in the
    function whatever the inputs (one sample cannot cause it), so it is never retried sample by sample."""


# --------------------------------------------------------------------------- loading


def load_reward_fn(spec: str, keywords: Sequence[str] = ("prompts", "responses", "answers"), *,
                   key: str | None = None) -> RewardFn:
    """Resolve a reward spec (builtin name, ``module:function`` or ``file.py:function``) to a callable.

    Checks up front that the callable accepts the `keywords` (``prompts``, ``responses`` and ``answers``
    for outcome rewards; a process reward takes ``steps`` instead of ``answers``), so a wrong signature
    fails at startup, not mid-training. key: the config key of a function that is not a reward (e.g.
    ``algo.graph``): errors name it, and the builtin rewards are not candidates.
    """
    label = key or "reward spec"
    help_ = "use 'package.module:function' or 'path/to/file.py:function'" if key else _SPEC_HELP
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"{label} must be a non-empty string, got {spec!r}; {help_}")
    spec = spec.strip()
    if spec in BUILTIN and not key:
        return BUILTIN[spec]
    if ":" not in spec:
        raise RewardError(f"{f'{key} {spec!r} names no function' if key else f'unknown reward {spec!r}'}; {help_}")

    # rsplit: Windows paths ("C:\\rewards.py:fn") contain a colon of their own.
    module_part, attr_path = spec.rsplit(":", 1)
    if not module_part or not attr_path:
        raise RewardError(f"{label} {spec!r} is incomplete; {help_}")
    is_file = module_part.endswith(".py") or "/" in module_part or "\\" in module_part
    module = _import_file(spec, module_part, label) if is_file else _import_module(spec, module_part, label)

    obj: Any = module
    for part in attr_path.split("."):  # allows "module:Class.method"
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RewardError(f"{label} {spec!r}: {module_part!r} has no attribute {attr_path!r}; "
                              f"callables found there: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{label} {spec!r}: {attr_path!r} is not a function (type {type(obj).__name__}); "
                          f"point it at a function taking ({', '.join(keywords)})")
    _check_signature(spec, obj, keywords, key or "reward function")
    try:
        setattr(obj, _SPEC_ATTR, spec)
    except (AttributeError, TypeError):  # bound methods, builtins: fall back to module:qualname
        pass
    return obj


def _import_module(spec: str, name: str, label: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RewardError(f"{label} {spec!r}: could not import module {name!r} ({e}); make sure the module is "
                          "importable (on PYTHONPATH, or installed), or use 'path/to/file.py:function'") from e
    except Exception as e:
        raise RewardError(f"{label} {spec!r}: importing {name!r} raised {type(e).__name__}: {e}; "
                          "fix the error in that module") from e


def _import_file(spec: str, file_part: str, label: str):
    path = Path(file_part).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"{label} {spec!r}: file {path} not found; check the path "
                          f"(relative paths are resolved from {Path.cwd()})")
    # A unique, stable module name per file, so two "rewards.py" in different
    # folders do not collide and pickling/dataclasses can find the module.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"reflow_user_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"{label} {spec!r}: cannot import {path} as Python; use a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    # Like running a script: the file's own folder is importable while it loads,
    # so it can import helper modules that sit next to it.
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise RewardError(f"{label} {spec!r}: importing {path} raised {type(e).__name__}: {e}; "
                          "fix the error in that file") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def _check_signature(spec: str, fn: RewardFn, keywords: Sequence[str], label: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some C callables have no inspectable signature; trust them
        return
    try:
        sig.bind(**{k: [] for k in keywords})
    except TypeError:
        args = ", ".join(keywords)
        raise RewardError(f"{label} {spec!r} has signature {sig}; it must accept keyword arguments "
                          f"({args}), e.g. def fn({args}): ...") from None


def _name(fn: RewardFn) -> str:
    spec = getattr(fn, _SPEC_ATTR, None)
    if spec:
        return spec
    for name, builtin in BUILTIN.items():
        if fn is builtin:
            return name
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def reward_range(fn: RewardFn) -> tuple[float, float] | None:
    """The ``(low, high)`` a reward function declares via ``fn.reward_range``, or None if it declares none."""
    declared = getattr(fn, "reward_range", None)
    if declared is None:
        return None
    try:
        low, high = (float(v) for v in declared)
    except (TypeError, ValueError):
        raise RewardError(f"reward function '{_name(fn)}' has reward_range={declared!r}; "
                          "set it to a (low, high) pair of numbers") from None
    if math.isnan(low) or math.isnan(high) or low > high:
        raise RewardError(f"reward function '{_name(fn)}' has reward_range={declared!r}; "
                          "it needs low <= high and no NaN")
    return low, high


def declared_correct_at(fn: RewardFn) -> float | None:
    """``fn.correct_at`` as a float, None when not declared; a value that is not a finite number is an error."""
    declared = getattr(fn, "correct_at", None)
    if declared is None:
        return None
    x = _as_float(declared)
    if x is None:
        raise RewardError(f"reward function '{_name(fn)}' has correct_at={declared!r}; set it to a finite "
                          "number (the lowest reward that counts as a correct response)")
    return x


def correct_at(fn: RewardFn) -> float | None:
    """The lowest reward that counts as correct: ``fn.correct_at`` when declared, else the reward's maximum (the
    high end of ``fn.reward_range``); None, with one warning per function, when it declares neither."""
    declared = declared_correct_at(fn)
    if declared is not None:
        return declared
    bounds = reward_range(fn)
    if bounds is not None:
        return bounds[1]
    name = _name(fn)
    if name not in _warned_no_success:
        _warned_no_success.add(name)
        log.warning("reward function '%s' declares neither correct_at nor reward_range, so accuracy is not "
                    "reported; set e.g. %s.correct_at = 1.0", name, getattr(fn, "__name__", "fn"))
    return None


_warned_no_success: set[str] = set()


def correct(fn: RewardFn, rewards: Sequence[float]) -> list[bool] | None:
    """Which rewards count as correct under :func:`correct_at` (``r >= correct_at``); None if undeclared."""
    at = correct_at(fn)
    return None if at is None else [r >= at for r in rewards]


# --------------------------------------------------------------------------- calling


def _short(text: Any, limit: int = 60) -> str:
    s = repr(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _as_sequence(result: Any) -> list | None:
    """Turn an accepted container into a plain list; None if the type is not accepted."""
    if isinstance(result, (list, tuple)):
        return list(result)
    # Check torch/numpy only if already imported: a user returning a tensor has
    # imported torch, and we avoid importing it just to say "no".
    for mod_name, cls_name in (("torch", "Tensor"), ("numpy", "ndarray")):
        mod = sys.modules.get(mod_name)
        if mod is not None and isinstance(result, getattr(mod, cls_name)):
            if result.ndim != 1:
                return None
            if mod_name == "torch":
                result = result.detach().cpu()
            return result.tolist()
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)):  # "1.0" parses as a float, but is almost surely a bug
        return None
    try:
        x = float(value)  # accepts bool, int, numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def compute_rewards(fn: RewardFn, prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """Call ``fn(prompts=..., responses=..., answers=...)`` and validate its result.

    Any exception from the function, or a result that is not one finite number
    per response, becomes a :class:`RewardError` naming the function and the
    offending index so the user knows what to fix.
    """
    n = len(prompts)
    if len(responses) != n or len(answers) != n:
        raise ValueError(f"compute_rewards got {n} prompts, {len(responses)} responses, {len(answers)} answers")
    name = _name(fn)
    try:
        # Copies, so a reward function that mutates its inputs cannot corrupt the batch.
        result = fn(prompts=list(prompts), responses=list(responses), answers=list(answers))
    except Exception as e:
        first = f"; first prompt: {_short(prompts[0])}" if n else ""
        raise RewardError(f"reward function '{name}' raised {type(e).__name__}: {e} "
                          f"(batch of {n} samples{first})") from e

    values = _as_sequence(result)
    if values is None:
        shape = getattr(result, "shape", None)
        what = type(result).__name__ + (f" of shape {tuple(shape)}" if shape is not None else "")
        raise RewardShapeError(f"reward function '{name}' returned a {what}; it must return a list of {n} floats, "
                          "one per response")
    if len(values) != n:
        raise RewardShapeError(f"reward function '{name}' returned {len(values)} rewards for {n} responses; "
                          "it must return exactly one float per response, in order")
    rewards: list[float] = []
    for i, value in enumerate(values):
        x = _as_float(value)
        if x is None:
            raise RewardError(f"reward function '{name}' returned {_short(value)} at index {i}; every reward "
                              "must be a finite number (return e.g. 0.0 for responses that cannot be scored)")
        rewards.append(x)
    return rewards


def compute_step_scores(fn: RewardFn, prompts: list[str], responses: list[str], steps: list[list[str]]) -> list[list[float]]:
    """A process reward: ``fn(prompts=..., responses=..., steps=...)`` -> one list of finite step scores per
    response (``steps[i]`` are the step texts of response i), validated like :func:`compute_rewards`."""
    name = _name(fn)
    try:
        out = fn(prompts=list(prompts), responses=list(responses), steps=[list(s) for s in steps])
    except Exception as e:
        raise RewardError(f"process reward '{name}' raised {type(e).__name__}: {e}") from e
    if not isinstance(out, (list, tuple)) or len(out) != len(responses):
        raise RewardShapeError(f"process reward '{name}' must return one list of step scores per response "
                          f"({len(responses)}), got {type(out).__name__}")
    scores = []
    for i, (sc, st) in enumerate(zip(out, steps)):
        values = _as_sequence(sc)
        floats = [_as_float(x) for x in values] if values is not None else []
        if values is None or len(values) != len(st) or any(x is None for x in floats):
            raise RewardError(f"process reward '{name}': response {i} has {len(st)} steps but got "
                              f"scores {_short(sc)}; return one finite number per step")
        scores.append(floats)
    return scores
