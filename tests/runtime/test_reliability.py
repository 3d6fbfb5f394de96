"""Nothing lost: a run killed anywhere (the training process, or one of its Ray workers, even while a checkpoint
is being written) resumes from its last complete checkpoint to the metrics of a run never interrupted; a dead
or hung worker ends the run naming the rank and the call, or is restarted (runtime.max_restarts); a NaN / inf
never reaches the weights (trainer.on_nonfinite).

Kills are real: REFLOW_FAILPOINT makes the process SIGKILL itself (or hang) at a named point; bench/chaos.py
kills at random moments."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reflow.cli import main
from reflow.engines.train import NonFiniteError, TrainEngine
from reflow.utils import checkpoint as ckpt_lib
from reflow.utils.metrics import read_metrics, truncate_metrics

from rl_runs import REWARDS

TIMING = ("time/", "throughput/", "run/restarts")


def args(model, data, out, *extra):
    return ["train", f"actor.path={model}", f"data.train={data}/train.jsonl", f"data.eval={data}/test.jsonl",
            "data.eval_size=4", f"output_dir={out}", "rollout.prompts_per_step=3", "rollout.n=2",
            "rollout.max_new_tokens=4", "trainer.progress=false", "actor.optim.lr=1e-3", "actor.micro_batch_tokens=64",
            "trainer.steps=5", "trainer.save_every=2", "trainer.eval_every=2", "trainer.keep_checkpoints=2",
            "algo.kl_coef=0.01", f"reward.fn={REWARDS}:varied", *extra]


def rows(out) -> list[dict]:
    """metrics.jsonl without the timings (which differ run to run), in order."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_rows(a: list[dict], b: list[dict], rel=1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x["step"], sorted(set(x) ^ set(y)))
        for k in x:
            if x[k] is None or y[k] is None:
                assert x[k] is y[k], (x["step"], k)
            else:
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["step"], k, x[k], y[k])


def killed_run(argv, point, tmp_path) -> subprocess.CompletedProcess:
    """`reflow <argv>` in a fresh process that SIGKILLs itself at failpoint `point`."""
    env = {**os.environ, "REFLOW_FAILPOINT": f"{point}=kill", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "reflow.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


@pytest.fixture(scope="module")
def whole(debug_model, addition_data, tmp_path_factory):
    """The uninterrupted in-process run every killed one is compared with."""
    out = tmp_path_factory.mktemp("whole")
    assert main(args(debug_model, addition_data, out)) == 0
    return rows(out)


@pytest.mark.parametrize("point, resumes_from", [
    ("call.actor_train.r0.s2", 2),             # in the middle of step 3
    ("checkpoint.models.step_000004", 2),      # the models of checkpoint 4 written, its state not yet
    ("checkpoint.state.step_000004", 2),       # checkpoint 4 complete but not yet renamed
    ("checkpoint.commit.step_000004", 4),      # checkpoint 4 renamed, the old one not yet pruned
])
def test_a_process_killed_anywhere_resumes_to_the_metrics_of_an_uninterrupted_run(
        whole, debug_model, addition_data, tmp_path, point, resumes_from):
    out = tmp_path / "run"
    argv = args(debug_model, addition_data, out)
    assert killed_run(argv, point, tmp_path).returncode == -signal.SIGKILL
    assert ckpt_lib.find_resume(out, True).name == f"step_{resumes_from:06d}"  # never a half-written one
    assert main(argv + ["--resume"]) == 0
    assert_same_rows(whole, rows(out))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000005"]  # no partial folder left; the newest 2 kept


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_and_rows_are_truncated_to_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n{"step": 1, "eval/accuracy": 0.5}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(p)] == [1, 1, 2]
    truncate_metrics(p, last_step=1, rows=1)  # the checkpoint was written after 1 row: the eval row goes too
    assert read_metrics(p) == [{"step": 1, "loss": 1.0}]


