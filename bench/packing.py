"""Prefix sharing and packed-attention kernels: forward + backward of a GRPO-shaped micro-batch.

    .venv/bin/python bench/packing.py [--model small-llama] [--prompt 192] [--n 8] [--response 64]
                                      [--groups 2] [--steps 5] [--threads 1] [--no-flex]

One micro-batch: --groups prompts of --prompt tokens, each followed by --n responses of --response tokens
(group_id = the prompt), random token ids. Timed: `token_logprobs` over the micro-batch, then backward of
the token-mean NLL of the response tokens (what a policy-loss step computes), gradients zeroed between
steps; no optimizer step (it costs the same in every variant). Variants, interleaved step by step in the
same process (the same model and batch):

    unshared padded   every sequence on its own row of a right-padded [B, Lmax] batch
    unshared packed   one row of T = B (P + R) tokens, dense [T, T] block-diagonal mask
    shared padded     a row of P + n R tokens per group, dense prefix-sharing masks (reflow's default)
    shared packed     all groups in one row of T' = G (P + n R) tokens, dense [T', T'] mask
    shared flex       that one row, flex_attention BlockMask (torch.compile'd by transformers: the first
                      call compiles, reported apart and not timed); torch has no flex backward on CPU, so
                      on CPU it is timed forward-only (the inference calls: reference log-probs, values)

each forward + backward, and forward only (under no_grad) for unshared padded and the shared variants.

Token work per group: unshared n (P + R), shared P + n R; attention per row: length^2. Prints the median
step time of each variant and its ratio to "unshared padded"; writes bench/results/packing.md; the last
line printed is `BENCH_SUMMARY {json}` (read by bench/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from machine import device_line, load_avg, python_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
MODELS = ROOT / "runs" / "bench" / "packing"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llama", help="a reflow preset")
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--n", type=int, default=8, help="responses per prompt")
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="1: on a shared 2-core machine, 2 threads made the timings swing 3x")
    ap.add_argument("--no-flex", action="store_true", help="skip the flex_attention variant (its compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from reflow.algorithms.losses import sequence_nll
    from reflow.checks.layouts import group_batch
    from reflow.models.load import load_policy, quiet_transformers
    from reflow.models.packing import AttentionSpec, packed_rows, token_logprobs, use_flex
    from reflow.models.presets import init_model

    quiet_transformers()
    path = MODELS / args.model
    if not (path / "config.json").is_file():
        init_model(args.model, path, seed=0)
    model = load_policy(path)
    batch = group_batch([args.prompt] * args.groups, [args.response] * args.n, vocab=model.config.vocab_size)
    mask = batch.tokens["action_mask"]
    specs = {"unshared padded": AttentionSpec("padded"), "unshared packed": AttentionSpec("packed"),
             "shared padded": AttentionSpec("padded", share_prefix=True),
             "shared packed": AttentionSpec("packed", share_prefix=True),
             "shared flex": AttentionSpec("packed", share_prefix=True, kernel="flex")}
    # (variant, backward): forward + backward (train calls) and forward only (inference calls); flex has no
    # backward on CPU (reflow falls back to dense there), so it is timed forward-only on CPU
    cases = [(k, True) for k in specs if k != "shared flex" or use_flex(specs[k], next(model.parameters()).device)]
    cases += [(k, False) for k in ("unshared padded", "shared padded", "shared packed", "shared flex")]
    if args.no_flex:
        cases = [c for c in cases if c[0] != "shared flex"]

    def step(name: str, backward: bool) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with torch.set_grad_enabled(backward):
            logp, _ = token_logprobs(model, batch, attention=specs[name])
            if backward:
                sequence_nll(logp, mask, float(mask.sum())).backward()
        return time.perf_counter() - t

    load_before = load_avg()
    first = {c: step(*c) for c in cases}  # flex: includes its compile
    for _ in range(args.warmup):
        for c in cases:
            step(*c)
    times = {c: [] for c in cases}
    for _ in range(args.steps):
        for c in cases:
            times[c].append(step(*c))
    load_after = load_avg()

    med = {c: statistics.median(v) for c, v in times.items()}
    rows = {k: packed_rows(batch, group_key="group_id" if specs[k].share_prefix else None,
                           one_row=specs[k].layout == "packed").input_ids.shape for k in specs}
    rows["unshared padded"] = (len(batch), int(batch.seqlens.max()))

    cmd = (f"{python_cmd()} bench/packing.py --model {args.model} --prompt {args.prompt} --n {args.n} "
           f"--response {args.response} --groups {args.groups} --steps {args.steps} --threads {args.threads}"
           + (" --no-flex" if args.no_flex else ""))
    lines = [
        "# Prefix sharing and packed attention (bench/packing.py)",
        "",
        device_line(args.threads),
        f"command: `{cmd}`",
        f"load average (1/5/15 min) before: {load_before}; after: {load_after}",
        "",
        f"micro-batch: {args.groups} x (prompt {args.prompt} + {args.n} responses x {args.response} tokens), "
        f"model {args.model}; `token_logprobs` (+ backward of the response NLL); median of {args.steps} "
        f"interleaved steps after {args.warmup} warm-up round(s). First call: untimed, flex compiles there.",
        "",
        "| pass | variant | rows x length | time median / min (s) | first call (s) | speed-up vs unshared padded |",
        "|---|---|---|---|---|---|",
    ]
    for (name, backward) in cases:
        base = med[("unshared padded", backward)]
        lines.append(f"| {'forward + backward' if backward else 'forward only'} | {name} | {rows[name][0]} x {rows[name][1]} "
                     f"| {med[(name, backward)]:.3f} / {min(times[(name, backward)]):.3f} | {first[(name, backward)]:.1f} "
                     f"| {base / med[(name, backward)]:.2f}x |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    key = (lambda c: f"{c[0]} ({'fwd+bwd' if c[1] else 'fwd'})")
    summary = {"median_s": {key(c): v for c, v in med.items()},
               "speedup": {key(c): med[("unshared padded", c[1])] / v for c, v in med.items()},
               "command": cmd, "load_before": load_before, "load_after": load_after}
    print("BENCH_SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
