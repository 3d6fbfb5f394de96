"""Prefix sharing and packed-attention kernels: forward + backward of a GRPO-shaped micro-batch.

    .venv/bin/python bench/packing.py [--model small-llama] [--prompt 192] [--n 8] [--response 64]
                                      [--groups 2] [--steps 5] [--threads 1] [--no-flex]
                                      [--long-tail [--sigma 1]]

One micro-batch: --groups prompts of --prompt tokens, each followed by --n responses of --response tokens
(group_id = the prompt), random token ids. --long-tail: response lengths drawn log-normal instead (median
--response, --sigma, seed 0, at least 1 token), as RL responses are, so the groups differ in length.
Timed: `token_logprobs` over the micro-batch, then backward of the token-mean NLL of the response tokens
(what a policy-loss step computes), gradients zeroed between steps; no optimizer step (it costs the same in
every variant). Variants, interleaved step by step in the same process (the same model and batch):

    unshared padded   every sequence on its own row of a right-padded [B, Lmax] batch (binned=False)
    unshared binned   (--long-tail only) no sharing, sequences binned first-fit decreasing into rows of
                      Lmax (reflow's "padded" without group ids or prefix sharing: PPO n=1, critics, DPO)
    unshared packed   one row of T = B (P + R) tokens, dense [T, T] block-diagonal mask
    shared padded     groups binned first-fit decreasing into rows as long as the longest group, dense
                      prefix-sharing masks (reflow's default); with equal groups: a row of P + n R per group
    shared per-group  (--long-tail only) a row per group, padded to the longest: what the binning saves
    shared packed     all groups in one row of T' = G (P + n R) tokens, dense [T', T'] mask
    shared flex       that one row, flex_attention BlockMask (torch.compile'd by transformers: the first
                      call compiles, reported apart and not timed); torch has no flex backward on CPU, so
                      on CPU it is timed forward-only (the inference calls: reference log-probs, values)

each forward + backward, and forward only (under no_grad) for unshared padded and the shared variants.
--long-tail times unshared padded, unshared binned and the padded shared variants, forward + backward, then
forward only.

Token work per group: unshared n (P + R), shared P + n R; attention per row: length^2. Prints the median
step time of each variant and its ratio to "unshared padded"; writes bench/results/packing.md; the last
line printed is `BENCH_SUMMARY {json}` (read by bench/run_all.py). Each of the two batches (equal and
long-tailed responses) has its own section of packing.md; a run rewrites its own and keeps the other.
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


TITLE = "# Prefix sharing and packed attention (bench/packing.py)"
SECTIONS = {False: "Equal response lengths", True: "Long-tailed response lengths"}


def write_section(path: Path, long_tail: bool, text: str) -> None:
    """Rewrite this batch's section of `path`, keeping the other batch's section as it is."""
    old = path.read_text() if path.is_file() else ""
    kept = {k: "## " + part for part in old.split("\n## ")[1:] for k, h in SECTIONS.items()
            if part.startswith(h + "\n")}
    kept[long_tail] = text
    path.write_text(TITLE + "\n\n" + "\n".join(kept[k].rstrip("\n") + "\n" for k in SECTIONS if k in kept))


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
    ap.add_argument("--long-tail", action="store_true",
                    help="log-normal response lengths per group; times the padded variants only")
    ap.add_argument("--sigma", type=float, default=1.0, help="--long-tail: sigma of log(response length)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from reflow.algorithms.losses import sequence_nll
    from reflow.checks.layouts import group_batch
    from reflow.data.batch import SampleBatch
    from reflow.models.load import load_policy, quiet_transformers
    from reflow.models.packing import AttentionSpec, packed_rows, token_logprobs, use_flex
    from reflow.models.presets import init_model

    quiet_transformers()
    path = MODELS / args.model
    if not (path / "config.json").is_file():
        init_model(args.model, path, seed=0)
    model = load_policy(path)
    if args.long_tail:
        g = torch.Generator().manual_seed(0)
        lens = (args.response * torch.exp(args.sigma * torch.randn(args.groups, args.n, generator=g))).round()
        lens = lens.clamp(min=1)
        groups = [group_batch([args.prompt], lens[i].long().tolist(), seed=i, vocab=model.config.vocab_size)
                  for i in range(args.groups)]  # one per group, then renumbered: ids and group ids
        batch = SampleBatch.from_sequences(
            range(args.groups * args.n), {k: [s for b in groups for s in b.unpack(k)] for k in groups[0].tokens},
            {"group_id": [i for i in range(args.groups) for _ in range(args.n)]})
    else:
        batch = group_batch([args.prompt] * args.groups, [args.response] * args.n, vocab=model.config.vocab_size)
    mask = batch.tokens["action_mask"]
    specs = {"unshared padded": AttentionSpec("padded", binned=False), "unshared binned": AttentionSpec("padded"),
             "unshared packed": AttentionSpec("packed"),
             "shared padded": AttentionSpec("padded", share_prefix=True),
             "shared per-group": AttentionSpec("padded", share_prefix=True, binned=False),
             "shared packed": AttentionSpec("packed", share_prefix=True),
             "shared flex": AttentionSpec("packed", share_prefix=True, kernel="flex")}
    # (variant, backward): forward + backward (train calls) and forward only (inference calls); flex has no
    # backward on CPU (reflow falls back to dense there), so it is timed forward-only on CPU
    cases = [(k, True) for k in specs if k != "shared flex" or use_flex(specs[k], next(model.parameters()).device)]
    cases = [c for c in cases if c[0] != "unshared binned"]  # equal lengths: nothing to bin
    cases += [(k, False) for k in ("unshared padded", "shared padded", "shared packed", "shared flex")]
    if args.no_flex:
        cases = [c for c in cases if c[0] != "shared flex"]
    if args.long_tail:
        cases = [(k, b) for b in (True, False)
                 for k in ("unshared padded", "unshared binned", "shared per-group", "shared padded")]
    else:
        cases = [c for c in cases if c[0] != "shared per-group"]

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

    def arrange(spec):
        return "one_row" if spec.layout == "packed" else "first_fit" if spec.binned else "per_unit"

    rows = {k: packed_rows(batch, group_key="group_id" if specs[k].share_prefix else None,
                           arrange=arrange(specs[k])) for k in specs}
    shape = {k: (r.input_ids.shape, r.num_tokens) for k, r in rows.items()}
    shape["unshared padded"] = ((len(batch), int(batch.seqlens.max())), batch.num_tokens)

    cmd = (f"{python_cmd()} bench/packing.py --model {args.model} --prompt {args.prompt} --n {args.n} "
           f"--response {args.response} --groups {args.groups} --steps {args.steps} --threads {args.threads}"
           + (" --no-flex" if args.no_flex else "")
           + (f" --long-tail --sigma {args.sigma:g}" if args.long_tail else ""))
    responses = (f"{args.n} responses of log-normal length (median {args.response}, sigma {args.sigma:g}: "
                 f"{int(lens.min())}..{int(lens.max())}, mean {float(lens.mean()):.1f})" if args.long_tail
                 else f"{args.n} responses x {args.response} tokens")
    lines = [
        f"## {SECTIONS[args.long_tail]}",
        "",
        device_line(args.threads),
        f"command: `{cmd}`",
        f"load average (1/5/15 min) before: {load_before}; after: {load_after}",
        "",
        f"micro-batch: {args.groups} x (prompt {args.prompt} + {responses}), "
        f"model {args.model}; `token_logprobs` (+ backward of the response NLL); median of {args.steps} "
        f"interleaved steps after {args.warmup} warm-up round(s). First call: untimed, flex compiles there.",
        "",
        "| pass | variant | rows x length (real tokens: fill) | time median / min (s) | first call (s) "
        "| speed-up vs unshared padded |",
        "|---|---|---|---|---|---|",
    ]
    for (name, backward) in cases:
        base = med[("unshared padded", backward)]
        (R, L), real = shape[name]
        lines.append(f"| {'forward + backward' if backward else 'forward only'} | {name} "
                     f"| {R} x {L} ({real}: {real / (R * L):.0%}) "
                     f"| {med[(name, backward)]:.3f} / {min(times[(name, backward)]):.3f} "
                     f"| {first[(name, backward)]:.1f} "
                     f"| {base / med[(name, backward)]:.2f}x |")
    OUT.mkdir(parents=True, exist_ok=True)
    write_section(OUT / "packing.md", args.long_tail, "\n".join(lines) + "\n")
    print("\n".join(lines))
    key = (lambda c: f"{c[0]} ({'fwd+bwd' if c[1] else 'fwd'})")
    summary = {"median_s": {key(c): v for c, v in med.items()},
               "speedup": {key(c): med[("unshared padded", c[1])] / v for c, v in med.items()},
               "command": cmd, "load_before": load_before, "load_after": load_after}
    print("BENCH_SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
