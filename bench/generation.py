"""Generation throughput: reflow's continuous-batching engine against transformers `model.generate`.

    .venv/bin/python bench/generation.py [--models tiny-llama small-llama] [--batches 8 32 128]
                                         [--prompts-per-batch 4] [--threads 2] [--out bench/results/generation.md]
                                         [--cases throughput shared] [--shared-model small-llama]
                                         [--shared-prompts 8] [--shared-n 8] [--shared-prompt-len 128 256]

Workload (the same on every side): N = prompts-per-batch x batch random byte-token prompts (lengths uniform in
[8, 48]), sampled at temperature 1.0, top-p 1.0, no top-k. Random-init presets almost never end on their own,
so the long tail of response lengths is made explicit: prompt i gets its own token budget m_i, drawn from a
lognormal (median 24, sigma 1) rounded and clipped to [4, 256] (most responses short, a few long), and EOS is
disabled on every side, so every response is exactly m_i tokens and all sides produce the same useful work,
sum(m_i) tokens. tokens/s = sum(m_i) / wall time.

  hf      : `model.generate` on consecutive batches of `batch` prompts (left-padded, attention mask). It has no
            per-row budget, so each batch runs to the largest m_i in it; only the first m_i tokens of a row
            count (the rest is the price of static batching).
  static  : reflow's engine with refill=False: static chunks of `batch` prompts, per-prompt budgets, rows
            leave the batch when done (the engine before continuous batching).
  reflow  : reflow's engine (continuous batching): up to `batch` live rows, freed slots refilled from the queue.

Shared prompts (case `shared`): a GRPO-shaped call, --shared-prompts distinct random prompts with lengths
uniform in --shared-prompt-len, each repeated --shared-n times (a group), keyed sampling (key = sample id) at
temperature 1.0, budgets m_i from the same lognormal clipped to [4, 64], EOS disabled, all rows live at once
(batch = prompts x n). `unshared` prefills every row (GenerationEngine(share_prefill=False)); `shared` prefills
each distinct prompt once and copies its K/V into the group's slots. Both give the same tokens (keyed
sampling; a sample that differs through float rounding is counted and printed); the ratio unshared / shared
wall time is printed with each side's forwards and token slots (prefill rows x width + decode rows).

Every side runs once untimed on a small workload first (warm-up); then the sides run --repeats times each,
interleaved with the order rotating, and the best wall time of each side counts (the machine may be shared:
the 1-minute load average before/after each row is printed). All sides use torch.set_num_threads(--threads).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

from reflow.engines.generate import GenerationEngine, SamplingParams
from reflow.models.load import load_policy
from reflow.models.presets import init_model

PAD = 0


def workload(n: int, seed: int, lo: int, hi: int, median: float, sigma: float) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 49, (n,), generator=g).tolist()
    prompts = [torch.randint(5, 261, (k,), generator=g).tolist() for k in lens]
    raw = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    budgets = raw.round().clamp(lo, hi).long().tolist()
    return prompts, budgets


class CallCounter:
    """Counts model forwards and the token slots they process (rows x query length, padding included)."""

    def __init__(self, model):
        self.calls = self.slots = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.slots += kwargs["input_ids"].numel()

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.slots)
        self.calls = self.slots = 0
        return out


def run_hf(model, prompts, budgets, batch: int, seed: int) -> tuple[float, int]:
    """Wall time and tokens computed (rows x steps) of model.generate over consecutive batches."""
    torch.manual_seed(seed)
    computed = 0
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk, m = prompts[s:s + batch], budgets[s:s + batch]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), PAD, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, P - len(p):] = torch.tensor(p)
            attn[r, P - len(p):] = 1
        gc = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max(m),
                              min_new_tokens=0, eos_token_id=None, pad_token_id=PAD)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gc)
        assert out.shape[1] - P == max(m), (out.shape, P, max(m))  # no early stop: every row ran max(m) steps
        computed += len(chunk) * max(m)
    return time.perf_counter() - t0, computed


def shared_workload(n_prompts: int, n: int, lo: int, hi: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """n_prompts random prompts (lengths uniform in [lo, hi]) each repeated n times, and a budget per row."""
    g = torch.Generator().manual_seed(seed)
    distinct = [torch.randint(5, 261, (int(k),), generator=g).tolist()
                for k in torch.randint(lo, hi + 1, (n_prompts,), generator=g)]
    prompts = [p for p in distinct for _ in range(n)]
    raw = torch.exp(math.log(24.0) + torch.randn(len(prompts), generator=g, dtype=torch.float64))
    return prompts, raw.round().clamp(4, 64).long().tolist()


def run_shared(model, prompts, budgets, share: bool, seed: int) -> tuple[float, list]:
    """Wall time and generations of one keyed-sampling call with all rows live at once."""
    eng = GenerationEngine(model, [], PAD, batch_size=len(prompts), share_prefill=share)
    params = SamplingParams(max_new_tokens=max(budgets), temperature=1.0)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params, max_new_tokens=budgets, keys=range(len(prompts)), seed=seed)
    return time.perf_counter() - t0, outs


def shared_case(args, tmp) -> str:
    """Shared vs unshared prefill on a GRPO-shaped call, interleaved; returns the report's lines."""
    model = load_policy(init_model(args.shared_model, Path(tmp) / args.shared_model, seed=0)).eval()
    counter = CallCounter(model)
    prompts, budgets = shared_workload(args.shared_prompts, args.shared_n, *args.shared_prompt_len, args.seed)
    warm_p, warm_m = shared_workload(2, 2, 8, 16, args.seed + 1)
    for share in (True, False):
        run_shared(model, warm_p, warm_m, share, 0)
    best, work, outs = {True: float("inf"), False: float("inf")}, {}, {}
    load0 = os.getloadavg()[0]
    for rep in range(args.repeats):  # interleaved, the order alternating, best of the repeats
        for share in ((True, False) if rep % 2 == 0 else (False, True)):
            counter.take()
            t, outs[share] = run_shared(model, prompts, budgets, share, args.seed)
            best[share] = min(best[share], t)
            work[share] = counter.take()
    counter.handle.remove()
    differ = sum(a.tokens != b.tokens for a, b in zip(outs[True], outs[False]))
    P = [len(p) for p in prompts[::args.shared_n]]
    params = sum(p.numel() for p in model.parameters())
    lines = [f"shared prompts: {args.shared_model} ({params / 1e6:.1f}M params), {args.shared_prompts} prompts x "
             f"{args.shared_n} samples, prompt tokens {min(P)}-{max(P)} (mean {sum(P) / len(P):.0f}), "
             f"response tokens {sum(budgets)} (mean {sum(budgets) / len(budgets):.1f}, max {max(budgets)}), "
             f"best of {args.repeats} interleaved runs, load {load0:.2f} -> {os.getloadavg()[0]:.2f}"]
    for share, name in ((False, "unshared"), (True, "shared")):
        calls, slots = work[share]
        lines.append(f"{name:>9}: {best[share]:6.2f} s  ({sum(budgets) / best[share]:6.0f} tok/s), "
                     f"{calls} forwards, {slots} token slots")
    lines.append(f"unshared / shared: {best[False] / best[True]:.2f}x; samples whose tokens differ: {differ} of "
                 f"{len(prompts)}")
    return "\n".join(lines)


