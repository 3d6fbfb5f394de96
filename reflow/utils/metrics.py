"""Where metrics go: `metrics.jsonl` (one JSON object per step), optionally TensorBoard, and the console."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("reflow")


class StageTimer:
    """Wall time per named stage of a step: `with timer("actor_gen"): ...` -> {"time/actor_gen": s}."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = False, append: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if not append and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional extra
                raise RuntimeError("trainer.tensorboard=true needs the tensorboard package: "
                                   "pip install 'reflow[tensorboard]'") from e
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if v is not None else None) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if v is not None:
                    self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop rows after `last_step` (a resumed run rewrites the steps after its checkpoint)."""
    p = Path(path)
    if p.exists():
        rows = [r for r in read_metrics(p) if r["step"] <= last_step]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
