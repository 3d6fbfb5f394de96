"""GPU smoke test: the demo's SFT + GRPO on CUDA, in one process and on Ray workers (NCCL), fp32 and bf16.

    .venv/bin/python bench/gpu_smoke.py [--sft-steps 100] [--grpo-steps 20] [--root runs/gpu_smoke] [--require-cuda]

Without CUDA it says so and exits 0 (1 with --require-cuda). On CUDA, from the tiny-llama model (random init)
and the 2-digit addition data of `reflow demo`, with runtime.device=cuda:

    sft   configs/sft_addition.yaml   max_steps=N       runtime.workers=0, then runtime.workers=1
    grpo  configs/grpo_addition.yaml  trainer.steps=N   from the workers=0 SFT model: workers=0, workers=1,
          workers=2 runtime.plan=separate (with >= 2 GPUs), and workers=0 actor.precision=bf16

Per run: wall time (Ray and worker start included), final held-out exact-match accuracy (the last eval/accuracy
row of its metrics.jsonl), and what its workers really run on (asked of each worker: device and
torch.distributed backend; nccl expected with workers >= 1). Checks: every run finishes with finite metrics and
an accuracy, every Ray worker is on CUDA with the nccl backend. Prints a markdown table, writes it to
bench/results/gpu_smoke.md (CUDA runs only) and prints `BENCH_SUMMARY {json}` last; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RESULTS = ROOT / "bench" / "results"


def probe(worker) -> dict:
    """Runs inside a Ray worker (actor.__ray_call__): what it really computes on."""
    import torch.distributed as dist

    return {"device": str(worker.device), "backend": dist.get_backend() if dist.is_initialized() else None}


def run(kind: str, name: str, overrides: list[str]) -> dict:
    """One experiment through the same code path as `reflow sft|train CONFIG key=value ...` -> a result row."""
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig, SFTConfig
    from reflow.experiments.rl import RLExperiment
    from reflow.experiments.supervised import SFTExperiment
    from reflow.utils.metrics import read_metrics

    cls, schema, file = {"sft": (SFTExperiment, SFTConfig, "sft_addition.yaml"),
                         "grpo": (RLExperiment, RLConfig, "grpo_addition.yaml")}[kind]
    cfg = load_config(schema, CONFIGS / file, overrides)
    rt = cfg.runtime
    role = cfg.model if kind == "sft" else cfg.actor
    row = {"run": name, "workers": rt.workers, "plan": rt.plan if rt.workers else "one process",
           "precision": role.precision, "time_s": None, "accuracy": None, "devices": "-", "backend": "-", "error": None}
    print(f"\n=== {name}: {kind} " + " ".join(overrides), flush=True)
    t0 = time.perf_counter()
    try:
        with cls(cfg) as exp:
            transport = exp.executor.transport
            if rt.workers:
                import ray

                info = ray.get([w.__ray_call__.remote(probe) for w in transport.workers])
            else:
                info = [probe(transport.worker)]
            row["devices"] = ",".join(i["device"] for i in info)
            row["backend"] = ",".join(sorted({str(i["backend"]) for i in info})) if rt.workers else "-"
            exp.run()
        row["time_s"] = time.perf_counter() - t0
        rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
        evals = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
        row["accuracy"] = evals[-1] if evals else None
        bad = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
        checks = {f"non-finite metrics: {', '.join(bad)}": bool(bad), "no eval/accuracy row": row["accuracy"] is None,
                  f"not on CUDA: {row['devices']}": not all(i["device"].startswith("cuda") for i in info),
                  f"backend {row['backend']}, expected nccl": rt.workers > 0 and row["backend"] != "nccl"}
        row["error"] = "; ".join(k for k, failed in checks.items() if failed) or None
    except Exception as e:  # noqa: BLE001 - a failed run is a row of the table; the others still run
        traceback.print_exc()
        row["time_s"] = time.perf_counter() - t0
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    print(f"=== {name}: {row}", flush=True)
    return row


def table(rows: list[dict], header: str) -> str:
    md = [header, "", "| run | workers | plan | precision | time (s) | held-out accuracy | worker devices | backend | "
          "check |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-"
        check = "ok" if r["error"] is None else f"**{r['error']}**"
        md.append(f"| {r['run']} | {r['workers']} | {r['plan']} | {r['precision']} | {r['time_s']:.1f} | {acc} | "
                  f"{r['devices']} | {r['backend']} | {check} |")
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=100, help="SFT optimizer steps per run (max_steps)")
    ap.add_argument("--grpo-steps", type=int, default=20, help="GRPO steps per run (trainer.steps)")
    ap.add_argument("--root", default="runs/gpu_smoke", help="model, data and run folders go here")
    ap.add_argument("--require-cuda", action="store_true", help="exit 1 instead of 0 when CUDA is unavailable")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_smoke: CUDA is not available (torch {torch.__version__}, cuda build {torch.version.cuda}); "
              "nothing to measure on this machine" + ("" if args.require_cuda else " (skipped, exit 0)"))
        return 1 if args.require_cuda else 0

    import torch.distributed as dist

    from reflow.data.tasks import write_task
    from reflow.experiments.demo import DATA_OPTIONS
    from reflow.models.presets import init_model

    n_gpu = torch.cuda.device_count()
    root = (ROOT / args.root).resolve()
    t0 = time.perf_counter()
    model = init_model("tiny-llama", root / "model", seed=0)
    write_task("addition", root / "data", **DATA_OPTIONS)
    data = root / "data"
    print(f"{n_gpu} x {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"NCCL available: {dist.is_nccl_available()} {torch.cuda.nccl.version() if dist.is_nccl_available() else ''}"
          f"; bf16 supported: {torch.cuda.is_bf16_supported()}; init {time.perf_counter() - t0:.1f}s", flush=True)

    common = ["runtime.device=cuda", f"data.eval={data / 'test.jsonl'}"]
    rows = []
    for w in (0, 1):
        rows.append(run("sft", f"sft w{w}", [f"output_dir={root / f'sft-w{w}'}", f"model.path={model}",
                                             f"data.train={data / 'sft.jsonl'}", f"max_steps={args.sft_steps}",
                                             "progress=false", f"runtime.workers={w}", *common]))
    grpo = [f"actor.path={root / 'sft-w0' / 'final'}", f"data.train={data / 'train.jsonl'}",
            f"trainer.steps={args.grpo_steps}", "trainer.progress=false", "trainer.save_every=0", *common]
    runs = [("grpo w0", ["runtime.workers=0"]), ("grpo w1", ["runtime.workers=1"])]
    if n_gpu >= 2:
        runs.append(("grpo w2 separate", ["runtime.workers=2", "runtime.plan=separate"]))
    runs.append(("grpo w0 bf16", ["runtime.workers=0", "actor.precision=bf16"]))
    for name, extra in runs:
        rows.append(run("grpo", name, [f"output_dir={root / name.replace(' ', '-')}", *grpo, *extra]))

    header = (f"# GPU smoke test (bench/gpu_smoke.py)\n\n`{Path(sys.executable).name} bench/gpu_smoke.py "
              f"--sft-steps {args.sft_steps} --grpo-steps {args.grpo_steps}` on {n_gpu} x "
              f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; "
              f"total {time.perf_counter() - t0:.0f} s. Accuracy: greedy exact match on "
              f"{DATA_OPTIONS['n_test']} held-out prompts at the end of each run.")
    md = table(rows, header)
    print("\n" + md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_smoke.md").write_text(md)
    failed = [r["run"] for r in rows if r["error"]]
    print("BENCH_SUMMARY " + json.dumps({"gpus": n_gpu, "rows": rows, "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
