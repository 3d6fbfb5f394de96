"""Pipeline schedules for PPO's two train calls: GPipe, 1F1B, and fused actor + critic (RLHFuse), on gloo workers.

    .venv/bin/python bench/pipeline.py [--model medium-llama] [--world 2] [--micro-batches 4 8] [--repeats 3]

One PPO-style training step = an actor train call (token NLL) and a critic train call (value regression),
each a d1t1p{world} pipeline over the same `world` ranks, M micro-batches each (sequences of 64 tokens,
2 per micro-batch), timed from the same barrier to the same barrier, the three modes interleaved per repeat:

    gpipe    actor step then critic step, each GPipe (all forwards, then all backwards)
    1f1b     actor step then critic step, each 1F1B
    fused    one fused step: actor stages on ranks 0..p-1, critic stages on p-1..0, the order of a schedule
             found by parallel/fused.py's search (memory limit p micro-batches per rank) and checked first

Measured per rank: the two calls' wall time; the bubble = time blocked in pipeline receives / wall time
(from the stages' own clocks); peak activation memory = the most bytes held at once by tensors saved for
backward (autograd saved-tensor hooks, parameters excluded). The lower bound (RLHFuse) for the fused step:

    max( max_model (S + M - 1)(f + b)_model,  busy time of both models summed over ranks / ranks )

with (f + b)_model = the most busy time (wall - blocked) of one rank in that model's 1F1B call / M.
Writes bench/results/pipeline.md and prints BENCH_SUMMARY.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from machine import cpu_name, load_avg, python_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64  # tokens per sequence
MODES = ("gpipe", "1f1b", "fused")


class ActivationMeter:
    """Bytes held by tensors saved for backward (their storages, each counted once, parameters excluded):
    current and peak, while installed as autograd's saved-tensor hooks."""

    def __init__(self, models):
        self.params = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
        self.live: dict[int, list] = {}
        self.current = self.peak = 0

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.params or key == 0:
            return t
        entry = self.live.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._drop, key)
        return t

    def _drop(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def make_batch(n: int, seed: int):
    from reflow.data.batch import SampleBatch

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 250, (SEQ,), generator=g) for _ in range(n)]
    masks = [(torch.arange(SEQ) >= SEQ // 4).long() for _ in range(n)]
    return SampleBatch.from_sequences(range(n), {"input_ids": seqs, "action_mask": masks})


def worker(rank: int, world: int, model_dir: str, ms: list[int], repeats: int) -> dict:
    from reflow.checks.layouts import critic_with_random_head, nll_loss, value_mse
    from reflow.engines.fused_train import fused_train_step
    from reflow.engines.train import TrainEngine
    from reflow.models.load import load_policy
    from reflow.parallel.context import ParallelContext, equal_micro_batches
    from reflow.parallel.fused import FusedSpec, picture, search_fused, sequential_1f1b
    from reflow.parallel.layout import Layout

    layout, ranks = Layout(1, 1, world), list(range(world))
    loss = {"actor": nll_loss, "critic": value_mse}
    load = {"actor": lambda: load_policy(model_dir), "critic": lambda: critic_with_random_head(model_dir)}
    rows, pictures = [], {}
    for m in ms:
        batch = make_batch(2 * m, seed=m)
        tokens = 2 * SEQ
        assert len(equal_micro_batches(None, batch, tokens)) == m
        engines = {}
        for mode in MODES:
            for name in ("actor", "critic"):
                order = ranks[::-1] if (mode == "fused" and name == "critic") else ranks
                engines[mode, name] = TrainEngine(load[name](), lr=1e-5, micro_batch_tokens=tokens,
                                                  parallel=ParallelContext.build(layout, order),
                                                  pipeline_schedule="gpipe" if mode == "gpipe" else "1f1b")
        spec = FusedSpec.actor_critic(world, m)
        schedule, span = search_fused(spec, memory_limit=world, iters=1000)
        pictures[m] = (picture(schedule, spec), span, sequential_1f1b(spec)[1], spec.lower_bound())
        for rep in range(repeats + 1):  # the first round warms up
            for mode in MODES:
                stages = {n: engines[mode, n].model._reflow_stage for n in ("actor", "critic")}
                meter = ActivationMeter([engines[mode, n].model for n in ("actor", "critic")])
                dist.barrier()
                t0 = time.perf_counter()
                waits, busy = {}, {}
                with meter.hooks():
                    if mode == "fused":
                        fused_train_step({n: (engines[mode, n], batch, loss[n]) for n in ("actor", "critic")},
                                         spec, schedule, memory_limit=world)
                        wait = sum(s.wait_s for s in stages.values())
                    else:
                        wait = 0.0
                        for n in ("actor", "critic"):
                            t1 = time.perf_counter()
                            engines[mode, n].step(batch, loss[n])
                            waits[n] = stages[n].wait_s
                            busy[n] = time.perf_counter() - t1 - waits[n]
                            wait += waits[n]
                dist.barrier()
                wall = time.perf_counter() - t0
                if rep:
                    rows.append({"m": m, "mode": mode, "rep": rep, "rank": rank, "wall": wall, "wait": wait,
                                 "peak_act": meter.peak, "busy": busy})
    return {"rows": rows, "pictures": pictures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medium-llama")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/pipeline.md")
    args = ap.parse_args()

    from reflow.models.presets import init_model
    from reflow.parallel.launch import launch

    load_before = load_avg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(init_model(args.model, Path(tmp) / args.model))
        n_params = sum(p.numel() for p in __import__("reflow.models.load", fromlist=["load_policy"])
                       .load_policy(model_dir).parameters())
        results = launch(worker, args.world, args=(model_dir, args.micro_batches, args.repeats), timeout_s=1200.0)
    wall_all = time.perf_counter() - t_start
    load_after = load_avg()
    rows = [r for res in results for r in res["rows"]]
    pictures = results[0]["pictures"]
    S = args.world

    def med(values):
        return statistics.median(values)

    table, summary = [], []
    for m in args.micro_batches:
        call = {}  # mode -> per repeat: the slowest rank's wall time
        for mode in MODES:
            reps = sorted({r["rep"] for r in rows if r["m"] == m and r["mode"] == mode})
            call[mode] = [max(r["wall"] for r in rows if r["m"] == m and r["mode"] == mode and r["rep"] == k)
                          for k in reps]
        one = [r for r in rows if r["m"] == m and r["mode"] == "1f1b"]
        fb = {n: max(med([r["busy"][n] for r in one if r["rank"] == k]) for k in range(S)) / m
              for n in ("actor", "critic")}
        work = sum(med([r["busy"][n] for r in one if r["rank"] == k]) for k in range(S) for n in fb)
        bound = max(max((S + m - 1) * fb[n] for n in fb), work / S)
        for mode in MODES:
            mine = [r for r in rows if r["m"] == m and r["mode"] == mode]
            bubble = [med([r["wait"] / r["wall"] for r in mine if r["rank"] == k]) for k in range(S)]
            peak = [max(r["peak_act"] for r in mine if r["rank"] == k) for k in range(S)]
            t = med(call[mode])
            row = {"m": m, "mode": mode, "time": t, "spread": (min(call[mode]), max(call[mode])),
                   "vs_1f1b": t / med(call["1f1b"]), "vs_bound": t / bound, "bubble": bubble,
                   "peak_act_mb": [p / 2**20 for p in peak],
                   "peak_vs_gpipe": max(peak) / max(max(r["peak_act"] for r in rows if r["m"] == m
                                                        and r["mode"] == "gpipe" and r["rank"] == k)
                                                    for k in range(S))}
            summary.append(row)
            table.append([str(m), mode, f"{t:.3f} ({row['spread'][0]:.3f}-{row['spread'][1]:.3f})",
                          f"{row['vs_1f1b']:.2f}", f"{row['vs_bound']:.2f}",
                          " / ".join(f"{b:.0%}" for b in bubble),
                          " / ".join(f"{p:.1f}" for p in row["peak_act_mb"]), f"{row['peak_vs_gpipe']:.2f}"])
        summary.append({"m": m, "mode": "bound", "time": bound, "fb": fb})
    head = ["M", "mode", "s per step: median (min-max)", "/ 1F1B", "/ bound", "bubble per rank",
            "peak activations MB per rank", "peak / GPipe"]
    md_table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(row) + " |" for row in table])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    cmd = (f"{python_cmd()} bench/pipeline.py --model {args.model} --world {args.world} --micro-batches "
           f"{' '.join(map(str, args.micro_batches))} --repeats {args.repeats}")
    sim = "\n\n".join(f"M = {m}: fused {span} units vs 1F1B one after the other {seq} (ratio {span / seq:.2f}), "
                      f"lower bound {lb} (f = 1, b = 2 units)\n\n```\n{pic}\n```"
                      for m, (pic, span, seq, lb) in pictures.items())
    print(md_table)
    print(f"wall {wall_all:.0f} s; load average before {load_before}, after {load_after}")
    if args.out:
        lines = [
            "# Pipeline schedules: GPipe, 1F1B, fused actor + critic (bench/pipeline.py)",
            "",
            f"device: CPU, {cpu_name()}, {os.cpu_count()} cores; {args.world} gloo worker processes (1 torch thread "
            f"each); torch {torch.__version__}, python {platform.python_version()}; reflow at `{commit}`",
            f"command: `{cmd}`",
            f"model: {args.model} ({n_params / 1e6:.1f}M parameters) as actor and as critic (a value head), "
            f"d1t1p{args.world}; {SEQ}-token sequences, 2 per micro-batch",
            f"load average (1/5/15 min) before: {load_before}; after: {load_after}; wall {wall_all:.0f} s. A shared "
            "machine: other jobs ran beside this one, so times are noisy (the min-max column is the spread over "
            "the repeats); compare modes within a row group, measured interleaved in the same run.",
            "",
            "Time = the slowest rank's wall time of the actor and critic train calls (one fused call for fused), "
            "median over repeats. Bubble = time blocked in pipeline receives / wall time. Peak activations = "
            "the most bytes held at once by tensors saved for backward (parameters excluded). Bound = "
            "max(max_model (S+M-1)(f+b), work / ranks) from the 1F1B calls' busy times.",
            "",
            md_table,
            "",
            "## The fused schedule (the search's own time units)",
            "",
            "Actor ops upper case (F / B + micro-batch), critic lower case; the critic's stage 0 is on the last rank.",
            "",
            sim,
            "",
        ]
        Path(args.out).write_text("\n".join(lines))
    print("BENCH_SUMMARY " + json.dumps({"rows": summary, "world": args.world, "model": args.model}))


if __name__ == "__main__":
    main()
