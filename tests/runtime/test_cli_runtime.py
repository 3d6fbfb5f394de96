"""`reflow plan show` and `reflow train runtime.workers=N`'s checks: all before Ray starts (no Ray here)."""

import sys

import pytest
import yaml

from reflow.cli import main


def run_error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def rl_args(model, data, *extra):
    return [f"actor.path={model}", f"data.train={data}/train.jsonl", f"data.eval={data}/test.jsonl",
            "trainer.progress=false", *extra]


def no_ray_started():
    # (the Ray tests of this folder run after this file: their shared session is not up yet)
    return "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_plan_show_prints_graph_and_table(debug_model, addition_data, capsys):
    assert main(["plan", "show", *rl_args(debug_model, addition_data, "runtime.workers=2",
                                          "runtime.plan=colocate")]) == 0
    out = capsys.readouterr().out
    assert "graph grpo:" in out and "actor_gen" in out and "prompt, response, answer, response_len -> score" in out
    assert "plan 'colocate' on 2 worker(s), graph 'grpo'" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[out.splitlines().index("") + 1:]
            if line.startswith("  ") and not line.strip().startswith(("call", "-"))}
    assert set(rows) == {"actor_gen", "reward", "ref_inf", "actor_train"}
    assert all(r[-2:] == ["0-1", "d2t1p1"] for r in rows.values())


def test_plan_show_ppo_separate(debug_model, addition_data, capsys):
    assert main(["plan", "show", *rl_args(debug_model, addition_data, "algo.name=ppo", "runtime.workers=4",
                                          "runtime.plan=separate")]) == 0
    out = capsys.readouterr().out
    assert "graph ppo:" in out and "critic_train" in out and "plan 'separate' on 4 worker(s)" in out


def test_plan_show_saves_a_plan_that_loads_back(debug_model, addition_data, capsys, tmp_path):
    saved = tmp_path / "plan.yaml"
    assert main(["plan", "show", *rl_args(debug_model, addition_data, "runtime.workers=4", "runtime.plan=separate"),
                 "--save", str(saved)]) == 0
    first = capsys.readouterr().out
    data = yaml.safe_load(saved.read_text())
    assert data["world_size"] == 4 and set(data["calls"]) == {"actor_gen", "reward", "ref_inf", "actor_train"}
    data["calls"]["actor_gen"] = {"ranks": "0-1", "layout": "d1t2p1"}  # an edit: generate under tensor parallel
    saved.write_text(yaml.safe_dump(data))
    assert main(["plan", "show", *rl_args(debug_model, addition_data, "runtime.workers=4",
                                          f"runtime.plan={saved}")]) == 0
    out = capsys.readouterr().out
    assert "plan 'separate' on 4 worker(s)" in first
    assert [line for line in out.splitlines() if line.strip().startswith("actor_gen ") and "d1t2p1" in line]


@pytest.mark.parametrize("calls, names", [
    ({"actor_gen": {"ranks": "0-1", "layout": "d1t3p1"}}, ["actor_gen", "d1t3p1"]),  # 3 ranks on a 2-rank mesh
    ({"actor_gen": {"ranks": "0-1", "layout": "d1t1p2"}}, ["actor_gen", "pipeline"]),  # generation under p2
    ({"actor_gen": {"ranks": "0-5", "layout": "d6t1p1"}}, ["actor_gen"]),  # ranks beyond the 4 workers
    ({"reward": {"ranks": "2-3", "layout": "d1t2p1"}}, ["reward", "no model"]),
    ({"ref_inf": None}, ["ref_inf"]),  # a call the plan does not place
    ({"critic_inf": {"ranks": "3", "layout": "d1t1p1"}}, ["critic_inf"]),  # a call the graph does not have
    ({"actor_gen": {"ranks": "0-1"}}, ["actor_gen", "layout"]),
])
def test_bad_plan_file_names_the_call(debug_model, addition_data, capsys, tmp_path, calls, names):
    plan = {"world_size": 4, "calls": {"actor_gen": {"ranks": "0-1", "layout": "d2t1p1"},
                                       "reward": {"ranks": "2", "layout": "d1t1p1"},
                                       "ref_inf": {"ranks": "3", "layout": "d1t1p1"},
                                       "actor_train": {"ranks": "0-1", "layout": "d2t1p1"}}}
    for call, spec in calls.items():
        if spec is None:
            del plan["calls"][call]
        else:
            plan["calls"][call] = spec
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(plan))
    args = rl_args(debug_model, addition_data, "runtime.workers=4", f"runtime.plan={path}")
    for command in (["plan", "show"], ["train"]):  # train fails the same way, before Ray starts
        err = run_error(capsys, [*command, *args, f"output_dir={tmp_path}/run"])
        assert all(n in err for n in names), err
    assert no_ray_started()
    assert not (tmp_path / "run").exists()


