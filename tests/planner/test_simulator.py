"""Simulator: overlap on disjoint meshes, serialisation on shared ones, reallocations in the timeline; calls on
disjoint meshes that share too few CPU cores add up."""

import pytest

from reflow.planner.cost import Workload, placement
from reflow.planner.hardware import hardware
from reflow.planner.models import ModelShape, llama_config
from reflow.planner.simulator import Problem, evaluate, simulate
from reflow.runtime.graph import Call, Graph
from reflow.runtime.graphs import ppo
from reflow.runtime.plan import Plan, colocate
from transformers import LlamaConfig

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


def test_inputs_from_other_workers_cost_a_hop_and_their_bytes():
    """A call pays hw.data_hop + bytes / bw when an input is held on another rank than one of its ranks
    (generate replicas each hold their part, other calls their first rank); nothing when all is local."""
    from reflow.planner.simulator import SAMPLE_BYTES_PER_TOKEN, data_cost, output_holders

    g = ppo()
    hw = hardware("a100-80g").with_(data_hop=0.05)
    wl = Workload(batch=256, prompt_len=100, gen_len=28)
    pr = Problem(g, MODELS, hw, wl, 4)
    one = Plan("one", 4, {c: placement("d1t1p1", [0]) for c in g.order})
    assert all(data_cost(pr, one, c) == 0 for c in g.order)
    assert evaluate(pr, one).time == pytest.approx(evaluate(Problem(g, MODELS, hw.with_(data_hop=0.0), wl, 4), one).time)
    moved = Plan("moved", 4, {**one.calls, "ref_inf": placement("d1t1p1", [1])})
    per_input = wl.batch * wl.seq_len * SAMPLE_BYTES_PER_TOKEN / hw.intra_bw
    assert data_cost(pr, moved, "ref_inf") == pytest.approx(0.05 + per_input)  # actor_gen's output is on rank 0
    n_in = len(g.deps["actor_train"])
    assert data_cost(pr, moved, "actor_train") == pytest.approx(0.05 + n_in * per_input)  # ref_inf's is on 1
    assert data_cost(pr, moved, "critic_inf") == 0
    assert evaluate(pr, moved).call_times["ref_inf"].parts["data"] == pytest.approx(0.05 + per_input)
    assert output_holders("generate", placement("d2t2p1", [4, 5, 6, 7])) == {4, 6}
    assert output_holders("infer", placement("d2t2p1", [4, 5, 6, 7])) == {4}
    # a call on two ranks fetches to both: even an input held on one of them moves to the other
    both = Plan("both", 4, {**one.calls, "ref_inf": placement("d2t1p1", [0, 1])})
    assert data_cost(pr, both, "ref_inf") > 0


def _two_calls() -> Graph:
    return Graph("g", [Call("a", "ra", "infer", "logprobs", ("prompts",), ("x",)), Call("b", "rb", "infer", "logprobs", ("prompts",), ("y",))],
                 results=("x", "y"))


