"""Regenerate every benchmark result and the summary table bench/results/README.md.

    make bench                                   # creates .venv-bench (reflow + TRL), then runs this
    .venv-bench/bin/python bench/run_all.py [--quick] [--only e2e_vs_trl mfu ...] [--skip generation ...]
                                            [--e2e-steps 100] [--grpovi-steps 100] [--grpovi-seeds 0 1 2]

Runs, one after the other, each as its own process with this interpreter (TRL must be importable for
e2e_vs_trl, hence .venv-bench):

    e2e_vs_trl      bench/e2e_vs_trl.py       reflow vs TRL GRPOTrainer end to end -> e2e_vs_trl.md
    e2e_vs_trl_real bench/e2e_vs_trl.py --model (with --e2e-model DIR) the same on a real model, with FLOPs per
                                          stage and step time / (FLOPs / peak) and / roofline -> e2e_vs_trl_real.md
    mfu             bench/mfu.py              TrainEngine MFU on three model sizes -> mfu.md
    grpovi_vs_grpo  bench/grpovi_vs_grpo.py   GRPOVI vs GRPO learning curves       -> grpovi_vs_grpo.{md,png}
    grpovi_scaling  bench/grpovi_scaling.py   GRPOVI O(n log n) micro-benchmark    -> grpovi_scaling.md (its output)
    generation      bench/generation.py       generation throughput (when the script exists), shared vs unshared
                                          prompt prefill on a GRPO-shaped call -> generation.md
    realloc         bench/realloc.py          planned vs naive parameter reallocation, 4 gloo processes -> realloc.md
    planner         bench/planner.py          plan search: predicted vs measured PPO iteration time, 4 Ray workers -> planner.md
    gpu_smoke       bench/gpu_smoke.py        the demo's SFT + GRPO on CUDA (skipped without one) -> gpu_smoke.md
    estimators      bench/estimators.py       GRPO / DAPO / GSPO / CISPO on the demo task, 3 seeds -> estimators.{md,png}
    async           bench/async.py            asynchronous vs synchronous training, 2 and 4 workers -> async.md
    stability       bench/stability.py        advantage model + selective rehearsal: forgetting, hacking -> stability.{md,png}
    lora            bench/lora.py             LoRA vs full fine-tuning on the demo task -> lora.{md,png}
    chaos           bench/chaos.py            SIGKILL at random moments + --resume, in-process and 2 workers; hostile rewards -> chaos.md
    multiturn       bench/multiturn.py        multi-turn rollouts: batched turns vs one episode at a time, tool latency,
                                          kept K/V across turns vs re-prefill -> multiturn.md
    pipeline        bench/pipeline.py         GPipe vs 1F1B vs fused actor+critic pipelines, 2 gloo workers -> pipeline.md
    fusion          bench/fusion.py           inter-stage fusion vs unfused PPO, long-tailed lengths, 2 and 4 workers -> fusion.{md,png}
    packing         bench/packing.py          prefix sharing and flex attention vs unshared, GRPO-shaped micro-batch -> packing.md

and writes bench/results/README.md: device, versions, git state, load average, and per benchmark its command,
key figures, wall time and result file. Each run's output and record are kept in runs/bench/logs/, so
`--only NAME` re-runs one benchmark and the table keeps the others' last results (marked as earlier runs).
Time on the project's 2-core CPU machine: 17 and 26 minutes measured with other jobs beside it (e2e_vs_trl
about 1 minute of it when the machine is quiet, 11 when it is not); `--quick` (30 e2e steps, 3 MFU steps, GRPOVI 50 steps x 1 seed,
generation on tiny-llama at batches 8 and 32, realloc without the 100M model) about a third of that. A benchmark that fails is reported in the
table and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from machine import cpu_name, load_avg, python_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"








def versions() -> str:
    out = []
    for mod in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod} (not installed)")
    return ", ".join(out) + f", python {platform.python_version()}"


def git_state() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "reflow")
    except OSError:
        return "unknown"
    return f"`{head}`" + (" + uncommitted changes in reflow/" if dirty else "")


def run(name: str, argv: list[str], log_dir: Path) -> dict:
    """Run one benchmark, streaming its output; returns rc, wall time, captured stdout and its BENCH_SUMMARY."""
    cmd = [sys.executable, *argv]
    shown = " ".join([python_cmd(), *argv])
    print(f"\n=== {name}: {shown}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as p:
        for line in p.stdout:
            sys.stdout.write(line)
            lines.append(line)
    wall = time.perf_counter() - t0
    (log_dir / f"{name}.log").write_text("".join(lines))
    rec = {"name": name, "rc": p.returncode, "wall": wall, "cmd": shown, "load_after": load_avg(),
           "finished": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    (log_dir / f"{name}.json").write_text(json.dumps(rec) + "\n")
    print(f"=== {name}: exit {p.returncode}, {wall:.0f} s", flush=True)
    return load_record(name, log_dir)


def load_record(name: str, log_dir: Path) -> dict | None:
    """The last run of benchmark `name` (its record and captured output), or None if it never ran here."""
    meta, log = log_dir / f"{name}.json", log_dir / f"{name}.log"
    if not (meta.is_file() and log.is_file()):
        return None
    rec = json.loads(meta.read_text())
    rec["out"] = log.read_text()
    rec["summary"] = None
    for line in reversed(rec["out"].splitlines()):
        if line.startswith("BENCH_SUMMARY "):
            rec["summary"] = json.loads(line[len("BENCH_SUMMARY "):])
            break
    return rec


# ------------------------------------------------------------------------------------------ key figures


def fig_e2e(r: dict) -> str:
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    R, T, acc = s["reflow"], s["trl"], s["held_out_accuracy"]
    return (f"generated tokens/s end to end: reflow {R['e2e_gen_tok_per_s']:.0f} vs TRL {T['e2e_gen_tok_per_s']:.0f} "
            f"(**{R['e2e_gen_tok_per_s'] / T['e2e_gen_tok_per_s']:.2f}x**); step {R['step_s']:.3f} s vs "
            f"{T['step_s']:.3f} s; generation stage {R['stage_gen_tok_per_s'] / T['stage_gen_tok_per_s']:.2f}x; "
            f"train reward (last 10 steps) {R['reward_last10']:.3f} vs {T['reward_last10']:.3f}; held-out accuracy "
            f"{acc['reflow']:.3f} vs {acc['trl']:.3f} (from {acc['sft (start)']:.3f}); equal work: "
            f"{'yes' if s['equal_work'] else '**no**'}")


def fig_e2e_real(r: dict) -> str:
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    R, T = s["reflow"], s["trl"]
    return (f"step {R['step_s']:.1f} s vs TRL {T['step_s']:.1f} s (**{s['speedup']:.2f}x**); step / (FLOPs / peak): "
            f"reflow {s['reflow_vs_bound']:.2f}x, TRL {s['trl_vs_bound']:.2f}x; step / roofline (FLOPs or memory): "
            f"reflow {s.get('reflow_vs_roofline', float('nan')):.2f}x, TRL {s.get('trl_vs_roofline', float('nan')):.2f}x; "
            "equal work: "
            f"{'yes' if s['equal_work'] else '**no**'}")


def fig_mfu(r: dict) -> str:
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    parts = [f"{k} ({v['params'] / 1e6:.1f}M) {v['mfu']:.0%}" for k, v in s["models"].items()]
    return f"peak fp32 matmul {s['peak_flops'] / 1e9:.0f} GFLOP/s; MFU " + ", ".join(parts)


def fig_grpovi_vs_grpo(r: dict) -> str:
    path = RESULTS / "grpovi_vs_grpo.md"
    if not path.is_file():
        return "no result file"
    rows = [ln for ln in path.read_text().splitlines() if ln.startswith("| grpo")]
    out = []
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) >= 5:
            out.append(f"{cells[0]}: final held-out accuracy {cells[2]} (std {cells[3]}), train reward {cells[4]}")
    return "; ".join(out) or "see the result file"


def fig_estimators(r: dict) -> str:
    path = RESULTS / "estimators.md"
    if not path.is_file():
        return "no result file"
    out = []
    for ln in path.read_text().splitlines():
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if ln.startswith("| ") and cells[0] in ("grpo", "dapo", "gspo", "cispo"):
            out.append(f"{cells[0]}: final held-out accuracy {cells[2]}")
    return "; ".join(out) or "see the result file"


def fig_async(r: dict) -> str:
    rows = (r["summary"] or {}).get("rows", [])
    sync = {x["workers"]: x["samples_per_s"] for x in rows if x["k"] == 0 and not x.get("partial")}
    return "; ".join(f"{x['workers']} workers, k={x['k']}{' partial' if x.get('partial') else ''}: "
                     f"{x['samples_per_s']:.0f} samples/s "
                     f"({x['samples_per_s'] / sync[x['workers']]:.2f}x sync)" for x in rows if x["workers"] in sync)


def fig_stability(r: dict) -> str:
    """Per PPO run: the second task's accuracy change (forgetting) and the response-length drift (hacking)."""
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    parts = [f"{x['run']}{' seed ' + str(x['seed']) if 'seed' in x else ''}: reversal "
             f"{x['reverse_after'] - x['reverse_before']:+.3f}, addition "
             f"{x['addition_after'] - x['addition_before']:+.3f}, length {x['response_len_first']:.1f}->"
             f"{x['response_len_last']:.1f}" for x in s["rows"]]
    stds = "; ".join(f"{m.upper()} score std " + "/".join(f"{v['std']:.2f}" for v in d.values())
                     for m, d in s["score_stats"].items())
    return "; ".join(parts) + f"; {stds} (addition/reversal)"


