"""The Ray runtime: the same numbers under any plan (one worker vs several, reallocation, pipeline, disjoint
meshes), and failures that end the run with the worker's error instead of a hang."""

import json
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from reflow.config.loader import from_dict  # noqa: E402
from reflow.config.schema import RLConfig  # noqa: E402
from reflow.experiments.rl import RLExperiment  # noqa: E402
from reflow.rewards.registry import RewardError  # noqa: E402
from reflow.runtime.transport import WorkerFailed  # noqa: E402

REWARDS = Path(__file__).parent / "varied_reward.py"
PLANS = {
    # reward and reference on disjoint single-rank meshes (concurrent); the actor trains d2t1p1 (FSDP2) on
    # 0-1 and generates d1t2p1 (tensor parallel) on 2-3: a reallocation across meshes every step
    "disjoint": {"actor_gen": ("2-3", "d1t2p1"), "reward": ("0", "d1t1p1"), "ref_inf": ("1", "d1t1p1"),
                 "actor_train": ("0-1", "d2t1p1")},
    # pipeline + data parallel training, four generation replicas, a pipelined reference
    "pipeline": {"actor_gen": ("0-3", "d4t1p1"), "reward": ("2-3", "d2t1p1"), "ref_inf": ("0-1", "d1t1p2"),
                 "actor_train": ("0-3", "d2t1p2")},
    # four generation replicas whose long tail moves onto one (fusion.migrate_below), the others going on to
    # reward (rank 0) and reference (rank 1) chunks
    "migrate": {"actor_gen": ("0-3", "d4t1p1"), "reward": ("0", "d1t1p1"), "ref_inf": ("1", "d1t1p1"),
                "actor_train": ("0-3", "d4t1p1")},
}


def config(tmp_path, model, data, algo="grpo", workers=1, plan="colocate", reward="varied", fusion=None, migrate=0.0,
           **runtime):
    if isinstance(plan, dict):
        from reflow.runtime.plan import Plan

        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "plan.yaml"
        fuse = {"fuse": plan.pop("fuse")} if "fuse" in plan else {}
        Plan.from_dict({"calls": {c: {"ranks": r, "layout": lay} for c, (r, lay) in plan.items()}, **fuse},
                       workers).save(path)
        plan = str(path)
    role = {"path": str(model), "micro_batch_tokens": 64, "optim": {"lr": 1e-3}}
    return from_dict(RLConfig, {
        "output_dir": str(tmp_path / f"run-{workers}"), "actor": role, "critic": {**role, "path": None},
        "data": {"train": str(data / "train.jsonl"), "eval": None},
        "rollout": {"prompts_per_step": 4, "n": 2, "max_new_tokens": 4},
        "reward": {"fn": f"{REWARDS}:{reward}"}, "algo": {"name": algo, "kl_coef": 0.01},
        "trainer": {"steps": 2, "progress": False},
        "runtime": {"workers": workers, "plan": plan, "timeout_s": 30, **runtime},
        "fusion": {"inter_stage": fusion is not None, "chunk": fusion or 8, "migrate_below": migrate}})


def run(cfg, resume=None) -> list[dict]:
    with RLExperiment(cfg, resume) as exp:
        exp.run()
        return exp.history


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b) == 2
    for step, (x, y) in enumerate(zip(a, b)):
        keys = {k for k in x if not k.startswith(("time", "throughput"))}
        assert keys == {k for k in y if not k.startswith(("time", "throughput"))}
        for k in keys:
            assert abs(x[k] - y[k]) <= 1e-5 + 1e-4 * abs(x[k]), (step, k, x[k], y[k])
    assert a[-1]["actor/kl"] > 1e-6 and a[0]["actor/grad_norm"] > 0.1  # the steps really trained


