"""Ray clusters beyond the embedded one: a run joins a cluster started with `ray start --head` by its address,
and a plan whose meshes lie on two Ray nodes (weights reallocated between the nodes every step) gives the
numbers of the same run in one process.

Each cluster lives in subprocesses of its own (a `ray start --head --block` process; a driver script written
to tmp_path), in its own temp dir and on free ports, so this process's Ray session (the `ray_session`
fixture of other tests, if any) and other Ray sessions on the machine are never touched; the head is stopped
by signalling the process this test started, never with `ray stop` (which stops every Ray on the machine).
"""

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("ray")

from reflow.config.loader import from_dict, save_config  # noqa: E402
from reflow.config.schema import RLConfig  # noqa: E402
from reflow.experiments.rl import RLExperiment  # noqa: E402
from reflow.runtime.plan import Plan  # noqa: E402
from reflow.utils.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAY_CLI = Path(sys.executable).with_name("ray")
REWARDS = Path(__file__).parent / "varied_reward.py"
COMPARED = ("loss", "grad_norm", "reward/mean", "actor/kl")
TIMEOUT_S = 240

# A driver joining the head by address, as `reflow train CONFIG key=value ...` does (load_config + RLExperiment);
# it reports which GCS it talked to and the Ray node of each rank.
JOIN = """
import json, sys
import ray
from reflow.config.loader import load_config
from reflow.config.schema import RLConfig
from reflow.experiments.rl import RLExperiment

with RLExperiment(load_config(RLConfig, sys.argv[1], sys.argv[2:])) as exp:
    exp.run()
    out = {"gcs": ray.get_runtime_context().gcs_address, "nodes": exp.executor.nodes,
           "cluster": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
print("RESULT " + json.dumps(out), flush=True)
"""