def fig_chaos(r: dict) -> str:
    s = r["summary"] or {}
    kills = "; ".join(f"{'in-process' if k['workers'] == 0 else str(k['workers']) + ' workers'}: {k['identical']}/"
                      f"{k['killed']} kills resumed to identical metrics" for k in s.get("kills", []))
    hostile = s.get("hostile", [])
    return kills + (f"; hostile rewards: {sum(h['completed'] for h in hostile)}/{len(hostile)} runs completed"
                    if hostile else "") or "no summary"


def fig_multiturn(r: dict) -> str:
    s = r["summary"] or {}
    kv = f"; kept K/V across turns: {s['kv_ratio']:.2f}x over re-prefilling" if "kv_ratio" in s else ""
    return "; ".join(f"{x['tool']}, {x['mode']}: {x['episodes_per_s']:.1f} episodes/s, {x['tool_fraction']:.0%} "
                     f"waiting on tools" for x in s.get("rows", []) if x["mode"] in ("batched", "serial")) + kv \
        or "no summary"


def fig_fusion(r: dict) -> str:
    s = r["summary"] or {}
    rows = [x for x in s.get("rows", []) if "pooled_ratio" in x]
    differ = any(not x["same_metrics"] for x in s.get("rows", []) if "same_metrics" in x)
    lens = s.get("lengths", {})
    return ("; ".join(f"{x['workers']} workers: fused {x['pooled_ratio']:.2f}x the unfused step (runs of one "
                      f"configuration differ by up to {x['spread']:.0%})" for x in rows)
            + "".join(f"; {x['workers']} workers, generation on every rank: migration {x['migrate_ratio']:.2f}x the "
                      "step without" for x in s.get("rows", []) if "migrate_ratio" in x)
            + (" (METRICS DIFFER)" if differ else "")
            + (f"; lengths p50 {lens['p50']}, p90 {lens['p90']}, max {lens['max']}" if lens else "")
            + "".join(f"; {x['workers']} workers predicted fused / unfused "
                      f"{x['predicted_fused_s'] / x['predicted_unfused_s']:.2f}x (measured "
                      f"{x['measured_fused_s'] / x['measured_unfused_s']:.2f}x), fused predicted / measured "
                      f"{x['predicted_fused_s'] / x['measured_fused_s']:.2f}" for x in s.get("rows", [])
                      if "predicted_fused_s" in x)) or "no summary"


