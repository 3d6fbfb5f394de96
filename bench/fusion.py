"""Inter-stage fusion (fusion.inter_stage) against the unfused step, on a workload with long-tailed lengths.

    .venv/bin/python bench/fusion.py [--steps 6] [--workers 2 4] [--reps 1] [--chunk 8] [--migrate 0.25]
                                     [--out bench/results/fusion.md] [--hardware hw.yaml | --preset cpu]

Workload: PPO (actor, critic, reference, the `format` reward function or with --reward-model a reward
model) from a tiny-llama model fine-tuned
(`reflow sft`, cached in runs/bench/fusion/) on replies of random letters whose lengths are geometric (mean 10,
at most 90 letters): a model whose response lengths are long-tailed by training, not by a rule in the
generator. `--prompts` prompts x 4 samples per step, rollout.max_new_tokens 96. Ray CPU workers, one thread
each, generation and the per-sample inference on different ranks:

    2 workers: actor_gen, actor_train on rank 0; reward, ref_inf, critic_inf, critic_train on rank 1
    4 workers: actor_gen, actor_train d2 on ranks 0-1; reward and ref_inf on rank 2; critic_inf, critic_train on 3

Each configuration runs unfused and fused (fusion.chunk samples per chunk), `--reps` times, the order
alternating between repetitions, all in one Ray session; every run starts from the same model and seed.
Reported: median step time after one warm-up step, the fused / unfused ratio, busy and idle seconds per rank
from the runs' timelines, whether every logged metric (samples, rewards, losses, KL) is identical, and the
measured length distribution (p50, p90, max of the rollouts' samples). The machine is shared: timings move by
several percent between runs of the same configuration, which the repetitions show. Writes --out and the
timeline PNG of the last fused run beside it, and prints `BENCH_SUMMARY {json}` last.

Long-tail migration (`--migrate F`, fusion.migrate_below; 0 = not measured): two more fused runs per worker
count on a plan where generation has a replica on every rank and each consumer shares a rank with one
(`SHARED`), with and without migration. Without it a consumer's chunks on a generating rank wait until that
rank's replica has decoded its last sample; with it the long tail moves onto one replica once fewer than F x
the batch are unfinished, and the other ranks run the chunks while it decodes.

Predicted vs measured (as bench/planner.py): the planner's simulated step time (reflow.planner.evaluate) of
each plan unfused and fused (fusion.chunk as measured), from the response lengths the first unfused run
logged (its metrics response_len/min, p10, ..., max: reflow.planner.config), next to the measured medians,
with the ratio predicted / measured and the predicted fused / unfused. Hardware figures: by default
`reflow profile --config` on this workload before the runs (reflow.planner.profile, a few minutes:
calibrated), or --hardware FILE from an earlier profile, or --preset NAME (uncalibrated: a preset's
figures; the ratios then say little about this machine).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs/bench/fusion"

PLANS = {
    2: {"actor_gen": ("0", "d1t1p1"), "actor_train": ("0", "d1t1p1"), "reward": ("1", "d1t1p1"),
        "ref_inf": ("1", "d1t1p1"), "critic_inf": ("1", "d1t1p1"), "critic_train": ("1", "d1t1p1")},
    4: {"actor_gen": ("0-1", "d2t1p1"), "actor_train": ("0-1", "d2t1p1"), "reward": ("2", "d1t1p1"),
        "ref_inf": ("2", "d1t1p1"), "critic_inf": ("3", "d1t1p1"), "critic_train": ("3", "d1t1p1")},
}
# generation on every rank, each per-sample consumer on one of them (see --migrate)
SHARED = {
    2: {"actor_gen": ("0-1", "d2t1p1"), "actor_train": ("0-1", "d2t1p1"), "reward": ("0", "d1t1p1"),
        "ref_inf": ("0", "d1t1p1"), "critic_inf": ("1", "d1t1p1"), "critic_train": ("1", "d1t1p1")},
    4: {"actor_gen": ("0-3", "d4t1p1"), "actor_train": ("0-3", "d4t1p1"), "reward": ("0", "d1t1p1"),
        "ref_inf": ("1", "d1t1p1"), "critic_inf": ("2", "d1t1p1"), "critic_train": ("3", "d1t1p1")},
}
MODES = {"unfused": (PLANS, False, 0.0), "fused": (PLANS, True, 0.0)}  # mode -> (plans, fused, migrate_below)


def letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def long_tailed_model(sft_steps: int) -> Path:
    """tiny-llama fine-tuned on prompts 'abc:' -> random letters, length 1 + Geometric(1/10) capped at 90."""
    final = CACHE / f"sft-{sft_steps}" / "final"
    if (final / "config.json").is_file():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for _ in range(4000):
        n = 1
        while rng.random() > 0.1 and n < 90:
            n += 1
        rows.append({"prompt": letters(rng, 3) + ":", "response": letters(rng, n)})
    (CACHE / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = [sys.executable, "-m", "reflow.cli"]
    if not (CACHE / "init/config.json").is_file():
        subprocess.run([*cli, "init-model", "--preset", "tiny-llama", "--out", str(CACHE / "init")], cwd=ROOT, check=True)
    subprocess.run([*cli, "sft", f"model.path={CACHE / 'init'}", f"data.train={CACHE / 'sft.jsonl'}",
                    f"output_dir={final.parent}", "batch_size=32", f"max_steps={sft_steps}", "model.optim.lr=3e-3",
                    "progress=false", "eval_every=0", "data.eval=null"], cwd=ROOT, check=True)
    return final


def reward_model(policy: Path) -> Path:
    """A reward-model folder: the fine-tuned model with a seeded random score head (a trained reward model's
    compute, with scores that vary between samples; a fresh head is zero and would leave only the KL term, whose
    whitened advantages at step 0 are float noise)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = policy.parent.parent / "reward-model"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def prompts_file(work: Path) -> Path:
    rng = random.Random(1)
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": letters(rng, 3) + ":", "answer": ""}) + "\n" for _ in range(512)))
    return path