def test_an_interrupted_checkpoint_is_never_resumed_and_is_cleaned_up(tmp_path):
    ckpt_lib.save_state(ckpt_lib.begin_checkpoint(tmp_path, 2), {"step": 2})
    ckpt_lib.commit_checkpoint(tmp_path / "checkpoints" / ".step_000002.partial")
    partial = ckpt_lib.begin_checkpoint(tmp_path, 4)
    (partial / "actor").mkdir()
    ckpt_lib.save_state(partial, {"step": 4})  # even with its state file, a partial folder is not a checkpoint
    assert [s for s, _ in ckpt_lib.list_checkpoints(tmp_path)] == [2]
    with pytest.raises(ckpt_lib.CheckpointError, match="not a checkpoint"):
        ckpt_lib.find_resume(tmp_path, str(tmp_path / "checkpoints" / ".step_000004"))
    ckpt_lib.clean_partial(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]


def test_resuming_from_an_earlier_checkpoint_discards_the_later_ones_at_its_first_save(
        debug_model, addition_data, tmp_path):
    out = tmp_path / "run"
    assert main(args(debug_model, addition_data, out, "trainer.steps=6", "trainer.keep_checkpoints=3")) == 0
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [2, 4, 6]
    assert main(args(debug_model, addition_data, out, "trainer.steps=4", "trainer.keep_checkpoints=3",
                     "--resume", str(out / "checkpoints" / "step_000002"))) == 0
    # step 6 was the abandoned run's: left in place, `--resume` would continue that run instead of this one
    assert [s for s, _ in ckpt_lib.list_checkpoints(out)] == [2, 4]


# ---------------------------------------------------------------------------------------------- Ray workers


def test_a_killed_worker_ends_the_run_naming_rank_and_call_and_the_run_resumes_exactly(
        ray_session, whole, debug_model, addition_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = args(debug_model, addition_data, out, "runtime.workers=2", "runtime.plan=colocate", "runtime.timeout_s=60")
    monkeypatch.setenv("REFLOW_FAILPOINT", "call.actor_train.r1.s2=kill")
    assert main(argv) == 1
    first = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("reflow train: error:"))
    assert "worker 1 failed in 'actor_train': the worker process died" in first
    assert ckpt_lib.find_resume(out, True).name == "step_000002"
    monkeypatch.delenv("REFLOW_FAILPOINT")
    assert main(argv + ["--resume"]) == 0
    assert_same_rows(whole, rows(out), rel=1e-4)  # 2 workers vs one process: the contract's tolerance


