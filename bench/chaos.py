"""Chaos: the demo's GRPO stage killed with SIGKILL at random moments and resumed, and hostile reward functions.

    .venv/bin/python bench/chaos.py [--kills 20] [--workers 0 2] [--steps 20] [--save-every 4]
                                    [--hostile-steps 3] [--out bench/results/chaos.md]

Kills. Workload: configs/grpo_addition.yaml (the SFT model of `reflow demo`, 32 prompts x 8 samples of 2-digit
addition, exact-match reward), shortened to --steps steps with a checkpoint every --save-every and an eval
every 2 x --save-every. For each transport (runtime.workers 0 = this process, 2 = two Ray workers) one run
goes uninterrupted; then --kills runs are each SIGKILLed (the `reflow train` process only, as the OOM killer or
a preempted node would) at a moment drawn uniformly over a run's wall time (the uninterrupted run's, or the
shortest run seen so far when one finished before its kill was due), and resumed with
`--resume` (or rerun from the start when the kill came before the first checkpoint). Reported per transport:
how many end with metrics.jsonl equal to the uninterrupted run's (every value but the timings: exactly, and
within 1e-6), the step each kill hit and resumed from, the time lost per kill (killed + resumed wall time
minus the uninterrupted run's) and processes left behind by the kill.

Hostile rewards. The same stage for --hostile-steps steps with a reward function from a file (so it runs in the
reward sandbox, reward.timeout_s=2) that misbehaves on about a third of the samples (by the response's text)
and returns the exact-match reward on the rest: an endless loop, a 10 GB allocation, a fork bomb, a socket to
a listener this script opens, a write outside its folder, os._exit, a segfault. Reported per case: whether
the run completed, reward/errors per step, the step time against the well-behaved reward's, whether the
listener saw a connection and whether the file outside appeared.

Prints markdown tables, writes them to --out, and prints `BENCH_SUMMARY {json}` last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time/", "throughput/", "run/restarts")


def train_argv(out: Path, workers: int, steps: int, save_every: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reflow.cli", "train", str(ROOT / "configs/grpo_addition.yaml"),
            f"actor.path={ROOT / 'runs/demo/sft/final'}", f"data.train={ROOT / 'data/addition/train.jsonl'}",
            f"data.eval={ROOT / 'data/addition/test.jsonl'}", "data.eval_size=64", f"trainer.steps={steps}",
            f"trainer.save_every={save_every}", f"trainer.eval_every={2 * save_every}", "trainer.progress=false",
            f"runtime.workers={workers}", "runtime.plan=separate" if workers else "runtime.plan=colocate",
            f"output_dir={out}", *extra]


def rows(out: Path) -> list[dict]:
    from reflow.utils.metrics import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(out / "metrics.jsonl")]


def same(a: list[dict], b: list[dict], rel: float) -> bool:
    if [r.get("step") for r in a] != [r.get("step") for r in b] or any(x.keys() != y.keys() for x, y in zip(a, b)):
        return False
    for x, y in zip(a, b):
        for k in x:
            if x[k] is None or y[k] is None:
                if x[k] is not y[k]:
                    return False
            elif abs(x[k] - y[k]) > rel * abs(x[k]) + (1e-12 if rel else 0.0):
                return False
    return True


def leftovers(pgid: int) -> int:
    """Processes still alive 3 s after the kill in the run's process group (its Ray, a reward sandbox); then
    killed, so the next run starts clean. (Ray's raylet, GCS and workers go with their driver within about
    3 s; its dashboard and runtime-env agents outlive it by a minute or so and then exit on their own.)"""
    time.sleep(3.0)  # what dies with its parent has had time to go
    alive = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid:
                    alive += 1
            except (ProcessLookupError, PermissionError):
                pass
    if alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def timed(argv: list[str], log) -> tuple[int, float]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return p.returncode, time.perf_counter() - t0


def kills(workers: int, n: int, steps: int, save_every: int, work: Path, rng: random.Random, log) -> dict:
    from reflow.utils import checkpoint as ckpt_lib

    ref = work / f"w{workers}-whole"
    rc, whole_s = timed(train_argv(ref, workers, steps, save_every), log)
    assert rc == 0, f"the uninterrupted run failed (rc {rc}); see the log"
    want = rows(ref)
    runs = []
    horizon = whole_s  # kill moments are drawn over a run's duration: the shortest one seen so far
    for i in range(n):
        out = work / f"w{workers}-kill{i}"
        argv = train_argv(out, workers, steps, save_every)
        at = rng.uniform(0.0, horizon)
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=at)
            finished = True  # the run ended before the kill was due (it ran faster this time)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            finished = False
        killed_s = time.perf_counter() - t0
        if finished:
            horizon = min(horizon, killed_s)
        left = leftovers(p.pid)
        done = [r["step"] for r in (rows(out) if (out / "metrics.jsonl").exists() else []) if "reward/mean" in r]
        found = ckpt_lib.list_checkpoints(out)
        resumed_from = found[-1][0] if found else 0
        rc, resume_s = (0, 0.0) if finished else timed(argv + (["--resume"] if found else []), log)
        got = rows(out) if rc == 0 else []
        runs.append({"kill_at_s": at, "killed": not finished, "steps_logged": max(done, default=0),
                     "resumed_from": resumed_from, "rc": rc, "exact": same(want, got, 0.0),
                     "close": same(want, got, 1e-6), "lost_s": killed_s + resume_s - whole_s, "leftover": left})
        print(f"  workers={workers} kill {i + 1}/{n}: at {at:.1f}s (step {max(done, default=0)} logged), "
              f"resumed from {resumed_from}: {'identical' if runs[-1]['exact'] else 'DIFFERENT'} "
              f"(lost {runs[-1]['lost_s']:.1f}s, {left} processes left)", flush=True)
    return {"workers": workers, "whole_s": whole_s, "runs": runs}


HOSTILE = {
    "well-behaved": "pass",
    "endless loop": "while True:\n                pass",
    "10 GB allocation": "x = bytearray(10 * 1024**3)",
    # bounded (children sleep, then exit) so that a machine without the sandbox's process limit survives it
    "fork bomb": "for _ in range(1000):\n                if os.fork() == 0:\n                    time.sleep(5)\n"
                 "                    os._exit(0)",
    "socket": "s = socket.create_connection(('127.0.0.1', PORT), timeout=1); s.sendall(b'x')",
    "write outside": "open(OUTSIDE, 'w').write('escaped')",
    "os._exit": "os._exit(3)",
    "segfault": "ctypes.string_at(0)",
}


def hostile_file(path: Path, body: str, port: int, outside: Path) -> None:
    path.write_text(f"""import ctypes, os, socket, time
