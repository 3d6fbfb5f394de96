"""`reflow plan search` / `reflow plan whatif` / hardware errors: plans a runtime run accepts, one-line errors."""

import pytest
import yaml

from reflow.cli import main
from reflow.config.loader import from_dict
from reflow.config.schema import RLConfig
from reflow.runtime.roles import model_configs
from reflow.runtime.graphs import graph_for
from reflow.runtime.plan import Plan


@pytest.fixture
def ppo_config(tmp_path, debug_model, addition_data):
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "actor": {"path": str(debug_model)},
        "reward": {"fn": "exact_match"}, "data": {"train": str(addition_data / "train.jsonl"), "eval": None},
        "rollout": {"prompts_per_step": 4, "n": 2, "max_new_tokens": 4},
        "algo": {"name": "ppo", "kl_coef": 0.01, "ppo_epochs": 1, "mini_batches": 1}}))
    return path


def test_plan_search_writes_a_plan_the_runtime_accepts(ppo_config, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "search", str(ppo_config), "--devices", "4", "--steps", "200", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted:" in text and "colocate" in text and "separate" in text and "s/iteration" in text
    plan = Plan.load(out, 4)
    cfg = from_dict(RLConfig, yaml.safe_load(ppo_config.read_text()))
    cfg.runtime.workers = 4
    graph = graph_for(cfg)
    plan.validate(graph, model_configs(cfg, graph))
    assert plan.world_size == 4 and set(plan.calls) == set(graph.order)
    # the same seed, the same plan
    out2 = tmp_path / "plan2.yaml"
    assert main(["plan", "search", str(ppo_config), "--devices", "4", "--steps", "200", "--out", str(out2)]) == 0
    assert out.read_text() == out2.read_text()


def test_plan_search_with_given_lengths_names_the_fusion_setting_in_its_output_and_plan(ppo_config, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "search", str(ppo_config), "--devices", "2", "--steps", "100", "--lengths", "1,1,2,4",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean 1.8, quantiles 1, 1, 2, 4" in text and "this plan per setting: off" in text
    setting = text.split(f"runtime.plan={out}")[1].split()
    assert setting[0] in ("fusion.inter_stage=true", "fusion.inter_stage=false")
    assert out.read_text().splitlines()[-1] == "# searched with " + " ".join(setting)
    assert Plan.load(out, 2).world_size == 2
    assert main(["plan", "search", str(ppo_config), "--devices", "2", "--lengths", "1,x"]) == 2
    assert "--lengths: give comma-separated numbers" in capsys.readouterr().err


def test_plan_search_with_a_hardware_file(ppo_config, tmp_path, capsys):
    from reflow.planner.hardware import hardware

    hw = tmp_path / "hw.yaml"
    hardware("cpu").with_(name="measured", call_overhead=2e-3, cores_per_node=2.0).save(hw)
    out = tmp_path / "plan.yaml"
    assert main(["plan", "search", str(ppo_config), "--devices", "2", "--hardware", str(hw), "--steps", "100",
                 "--out", str(out)]) == 0
    assert "hardware: measured" in capsys.readouterr().out
    assert Plan.load(out, 2).world_size == 2


@pytest.mark.parametrize("extra, message", [
    (["--hardware", "missing.yaml"], "hardware file missing.yaml does not exist"),
    (["--preset", "tpu-v9"], "unknown hardware preset 'tpu-v9'"),
    (["--preset", "cpu", "--hardware", "x.yaml"], "not both"),
    (["--devices", "0"], "--devices"),
])
def test_plan_search_bad_input_is_one_line(ppo_config, capsys, extra, message):
    args = ["plan", "search", str(ppo_config)] + (["--devices", "2"] if "--devices" not in extra else []) + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reflow plan search: error:") and message in err and "\n" not in err


def test_plan_whatif_prints_the_table(capsys):
    assert main(["plan", "whatif", "--sizes", "7b", "--devices", "16", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "| 7b | 16 |" in out and "a100-80g" in out


def test_profile_bad_workers_is_one_line(capsys):
    assert main(["profile", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_profile_config_with_a_missing_model_is_one_line_before_measuring(ppo_config, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(ppo_config.read_text().replace("path: ", "path: /nonexistent/model-", 1))
    assert main(["profile", "--workers", "2", "--config", str(bad), "--out", str(tmp_path / "hw.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "actor path '/nonexistent/model-" in err and "\n" not in err
    assert not (tmp_path / "hw.yaml").exists()


def test_plan_search_over_staleness_picks_the_fastest_k_and_names_it_in_the_command_and_plan(ppo_config, tmp_path,
                                                                                             capsys):
    out = tmp_path / "plan.yaml"
    # long generations on GPUs: decoding a tiny model is latency-bound, so generation gains little from more
    # devices and is better overlapped with training on ranks of its own
    assert main(["plan", "search", str(ppo_config), "rollout.max_new_tokens=64", "--devices", "4", "--preset",
                 "a100-80g", "--steps", "200", "--staleness", "0", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    per_k = [kv.split() for kv in text.split("(the best plan per k: ")[1].split(")")[0].split(", ")]
    times = {int(k): float(t) for k, t, _unit in per_k}
    assert times[1] < times[0]  # generation of the next step overlaps this step's training on other ranks
    assert "staleness: rollout.max_staleness=1" in text
    assert text.rstrip().endswith("rollout.max_staleness=1")
    assert out.read_text().splitlines()[-1].endswith("rollout.max_staleness=1")
    assert main(["plan", "search", str(ppo_config), "--devices", "2", "--staleness", "-1"]) == 2
    assert "--staleness: values of rollout.max_staleness are >= 0" in capsys.readouterr().err
