"""Facts about the machine a benchmark runs on, shared by the bench scripts (run as scripts: bench/ is on sys.path)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def python_cmd() -> str:
    """The interpreter as a command relative to the repository (e.g. .venv-bench/bin/python)."""
    exe = Path(sys.executable)
    return str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else exe.name


def device_line(threads: int) -> str:
    """"device: CPU, <cpu>, <n> cores, <threads> torch threads; torch, transformers and python versions; fp32"."""
    import torch
    import transformers

    return (f"device: CPU, {cpu_name()}, {os.cpu_count()} cores, {threads} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}; fp32")
