"""The Python tool: the model runs a program and reads what it prints.

    model: a ```python fenced block (or `RUN <one line>`)  ->  observation: the program's stdout and stderr
           (cut to `max_output` characters), or "timeout" after `timeout_s`; reward 0, episode goes on
    model: ANSWER x  ->  reward 1.0 if x equals the row's answer, else 0.0; done
    anything else    ->  observation "?\\n"

Each program runs as its own `python -I` process in a fresh temporary folder (its cwd), stdin empty, with
RLIMIT_AS = `memory_mb`, RLIMIT_CPU = `timeout_s` and the wall-clock `timeout_s` (the process group is killed).
That is the reward sandbox's limits without its namespaces: the code can read what the trainer's user can
read and reach the network. For untrusted models run the trainer itself in a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from reflow.envs.calculator import AnswerToolEnv
from reflow.rewards.code_exec import extract_program


# Sets the limits in the child itself: the tool runs from the multi-turn thread pool, and a preexec_fn (Python
# code between fork and exec) can deadlock when other threads held locks at the fork.
_LIMITED = ("import resource, runpy, sys\n"
            "mem, cpu = int(sys.argv[2]), int(sys.argv[3])\n"
            "resource.setrlimit(resource.RLIMIT_AS, (mem, mem))\n"
            "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))\n"
            "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
            "sys.argv = sys.argv[1:2]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_python(source: str, timeout_s: float = 5.0, memory_mb: int = 1024, max_output: int = 512) -> str:
    """stdout + stderr of `python -I source` (cut to max_output characters), or "timeout\\n"."""
    cpu = max(1, int(timeout_s + 0.999))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tool.py")
        with open(path, "w") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _LIMITED, path, str(memory_mb << 20), str(cpu)],
                                cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the program's children too (its own session)
            proc.communicate()
            return "timeout\n"
    text = out.decode("utf-8", "replace")
    return text if len(text) <= max_output else text[:max_output] + "...\n"


class PythonEnv(AnswerToolEnv):
    """A ```python block (or `RUN code`) -> its output; `ANSWER x` ends the episode (reward 1 if correct)."""

    timeout_s, memory_mb, max_output = 5.0, 1024, 512

    def tool(self, text: str) -> str:
        if text.startswith("RUN "):
            source = text[len("RUN "):]
        elif "```" in text:
            source = extract_program(text)
        else:
            return "?\n"
        return run_python(source, self.timeout_s, self.memory_mb, self.max_output)
