"""Name -> function registries, so each estimator or loss is one config key away (verl's style)."""

from __future__ import annotations

from typing import Callable

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


def register_advantage(name: str):
    """Decorator: make an advantage estimator selectable as `algo.adv_estimator: <name>`."""

    def wrap(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def get_advantage(name: str) -> Callable:
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage estimator '{name}'; choose one of: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    return ADVANTAGE_ESTIMATORS[name]


def register_policy_loss(name: str):
    """Decorator: make a policy loss selectable as `algo.policy_loss: <name>`.

    Every registered loss has the signature
        fn(logp, old_logp, advantages, mask, seqlens, norm, *, <its own options>, rollout_weights=None)
            -> (loss, stats)
    with per-token tensors [T], seqlens [B] and a `Norm`. The options are keyword-only and named by each
    loss (no catch-all): an option meant for another loss is a TypeError, not silently ignored.
    """

    def wrap(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> Callable:
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss '{name}'; choose one of: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]
