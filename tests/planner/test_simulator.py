"""Simulator: overlap on disjoint meshes, serialisation on shared ones, reallocations in the timeline."""

import pytest

from reflow.planner.cost import Workload, placement
from reflow.planner.hardware import hardware
from reflow.planner.models import ModelShape, llama_config
from reflow.planner.simulator import Problem, evaluate, simulate
from reflow.runtime.graphs import ppo
from reflow.runtime.plan import Plan, colocate

M7 = ModelShape.of(llama_config("7b"))
MODELS = {"actor": M7, "ref": M7, "critic": ModelShape.of(llama_config("7b"), "value"),
          "reward": ModelShape.of(llama_config("7b"), "score")}


def problem(n=16, **kw):
    return Problem(ppo(), MODELS, hardware("a100-80g"), Workload(batch=256), n, **kw)


def split_plan(n=16):
    """Actor on the first half, everything else on the second: inference calls overlap nothing of the
    actor, critic and reward / ref share ranks."""
    half, rest = range(n // 2), range(n // 2, n)
    pl = {"actor_gen": placement(f"d{n // 2}t1p1", half), "actor_train": placement(f"d{n // 2}t1p1", half),
          "reward": placement(f"d{n // 4}t1p1", range(n // 2, 3 * n // 4)),
          "ref_inf": placement(f"d{n // 4}t1p1", range(3 * n // 4, n)),
          "critic_inf": placement(f"d{n // 2}t1p1", rest), "critic_train": placement(f"d{n // 2}t1p1", rest)}
    return Plan("split", n, pl)


def test_disjoint_meshes_overlap_and_shared_ones_serialise():
    pr = problem()
    ev = evaluate(pr, split_plan())
    ev_by = {e.name: e for e in ev.timeline}
    # reward and ref run on disjoint ranks: at the same time
    assert ev_by["reward"].start == pytest.approx(ev_by["ref_inf"].start)
    # critic_inf shares ranks with both: after both
    assert ev_by["critic_inf"].start >= max(ev_by["reward"].end, ev_by["ref_inf"].end) - 1e-9
    # actor_train and critic_train on disjoint meshes overlap
    assert ev_by["critic_train"].start < ev_by["actor_train"].end
    assert ev.time < sum(c.time for c in ev.call_times.values()) + sum(r.time for r in ev.realloc.values())


def test_reallocation_is_scheduled_before_the_call():
    pr = problem()
    ev = evaluate(pr, colocate(pr.graph, 16))
    names = [e.name for e in ev.timeline]
    assert "actor_gen:reallocate" in names  # generation wants a replicated copy of the FSDP actor
    i = names.index("actor_gen:reallocate")
    assert names[i + 1] == "actor_gen" and ev.timeline[i].end <= ev.timeline[i + 1].start + 1e-12
    assert ev.realloc["actor_gen"].time > 0


def test_dependencies_and_role_order_hold_and_barrier_only_adds_time():
    pr = problem()
    plan = split_plan()
    ev = evaluate(pr, plan)
    g = pr.graph
    by = {e.name: e for e in ev.timeline}
    for name in g.order:
        for dep in g.deps[name]:
            assert by[name].start >= by[dep].end - 1e-9
    free, _ = simulate(pr, plan, ev.call_times, ev.realloc, iterations=4, barrier=False)
    assert free <= ev.time + 1e-9
