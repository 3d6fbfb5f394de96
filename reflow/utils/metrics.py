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
    def __init__(self, out_dir: str | Path, tensorboard: bool = False, append: bool = False,
                 purge_step: int | None = None):
        """append: continue metrics.jsonl (a resumed run); purge_step: TensorBoard drops the events of this
        step and later that an interrupted run wrote after its checkpoint."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if not append and self.path.exists():
            self.path.unlink()
        self.rows = len(read_metrics(self.path)) if self.path.exists() else 0
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional extra
                raise RuntimeError("trainer.tensorboard=true needs the tensorboard package: "
                                   "pip install 'reflow[tensorboard]'") from e
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if v is not None else None) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.tb is not None:
            for k, v in metrics.items():
                if v is not None:
                    self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a killed process is left out."""
    rows = []
    with Path(path).open() as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line can be cut short; anything else is a damaged file
                raise
    return rows


def truncate_metrics(path: str | Path, last_step: int, rows: int | None = None) -> None:
    """Keep the first `rows` rows (as many as were logged when the checkpoint was written), or, for a
    checkpoint that does not record them, the rows up to `last_step`: a resumed run rewrites the rest."""
    p = Path(path)
    if p.exists():
        kept = read_metrics(p)
        kept = kept[:rows] if rows is not None else [r for r in kept if r["step"] <= last_step]
        tmp = p.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(p)
