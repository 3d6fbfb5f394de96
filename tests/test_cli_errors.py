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


def tiny_rl(model, data, out, *extra):
    return rl(model, data, f"output_dir={out}", "trainer.steps=1", "rollout.n=2", "rollout.prompts_per_step=2",
              "rollout.max_new_tokens=2", "data.eval=null", *extra)


def copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_invalid_yaml_names_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor:\n  path: [1,\n")
    err = run_error(capsys, ["train", str(bad)])
    assert "bad.yaml" in err and "line" in err


def test_chat_rows_without_a_chat_template_name_the_row(debug_model, capsys, tmp_path):
    model = copy_model(debug_model, tmp_path / "no_template")
    (model / "chat_template.jinja").unlink()
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1="}], "answer": "2"}\n')
    err = run_error(capsys, ["train", f"actor.path={model}", f"data.train={data}", "data.eval=null",
                             f"output_dir={tmp_path}/run"])
    assert "chat.jsonl line 1" in err and "chat template" in err and "'prompt'" in err


def test_empty_data_file_names_the_file(debug_model, capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = run_error(capsys, ["train", f"actor.path={debug_model}", f"data.train={empty}", "data.eval=null",
                             f"output_dir={tmp_path}/run"])
    assert "empty.jsonl has no rows" in err


def test_reward_spec_that_does_not_import_names_the_module(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, "reward.fn=no_such_module_xyz:fn",
                               f"output_dir={tmp_path}/run"))
    assert "no_such_module_xyz" in err and "PYTHONPATH" in err


def test_reward_function_with_a_wrong_signature_names_the_arguments(debug_model, addition_data, capsys, tmp_path):
    fn = tmp_path / "sig.py"
    fn.write_text("def reward(text):\n    return [0.0]\n")
    err = run_error(capsys, rl(debug_model, addition_data, f"reward.fn={fn}:reward", f"output_dir={tmp_path}/run"))
    assert "sig.py:reward" in err and "(prompts, responses, answers)" in err


@pytest.mark.parametrize("body, says", [
    ("return [1.0]", "returned 1 rewards for 2 responses"),
    ("return [float('nan')] * len(prompts)", "returned nan at index 0"),
])
def test_reward_function_returning_a_wrong_result_fails_before_models_load(debug_model, addition_data, capsys,
                                                                          tmp_path, body, says):
    fn = tmp_path / "bad_reward.py"
    fn.write_text(f"def reward(prompts, responses, answers):\n    {body}\n")
    err = run_error(capsys, rl(debug_model, addition_data, f"reward.fn={fn}:reward", f"output_dir={tmp_path}/run"))
    assert says in err and "reward.fn" in err and "before training" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["reward.model", "critic.path", "ref.path"])
def test_role_model_folder_that_is_missing_names_its_key(debug_model, addition_data, capsys, tmp_path, key):
    extra = ["reward.fn=null"] if key == "reward.model" else []
    err = run_error(capsys, rl(debug_model, addition_data, *extra, f"{key}={tmp_path}/nothing",
                               f"output_dir={tmp_path}/run"))
    assert f"{key} '{tmp_path}/nothing' is not a folder" in err and "init-model" in err