# Ray's multi-node test cluster: two nodes of one CPU each, so the two one-CPU bundles of the run's placement
# group cannot share a node.
TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from reflow.config.loader import load_config
from reflow.config.schema import RLConfig
from reflow.experiments.rl import RLExperiment

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "dashboard_agent_listen_port": int(sys.argv[1])})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    with RLExperiment(load_config(RLConfig, sys.argv[2], sys.argv[3:])) as exp:
        exp.run()
        out = {"nodes": exp.executor.nodes, "cluster": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
               "history": exp.history}
    print("RESULT " + json.dumps(out), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rl_config(out, model, data) -> RLConfig:
    """A 2-step GRPO run in this process (runtime.workers=0); the cluster runs override runtime.* and output_dir."""
    role = {"path": str(model), "micro_batch_tokens": 64, "optim": {"lr": 1e-3}}
    return from_dict(RLConfig, {
        "output_dir": str(out), "actor": role, "critic": {**role, "path": None},
        "data": {"train": str(data / "train.jsonl"), "eval": None},
        "rollout": {"prompts_per_step": 4, "n": 2, "max_new_tokens": 4},
        "reward": {"fn": f"{REWARDS}:varied"}, "algo": {"name": "grpo", "kl_coef": 0.01},
        "trainer": {"steps": 2, "progress": False, "eval_every": 0, "save_every": 0},
        "runtime": {"workers": 0, "plan": "colocate", "timeout_s": 60}})


def in_process(cfg) -> list[dict]:
    with RLExperiment(cfg) as exp:
        exp.run()
        return exp.history


def assert_same_numbers(local: list[dict], cluster: list[dict]) -> None:
    assert len(local) == len(cluster) == 2
    for step, (x, y) in enumerate(zip(local, cluster)):
        x = {k: v for k, v in x.items() if v is not None and any(c in k for c in COMPARED)}
        y = {k: v for k, v in y.items() if v is not None and any(c in k for c in COMPARED)}
        assert x.keys() == y.keys() and {"actor/loss", "actor/grad_norm", "reward/mean", "actor/kl"} <= x.keys(), \
            (step, sorted(x), sorted(y))
        for k in x:  # (abs_tol: GRPO's policy loss is a sum of zero-mean advantages, ~1e-8 of fp32 rounding)
            assert math.isclose(x[k], y[k], rel_tol=1e-5, abs_tol=1e-7), (step, k, x[k], y[k])
    assert local[-1]["actor/kl"] > 1e-6 and local[0]["actor/grad_norm"] > 0.1  # the steps really trained


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_script(path: Path, args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a driver script in a session of its own (on timeout the whole session is killed: a Ray cluster the
    script started goes with it) -> the finished process and the JSON of its `RESULT ` line."""
    p = subprocess.Popen([sys.executable, str(path), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{path.name} ran past {TIMEOUT_S} s:\n{out[-6000:]}")
    finally:
        try:  # anything of the script's session still alive (only that session)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done = subprocess.CompletedProcess(p.args, p.returncode, out, None)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return done, (json.loads(lines[-1][len("RESULT "):]) if lines else None)


@contextmanager
def ray_head(port: int, env: dict):
    """`ray start --head --block` on `port` in a temp dir of its own; stopped on exit by SIGTERM to that process
    (Ray then stops the head's GCS, raylet and workers), SIGKILL to its session if it does not stop."""
    temp = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    log = Path(temp) / "head.log"
    cmd = [str(RAY_CLI), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
           "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=200000000",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}"]
    with log.open("w") as f:
        head = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"`ray start --head` exited with {head.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"`ray start --head` not up after 90 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield log
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_run_joins_a_running_cluster_by_address(tmp_path, debug_model, addition_data):
    if not RAY_CLI.is_file():
        pytest.skip(f"no `ray` command next to this interpreter ({RAY_CLI}): cannot start a head with `ray start`")
    cfg = rl_config(tmp_path / "local", debug_model, addition_data)
    local = in_process(cfg)
    save_config(cfg, tmp_path / "grpo.yaml")
    (tmp_path / "join.py").write_text(JOIN)
    out, port = tmp_path / "cluster", free_port()
    # `ray start --head` enables Ray's token authentication when a token exists (~/.ray/auth_token: any machine
    # that ever ran ray.init has one). The head gets a token of its own here (so ~/.ray is neither read nor
    # needed); the driver gets the token but not RAY_AUTH_MODE: reflow must switch token mode on itself.
    token = secrets.token_hex(32)
    with ray_head(port, child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)) as head_log:
        done, result = run_script(tmp_path / "join.py", [str(tmp_path / "grpo.yaml"), f"output_dir={out}",
                                                         "runtime.workers=2", "runtime.plan=separate",
                                                         f"runtime.ray_address=127.0.0.1:{port}"],
                                  child_env(RAY_AUTH_TOKEN=token))
        assert done.returncode == 0 and result, f"{done.stdout[-6000:]}\n--- head:\n{head_log.read_text()[-2000:]}"
    assert result["gcs"].endswith(f":{port}")  # it talked to the head started here, not to a Ray of its own
    assert len(result["cluster"]) == 1 and result["nodes"] == result["cluster"] * 2
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "final" / "config.json").is_file() and list((out / "final").glob("*.safetensors"))
    assert_same_numbers(local, rows)


def test_a_plan_spread_over_two_nodes_gives_the_one_node_numbers(tmp_path, debug_model, addition_data):
    cfg = rl_config(tmp_path / "local", debug_model, addition_data)
    local = in_process(cfg)
    save_config(cfg, tmp_path / "grpo.yaml")
    # the actor trains on rank 0 and generates on rank 1: its weights go from one node to the other every step
    plan = {"actor_train": ("0", "d1t1p1"), "ref_inf": ("0", "d1t1p1"), "actor_gen": ("1", "d1t1p1"),
            "reward": ("1", "d1t1p1")}
    Plan.from_dict({"calls": {c: {"ranks": r, "layout": lay} for c, (r, lay) in plan.items()}}, 2).save(
        tmp_path / "plan.yaml")
    (tmp_path / "two_nodes.py").write_text(TWO_NODES)
    out = tmp_path / "cluster"
    done, result = run_script(tmp_path / "two_nodes.py",
                              [str(free_port()), str(tmp_path / "grpo.yaml"), f"output_dir={out}", "runtime.workers=2",
                               f"runtime.plan={tmp_path / 'plan.yaml'}", "runtime.timeline=true"],
                              child_env(RAY_AUTH_MODE="disabled"))
    assert done.returncode == 0 and result, done.stdout[-6000:]
    assert len(result["cluster"]) == 2
    assert len(set(result["nodes"])) == 2 and set(result["nodes"]) == set(result["cluster"]), result
    trace = json.loads((out / "timeline.json").read_text())["traceEvents"]
    assert {(e["name"], e["tid"]) for e in trace if e["ph"] == "X"} >= {("actor_gen:reallocate", 1), ("actor_train", 0)}
    assert_same_numbers(local, result["history"])