def fig_packing(r: dict) -> str:
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    return ", ".join(f"{k} {v:.2f}x" for k, v in s["speedup"].items() if not k.startswith("unshared padded")) \
        + " vs unshared padded (median)"


def fig_scaling(r: dict) -> str:
    rows = [ln for ln in r["out"].splitlines() if re.match(r"^\s*\d+ \|", ln)]
    if not rows:
        return "no output table"
    cells = {int(ln.split("|")[0]): [c.strip() for c in ln.split("|")] for ln in rows}
    n_max = max(cells)
    brute = [n for n, c in cells.items() if c[3] != "-"]
    txt = f"n = {n_max:,}: {cells[n_max][1]} ms"
    if brute:
        b = max(brute)
        txt += f"; brute force / fast at n = {b:,}: {cells[b][3]}x"
    return txt


def fig_generation(r: dict) -> str:
    """reflow/hf tokens/s per model and batch, from the table bench/generation.py prints."""
    if r["summary"]:
        return json.dumps(r["summary"])[:400]
    lines = r["out"].splitlines()
    shared = next((ln.split(";")[0] for ln in lines if ln.startswith("unshared / shared:")), None)
    shared = f"; shared prompt prefill, {shared}" if shared else ""
    head = next((i for i, ln in enumerate(lines) if "reflow/hf" in ln and "|" in ln), None)
    if head is None:
        return shared[2:] if shared else "see the result file"
    cols = [c.strip() for c in lines[head].split("|")]
    out = []
    for ln in lines[head + 1:]:
        cells = [c.strip() for c in ln.split("|")]
        if len(cells) != len(cols):
            continue
        row = dict(zip(cols, cells))
        out.append(f"{row.get('model', '?')} batch {row.get('batch', '?')} {row['reflow/hf']}")
    return ("reflow / `model.generate` tokens/s: " + ", ".join(out) if out else "see the result file") + shared


