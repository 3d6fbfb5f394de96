"""Checkpoint folders: `<output_dir>/checkpoints/step_000042/` holding HF model folders per trained role
plus `trainer_state.pt` (optimizer and scheduler states, RNG states, data position, step).

A checkpoint is written whole into a hidden temporary folder (`.step_000042.partial`) and renamed to its
name only when every file is in place, so a process killed at any moment leaves either the complete
checkpoint or none: `--resume` only ever sees folders named `step_N` that hold `trainer_state.pt`.
Old checkpoints are renamed out of the way (`.step_N.trash`) before they are deleted, for the same reason.
A rename within one folder is atomic on POSIX file systems (local disks, NFS, Lustre); object-store
mounts that copy on rename are not supported for checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
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


def begin_checkpoint(output_dir: str | Path, step: int) -> Path:
    """The temporary folder a checkpoint of `step` is written into (emptied first: a killed run may have left it)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def checkpoint_name(folder: Path) -> str:
    """`step_N` for a checkpoint folder, whether it is still the temporary `.step_N.partial` or committed."""
    return folder.name.removeprefix(".").removesuffix(".partial")


def commit_checkpoint(tmp: Path) -> Path:
    """Rename a complete checkpoint written by begin_checkpoint() to its name -> the checkpoint folder."""
    if not (tmp / "trainer_state.pt").is_file():
        raise CheckpointError(f"checkpoint '{tmp}' has no trainer_state.pt; it is incomplete and was not committed")
    final = tmp.parent / checkpoint_name(tmp)
    if final.exists():  # the same step written again (a run resumed from an earlier checkpoint)
        discard(final)
    tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def clean_partial(output_dir: str | Path) -> None:
    """Delete what a killed run left half-written or half-deleted (hidden `.step_*` folders)."""
    root = Path(output_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".step_*"):
            shutil.rmtree(p, ignore_errors=True)


def discard(p: Path) -> None:
    """Delete a checkpoint folder so that an interruption never leaves it half there under its own name."""
    trash = p.parent / f".{p.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    p.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    """Make a rename durable (a crash of the machine, not only of the process); best effort."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        discard(p)


def rng_state() -> dict:
    import random

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    import random

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


# ---------------------------------------------------------------- checks of the output folder and of a resume

class CheckpointWriteError(CheckpointError):
    """The output folder or a checkpoint cannot be written (read-only, full, not a folder)."""


# the fields of an HF config that fix the shape of a model's weights
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_output_dir(output_dir: str | Path) -> None:
    """Create output_dir and write a file in it, so that a folder that is a file, read-only or full is reported
    before any model loads instead of at the first checkpoint."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointWriteError(f"output_dir '{out}' is a file, not a folder; set output_dir to a folder "
                                   f"(e.g. output_dir={out}_run)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write_probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointWriteError(f"output_dir '{out}' cannot be written ({e.strerror or e}); set output_dir to a "
                                   "folder on a writable disk with free space") from None


@contextmanager
def write_errors(folder: Path, output_dir: str | Path):
    """An OSError while writing `folder` (a checkpoint, final/) -> one CheckpointWriteError that names it and the
    last complete checkpoint, which a failed write leaves as it was; the half-written temporary folder goes."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(folder.parent / f".{folder.name}.partial", ignore_errors=True)
        found = list_checkpoints(output_dir)
        then = (f"the last complete checkpoint '{found[-1][1]}' is intact: free space or make the folder writable, "
                f"then continue with --resume" if found else
                "there is no earlier checkpoint: free space or make the folder writable and run again")
        raise CheckpointWriteError(f"could not write '{folder}' ({e.strerror or e}); {then}") from e


def check_compatible(state: dict, ckpt: Path, experiment: str, trained_roles: list[str],
                     model_configs: dict | None, lora_roles: dict[str, str] | None = None) -> None:
    """Refuse, before any model loads, a checkpoint of another run: written by another command (`reflow sft`
    resumed by `reflow train`), lacking a role this run trains (a GRPO checkpoint resumed as PPO), or holding a
    model of another shape than the one this config names. model_configs: role -> HF config of this run."""
    written_by = state.get("experiment")
    if written_by is not None and written_by != experiment:
        raise CheckpointError(f"--resume: '{ckpt}' was written by `reflow {written_by}`, not `reflow {experiment}`; "
                              f"resume it with `reflow {written_by}`, or run without --resume (or another output_dir)")
    adapters = {p.name for p in ckpt.iterdir() if (p / "adapter_config.json").is_file()}
    held = sorted({p.name for p in ckpt.iterdir() if (p / "config.json").is_file()} | adapters)
    lora_roles = lora_roles or {}
    for role in trained_roles:
        if role not in held:
            raise CheckpointError(f"--resume: '{ckpt}' holds no '{role}' model (it holds {', '.join(held) or 'none'}),"
                                  f" which this run trains: it was written by another algorithm; resume with the "
                                  "config that wrote it, or run without --resume (or another output_dir)")
        if (role in adapters) != (role in lora_roles):
            key = lora_roles.get(role, role)
            held_what, ours = ("LoRA adapters", "trains every weight") if role in adapters else \
                ("a whole model", "trains LoRA adapters")
            raise CheckpointError(f"--resume: '{ckpt}' holds {held_what} for '{role}' but this config {ours} "
                                  f"({key}.lora.rank); resume with the {key}.lora settings that wrote it, or run "
                                  "without --resume (or another output_dir)")
        if role in adapters:
            continue  # the base comes from the role's path again; PEFT checks the adapters' shapes on load
        if model_configs and role in model_configs:
            saved = json.loads((ckpt / role / "config.json").read_text())
            ours = model_configs[role]
            diff = [f"{k} {saved.get(k)} vs {getattr(ours, k, None)}" for k in SHAPE_KEYS
                    if saved.get(k) != getattr(ours, k, None)]
            if diff:
                raise CheckpointError(f"--resume: the '{role}' model in '{ckpt}' is not the model this config names "
                                      f"({', '.join(diff)}): point {role}'s path at the model that run started from,"
                                      " or run without --resume (or another output_dir)")
