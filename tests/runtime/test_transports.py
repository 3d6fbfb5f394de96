"""One executor, two transports: every experiment gives the same numbers in this process (runtime.workers=0)
and on 2 Ray workers (the separate plan), checkpoints move between the two, and the controller fetches no
sample data."""

from pathlib import Path

import pytest

pytest.importorskip("ray")

from reflow.config.loader import from_dict  # noqa: E402
from reflow.config.schema import DPOConfig, RLConfig, RMConfig, SFTConfig  # noqa: E402
from reflow.data.batch import SampleBatch  # noqa: E402
from reflow.experiments.rl import RLExperiment  # noqa: E402
from reflow.experiments.supervised import DPOExperiment, RMExperiment, SFTExperiment  # noqa: E402
from reflow.runtime.graphs import graph_for  # noqa: E402
from rl_runs import assert_same_steps, both, compared, rl_config, run, supervised_config  # noqa: E402

# one estimator per shape of graph: the train call computes advantages itself, on the whole batch, so the
# other group estimators (drgrpo, rloo, reinforce++, reinforce++-baseline) differ from grpo only in a pure
# function that runs the same in both transports (each is trained in tests/experiments/test_algorithms_e2e.py)
ESTIMATORS = ["grpo", "remax", "grpovi", "gae"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_gives_the_same_metrics_in_process_and_on_two_workers(ray_session, tmp_path, debug_model,
                                                                             addition_data, estimator):
    local, ray = both(RLExperiment, lambda out, w: rl_config(out, debug_model, addition_data, w,
                                                             adv_estimator=estimator), tmp_path)
    assert_same_steps(local, ray)
    assert local[1]["actor/grad_norm"] > 0
    if estimator == "gae":
        assert "critic/loss" in local[0]
    if estimator == "remax":
        assert local[0]["time/actor_gen_greedy"] > 0


def test_ptx_and_both_emas_give_the_same_metrics_and_checkpoints_in_process_and_on_two_workers(
        ray_session, tmp_path, debug_model, addition_data):
    def cfg(out, w):
        c = rl_config(out, debug_model, addition_data, w, ptx_coef=0.5, ptx_batch_size=3, ref_ema=0.5,
                      actor_ema=0.9)
        c.trainer.save_every = 1
        return c

    local, ray = both(RLExperiment, cfg, tmp_path)
    assert_same_steps(local, ray)
    assert local[1]["actor/ptx_nll"] > 0
    import torch
    from safetensors.torch import load_file

    for name in ("actor", "ref", "ema_actor"):
        a = load_file(tmp_path / "local" / "checkpoints" / "step_000002" / name / "model.safetensors")
        b = load_file(tmp_path / "ray" / "checkpoints" / "step_000002" / name / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    start = load_file(Path(debug_model) / "model.safetensors")
    ckpt = tmp_path / "local" / "checkpoints" / "step_000002"
    actor, ref, ema = (load_file(ckpt / n / "model.safetensors") for n in ("actor", "ref", "ema_actor"))
    k = "lm_head.weight" if "lm_head.weight" in actor else next(iter(actor))
    # the EMA reference moved toward the actor but is not the actor; the EMA actor is not the actor either
    assert not torch.equal(ref[k], start[k]) and not torch.equal(ref[k], actor[k]) and not torch.equal(ema[k], actor[k])
    assert (tmp_path / "ray" / "final_ema" / "config.json").is_file()


def test_process_rewards_give_the_same_metrics_in_process_and_on_two_workers(ray_session, tmp_path, debug_model,
                                                                           addition_data):
    prm = tmp_path / "prm.py"
    prm.write_text("def prm(prompts, responses, steps):\n"
                   "    return [[(len(s) % 3) / 2 for s in st] for st in steps]\n")

    def cfg(out, w):
        c = rl_config(out, debug_model, addition_data, w, adv_estimator="reinforce++")
        c.reward.prm, c.reward.prm_sep = f"{prm}:prm", "1"
        return c

    local, ray = both(RLExperiment, cfg, tmp_path)
    assert_same_steps(local, ray)
    assert "reward/prm_sum" in local[0]


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_supervised_experiments_give_the_same_metrics_in_process_and_with_fsdp_over_two_workers(
        ray_session, tmp_path, debug_model, addition_data, kind):
    cls, config, extra = {
        "sft": (SFTExperiment, SFTConfig, {"train": "sft.jsonl", "data": None}),
        "rm": (RMExperiment, RMConfig, {"train": "pairs.jsonl", "eval_fraction": 0.2}),
        "dpo": (DPOExperiment, DPOConfig, {"train": "pairs.jsonl", "eval_fraction": 0.2}),
    }[kind]

    def cfg(out, w):
        e = {k: v for k, v in extra.items() if k != "data"}
        c = supervised_config(config, out, debug_model, addition_data, w, **e)
        c.data.eval = str(addition_data / "test.jsonl") if kind != "rm" else None
        c.data.eval_size = 4
        return c

    local, ray = both(cls, cfg, tmp_path)
    for a, b in zip(local, ray):
        for k in ("loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 + 1e-4 * abs(a[k]), (k, a[k], b[k])
    assert local[1]["grad_norm"] > 0
    assert (tmp_path / "ray" / "final" / "config.json").is_file()
    from reflow.utils.metrics import read_metrics

    evals = [[r for r in read_metrics(tmp_path / side / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
             for side in ("local", "ray")]
    assert evals[0] and len(evals[0]) == len(evals[1])
    for a, b in zip(*evals):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)


# (written in one process and resumed under other plans on workers: tests/runtime/test_runtime.py's
# test_resume_under_another_plan_continues_exactly, and test_lora's resume)
@pytest.mark.parametrize("first,then", [(2, 0)])
def test_a_checkpoint_resumes_in_the_other_transport_and_continues_exactly(ray_session, tmp_path, debug_model,
                                                                         addition_data, first, then):
    cfg = rl_config(tmp_path / "whole", debug_model, addition_data, first, adv_estimator="gae")
    cfg.trainer.steps, cfg.trainer.save_every = 3, 2
    whole = run(RLExperiment, cfg)
    again = rl_config(tmp_path / "resumed", debug_model, addition_data, then, adv_estimator="gae")
    again.trainer.steps = 3
    resumed = run(RLExperiment, again, resume=str(tmp_path / "whole" / "checkpoints" / "step_000002"))
    assert len(resumed) == 1
    x, y = compared(whole[2]), compared(resumed[0])
    assert x.keys() == y.keys() and "critic/grad_norm" in {k for k in whole[2]}
    for k in x:
        assert abs(x[k] - y[k]) <= 1e-5 + 1e-4 * abs(x[k]), (k, x[k], y[k])
    assert abs(whole[2]["critic/loss"] - resumed[0]["critic/loss"]) <= 1e-5


@pytest.mark.parametrize("chunk", [None, 2])  # None: unfused; 2: samples stream in chunks of 2 (fusion)
def test_the_controller_fetches_no_sample_data_during_a_multi_worker_step(ray_session, tmp_path, debug_model,
                                                                        addition_data, monkeypatch, chunk):
    import ray

    fetched = []
    real_get = ray.get

    def recording_get(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        fetched.extend(out if isinstance(refs, list) else [out])
        return out

    cfg = rl_config(tmp_path, debug_model, addition_data, 2, adv_estimator="gae")
    cfg.fusion.inter_stage, cfg.fusion.chunk = chunk is not None, chunk or 8
    with RLExperiment(cfg) as exp:
        monkeypatch.setattr(ray, "get", recording_get)
        exp.run_step()
        monkeypatch.setattr(ray, "get", real_get)
    assert fetched  # the step's infos were fetched ...
    assert all(isinstance(x, dict) for x in fetched)  # ... and nothing else: no batch, no tensor
    assert not any(isinstance(v, SampleBatch) for x in fetched for v in x.values())
    # generate / infer outputs (or a streamed call's chunks): counts only
    assert {x.get("samples") for x in fetched if "samples" in x} == {chunk or 6}


def test_graph_keys_are_the_batch_fields_the_calls_read_and_write(debug_model, addition_data, tmp_path):
    g = graph_for(rl_config(tmp_path, debug_model, addition_data, adv_estimator="gae"))
    assert g.call("reward").outputs == ("score", "correct") and g.call("ref_inf").outputs == ("ref_logprobs",)
    assert {"input_ids", "action_mask", "score", "correct", "ref_logprobs", "values"} <= set(g.call("actor_train").inputs)
    assert g.call("critic_inf").impl == "values" and g.call("actor_train").impl == "train_policy"
    remax = graph_for(rl_config(tmp_path, debug_model, addition_data, adv_estimator="remax"))
    assert "greedy_score" in remax.call("actor_train").inputs and remax.call("reward_greedy").outputs == ("score",)


def test_train_on_two_workers_prints_progress_evaluates_and_writes_final_curves_and_timeline(
        ray_session, tmp_path, debug_model, addition_data, capsys):
    from reflow.cli import main

    out = tmp_path / "cli"
    assert main(["train", f"actor.path={debug_model}", f"data.train={addition_data}/train.jsonl",
                 f"data.eval={addition_data}/test.jsonl", "data.eval_size=4", f"output_dir={out}",
                 "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=3", "trainer.steps=2",
                 "trainer.eval_every=1", "runtime.workers=2", "runtime.plan=separate", "runtime.timeline=true"]) == 0
    printed = capsys.readouterr().out
    assert "train step 2/2" in printed and "eval/accuracy" in printed and "on 2 worker(s), plan 'separate'" in printed
    for f in ("final/config.json", "final/model.safetensors", "curves.png", "timeline.json", "plan.yaml"):
        assert (out / f).is_file(), f


# every loss and correction under both transports, combined where they compose (one 2-worker run costs seconds)
@pytest.mark.parametrize("algo", [
    {"policy_loss": "gspo", "rollout_correction": "mis", "rollout_correction_level": "sequence",
     "rollout_mis_upper": 1.0001},
    {"policy_loss": "cispo", "rollout_correction": "tis", "overlong_cache": 2, "overlong_factor": 0.5},
    {"policy_loss": "clip_cov", "clip_cov_ratio": 0.2}, {"policy_loss": "kl_cov", "kl_cov_ratio": 0.2},
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_todays_losses_and_corrections_give_the_same_metrics_in_process_and_on_two_workers(
        ray_session, tmp_path, debug_model, addition_data, algo):
    local, ray = both(RLExperiment, lambda out, w: rl_config(out, debug_model, addition_data, w, **algo), tmp_path)
    assert_same_steps(local, ray)
    assert local[1]["actor/grad_norm"] > 0
    if "rollout_correction" in algo:  # MIS needs the actor's log-probs before training; TIS takes the train forward's
        assert ("time/actor_inf" in local[0]) == (algo["rollout_correction"] == "mis")
        assert "rollout_correction/kept_frac" in local[0]


def test_dynamic_sampling_keeps_groups_with_spread_and_gives_the_same_metrics_in_process_and_on_two_workers(
        ray_session, tmp_path, debug_model, addition_data):
    def cfg(out, w):
        c = rl_config(out, debug_model, addition_data, w, dynamic_sampling=True, dynamic_sampling_rounds=3)
        c.reward.fn = f"{addition_data}/coarse_reward.py:reward"  # many groups without spread
        return c

    (addition_data / "coarse_reward.py").write_text(
        "def reward(prompts, responses, answers):\n    return [float(sum(map(ord, r)) % 5 == 0) for r in responses]\n")
    local, ray = both(RLExperiment, cfg, tmp_path)
    assert_same_steps(local, ray)
    for m in local:
        assert m["dynamic/rounds"] > 1 or m["dynamic/kept_groups"] == 3  # another round only when short of groups
        assert m["dynamic/kept_groups"] <= 3 and m["dynamic/generated"] == 6 * m["dynamic/rounds"]
