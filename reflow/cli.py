"""The `reflow` command line.

    reflow init-model --preset tiny-llama --out models/tiny      # a model + tokenizer as an HF folder
    reflow init-model --from-gguf smollm2 --out models/smollm2   # a real model (SmolLM2-135M-Instruct)
    reflow data addition --out data/addition                     # bundled verifiable tasks
    reflow sft   configs/sft_addition.yaml  [key=value ...] [--resume [CKPT]]
    reflow rm    configs/rm_addition.yaml   [key=value ...] [--resume [CKPT]]
    reflow am    configs/am_addition.yaml   [key=value ...] [--resume [CKPT]]   # advantage model
    reflow rehearse configs/rehearse_addition.yaml [key=value ...]            # selective rehearsal's data
    reflow dpo   configs/dpo_addition.yaml  [key=value ...] [--resume [CKPT]]
    reflow train configs/grpo_addition.yaml [key=value ...] [--resume [CKPT]]
    reflow train configs/grpo_addition.yaml runtime.workers=4 runtime.plan=separate   # on 4 Ray workers
    reflow plan show configs/grpo_addition.yaml runtime.workers=4 [--save plan.yaml] # graph + plan table
    reflow profile [--workers 4] [--config CFG] [--out hardware.yaml]    # measure these devices, fit the figures
    reflow plan search configs/ppo_addition.yaml --devices 4 [--hardware hardware.yaml | --preset a100-80g]
                       [--seed 0] [--out plan.yaml]                    # search a plan; runtime.plan=plan.yaml
    reflow plan whatif [--preset a100-80g]                             # PPO 7B..70B on 16..128 simulated GPUs
    reflow eval --model runs/grpo/final --data data/addition/test.jsonl
    reflow generate --model runs/grpo/final --prompt "12+34="

User mistakes (config keys, data rows, model folders, reward functions, resume paths, plans) end the
command with one line on stderr and exit code 2, before any training time is spent. A worker of the Ray
runtime that fails mid-run ends it with exit code 1 and that worker's error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from reflow.config.loader import ConfigError, load_config

log = logging.getLogger("reflow")


def _user_errors() -> tuple[type[BaseException], ...]:
    from reflow.data.datasets import DataError
    from reflow.models.load import ModelError
    from reflow.models.presets import PresetError
    from reflow.rewards.registry import RewardError
    from reflow.envs import EnvError
    from reflow.parallel.device import DeviceError
    from reflow.parallel.layout import LayoutError
    from reflow.runtime.graph import GraphError
    from reflow.runtime.plan import PlanError
    from reflow.utils.checkpoint import CheckpointError
    from reflow.planner.hardware import HardwareError
    from reflow.planner.models import ModelShapeError
    from reflow.planner.search import PlanSearchError

    return (ConfigError, DataError, ModelError, PresetError, RewardError, EnvError, CheckpointError, LayoutError,
            PlanError, GraphError, HardwareError, ModelShapeError, PlanSearchError, DeviceError, FileNotFoundError)


def _run_failures() -> tuple[type[BaseException], ...]:
    """Failures of a run itself (exit code 1); the runtime is imported only by the commands that use it."""
    found = []
    for module, name in (("reflow.runtime.transport", "WorkerFailed"), ("reflow.engines.train", "NonFiniteError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def _split_config_args(args) -> tuple[str | None, list[str]]:
    """`reflow train [CONFIG] [key=value ...]`: a first argument with '=' is an override, not a file."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_init_model(args) -> None:
    from reflow.models.gguf import PACKAGED, from_gguf
    from reflow.models.presets import PRESETS, init_model

    if args.from_gguf:
        if args.preset:
            raise ConfigError("init-model takes --preset or --from-gguf, not both; drop one")
        out = from_gguf(args.from_gguf, args.out)
        print(f"wrote {args.from_gguf} (dequantised from GGUF, with its tokenizer and chat template) to {out}")
        return
    if args.list or not args.preset:
        for name, p in PRESETS.items():
            print(f"{name:<14} {p.family:<6} layers {p.num_hidden_layers:<2} hidden {p.hidden_size:<4} {p.description}")
        for name, g in PACKAGED.items():
            print(f"{name:<14} --from-gguf {name}: {g.description}")
        return
    out = init_model(args.preset, args.out, seed=args.seed)
    print(f"wrote {args.preset} (random weights, byte-level tokenizer) to {out}")


