"""The built-in `code_exec` reward: run the response's Python program against the row's tests.

    program  the last fenced block tagged python / py / python3 (```python ... ```), else the whole response
    tests    the row's `answer`: Python source (assert statements, say), or a JSON list of such strings
             (joined by newlines); None: the program alone
    reward   1.0 if `program + "\\n\\n" + tests` exits with status 0 within the time limit, else 0.0

Each sample runs as its own `python -I` subprocess in a fresh temporary folder, stdin empty and output discarded.
The time limit is 80% of REFLOW_REWARD_TIMEOUT_S (the reward sandbox sets it to reward.timeout_s, so the
program is stopped and scored 0.0 before the sandbox would call the sample failed), else 10 s. The program
is model-written code: `code_exec` is sandboxed unless reward.sandbox=false, and one sample runs per
sandboxed call.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The last ```python fenced block of a response, or the whole response when it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def answer_tests(answer: str | None) -> str:
    """A row's answer as Python source: a JSON list of strings is joined by newlines; other text is used as is."""
    if answer is None:
        return ""
    try:
        parsed = json.loads(answer)
    except (TypeError, ValueError):
        return answer
    if isinstance(parsed, list) and all(isinstance(t, str) for t in parsed):
        return "\n".join(parsed)
    return answer


def time_limit() -> float:
    budget = os.environ.get("REFLOW_REWARD_TIMEOUT_S")
    return 0.8 * float(budget) if budget else 10.0


def run_program(source: str, limit_s: float) -> bool:
    """True when `source` runs to exit status 0 within limit_s seconds (killed and False otherwise)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "solution.py")
        with open(path, "w") as f:
            f.write(source)
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=folder, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def code_exec(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
    """1.0 where the response's program passes the row's tests (exit status 0 in time), else 0.0."""
    limit = time_limit()
    return [1.0 if run_program(extract_program(r) + "\n\n" + answer_tests(a), limit) else 0.0
            for r, a in zip(responses, answers)]


code_exec.reward_range = (0.0, 1.0)
