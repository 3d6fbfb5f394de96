"""Pipeline schedules: the order in which one stage runs the forward (F) and backward (B) passes of M micro-batches.

    gpipe   F0 F1 ... F(M-1)  B0 B1 ... B(M-1)
    1f1b    warm-up: w = min(p - s - 1, M) forwards, steady: F(w+i) B(i) for i < M - w, cool-down: the
            remaining backwards (stage s of p; PipeDream-flush / Megatron's non-interleaved schedule)

Both take (M + p - 1)(f + b) for per-micro-batch forward / backward times f, b on every stage, so both
idle a fraction (p - 1) / (M + p - 1) of the time (the bubble). They differ in memory: a stage holds the
activations of every micro-batch forwarded and not yet backwarded, M of them under GPipe and at most
p - s under 1F1B (`peak_in_flight`).

With sends that do not wait for the receiver (the stages' `isend`) and blocking receives, every order here is
deadlock-free: stage s's F(j) waits only for stage s-1's F(j) and its B(j) for stage s+1's B(j), which
each stage reaches without waiting on s (`fused.check_schedule` proves it for given orders).
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")


def stage_order(schedule: str, stage: int, p: int, m: int) -> list[tuple[str, int]]:
    """[("F" | "B", micro_batch), ...]: what stage `stage` of `p` runs, in order, for `m` micro-batches."""
    if schedule == "gpipe":
        return [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
    if schedule != "1f1b":
        raise ValueError(f"pipeline schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    warmup = min(p - stage - 1, m)
    order = [("F", j) for j in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", j) for j in range(m - warmup, m)]


def peak_in_flight(order: list[tuple[str, int]]) -> int:
    """Most micro-batches forwarded and not yet backwarded at any point of `order` (activations held)."""
    live = peak = 0
    for kind, _ in order:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def bubble_fraction(p: int, m: int) -> float:
    """Idle fraction (p - 1) / (m + p - 1) of every stage under GPipe and 1F1B (uniform f, b per stage)."""
    return (p - 1) / (m + p - 1)