def cmd_data(args) -> None:
    from reflow.data.tasks import TASKS, write_task

    if args.list or not args.task:
        for name, t in TASKS.items():
            print(f"{name:<15} {t.description}  options: {t.defaults}")
        return
    options = {}
    for kv in args.option:
        if "=" not in kv:
            raise ConfigError(f"--option '{kv}' needs the form name=value, e.g. --option max_digits=3")
        k, v = kv.split("=", 1)
        options[k] = int(v) if v.lstrip("-").isdigit() else v
    out = args.out or f"data/{args.task}"
    paths = write_task(args.task, out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, **options)
    for name, p in paths.items():
        print(f"{name:<6} {p}")


def _experiment(kind: str, args, resume):
    from reflow.config.schema import AMConfig, DPOConfig, RLConfig, RMConfig, SFTConfig

    path, overrides = _split_config_args(args)
    if kind == "train":
        from reflow.experiments.rl import RLExperiment
        return RLExperiment(load_config(RLConfig, path, overrides), resume)
    from reflow.experiments.supervised import AMExperiment, DPOExperiment, RMExperiment, SFTExperiment

    cls, config = {"sft": (SFTExperiment, SFTConfig), "dpo": (DPOExperiment, DPOConfig),
                   "rm": (RMExperiment, RMConfig), "am": (AMExperiment, AMConfig)}[kind]
    return cls(load_config(config, path, overrides), resume)


def _resolved_plan(cfg, workers: int):
    """The graph of a config and its plan on `workers` ranks, validated against the models (nothing starts)."""
    from reflow.runtime.roles import model_configs
    from reflow.runtime.graphs import graph_for
    from reflow.runtime.plan import check_plan_workers, resolve_plan

    graph = graph_for(cfg)
    plan = check_plan_workers(resolve_plan(cfg.runtime.plan, graph, workers), cfg.runtime.workers)
    return graph, plan.validate(graph, model_configs(cfg, graph))


def cmd_run(kind: str):
    def run(args) -> None:
        from reflow.experiments.loop import run_with_restarts

        t0 = time.perf_counter()
        exp, results = run_with_restarts(lambda resume: _experiment(kind, args, resume), args.resume)
        cfg, out = exp.cfg, exp.cfg.output_dir
        where = "in this process" if cfg.runtime.workers == 0 else f"on {cfg.runtime.workers} worker(s)"
        print(f"{kind} done in {time.perf_counter() - t0:.0f}s {where}, plan '{exp.plan.name}' -> {out}/final  "
              f"(metrics: {out}/metrics.jsonl)")
        for k, v in results.items():
            if v:
                print(f"  {k}: " + "  ".join(f"{m} {x:.3f}" for m, x in v.items() if x is not None))
        if cfg.runtime.timeline:
            print(f"  timeline: {out}/timeline.json (open in chrome://tracing or ui.perfetto.dev)")
    return run


def cmd_rehearse(args) -> None:
    """Selective rehearsal's data: cluster, sample, score with the AM, select (reflow/experiments/rehearse.py)."""
    from reflow.config.schema import RehearseConfig
    from reflow.experiments.rehearse import run_rehearse

    path, overrides = _split_config_args(args)
    cfg = load_config(RehearseConfig, path, overrides)
    t0 = time.perf_counter()
    s = run_rehearse(cfg)
    print(f"rehearse done in {time.perf_counter() - t0:.0f}s: {s['prompts']} prompts in {len(s['clusters'])} clusters "
          f"-> {s['ppo_prompts']} PPO prompts ({cfg.output_dir}/ppo_prompts.jsonl), {s['rehearsal_rows']} rehearsal "
          f"rows ({cfg.output_dir}/rehearsal.jsonl), per cluster: {cfg.output_dir}/clusters.json")
    for c in s["clusters"]:
        print(f"  cluster {c['cluster']:>3}: {c['size']:>5} prompts, rehearsed {c['rehearsed']:>4}, PPO {c['ppo']:>5}, "
              f"mean AM score {c['mean_score']:+.3f}, mean best {c['mean_best']:+.3f}, tasks {c['tasks']}")