def fig_realloc(r: dict) -> str:
    """naive / planned time and bytes per model (range over the layout pairs), planned / bandwidth bound."""
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    by_model: dict[str, list[dict]] = {}
    for row in s["rows"]:
        by_model.setdefault(row["model"], []).append(row)
    parts = []
    for model, rows in by_model.items():
        t = [x["t_naive"] / x["t_plan"] for x in rows]
        b = [x["naive_total"] / x["plan_total"] for x in rows if x["plan_total"]]
        lb = [x["t_plan"] / (x["plan_max"] / s["bandwidth_Bps"]) for x in rows if x["plan_max"]]
        parts.append(f"{model}: time {min(t):.2f}-{max(t):.2f}x, bytes {min(b):.2f}-{max(b):.2f}x, "
                     f"planned/bound {min(lb):.1f}-{max(lb):.1f}")
    pairs = len({row["pair"] for row in s["rows"]})
    return (f"naive / planned over {pairs} layout pairs on {s['world']} gloo processes; " + "; ".join(parts)
            + f" (link {s['bandwidth_Bps'] / 1e9:.2f} GB/s)")


def fig_lora(r: dict) -> str:
    path = RESULTS / "lora.md"
    if not path.is_file():
        return "no result file"
    out = []
    for ln in path.read_text().splitlines():
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if ln.startswith("| full") or ln.startswith("| lora"):
            out.append(f"{cells[0]}: {cells[1].split(' of ')[0]} trainable, {cells[4]} s/step, reward {cells[5]}, "
                       f"accuracy {cells[6]}")
    return "; ".join(out) or "see the result file"


def fig_planner(r: dict) -> str:
    """Per plan: predicted / measured seconds and the error; whether the searched plan is no slower."""
    s = r["summary"]
    if not s:
        return "no summary (see the log)"
    parts = [f"{x['plan']} {x['predicted']:.2f}/{x['measured']:.2f} s ({x['error']:+.0%})" for x in s["rows"]]
    return ("predicted/measured s per iteration: " + ", ".join(parts) + f"; within 15%: {s['within_15']} of "
            f"{s['plans']}; searched plan no slower than the best built-in ({s['best_builtin']}): "
            f"{'yes' if s['searched_no_slower'] else '**no**'}")