@pytest.mark.parametrize("key", ["reward.model", "critic.path", "ref.path"])
def test_role_model_with_another_tokenizer_is_refused(debug_model, addition_data, capsys, tmp_path, key):
    from reflow.models.load import load_tokenizer

    other = copy_model(debug_model, tmp_path / "other_tokenizer")
    tok = load_tokenizer(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    extra = ["reward.fn=null"] if key == "reward.model" else []
    err = run_error(capsys, rl(debug_model, addition_data, *extra, f"{key}={other}", f"output_dir={tmp_path}/run"))
    assert f"{key} '{other}' has another tokenizer than actor.path" in err and "<extra_token>" in err
    assert not (tmp_path / "run").exists()


def test_dpo_reference_with_another_tokenizer_is_refused(debug_model, addition_data, capsys, tmp_path):
    from reflow.models.load import load_tokenizer

    other = copy_model(debug_model, tmp_path / "other_tokenizer")
    tok = load_tokenizer(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    err = run_error(capsys, ["dpo", f"model.path={debug_model}", f"ref.path={other}",
                             f"data.train={addition_data}/pairs.jsonl", "data.eval=null", f"output_dir={tmp_path}/run"])
    assert "ref.path" in err and "another tokenizer than model.path" in err


def test_user_graph_file_that_does_not_exist_names_algo_graph(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, f"algo.graph={tmp_path}/nope.py:my_graph",
                               f"output_dir={tmp_path}/run"))
    assert err.startswith("reflow train: error: algo.graph") and "nope.py" in err and "not found" in err


def test_user_graph_returning_something_else_names_algo_graph(debug_model, addition_data, capsys, tmp_path):
    fn = tmp_path / "my_algo.py"
    fn.write_text("def my_graph(cfg):\n    return None\n")
    err = run_error(capsys, rl(debug_model, addition_data, f"algo.graph={fn}:my_graph", f"output_dir={tmp_path}/run"))
    assert "algo.graph" in err and "not a Graph" in err


def test_cuda_asked_for_on_a_machine_without_cuda(debug_model, addition_data, capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = run_error(capsys, rl(debug_model, addition_data, "runtime.device=cuda", f"output_dir={tmp_path}/run"))
    assert "runtime.device=cuda" in err and "runtime.device=auto or cpu" in err


def test_more_workers_than_the_ray_cluster_has(debug_model, addition_data, capsys, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # a joined cluster of 2 CPUs, without starting Ray
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    err = run_error(capsys, rl(debug_model, addition_data, "runtime.workers=4", "runtime.device=cpu",
                               f"output_dir={tmp_path}/run"))
    assert "runtime.workers=4 needs 4 CPU" in err and "has 2" in err and "lower runtime.workers" in err


def test_resume_path_that_is_not_a_checkpoint(debug_model, addition_data, capsys, tmp_path):
    err = run_error(capsys, rl(debug_model, addition_data, f"output_dir={tmp_path}/run") + ["--resume", str(tmp_path)])
    assert f"'{tmp_path}' is not a checkpoint" in err and "step_000010" in err


@pytest.fixture(scope="module")
def grpo_run(debug_model, addition_data, tmp_path_factory):
    """A finished 1-step GRPO run with its checkpoint."""
    out = tmp_path_factory.mktemp("grpo_run")
    assert main(tiny_rl(debug_model, addition_data, out)) == 0
    return out


def test_resume_of_another_commands_checkpoint_is_refused(grpo_run, debug_model, addition_data, capsys):
    err = run_error(capsys, ["sft", f"model.path={debug_model}", f"data.train={addition_data}/sft.jsonl",
                             "data.eval=null", f"output_dir={grpo_run}", "progress=false", "--resume"])
    assert "step_000001' was written by `reflow train`, not `reflow sft`" in err and "without --resume" in err


def test_resume_of_a_grpo_checkpoint_as_ppo_names_the_missing_critic(grpo_run, debug_model, addition_data, capsys):
    err = run_error(capsys, tiny_rl(debug_model, addition_data, grpo_run, "algo.name=ppo") + ["--resume"])
    assert "holds no 'critic' model (it holds actor)" in err and "without --resume" in err


def test_resume_with_a_model_of_another_shape_is_refused(grpo_run, addition_data, capsys, tmp_path):
    from reflow.models.presets import init_model

    other = init_model("debug-qwen2", tmp_path / "qwen", seed=0)
    err = run_error(capsys, tiny_rl(other, addition_data, grpo_run) + ["--resume"])
    assert "the 'actor' model in" in err and "model_type llama vs qwen2" in err


def test_output_dir_that_is_a_file(debug_model, addition_data, capsys, tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_text("x")
    err = run_error(capsys, tiny_rl(debug_model, addition_data, afile))
    assert f"output_dir '{afile}' is a file" in err
    err = run_error(capsys, tiny_rl(debug_model, addition_data, afile / "run"))
    assert f"output_dir '{afile}/run' cannot be written" in err


def test_read_only_output_dir_fails_before_models_load(debug_model, addition_data, capsys, tmp_path, monkeypatch):
    import errno
    import tempfile

    import reflow.experiments.loop as loop

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(loop, "Executor", None)  # nothing may load a model
    err = run_error(capsys, tiny_rl(debug_model, addition_data, tmp_path / "run"))
    assert f"output_dir '{tmp_path}/run' cannot be written (Read-only file system)" in err


def test_disk_full_at_save_keeps_the_previous_checkpoint(debug_model, addition_data, capsys, tmp_path, monkeypatch):
    import errno

    from reflow.utils import checkpoint as ckpt_lib

    save_state = ckpt_lib.save_state

    def full_at_step_2(ckpt, state):
        if state["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_state(ckpt, state)

    monkeypatch.setattr(ckpt_lib, "save_state", full_at_step_2)
    out = tmp_path / "run"
    err = run_error(capsys, tiny_rl(debug_model, addition_data, out, "trainer.steps=3", "trainer.save_every=1"))
    assert f"could not write '{out}/checkpoints/step_000002' (No space left on device)" in err
    assert f"'{out}/checkpoints/step_000001' is intact" in err and "--resume" in err
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [1]
    assert ckpt_lib.load_state(ckpt_lib.checkpoint_dir(out, 1))["step"] == 1
    assert (ckpt_lib.checkpoint_dir(out, 1) / "actor" / "model.safetensors").is_file()
    assert not ckpt_lib.checkpoint_dir(out, 2).exists()
