"""Sandboxed reward functions: hostile functions cost only their own samples, good samples keep exact rewards."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from reflow.config.loader import ConfigError
from reflow.config.schema import RewardConfig
from reflow.rewards.code_exec import code_exec, extract_program, answer_tests
from reflow.rewards.registry import RewardError, compute_rewards, correct_at, load_reward_fn
from reflow.rewards.sandbox import PID_MAX, RewardSandbox, open_reward, wants_sandbox

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux namespaces and rlimits")

TIMEOUT = 1.0
ON_ERROR = -1.0

HOSTILE = '''
import ctypes, os, socket, time

def reward(prompts, responses, answers):
    out = []
    for p, r in zip(prompts, responses):
        if r == "loop":
            while True:
                pass
        if r == "alloc":
            block = bytearray(10 * 2**30)
        if r == "forkbomb":
            # bounded: 400 children that sleep 30 s, harmless even if nothing contained them
            for _ in range(400):
                if os.fork() == 0:
                    ctypes.CDLL(None).prctl(15, b"reflowbomb", 0, 0, 0)  # PR_SET_NAME, to find strays
                    time.sleep(30)
                    os._exit(0)
        if r == "socket":
            socket.create_connection(("127.0.0.1", int(p)), timeout=1).close()
        if r == "write":
            with open(p, "w") as f:
                f.write("escaped")
        if r == "exit":
            os._exit(3)
        if r == "segfault":
            ctypes.string_at(0)
        if r == "private":  # its own folder is writable, and is cwd, HOME and TMPDIR
            with open("here.txt", "w") as f:
                f.write("x")
            assert os.getcwd() == os.environ["HOME"] == os.environ["TMPDIR"]
        out.append(len(r) / 7)
    return out

reward.reward_range = (0.0, 10.0)
reward.correct_at = 0.5
'''


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "hostile.py"
    path.write_text(HOSTILE)
    return f"{path}:reward"


@pytest.fixture(scope="module")
def sandbox(spec):
    with RewardSandbox(spec, timeout_s=TIMEOUT, on_error=ON_ERROR, workers=2) as sb:
        sb.score(["p"], ["warm"], [None])  # the first batch, whose all-fail rule the hostile tests do not want
        yield sb


def bomb_processes() -> list[int]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "reflowbomb":
                found.append(int(comm.parent.name))
        except OSError:
            pass
    return found


def test_a_well_behaved_function_gives_exactly_the_in_process_rewards(spec, sandbox):
    responses = [f"r{'x' * i}" for i in range(11)]
    prompts, answers = [f"p{i}" for i in range(11)], [None, "a"] * 5 + [None]
    expected = compute_rewards(load_reward_fn(spec), prompts, responses, answers)
    assert sandbox.score(prompts, responses, answers) == (expected, 0)
    assert sandbox(prompts=prompts, responses=responses, answers=answers) == expected
    assert sandbox.reward_range == (0.0, 10.0)
    assert correct_at(sandbox) == 0.5  # the function's declaration crosses the sandbox, not reward_range's max


def test_the_spec_is_imported_only_in_the_sandbox_not_in_this_process(tmp_path):
    path = tmp_path / "only_inside.py"
    path.write_text("def reward(prompts, responses, answers):\n    return [1.0] * len(responses)\n")
    with RewardSandbox(f"{path}:reward", timeout_s=TIMEOUT, workers=1) as sb:
        assert sb.score(["p"], ["r"], [None]) == ([1.0], 0)
    assert not [m for m in sys.modules if m.startswith("reflow_user_reward_only_inside")]


def test_the_function_runs_with_its_private_folder_as_cwd_home_and_tmpdir(sandbox):
    assert sandbox.score(["p"], ["private"], [None]) == ([7 / 7], 0)


@pytest.mark.parametrize("bad", ["loop", "alloc", "forkbomb", "socket", "write", "exit", "segfault"])
def test_a_hostile_sample_gets_on_error_and_the_good_samples_of_its_batch_keep_their_rewards(sandbox, bad, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outside = tmp_path / "outside.txt"
    prompt = {"socket": str(port), "write": str(outside)}.get(bad, "p")
    responses = ["ok", bad, "good", "fine"]
    t0 = time.monotonic()
    rewards, errors = sandbox.score(["p", prompt, "p", "p"], responses, [None] * 4)
    took = time.monotonic() - t0
    assert rewards == [2 / 7, ON_ERROR, 4 / 7, 4 / 7] and errors == 1
    # a failed chunk costs at most one time limit, then its samples are retried alone (one more)
    assert took < 2 * TIMEOUT + 1.5
    listener.settimeout(0.01)
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing got through
    listener.close()
    if bad == "write":
        assert not outside.exists() or not sandbox.isolation["filesystem"]
    if bad == "forkbomb":
        strays = bomb_processes()
        for pid in strays:  # never leave them behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        assert strays == []


def test_a_fork_bomb_stops_at_the_pid_namespace_limit(tmp_path):
    path = tmp_path / "count.py"
    path.write_text("import os, time\n"
                    "def reward(prompts, responses, answers):\n"
                    "    n = 0\n"
                    "    try:\n"
                    "        for _ in range(400):\n"
                    "            if os.fork() == 0:\n"
                    "                time.sleep(30)\n"
                    "                os._exit(0)\n"
                    "            n += 1\n"
                    "    except OSError:\n"
                    "        pass\n"
                    "    return [float(n)]\n")
    with RewardSandbox(f"{path}:reward", timeout_s=2.0, workers=1) as sb:
        if not sb.isolation["processes"]:
            pytest.skip("no PID namespace here")
        (forked,), errors = sb.score(["p"], ["r"], [None])
    assert errors == 0 and forked < PID_MAX  # the call itself is PID 1, its children take the rest


def test_every_sample_of_the_first_batch_raising_the_same_exception_is_a_reward_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def reward(prompts, responses, answers):\n    raise KeyError('label')\n")
    with RewardSandbox(f"{path}:reward", timeout_s=TIMEOUT, workers=2) as sb:
        with pytest.raises(RewardError, match="raised KeyError: 'label'"):
            sb.score(["a", "b", "c"], ["x", "y", "z"], [None] * 3)


def test_a_wrong_count_is_a_reward_error_at_once_never_retried_per_sample(tmp_path):
    path = tmp_path / "count.py"
    path.write_text("def reward(prompts, responses, answers):\n    return [1.0, 2.0]\n")
    with RewardSandbox(f"{path}:reward", timeout_s=TIMEOUT, workers=1) as sb:
        with pytest.raises(RewardError, match="returned 2 rewards for 3 responses"):
            sb.score(["a", "b", "c"], ["x", "y", "z"], [None] * 3)


def test_a_non_finite_reward_for_one_sample_costs_only_that_sample(tmp_path):
    path = tmp_path / "nan.py"
    path.write_text("def reward(prompts, responses, answers):\n"
                    "    return [float('nan') if r == 'bad' else 1.0 for r in responses]\n")
    with RewardSandbox(f"{path}:reward", timeout_s=TIMEOUT, on_error=-2.0, workers=2) as sb:
        assert sb.score(["p"] * 4, ["a", "bad", "c", "d"], [None] * 4) == ([1.0, -2.0, 1.0, 1.0], 1)


def test_a_wrong_signature_fails_at_startup_with_the_in_process_message(tmp_path):
    path = tmp_path / "sig.py"
    path.write_text("def reward(responses):\n    return [0.0] * len(responses)\n")
    with pytest.raises(RewardError) as in_process:
        load_reward_fn(f"{path}:reward")
    with pytest.raises(RewardError) as sandboxed:
        RewardSandbox(f"{path}:reward", timeout_s=TIMEOUT, workers=1)
    assert str(sandboxed.value) == str(in_process.value)


def test_the_start_up_probe_warns_on_a_timeout_and_raises_on_a_wrong_count(tmp_path, caplog):
    hang = tmp_path / "hang.py"
    hang.write_text("def reward(prompts, responses, answers):\n    while True:\n        pass\n")
    with RewardSandbox(f"{hang}:reward", timeout_s=0.5, workers=1) as sb:
        sb.probe("p", "r", None)  # one sample that hangs says nothing about the others: the run goes on
    assert "did not return within reward.timeout_s=0.5 s" in caplog.text
    count = tmp_path / "count.py"
    count.write_text("def reward(prompts, responses, answers):\n    return []\n")
    with RewardSandbox(f"{count}:reward", timeout_s=2, workers=1) as sb:
        with pytest.raises(RewardError, match="returned 0 rewards for 1 responses"):
            sb.probe("p", "r", None)


def test_process_rewards_are_sandboxed_and_a_failed_sample_gets_zero_at_every_step(tmp_path):
    path = tmp_path / "prm.py"
    path.write_text("import os\n"
                    "def prm(prompts, responses, steps):\n"
                    "    if 'crash' in responses:\n"
                    "        os._exit(1)\n"
                    "    return [[0.5] * len(s) for s in steps]\n")
    with RewardSandbox(f"{path}:prm", kind="process", timeout_s=TIMEOUT, workers=2) as sb:
        scores, errors = sb.score_steps(["p"] * 3, ["a", "crash", "c"], [["s1"], ["s1", "s2"], ["s1", "s2", "s3"]])
    assert scores == [[0.5], [0.0, 0.0], [0.5, 0.5, 0.5]] and errors == 1


# --------------------------------------------------------------------------- config


def test_the_sandbox_is_on_by_default_for_user_code_and_code_exec_and_off_for_other_builtins():
    assert wants_sandbox("rewards.py:fn", None) and wants_sandbox("pkg.mod:fn", None)
    assert wants_sandbox("code_exec", None)
    assert not wants_sandbox("exact_match", None)
    assert wants_sandbox("exact_match", True) and not wants_sandbox("rewards.py:fn", False)


def test_open_reward_loads_a_builtin_in_process_unless_asked_to_sandbox_it():
    assert open_reward(RewardConfig(fn="exact_match")) is load_reward_fn("exact_match")
    with open_reward(RewardConfig(fn="exact_match", sandbox=True, workers=1)) as sb:
        assert sb.score(["p", "q"], ["1", "2"], ["1", "3"]) == ([1.0, 0.0], 0)


@pytest.mark.parametrize("key,value", [("timeout_s", 0.0), ("on_error", float("nan")), ("memory_mb", 10),
                                       ("cpu_s", -1.0), ("workers", 0)])
def test_a_bad_sandbox_setting_is_a_one_line_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"reward.{key}") as e:
        RewardConfig(**{key: value}).validate()
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- code_exec


def test_code_exec_takes_the_last_python_block_or_the_whole_response():
    text = "first\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n```\nnot python\n```"
    assert extract_program(text) == "x = 2\n"
    assert extract_program("x = 3") == "x = 3"


def test_code_exec_tests_are_python_source_or_a_json_list_of_asserts():
    assert answer_tests("assert f(1) == 2") == "assert f(1) == 2"
    assert answer_tests(json.dumps(["assert f(1) == 2", "assert f(2) == 3"])) == "assert f(1) == 2\nassert f(2) == 3"
    assert answer_tests(None) == ""


CODE_CASES = [  # (response, tests, reward)
    ("```python\ndef f(x):\n    return x + 1\n```", "assert f(1) == 2", 1.0),
    ("def f(x):\n    return x + 1", json.dumps(["assert f(1) == 2", "assert f(5) == 6"]), 1.0),
    ("```python\ndef f(x):\n    return x\n```", "assert f(1) == 2", 0.0),  # a failing test
    ("```python\ndef f(x) return\n```", "assert f(1) == 2", 0.0),  # a syntax error
    ("```python\nwhile True:\n    pass\n```", None, 0.0),  # stopped at its time limit
    ("```python\nimport sys\nsys.exit(0)\n```", "assert False", 1.0),  # exit 0 before the tests: status 0
]


def test_code_exec_rewards_one_exactly_when_the_program_and_tests_exit_zero_in_time(monkeypatch):
    monkeypatch.setenv("REFLOW_REWARD_TIMEOUT_S", "1.5")
    responses, answers, expected = zip(*CODE_CASES)
    assert code_exec(["p"] * len(CODE_CASES), list(responses), list(answers)) == list(expected)


def test_code_exec_in_the_sandbox_gives_the_same_rewards_one_sample_per_call():
    responses, answers, expected = zip(*CODE_CASES)
    with RewardSandbox("code_exec", timeout_s=2.0, workers=2) as sb:
        assert sb.score(["p"] * len(CODE_CASES), list(responses), list(answers)) == (list(expected), 0)
        if sb.isolation["network"]:
            listener = socket.create_server(("127.0.0.1", 0))
            program = f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}))"
            assert sb.score(["p"], [program], [None]) == ([0.0], 0)
            listener.close()


def test_a_batch_that_hangs_everywhere_ends_within_its_budget_with_every_sample_at_on_error(tmp_path):
    path = tmp_path / "hang.py"
    path.write_text("def reward(prompts, responses, answers):\n    while True:\n        pass\n")
    with RewardSandbox(f"{path}:reward", timeout_s=0.5, on_error=-1.0, workers=1, budget_s=3.0) as sb:
        t0 = time.monotonic()
        rewards, errors = sb.score(["p"] * 8, [f"r{i}" for i in range(8)], [None] * 8)
        elapsed = time.monotonic() - t0
    assert rewards == [-1.0] * 8 and errors == 8
    assert elapsed < 3.0  # without the budget: the chunk, then 8 retries of 0.5 s each
