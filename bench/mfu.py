"""Model FLOP utilisation (MFU) of reflow's TrainEngine: train-step FLOP/s / the device's measured peak matmul FLOP/s.

    .venv/bin/python bench/mfu.py [--threads 2] [--tokens 4096] [--seq-len 128] [--steps 5] [--attention padded]

Peak: the best FLOP/s of large square fp32 matmuls (torch.mm, n = 1024, 2048, 3072; 2 n^3 FLOPs each, best of
--repeats) with the same torch thread count as the train steps.

Models: the presets tiny-llama and small-llama, and a larger Llama built here through the same preset
machinery (`bench-llama-512x8`: hidden 512, MLP 1536, 8 layers, 8 heads, 4 KV heads), each saved as an HF
folder under runs/bench/mfu/ by `reflow.models.presets.init_model` and loaded with reflow's `load_policy` (fp32).

Train step: `TrainEngine.step` (forward, backward, grad clipping, AdamW) on an SFT-like batch of --tokens
tokens: --tokens / --seq-len samples of --seq-len random tokens each; the loss is reflow's SFT loss
(token-mean NLL from `token_logprobs`) on every token but each sample's first (the action tokens), one
micro-batch per step. Timed: --steps steps after --warmup steps; FLOP/s from the best and the median step.

FLOPs of one step (the PaLM paper's MFU convention, appendix B; attention counted as if not causal):

    6 * N * T  +  12 * n_layers * d_model * S * T  +  6 * V * d_model * A
    N: parameters outside the embedding and the LM head   T: tokens in the step   S: sequence length
    V: vocabulary (the LM head is tied to the embedding here, but its matmul is computed for the A action tokens)

Writes bench/results/mfu.md; the last line printed is `BENCH_SUMMARY {json}` (read by bench/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
from machine import device_line, python_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
MODELS = ROOT / "runs" / "bench" / "mfu"






def peak_matmul(sizes: list[int], repeats: int) -> tuple[float, dict[int, float]]:
    """Best fp32 FLOP/s of n x n @ n x n over `sizes`."""
    per_size = {}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t)
        per_size[n] = 2 * n**3 / best
    return max(per_size.values()), per_size


def peak_bandwidth(mib: int = 512, repeats: int = 5) -> tuple[float, dict[str, float]]:
    """Best memory bandwidth (bytes/s) over a float32 tensor of `mib` MiB (far larger than the CPU's caches),
    best of `repeats` with the current torch thread count: `read` = x.sum() (bytes of x / time; what a decode
    step does to the weights), `copy` = y.copy_(x) (2 x bytes of x / time). Returns (read, {"read", "copy"})."""
    n = (mib << 20) // 4
    x, y = torch.ones(n), torch.empty(n)
    per_kind = {}
    for kind, fn, moved in (("read", lambda: x.sum(), 4 * n), ("copy", lambda: y.copy_(x), 8 * n)):
        fn()  # warm-up (first touch of y's pages)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        per_kind[kind] = moved / best
    return per_kind["read"], per_kind


def build_models() -> dict[str, Path]:
    from reflow.models.presets import PRESETS, Preset, init_model

    PRESETS.setdefault("bench-llama-512x8", Preset("llama", 512, 1536, 8, 8, 4, 1024,
                                                   description="bench/mfu.py: hidden 512 x 8 layers"))
    out = {}
    for name in ("tiny-llama", "small-llama", "bench-llama-512x8"):
        d = MODELS / name
        if not (d / "config.json").is_file():
            init_model(name, d, seed=0)
        out[name] = d
    return out


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding and the LM head)."""
    total = sum(p.numel() for p in model.parameters())
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    embed = sum(p.numel() for p in {id(p): p for p in model.parameters() if id(p) in skip}.values())
    return total, total - embed


def measure(path: Path, tokens: int, seq_len: int, warmup: int, steps: int, attention: str) -> dict:
    from reflow.algorithms.losses import sequence_nll
    from reflow.data.batch import SampleBatch
    from reflow.engines.train import Norm, TrainEngine
    from reflow.models.load import load_policy
    from reflow.models.packing import token_logprobs

    torch.manual_seed(0)
    model = load_policy(path)
    cfg = model.config
    n_all, n_body = count_params(model)
    n_seq = tokens // seq_len
    T = n_seq * seq_len
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, cfg.vocab_size, (seq_len,), generator=g) for _ in range(n_seq)]
    mask = [torch.tensor([0] + [1] * (seq_len - 1)) for _ in range(n_seq)]
    batch = SampleBatch.from_sequences(range(n_seq), {"input_ids": ids, "action_mask": mask})
    A = int(batch.tokens["action_mask"].sum())
    norm = Norm(tokens=float(A), samples=float(n_seq))
    engine = TrainEngine(model, lr=1e-4, micro_batch_tokens=T, attention=attention)

    def loss_fn(m, mb, nrm):
        logp, _ = token_logprobs(m, mb, attention=attention)
        return sequence_nll(logp, mb.tokens["action_mask"], nrm.tokens), {}

    for _ in range(warmup):
        engine.step(batch, loss_fn, norm)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step(batch, loss_fn, norm)
        times.append(time.perf_counter() - t)
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    flops = 6 * n_body * T + 12 * L * d * seq_len * T + 6 * V * d * A
    best, med = min(times), statistics.median(times)
    return {"params": n_all, "params_body": n_body, "tokens": T, "seq_len": seq_len, "layers": L, "hidden": d,
            "flops": flops, "step_best_s": best, "step_median_s": med, "flops_best": flops / best,
            "flops_median": flops / med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per train step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attention", choices=["padded", "packed"], default="padded",
                    help="how TrainEngine attends over the packed batch (reflow's default: padded)")
    ap.add_argument("--peak-sizes", type=int, nargs="+", default=[1024, 2048, 3072])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from reflow.models.load import quiet_transformers

    quiet_transformers()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    peak, per_size = peak_matmul(args.peak_sizes, args.repeats)
    rows = {name: measure(path, args.tokens, args.seq_len, args.warmup, args.steps, args.attention)
            for name, path in build_models().items()}
    peak_after, per_size_after = peak_matmul(args.peak_sizes, args.repeats)  # contention check: peak again at the end
    peak = max(peak, peak_after)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())

    cmd = (f"{python_cmd()} bench/mfu.py --threads {args.threads} --tokens {args.tokens} --seq-len {args.seq_len} "
           f"--steps {args.steps} --attention {args.attention}")
    lines = [
        "# MFU of reflow's TrainEngine (bench/mfu.py)",
        "",
        device_line(args.threads),
        f"command: `{cmd}`",
        f"load average (1/5/15 min) before: {load_before}; after: {load_after}",
        "",
        "peak: best fp32 torch.mm FLOP/s, " + ", ".join(
            f"n={n}: {per_size[n] / 1e9:.1f} / {per_size_after[n] / 1e9:.1f} GFLOP/s (start / end)" for n in per_size)
        + f" -> **{peak / 1e9:.1f} GFLOP/s**",
        "",
        "train step: `TrainEngine.step` (forward + backward + clip + AdamW), SFT loss on "
        f"{args.tokens // args.seq_len} samples x {args.seq_len} tokens, attention `{args.attention}`, one micro-batch; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps.",
        "FLOPs/step = 6 N T + 12 n_layers d_model S T + 6 V d_model A (PaLM convention; N = parameters outside "
        "embedding/LM head, T tokens, S sequence length, A action tokens that go through the LM head).",
        "",
        "| model | params (non-embedding) | layers x hidden | tokens/step | GFLOP/step | step time best / median (s) "
        "| achieved GFLOP/s (best) | peak GFLOP/s | MFU best | MFU median |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M ({r['params_body'] / 1e6:.2f}M) | {r['layers']} x {r['hidden']} "
            f"| {r['tokens']} | {r['flops'] / 1e9:.1f} | {r['step_best_s']:.3f} / {r['step_median_s']:.3f} "
            f"| {r['flops_best'] / 1e9:.1f} | {peak / 1e9:.1f} | {r['flops_best'] / peak:.1%} "
            f"| {r['flops_median'] / peak:.1%} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mfu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    summary = {"peak_flops": peak, "models": {k: {kk: v[kk] for kk in ("params", "tokens", "step_best_s", "flops_best")}
                                              | {"mfu": v["flops_best"] / peak} for k, v in rows.items()},
               "command": cmd, "load_before": load_before, "load_after": load_after}
    print("BENCH_SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
