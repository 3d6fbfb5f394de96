"""Inter-stage fusion in the planner: response lengths shrink the decode batch, a streamed generate call is cut
into segments at its chunks' completions, consumers run as chunk tasks that wait for their segment, and the
search turns fusion on only where it shortens the iteration."""

import json

import pytest

from reflow.planner.config import measured_lengths, problem_for_config
from reflow.planner.cost import Workload, call_cost, placement
from reflow.planner.hardware import hardware
from reflow.planner.models import ModelShape, llama_config
from reflow.planner.search import search
from reflow.planner.simulator import Problem, evaluate
from reflow.planner.stream import submissions
from reflow.runtime.graph import Call, Graph
from reflow.runtime.graphs import ppo
from reflow.runtime.plan import Plan

M7 = ModelShape.of(llama_config("7b"))
MODELS = {"actor": M7, "ref": M7, "critic": ModelShape.of(llama_config("7b"), "value"),
          "reward": ModelShape.of(llama_config("7b"), "score")}
# quantiles at levels 0, 0.1, ..., 1 of a long-tailed length distribution: p50 8, p90 40, max 256 tokens
TAIL = (1, 2, 3, 4, 6, 8, 11, 15, 22, 40, 256)


def split_plan(n=16):
    """Generation and actor training on the first half, reward / ref / critic on the second."""
    half, rest = range(n // 2), range(n // 2, n)
    return Plan("split", n, {
        "actor_gen": placement(f"d{n // 2}t1p1", half), "actor_train": placement(f"d{n // 2}t1p1", half),
        "reward": placement(f"d{n // 4}t1p1", range(n // 2, 3 * n // 4)),
        "ref_inf": placement(f"d{n // 4}t1p1", range(3 * n // 4, n)),
        "critic_inf": placement(f"d{n // 2}t1p1", rest), "critic_train": placement(f"d{n // 2}t1p1", rest)})


def ppo_problem(lengths, n=16, **kw):
    wl = Workload(batch=256, prompt_len=128, gen_len=256, gen_lens=lengths)
    return Problem(ppo(), MODELS, hardware("a100-80g"), wl, n, **kw)


def test_a_length_distribution_shrinks_the_decode_batch_and_orders_the_samples_by_finish():
    pl = placement("d1t1p1", [0])
    budget = call_cost("generate", M7, pl, hardware("a100-80g"), Workload(batch=64, prompt_len=128, gen_len=256))
    equal = call_cost("generate", M7, pl, hardware("a100-80g"),
                      Workload(batch=64, prompt_len=128, gen_len=256, gen_lens=(256,)))
    tail = call_cost("generate", M7, pl, hardware("a100-80g"),
                     Workload(batch=64, prompt_len=128, gen_len=256, gen_lens=TAIL))
    assert equal.time == pytest.approx(budget.time)
    assert tail.time < 0.9 * budget.time  # the same 256 steps for the longest, fewer rows in most of them
    left = [t for t, _ in tail.samples]
    lengths = [n for _, n in tail.samples]
    assert lengths == Workload(gen_len=256, gen_lens=TAIL).gen_lengths(64) == sorted(lengths)
    assert lengths[31] == 8 and 200 < lengths[-1] < 256  # the quantiles at 31.5 / 64 and 63.5 / 64
    assert left == sorted(left, reverse=True) and left[-1] == pytest.approx(0, abs=1e-9) and left[0] < tail.time
    assert all(t == pytest.approx(0, abs=1e-9) for t, _ in equal.samples)  # all done at the last step
    assert Workload(gen_len=256, gen_lens=TAIL).mean_gen == pytest.approx((sum(TAIL) - (1 + 256) / 2) / 10)
    # waves of 16 (a KV cache that holds 16 sequences): the batch's 64 lengths dealt round-robin into 4 waves
    # run one after the other, so every wave keeps the tail and all 64 lengths are decoded
    wl = Workload(batch=64, prompt_len=128, gen_len=256, gen_lens=TAIL)
    waves = call_cost("generate", M7, pl, hardware("a100-80g"), wl, concurrency=16)
    assert sorted(n for _, n in waves.samples) == wl.gen_lengths(64) and waves.parts["waves"] == 4
    left = [t for t, _ in waves.samples]
    assert left == sorted(left, reverse=True)  # in the order they finish
    # fewer rows at once never decodes fewer tokens, so less KV memory is never predicted faster
    times = [call_cost("generate", M7, pl, hardware("a100-80g"), wl, concurrency=c).time for c in (64, 16, 4, 1)]
    assert times == sorted(times)


def test_a_long_tail_makes_the_fused_prediction_shorter_and_equal_lengths_give_no_gain():
    plan = split_plan()
    tail = {f: evaluate(ppo_problem(TAIL, inter_stage=f), plan).time for f in (False, True)}
    equal = {f: evaluate(ppo_problem((256,), inter_stage=f), plan).time for f in (False, True)}
    budget = evaluate(ppo_problem(None), plan).time
    assert tail[True] < 0.95 * tail[False]  # (0.91 with chunks of 8)
    assert equal[False] == pytest.approx(budget)  # one length at the budget is the budget assumption
    assert equal[True] >= equal[False] * (1 - 1e-9)  # every chunk is complete at the end: nothing overlaps


@pytest.mark.parametrize("cores", [None, 4.0])  # devices that compute independently / 4 cores per 8 devices
def test_consumer_chunks_start_after_their_segment_and_train_calls_wait_for_the_whole_batch(cores):
    pr = ppo_problem(TAIL, inter_stage=True, chunk=4)
    pr.hw = pr.hw.with_(cores_per_node=cores)
    ev = evaluate(pr, split_plan())
    stream = ev.call_times["actor_gen"].stream
    assert ev.stream_chunk == 4 and stream is not None
    segs = sorted((e for e in ev.timeline if e.name == "actor_gen"), key=lambda e: e.chunk)
    assert [e.chunk for e in segs] == list(range(len(stream.segments))) == list(range(256 // 8 // 4))
    assert sum(stream.segments) == pytest.approx(ev.call_times["actor_gen"].time)
    gen_end = segs[-1].end
    overlapped = False
    for consumer in ("reward", "ref_inf", "critic_inf"):
        tasks = sorted((e for e in ev.timeline if e.name == consumer), key=lambda e: e.chunk)
        waits = [k for n, k, _ in stream.chunks if n == consumer]
        assert len(tasks) == len(waits) > 1
        for e, k in zip(tasks, waits):
            assert e.start >= segs[k].end - 1e-9
        overlapped |= tasks[0].start < gen_end
    assert overlapped  # consumers on other ranks run while the long tail still generates
    ends = max(e.end for e in ev.timeline if e.name in ("reward", "ref_inf", "critic_inf"))
    for train in ("actor_train", "critic_train"):
        assert next(e for e in ev.timeline if e.name == train).start >= max(ends, gen_end) - 1e-9


def test_submissions_follow_the_executors_rule_for_consumers_with_several_replicas():
    # 2 replicas x 10 samples in chunks of 4 (4, 4, 2 each); consumer a has 1 replica, b 8
    subs = submissions(10, 2, 4, {"a": 1, "b": 8})
    a = [(k, sizes) for n, k, sizes in subs if n == "a"]
    b = [(k, sizes) for n, k, sizes in subs if n == "b"]
    assert a == [(0, [4]), (0, [4]), (1, [4]), (1, [4]), (2, [2]), (2, [2])]
    # b: 8 after chunk 0 (12 to come); then 8 held with only 4 to come, so it waits for the end
    assert b == [(0, [4, 4]), (2, [4, 4, 2, 2])]


def test_search_turns_inter_stage_fusion_on_for_a_long_tail_and_off_with_nothing_to_overlap():
    on = search(ppo_problem(TAIL), seed=0, steps=300)
    assert on.fusion[0] and on.evaluation.stream_chunk == on.fusion[1]
    assert on.fusion_times[on.fusion] < 0.9 * on.fusion_times[(False, 8)]
    assert "fusion.inter_stage=true" in on.report()
    equal = search(ppo_problem((256,)), seed=0, steps=300)  # every sample ends at the last step
    assert equal.fusion == (False, 8) and equal.evaluation.stream_chunk is None
    assert all(t >= equal.fusion_times[(False, 8)] * (1 - 1e-9) for t in equal.fusion_times.values())
    gen_train = Graph("gen-train", [Call("actor_gen", "actor", "generate", "generate", ("prompts",), ("responses",)),
                                    Call("actor_train", "actor", "train", "train_actor", ("responses",), ("stats",))],
                      results=("stats",))
    alone = search(Problem(gen_train, {"actor": M7}, hardware("a100-80g"),
                           Workload(batch=256, prompt_len=128, gen_len=256, gen_lens=TAIL), 8), seed=0, steps=100)
    assert alone.fusion == (False, 8) and len(alone.fusion_times) == 1  # no consumer to stream to


def test_workload_from_a_config_takes_the_lengths_measured_in_its_runs_metrics(ppo_cfg):
    out = ppo_cfg.output_dir
    import pathlib

    pathlib.Path(out).mkdir(parents=True)
    keys = ["min", "p10", "p20", "p30", "p40", "p50", "p60", "p70", "p80", "p90", "max"]
    rows = [{"step": 1, "reward/mean": 0.0}]  # a row without them (an eval row, an older run) is skipped
    rows += [{"step": s, **{f"response_len/{k}": float(i + s) for i, k in enumerate(keys)}} for s in (1, 2, 3)]
    (pathlib.Path(out) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert measured_lengths(pathlib.Path(out) / "metrics.jsonl") == tuple(float(i + 2) for i in range(11))
    ppo_cfg.fusion.inter_stage, ppo_cfg.fusion.chunk = True, 2
    pr = problem_for_config(ppo_cfg, hw="cpu")
    assert pr.workload.gen_lens == tuple(min(float(i + 2), 4.0) for i in range(11))  # capped at the budget (4)
    assert pr.inter_stage and pr.chunk == 2
    given = problem_for_config(ppo_cfg, hw="cpu", lengths=(1, 2, 3))
    assert given.workload.gen_lens == (1.0, 2.0, 3.0)
    ppo_cfg.output_dir = str(pathlib.Path(out) / "elsewhere")
    assert problem_for_config(ppo_cfg, hw="cpu").workload.gen_lens is None  # no run yet: the budget


def test_a_consumers_first_chunk_pays_the_calls_fixed_cost_and_each_later_chunk_only_the_dispatch():
    hw = hardware("a100-80g")
    problem = lambda c, d: Problem(ppo(), MODELS, hw.with_(call_overhead=c, dispatch=d),  # noqa: E731
                                   Workload(batch=256, prompt_len=128, gen_len=256, gen_lens=TAIL), 16,
                                   inter_stage=True, chunk=8)
    full = evaluate(problem(0.05, 0.05), split_plan())
    cheap = evaluate(problem(0.05, 0.001), split_plan())
    for name in ("reward", "ref_inf", "critic_inf"):
        chunks = int(full.call_times[name].parts["chunks"])
        assert chunks > 1
        assert full.call_times[name].time - cheap.call_times[name].time == pytest.approx((chunks - 1) * 0.049)
    unset = evaluate(problem(0.05, 0.0), split_plan())  # no dispatch measured: every chunk pays call_overhead
    assert unset.call_times["ref_inf"].time == pytest.approx(full.call_times["ref_inf"].time)


def test_a_chunk_tasks_data_hop_follows_the_plan_it_is_costed_in_not_the_first_plan_cached():
    hw = hardware("a100-80g").with_(data_hop=0.05)

    def plan(gen_rank):
        return Plan("p", 4, {"actor_gen": placement("d1t1p1", [gen_rank]), "actor_train": placement("d1t1p1", [1]),
                             "reward": placement("d1t1p1", [2]), "ref_inf": placement("d1t1p1", [0]),
                             "critic_inf": placement("d1t1p1", [3]), "critic_train": placement("d1t1p1", [3])})

    shared = Problem(ppo(), MODELS, hw, Workload(batch=64, prompt_len=128, gen_len=256, gen_lens=TAIL), 4,
                     inter_stage=True)
    evaluate(shared, plan(0))  # ref_inf on the generating rank: its chunks fetch nothing
    after = evaluate(shared, plan(1)).call_times["ref_inf"].time
    fresh = evaluate(Problem(ppo(), MODELS, hw, Workload(batch=64, prompt_len=128, gen_len=256, gen_lens=TAIL), 4,
                             inter_stage=True), plan(1)).call_times["ref_inf"].time
    assert after == pytest.approx(fresh)
