"""Name -> function registries, so each estimator or loss is one config key away (verl's style)."""

from __future__ import annotations

from typing import Callable

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


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