def test_grpo_gives_the_same_numbers_under_any_plan_fused_or_not(ray_session, tmp_path, ending_model, addition_data):
    """The in-process unfused run against: in process fused, and fused on 4 workers (disjoint: reward and ref on
    ranks that do not generate, so chunks overlap generation; pipeline: 4 generation replicas streaming to a
    pipelined reference on ranks that also generate; migrate: 4 replicas moving their long tail onto one). The
    model's responses end at different steps, so chunks come in finish order."""
    one = run(config(tmp_path / "one", ending_model, addition_data, workers=0))
    assert 0 < one[0]["truncated"] < 1  # some responses end early, others run to the budget
    # in one process the generate call has one replica: migration has nothing to move
    assert_same(one, run(config(tmp_path / "one-fused", ending_model, addition_data, workers=0, fusion=3, migrate=0.9)))
    for name, plan in PLANS.items():
        cfg = config(tmp_path / name, ending_model, addition_data, workers=4, plan=plan, timeline=True, fusion=3,
                     migrate=0.9 if name == "migrate" else 0.0)
        assert_same(one, run(cfg))
        trace = json.loads((Path(cfg.output_dir) / "timeline.json").read_text())["traceEvents"]
        chunks: dict = {}  # (call, rank, step) -> its chunks' indices
        for e in trace:
            if e["ph"] == "X" and "chunk" in e.get("args", {}):
                chunks.setdefault((e["name"], e["tid"], e["cat"]), []).append(e["args"]["chunk"])
        if name == "disjoint":  # 8 samples from one tensor-parallel replica in chunks of 3: 3 + 3 + 2
            assert {(n, r) for n, r, _ in chunks} == {("actor_gen", 2), ("reward", 0), ("ref_inf", 1)}
            assert all(sorted(k) == [0, 1, 2] for k in chunks.values())
        migrated = [e for e in trace if e["name"] == "actor_gen:migrate"]
        if name == "migrate":
            # a step's unfinished samples, once one has ended (0.9 x 8 samples), go to one replica (256 rows each);
            # which replicas take part depends on their pace, so: every sample handed over is adopted once, none
            # lost, and over the two steps some were
            sent = []
            for s in (0, 1):
                moved = [e["args"] for e in migrated if e["cat"] == f"step {s}"]
                out = sorted(i for a in moved for i in a["sent"])
                received = [a["received"] for a in moved if a["received"]]
                assert len(received) <= 1 and sorted(i for r in received for i in r) == out, moved
                assert len(set(out)) == len(out) and all(s * 8 <= i < s * 8 + 8 for i in out)  # the step's ids
                sent += out
            assert sent
        else:
            assert not migrated
        if name == "pipeline":
            pipeline = trace
    names = {e["name"] for e in pipeline if e["ph"] == "X"}
    assert {"actor_gen", "actor_gen:reallocate", "ref_inf", "actor_train"} <= names
    assert {e["tid"] for e in pipeline if e["name"] == "actor_gen"} == {0, 1, 2, 3}


# actor and critic train pipelined (d1t1p2) on both workers as one fused call (the critic's stages reversed:
# its inference is placed on the reversed ranks too, so it runs on the owner copy)
FUSED = {"actor_gen": ("0-1", "d2t1p1"), "reward": ("0", "d1t1p1"), "ref_inf": ("1", "d1t1p1"),
         "critic_inf": ([1, 0], "d1t1p2"), "actor_train": ("0-1", "d1t1p2"), "critic_train": ("0-1", "d1t1p2"),
         "fuse": ["actor_train", "critic_train"]}


