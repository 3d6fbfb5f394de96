"""Console output of a run: a rich progress bar on a terminal, a line every few steps otherwise (CI logs)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# metrics shown on the bar / step lines, with short labels
SHOWN = [("reward/mean", "reward"), ("accuracy", "acc"), ("actor/kl", "kl"), ("actor/entropy", "ent"),
         ("response_len/mean", "len"), ("critic/loss", "vloss"), ("loss", "loss"), ("time/step", "s/step")]


def format_metrics(metrics: dict) -> str:
    parts = []
    for key, label in SHOWN:
        v = metrics.get(key)
        if v is not None:
            parts.append(f"{label} {v:.3f}" if abs(v) < 1000 else f"{label} {v:.0f}")
    return "  ".join(parts)


class RunConsole:
    def __init__(self, name: str, total: int, enabled: bool = True):
        self.console = Console(highlight=False)
        self.name, self.total, self.enabled = name, total, enabled
        self.live = enabled and self.console.is_terminal
        self.every = max(1, total // 20)
        self.progress = None

    def __enter__(self):
        if self.live:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.name, total=self.total, info="")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def print(self, msg: str) -> None:
        self.console.print(msg)

    def advance(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress.update(self.task, advance=n)

    def step(self, step: int, metrics: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=format_metrics(metrics))
        elif self.enabled and (step % self.every == 0 or step == self.total):
            self.console.print(f"{self.name} step {step}/{self.total}  {format_metrics(metrics)}")
