"""Runtime timing: the workload's calls are timed from the workers' timelines; a Ray call chain is timed
across workers and on one."""

from reflow.planner.runtime_timing import measure_call_overhead, measure_runtime_calls


def test_runtime_calls_are_timed_from_the_workers_timelines_with_the_lengths_generated(ppo_cfg):
    """measure_runtime_calls runs the real runtime (2 Ray workers, the one-rank plan), reads every model
    call's time on rank 0 from the timeline and the response lengths from the steps' metrics."""
    run, = measure_runtime_calls(ppo_cfg, 2, [2], steps=3, warmup=1)
    assert run["prompts"] == 2 and run["plan"] == "one-rank" and len(run["step_samples"]) == 2
    assert set(run["calls"]) == {"actor_gen", "reward", "ref_inf", "critic_inf", "actor_train", "critic_train"}
    assert all(t > 0 for t in run["calls"].values())
    assert sum(run["calls"].values()) <= run["step"] * 1.05  # the calls run one after another within a step
    # the response lengths those steps generated (what the fit predicts them from): 11 quantiles in [1, budget]
    assert len(run["lengths"]) == 11 and 1 <= run["lengths"][0] <= run["lengths"][-1] <= ppo_cfg.rollout.max_new_tokens


def test_ray_call_chain_across_workers_and_on_one():
    cross, local = measure_call_overhead(2, hops=4)
    assert cross > 0 and local > 0