def test_plan_for_other_worker_count(debug_model, addition_data, capsys, tmp_path):
    path = tmp_path / "plan.yaml"
    assert main(["plan", "show", *rl_args(debug_model, addition_data, "runtime.workers=4", "runtime.plan=separate"),
                 "--save", str(path)]) == 0
    err = run_error(capsys, ["train", *rl_args(debug_model, addition_data, "runtime.workers=2",
                                               f"runtime.plan={path}", f"output_dir={tmp_path}/run")])
    assert "runtime.workers=2" in err and "4 worker" in err


def test_missing_plan_file(debug_model, addition_data, capsys):
    err = run_error(capsys, ["plan", "show", *rl_args(debug_model, addition_data, "runtime.workers=2",
                                                      "runtime.plan=no/such/plan.yaml")])
    assert "no/such/plan.yaml" in err and "colocate" in err


def test_train_rejects_bad_settings_before_ray(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, ["train", *rl_args(debug_model, addition_data, "runtime.workers=2",
                                               "algo.adv_estimator=grpovi", "algo.grpovi_low=1", "algo.grpovi_high=0",
                                               f"output_dir={tmp_path}/run")])
    assert "algo.grpovi_low" in err
    err = run_error(capsys, ["train", *rl_args(debug_model, addition_data, "runtime.workers=2",
                                               f"output_dir={tmp_path}/run"), "--resume"])
    assert "--resume: no checkpoint under" in err  # nothing to resume: said before Ray starts
    err = run_error(capsys, ["train", *rl_args(debug_model, addition_data, "runtime.workers=0",
                                               "runtime.plan=no/such/plan.yaml", f"output_dir={tmp_path}/run")])
    assert "runtime.plan=no/such/plan.yaml needs workers" in err
    assert no_ray_started()
    assert not (tmp_path / "run").exists()


def test_worker_failure_exits_1_with_its_message(debug_model, addition_data, capsys, tmp_path, monkeypatch):
    import reflow.experiments.loop as loop
    from reflow.runtime.transport import WorkerFailed

    class FailingExecutor:
        skipped, timeline = 0, []

        def __init__(self, *args):
            pass

        def evaluate(self, step):
            return {}

        def step(self, step, meta):
            raise WorkerFailed("worker 1 failed in 'actor_train': boom")

        def shutdown(self):
            FailingExecutor.shut = True

    monkeypatch.setattr(loop, "Executor", FailingExecutor)
    err = run_error(capsys, ["train", *rl_args(debug_model, addition_data, "runtime.workers=2", "data.eval=null",
                                               f"output_dir={tmp_path}/run")], code=1)
    assert err == "reflow train: error: worker 1 failed in 'actor_train': boom"
    assert FailingExecutor.shut


def test_the_shipped_asynchronous_plan_places_every_call_of_the_demo_graph(debug_model, addition_data, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert main(["plan", "show", str(root / "configs/grpo_addition.yaml"),
                 *rl_args(debug_model, addition_data, "rollout.max_staleness=1", "algo.rollout_correction=tis",
                          "runtime.workers=2", f"runtime.plan={root / 'configs/plan_async_2workers.yaml'}")]) == 0
    out = capsys.readouterr().out
    assert "actor_train" in out and "actor_inf" not in out and "plan 'plan_async_2workers' on 2 worker(s)" in out