def test_ppo_gives_the_same_numbers_under_builtin_plans_streamed_and_with_fused_actor_critic_training(
        ray_session, tmp_path, debug_model, addition_data):
    one = run(config(tmp_path / "one", debug_model, addition_data, algo="ppo", workers=0))
    assert_same(one, run(config(tmp_path / "one-fused", debug_model, addition_data, algo="ppo", workers=0, fusion=3)))
    # separate: each role on its own worker; colocate: every call on all 4 (actor and critic FSDP2 over 4,
    # generation and critic inference on 4 replicas reallocated from the shards every step: under inter-stage
    # fusion each chunk of critic_inf runs on the copy its first chunk built); FUSED: actor and critic training
    # as one pipelined call
    for name, plan, workers, chunk in (("separate", "separate", 4, 1), ("colocate", "colocate", 4, 1),
                                       ("fused", dict(FUSED), 2, None)):
        cfg = config(tmp_path / name, debug_model, addition_data, algo="ppo", workers=workers, plan=plan,
                     fusion=chunk, timeline=name == "fused")
        many = run(cfg)
        assert_same(one, many)
        assert "critic/loss" in many[0]
    trace = json.loads((Path(cfg.output_dir) / "timeline.json").read_text())["traceEvents"]
    names = {(e["name"], e["tid"]) for e in trace if e["ph"] == "X"}
    assert {(n, r) for n in ("actor_train", "critic_train", "actor_train+critic_train:fused") for r in (0, 1)} <= names
    assert not any(n == "critic_inf:reallocate" for n, _ in names)
    # both roles' checkpoints (the critic's written from its reversed stages) hold the one-process weights
    from safetensors.torch import load_file

    for role in ("actor", "critic"):
        a, b = (load_file(Path(c) / "checkpoints" / "step_000002" / role / "model.safetensors")
                for c in (tmp_path / "one" / "run-0", cfg.output_dir))
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


@pytest.mark.parametrize("reward,error,needle", [
    # the worker process dies mid-step (unsandboxed, the reward function runs in it)
    ("dies", WorkerFailed, "worker 0 failed in 'reward': the worker process died"),
    ("raises", RewardError, "raised ValueError: reward server unreachable"),  # a user error: its own message
])
def test_a_failing_worker_ends_the_run_with_its_error(ray_session, tmp_path, debug_model, addition_data, reward, error,
                                                      needle):
    plan = {"actor_gen": ("0-1", "d2t1p1"), "reward": ("0", "d1t1p1"), "ref_inf": ("1", "d1t1p1"),
            "actor_train": ("0-1", "d2t1p1")}
    # fused: the reward runs on chunks, and the chunk that fails ends the run with its call's error
    # (chunks of 3: `dies` kills the worker on a call with more than 2 samples)
    cfg = config(tmp_path, debug_model, addition_data, workers=2, plan=plan, reward=reward, fusion=3)
    cfg.reward.sandbox = False
    t0 = time.monotonic()
    with pytest.raises(error, match=needle):
        run(cfg)
    assert time.monotonic() - t0 < 90


def test_resume_under_another_plan_continues_exactly(ray_session, tmp_path, debug_model, addition_data):
    # four uninterrupted steps in this process (checkpoint after step 2), then resume that checkpoint under
    # a four-worker plan with other layouts (FSDP2 + pipeline owner copy) and run steps 3 and 4 again (step
    # 4's numbers depend on step 3's Adam update, so on the restored optimizer state)
    cfg = config(tmp_path, debug_model, addition_data, workers=0)
    cfg.trainer.steps, cfg.trainer.save_every = 4, 2
    whole = run(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_000002"
    assert (ckpt / "actor" / "model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    again = config(tmp_path / "resumed", debug_model, addition_data, workers=4, plan=PLANS["pipeline"])
    again.trainer.steps = 4
    with RLExperiment(again, resume=str(ckpt)) as exp:
        assert exp.step == 2
        exp.run()
        resumed = exp.history
    assert_same(whole[2:], resumed)


def test_a_users_own_graph_and_estimator_run_on_workers(ray_session, tmp_path, debug_model, addition_data):
    import importlib.util

    plugin = Path(__file__).parent / "my_algo_plugin.py"
    spec = importlib.util.spec_from_file_location("my_algo_plugin", plugin)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers in this process
    cfg = config(tmp_path, debug_model, addition_data, workers=2, plan="separate")
    cfg.algo.adv_estimator, cfg.algo.kl_coef, cfg.reward.fn = "centered_test", 0.0, f"{plugin}:reward"
    cfg.algo.graph = f"{plugin}:centered_graph"
    with RLExperiment(cfg) as exp:
        assert exp.graph.name == "centered_test" and exp.graph.order[-1] == "actor_train"
        exp.run()
        history = exp.history
    assert len(history) == 2 and history[0]["actor/grad_norm"] > 0