def run_reflow(model, prompts, budgets, batch: int, seed: int, refill: bool) -> float:
    eng = GenerationEngine(model, [], PAD, batch_size=batch, refill=refill)
    params = SamplingParams(max_new_tokens=max(budgets), temperature=1.0, top_p=1.0, top_k=0)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params, torch.Generator().manual_seed(seed), max_new_tokens=budgets)
    wall = time.perf_counter() - t0
    assert [len(g.tokens) for g in outs] == budgets
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "small-llama"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--prompts-per-batch", type=int, default=4, help="N = this x batch prompts per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=int, default=4)
    ap.add_argument("--budget-max", type=int, default=256)
    ap.add_argument("--budget-median", type=float, default=24.0)
    ap.add_argument("--budget-sigma", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side (interleaved); the best counts")
    ap.add_argument("--no-static", action="store_true", help="skip the reflow static-chunk column")
    ap.add_argument("--out", default=None, help="write a markdown report here (e.g. bench/results/generation.md)")
    ap.add_argument("--cases", nargs="+", default=["throughput", "shared"], choices=["throughput", "shared"],
                    help="throughput: reflow vs model.generate; shared: shared vs unshared prompt prefill")
    ap.add_argument("--shared-model", default="small-llama")
    ap.add_argument("--shared-prompts", type=int, default=8)
    ap.add_argument("--shared-n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--shared-prompt-len", type=int, nargs=2, default=[128, 256], metavar=("LO", "HI"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows, shared = [], ""
    with tempfile.TemporaryDirectory() as tmp:
        if "shared" in args.cases:
            shared = shared_case(args, tmp)
            print(shared, flush=True)
        for name in (args.models if "throughput" in args.cases else []):
            model = load_policy(init_model(name, Path(tmp) / name, seed=0)).eval()
            counter = CallCounter(model)
            warm_p, warm_m = workload(16, args.seed + 99, 4, 16, 8, 0.5)
            run_hf(model, warm_p, warm_m, 8, 0)
            run_reflow(model, warm_p, warm_m, 8, 0, True)
            run_reflow(model, warm_p, warm_m, 8, 0, False)
            for batch in args.batches:
                n = args.prompts_per_batch * batch
                prompts, budgets = workload(n, args.seed + batch, args.budget_min, args.budget_max,
                                            args.budget_median, args.budget_sigma)
                useful = sum(budgets)
                sides = {"hf": lambda: run_hf(model, prompts, budgets, batch, args.seed)[0],
                         "reflow": lambda: run_reflow(model, prompts, budgets, batch, args.seed, True)}
                if not args.no_static:
                    sides["static"] = lambda: run_reflow(model, prompts, budgets, batch, args.seed, False)
                best = {k: float("inf") for k in sides}
                work = {}
                load0 = os.getloadavg()[0]
                for rep in range(args.repeats):  # interleaved, the order rotating, best of the repeats
                    names = list(sides)
                    for k in names[rep % len(names):] + names[:rep % len(names)]:
                        counter.take()
                        best[k] = min(best[k], sides[k]())
                        work[k] = counter.take()
                computed = sum(len(budgets[s:s + batch]) * max(budgets[s:s + batch]) for s in range(0, n, batch))
                rows.append(dict(model=name, batch=batch, n=n, useful=useful, computed=computed,
                                 mean=useful / n, max=max(budgets), t_hf=best["hf"], t_static=best.get("static"),
                                 t_cb=best["reflow"], load=(load0, os.getloadavg()[0]), work=work))
                r = rows[-1]
                print(f"{name} batch {batch}: hf {r['t_hf']:.2f}s, static {r['t_static'] or float('nan'):.2f}s, "
                      f"reflow {r['t_cb']:.2f}s, reflow/hf {r['t_hf'] / r['t_cb']:.2f}x, "
                      f"load {r['load'][0]:.2f} -> {r['load'][1]:.2f}", flush=True)
            counter.handle.remove()
            del model

    load = os.getloadavg()
    head = (f"generation throughput, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{args.threads} thread(s), float32, CPU ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores), best of {args.repeats} interleaved runs, load average at the end {load[0]:.2f}")
    cols = (f"{'model':>11} | {'batch':>5} | {'N':>4} | {'tokens':>6} | {'mean/max m':>10} | {'hf tok/s':>8} | "
            f"{'static tok/s':>12} | {'reflow tok/s':>12} | {'reflow/hf':>9} | {'reflow/static':>13} | "
            f"{'hf s':>6} | {'static s':>8} | {'reflow s':>8} | {'hf util':>7} | {'load 1m':>11}")
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        st = r["t_static"]
        lines.append(
            f"{r['model']:>11} | {r['batch']:>5} | {r['n']:>4} | {r['useful']:>6} | "
            f"{r['mean']:>5.1f}/{r['max']:<4} | {r['useful'] / r['t_hf']:>8.0f} | "
            f"{(r['useful'] / st if st else float('nan')):>12.0f} | {r['useful'] / r['t_cb']:>12.0f} | "
            f"{r['t_hf'] / r['t_cb']:>8.2f}x | {(st / r['t_cb'] if st else float('nan')):>12.2f}x | "
            f"{r['t_hf']:>6.2f} | {(st or float('nan')):>8.2f} | {r['t_cb']:>8.2f} | "
            f"{r['useful'] / r['computed']:>6.0%} | {r['load'][0]:>4.2f}->{r['load'][1]:<5.2f}")
    lines += ["", "model forwards (token slots, padding included) per run:"]
    for r in rows:
        lines.append(f"{r['model']:>11} batch {r['batch']:>3}: " + ", ".join(
            f"{k} {c} ({t})" for k, (c, t) in r["work"].items()))
    table = "\n".join(lines) if rows else ""
    if shared:
        table += ("\n\n" if table else "") + shared
    print()
    print(table)
    if args.out:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = "?"
        cmd = "python bench/generation.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v not in (None, False))
        Path(args.out).write_text(
            "# Generation throughput (bench/generation.py)\n\n"
            f"command: `.venv/bin/{cmd}` (commit {commit} + working tree)\n\n"
            "Workload: N random prompts (8-48 tokens); per-prompt budgets m_i ~ lognormal(median "
            f"{args.budget_median:g}, sigma {args.budget_sigma:g}) clipped to [{args.budget_min}, {args.budget_max}], "
            "EOS disabled on all sides so every response is exactly m_i tokens; sampling at temperature 1.0, top-p 1.0. "
            "`tokens` = sum m_i (useful tokens, the same on all sides), tok/s = tokens / wall. `hf` = "
            "`model.generate` on consecutive batches (each runs to the batch's largest m_i; `hf util` = useful / "
            "computed row-steps); `static` = reflow engine with refill=False (static chunks, early retirement); "
            "`reflow` = continuous batching. Shared prompts: a GRPO-shaped call (groups of identical prompts, keyed "
            "sampling, all rows live at once), every row prefilled (`unshared`) against one prefill per distinct "
            "prompt with its K/V copied into the group's slots (`shared`, the engine's default).\n\n```\n"
            + table + "\n```\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
