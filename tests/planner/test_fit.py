"""Fitting: least squares recovers known Hardware figures, per-kind scales and the per-call cost from
synthetic measurements; calibration runs of one plan and size pool into one."""

import dataclasses
import math
import random

import pytest

from reflow.planner.cost import _owner_gather, placement
from reflow.planner.fit import fit_call_overhead, fit_call_scales, fit_hardware, fit_linear, pool_runs
from reflow.planner.hardware import Hardware, hardware
from reflow.planner.models import ModelShape
from reflow.planner.runtime_timing import one_rank_plan
from reflow.planner.simulator import evaluate
from transformers import LlamaConfig


def test_fit_linear_recovers_coefficients_and_keeps_them_non_negative():
    rng = random.Random(0)
    truth = [2e-11, 3e-4, 1.5e-3]  # 1/FLOPs, per-layer, per-step: very different magnitudes
    rows = []
    for _ in range(16):
        a = [rng.uniform(1e7, 1e9), rng.choice([4, 12]), rng.choice([0.0, 1.0])]
        rows.append((a, sum(x * y for x, y in zip(a, truth)) * (1 + rng.uniform(-0.01, 0.01))))
    got = fit_linear(rows)
    for g, t in zip(got, truth):
        assert g == pytest.approx(t, rel=0.05)
    # a column that can only hurt comes back 0, not negative
    rows = [([1.0, x], 2.0 - 0.0 * x) for x in (1.0, 2.0, 3.0)] + [([1.0, 4.0], 1.9)]
    assert all(v >= 0 for v in fit_linear(rows))


