"""Asynchronous training (rollout.max_staleness): a schedule of the same calls in which generation runs ahead
of training by at most k updates; the same numbers in this process and on Ray workers, exact resumes, and no
sample older than k is ever trained on."""

import pytest
import torch

from reflow.data.batch import SampleBatch
from reflow.experiments.rl import RLExperiment
from reflow.runtime.calls.policy import staleness

from rl_runs import assert_same_steps, rl_config, run


def test_samples_are_at_most_k_updates_old_and_the_same_in_process_and_on_two_workers(
        ray_session, tmp_path, debug_model, addition_data):
    def cfg(out, w):
        c = rl_config(out, debug_model, addition_data, w, rollout_correction="tis")
        c.rollout.max_staleness, c.trainer.steps = 1, 3
        return c

    local = run(RLExperiment, cfg(tmp_path / "local", 0))
    ray = run(RLExperiment, cfg(tmp_path / "ray", 2))
    assert_same_steps(local, ray)
    assert [m["staleness/max"] for m in local] == [0.0, 1.0, 1.0]  # the first window starts fresh
    sync = rl_config(tmp_path / "sync", debug_model, addition_data, 0, rollout_correction="tis")
    sync.trainer.steps = 3
    # step 2's samples really came from older weights: the generator's log-probs differ from the trainer's
    mismatch = "rollout_correction/mismatch_kl"
    assert abs(local[1][mismatch]) > 1e-4 > 10 * abs(run(RLExperiment, sync)[1][mismatch])


def test_a_pipeline_that_restarts_every_step_is_the_synchronous_run(tmp_path, debug_model, addition_data):
    sync = rl_config(tmp_path / "sync", debug_model, addition_data, 0, rollout_correction="tis")
    k1 = rl_config(tmp_path / "k1", debug_model, addition_data, 0, rollout_correction="tis")
    k1.rollout.max_staleness, k1.trainer.save_every = 1, 1  # a window of one step: nothing runs ahead
    assert_same_steps(run(RLExperiment, sync), run(RLExperiment, k1))


def test_an_asynchronous_run_resumes_exactly_from_a_checkpoint(tmp_path, debug_model, addition_data):
    cfg = rl_config(tmp_path / "whole", debug_model, addition_data, 0)
    cfg.rollout.max_staleness, cfg.trainer.steps, cfg.trainer.save_every = 2, 4, 2
    whole = run(RLExperiment, cfg)
    assert max(m["staleness/max"] for m in whole) == 1.0  # windows of 2 steps: at most 1 update old
    again = rl_config(tmp_path / "resumed", debug_model, addition_data, 0)
    again.rollout.max_staleness, again.trainer.steps, again.trainer.save_every = 2, 4, 2
    resumed = run(RLExperiment, again, resume=str(tmp_path / "whole" / "checkpoints" / "step_000002"))
    assert_same_steps(whole[2:], resumed)


def test_a_sample_older_than_max_staleness_is_refused(debug_model, addition_data, tmp_path):
    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.rollout.max_staleness = 1
    batch = SampleBatch.from_sequences([7, 8], {"input_ids": [torch.arange(3), torch.arange(2)]},
                                       samples={"policy_version": torch.tensor([4, 3])})
    with pytest.raises(RuntimeError, match="sample 8 was generated 2 updates ago, more than rollout.max_staleness=1"):
        staleness(cfg, batch, step=5)
    assert staleness(cfg, batch, step=4) == {"staleness/max": 1.0, "staleness/mean": 0.5}


def test_dynamic_sampling_keeps_the_first_groups_with_reward_spread(debug_model, addition_data, tmp_path):
    from reflow.runtime.calls.policy import keep_groups

    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.rollout.prompts_per_step = 2
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    score = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.7, 0.7, 1.0, 0.0])  # groups 1 and 3 have spread, 0 and 2 none
    batch = SampleBatch.from_sequences(range(8), {"input_ids": [torch.arange(2)] * 8},
                                       samples={"group_id": groups, "score": score})
    assert keep_groups(cfg, batch).ids == [2, 3, 6, 7]
    cfg.rollout.prompts_per_step = 1
    assert keep_groups(cfg, batch).ids == [2, 3]