def cmd_eval(args) -> None:
    from reflow.data.datasets import load_prompts
    from reflow.engines.rollout import evaluate
    from reflow.models.load import load_policy, load_tokenizer
    from reflow.rewards.registry import load_reward_fn

    tok = load_tokenizer(args.model)
    reward_fn = load_reward_fn(args.reward) if args.reward else None
    env_cls = _eval_env(args, tok)
    examples, _ = load_prompts(args.data, tok, max_prompt_len=args.max_prompt_len)
    examples = examples[: args.limit] if args.limit else examples
    model = load_policy(args.model)
    if env_cls is not None:
        result, samples = _eval_episodes(args, model, tok, examples, env_cls, reward_fn)
    else:
        r = evaluate(model, tok, examples, max_new_tokens=args.max_new_tokens, reward_fn=reward_fn, show=args.show)
        result = {"model": args.model, "data": args.data, "n": r.n, "accuracy": r.accuracy, "reward": r.reward,
                  "response_len": r.response_len}
        samples = r.samples
    print(json.dumps(result) if args.json else
          f"{args.model} on {args.data} (n={result['n']}): accuracy {result['accuracy']}  reward {result['reward']}  "
          + (f"mean turns {result['turns']:.2f}  " if "turns" in result else "")
          + f"mean response length {result['response_len']:.1f}")
    for p, resp, a in samples:
        if not args.json:
            print(f"  {p!r} -> {resp!r}" + (f"   (answer {a!r})" if a is not None else ""))


def _unescape(text: str) -> str:
    """A shell argument with backslash escapes read as Python's (`\\n` -> a newline)."""
    return text.encode("raw_unicode_escape").decode("unicode_escape")


def _eval_env(args, tok):
    """--env's class (its turn flags checked) or None; every error before the model loads."""
    if args.env is None:
        for flag in ("max_turns", "max_turn_tokens", "turn_end"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} is a limit of multi-turn episodes: add --env NAME "
                                  "(e.g. --env calculator) or drop it")
        return None
    from reflow.envs import load_env
    from reflow.runtime.calls.rollout import turn_end_ids

    for flag in ("max_turns", "max_obs_tokens"):  # as rollout.max_turns / max_obs_tokens are checked in train
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_turn_tokens is not None and not 1 <= args.max_turn_tokens <= args.max_new_tokens:
        raise ConfigError(f"--max-turn-tokens must be in [1, --max-new-tokens={args.max_new_tokens}] (the episode's "
                          f"budget), got {args.max_turn_tokens}")
    args.turn_end_ids = turn_end_ids(tok, args.turn_end)
    return load_env(args.env)


def _eval_episodes(args, model, tok, examples, env_cls, reward_fn):
    """Greedy episodes against --env: reward = mean return (step rewards + --reward on the transcript); accuracy
    = share of episodes whose return is at least 1 (a right ANSWER of the built-in envs)."""
    from reflow.engines.generate import GenerationEngine
    from reflow.engines.multiturn import Limits, greedy_episodes

    limits = Limits(max_turns=4 if args.max_turns is None else args.max_turns, max_turn_tokens=args.max_turn_tokens or args.max_new_tokens,
                    max_new_tokens=args.max_new_tokens, max_obs_tokens=args.max_obs_tokens)
    engine = GenerationEngine(model, args.turn_end_ids, tok.pad_token_id)
    eps, returns = greedy_episodes(engine, examples, range(len(examples)), env_cls, args.env, limits, tok,
                                   reward_fn=reward_fn)
    n = max(1, len(eps))
    result = {"model": args.model, "data": args.data, "env": args.env, "n": len(eps),
              "accuracy": sum(x >= 1.0 for x in returns) / n, "reward": sum(returns) / n,
              "turns": sum(ep.turns for ep in eps) / n, "response_len": sum(ep.generated for ep in eps) / n}
    samples = [(e.prompt_text, tok.decode(ep.tokens, skip_special_tokens=True), e.answer)
               for e, ep in zip(examples[:args.show], eps)]
    return result, samples


