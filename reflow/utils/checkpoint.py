"""Checkpoint folders: `<output_dir>/checkpoints/step_000042/` holding HF model folders per trained role
plus `trainer_state.pt` (optimizer and scheduler states, RNG states, data position, step)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A resume request that cannot be honoured; raised before any model is loaded."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer_state.pt").is_file():  # a checkpoint without its state file is incomplete
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(output_dir: str | Path, resume: str | bool) -> Path:
    """The checkpoint to resume from: `True` = the latest under output_dir, a path = that checkpoint."""
    if resume is True or resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume: no checkpoint under '{Path(output_dir) / 'checkpoints'}'; "
                                  "run without --resume to start fresh, or set output_dir to the run to continue")
        return found[-1][1]
    p = Path(resume)
    if not (p / "trainer_state.pt").is_file():
        raise CheckpointError(f"--resume: '{p}' is not a checkpoint (no trainer_state.pt); "
                              f"pass a folder like <output_dir>/checkpoints/step_000010")
    return p


def save_state(ckpt: Path, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    tmp.rename(ckpt / "trainer_state.pt")  # written last and atomically: its presence marks a complete checkpoint


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


def prune(output_dir: str | Path, keep: int) -> None:
    """Keep only the newest `keep` checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    import random

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    import random

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