def _shape():
    cfg = LlamaConfig(vocab_size=261, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return ModelShape.of(cfg, "lm", dtype_bytes=4)


def test_fit_hardware_recovers_known_figures_from_synthetic_measurements():
    m = _shape()
    L = m.layers
    F, o_layer, o_step, bw, lat = 40e9, 300e-6, 1.2e-3, 2e9, 150e-6
    n, cores = 4, 2.0

    def flops(tokens, ctx):
        return L * m.layer_flops(tokens, ctx) + m.head_flops(tokens)

    shared = lambda t, busy: t / min(1.0, cores / busy)  # noqa: E731  (what a rank sees with busy ranks at once)
    lg = math.ceil(math.log2(n))
    sizes = [4096, 262144, 4 << 20, 16 << 20]
    meas = {
        "world": n, "device": "cpu", "preset": "synthetic", "dtype_bytes": 4,
        "forward": [((b, 32), flops(b * 32, 16) / F + L * o_layer) for b in (4, 16, 64)],
        "forward_backward": [((b, 32), 3 * (flops(b * 32, 16) / F + L * o_layer)) for b in (4, 16, 64)],
        "decode_step": [((b, p, 24), flops(b, p + 12) / F + L * o_layer + o_step) for b, p in ((4, 16), (16, 16), (32, 48))],
        "all_reduce": [(B, shared(2 * (n - 1) / n * B / bw + 2 * lg * lat, n)) for B in sizes],
        "broadcast": [(B, shared(B / bw + lg * lat, n)) for B in sizes],
        "send_recv": [(B, shared(B / bw + lat, 2)) for B in sizes],
        "copy": 0.01, "copy_bytes": 2e8, "optimizer": 5e-3 + 28 * m.params / 2e10,
        "alone": 0.02, "together": 0.02 * n / cores, "memory": 8e9, "reserved": 0.25e9,
    }
    # FSDP over all n ranks (measured with all busy): a forward on the owner copy adds a gather and
    # (L + 1) x the per-unit overhead; a forward + backward three of each
    fsdp_oh = 2e-3
    ag = _owner_gather(m, placement(f"d{n}t1p1", range(n)), Hardware("x", 1, 1, 1, bw, lat, bw, lat, n))
    meas.update(realloc=0.05, replica_forward=0.01, replica_forward_backward=0.03,
                fsdp_forward=0.01 + shared(ag + (L + 1) * fsdp_oh, n),
                fsdp_forward_backward=0.03 + shared(3 * ag + 3 * (L + 1) * fsdp_oh, n))
    meas.update(call=4e-3, call_local=3e-3, data_hop=1e-3)
    hw = fit_hardware(meas, m).hardware
    assert hw.fsdp_overhead == pytest.approx(fsdp_oh, rel=0.05)
    assert hw.data_hop == 1e-3 and hw.call_overhead == 4e-3  # (call: replaced by the runtime step's fit)
    assert hw.flops == pytest.approx(F, rel=0.02)
    assert hw.layer_overhead == pytest.approx(o_layer, rel=0.05)
    assert hw.step_overhead == pytest.approx(o_step, rel=0.05)
    assert hw.intra_bw == pytest.approx(bw, rel=0.02) and hw.intra_lat == pytest.approx(lat, rel=0.05)
    assert hw.mem_bw == pytest.approx(2e10) and hw.optimizer_overhead == pytest.approx(5e-3, rel=1e-6)
    assert hw.cores_per_node == pytest.approx(cores)


def test_call_overhead_fitted_through_the_simulator_recovers_a_known_value():
    from reflow.planner.whatif import ppo_problem
    from reflow.runtime.plan import separate

    pr = ppo_problem("7b", 16, hw=hardware("a100-80g").with_(call_overhead=0.25))
    plan = separate(pr.graph, 16)
    measured = evaluate(pr, plan).time  # a "measurement" made with a 0.25 s per-call overhead
    bare = dataclasses.replace(pr, hw=pr.hw.with_(call_overhead=0.0), _cache={})
    assert fit_call_overhead(measured, bare, plan) == pytest.approx(0.25, rel=1e-3)
    assert fit_call_overhead(evaluate(bare, plan).time * 0.5, bare, plan) == 0.0  # faster than the model: 0


def _calibration_runs(cfg, hw, truth, c, sizes=(4, 1)):
    """Synthetic measurements of the one-rank plan: each model call = truth[kind] x modelled work + c."""
    import copy

    from reflow.planner.config import problem_for_config

    runs = []
    for n in sizes:
        cn = copy.deepcopy(cfg)
        cn.rollout.prompts_per_step = n
        pr = problem_for_config(cn, 2, hw)
        ev = evaluate(pr, one_rank_plan(pr.graph, 2))
        calls = {name: truth[pr.graph.call(name).kind] * ev.call_times[name].time + c
                 for name in pr.graph.order if pr.models.get(pr.graph.call(name).role) is not None}
        runs.append({"prompts": n, "cfg": cn, "calls": calls, "step": sum(calls.values())})
    return runs


def test_call_scales_recovered_from_the_workloads_calls(ppo_cfg):
    hw = hardware("cpu")
    truth = {"generate": 1.7, "infer": 0.8, "train": 1.3}
    scales, c, table = fit_call_scales(_calibration_runs(ppo_cfg, hw, truth, 4e-3), 2,
                                       hw.with_(generate_scale=9.0, call_overhead=1.0))  # ignored: refitted from 1, 0
    assert scales == pytest.approx(truth, rel=0.02) and c == pytest.approx(4e-3, rel=0.05)
    assert len(table) == 2 * 5 and all(abs(f - t) <= 0.02 * t for _, t, f in table)  # 5 model calls x 2 sizes
    # the same call measured twice as slow at one size only: the fit is pulled, not exact
    runs = _calibration_runs(ppo_cfg, hw, truth, 4e-3)
    runs[0]["calls"]["actor_gen"] *= 2
    assert fit_call_scales(runs, 2, hw)[0]["generate"] > truth["generate"] * 1.2


def test_pool_runs_merges_runs_of_one_plan_and_size():
    def run(prompts, steps, gen):
        return {"plan": "one-rank", "prompts": prompts, "cfg": None, "step_samples": steps,
                "call_samples": {"actor_gen": gen}}
    pooled = pool_runs([run(16, [1.0, 3.0], [0.1, 0.3]), run(4, [0.5], [0.05]), run(16, [2.0, 2.5], [0.2])])
    assert [r["prompts"] for r in pooled] == [16, 4]  # first-seen order: the full size stays first
    full = pooled[0]
    assert full["runs"] == 2 and full["step"] == 2.25 and full["calls"] == {"actor_gen": 0.2}
    assert pooled[1]["runs"] == 1 and pooled[1]["step"] == 0.5
