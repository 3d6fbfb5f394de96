"""A planning problem from an RL config: the config's graph, models and workload; the search plans it."""

from reflow.config.schema import RLConfig
from reflow.planner.config import problem_for_config
from reflow.planner.search import search


def test_problem_from_rl_config_plans(debug_model):
    cfg = RLConfig()
    cfg.actor.path = str(debug_model)
    cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens = 4, 4, 8
    cfg.runtime.workers = 4
    pr = problem_for_config(cfg, hw="cpu")
    assert pr.world_size == 4 and pr.workload.batch == 16 and pr.workload.gen_len == 8
    assert pr.models["actor"].dtype_bytes == 4 and pr.models.get("reward") is None
    res = search(pr, seed=0, steps=200)
    res.plan.validate(pr.graph, pr.model_configs())
    assert res.evaluation.feasible