PORT, OUTSIDE = {port}, {str(outside)!r}


def reward(prompts, responses, answers):
    out = []
    for r, a in zip(responses, answers):
        if sum(map(ord, r)) % 3 == 0:  # about a third of the samples, the same ones on every retry
            {body}
        out.append(1.0 if r.strip() == (a or '').strip() else 0.0)
    return out
""")


def hostile(steps: int, work: Path, log) -> list[dict]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    results = []
    for name, body in HOSTILE.items():
        tag = name.replace(" ", "_").replace(".", "")
        outside = work / f"outside-{tag}.txt"
        fn = work / f"reward_{tag}.py"
        hostile_file(fn, body, port, outside)
        out = work / f"hostile-{tag}"
        rc, wall = timed(train_argv(out, 0, steps, 0, f"reward.fn={fn}:reward", "reward.timeout_s=2",
                                    "trainer.eval_every=0", "data.eval=null"), log)
        got = rows(out) if (out / "metrics.jsonl").exists() else []
        from reflow.utils.metrics import read_metrics

        step_s = [r["time/step"] for r in read_metrics(out / "metrics.jsonl") if "time/step" in r] if got else []
        try:
            listener.accept()[0].close()
            connected = True
        except BlockingIOError:
            connected = False
        results.append({"case": name, "rc": rc, "errors": [r.get("reward/errors") for r in got if "reward/mean" in r],
                        "step_s": statistics.median(step_s) if step_s else None, "connected": connected,
                        "escaped": outside.exists(), "wall_s": wall})
        print(f"  hostile '{name}': rc {rc}, reward/errors {results[-1]['errors']}, step "
              f"{results[-1]['step_s'] or 0:.2f}s, connected {connected}, wrote outside {outside.exists()}", flush=True)
    listener.close()
    return results


def table(kill_results: list[dict], hostile_results: list[dict], args) -> str:
    md = ["# Chaos: kill anywhere, resume exactly; hostile rewards", "",
          f"`.venv/bin/python bench/chaos.py --kills {args.kills} --workers {' '.join(map(str, args.workers))} "
          f"--steps {args.steps} --save-every {args.save_every} --hostile-steps {args.hostile_steps}`", "",
          f"The demo's GRPO stage shortened to {args.steps} steps (32 prompts x 8 samples, checkpoint every "
          f"{args.save_every} steps), SIGKILLed at a uniform random moment of the uninterrupted run's wall time, "
          "then `--resume`d.", "",
          "| transport | uninterrupted | kills | identical metrics | within 1e-6 | killed before the 1st checkpoint "
          "| time lost per kill (median, max) | processes left |", "|---|---|---|---|---|---|---|---|"]
    for k in kill_results:
        runs = [r for r in k["runs"] if r["killed"]]
        lost = [r["lost_s"] for r in runs] or [0.0]
        where = "in-process" if k["workers"] == 0 else f"{k['workers']} Ray workers"
        md.append(f"| {where} | "
                  f"{k['whole_s']:.1f} s | {len(runs)} of {len(k['runs'])} | {sum(r['exact'] for r in runs)}/{len(runs)} | "
                  f"{sum(r['close'] for r in runs)}/{len(runs)} | {sum(r['resumed_from'] == 0 for r in runs)} | "
                  f"{statistics.median(lost):.1f} s, {max(lost):.1f} s | {sum(r['leftover'] for r in runs)} |")
    md += ["", "Per kill: (moment of the kill, steps logged by then, checkpoint resumed from, identical)", ""]
    for k in kill_results:
        md.append(f"- workers={k['workers']}: " + ", ".join(
            f"({r['kill_at_s']:.1f}s, {r['steps_logged']}, {r['resumed_from']}, {'yes' if r['exact'] else 'NO'})"
            for r in k["runs"]))
    if hostile_results:
        base = next((h["step_s"] for h in hostile_results if h["case"] == "well-behaved"), None)
        md += ["", f"## Hostile rewards ({args.hostile_steps} steps each, reward.timeout_s=2, sandboxed)", "",
               "| case | run completed | reward/errors per step (of 256) | step time | vs well-behaved | "
               "socket reached the listener | file written outside |", "|---|---|---|---|---|---|---|"]
        for h in hostile_results:
            ratio = f"{h['step_s'] / base:.1f}x" if base and h["step_s"] else "-"
            errs = ", ".join(f"{e:.0f}" for e in h["errors"] if e is not None) or "-"
            completed = "yes" if h["rc"] == 0 else f"no (rc {h['rc']})"
            md.append(f"| {h['case']} | {completed} | {errs} | "
                      f"{h['step_s'] or 0:.2f} s | {ratio} | {'YES' if h['connected'] else 'no'} | "
                      f"{'YES' if h['escaped'] else 'no'} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--hostile-steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/chaos.md"))
    args = ap.parse_args()
    if not (ROOT / "runs/demo/sft/final/config.json").is_file():
        subprocess.run([sys.executable, "-m", "reflow.cli", "demo"], cwd=ROOT, check=True)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="reflow-chaos-"))
    with open(work / "runs.log", "w") as log:
        print(f"work folder {work} (run logs in runs.log)", flush=True)
        kill_results = [kills(w, args.kills, args.steps, args.save_every, work, rng, log) for w in args.workers]
        hostile_results = hostile(args.hostile_steps, work, log) if args.hostile_steps else []
    md = table(kill_results, hostile_results, args)
    print(md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    summary = {"kills": [{"workers": k["workers"], "killed": sum(r["killed"] for r in k["runs"]),
                          "identical": sum(r["exact"] for r in k["runs"] if r["killed"]),
                          "median_lost_s": statistics.median([r["lost_s"] for r in k["runs"] if r["killed"]] or [0])}
                         for k in kill_results],
               "hostile": [{"case": h["case"], "completed": h["rc"] == 0} for h in hostile_results]}
    print("BENCH_SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