def test_shared_cores_simulation():
    m = ModelShape.of(LlamaConfig(vocab_size=261, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                      "lm", dtype_bytes=4)
    g = _two_calls()
    plan = Plan("p", 2, {"a": placement("d1t1p1", [0]), "b": placement("d1t1p1", [1])})
    base = hardware("cpu")
    wl = Workload(batch=8, prompt_len=16, gen_len=16)

    def time(hw):
        return evaluate(Problem(g, {"ra": m, "rb": m}, hw, wl, 2), plan)

    plain, roomy, one = time(base), time(base.with_(cores_per_node=8.0)), time(base.with_(cores_per_node=1.0))
    assert roomy.time == pytest.approx(plain.time)  # enough cores: the same schedule
    ta, tb = plain.call_times["a"].time, plain.call_times["b"].time
    assert plain.time == pytest.approx(max(ta, tb))  # disjoint meshes overlap
    assert one.time == pytest.approx(ta + tb)  # ... but share one core: the work adds up
    ev = {e.name: e for e in one.timeline}
    assert ev["a"].start == ev["b"].start == 0.0 or one.timeline[0].start <= one.timeline[1].start


def test_asynchronous_training_overlaps_generation_with_training_on_other_ranks():
    from reflow.runtime.graphs import grpo

    g = grpo(ref=False, old_logprobs=True)
    models = {"actor": M7, "reward": None}
    gen_train = Plan("apart", 16, {"actor_gen": placement("d8t1p1", range(8, 16)), "reward": placement("d8t1p1", range(8, 16)),
                                   "actor_inf": placement("d8t1p1", range(8)), "actor_train": placement("d8t1p1", range(8))})
    sync = evaluate(Problem(g, models, hardware("a100-80g"), Workload(batch=256), 16, iterations=6), gen_train)
    k1 = evaluate(Problem(g, models, hardware("a100-80g"), Workload(batch=256), 16, iterations=6, staleness=1),
                  gen_train)
    gen, train = sync.call_times["actor_gen"].time, sync.call_times["actor_train"].time + sync.call_times["actor_inf"].time
    assert sync.time >= gen + train  # one after the other (and the weights' move)
    assert k1.time < 0.8 * sync.time
    assert k1.time >= max(gen, train) - 1e-9  # never faster than the slower side
    together = Plan("together", 16, {c: placement("d16t1p1", range(16)) for c in g.order})
    times = [evaluate(Problem(g, models, hardware("a100-80g"), Workload(batch=256), 16, staleness=k), together).time
             for k in (0, 1, 2)]  # (3 iterations asked: the steady state needs k + 3)
    assert times == pytest.approx([times[0]] * 3)  # one mesh runs one call at a time: nothing to overlap


def test_fused_train_calls_cost_the_searched_schedule_between_the_bound_and_one_after_the_other():
    from reflow.planner.search import to_plan, make_groups

    pr = Problem(ppo(), MODELS, hardware("a100-80g"), Workload(batch=64, micro_tokens=4096), 8)
    pipe = placement("d1t1p4", range(4))
    calls = {c: pipe if ppo().call(c).kind == "train" else placement("d4t1p1", range(4, 8)) for c in ppo().order}
    apart = evaluate(pr, Plan("apart", 8, dict(calls)))
    # the search's plans fuse the two train calls (same ranks, p >= 2): the critic's stages reversed
    groups = make_groups(pr)
    fused_plan = to_plan(pr, groups, {g.name: calls[g.calls[0]] for g in groups}, "fused")
    assert fused_plan.fuse == ("actor_train", "critic_train")
    assert fused_plan.calls["critic_train"].ranks == (3, 2, 1, 0)
    assert fused_plan.calls["actor_train"].ranks == (0, 1, 2, 3)
    fused_plan.validate(pr.graph, pr.model_configs())
    fused = evaluate(pr, fused_plan)
    a, b = (apart.call_times[c] for c in ("actor_train", "critic_train"))
    fa, fb = (fused.call_times[c] for c in ("actor_train", "critic_train"))
    m, steps = a.parts["micro_batches"], a.parts["steps"]
    u = [c.parts["pp_bubble"] / (steps * 3) for c in (a, b)]  # slowest stage per micro-batch, p = 4
    bound = steps * max((m + 3) * max(u), m * sum(u))
    saved = a.time + b.time - (fa.time + fb.time)
    assert 0 < saved <= steps * (m + 3) * sum(u) - bound + 1e-9
    assert fa.parts["fused_ratio"] < 1 and fa.parts["pp_bubble_fraction"] < a.parts["pp_bubble_fraction"]
    assert fused.time < apart.time
    # Problem.fuse=False keeps the calls apart
    pr.fuse = False
    assert to_plan(pr, groups, {g.name: calls[g.calls[0]] for g in groups}, "apart").fuse == ()