def fig_pipeline(r: dict) -> str:
    """Per M: each mode's time relative to 1F1B and to the lower bound, and 1F1B's peak activations / GPipe's."""
    rows = (r["summary"] or {}).get("rows", [])
    parts = [f"M={x['m']} {x['mode']}: {x['vs_1f1b']:.2f}x 1F1B, {x['vs_bound']:.2f}x bound, peak activations "
             f"{x['peak_vs_gpipe']:.2f}x GPipe" for x in rows if x["mode"] != "bound"]
    return "; ".join(parts) or "no summary"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and seeds (about half the time)")
    ap.add_argument("--only", nargs="+", help="run only these benchmarks")
    ap.add_argument("--skip", nargs="+", default=[], help="skip these benchmarks")
    ap.add_argument("--e2e-steps", type=int, help="GRPO steps per side in e2e_vs_trl (default 100, quick 30)")
    ap.add_argument("--e2e-model", type=Path, help="a real HF model folder (e.g. `reflow init-model --from-gguf "
                    "smollm2 --out DIR`): adds e2e_vs_trl_real, the same comparison on it (4 steps, 1 warm-up)")
    ap.add_argument("--mfu-steps", type=int, help="timed train steps per model in mfu (default 5, quick 3)")
    ap.add_argument("--grpovi-steps", type=int, help="steps per run in grpovi_vs_grpo (default 100, quick 50)")
    ap.add_argument("--grpovi-seeds", type=int, nargs="+", help="seeds in grpovi_vs_grpo (default 0 1 2, quick 0)")
    args = ap.parse_args()
    q = args.quick
    e2e_steps = args.e2e_steps or (30 if q else 100)
    mfu_steps = args.mfu_steps or (3 if q else 5)
    g_steps = args.grpovi_steps or (50 if q else 100)
    g_seeds = args.grpovi_seeds or ([0] if q else [0, 1, 2])
    g_every = max(1, g_steps // 4)

    jobs = [
        ("e2e_vs_trl", ["bench/e2e_vs_trl.py", "--steps", str(e2e_steps)], ["e2e_vs_trl.md"], fig_e2e),
        ("mfu", ["bench/mfu.py", "--steps", str(mfu_steps)], ["mfu.md"], fig_mfu),
        ("grpovi_vs_grpo", ["bench/grpovi_vs_grpo.py", "--steps", str(g_steps), "--eval-every", str(g_every),
                            "--seeds", *map(str, g_seeds)], ["grpovi_vs_grpo.md", "grpovi_vs_grpo.png"],
         fig_grpovi_vs_grpo),
        ("grpovi_scaling", ["bench/grpovi_scaling.py"], ["grpovi_scaling.md"], fig_scaling),
    ]
    if args.e2e_model:
        jobs.append(("e2e_vs_trl_real", ["bench/e2e_vs_trl.py", "--model", str(args.e2e_model), "--steps", "4",
                                         "--warmup", "1"], ["e2e_vs_trl_real.md"], fig_e2e_real))
    if (ROOT / "bench" / "generation.py").is_file():
        quick_gen = ["--models", "tiny-llama", "--batches", "8", "32"] if q else []
        jobs.append(("generation", ["bench/generation.py", *quick_gen, "--out", "bench/results/generation.md"],
                     ["generation.md"], fig_generation))
    if (ROOT / "bench" / "realloc.py").is_file():
        quick_realloc = ["--models", "tiny-llama", "small-llama"] if q else []
        jobs.append(("realloc", ["bench/realloc.py", *quick_realloc, "--out", "bench/results/realloc.md"],
                     ["realloc.md"], fig_realloc))
    if (ROOT / "bench" / "planner.py").is_file():
        quick_planner = ["--rounds", "1", "--steps", "8"] if q else []
        jobs.append(("planner", ["bench/planner.py", *quick_planner, "--out", "bench/results/planner.md"],
                     ["planner.md"], fig_planner))
    jobs.append(("estimators", ["bench/estimators.py", *(["--steps", "100", "--seeds", "0"] if q else [])],
                 ["estimators.md", "estimators.png"], fig_estimators))
    jobs.append(("lora", ["bench/lora.py", *(["--steps", "30", "--eval-every", "15"] if q else [])],
                 ["lora.md", "lora.png"], fig_lora))
    jobs.append(("async", ["bench/async.py", *(["--steps", "8", "--workers", "2"] if q else [])], ["async.md"], fig_async))
    jobs.append(("stability", ["bench/stability.py",
                               *(["--sft-steps", "200", "--ppo-steps", "20", "--rm-steps", "100"] if q else [])],
                 ["stability.md", "stability.png"], fig_stability))
    jobs.append(("chaos", ["bench/chaos.py", *(["--kills", "4", "--steps", "8", "--save-every", "2",
                                                "--hostile-steps", "1"] if q else [])], ["chaos.md"], fig_chaos))
    jobs.append(("multiturn", ["bench/multiturn.py", *(["--latency-ms", "0", "20"] if q else [])], ["multiturn.md"],
                 fig_multiturn))
    jobs.append(("pipeline", ["bench/pipeline.py", *(["--micro-batches", "4", "--repeats", "1"] if q else [])],
                 ["pipeline.md"], fig_pipeline))
    jobs.append(("fusion", ["bench/fusion.py", "--migrate", "0.25",
                            *(["--steps", "3", "--workers", "2", "--preset", "cpu"] if q else [])],
                 ["fusion.md", "fusion.png"], fig_fusion))
    jobs.append(("packing", ["bench/packing.py", *(["--steps", "3"] if q else [])], ["packing.md"], fig_packing))
    if (ROOT / "bench" / "gpu_smoke.py").is_file():
        jobs.append(("gpu_smoke", ["bench/gpu_smoke.py", *(["--sft-steps", "50", "--grpo-steps", "10"] if q else [])],
                     ["gpu_smoke.md"], lambda r: "; ".join(f"{x['run']}: {x['accuracy'] or 0:.1%}, {x['time_s']:.0f} s"
                     + (f" (**{x['error']}**)" if x["error"] else "") for x in r["summary"]["rows"])
                     if r["summary"] else "skipped: no CUDA on this machine"))
    selected = [j for j in jobs if (not args.only or j[0] in args.only) and j[0] not in args.skip]

    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = ROOT / "runs" / "bench" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = load_avg()
    t0 = time.perf_counter()
    ran = set()
    failed = False
    for name, argv, files, fig in selected:
        r = run(name, argv, log_dir)
        ran.add(name)
        failed |= r["rc"] != 0
        if name == "grpovi_scaling" and r["rc"] == 0:  # the script prints its table; keep it as the result file
            (RESULTS / "grpovi_scaling.md").write_text(
                "# GRPOVI cost (bench/grpovi_scaling.py)\n\n"
                f"command: `{r['cmd']}` (CPU, {os.cpu_count()}-core machine; run by bench/run_all.py)\n\n"
                "```\n" + r["out"].rstrip("\n") + "\n```\n")
    total = time.perf_counter() - t0

    # The table holds the last run of every benchmark: this invocation's, or an earlier one's (marked).
    results = []
    for name, argv, files, fig in jobs:
        r = load_record(name, log_dir)
        if r is None:
            continue
        try:
            r["figures"] = fig(r) if r["rc"] == 0 else f"**failed** (exit {r['rc']}; log: runs/bench/logs/{name}.log)"
        except Exception as e:  # a summary that cannot be read must not lose the other results
            r["figures"] = f"could not read the key figures ({type(e).__name__}: {e})"
        if name not in ran:
            r["figures"] += f" *(earlier run, {r['finished']})*"
        r["files"] = files
        results.append(r)

    md = [
        "# Benchmark results",
        "",
        f"Regenerated by `make bench` (`{python_cmd()} bench/run_all.py{' --quick' if q else ''}`), {started}, "
        f"in {total / 60:.1f} min" + (f" (this time: {', '.join(sorted(ran))}; the other rows are from earlier runs)"
                                      if len(ran) < len(results) else "") + ".",
        "",
        f"- device: CPU, {cpu_name()}, {os.cpu_count()} cores (the project's shared 2-core machine; other jobs may "
        "run beside the benchmarks, so absolute times vary: compare the ratios measured within one benchmark)",
        f"- versions: {versions()}",
        f"- reflow: {git_state()}",
        f"- load average (1/5/15 min) at the start: {load_start}; after each benchmark: see the table",
        "",
        "| benchmark | command | key figures | wall | load after | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        links = ", ".join(f"[{f}]({f})" for f in r["files"] if (RESULTS / f).is_file()) or "-"
        md.append(f"| {r['name']} | `{r['cmd']}` | {r['figures']} | {r['wall']:.0f} s | {r['load_after']} | {links} |")
    md += [
        "",
        "What each one measures:",
        "",
        "- **e2e_vs_trl**: reflow's GRPO loop against TRL's `GRPOTrainer` (a benchmark-only dependency, installed in "
        "`.venv-bench`), same model, prompts, batch (32 prompts x 8 samples), sampling, optimizer, LR schedule, loss "
        "aggregation, reward and number of steps, interleaved step by step in one process; per-stage times and the "
        "equal-work checks are in the result file.",
        "- **mfu**: FLOP/s of `TrainEngine.step` on SFT-like batches as a share of the measured peak fp32 matmul "
        "FLOP/s, for three model sizes.",
        "- **grpovi_vs_grpo**: held-out accuracy and training reward of GRPOVI and GRPO from the same SFT model.",
        "- **grpovi_scaling**: the O(n log n) GRPOVI variance-increase pass against the O(n^2) brute force.",
    ]
    # what the benchmarks that ran only on request (or when present) measure, in this order
    ran = {r["name"] for r in results}
    optional = {
        "fusion": ("- **fusion**: PPO step time with inter-stage fusion (fusion.inter_stage) against without, on a "
            "model with long-tailed response lengths, 2 and 4 Ray CPU workers, with the planner's predicted step "
            "times (bench/fusion.py)."),
        "generation": ("- **generation**: reflow's generation engine against transformers `model.generate` "
            "(bench/generation.py)."),
        "realloc": ("- **realloc**: reflow's planned parameter reallocation between layouts (identical, overlapping and "
            "disjoint meshes) against gathering the whole model everywhere, and against the bandwidth bound "
            "(bytes / measured gloo link bandwidth) (bench/realloc.py)."),
        "planner": ("- **planner**: the execution-plan planner's predicted iteration time (calibrated by `reflow profile`) "
            "against the measured one for PPO under 6 plans on 4 Ray CPU workers, and the searched plan against "
            "the built-in ones (bench/planner.py)."),
        "estimators": ("- **estimators**: GRPO, DAPO, GSPO and CISPO recipes on the demo task from the same SFT model, "
            "3 seeds (bench/estimators.py)."),
        "async": ("- **async**: asynchronous training (rollout.max_staleness 1, 2; and 2 with partial rollout) against "
            "synchronous on 2 and 4 Ray "
            "CPU workers, generation and training on different ranks: samples/s and reward per step "
            "(bench/async.py)."),
        "packing": ("- **packing**: forward + backward and forward-only time of one GRPO-shaped micro-batch (a 192-token "
            "prompt and 8 responses of 64 tokens) without prefix sharing (padded, packed) and with it (dense "
            "mask, flex_attention), interleaved in one process (bench/packing.py)."),
        "stability": ("- **stability**: selective rehearsal against forgetting (the second task's accuracy after PPO on the "
            "first) and the advantage model against reward models on mixed-length and length-biased "
            "pairs (accuracy, response length, score distributions per task) (bench/stability.py)."),
        "gpu_smoke": ("- **gpu_smoke**: the demo's SFT and GRPO on CUDA in this process, on 1 Ray worker and (with 2 GPUs) on "
            "2, with NCCL and a bf16 run (bench/gpu_smoke.py; skipped without CUDA)."),
    }
    md += [text for name, text in optional.items() if name in ran]
    (RESULTS / "README.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
