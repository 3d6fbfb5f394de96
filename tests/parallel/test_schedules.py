"""Pipeline schedules: 1F1B and GPipe orders, and fused actor + critic schedules found by search and checked."""

import pytest

from reflow.parallel.fused import (FusedSpec, Op, ScheduleError, Slot, bubble_fractions, check_schedule, search_fused,
                                   sequential_1f1b, timeline)
from reflow.parallel.schedules import bubble_fraction, peak_in_flight, stage_order


def one_model(p: int, m: int) -> FusedSpec:
    return FusedSpec(p, m, {"actor": tuple(range(p))}, {"actor": 1}, {"actor": 2}, {"actor": 1.0})


def orders_of(schedule: str, spec: FusedSpec) -> list[list[Op]]:
    return [[Op("actor", j, kind, s) for kind, j in stage_order(schedule, s, spec.p, spec.m)] for s in range(spec.p)]


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 2)])
def test_1f1b_and_gpipe_take_m_plus_p_minus_1_steps_and_1f1b_holds_p_minus_s_micro_batches(p, m):
    spec = one_model(p, m)
    for schedule in ("1f1b", "gpipe"):
        sched, span = timeline(orders_of(schedule, spec), spec)
        assert span == (m + p - 1) * 3
        assert max(bubble_fractions(sched, spec)) == pytest.approx(bubble_fraction(p, m))
    for s in range(p):
        assert peak_in_flight(stage_order("1f1b", s, p, m)) == min(p - s, m)
        assert peak_in_flight(stage_order("gpipe", s, p, m)) == m
    # 1F1B runs under a memory of p micro-batches per rank, GPipe does not (when m > p)
    check_schedule(timeline(orders_of("1f1b", spec), spec)[0], spec, memory_limit=min(p, m))
    if m > p:
        with pytest.raises(ScheduleError, match=f"would hold {p + 1} of activations, over the limit {p}"):
            check_schedule(timeline(orders_of("gpipe", spec), spec)[0], spec, memory_limit=p)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4)])
def test_fused_actor_critic_schedule_passes_the_check_takes_under_0_85x_of_1f1b_one_after_the_other_and_1_25x_the_bound(
        p, m):
    spec = FusedSpec.actor_critic(p, m)
    sched, span = search_fused(spec, memory_limit=p, iters=500)
    check_schedule(sched, spec, memory_limit=p)
    assert {s.rank for s in sched if s.op == Op("critic", 0, "F", 0)} == {p - 1}  # critic stages reversed
    _, sequential = sequential_1f1b(spec)
    assert span <= 0.85 * sequential
    assert spec.lower_bound() <= span <= 1.25 * spec.lower_bound()


def test_a_schedule_that_deadlocks_is_rejected_naming_the_slot():
    spec = FusedSpec.actor_critic(2, 1)
    # each rank first waits for the other's forward: rank 0 for the critic's, rank 1 for the actor's
    rank0 = [Op("critic", 0, "F", 1), Op("actor", 0, "F", 0), Op("critic", 0, "B", 1), Op("actor", 0, "B", 0)]
    rank1 = [Op("actor", 0, "F", 1), Op("critic", 0, "F", 0), Op("actor", 0, "B", 1), Op("critic", 0, "B", 0)]
    sched = [Slot(3 * i, r, op) for r, order in enumerate((rank0, rank1)) for i, op in enumerate(order)]
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 at slot 0 waits to run critic F0 \(stage 1\); "
                                            r"rank 1 at slot 0 waits to run actor F0 \(stage 1\)"):
        check_schedule(sched, spec)


def test_a_schedule_that_receives_micro_batches_out_of_order_or_misplaces_a_stage_is_rejected():
    spec = one_model(2, 2)
    orders = orders_of("1f1b", spec)
    orders[1][0], orders[1][2] = orders[1][2], orders[1][0]  # stage 1 forwards micro-batch 1 first
    sched = [Slot(10 * i, r, op) for r, order in enumerate(orders) for i, op in enumerate(order)]
    with pytest.raises(ScheduleError, match="slot 0: rank 1 runs actor F1 .* next actor activation from rank 0 is "
                                            "micro-batch 0's"):
        check_schedule(sched, spec)
    good, _ = timeline(orders_of("1f1b", spec), spec)
    moved = [Slot(s.slot, 1 - s.rank, s.op) if s.op == Op("actor", 0, "F", 0) else s for s in good]
    with pytest.raises(ScheduleError, match="slot 0: actor F0 \\(stage 0\\) is on rank 1, but that stage lives on "
                                            "rank 0"):
        check_schedule(moved, spec)


def test_search_in_memory_doubles_the_limit_where_the_greedy_start_deadlocks_and_the_result_passes_the_check():
    from reflow.parallel.fused import greedy, search_fused_in_memory

    # a critic three times the actor's cost: backwards-first greedy fills both ranks with forwards at limit p
    spec = FusedSpec(2, 5, {"a": (0, 1), "b": (1, 0)}, {"a": 1, "b": 3}, {"a": 2, "b": 6}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ScheduleError, match="no schedule under the memory limit 2"):
        greedy(spec, 2)
    sched, span, limit = search_fused_in_memory(spec, iters=100)
    assert limit == 4
    check_schedule(sched, spec, limit)
    assert spec.lower_bound() <= span <= sequential_1f1b(spec)[1]
