"""Micro-benchmarks: effective cores from alone and together times; Ray actors share the cores like the
runtime's workers."""

import pytest

from reflow.planner.microbench import cores_from_times, measure_ray_sharing


def test_cores_from_alone_and_together_times():
    cores, per_k = cores_from_times({1: 1.0, 2: 1.2, 4: 2.4})  # 2 and 4 workers both progress as 1.67 cores
    assert cores == pytest.approx(5 / 3) and per_k == pytest.approx({2: 5 / 3, 4: 5 / 3})
    assert cores_from_times({1: 1.0, 2: 0.9})[0] == 2.0  # never more cores than workers
    assert cores_from_times({1: 1.0, 4: 9.0})[0] == 1.0  # nor fewer than one


def test_ray_sharing_runs_workers_like_the_runtime():
    cores, rows = measure_ray_sharing(2, "debug-llama", reps=2, rounds=1)
    assert 1.0 <= cores <= 2.0 and len(rows) == 2 and all(t > 0 for _, t, _ in rows)
