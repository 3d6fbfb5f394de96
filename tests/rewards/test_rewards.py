import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from reflow.rewards.registry import BUILTIN, RewardError, compute_rewards, correct, correct_at, load_reward_fn, reward_range
from reflow.rewards.rules import exact_match, exact_match_with_format, final_number, format_reward

P = ["1+1=", "2+2=", "3+3=", "4+4="]


def test_exact_match():
    assert exact_match(P, ["2", " 4\n", "7", "8 apples"], ["2", "4", "6", "8"]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'answer' column"):
        exact_match(P[:2], ["2", "4"], ["2", None])


def test_format_reward():
    got = format_reward(P, ["42", "abc\n", "-3", "4 2", "", "4.2"], [None] * 6)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_match_with_format():
    got = exact_match_with_format(P[:3], ["2", "5", "the answer is 6"], ["2", "4", "6"])
    assert got == [1.0, 0.1, 0.0]


def test_reward_ranges():
    for fn in (exact_match, format_reward, exact_match_with_format):
        assert reward_range(fn) == (0.0, 1.0)
    assert reward_range(lambda prompts, responses, answers: []) is None


def test_load_builtin():
    assert load_reward_fn("exact_match") is exact_match
    assert load_reward_fn("format") is format_reward
    assert set(BUILTIN) == {"exact_match", "format", "exact_match_with_format", "digit_match", "final_number",
                            "code_exec"}


MODULE = textwrap.dedent("""
    def length_reward(prompts, responses, answers):
        return [float(len(r)) for r in responses]
    length_reward.reward_range = (0, 100)

    def explode(prompts, responses, answers):
        raise ValueError("boom")

    def nan_reward(prompts, responses, answers):
        return [0.0, float("nan")]

    def short(prompts, responses, answers):
        return [1.0]

    def strings(prompts, responses, answers):
        return [1.0, "1.0"]

    def scalar(prompts, responses, answers):
        return 1.0

    def bad_signature(responses):
        return []

    NOT_A_FUNCTION = 3
""")


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards_mod.py"
    path.write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("my_rewards_mod", None)


def test_load_module_function(reward_module):
    fn = load_reward_fn("my_rewards_mod:length_reward")
    assert compute_rewards(fn, ["p", "q"], ["ab", "c"], [None, None]) == [2.0, 1.0]
    assert reward_range(fn) == (0.0, 100.0)


def test_load_file_path(reward_module):
    fn = load_reward_fn(f"{reward_module}:length_reward")
    assert compute_rewards(fn, ["p"], ["abc"], [None]) == [3.0]


def test_bad_specs(reward_module, tmp_path):
    with pytest.raises(RewardError, match="unknown reward 'exact'.*builtin"):
        load_reward_fn("exact")
    with pytest.raises(RewardError, match="could not import module 'no_such_mod_xyz'.*PYTHONPATH"):
        load_reward_fn("no_such_mod_xyz:fn")
    with pytest.raises(RewardError, match="has no attribute 'missing'.*length_reward"):
        load_reward_fn("my_rewards_mod:missing")
    with pytest.raises(RewardError, match="'NOT_A_FUNCTION' is not a function \\(type int\\)"):
        load_reward_fn("my_rewards_mod:NOT_A_FUNCTION")
    with pytest.raises(RewardError, match="must accept keyword arguments"):
        load_reward_fn("my_rewards_mod:bad_signature")
    with pytest.raises(RewardError, match="file .*nope.py not found"):
        load_reward_fn(f"{tmp_path}/nope.py:fn")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad import')\n")
    with pytest.raises(RewardError, match="raised RuntimeError: bad import"):
        load_reward_fn(f"{broken}:fn")


def test_raising_reward_is_wrapped(reward_module):
    fn = load_reward_fn("my_rewards_mod:explode")
    with pytest.raises(RewardError) as err:
        compute_rewards(fn, ["1+1=", "2+2="], ["2", "4"], ["2", "4"])
    msg = str(err.value)
    assert "'my_rewards_mod:explode' raised ValueError: boom" in msg
    assert "batch of 2 samples" in msg and "'1+1='" in msg
    assert isinstance(err.value.__cause__, ValueError)


def test_builtin_error_surfaces_through_compute(reward_module):
    with pytest.raises(RewardError, match="'exact_match' raised ValueError: .*'answer' column"):
        compute_rewards(exact_match, ["a"], ["b"], [None])


@pytest.mark.parametrize("name, pattern", [
    ("short", "returned 1 rewards for 2 responses"),
    ("nan_reward", "returned nan at index 1"),
    ("strings", "returned '1.0' at index 1"),
    ("scalar", "returned a float; it must return a list of 2 floats"),
])
def test_bad_results(reward_module, name, pattern):
    fn = load_reward_fn(f"my_rewards_mod:{name}")
    with pytest.raises(RewardError, match=pattern) as err:
        compute_rewards(fn, ["a", "b"], ["x", "y"], [None, None])
    assert f"my_rewards_mod:{name}" in str(err.value)


def test_accepts_arrays_tensors_and_bools():
    def as_numpy(prompts, responses, answers):
        return np.array([0.5, 1.0], dtype=np.float32)

    def as_tensor(prompts, responses, answers):
        return torch.tensor([1.0, -1.0], requires_grad=True)

    def as_bools(prompts, responses, answers):
        return [True, False]

    args = (["a", "b"], ["x", "y"], [None, None])
    assert compute_rewards(as_numpy, *args) == [0.5, 1.0]
    assert compute_rewards(as_tensor, *args) == [1.0, -1.0]
    assert compute_rewards(as_bools, *args) == [1.0, 0.0]

    def as_matrix(prompts, responses, answers):
        return torch.zeros(2, 1)

    with pytest.raises(RewardError, match="Tensor of shape"):
        compute_rewards(as_matrix, *args)

    def infinite(prompts, responses, answers):
        return [math.inf, 0.0]

    with pytest.raises(RewardError, match="index 0"):
        compute_rewards(infinite, *args)


def test_digit_match_gives_graded_credit_aligned_at_the_units_digit():
    from reflow.rewards.registry import load_reward_fn

    fn = load_reward_fn("digit_match")
    responses = ["124", "134", "24", "1240", "", " 124 "]
    assert fn([""] * 6, responses, ["124"] * 6) == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0, 0.0, 1.0])
    assert fn.reward_range == (0.0, 1.0)


