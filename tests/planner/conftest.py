"""Fixtures shared by the planner's tests."""

import pytest


@pytest.fixture
def ppo_cfg(tmp_path, debug_model, addition_data):
    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig

    return from_dict(RLConfig, {
        "output_dir": str(tmp_path / "run"), "actor": {"path": str(debug_model)}, "reward": {"fn": "exact_match"},
        "data": {"train": str(addition_data / "train.jsonl"), "eval": None, "max_prompt_len": 16},
        "rollout": {"prompts_per_step": 4, "n": 2, "max_new_tokens": 4},
        "algo": {"name": "ppo", "kl_coef": 0.01, "ppo_epochs": 1, "mini_batches": 1},
        "trainer": {"steps": 2, "progress": False}, "runtime": {"workers": 2, "timeout_s": 60}})