def cmd_generate(args) -> None:
    import torch

    from reflow.engines.generate import GenerationEngine, SamplingParams
    from reflow.engines.rollout import decode_response
    from reflow.models.load import load_policy, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_policy(args.model)
    prompts = list(args.prompt)
    if args.file:
        from reflow.data.datasets import load_prompts
        prompts += [e.prompt_text for e in load_prompts(args.file, tok, max_prompt_len=10**6)[0]]
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT or --file prompts.jsonl")
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                   for p in prompts]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(args.n)]
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, greedy=args.greedy)
    gens = GenerationEngine(model, [tok.eos_token_id], tok.pad_token_id).generate(
        ids, params, torch.Generator().manual_seed(args.seed))
    for i, g in enumerate(gens):
        print(json.dumps({"prompt": prompts[i // args.n], "response": decode_response(tok, g.tokens),
                          "finished": g.finished}))


def cmd_timeline(args) -> None:
    from reflow.utils.plot import busy_by_rank, plot_timeline, read_timeline

    events = read_timeline(args.path)
    if not events:
        raise ValueError(f"{args.path} holds no call slices; is it the timeline.json of a run with runtime.timeline=true?")
    for rank, (busy, idle) in busy_by_rank(events).items():
        print(f"rank {rank}: busy {busy:.2f} s, idle {idle:.2f} s ({idle / max(busy + idle, 1e-9):.0%})")
    chunks: dict[str, set] = {}
    for e in events:
        if e["chunk"] is not None:
            chunks.setdefault(e["name"], set()).add((e["step"], e["rank"], e["chunk"]))
    for name, seen in chunks.items():
        print(f"{name}: {len(seen)} chunk(s)")
    if args.png is not None:
        out = Path(args.png or Path(args.path).with_suffix(".png"))
        plot_timeline(events, out, title=str(args.path))
        print(f"wrote {out}")


def cmd_layout(args) -> None:
    """Validate layouts for a model; with --check, run them on local processes against one process."""
    from transformers import AutoConfig

    from reflow.models.load import check_model_dir
    from reflow.parallel.layout import Layout, validate_layout

    config = AutoConfig.from_pretrained(check_model_dir(args.model, "--model"))
    layouts = [Layout.parse(text) for text in args.layouts]
    for layout in layouts:
        validate_layout(layout, config, list(range(layout.size)), source=args.model)
        print(f"{layout}: valid for {args.model} on {layout.size} ranks")
    if args.check:
        from reflow.checks.layouts import check_layouts
        from reflow.parallel.launch import launch

        for size in sorted({layout.size for layout in layouts}):
            group = [str(layout) for layout in layouts if layout.size == size]
            results = launch(check_layouts, size, args=(args.model, group))
            for text in group:
                worst = {k: max(r[text][k] for r in results) for k in results[0][text]}
                print(f"{text}: max |difference| vs one process: loss {worst['loss']:.1e}, "
                      f"weights {worst['weights']:.1e}, log-probs {worst['logprobs']:.1e}")


def cmd_plan_show(args) -> None:
    """Print an RL config's graph and its resolved, validated plan; --save writes the plan as YAML."""
    from reflow.config.schema import RLConfig

    path, overrides = _split_config_args(args)
    cfg = load_config(RLConfig, path, overrides)
    graph, plan = _resolved_plan(cfg, cfg.runtime.workers or 1)
    print(graph.describe())
    print()
    print(plan.table(graph))
    if not cfg.runtime.workers:
        print(f"(runtime.workers=0: `reflow train` runs in one process; set runtime.workers={plan.world_size} "
              "to run this plan)")
    if args.save:
        plan.save(args.save)
        print(f"wrote {args.save}: edit it, then pass runtime.plan={args.save}")


def _hardware_arg(args):
    """--hardware FILE (from `reflow profile`) or --preset NAME (default: cpu)."""
    from reflow.planner.hardware import Hardware, HardwareError, hardware

    if args.hardware and args.preset:
        raise HardwareError("give --hardware FILE or --preset NAME, not both")
    if args.hardware:
        return Hardware.load(args.hardware)
    return hardware(args.preset or "cpu")


def cmd_plan_search(args) -> None:
    """Search a plan for an RL config on --devices devices; print it with the built-in plans' predictions."""
    from reflow.config.schema import RLConfig
    from reflow.planner.config import problem_for_config
    from reflow.planner.hardware import GB
    from reflow.planner.search import search, search_staleness

    path, overrides = _split_config_args(args)
    cfg = load_config(RLConfig, path, overrides)
    devices = args.devices or cfg.runtime.workers
    if not devices or devices < 1:
        raise ConfigError("give --devices N (N >= 1), or runtime.workers=N")
    hw = _hardware_arg(args)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    lengths = None
    if args.lengths:
        try:
            lengths = tuple(float(x) for x in args.lengths.split(","))
        except ValueError:
            raise ConfigError(f"--lengths: give comma-separated numbers of tokens, got {args.lengths!r}") from None
        if not all(math.isfinite(x) and x >= 0 for x in lengths):
            raise ConfigError(f"--lengths: response lengths are finite numbers >= 0 of tokens, got {args.lengths!r}")
    problem = problem_for_config(cfg, devices, hw, lengths=lengths)
    if not 0 <= args.builtin_margin < 1:
        raise ConfigError(f"--builtin-margin must be in [0, 1), got {args.builtin_margin}")
    staleness = ""
    if args.staleness:
        if min(args.staleness) < 0:
            raise ConfigError(f"--staleness: values of rollout.max_staleness are >= 0, got {args.staleness}")
        if max(args.staleness) > 0 and cfg.algo.dynamic_sampling:
            raise ConfigError("--staleness above 0 with algo.dynamic_sampling: dynamic sampling waits for each "
                              "round's rewards and cannot run ahead; search with --staleness 0")
        res, k, per_k = search_staleness(problem, args.staleness, seed=args.seed, steps=args.steps,
                                         builtin_margin=args.builtin_margin)
        staleness = f" rollout.max_staleness={k}"
    else:
        res = search(problem, seed=args.seed, steps=args.steps, builtin_margin=args.builtin_margin)
    plan = res.plan
    plan.validate(problem.graph, problem.model_configs())
    graph = problem.graph
    wl = problem.workload
    gen = (f"at most {wl.gen_len} (mean {wl.mean_gen:.1f}, quantiles {', '.join(f'{x:g}' for x in wl.gen_lens)}"
           f"{'' if lengths else ' measured in ' + str(Path(cfg.output_dir) / 'metrics.jsonl')})"
           if wl.gen_lens is not None else f"{wl.gen_len} (every response its whole budget)")
    print(f"hardware: {hw.name}; workload: {wl.batch} sequences of {wl.prompt_len} + {gen} tokens per iteration")
    print(plan.table(graph))
    print()
    print(res.evaluation.table(graph))
    print()
    ev = res.evaluation
    mem = ", ".join(f"{r}: {b / GB:.2f}" for r, b in sorted(ev.memory.peak.items()))
    print(f"predicted: {ev.time:.3f} s/iteration; peak memory per rank (GB) {mem} "
          f"(usable {hw.usable_memory / GB:.1f})")
    print(res.report())
    if staleness:
        print("  staleness:" + staleness + " (the best plan per k: "
              + ", ".join(f"{k} {t:.3g} s" for k, t in per_k.items()) + ")")
    out = args.out or "plan.yaml"
    plan.save(out)
    on, chunk = res.fusion
    fusion = f" fusion.inter_stage={str(on).lower()}" + (f" fusion.chunk={chunk}" if on else "")
    if not on and cfg.fusion.migrate_below:  # migration needs streaming: the command must stay valid
        fusion += " fusion.migrate_below=0"
    with open(out, "a") as f:  # the plan holds placements; the settings it was predicted with are config
        f.write(f"# searched with{fusion}{staleness}\n")
    print(f"wrote {out}: reflow train {path or 'CONFIG'} runtime.workers={devices} runtime.plan={out}{fusion}"
          f"{staleness}")


def cmd_plan_whatif(args) -> None:
    """The what-if table: PPO with LLaMA actors on simulated GPU clusters (reflow/planner/whatif.py)."""
    from reflow.planner.hardware import hardware
    from reflow.planner.whatif import format_table, whatif_table

    hw = hardware(args.preset)
    if any(d < 1 for d in args.devices):
        raise ConfigError(f"--devices must be positive, got {args.devices}")

    def progress(row):
        best = f"{row.searched:.1f} s" if row.searched is not None else "no plan fits"
        print(f"  {row.size} on {row.devices}: {best} ({row.search_seconds:.1f} s search)", file=sys.stderr,
              flush=True)
    rows = whatif_table(sizes=tuple(args.sizes), devices=tuple(args.devices), hw=hw, seed=args.seed,
                        steps=args.steps, progress=progress)
    print(f"PPO, actor and reference LLaMA-<size>, critic and reward LLaMA-7B, on {hw.name} "
          "(predicted seconds per iteration; see reflow/planner/whatif.py for the setup)")
    print(format_table(rows))


def cmd_profile(args) -> None:
    """Measure the current devices and fit the hardware figures (reflow/planner/profile.py)."""
    from reflow.planner.profile import measured_for_yaml, profile

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    config = None
    if args.config:
        from reflow.config.loader import load_config
        from reflow.config.schema import RLConfig

        if args.no_ray:
            raise ConfigError("--config times the workload's calls in the runtime (Ray); drop --no-ray")
        config = load_config(RLConfig, args.config, args.overrides)
    t0 = time.perf_counter()
    fit, meas = profile(args.workers, args.model_preset, quick=args.quick, ray_calls=not args.no_ray, config=config)
    print(fit.report())
    hw = fit.hardware
    print(f"\nfitted ({time.perf_counter() - t0:.0f} s): {hw.flops / 1e9:.1f} GFLOP/s, layer overhead "
          f"{hw.layer_overhead * 1e6:.0f} us, decode step overhead {hw.step_overhead * 1e3:.2f} ms, link "
          f"{hw.intra_bw / 1e9:.2f} GB/s + {hw.intra_lat * 1e6:.0f} us, memory {hw.mem_bw / 1e9:.1f} GB/s, "
          f"optimizer {hw.optimizer_overhead * 1e3:.2f} ms, reallocation {hw.realloc_overhead * 1e3:.0f} ms, "
          f"call {hw.call_overhead * 1e3:.2f} ms, cores per node {hw.cores_per_node}, scales generate "
          f"{hw.generate_scale:.2f} infer {hw.infer_scale:.2f} train {hw.train_scale:.2f}")
    hw.save(args.out, measured_for_yaml(meas, fit))
    print(f"wrote {args.out}: reflow plan search CONFIG --devices {args.workers} --hardware {args.out}")


def cmd_demo(args) -> None:
    from reflow.experiments.demo import run_demo

    run_demo(".", args.sft, args.rl)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reflow", description="Fast RLHF: SFT, reward models, GRPO and PPO on HF models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init-model", help="create a small Llama/Qwen2-style model + tokenizer from a preset, "
                       "or a real model from a GGUF file")
    s.add_argument("--preset", help="preset name (see --list)")
    s.add_argument("--from-gguf", metavar="FILE|NAME", help="a .gguf file, or a packaged model (smollm2), "
                   "dequantised to float32 (pip install 'reflow[gguf]')")
    s.add_argument("--out", default="models/tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--list", action="store_true", help="list the presets")
    s.set_defaults(fn=cmd_init_model)

    s = sub.add_parser("data", help="write a bundled task dataset (train/test prompts, sft pairs, preference pairs)")
    s.add_argument("task", nargs="?", help="task name (see --list)")
    s.add_argument("--out", help="output folder (default data/<task>)")
    s.add_argument("--n-train", type=int, default=20000)
    s.add_argument("--n-test", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--option", action="append", default=[], help="task option name=value (repeatable)")
    s.add_argument("--list", action="store_true")
    s.set_defaults(fn=cmd_data)

    for kind, help_ in [("sft", "supervised fine-tuning"), ("rm", "train a pairwise reward model"),
                        ("am", "train an advantage model (reward model centred on the SFT policy, bounded per task)"),
                        ("train", "RL training (GRPO, PPO, RLOO, REINFORCE++, ReMax, GRPOVI)"),
                        ("dpo", "direct preference optimisation (DPO, IPO, conservative DPO)")]:
        s = sub.add_parser(kind, help=help_)
        s.add_argument("config", nargs="?", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.optim.lr=1e-5 rollout.n=8")
        s.add_argument("--resume", nargs="?", const=True, default=None,
                       help="continue from the latest checkpoint in output_dir, or from the given checkpoint folder")
        s.set_defaults(fn=cmd_run(kind))

    s = sub.add_parser("rehearse", help="selective rehearsal's data: cluster prompts, rank SFT responses with an "
                                        "advantage model, write PPO prompts + a rehearsal set")
    s.add_argument("config", nargs="?", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. clusters=8 am=runs/am/final")
    s.set_defaults(fn=cmd_rehearse)

    s = sub.add_parser("plan", help="execution plans of the Ray runtime (runtime.workers >= 1)")
    plan_sub = s.add_subparsers(dest="plan_command", required=True)
    s = plan_sub.add_parser("show", help="print an RL config's graph of calls and its plan (ranks and layout per "
                                          "call), validated against the models; nothing starts")
    s.add_argument("config", nargs="?", help="YAML config file (an RL config, as for `reflow train`)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. runtime.workers=4 runtime.plan=separate")
    s.add_argument("--save", metavar="PLAN_YAML", help="also write the plan as YAML, to edit and pass as runtime.plan")
    s.set_defaults(fn=cmd_plan_show)

    s = plan_sub.add_parser("search", help="search a plan for an RL config (cost model + simulator + annealing); "
                                            "prints it with the built-in plans' predictions and writes it as YAML")
    s.add_argument("config", nargs="?", help="YAML config file (an RL config, as for `reflow train`)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8")
    s.add_argument("--devices", type=int, help="number of devices (default: runtime.workers)")
    s.add_argument("--hardware", metavar="HW_YAML", help="hardware figures from `reflow profile`")
    s.add_argument("--preset", help="hardware preset instead: a100-80g, h100-80g or cpu (default cpu)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="annealing steps (default: by problem size)")
    s.add_argument("--builtin-margin", type=float, default=0.05,
                   help="return the best built-in plan unless the plan found is predicted faster by more than "
                        "this fraction (default 0.05, about the model's error; 0: always the fastest prediction)")
    s.add_argument("--lengths", metavar="L,L,...", help="response lengths: a sorted sample, or the quantiles at "
                   "evenly spaced levels from min to max (default: the metrics response_len/min..max of a run of "
                   "this config in output_dir, else every response its whole budget)")
    s.add_argument("--staleness", type=int, nargs="+", metavar="K",
                   help="also choose rollout.max_staleness among these k (asynchronous training: generation runs "
                        "up to k steps ahead of training); default: the config's")
    s.add_argument("--out", metavar="PLAN_YAML", default="plan.yaml", help="where to write the plan (plan.yaml)")
    s.set_defaults(fn=cmd_plan_search)
    s = plan_sub.add_parser("whatif", help="PPO with LLaMA 7B..70B on 16..128 simulated GPUs: searched vs built-in "
                                            "plans (predictions)")
    s.add_argument("--preset", default="a100-80g", help="hardware preset (a100-80g, h100-80g)")
    s.add_argument("--sizes", nargs="+", default=["7b", "13b", "34b", "70b"])
    s.add_argument("--devices", nargs="+", type=int, default=[16, 32, 64, 128])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="annealing steps per row (default: by problem size)")
    s.set_defaults(fn=cmd_plan_whatif)

    s = sub.add_parser("profile", help="measure the current devices (compute, decode, collectives, overheads) and "
                                       "fit the planner's hardware figures")
    s.add_argument("--workers", type=int, default=4, help="processes / devices to measure (default 4)")
    s.add_argument("--model-preset", default="tiny-llama", help="model preset to time (reflow init-model --list)")
    s.add_argument("--out", default="hardware.yaml", help="where to write the figures (hardware.yaml)")
    s.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    s.add_argument("--no-ray", action="store_true", help="skip the Ray call-dispatch measurement")
    s.add_argument("--config", help="an RL config (reflow train YAML): also time its own calls in the runtime "
                                    "(every call on rank 0, at its batch and a quarter of it) and fit per-kind "
                                    "scales and the per-call cost from them")
    s.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    s.set_defaults(fn=cmd_profile)

    s = sub.add_parser("demo", help="init-model -> sft -> grpo on the addition task, with a summary (minutes on CPU)")
    s.add_argument("--sft", nargs="*", default=[], help="overrides for the sft stage (key=value)")
    s.add_argument("--rl", nargs="*", default=[], help="overrides for the grpo stage (key=value)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("layout", help="validate dXtYpZ layouts for a model; --check runs them on local processes")
    s.add_argument("layouts", nargs="+", help="layouts such as d2t1p1 d1t2p1 d1t1p2")
    s.add_argument("--model", required=True, help="HF model folder")
    s.add_argument("--check", action="store_true",
                   help="run one train step and inference under each layout on CPU processes (gloo) and compare "
                        "with one process")
    s.set_defaults(fn=cmd_layout)

    s = sub.add_parser("eval", help="greedy accuracy / reward of a model on a prompt set")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--reward", default=None, help="reward function (built-in name or module:function); accuracy "
                   "is then its success (correct_at, else its reward_range maximum)")
    s.add_argument("--max-new-tokens", type=int, default=32, help="response budget (with --env: of the episode's "
                   "model tokens)")
    s.add_argument("--max-prompt-len", type=int, default=1024)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.add_argument("--show", type=int, default=3, help="print the first N prompts and responses (not with --json)")
    s.add_argument("--env", default=None, help="play greedy multi-turn episodes against this environment (as "
                   "rollout.env: calculator, python, file.py:Class); the other flags below are rollout's limits")
    s.add_argument("--max-turns", type=int, default=None, help="rollout.max_turns (default 4)")
    s.add_argument("--max-turn-tokens", type=int, default=None, help="rollout.max_turn_tokens (default: the budget)")
    s.add_argument("--max-obs-tokens", type=int, default=256, help="rollout.max_obs_tokens")
    s.add_argument("--turn-end", type=_unescape, default=None,
                   help="rollout.turn_end, one token; backslash escapes are read: --turn-end '\\n'")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("timeline", help="summarise a run's timeline.json (runtime.timeline=true): busy and idle "
                                        "seconds per rank, chunks per call; --png draws it")
    s.add_argument("path", help="timeline.json of a run")
    s.add_argument("--png", nargs="?", const="", default=None,
                   help="draw it: one row per rank, one colour per call (default file: PATH with .png)")
    s.set_defaults(fn=cmd_timeline)

    s = sub.add_parser("generate", help="sample responses from a model")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", action="append", default=[])
    s.add_argument("--file", help="JSONL/Parquet prompt file")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = " ".join(c for c in (args.command, getattr(args, "plan_command", None)) if c)
    try:
        args.fn(args)
    except _user_errors() as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) else f"file not found: {e.filename or e}"
        print(f"reflow {command}: error: {msg}", file=sys.stderr)
        return 2
    except _run_failures() as e:
        print(f"reflow {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