def lengths(model: Path, prompts: Path, n: int) -> list[int]:
    """Response lengths of n samples from the model (the rollouts' sampling: temperature 1, 96 new tokens)."""
    from reflow.data.datasets import load_prompts
    from reflow.engines.generate import GenerationEngine, SamplingParams
    from reflow.models.load import load_policy, load_tokenizer

    tok = load_tokenizer(str(model))
    rows, _ = load_prompts(str(prompts), tok, max_prompt_len=64)
    engine = GenerationEngine(load_policy(str(model)), [tok.eos_token_id], tok.pad_token_id, 64)
    gens = engine.generate([rows[i % len(rows)].prompt_ids for i in range(n)], SamplingParams(96), keys=list(range(n)))
    return sorted(len(g.tokens) for g in gens)


def config(workers: int, fused: bool, args, model: Path, prompts: Path, out: Path, plan: Path | None = None,
           migrate: float = 0.0):
    """The PPO config of one run (output_dir `out`; runtime.plan `plan`, else the one-rank default)."""
    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig

    role = {"path": str(model), "micro_batch_tokens": 4096}
    return from_dict(RLConfig, {
        "output_dir": str(out), "actor": role, "critic": {**role, "path": None},
        "data": {"train": str(prompts), "eval": None},
        "rollout": {"prompts_per_step": args.prompts, "n": 4, "max_new_tokens": 96, "batch_size": 256},
        "reward": {"fn": None, "model": str(reward_model(model))} if args.reward_model else {"fn": "format"},
        "algo": {"name": "ppo", "kl_coef": 0.01},
        "trainer": {"steps": args.steps, "progress": False, "eval_every": 0, "save_every": 0},
        "runtime": {"workers": workers, "timeline": True, "timeout_s": 300, **({"plan": str(plan)} if plan else {})},
        "fusion": {"inter_stage": fused, "chunk": args.chunk, "migrate_below": migrate}})


