"""Shared by the runtime tests: a tiny RL / supervised config, a run that returns its per-step metrics, and
the comparison of two runs' metrics."""

from pathlib import Path

from reflow.config.loader import from_dict
from reflow.config.schema import RLConfig

REWARDS = Path(__file__).parent / "varied_reward.py"
COMPARED = ("loss", "grad_norm", "reward/mean", "actor/kl", "accuracy", "ptx_nll", "rehearsal_nll", "reward/prm_sum",
            "eval/")


def rl_config(out, model, data, workers=0, **algo):
    role = {"path": str(model), "micro_batch_tokens": 64, "optim": {"lr": 1e-3}}
    return from_dict(RLConfig, {
        "output_dir": str(out), "actor": role, "critic": {**role, "path": None},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "test.jsonl"), "eval_size": 4,
                 "ptx": str(data / "sft.jsonl")},
        "rollout": {"prompts_per_step": 3, "n": 2, "max_new_tokens": 4},
        "reward": {"fn": f"{REWARDS}:varied"},
        "algo": {"kl_coef": 0.01, "grpovi_low": 0.0, "grpovi_high": 1.0, **algo},
        "trainer": {"steps": 2, "progress": False, "eval_every": 0, "save_every": 0},
        "runtime": {"workers": workers, "plan": "separate", "timeout_s": 60}})


def run(cls, cfg, resume=None) -> list[dict]:
    with cls(cfg, resume) as exp:
        exp.run()
        return exp.history


def compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None and any(c in k for c in COMPARED)}


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for step, (x, y) in enumerate(zip(a, b)):
        x, y = compared(x), compared(y)
        assert x.keys() == y.keys() and x, (step, sorted(x), sorted(y))
        for k in x:
            assert abs(x[k] - y[k]) <= 1e-5 + 1e-4 * abs(x[k]), (step, k, x[k], y[k])


def both(cls, make_cfg, tmp_path) -> tuple[list[dict], list[dict]]:
    return run(cls, make_cfg(tmp_path / "local", 0)), run(cls, make_cfg(tmp_path / "ray", 2))


def supervised_config(cls, out, model, data, workers, **extra):
    base = {"output_dir": str(out), "model": {"path": str(model), "micro_batch_tokens": 64, "optim": {"lr": 1e-3}},
            "batch_size": 8, "max_steps": 2, "progress": False, "data": {"train": str(data / extra.pop("train"))},
            "runtime": {"workers": workers, "plan": "colocate", "timeout_s": 60}, **extra}
    return from_dict(cls, base)
