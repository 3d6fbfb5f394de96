"""Training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(rows: list[dict], keys: list[str], out: str | Path, title: str = "") -> Path | None:
    """One panel per key present in `rows` (metrics.jsonl rows), x = step."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, out, title)


def _save(fig, out: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def read_timeline(path: str | Path) -> list[dict]:
    """The slices ("ph": "X") of a timeline.json (Chrome trace the executor writes), times in seconds:
    [{"name", "rank", "start", "end", "step", "chunk" (None unless the call ran on chunks)}]."""
    import json

    trace = json.loads(Path(path).read_text())["traceEvents"]
    return [{"name": e["name"], "rank": e["tid"], "start": e["ts"] / 1e6, "end": (e["ts"] + e["dur"]) / 1e6,
             "step": e.get("cat", ""), "chunk": (e.get("args") or {}).get("chunk")} for e in trace if e["ph"] == "X"]


def busy_by_rank(events: list[dict]) -> dict[int, tuple[float, float]]:
    """rank -> (busy seconds: the union of its slices, idle seconds: the rest of the timeline's span)."""
    if not events:
        return {}
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    out = {}
    for rank in sorted({e["rank"] for e in events}):
        busy, end = 0.0, float("-inf")
        for e in sorted((e for e in events if e["rank"] == rank), key=lambda e: e["start"]):
            s = max(e["start"], end)
            if e["end"] > s:
                busy += e["end"] - s
                end = e["end"]
        out[rank] = (busy, span - busy)
    return out


def plot_timeline(events: list[dict], out: str | Path, title: str = "") -> Path:
    """A Gantt chart of a timeline: one row per rank, one colour per call (its reallocation and weight sends
    hatched in the call's colour), each chunk of a streamed call its own outlined bar."""
    t0 = min(e["start"] for e in events)
    calls = list(dict.fromkeys(e["name"].split(":")[0] for e in sorted(events, key=lambda e: e["start"])))
    colours = {c: plt.get_cmap("tab10" if len(calls) <= 10 else "tab20")(i % 20) for i, c in enumerate(calls)}
    ranks = sorted({e["rank"] for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.6))
    for e in events:
        call, _, what = e["name"].partition(":")
        ax.barh(ranks.index(e["rank"]), e["end"] - e["start"], left=e["start"] - t0, height=0.7,
                color=colours[call], edgecolor="black" if e["chunk"] is not None else colours[call],
                linewidth=0.4, hatch="//" if what else None, alpha=0.6 if what else 1.0)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in calls], labels=calls,
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(ranks) < 4 else -0.2), ncol=min(len(calls), 8),
              fontsize=8, frameon=False)
    return _save(fig, out, title)
