"""Multi-turn rollouts: episodes/s and the share of rollout time spent waiting on tools, with turns batched
across episodes (reflow's rounds) and one episode at a time.

    .venv/bin/python bench/multiturn.py [--episodes 64] [--latency-ms 0 20 100] [--preamble-tokens 192]
                                        [--out bench/results/multiturn.md]

Workload: a `tiny-llama` policy (random weights, byte tokenizer) plays `--episodes` episodes of the prompts
"a*b=" (2-3 digit operands), rollout.max_turns 4, max_turn_tokens 8, max_new_tokens 32, temperature 1, keyed
sampling. Environments: the calculator (`calculator`: microseconds per step; a random model never writes a
valid CALC, so each step answers "?") and the calculator behind a tool that sleeps `latency` ms per step
(simulated network or sandbox latency). Modes:

    batched   reflow: round k decodes turn k of every running episode in one generate call (one engine,
              batch 64), then runs all their env.step calls at once in a thread pool
    batched, tools in turn   the same rounds with the env.step calls of a round one after another (threads=1):
              what the thread pool saves
    serial    one episode at a time: its turns one after another, each a generate call of one row

Kept K/V: the calculator episodes again, each prompt after a --preamble-tokens long instruction text (long
contexts), batched, with an episode's K/V kept from one turn to the next (run_episodes(keep_kv=True), the
default: a turn feeds only its new tokens) against prefilling the whole context every turn (keep_kv=False);
interleaved, best of 2; the ratio and the prompt tokens each fed are printed (0 skips the case).

Both modes produce the same episodes (keyed sampling; checked). Reported: episodes/s, the tool share of
rollout wall time (env.step phases / (generate + env.step)), and the speed-up over serial. Prints a markdown
table, writes it to --out, and prints `BENCH_SUMMARY {json}` last.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed  # noqa: E402
from reflow.engines.multiturn import Limits, run_episodes, start_episodes  # noqa: E402
from reflow.envs.calculator import CalculatorEnv  # noqa: E402


def sleeping(latency_s: float) -> type:
    class SlowCalculator(CalculatorEnv):
        def step(self, message):
            time.sleep(latency_s)
            return super().step(message)

    return SlowCalculator


def play(model, tok, rows, env_cls, batched: bool, threads: int = 64, keep_kv: bool = True):
    eps = start_episodes([env_cls() for _ in rows], rows, [tok.encode(r["prompt"]) for r in rows],
                         range(len(rows)), tok, "bench")
    engine = GenerationEngine(model, [tok.eos_token_id], tok.pad_token_id, batch_size=256)
    t0 = time.perf_counter()
    times = run_episodes(engine, eps, SamplingParams(temperature=1.0), Limits(4, 8, 32, 64), tok,
                         lambda k: sample_seed(0, k), "bench", batched=batched, threads=threads, keep_kv=keep_kv)
    return eps, times, time.perf_counter() - t0


def kept_kv_case(model, tok, rows, preamble: int) -> tuple[list[str], dict]:
    """Kept K/V vs re-prefill every turn on long-context episodes; the report's lines and a summary."""
    text = ("You are a careful calculator agent. Write CALC followed by an expression to use the tool, read its "
            "answer, and finish with ANSWER and the number. ") * (preamble // 100 + 1)
    long_rows = [{**r, "prompt": text[:preamble] + r["prompt"]} for r in rows]
    fed = [0]
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.__setitem__(0, fed[0] + kw["input_ids"].numel())
                                           if kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    best, tokens, eps = {True: float("inf"), False: float("inf")}, {}, {}
    try:
        for rep in range(2):  # interleaved, the order alternating
            for keep in ((True, False) if rep == 0 else (False, True)):
                fed[0] = 0
                eps[keep], _, wall = play(model, tok, long_rows, CalculatorEnv, True, keep_kv=keep)
                best[keep], tokens[keep] = min(best[keep], wall), fed[0]
    finally:
        hook.remove()
    same = [e.tokens for e in eps[True]] == [e.tokens for e in eps[False]]
    turns = sum(e.turns for e in eps[True]) / len(rows)
    lines = [f"Kept K/V across turns: {len(rows)} episodes with a {preamble}-token preamble, {turns:.2f} turns/episode "
             "(calculator, batched, 1 thread):", "",
             "| mode | wall s | episodes/s | prompt tokens fed |", "|---|---|---|---|"]
    for keep, name in ((False, "re-prefill each turn"), (True, "kept K/V")):
        lines.append(f"| {name} | {best[keep]:.2f} | {len(rows) / best[keep]:.1f} | {tokens[keep]} |")
    lines += ["", f"re-prefill / kept: {best[False] / best[True]:.2f}x; same episodes: {same}"]
    return lines, {"kv_ratio": best[False] / best[True], "kv_same_episodes": same,
                   "kv_fed": [tokens[True], tokens[False]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20, 100])
    ap.add_argument("--preamble-tokens", type=int, default=192, help="kept-K/V case: prompt preamble (0 = skip)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/multiturn.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from reflow.models.load import load_policy, load_tokenizer
    from reflow.models.presets import init_model

    folder = Path(tempfile.mkdtemp()) / "tiny"
    init_model("tiny-llama", folder, seed=0)
    model, tok = load_policy(folder).eval(), load_tokenizer(folder)
    rng = random.Random(0)
    rows = []
    for _ in range(args.episodes):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        rows.append({"prompt": f"{a}*{b}=", "answer": str(a * b)})
    play(model, tok, rows[:4], CalculatorEnv, True)  # warm-up
    table = []
    for ms in args.latency_ms:
        env_cls = CalculatorEnv if ms == 0 else sleeping(ms / 1000)
        res = {}
        for mode in ("batched", "batched, tools in turn", "serial"):
            eps, times, wall = play(model, tok, rows, env_cls, mode != "serial", 1 if mode != "batched" else 64)
            res[mode] = (eps, times, wall)
            table.append({"tool": "calculator" if ms == 0 else f"calculator + {ms:g} ms sleep", "latency_ms": ms,
                          "mode": mode, "episodes_per_s": len(rows) / wall, "tool_fraction": times.tool_fraction,
                          "rounds": times.rounds, "turns": sum(e.turns for e in eps) / len(eps),
                          "model_tokens": sum(e.generated for e in eps) / len(eps), "wall_s": wall})
        same = all([e.tokens for e in res["batched"][0]] == [e.tokens for e in r[0]] for r in res.values())
        for row, r in zip(table[-3:], res.values()):
            row["same_episodes"] = same
            row["speedup"] = res["serial"][2] / r[2]
    lines = [f"Multi-turn rollouts, {args.episodes} episodes of tiny-llama (random weights), max_turns 4, "
             "max_turn_tokens 8, max_new_tokens 32; 1 torch thread.", "",
             "| tool | mode | episodes/s | tool share of rollout time | rounds | turns/episode | model tokens/episode "
             "| speed-up over serial | same episodes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['tool']} | {r['mode']} | {r['episodes_per_s']:.1f} | {r['tool_fraction']:.1%} | {r['rounds']} "
                     f"| {r['turns']:.2f} | {r['model_tokens']:.1f} | {r.get('speedup', 0):.1f}x | {r['same_episodes']} |"
                     .replace("| 1.0x |", "| 1x |"))
    summary = {"rows": [{k: v for k, v in r.items()} for r in table]}
    if args.preamble_tokens:
        kv_lines, kv_summary = kept_kv_case(model, tok, rows, args.preamble_tokens)
        lines += [""] + kv_lines
        summary.update(kv_summary)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("BENCH_SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
