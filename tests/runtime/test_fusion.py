"""Inter-stage fusion (fusion.inter_stage): which calls run on chunks, chunks merge back into the unfused batch,
config errors, and the timeline drawing. Same numbers fused and unfused, in one process and on workers: the
any-plan tests of test_runtime.py."""

import json

import pytest
import torch

from reflow.config.loader import ConfigError
from reflow.data.batch import SampleBatch
from reflow.runtime import graphs
from reflow.runtime.executor import streamed
from reflow.runtime.worker import merge

from rl_runs import rl_config


def _batch(ids, field="input_ids"):
    return SampleBatch.from_sequences(ids, {field: [torch.arange(i + 1) for i in ids]},
                                      samples={"group_id": torch.tensor([i // 2 for i in ids])})


def test_per_sample_calls_run_on_chunks_and_train_and_group_calls_wait_for_the_whole_batch():
    ppo = graphs.ppo(old_logprobs=True)
    assert streamed(ppo, ppo.order) == {"actor_gen": ["reward", "ref_inf", "actor_inf", "critic_inf"]}
    # only the calls submitted together stream: a train phase submitted on its own gets whole batches
    rollout, train = ppo.phases()
    assert streamed(ppo, train) == {}
    dapo = graphs.grpo(dynamic_sampling=True)  # the group filter reads the rewards of whole groups
    assert streamed(dapo, dapo.order) == {"actor_gen": ["reward", "ref_inf"]}
    remax = graphs.grpo(greedy=True)  # the greedy rollout streams to its own reward
    assert streamed(remax, remax.order) == {"actor_gen": ["reward", "ref_inf"], "actor_gen_greedy": ["reward_greedy"]}


def test_chunks_in_finish_order_merge_into_the_batch_in_sample_id_order():
    whole = merge([("", [_batch([0, 1, 2, 3, 4])])])
    chunks = [_batch([3, 0]), _batch([4, 1]), _batch([2])]  # finish order across chunks
    scores = [b.with_samples(score=torch.tensor([float(i) for i in b.ids])) for b in (_batch([2, 4]), _batch([0, 1, 3]))]
    fused = merge([("", chunks), ("", [SampleBatch(s.ids, s.seqlens, {}, {"score": s.samples["score"]}, {})
                                       for s in scores])])
    assert fused.ids == whole.ids == [0, 1, 2, 3, 4]
    assert torch.equal(fused.tokens["input_ids"], whole.tokens["input_ids"])
    assert fused.samples["score"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_fusion_config_errors_name_the_key(tmp_path, debug_model, addition_data):
    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.fusion.inter_stage, cfg.rollout.max_staleness = True, 1
    with pytest.raises(ConfigError, match=r"fusion\.inter_stage.*rollout\.max_staleness"):
        cfg.validate()
    cfg.rollout.max_staleness, cfg.fusion.chunk = 0, 0
    with pytest.raises(ConfigError, match=r"fusion\.chunk must be >= 1"):
        cfg.fusion.validate()


def test_reflow_timeline_prints_idle_time_per_rank_and_chunks_and_draws_one_row_per_rank(tmp_path, capsys):
    from reflow.cli import main

    def x(name, rank, ts, dur, chunk=None):
        return {"name": name, "cat": "step 0", "ph": "X", "pid": 0, "tid": rank, "ts": ts * 1e6, "dur": dur * 1e6,
                **({"args": {"chunk": chunk}} if chunk is not None else {})}

    trace = [x("actor_gen", 1, 0, 1, 0), x("actor_gen", 1, 1, 3, 1), x("reward", 0, 1, 0.5, 0),
             x("reward", 0, 4, 0.5, 1), x("actor_train", 0, 4.5, 1.5), x("actor_train:send_weights", 1, 4.5, 0.5)]
    path = tmp_path / "timeline.json"
    path.write_text(json.dumps({"traceEvents": trace}))
    assert main(["timeline", str(path), "--png"]) == 0
    printed = capsys.readouterr().out
    assert "rank 0: busy 2.50 s, idle 3.50 s" in printed and "rank 1: busy 4.50 s, idle 1.50 s" in printed
    assert "reward: 2 chunk(s)" in printed and "actor_gen: 2 chunk(s)" in printed
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_a_streamed_call_on_a_parked_frozen_copy_keeps_it_loaded_for_every_chunk_and_parks_it_after(
        tmp_path, debug_model, addition_data):
    """runtime.offload_frozen parks the reference between its calls; streamed ref_inf runs on it chunk by chunk."""
    from reflow.experiments.rl import RLExperiment
    from rl_runs import assert_same_steps

    def run(out, fused):
        cfg = rl_config(out, debug_model, addition_data)
        cfg.runtime.offload_frozen = True
        cfg.fusion.inter_stage, cfg.fusion.chunk = fused, 2  # 6 samples: 3 chunks
        with RLExperiment(cfg) as exp:
            exp.run()
            ref = exp.executor.transport.worker.roles["ref"]
            assert ref.parked is not None and ref.parked.host is not None  # parked again after the last chunk
            return exp.history

    assert_same_steps(run(tmp_path / "plain", False), run(tmp_path / "fused", True))