def test_correct_at_is_the_declared_threshold_else_the_reward_range_maximum_else_none(caplog):
    def declared(prompts, responses, answers):
        return [0.0] * len(responses)

    declared.reward_range, declared.correct_at = (0.0, 1.0), 0.5
    assert correct_at(declared) == 0.5
    assert correct(declared, [0.1, 0.5, 1.0]) == [False, True, True]
    assert correct_at(exact_match_with_format) == 1.0  # its 0.1 format bonus is not a correct answer
    assert correct(exact_match_with_format, [0.1, 1.0, 0.0]) == [False, True, False]

    def plain(prompts, responses, answers):
        return [0.0] * len(responses)

    with caplog.at_level("WARNING", logger="reflow"):
        assert correct(plain, [1.0]) is None and correct(plain, [1.0]) is None
    assert len([r for r in caplog.records if "correct_at" in r.getMessage()]) == 1  # warned once per function

    plain.correct_at = "1"
    with pytest.raises(RewardError, match="correct_at='1'; set it to a finite number"):
        correct_at(plain)


def test_final_number_scores_the_last_number_written_against_the_answer():
    responses = ["11", "2 + 9 = 11", "The answer is 11.", " 11\n", "11 or 12", "2 + 9 = 11, so 2 + 9", "eleven",
                 "11.5", "1,1", "-11", "", "011"]
    assert final_number([""] * 12, responses, ["11"] * 12) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                                              0.0, 0.0]
    assert final_number(["", ""], ["5 - 8 = -3", "x = 1,000"], ["-3", "1,000"]) == [1.0, 1.0]
    assert load_reward_fn("final_number") is final_number and correct_at(final_number) == 1.0
