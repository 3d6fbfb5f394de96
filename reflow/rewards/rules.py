"""Built-in rule-based rewards for the bundled verifiable tasks.

All rewards share the calling convention of user reward functions::

    def my_reward(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]

one float per response, in order. ``reward_range = (low, high)`` on the
function declares the possible values (used for logging and sanity checks).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _check_answers(name: str, responses: list[str], answers: list[str | None]) -> None:
    if len(answers) != len(responses):
        raise ValueError(f"{name}: got {len(responses)} responses but {len(answers)} answers")
    if any(a is None for a in answers):
        raise ValueError(f"{name} needs a reference answer for every prompt, but some are missing; "
                         "add an 'answer' column to the prompt dataset, or use a reward that does not need one")


def _is_correct(response: str, answer: str) -> bool:
    return response.strip() == answer.strip()


def _is_bare(response: str) -> bool:
    # A bare answer: one run of letters/digits (optionally negative), nothing else.
    # Surrounding whitespace is fine, since generation often ends with a newline.
    text = response.strip()
    body = text[1:] if text.startswith("-") else text
    return body.isalnum()


def exact_match(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """1.0 if the response equals the answer (ignoring surrounding whitespace), else 0.0."""
    _check_answers("exact_match", responses, answers)
    return [1.0 if _is_correct(r, a) else 0.0 for r, a in zip(responses, answers)]


def format_reward(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """1.0 if the response is a bare answer (a single run of letters/digits), else 0.0. Ignores answers."""
    return [1.0 if _is_bare(r) else 0.0 for r in responses]


def exact_match_with_format(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """1.0 if correct, 0.1 if a well-formatted but wrong bare answer, 0.0 otherwise.

    The small format bonus gives a learning signal before the model gets any answer right.
    """
    _check_answers("exact_match_with_format", responses, answers)
    return [1.0 if _is_correct(r, a) else 0.1 if _is_bare(r) else 0.0 for r, a in zip(responses, answers)]


def digit_match(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """Graded credit for numeric answers: the share of digit positions (aligned from the right, where the
    units digit is) that agree, over the longer of response and answer; 1.0 exactly when the answer is right.

        score = #{i : resp[-i] == ans[-i]} / max(len(resp), len(ans))      (after stripping whitespace)
    e.g. answer "124": "124" -> 1, "134" -> 2/3, "24" -> 2/3, "1240" -> 0, "" -> 0.
    A graded reward gives groups more than two levels, which reward shaping such as GRPOVI acts on.
    """
    _check_answers("digit_match", responses, answers)
    out = []
    for r, a in zip(responses, answers):
        r, a = r.strip(), str(a).strip()
        width = max(len(r), len(a))
        same = sum(1 for x, y in zip(reversed(r), reversed(a)) if x == y)
        out.append(same / width if width else 1.0)
    return out


def final_number(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """1.0 if the last number written in the response is exactly the answer, else 0.0: a chat model may show
    its work or phrase the answer, but what it ends on counts. A number is digits with an optional sign and
    decimal or thousands separators ("-3", "1.5", "1,000"), compared as text. Answer "11": "11",
    "2 + 9 = 11", "The answer is 11." -> 1.0; "11 or 12", "2 + 9 = 11, so 2 + 9", "eleven", "11.5" -> 0.0.
    """
    _check_answers("final_number", responses, answers)
    out = []
    for r, a in zip(responses, answers):
        found = _NUMBER.findall(r)
        out.append(1.0 if found and found[-1] == str(a).strip() else 0.0)
    return out


exact_match.reward_range = (0.0, 1.0)
final_number.reward_range = (0.0, 1.0)
digit_match.reward_range = (0.0, 1.0)
format_reward.reward_range = (0.0, 1.0)
exact_match_with_format.reward_range = (0.0, 1.0)