def test_a_worker_killed_while_writing_a_checkpoint_is_restarted_from_the_previous_one(
        ray_session, whole, debug_model, addition_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # worker 0 dies after writing the actor folder of checkpoint 4: max_restarts=1 resumes from checkpoint 2
    monkeypatch.setenv("REFLOW_FAILPOINT", "save.actor.r0.step_000004=kill")
    monkeypatch.setenv("REFLOW_FAILPOINT_ONCE", str(tmp_path / "fired"))
    assert main(args(debug_model, addition_data, out, "runtime.workers=2", "runtime.plan=colocate",
                     "runtime.timeout_s=60", "runtime.max_restarts=1")) == 0
    assert (tmp_path / "fired").exists()
    got = read_metrics(out / "metrics.jsonl")
    assert [r.get("run/restarts") for r in got if "reward/mean" in r] == [None, None, 1.0, 1.0, 1.0]
    assert_same_rows(whole, rows(out), rel=1e-4)


@pytest.mark.parametrize("point,extra,needle", [
    ("call.reward.r0.s1", [], "hang: no call finished for 4 s (runtime.timeout_s); still running: rank 0 in 'reward'"),
    # a generation replica that stops mid-stream, after handing on its first chunk (fusion.inter_stage)
    ("stream.actor_gen.r1.s1.c0", ["fusion.inter_stage=true", "fusion.chunk=1"],
     "hang: no chunk came for 4 s (runtime.timeout_s) from rank 1 in 'actor_gen'"),
])
def test_a_hung_worker_ends_the_run_within_the_timeout_naming_rank_and_call(
        ray_session, debug_model, addition_data, tmp_path, monkeypatch, capsys, point, extra, needle):
    monkeypatch.setenv("REFLOW_FAILPOINT", f"{point}=hang")
    t0 = time.perf_counter()
    assert main(args(debug_model, addition_data, tmp_path / "run", "runtime.workers=2", "runtime.plan=colocate",
                     "runtime.timeout_s=4", *extra)) == 1
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert needle in err
    assert elapsed < 60  # start-up included; without the limit the run would never end


def test_a_hang_in_process_ends_the_run_after_the_timeout_naming_the_call(debug_model, addition_data, tmp_path):
    env = {**os.environ, "REFLOW_FAILPOINT": "call.actor_train.r0.s1=hang", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "reflow.cli",
                        *args(debug_model, addition_data, tmp_path / "run", "runtime.timeout_s=3")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 1
    assert "reflow: error: hang: call 'actor_train' of step 1 has run for 3 s (runtime.timeout_s)" in p.stderr
    assert "failpoint" in p.stderr  # the stacks show where it hangs


# ---------------------------------------------------------------------------------------------- non-finite


def _engine(model_dir, on_nonfinite):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return TrainEngine(model, lr=1e-2, warmup_steps=0, total_steps=10, on_nonfinite=on_nonfinite)


def _batch():
    from reflow.data.batch import SampleBatch

    return SampleBatch.from_sequences([0, 1], {"input_ids": [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]})


def _loss(value):
    def loss_fn(model, mb, norm):
        out = model(input_ids=mb.tokens["input_ids"][None]).logits.sum() * 0 + value
        return out, {}
    return loss_fn


def test_a_nan_loss_skips_the_update_weights_optimizer_and_schedule_untouched(debug_model):
    engine = _engine(debug_model, "skip")
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    stats = engine.step(_batch(), _loss(float("nan")))
    assert stats["nonfinite_skipped"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())
    assert engine.optimizer.state == {} and engine.scheduler.last_epoch == 0
    assert all(p.grad is None for p in engine.model.parameters())
    stats = engine.step(_batch(), _loss(1.0))  # a finite step afterwards trains as usual
    assert stats["nonfinite_skipped"] == 0.0 and engine.scheduler.last_epoch == 1


def test_on_nonfinite_stop_raises_and_leaves_the_weights(debug_model):
    engine = _engine(debug_model, "stop")
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    with pytest.raises(NonFiniteError, match="non-finite loss=inf"):
        engine.step(_batch(), _loss(float("inf")))
    assert all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())


def overflowing_reward_file(tmp_path):
    """A reward finite as a Python float but beyond float32 for sample 0: an inf score -> NaN advantages of its group."""
    p = tmp_path / "overflow.py"
    p.write_text("def reward(prompts, responses, answers):\n"
                 "    return [1e39 if i == 0 else float(len(r)) for i, r in enumerate(responses)]\n")
    return p


def test_a_run_with_on_nonfinite_stop_names_the_step_call_and_samples(debug_model, addition_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(debug_model, addition_data, out, f"reward.fn={overflowing_reward_file(tmp_path)}:reward",
                     "trainer.on_nonfinite=stop")) == 1
    err = capsys.readouterr().err.strip()
    assert "step 0, call 'actor_train': non-finite" in err
    assert "samples with non-finite values: 0 (advantages, returns, score), 1 (advantages, returns)" in err


def test_a_run_with_on_nonfinite_skip_counts_skipped_updates_and_finishes(debug_model, addition_data, tmp_path):
    out = tmp_path / "run"
    assert main(args(debug_model, addition_data, out, f"reward.fn={overflowing_reward_file(tmp_path)}:reward",
                     "trainer.steps=2", "trainer.on_nonfinite=skip")) == 0
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["actor/nonfinite_skipped"] for r in steps] == [1.0, 1.0]
    from transformers import AutoModelForCausalLM

    start, final = (AutoModelForCausalLM.from_pretrained(p) for p in (debug_model, out / "final"))
    for a, b in zip(start.state_dict().values(), final.state_dict().values()):
        assert torch.equal(a, b)  # no update reached the weights
