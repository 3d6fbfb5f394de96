"""The built-in environments (calculator, Python tool) and loading `rollout.env`."""

import pytest

from reflow.envs import EnvError, load_env
from reflow.envs.calculator import CalculatorEnv, evaluate
from reflow.envs.python_tool import PythonEnv, run_python


def test_calculator_answers_calc_and_rewards_a_correct_answer_only():
    env = CalculatorEnv()
    assert env.reset({"prompt": "12*34=", "answer": "408"}) is None
    assert env.step("CALC 12*34") == ("=408\n", 0.0, False)
    assert env.step(" CALC (7+5)/4 ") == ("=3\n", 0.0, False)
    assert env.step("CALC 1/3") == ("=0.333333\n", 0.0, False)
    assert env.step("CALC __import__('os')") == ("=error\n", 0.0, False)
    assert env.step("CALC 2**1000") == ("=error\n", 0.0, False)  # bounded: a message cannot stall the trainer
    assert env.step("CALC 1/0") == ("=error\n", 0.0, False)
    assert env.step("hello") == ("?\n", 0.0, False)
    assert env.step("ANSWER 407") == ("", 0.0, True)
    assert env.step("ANSWER 408") == ("", 1.0, True)


def test_calculator_evaluates_arithmetic_and_refuses_anything_else():
    assert evaluate("-3 + 4*(2 - 7) // 3 % 5") == -3 + 4 * (2 - 7) // 3 % 5
    for bad in ("x + 1", "len('a')", "2 ** 65", "10**99 * 10**10", "[1]"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_python_tool_returns_the_programs_output_and_stops_a_program_at_its_timeout():
    env = PythonEnv()
    env.reset({"prompt": "?", "answer": "6"})
    assert env.step("RUN print(2 * 3)") == ("6\n", 0.0, False)
    assert env.step("```python\nimport sys\nprint('x', file=sys.stderr)\n```") == ("x\n", 0.0, False)
    assert env.step("ANSWER 6") == ("", 1.0, True)
    assert "ZeroDivisionError" in run_python("1/0")
    assert run_python("while True: pass", timeout_s=0.5) == "timeout\n"
    assert run_python("print('a' * 2000)", max_output=10) == "a" * 10 + "...\n"


def test_load_env_finds_builtins_files_and_refuses_what_is_not_an_env(tmp_path):
    assert load_env("calculator") is CalculatorEnv and load_env("python") is PythonEnv
    f = tmp_path / "my_env.py"
    f.write_text("class Good:\n    def reset(self, row): return None\n    def step(self, m): return '', 0.0, True\n"
                 "class NoStep:\n    def reset(self, row): return None\n"
                 "def function(): pass\n")
    assert load_env(f"{f}:Good").__name__ == "Good"
    with pytest.raises(EnvError, match=r"rollout.env '.*:NoStep' lacks step; it must be a class"):
        load_env(f"{f}:NoStep")
    with pytest.raises(EnvError, match=r"lacks reset and step"):
        load_env(f"{f}:function")
    with pytest.raises(EnvError, match=r"rollout.env 'calculater' names no function.*built-ins: calculator, python"):
        load_env("calculater")
    with pytest.raises(EnvError, match=r"has no attribute 'Missing'"):
        load_env(f"{f}:Missing")
