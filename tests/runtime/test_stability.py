"""Stable RLHF (Peng et al. 2023) end to end: `reflow am` writes a marked reward-model folder that
`reward.model=` takes, and gives the same numbers in this process and on 2 workers; `reflow rehearse` writes
its selection; the rehearsal term joins the actor's optimizer step in both transports."""

import json

import pytest
import torch

from reflow.config.loader import from_dict
from reflow.config.schema import AMConfig
from reflow.experiments.supervised import AMExperiment
from reflow.models.load import advantage_model_info
from rl_runs import run


@pytest.fixture(scope="module")
def task_pairs(addition_data):
    """The addition pairs with a task column: every third row is task "b"."""
    rows = [json.loads(line) for line in open(addition_data / "pairs.jsonl")]
    path = addition_data / "pairs_task.jsonl"
    path.write_text("".join(json.dumps({**r, "task": "b" if i % 3 == 0 else "a"}) + "\n" for i, r in enumerate(rows)))
    return path


def am_config(out, model, pairs, workers=0, **extra):
    return from_dict(AMConfig, {
        "output_dir": str(out), "model": {"path": str(model), "micro_batch_tokens": 64, "optim": {"lr": 1e-3}},
        "batch_size": 4, "max_steps": 2, "progress": False, "data": {"train": str(pairs)}, "eval_fraction": 0.05,
        "samples_per_prompt": 3, "max_new_tokens": 3,
        "runtime": {"workers": workers, "plan": "colocate", "timeout_s": 60}, **extra})


