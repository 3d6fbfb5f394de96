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


# ---------------------------------------------------------------- long-tail migration (fusion.migrate_below)
from reflow.runtime.migrate import Migration, check_migration, plan_migration  # noqa: E402


@pytest.mark.parametrize("unfinished,capacity,moves", [
    ([3, 0, 1, 2], 8, [(2, 0, 1), (3, 0, 2)]),  # all onto the replica holding most
    ([2, 2, 0, 1], 8, [(1, 0, 2), (3, 0, 1)]),  # a tie: the lower index
    ([3, 3, 3, 3], 4, [(3, 0, 1), (3, 1, 1), (3, 2, 1)]),  # 12 rows need 3 replicas of 4: one source fills three
    ([5, 1, 1], 4, [(2, 1, 1)]),  # 7 rows need 2 replicas; one already holds more than a replica's capacity
    ([5, 1], 4, []),  # 6 rows need 2 replicas: already on 2
    ([0, 4, 0], 8, []),  # on one already
    ([0, 0], 8, []),
])
def test_plan_migration_puts_every_unfinished_row_on_the_fewest_replicas_holding_most(unfinished, capacity, moves):
    assert plan_migration(unfinished, capacity) == moves
    after = list(unfinished)
    for s, t, k in moves:
        after[s], after[t] = after[s] - k, after[t] + k
    assert sum(after) == sum(unfinished) and min(after) >= 0  # nothing lost, nothing made up
    assert sum(n > 0 for n in after) == (max(1, -(-sum(unfinished) // capacity)) if moves else
                                         sum(n > 0 for n in unfinished))
    assert all(after[t] <= max(capacity, unfinished[t]) for _, t, _ in moves)


def test_replicas_hand_their_long_tail_to_the_fewest_and_every_sample_keeps_its_tokens(debug_model):
    """Four replicas (threads, each a generation engine with 4 prompts: 3 of budget 1, one of 10; one store as the
    world's) migrate once a sample has ended (migrate_below 1.0). Whatever the threads' pace, every replica then
    still holds its long row (the first report, after a replica's first step, sets the trigger, and a replica
    reports before its long row can end), so 4 holders of 4 to 13 rows go onto 1 or 2 replicas (8 rows each):
    each sample is returned once, by its replica or by the one that adopted it, with the tokens of one
    uninterrupted call."""
    import datetime
    import threading

    import torch.distributed as dist

    from reflow.engines.generate import GenerationEngine, SamplingParams
    from reflow.models.load import load_policy

    model = load_policy(debug_model).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 261, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (16,), generator=g)]
    keys = [100 + i for i in range(16)]
    budgets = [1, 1, 1, 10] * 4
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    whole = GenerationEngine(model, [2], 0, 16).generate(prompts, params, None, budgets, keys=keys, seed=5)
    whole = {keys[g.index]: g for g in whole}
    assert [len(whole[k].tokens) for k in keys] == budgets  # no row ends early (EOS): the long rows are the tail

    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=30))
    out, migrations, errors = {}, [], []

    def replica(r):
        try:
            m = Migration(Migration.store_for(store, "actor_gen", 0), r, 4, 16, 4, below=1.0, capacity=8)
            migrations.append(m)
            mine = slice(4 * r, 4 * r + 4)
            engine = GenerationEngine(model, [2], 0, 8)
            for g in engine.stream(prompts[mine], params, None, budgets[mine], keys=keys[mine], seed=5, steer=m):
                key = keys[mine][g.index] if g.index < 4 else m.received[g.index - 4]
                assert key not in out
                out[key] = g
            m.finish()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    migrations.sort(key=lambda m: m.replica)
    counts = migrations[0].counts
    assert all(m.joined and m.counts == counts for m in migrations) and min(counts) >= 1
    fewest = -(-sum(counts) // 8)
    assert fewest in (1, 2) and migrations[0].moves == plan_migration(counts, 8)
    for m in migrations:  # a source hands over every row it held, a target gets what the plan gives it
        assert len(m.sent) == (counts[m.replica] if any(s == m.replica for s, _, _ in m.moves) else 0)
        assert len(m.received) == sum(k for _, t, k in m.moves if t == m.replica)
    assert sum(not m.sent for m in migrations) == fewest  # the rows are on the fewest replicas
    sent = sorted(k for m in migrations for k in m.sent)
    assert sent == sorted(k for m in migrations for k in m.received) and len(set(sent)) == len(sent)
    assert sorted(out) == keys  # every sample once
    prefix = Migration.store_for(store, "actor_gen", 0)
    sources = {s for s, _, _ in migrations[0].moves}
    assert sources and not any(prefix.check([f"rows/{s}"]) for s in sources)  # the last reader freed the rows
    for k in keys:
        assert (out[k].prompt_ids, out[k].tokens, out[k].finished) == (whole[k].prompt_ids, whole[k].tokens,
                                                                        whole[k].finished)
        torch.testing.assert_close(torch.tensor(out[k].logprobs), torch.tensor(whole[k].logprobs), atol=1e-5, rtol=0)


def test_migration_config_and_plan_errors_name_the_key(tmp_path, debug_model, addition_data):
    from reflow.runtime.plan import Plan, PlanError

    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.fusion.migrate_below = 1.5
    with pytest.raises(ConfigError, match=r"fusion\.migrate_below is a fraction of the batch in \[0, 1\]"):
        cfg.fusion.validate()
    cfg.fusion.migrate_below = 0.25
    with pytest.raises(ConfigError, match=r"fusion\.migrate_below .*set fusion\.inter_stage=true"):
        cfg.validate()
    cfg.fusion.inter_stage = True
    grpo = graphs.grpo()
    tensor = Plan.from_dict({"calls": {"actor_gen": {"ranks": "0-1", "layout": "d1t2p1"},
                                       "reward": {"ranks": "0", "layout": "d1t1p1"},
                                       "ref_inf": {"ranks": "1", "layout": "d1t1p1"},
                                       "actor_train": {"ranks": "0-1", "layout": "d2t1p1"}}}, 2)
    with pytest.raises(PlanError, match=r"plan call 'actor_gen': fusion\.migrate_below .* not d1t2p1; use d2t1p1"):
        check_migration(cfg, grpo, tensor)
    check_migration(cfg, grpo, Plan.from_dict({"calls": {n: {"ranks": "0-1", "layout": "d2t1p1"}
                                                         for n in grpo.order}}, 2))  # replicas: fine


def test_a_replica_that_never_reports_ends_the_migration_with_a_message_naming_the_wait():
    import datetime

    import torch.distributed as dist

    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=0.2))
    lone = Migration(Migration.store_for(store, "actor_gen", 0), 0, 2, 4, 2, below=1.0, capacity=8)
    with pytest.raises(RuntimeError, match=r"migrate_below\): replica 0 .* waited runtime\.timeout_s for the other "
                                           r"replicas to report"):
        lone(1, lambda: [])  # one of 4 samples ended: the trigger, but replica 1 never arrives
