"""Plan search: valid, fitting plans; deterministic for a seed; seconds on 8 devices."""

import time

import pytest

from reflow.planner.cost import Workload
from reflow.planner.hardware import hardware
from reflow.planner.memory import plan_memory
from reflow.planner.models import ModelShape, llama_config
from reflow.planner.search import candidate_layouts, candidate_meshes, search
from reflow.planner.simulator import Problem, evaluate
from reflow.planner.whatif import ppo_problem
from reflow.runtime.graphs import grpo, ppo


def ppo7(n, **kw):
    m = ModelShape.of(llama_config("7b"))
    models = {"actor": m, "ref": m, "critic": ModelShape.of(llama_config("7b"), "value"),
              "reward": ModelShape.of(llama_config("7b"), "score")}
    return Problem(ppo(), models, hardware("a100-80g"), Workload(batch=512), n, **kw)


def check(problem, result):
    plan = result.plan
    plan.validate(problem.graph, problem.model_configs())  # raises PlanError when invalid
    mem = plan_memory(problem.graph, plan, problem.models, problem.hw, problem.workload)
    assert mem.feasible, mem.reason
    assert all(p <= problem.hw.usable_memory for p in mem.peak.values())
    assert result.evaluation.feasible and result.time == pytest.approx(evaluate(problem, plan).time)
    best_builtin = min((e.time for e in result.baselines.values() if e.feasible), default=float("inf"))
    assert result.time <= best_builtin + 1e-9


def test_search_on_8_devices_is_fast_valid_and_beats_builtins():
    pr = ppo7(8)
    t0 = time.perf_counter()
    res = search(pr, seed=0)
    assert time.perf_counter() - t0 < 10
    check(pr, res)
    assert {"colocate", "separate", "colocate (tuned)", "separate (tuned)"} <= set(res.baselines)
    assert "searched" in res.report()


def test_same_seed_same_plan():
    a = search(ppo7(16), seed=3, steps=600)
    b = search(ppo7(16), seed=3, steps=600)
    assert a.plan.to_dict() == b.plan.to_dict() and a.time == b.time


@pytest.mark.parametrize("size,n,seed", [("13b", 16, 1), ("70b", 32, 2)])
def test_search_never_returns_invalid_or_over_memory_plans(size, n, seed):
    pr = ppo_problem(size, n, workload=Workload(batch=256))
    check(pr, search(pr, seed=seed, steps=300))


def test_search_with_a_reward_function_and_cpu_hardware():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = ModelShape.of(cfg, dtype_bytes=4)
    pr = Problem(grpo(), {"actor": m, "ref": m, "reward": None}, hardware("cpu", devices_per_node=4),
                 Workload(batch=16, prompt_len=16, gen_len=16, micro_tokens=256), 4)
    res = search(pr, seed=0, steps=300)
    check(pr, res)
    assert res.plan.calls["reward"].layout.t == 1 and res.plan.calls["reward"].layout.p == 1


def test_candidate_space():
    meshes = candidate_meshes(32, 8)
    assert (tuple(range(8, 16))) in meshes and tuple(range(0, 32)) in meshes
    assert not any(m[0] // 8 != m[-1] // 8 and len(m) < 8 for m in meshes)  # small meshes stay in a node
    assert tuple(range(4, 12)) not in meshes
    m70 = ModelShape.of(llama_config("70b"))
    lays = candidate_layouts(16, m70, "generate", 8)
    assert lays and all(lay.p == 1 and lay.t <= 8 and 8 % lay.t == 0 for lay in lays)
    assert all(lay.d * lay.t * lay.p == 16 for lay in candidate_layouts(16, m70, "train", 8))
    assert any(lay.t > 1 for lay in lays)
    # long-tail migration moves rows between generate replicas of one rank: only dXt1p1 for generation
    assert [(lay.d, lay.t, lay.p) for lay in candidate_layouts(16, m70, "generate", 8, migrate=True)] == [(16, 1, 1)]
    assert any(lay.t > 1 for lay in candidate_layouts(16, m70, "train", 8, migrate=True))


def test_search_with_fewer_devices_than_roles():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    models = {"actor": ModelShape.of(cfg, dtype_bytes=4), "ref": ModelShape.of(cfg, dtype_bytes=4),
              "critic": ModelShape.of(cfg, "value", dtype_bytes=4), "reward": ModelShape.of(cfg, "score", dtype_bytes=4)}
    pr = Problem(ppo(), models, hardware("cpu"), Workload(batch=8, prompt_len=8, gen_len=8, micro_tokens=64), 2)
    check(pr, search(pr, seed=0, steps=200))


def test_a_builtin_plan_is_kept_unless_the_search_beats_it_by_the_margin():
    pr = ppo7(8)
    found = search(pr, seed=0, steps=300, builtin_margin=0.0)
    best_builtin = min((e for n, e in found.baselines.items() if n in ("colocate", "separate") and e.feasible),
                       key=lambda e: e.time)
    gain = 1 - found.time / best_builtin.time
    assert gain > 0.01  # on 8 A100s the search finds a faster plan than either built-in
    above = search(pr, seed=0, steps=300, builtin_margin=min(0.99, gain + 0.01))
    assert above.plan.name == best_builtin.plan.name and above.best_found.time == pytest.approx(found.time)
    assert "built-in" in above.report()
    below = search(pr, seed=0, steps=300, builtin_margin=max(0.0, gain - 0.01))
    assert below.plan.name == "searched" and below.best_found is None