def test_am_batch_holds_each_pairs_chosen_rejected_and_samples_as_one_group_with_task_weights():
    from reflow.algorithms.advantage_model import CHOSEN, REJECTED, SAMPLED
    from reflow.data.batch import SampleBatch
    from reflow.data.datasets import PreferenceExample
    from reflow.runtime.calls.advantage import am_batch

    rows = [PreferenceExample(1, [5, 6], [7, 2], [8, 2], {"task": "x"}), PreferenceExample(2, [9], [3, 2], [4, 2])]
    sampled = SampleBatch.from_sequences(range(4), {"input_ids": [torch.tensor([5, 6, 1]), torch.tensor([5, 6, 2]),
                                                                  torch.tensor([9, 1]), torch.tensor([9, 3])],
                                                    "action_mask": [torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]),
                                                                    torch.tensor([0, 1]), torch.tensor([0, 1])]},
                                         samples={"group_id": torch.tensor([0, 0, 1, 1])})
    b = am_batch(rows, sampled)
    assert b.samples["kind"].tolist() == [CHOSEN, REJECTED, SAMPLED, SAMPLED] * 2
    assert b.samples["group_id"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert b.meta["task"] == ["x"] * 4 + ["all"] * 4
    assert torch.allclose(b.samples["bound_w"], torch.full((8,), 1 / 8))  # 2 tasks of 4 sequences
    assert b.tokens["input_ids"][:4].tolist() == [5, 6, 7, 2]  # prompt + chosen
    assert b.tokens["action_mask"][:4].tolist() == [0, 0, 1, 1]


def test_reflow_am_writes_a_reward_model_folder_marked_as_an_am_with_per_task_score_stats_that_reward_model_takes(
        tmp_path, debug_model, addition_data, task_pairs, capsys):
    from reflow.cli import main

    out = tmp_path / "am"
    assert main(["am", f"model.path={debug_model}", f"data.train={task_pairs}", f"output_dir={out}",
                 "batch_size=4", "max_steps=2", "samples_per_prompt=2", "max_new_tokens=3", "eval_fraction=0.05",
                 "progress=false"]) == 0
    info = advantage_model_info(out / "final")
    assert info["kind"] == "advantage_model" and info["samples_per_prompt"] == 2
    assert set(info["tasks"]) == {"a", "b"} and all(v["std"] is not None for v in info["tasks"].values())
    assert advantage_model_info(debug_model) is None
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any({"bt_loss", "centre", "bound"} <= set(r) for r in rows) and any("eval/score_std/a" in r for r in rows)
    assert main(["train", f"actor.path={debug_model}", "reward.fn=null", f"reward.model={out}/final",
                 f"data.train={addition_data}/train.jsonl", "data.eval=null", f"output_dir={tmp_path}/rl",
                 "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=3", "trainer.steps=1",
                 "trainer.progress=false"]) == 0
    assert "reward/mean" in json.loads(open(tmp_path / "rl" / "metrics.jsonl").readline())


def test_an_am_config_error_names_the_key(tmp_path, debug_model, task_pairs):
    from reflow.config.loader import ConfigError

    with pytest.raises(ConfigError, match="samples_per_prompt"):
        am_config(tmp_path, debug_model, task_pairs, samples_per_prompt=0)
    with pytest.raises(ConfigError, match="bound_coef"):
        am_config(tmp_path, debug_model, task_pairs, bound_coef=-1.0)


def test_am_training_gives_the_same_numbers_in_process_and_with_two_workers(ray_session, tmp_path, debug_model,
                                                                            task_pairs):
    local = run(AMExperiment, am_config(tmp_path / "local", debug_model, task_pairs, 0))
    ray = run(AMExperiment, am_config(tmp_path / "ray", debug_model, task_pairs, 2))
    assert local[1]["centre"] > 0 and local[1]["grad_norm"] > 0
    for a, b in zip(local, ray):
        for k in ("loss", "bt_loss", "centre", "bound", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6 + 1e-4 * abs(a[k]), (k, a[k], b[k])
    la = advantage_model_info(tmp_path / "local" / "final")["tasks"]
    ra = advantage_model_info(tmp_path / "ray" / "final")["tasks"]
    for t in la:
        assert la[t]["mean"] == pytest.approx(ra[t]["mean"], rel=1e-4, abs=1e-6)


def rehearsal_rl_config(out, model, data, workers=0, **sft):
    """A 2-step GRPO run with the first 4 SFT rows as the rehearsal set (rehearsal=...) or as PPO-ptx data
    (ptx=...), sampled in file order so both terms see the same rows at every optimizer step."""
    from rl_runs import rl_config

    rows = (data / "sft.jsonl").read_text().splitlines()[:4]
    (data / "rehearsal4.jsonl").write_text("\n".join(rows) + "\n")
    algo = {"ptx_coef": sft["ptx"], "ptx_batch_size": 4} if "ptx" in sft else {}
    c = rl_config(out, model, data, workers, mini_batches=2, **algo)
    c.data.shuffle, c.data.ptx = False, str(data / "rehearsal4.jsonl")
    if "rehearsal" in sft:
        c.rehearsal.data, c.rehearsal.coef, c.rehearsal.batch_size = str(data / "rehearsal4.jsonl"), sft["rehearsal"], 4
    return c


def test_the_rehearsal_term_joins_the_actor_step_exactly_as_ptx_does_with_the_same_rows_and_coefficient(
        tmp_path, debug_model, addition_data):
    from reflow.experiments.rl import RLExperiment

    rehearsed = run(RLExperiment, rehearsal_rl_config(tmp_path / "r", debug_model, addition_data, rehearsal=0.5))
    ptx = run(RLExperiment, rehearsal_rl_config(tmp_path / "p", debug_model, addition_data, ptx=0.5))
    plain = run(RLExperiment, rehearsal_rl_config(tmp_path / "n", debug_model, addition_data))
    for r, p in zip(rehearsed, ptx):
        assert r["actor/rehearsal_nll"] == p["actor/ptx_nll"] > 0
        for k in ("actor/grad_norm", "actor/pg_loss", "actor/kl", "reward/mean"):
            assert r[k] == p[k], k
    # the term changes the step: another gradient at step 1, other weights (so other KL) at step 2
    assert abs(rehearsed[0]["actor/grad_norm"] - plain[0]["actor/grad_norm"]) > 1e-4
    assert "actor/rehearsal_nll" not in plain[0]
    assert rehearsed[0]["reward/mean"] == plain[0]["reward/mean"]  # same rollout before any update


def test_rehearsal_gives_the_same_metrics_in_process_and_on_two_workers(ray_session, tmp_path, debug_model,
                                                                        addition_data):
    from reflow.experiments.rl import RLExperiment
    from rl_runs import assert_same_steps, both

    local, ray = both(RLExperiment, lambda out, w: rehearsal_rl_config(out, debug_model, addition_data, w,
                                                                        rehearsal=0.5), tmp_path)
    assert_same_steps(local, ray)
    assert local[1]["actor/rehearsal_nll"] > 0


def test_rehearsal_config_errors_name_the_key(tmp_path, debug_model, addition_data):
    from reflow.config.loader import ConfigError, from_dict
    from reflow.config.schema import RehearsalConfig

    with pytest.raises(ConfigError, match="rehearsal.coef"):
        from_dict(RehearsalConfig, {"data": "x.jsonl", "coef": -0.1})
    with pytest.raises(ConfigError, match="rehearsal.batch_size"):
        from_dict(RehearsalConfig, {"data": "x.jsonl", "batch_size": 0})


def test_rehearsal_select_inside_train_makes_the_data_trains_on_it_and_a_resumed_run_reuses_it(
        tmp_path, debug_model, addition_data, caplog):
    import logging

    from reflow.config.loader import ConfigError
    from reflow.config.schema import RehearseSelection
    from reflow.experiments.rl import RLExperiment
    from rl_runs import rl_config

    def cfg():
        c = rl_config(tmp_path / "run", debug_model, addition_data, 0)
        c.rehearsal.coef, c.rehearsal.batch_size = 0.5, 2
        c.rehearsal.select = RehearseSelection(am=str(debug_model), clusters=2, samples_per_prompt=2,
                                               max_new_tokens=3, rehearse_per_cluster=2, min_advantage=-1.0)
        return c

    first = cfg()
    got = run(RLExperiment, first)
    sel = tmp_path / "run" / "rehearse"
    assert (sel / "clusters.json").is_file()
    assert first.data.train == str(sel / "ppo_prompts.jsonl") and first.rehearsal.data == str(sel / "rehearsal.jsonl")
    assert first.rehearsal.select is None  # the config the run saves names the files it trained on
    assert got[0]["actor/rehearsal_nll"] > 0
    stamp = (sel / "rehearsal.jsonl").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="reflow"):
        with RLExperiment(cfg(), resume=True) as exp:  # the resumed run trains on the same selection
            assert exp.step == len(got)
    assert "rehearsal.select: reusing" in caplog.text and (sel / "rehearsal.jsonl").stat().st_mtime_ns == stamp
    both_given = cfg()
    both_given.rehearsal.data = "x.jsonl"
    with pytest.raises(ConfigError, match="drop rehearsal.data"):
        both_given.rehearsal.validate()
