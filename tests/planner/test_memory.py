"""Memory model: rejects what cannot fit, with a reason; grows and shrinks the right way."""

from reflow.planner.cost import Workload, placement
from reflow.planner.hardware import hardware
from reflow.planner.memory import plan_memory
from reflow.planner.models import ModelShape, llama_config
from reflow.runtime.graph import Call, Graph
from reflow.runtime.plan import Plan

HW = hardware("a100-80g")


def sft_graph():
    return Graph("sft", [Call("actor_train", "actor", "train", "train_sft", ("prompts",))])


def train_plan(layout, n):
    return Plan("p", n, {"actor_train": placement(layout, range(n))})


def test_70b_train_on_one_a100_is_rejected_with_a_reason():
    m = ModelShape.of(llama_config("70b"))
    rep = plan_memory(sft_graph(), train_plan("d1t1p1", 1), {"actor": m}, HW, Workload(batch=8))
    assert not rep.feasible
    assert "actor_train" in rep.reason and "rank 0" in rep.reason and "GB" in rep.reason
    assert rep.peak[0] > 16 * m.params * 0.99  # weights + gradients + Adam at least
    assert rep.overflow > 0


def test_train_memory_shrinks_with_data_parallel_and_grows_with_batch():
    m = ModelShape.of(llama_config("7b"))
    peak = lambda lay, n, b: plan_memory(sft_graph(), train_plan(lay, n), {"actor": m}, HW, Workload(batch=b)).peak[0]  # noqa: E731
    assert peak("d8t1p1", 8, 64) < peak("d4t1p1", 4, 64) < peak("d2t1p1", 2, 64)
    assert peak("d8t1p1", 8, 512) > peak("d8t1p1", 8, 64)
    rep = plan_memory(sft_graph(), train_plan("d8t1p1", 8), {"actor": m}, HW, Workload(batch=64))
    assert rep.feasible and rep.max_peak() < HW.usable_memory


def test_generation_waves_follow_free_memory():
    m = ModelShape.of(llama_config("7b"))
    g = Graph("gen", [Call("actor_gen", "actor", "generate", "generate", ("prompts",), ("responses",)),
                      Call("actor_train", "actor", "train", "train_policy", ("responses",))])
    wl = Workload(batch=4096, prompt_len=1024, gen_len=1024)
    small = plan_memory(g, Plan("a", 8, {"actor_gen": placement("d1t8p1", range(8)),
                                         "actor_train": placement("d8t1p1", range(8))}), {"actor": m}, HW, wl)
    alone = plan_memory(g, Plan("b", 16, {"actor_gen": placement("d1t8p1", range(8)),
                                          "actor_train": placement("d8t1p1", range(8, 16))}), {"actor": m}, HW, wl)
    assert 1 <= small.concurrency["actor_gen"] < alone.concurrency["actor_gen"] <= 4096
    assert all(p <= HW.usable_memory for p in alone.peak.values())


def test_the_planner_counts_loras_trainable_parameters_as_peft_does_and_charges_less_memory_and_reallocation(
        tmp_path, debug_model):
    import dataclasses

    import pytest

    pytest.importorskip("peft")

    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig
    from reflow.models.load import load_policy
    from reflow.models.lora import add_adapters
    from reflow.planner.config import problem_for_config
    from reflow.planner.simulator import evaluate
    from reflow.runtime.plan import colocate

    def problem(rank):
        cfg = from_dict(RLConfig, {"actor": {"path": str(debug_model), "lora": {"rank": rank}},
                                   "data": {"eval": None}, "runtime": {"workers": 2}})
        return cfg, problem_for_config(cfg, 2, "a100-80g")

    cfg, lora = problem(8)
    _, full = problem(0)
    model = load_policy(debug_model)
    add_adapters(model, cfg.actor.lora)
    assert lora.models["actor"].trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert full.models["actor"].trainable_params == full.models["actor"].params
    plan = colocate(lora.graph, 2)
    a, b = evaluate(lora, plan), evaluate(full, colocate(full.graph, 2))
    f = lora.models["actor"].trainable_fraction
    assert a.memory.max_peak() < b.memory.max_peak()
    assert b.realloc["actor_gen"].time > 0
    assert a.realloc["actor_gen"].time == pytest.approx(b.realloc["actor_gen"].time * f)
    assert dataclasses.replace(lora.models["actor"], lora_rank=0).trainable_fraction == 1.0


def test_1f1b_holds_p_minus_s_micro_batches_of_activations_where_gpipe_holds_all_m_at_the_same_time_cost():
    import dataclasses

    from reflow.planner.cost import call_cost
    from reflow.planner.memory import train_transient

    m = ModelShape.of(llama_config("7b"))
    wl = Workload(batch=64, micro_tokens=4096, checkpointing=False)  # 64 x 512 tokens: m = 8 micro-batches
    one_f_one_b = placement("d1t1p4", range(4))
    gpipe = dataclasses.replace(one_f_one_b, schedule="gpipe")
    assert one_f_one_b.schedule == "1f1b"  # the default
    for stage in range(4):
        a = train_transient(m, one_f_one_b, stage, wl)["activations"]
        g = train_transient(m, gpipe, stage, wl)["activations"]
        assert abs(g / a - 8 / (4 - stage)) < 1e-9, stage
    c1, cg = call_cost("train", m, one_f_one_b, HW, wl), call_cost("train", m, gpipe, HW, wl)
    assert c1.time == cg.time and c1.parts["pp_bubble_fraction"] == cg.parts["pp_bubble_fraction"] == 3 / 11