def reprefill_cost(model: Path, rows: int = 4, so_far: tuple[int, ...] = (16, 48, 90)) -> list[dict]:
    """What moving `rows` unfinished rows costs the replica that adopts them (long-tail migration re-prefills
    prompt + tokens so far), against a decode step of as many rows, and the K/V bytes a cache copy would move
    instead: per length of the tokens so far, the median of 5 timings, one thread."""
    import time

    import torch

    from reflow.engines.generate import GenerationEngine, SamplingParams
    from reflow.models.load import load_policy, load_tokenizer

    torch.set_num_threads(1)
    tok, policy = load_tokenizer(str(model)), load_policy(str(model)).eval()
    cfg = policy.config
    engine = GenerationEngine(policy, [tok.eos_token_id], tok.pad_token_id, rows)
    out = []
    for n in so_far:
        prompts = [[5 + (7 * i + j) % 200 for j in range(4 + n)] for i in range(rows)]  # 4 prompt tokens + n

        def timed(new: int) -> float:  # 1 new token: the prefill only; 2: one decode step more
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                engine.generate(prompts, SamplingParams(new), keys=list(range(rows)), start_positions=[n] * rows)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        prefill = timed(1)
        step = max(timed(2) - prefill, 1e-9)
        kv = rows * (4 + n) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * \
            (cfg.hidden_size // cfg.num_attention_heads) * policy.dtype.itemsize
        out.append({"rows": rows, "tokens_so_far": n, "reprefill_ms": prefill * 1e3, "decode_step_ms": step * 1e3,
                    "kv_bytes": kv})
    return out


def run(workers: int, mode: str, args, model: Path, prompts: Path, work: Path) -> dict:
    from reflow.experiments.rl import RLExperiment
    from reflow.runtime.plan import Plan
    from reflow.utils.plot import busy_by_rank, read_timeline

    plans, fused, migrate = MODES[mode]
    out = work / f"w{workers}-{mode.replace(' ', '_')}-{len(list(work.glob(f'w{workers}-*')))}"
    out.mkdir(parents=True)
    plan = out / "plan.yaml"
    Plan.from_dict({"calls": {c: {"ranks": r, "layout": lay} for c, (r, lay) in plans[workers].items()}},
                   workers).save(plan)
    cfg = config(workers, fused, args, model, prompts, out, plan, migrate)
    with RLExperiment(cfg) as exp:
        exp.run()
        rows = exp.history
    busy = busy_by_rank(read_timeline(out / "timeline.json"))
    return {"workers": workers, "fused": fused, "mode": mode, "dir": str(out),
            "median_step_s": statistics.median(r["time/step"] for r in rows[1:]),
            "step_s": [r["time/step"] for r in rows],
            "idle": {r: round(i / (b + i), 3) for r, (b, i) in busy.items()},
            "busy_s": {r: round(b, 2) for r, (b, _) in busy.items()},
            "metrics": [{k: v for k, v in r.items() if not k.startswith(("time", "throughput"))} for r in rows]}


def hardware_figures(args, model: Path):
    """(Hardware, how it was obtained): --hardware FILE, --preset NAME, or `reflow profile --config` now."""
    from reflow.planner.hardware import Hardware, hardware

    if args.hardware:
        return Hardware.load(args.hardware), f"from {args.hardware} (`reflow profile`)"
    if args.preset:
        return hardware(args.preset), f"preset {args.preset} (uncalibrated)"
    from reflow.planner.profile import profile

    with tempfile.TemporaryDirectory(prefix="reflow-fusion-profile-") as tmp:
        cfg = config(max(args.workers), False, args, model, prompts_file(Path(tmp)), Path(tmp) / "run")
        fit, _ = profile(max(args.workers), "tiny-llama", config=cfg)
    print(fit.report(), flush=True)
    saved = CACHE / "hardware.yaml"  # kept, so the predictions can be re-derived: --hardware runs/bench/fusion/...
    fit.hardware.save(saved)
    return fit.hardware, f"`reflow profile --config` on this workload, {max(args.workers)} workers (saved: {saved})"


def predict(workers: int, args, model: Path, prompts: Path, results: list[dict], hw) -> dict:
    """The planner's step time of the plan of `workers` unfused and fused, from the lengths the first unfused
    run measured (its metrics.jsonl), with the measured medians (pooled over the repetitions)."""
    from reflow.planner.config import problem_for_config
    from reflow.planner.search import with_fusion
    from reflow.planner.simulator import evaluate
    from reflow.runtime.plan import Plan

    mine = [r for r in results if r["workers"] == workers]
    first = next(r for r in mine if r["mode"] == "unfused")
    problem = problem_for_config(config(workers, False, args, model, prompts, Path(first["dir"])), workers, hw)
    plan = Plan.load(Path(first["dir"]) / "plan.yaml", workers)
    out = {"workers": workers, "lengths": problem.workload.gen_lens}
    for fused in (False, True):
        out[fused] = {"predicted": evaluate(with_fusion(problem, (fused, args.chunk)), plan).time,
                      "measured": statistics.median(r["median_step_s"] for r in mine
                                                    if r["mode"] == ("fused" if fused else "unfused"))}
    return out


def differing(a: list[dict], b: list[dict]) -> list[str]:
    """Metrics two runs log differently: |x - y| > 1e-5 + 1e-4 |x| (the tests' float tolerance), or other keys."""
    if len(a) != len(b):
        return ["steps"]
    out = []
    for step, (x, y) in enumerate(zip(a, b)):
        if x.keys() != y.keys():
            return [f"keys at step {step}"]
        out += [f"{k} at step {step}: {x[k]} vs {y[k]}" for k in x if x[k] is not None and y[k] is not None
                and abs(x[k] - y[k]) > 1e-5 + 1e-4 * abs(x[k])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--reward-model", action="store_true",
                    help="score with a reward model (the fine-tuned model with a random score head: a trained one's "
                         "compute) instead of the `format` function: a third per-sample forward to overlap")
    ap.add_argument("--migrate", type=float, default=0.0, help="fusion.migrate_below of the migration runs (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/fusion.md"))
    ap.add_argument("--hardware", help="hardware YAML from `reflow profile` for the predictions (default: profile now)")
    ap.add_argument("--preset", help="a hardware preset for the predictions instead (uncalibrated), e.g. cpu")
    args = ap.parse_args()
    modes = [("unfused", "fused"), ("fused", "unfused")]  # the order of a repetition's runs, alternating
    if args.migrate:
        MODES["gen on all ranks"] = (SHARED, True, 0.0)
        MODES[f"gen on all ranks, migrate {args.migrate:g}"] = (SHARED, True, args.migrate)
        shared = [m for m in MODES if m.startswith("gen on all")]
        modes = [(*modes[0], *shared), (*modes[1], *shared[::-1])]
    model = long_tailed_model(args.sft_steps)
    hw, hw_source = hardware_figures(args, model)
    import ray

    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="reflow-fusion-") as tmp:
        work = Path(tmp)
        prompts = prompts_file(work)
        lens = lengths(model, prompts, 256)
        cost = reprefill_cost(model) if args.migrate else []
        for w in args.workers:
            for rep in range(args.reps):
                for mode in modes[rep % 2]:
                    r = run(w, mode, args, model, prompts, work)
                    results.append(r)
                    print(f"workers {w} {mode}: {r['median_step_s']:.3f} s/step "
                          f"(steps {[round(x, 2) for x in r['step_s']]}), idle {r['idle']}", flush=True)
        predictions = [predict(w, args, model, prompts, results, hw) for w in args.workers]
        last = [r for r in results if r["mode"] == "fused"][-1]
        png = Path(args.out).with_suffix(".png")
        subprocess.run([sys.executable, "-m", "reflow.cli", "timeline", str(Path(last["dir"]) / "timeline.json"),
                        "--png", str(png)], cwd=ROOT, check=True)
    ray.shutdown()
    p = lambda q: lens[min(len(lens) - 1, int(q * len(lens)))]  # noqa: E731
    md = ["# Inter-stage fusion (bench/fusion.py)", "",
          f"Command: `.venv/bin/python bench/fusion.py --steps {args.steps} --workers "
          f"{' '.join(map(str, args.workers))} --reps {args.reps} --chunk {args.chunk} --prompts {args.prompts}"
          f"{' --reward-model' if args.reward_model else ''}"
          f"{f' --migrate {args.migrate:g}' if args.migrate else ''}`. "
          f"PPO on Ray CPU workers (1 thread each), {args.prompts} prompts x 4 samples per step, generation and the "
          "per-sample inference on different ranks (module docstring); median step time after one warm-up step.",
          "", f"Response lengths (256 samples of the model): p50 {p(0.5)}, p90 {p(0.9)}, max {lens[-1]} tokens "
          f"(mean {statistics.mean(lens):.1f}).", "",
          "| workers | fusion | s/step (median) | fused / unfused | idle per rank | same metrics as unfused (float tolerance of the tests) |",
          "|---|---|---|---|---|---|"]
    summary = []
    for w in args.workers:
        mine = [r for r in results if r["workers"] == w]
        base = statistics.median(r["median_step_s"] for r in mine if r["mode"] == "unfused")
        ref = next(r for r in mine if r["mode"] == "unfused")["metrics"]
        for r in mine:
            diff = differing(ref, r["metrics"])
            same = not diff
            if diff:
                print(f"workers {w} {r['mode']}: differs: {diff[:5]}")
            ratio = r["median_step_s"] / base
            idle = ", ".join(f"{k}: {v:.0%}" for k, v in r["idle"].items())
            md.append(f"| {w} | {r['mode']} | {r['median_step_s']:.3f} | {ratio:.2f}x | "
                      f"{idle} | {'yes' if same else 'NO'} |")
            summary.append({"workers": w, "fused": r["fused"], "mode": r["mode"], "median_step_s": r["median_step_s"],
                            "ratio": ratio, "same_metrics": same, "idle": r["idle"]})
    md += ["", "Fused / unfused: the median step time of each run, rows relative to the median of the unfused runs. "
           "Pooled over the repetitions, and the spread between runs of one configuration (the noise):", ""]
    for w in args.workers:
        mine = [r for r in results if r["workers"] == w]
        fused = [r["median_step_s"] for r in mine if r["mode"] == "fused"]
        unfused = [r["median_step_s"] for r in mine if r["mode"] == "unfused"]
        spread = max((max(x) - min(x)) / min(x) for x in (fused, unfused))
        md.append(f"- {w} workers: fused / unfused {statistics.median(fused) / statistics.median(unfused):.2f}x "
                  f"({len(fused)} + {len(unfused)} runs); runs of one configuration differ by up to {spread:.0%}")
        summary.append({"workers": w, "pooled_ratio": statistics.median(fused) / statistics.median(unfused),
                        "spread": spread})
        if args.migrate:  # the same plan (generation on every rank) with and without migration
            off, on = ([r["median_step_s"] for r in mine if r["mode"] == m] for m in shared)
            ratio = statistics.median(on) / statistics.median(off)
            md.append(f"- {w} workers, generation on every rank: migrate {args.migrate:g} / no migration "
                      f"{ratio:.2f}x ({len(on)} + {len(off)} runs)")
            summary.append({"workers": w, "migrate_ratio": ratio, "migrate_below": args.migrate})
    if cost:
        md += ["", "Re-prefill of moved rows (what the adopting replica pays, once per call; one thread, median of 5), "
               "against one decode step of as many rows, and the K/V a cache copy would move instead:", ""]
        md += [f"- {c['rows']} rows, 4 prompt + {c['tokens_so_far']} tokens so far: re-prefill {c['reprefill_ms']:.1f} "
               f"ms = {c['reprefill_ms'] / c['decode_step_ms']:.1f} decode steps ({c['decode_step_ms']:.1f} ms); "
               f"K/V copy {c['kv_bytes'] / 1024:.0f} KiB" for c in cost]
    md += ["", f"Predicted vs measured step time (reflow.planner.evaluate; hardware {hw_source}; response lengths "
           "from the first unfused run's metrics, quantiles min, p10, ..., max: "
           f"{', '.join(f'{x:.1f}' for x in predictions[0]['lengths'] or ())}):", "",
           "| workers | fusion | predicted s | measured s (median of runs) | predicted / measured |", "|---|---|---|---|---|"]
    for pred in predictions:
        for fused in (False, True):
            x = pred[fused]
            md.append(f"| {pred['workers']} | {'fused' if fused else 'unfused'} | {x['predicted']:.3f} | "
                      f"{x['measured']:.3f} | {x['predicted'] / x['measured']:.2f} |")
    md.append("")
    for pred in predictions:
        on, off = pred[True], pred[False]
        md.append(f"- {pred['workers']} workers: fused / unfused predicted {on['predicted'] / off['predicted']:.2f}x, "
                  f"measured {on['measured'] / off['measured']:.2f}x")
        summary.append({"workers": pred["workers"], "predicted_fused_s": on["predicted"],
                        "predicted_unfused_s": off["predicted"], "measured_fused_s": on["measured"],
                        "measured_unfused_s": off["measured"]})
    md += ["", f"Timeline of the last fused run: {png.name} (`reflow timeline PATH --png`)."]
    Path(args.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print("BENCH_SUMMARY " + json.dumps({"rows": summary, "lengths": {"p50": p(0.5), "p90": p(0.9), "max": lens[-1]},
                                         "reprefill": cost}))


if __name__ == "__main__":
    main()
