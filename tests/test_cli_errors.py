"""Bad input ends a command with one line that names the key, file or row — before training starts."""

import pytest

from reflow.cli import main


def run_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def rl(model, data, *extra):
    return ["train", f"actor.path={model}", f"data.train={data}/train.jsonl", f"data.eval={data}/test.jsonl",
            "trainer.progress=false", *extra]


def test_unknown_key_suggests_the_close_match(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, "rollout.temprature=0.5", f"output_dir={tmp_path}"))
    assert "rollout.temprature" in err and "temperature" in err


def test_wrong_type_names_the_key(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, "rollout.n=eight", f"output_dir={tmp_path}"))
    assert "rollout.n" in err and "int" in err


def test_missing_config_file(capsys):
    err = run_error(capsys, ["train", "no/such/config.yaml"])
    assert "no/such/config.yaml" in err


def test_missing_data_file(debug_model, capsys, tmp_path):
    err = run_error(capsys, ["train", f"actor.path={debug_model}", f"data.train={tmp_path}/nope.jsonl",
                             f"output_dir={tmp_path}"])
    assert "nope.jsonl" in err


def test_malformed_row_names_the_line(debug_model, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": 5}\n')
    err = run_error(capsys, ["train", f"actor.path={debug_model}", f"data.train={bad}", "data.eval=null",
                             f"output_dir={tmp_path}"])
    assert "bad.jsonl" in err and "line 2" in err


def test_prompt_over_the_length_limit(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, "data.max_prompt_len=3", f"output_dir={tmp_path}"))
    assert "data.max_prompt_len" in err


def test_skip_mode_counts_bad_rows_and_trains(debug_model, capsys, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"oops": 1}\n{"prompt": "2+2=", "answer": "4"}\n')
    assert main(["train", f"actor.path={debug_model}", f"data.train={data}", "data.eval=null",
                 "data.on_bad_row=skip", f"output_dir={tmp_path}/run", "trainer.steps=1", "rollout.n=2",
                 "rollout.prompts_per_step=2", "rollout.max_new_tokens=2", "trainer.progress=false"]) == 0
    assert "skipped 1 bad data rows" in capsys.readouterr().out


def test_unknown_preset(capsys, tmp_path):
    err = run_error(capsys, ["init-model", "--preset", "huge-llama", "--out", str(tmp_path)])
    assert "huge-llama" in err and "tiny-llama" in err


def test_model_path_that_is_not_a_model(addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(tmp_path / "nothing", addition_data, f"output_dir={tmp_path}"))
    assert "actor.path" in err and "init-model" in err


def test_reward_function_that_raises_fails_before_training(debug_model, addition_data, capsys, tmp_path):
    fn = tmp_path / "my_reward.py"
    fn.write_text("def reward(prompts, responses, answers):\n    raise RuntimeError('boom')\n")
    err = run_error(capsys, rl(debug_model, addition_data, f"reward.fn={fn}:reward", f"output_dir={tmp_path}/run"))
    assert "boom" in err and "reward" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_reward_function_returning_non_numbers(debug_model, addition_data, capsys, tmp_path):
    fn = tmp_path / "words.py"
    fn.write_text("def reward(prompts, responses, answers):\n    return ['good' for _ in prompts]\n")
    err = run_error(capsys, rl(debug_model, addition_data, f"reward.fn={fn}:reward", f"output_dir={tmp_path}/run"))
    assert "'good'" in err


def test_resume_without_checkpoint(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, f"output_dir={tmp_path}/fresh") + ["--resume"])
    assert "no checkpoint" in err and "fresh" in err


def test_user_reward_function_is_used(debug_model, addition_data, tmp_path):
    from reflow.utils.metrics import read_metrics

    fn = tmp_path / "const.py"
    fn.write_text("def reward(prompts, responses, answers):\n    return [0.25] * len(prompts)\n")
    out = tmp_path / "run"
    assert main(rl(debug_model, addition_data, f"reward.fn={fn}:reward", f"output_dir={out}", "trainer.steps=1",
                   "rollout.n=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=2", "data.eval=null")) == 0
    assert read_metrics(out / "metrics.jsonl")[0]["reward/mean"] == pytest.approx(0.25)


def test_layout_command_validates_before_running(debug_model, capsys):
    assert main(["layout", "d2t1p1", "d1t2p1", "--model", str(debug_model)]) == 0
    assert "d1t2p1: valid" in capsys.readouterr().out
    err = run_error(capsys, ["layout", "d1t3p1", "--model", str(debug_model)])
    assert "t=3" in err and "would fit" in err
