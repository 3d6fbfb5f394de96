"""Calibration (`reflow profile`): measure the current devices and fit the Hardware figures the cost model
predicts from, so that its predictions are for these devices rather than for preset figures.

    reflow profile [--workers N] [--model-preset tiny-llama] [--config rl.yaml] [--out hardware.yaml]
    hw = Hardware.load("hardware.yaml")           # or: reflow plan search ... --hardware hardware.yaml

What is measured (N processes in one torch.distributed world, reflow.parallel.launch: gloo on CPU, NCCL
on GPUs; one intra-op thread per process, as the runtime's workers use):

    compute     a model of the preset (random weights, the byte tokenizer): forward and forward+backward
                over 128..2048 tokens (sequences of 32), on rank 0 alone while the others wait
    decode      reflow's GenerationEngine at a few (batch, prompt length) pairs, two token budgets each:
                time per decode step = the difference / the extra steps (prefill cancels)
    optimizer   one AdamW step (per-tensor, as the runtime's TrainEngine under a layout) after a backward
    memory      a large tensor copy (bytes read + written / time)
    sharing     forwards back to back on rank 0 alone, then on all N ranks at once (wall clock until the
                last rank is done): effective cores = N t_alone / t_together (CPU workers share the
                machine's cores; on GPUs the figure is not used)
    collectives all-reduce and broadcast over all ranks and send/recv between ranks 0 and 1, 4 KB..16 MB
    realloc     reallocation of the model from its FSDP owner layout dNt1p1 to N replicas (what a
                generate call on the train mesh does every step): build the destination, move the weights
    tp          a forward and decode steps under d1t2p1 on ranks 0-1 (the others wait): what tensor
                parallel adds per layer beyond its compute share and all-reduces
    fsdp        a forward, and a forward + backward, on the FSDP owner copy and on a whole copy, all ranks
                at once: the difference is the gathers' and reduce-scatters' cost
    call        (optional, needs Ray) the round trip of a chain of Ray actor tasks passing a batch-sized
                object, round-robin over N actors and on one actor (the difference: moving a call's
                inputs between workers); then the runtime itself: a few PPO steps under the "separate" plan with the
                2-layer debug-llama preset and 2 prompts of 2 new tokens (compute negligible), so the
                step is the runtime's fixed cost: dispatch, data between workers, merging, engine set-up
    ray sharing (needs Ray; CPU, N > 1) N Ray actors like the runtime's workers (one CPU, the configured
                threads) run the same forwards on one actor alone, then on 2 and on N at once:
                effective cores = k t_alone / t_k, averaged over k. This replaces the bare processes'
                figure: Ray's own processes (raylet, object store, the driver) take a share of the cores
    workload    (--config, needs Ray; replaces `call`'s runtime step) the config's own calls in the
                runtime on N workers, timed from the workers' timelines, under one_rank_plan (every call
                d1t1p1 on rank 0: no parallelism, no copies, one busy worker, not a plan one would
                run) at the config's prompts per step and a quarter of it (workload_fit fits from such
                runs; bench/planner.py adds one after each round and pools them, pool_runs, since this
                machine's speed drifts over minutes). This is how ReaL's profiler
                works too: time the real calls at the sizes they run at, and leave the parallel costs to
                the microbenchmarks above

Fitting (cost.py's formulas, least squares on relative error with non-negative coefficients, `fit_linear`):

    forward(T)          = (L F_layer(T, S/2) + F_head(T)) / F + L layer_overhead
    forward+backward(T) = 3 x the same (backward = 2 forwards, the cost model's rule)
    decode step (b, c)  = (L F_layer(b, c) + F_head(b)) / F + L layer_overhead + step_overhead
        -> F (flops, matmul_efficiency = 1), layer_overhead, step_overhead
    collectives         all_reduce = 2 (n-1)/n B / bw + 2 ceil(log2 n) lat; broadcast = B / bw + ceil(log2 n) lat;
                        send/recv = B / bw + lat                                  -> intra_bw, intra_lat
    optimizer_overhead  = AdamW step time - 28 bytes x parameters / mem_bw
    tp_overhead         = mean over the tp forward and decode step of (measured - predicted without it) / L
    fsdp_overhead       per FSDP unit (L + 1 units), least squares over: FSDP forward - replica forward = AG +
                        (L + 1) x it, and FSDP forward+backward - replica's = 3 AG + 3 (L + 1) x it (two
                        gathers and a reduce-scatter, which costs as much as a gather)
    shared cores        measurements taken with k ranks busy at once (collectives, reallocation, FSDP)
                        are converted to full-speed time: x min(1, cores / k), since the simulator
                        shares the cores again when it schedules them
    realloc_overhead    = measured reallocation - planner.realloc's prediction with the fitted link
    data_hop            = Ray chain time per call across workers - the same chain on one worker
    call_overhead       = the value that makes the simulator's time for that runtime step equal the measured
                        one (bisection); without Ray: Ray chain time / hops
    with --config:
    <kind>_scale        measured call = <kind>_scale x the model's own work for it + c, over the one-rank
                        calls (fit_call_scales; c, a per-call cost shared by all kinds, is only reported)
    call_overhead       as above, for the one-rank plan's measured step
    shared cores        with Ray: the Ray actors' figure (above) instead of the bare processes' one, for the
                        simulator and for the conversions to full-speed time

The fitted figures describe one node (inter-node figures = intra-node ones, devices_per_node = N);
tiny models on CPU are dominated by the fixed overheads, which is why they are fitted rather than assumed.
Every measurement and its fitted prediction are kept under `measured:` in the YAML.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from reflow.planner.hardware import GB, Hardware

SEQ = 32  # sequence length of the compute measurements


# ---------------------------------------------------------------------------------------------- fitting
def fit_linear(rows: list[tuple[list[float], float]], relative: bool = True) -> list[float]:
    """Non-negative least squares: x >= 0 minimising sum_i w_i (a_i . x - t_i)^2, with w_i = 1 / t_i^2 when
    `relative` (every measurement counts by its relative error, so microsecond latencies and second-long
    passes weigh alike). rows: (a_i, t_i). Columns that no row uses come back 0. Active-set method
    (Lawson-Hanson) on a handful of unknowns."""
    import numpy as np

    A = np.array([a for a, _ in rows], dtype=float)
    t = np.array([y for _, y in rows], dtype=float)
    if relative:
        w = 1.0 / np.maximum(np.abs(t), 1e-12)
        A, t = A * w[:, None], t * w
    n = A.shape[1]
    scale = np.maximum(np.abs(A).max(axis=0), 1e-300)  # columns of very different magnitudes (FLOPs vs 1)
    As = A / scale
    passive: list[int] = []
    x = np.zeros(n)
    for _ in range(3 * n + 10):
        grad = As.T @ (t - As @ x)
        cand = [j for j in range(n) if j not in passive and grad[j] > 1e-12 and np.abs(As[:, j]).sum() > 0]
        if not cand:
            break
        passive.append(max(cand, key=lambda j: grad[j]))
        while True:
            z = np.zeros(n)
            sol, *_ = np.linalg.lstsq(As[:, passive], t, rcond=None)
            z[passive] = sol
            if all(z[j] > 0 for j in passive):
                x = z
                break
            neg = [j for j in passive if z[j] <= 0]
            alpha = min(x[j] / (x[j] - z[j]) for j in neg)
            x = x + alpha * (z - x)
            passive = [j for j in passive if x[j] > 1e-15]
            if not passive:
                break
    return [float(v) for v in x / scale]


@dataclass
class Fit:
    hardware: Hardware
    table: list[tuple[str, float, float]]  # (measurement, measured s, fitted s)

    def report(self) -> str:
        lines = [f"{'measurement':<44} {'measured':>11} {'fitted':>11} {'error':>7}"]
        for name, t, p in self.table:
            lines.append(f"{name:<44} {_fmt(t):>11} {_fmt(p):>11} {(p - t) / t:>+7.0%}")
        return "\n".join(lines)


def _fmt(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def fit_hardware(meas: dict, shape, name: str = "profiled", scales: dict[str, float] | None = None,
                 cores: float | None = None) -> Fit:
    """The Hardware figures from the measurements `measure` returns (see the module docstring).
    shape: the ModelShape of the model measured; scales: {call kind: hw.<kind>_scale} from
    fit_call_scales (the tensor-parallel residual is then taken over the scaled own work); cores: the
    shared-core figure to use instead of the one from the bare processes (measure_ray_sharing's)."""
    L = shape.layers
    rows, labels = [], []

    def pass_flops(tokens, context):
        return L * shape.layer_flops(tokens, context) + shape.head_flops(tokens)

    def pass_flops_t(tokens, context, t):  # one tensor-parallel rank's share (the head is not split)
        return L * shape.layer_flops(tokens, context) / t + shape.head_flops(tokens)

    for (b, s), t in meas["forward"]:
        rows.append(([pass_flops(b * s, s / 2), L, 0.0], t))
        labels.append(f"forward {b}x{s} tokens")
    for (b, s), t in meas["forward_backward"]:
        rows.append(([3 * pass_flops(b * s, s / 2), 3 * L, 0.0], t))
        labels.append(f"forward+backward {b}x{s} tokens")
    for (b, p, g), t in meas["decode_step"]:
        rows.append(([pass_flops(b, p + g / 2), L, 1.0], t))
        labels.append(f"decode step, batch {b}, {p}+{g} keys")
    inv_f, layer_oh, step_oh = fit_linear(rows)
    flops = 1.0 / inv_f if inv_f > 0 else 1e15
    table = [(lab, t, sum(c * x for c, x in zip(a, (inv_f, layer_oh, step_oh))))
             for lab, (a, t) in zip(labels, rows)]

    n = meas["world"]
    if cores is None and meas.get("device") == "cpu" and n > 1:
        cores = max(1.0, min(float(n), n * meas["alone"] / meas["together"]))

    def work(t, busy):
        """Elapsed time with `busy` ranks computing at once -> time at full speed (CPU cores shared)."""
        return t * min(1.0, cores / busy) if cores else t
    crow, clab = [], []
    lg = math.ceil(math.log2(n)) if n > 1 else 0
    for nbytes, t in meas["all_reduce"]:
        crow.append(([2 * (n - 1) / n * nbytes, 2 * lg], work(t, n)))
        clab.append(f"all_reduce {nbytes / 1e6:g} MB on {n}")
    for nbytes, t in meas["broadcast"]:
        crow.append(([nbytes, max(1, lg)], work(t, n)))
        clab.append(f"broadcast {nbytes / 1e6:g} MB on {n}")
    for nbytes, t in meas["send_recv"]:
        crow.append(([nbytes, 1.0], work(t, 2)))
        clab.append(f"send/recv {nbytes / 1e6:g} MB")
    if crow:
        inv_bw, lat = fit_linear(crow)
        table += [(lab, t, a[0] * inv_bw + a[1] * lat) for lab, (a, t) in zip(clab, crow)]
        bw = 1.0 / inv_bw if inv_bw > 0 else 1e12
    else:  # one device: nothing to measure
        bw, lat = 1e12, 0.0

    mem_bw = meas["copy_bytes"] / meas["copy"]
    table.append((f"copy {meas['copy_bytes'] / 2e6:.0f} MB", meas["copy"], meas["copy"]))
    opt = max(0.0, meas["optimizer"] - 28 * shape.params / mem_bw)
    table.append(("optimizer step (AdamW)", meas["optimizer"], opt + 28 * shape.params / mem_bw))
    hw = Hardware(name, flops=flops, mem_bw=mem_bw, memory=meas["memory"], intra_bw=bw, intra_lat=lat,
                  inter_bw=bw, inter_lat=lat, devices_per_node=max(n, 1), matmul_efficiency=1.0,
                  memory_efficiency=1.0, reserved=meas.get("reserved", 0.0), layer_overhead=layer_oh,
                  step_overhead=step_oh, optimizer_overhead=opt, call_overhead=meas.get("call", 0.0),
                  data_hop=meas.get("data_hop", 0.0),
                  cores_per_node=cores, **{f"{k}_scale": v for k, v in (scales or {}).items()})
    if meas.get("realloc"):
        from reflow.planner.cost import placement
        from reflow.planner.realloc import realloc_cost

        from reflow.planner.cost import _owner_gather

        pl = placement(f"d{n}t1p1", range(n))
        w = work(meas["realloc"], n)
        pred = realloc_cost(shape, pl, pl, hw.with_(realloc_overhead=0.0), src_sharded=True).time
        hw = hw.with_(realloc_overhead=max(0.0, w - pred))
        table.append((f"reallocation d{n}t1p1 owner -> {n} replicas (work)", w, max(pred, w)))
        # per FSDP unit (layers + root) and gather / reduce-scatter: cost.py charges units x it per forward
        # on the owner copy and 3 units x it per train micro-batch (two gathers, one reduce-scatter)
        units = shape.layers + 1
        gather = _owner_gather(shape, pl, hw)
        extra = work(meas["fsdp_forward"] - meas["replica_forward"], n)
        frows = [([units], max(extra - gather, 1e-9), extra, gather)]
        if "fsdp_forward_backward" in meas:
            extra_t = work(meas["fsdp_forward_backward"] - meas["replica_forward_backward"], n)
            frows.append(([3 * units], max(extra_t - 3 * gather, 1e-9), extra_t, 3 * gather))
        oh, = fit_linear([(a, y) for a, y, _, _ in frows])
        hw = hw.with_(fsdp_overhead=oh)
        for (a, _, ex, g), what in zip(frows, ("forward", "forward+backward")):
            table.append((f"FSDP {what} d{n} - replica {what} (work)", ex, g + a[0] * oh))
    if meas.get("tp_forward") and meas.get("tp_decode_step"):
        (b, s_), t_fwd = meas["tp_forward"]
        (db, dp, dg), t_dec = meas["tp_decode_step"]
        ar = hw.all_reduce
        sc_i, sc_g = hw.infer_scale, hw.generate_scale
        pred_fwd = (sc_i * (pass_flops_t(b * s_, s_ / 2, 2) / hw.flops + L * layer_oh)
                    + 2 * L * ar(b * s_ * shape.hidden * shape.dtype_bytes, (0, 1)))
        pred_dec = (sc_g * (pass_flops_t(db, dp + dg / 2, 2) / hw.flops + L * layer_oh + step_oh)
                    + 2 * L * ar(db * shape.hidden * shape.dtype_bytes, (0, 1)))
        w_fwd, w_dec = work(t_fwd, 2), work(t_dec, 2)
        per_layer = [max(0.0, w_fwd - pred_fwd) / L, max(0.0, w_dec - pred_dec) / L]
        hw = hw.with_(tp_overhead=sum(per_layer) / 2)
        table.append((f"forward d1t2p1 {b}x{s_} tokens (work)", w_fwd, pred_fwd + L * hw.tp_overhead))
        table.append((f"decode step d1t2p1, batch {db} (work)", w_dec, pred_dec + L * hw.tp_overhead))
    if meas.get("call"):
        table.append(("call dispatch (Ray task chain, per call)", meas["call"], meas["call"]))
    if "data_hop" in meas:
        table.append(("the same chain on one worker (inputs stay local)", meas["call_local"], meas["call_local"]))
    return Fit(hw, table)


# ---------------------------------------------------------------------------------------------- measuring
def _timeit(fn, reps: int, sync=None) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _elapsed(fn, reps: int, sync=None) -> float:
    """Seconds per repetition of `fn` run `reps` times back to back (wall clock over all of them)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / reps


def _timeit_ranks(fn, reps: int, sync=None) -> float:
    """Median seconds of `fn` after one warm-up, every repetition started together on all ranks (barrier),
    the slowest rank's median (what a collective call costs the caller)."""
    import torch
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        times.append(_timeit(fn, 1, sync))
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _model(preset: str, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from reflow.models.presets import preset_config
    from reflow.models.tokenizer import build_byte_tokenizer

    config = preset_config(preset, build_byte_tokenizer())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    return model, config


def measure(rank: int, world: int, preset: str, quick: bool = False) -> dict | None:
    """One rank of the profile world (run by reflow.parallel.launch.launch); rank 0 returns the measurements."""
    import torch
    import torch.distributed as dist

    from reflow.engines.generate import GenerationEngine, SamplingParams

    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else None
    reps = 2 if quick else 3
    model, config = _model(preset, device, dtype)
    vocab = config.vocab_size
    out: dict = {"world": world, "device": "cuda" if cuda else "cpu", "preset": preset,
                 "dtype_bytes": 2 if cuda else 4}

    def ids(b, s):
        return torch.randint(5, vocab, (b, s), device=device)

    def fwd(x):
        with torch.no_grad():
            model(x).logits

    def fwd_bwd(x):
        model(x).logits.float().log_softmax(-1).mean().backward()

    sizes = [(4, SEQ), (16, SEQ), (64, SEQ)]
    if rank == 0:  # alone: the others wait in the barrier below
        for b, s in sizes:  # warm-up
            fwd(ids(b, s))
        out["forward"] = [((b, s), _timeit(lambda: fwd(ids(b, s)), reps, sync)) for b, s in sizes]
        fb = sizes[:2] if quick else sizes
        fwd_bwd(ids(4, SEQ))
        out["forward_backward"] = [((b, s), _timeit(lambda: fwd_bwd(ids(b, s)), reps, sync)) for b, s in fb]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
        fwd_bwd(ids(4, SEQ))

        def opt_step():
            opt.step()
        out["optimizer"] = _timeit(opt_step, reps + 2, sync)
        opt.zero_grad(set_to_none=True)
        del opt
        eng_cases = [(4, 16), (16, 16), (32, 48)]
        steps = []
        g1, g2 = 4, 20
        for b, p in eng_cases:
            eng = GenerationEngine(model, [-1], 0, batch_size=b)
            prompts = [list(range(5, 5 + p))] * b

            def gen(g):
                eng.generate(prompts, SamplingParams(g), torch.Generator().manual_seed(0))
            gen(2)
            t1, t2 = _timeit(lambda: gen(g1), reps, sync), _timeit(lambda: gen(g2), reps, sync)
            steps.append(((b, p, g1 + g2), max(t2 - t1, 1e-9) / (g2 - g1)))
        out["decode_step"] = steps
        n = (64 << 20) // 4
        a, c = torch.empty(n, device=device), torch.empty(n, device=device)
        a.fill_(1.0)
        out["copy"] = _timeit(lambda: c.copy_(a), reps + 2, sync)
        out["copy_bytes"] = 2 * 4 * n
        del a, c
    # sharing: the same forwards on rank 0 alone, then on all ranks at once. Throughput, not a median of
    # single passes: with more ranks than cores the scheduler lets some ranks run whole passes while the
    # others wait, so per-pass medians look faster than the ranks really progress together.
    x = ids(16, SEQ)
    fwd(x)
    share_reps = 2 * reps + 4
    if rank == 0:
        out["alone"] = _elapsed(lambda: fwd(x), share_reps, sync)
    dist.barrier()
    together = _elapsed(lambda: fwd(x), share_reps, sync)
    t = torch.tensor([together], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # until the last rank is done
    out["together"] = float(t)

    # collectives
    sizes_b = [4 << 10, 256 << 10, 4 << 20] + ([] if quick else [16 << 20])
    out["all_reduce"], out["broadcast"], out["send_recv"] = [], [], []
    if world > 1:
        for nbytes in sizes_b:
            buf = torch.zeros(nbytes // 4, device=device)
            for kind in ("all_reduce", "broadcast", "send_recv"):
                def op():
                    if kind == "all_reduce":
                        dist.all_reduce(buf)
                    elif kind == "broadcast":
                        dist.broadcast(buf, 0)
                    elif rank == 0:
                        dist.send(buf, 1)
                    elif rank == 1:
                        dist.recv(buf, 0)
                out[kind].append((nbytes, _timeit_ranks(op, reps + 2, sync)))
        out.update(_measure_realloc(rank, world, model, config, device, reps, sync))
        out.update(_measure_tp(rank, world, model, device, reps, sync))
    if cuda:
        out["memory"] = float(torch.cuda.get_device_properties(device).total_memory)
        out["reserved"] = 4 * GB if out["memory"] > 40 * GB else 2 * GB
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        out["memory"] = float(total) / world
        out["reserved"] = 0.25 * GB
    return out if rank == 0 else None


def _measure_realloc(rank, world, model, config, device, reps, sync) -> dict:
    """Owner copy FSDP over all ranks -> a replica on every rank (build + move), as the runtime does; then
    a forward on the replica and on the FSDP owner copy (all ranks at once, 16 x 32 tokens each)."""
    import copy

    import torch

    from reflow.parallel.context import ParallelContext
    from reflow.parallel.layout import Layout
    from reflow.parallel.parallelize import parallelize
    from reflow.parallel.shards import Sharding
    from reflow.realloc.model import build_destination, reallocate_model

    layout, ranks = Layout(world, 1, 1), list(range(world))
    src = Sharding.of_model(model, layout, ranks, shard_data=True)
    dst = Sharding.of(layout, ranks, src.shape_of, src.num_layers, shard_data=False)
    ctx = ParallelContext(layout, ranks, device.type)
    owner = parallelize(copy.deepcopy(model), ctx, shard_data=True)
    dtype = next(model.parameters()).dtype

    def once():
        dst_model = build_destination(type(model), config, ctx, shard_data=False, dtype=dtype)
        reallocate_model(owner, src, dst_model, dst)
        return dst_model

    def timed(fn) -> float:
        return _timeit_ranks(fn, reps, sync)

    realloc = timed(once)
    replica = once()
    x = torch.randint(5, config.vocab_size, (16, SEQ), device=device)

    def fwd(m):
        with torch.no_grad():
            m(x).logits
    t_rep = timed(lambda: fwd(replica))
    t_fsdp = timed(lambda: fwd(owner))
    plain = copy.deepcopy(model)  # every rank's own whole copy: forward + backward without FSDP

    def fwd_bwd(m):
        m(x).logits.float().log_softmax(-1).mean().backward()
        for p in m.parameters():
            p.grad = None
    t_rep_fb = timed(lambda: fwd_bwd(plain))
    t_fsdp_fb = timed(lambda: fwd_bwd(owner))  # + gathers in forward and backward, gradient reduce-scatters
    return {"realloc": realloc, "replica_forward": t_rep, "fsdp_forward": t_fsdp,
            "replica_forward_backward": t_rep_fb, "fsdp_forward_backward": t_fsdp_fb}


def _measure_tp(rank, world, model, device, reps, sync) -> dict:
    """A forward (16 x 32 tokens) and decode steps (batch 16, prompts of 16) under d1t2p1 on ranks 0-1
    while the other ranks wait: with the alone-measurements, what tensor parallel adds per layer."""
    import copy

    import torch
    import torch.distributed as dist

    from reflow.engines.generate import GenerationEngine, SamplingParams
    from reflow.parallel.context import ParallelContext
    from reflow.parallel.layout import Layout
    from reflow.parallel.parallelize import parallelize

    ctx = ParallelContext(Layout(1, 2, 1), [0, 1], device.type)  # every rank takes part in creating groups
    out = {}
    if rank in (0, 1):
        tp = parallelize(copy.deepcopy(model), ctx, shard_data=False)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randint(5, model.config.vocab_size, (16, SEQ), generator=g).to(device)

        def fwd():
            with torch.no_grad():
                tp(x).logits
        fwd()
        out["tp_forward"] = ((16, SEQ), _timeit(fwd, reps, sync))
        eng = GenerationEngine(tp, [-1], 0, batch_size=16)
        prompts = [list(range(5, 21))] * 16

        def gen(n):
            eng.generate(prompts, SamplingParams(n), keys=list(range(16)), seed=0)  # same draws on both ranks
        gen(2)
        t1, t2 = _timeit(lambda: gen(4), reps, sync), _timeit(lambda: gen(20), reps, sync)
        out["tp_decode_step"] = ((16, 16, 24), max(t2 - t1, 1e-9) / 16)
    dist.barrier()
    return out if rank == 0 else {}


class _Hop:
    """A Ray actor that passes a batch on (the runtime's per-call dispatch, without the model work)."""

    def hop(self, batch):
        return batch


def measure_call_overhead(workers: int, hops: int = 24, payload_bytes: int = 256 << 10) -> tuple[float, float]:
    """Seconds per call of a chain of Ray actor tasks, each waiting for the previous one's output (a batch
    of `payload_bytes`), as the controller chains calls: (round-robin over `workers` actors, so every hop
    moves the batch to another worker; all on one actor, so it stays in that worker's store). Their
    difference is what moving a call's inputs from another worker costs (Hardware.data_hop)."""
    import numpy as np
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    try:
        actors = [ray.remote(num_cpus=1)(_Hop).remote() for _ in range(workers)]
        ray.get([a.hop.remote(0) for a in actors])
        batch = {"tokens": np.zeros(payload_bytes // 8, dtype=np.int64)}

        def chain(stride: int) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                ref = batch
                for k in range(hops):
                    ref = actors[(k * stride) % workers].hop.remote(ref)
                ray.get(ref)
                best = min(best, (time.perf_counter() - t0) / hops)
            return best
        cross, local = chain(1), chain(0)
        for a in actors:
            ray.kill(a)
        return cross, local
    finally:
        if own:
            ray.shutdown()


def cores_from_times(t: dict[int, float]) -> tuple[float, dict[int, float]]:
    """Effective cores from the time of the same work on 1 worker alone (t[1]) and on k at once (t[k]):
    cores_k = k t[1] / t[k], clamped to [1, k]; the figure is the mean over k > 1. (cores, {k: cores_k})"""
    per_k = {k: max(1.0, min(float(k), k * t[1] / t[k])) for k in sorted(t) if k > 1}
    return sum(per_k.values()) / len(per_k), per_k


class _Spin:
    """A Ray actor like a runtime worker (`threads` intra-op threads) running forwards of a preset model."""

    def __init__(self, preset: str, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.model, config = _model(preset, torch.device("cpu"), torch.float32)
        self.x = torch.randint(5, config.vocab_size, (16, SEQ))
        self.run(2)

    def run(self, reps: int) -> float:
        import torch

        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(reps):
                self.model(self.x).logits
        return time.perf_counter() - t0


def measure_ray_sharing(workers: int, preset: str, threads: int = 1, reps: int = 12,
                        rounds: int = 3) -> tuple[float, list]:
    """Effective cores as the runtime's workers see them: `workers` Ray actors (one CPU each, `threads`
    threads, as reflow.runtime's workers) run the same forwards back to back, on one actor alone and on k
    at once (k = 2 and `workers`; wall clock until the last is done), interleaved over `rounds`:
    cores_k = k t_alone / t_k, and the figure is their mean (1 <= cores <= k). Unlike bare processes, this
    includes what Ray's own processes (raylet, object store, the driver) take from the cores.
    Returns (cores, table rows)."""
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    try:
        actors = [ray.remote(num_cpus=1)(_Spin).remote(preset, threads) for _ in range(workers)]
        ray.get([a.run.remote(1) for a in actors])
        ks = sorted({min(2, workers), workers})
        times: dict[int, list[float]] = {1: []} | {k: [] for k in ks}
        for _ in range(rounds):
            times[1].append(ray.get(actors[0].run.remote(reps)))
            for k in ks:
                times[k].append(max(ray.get([a.run.remote(reps) for a in actors[:k]])))
        for a in actors:
            ray.kill(a)
    finally:
        if own:
            ray.shutdown()
    t = {k: statistics.median(v) / reps for k, v in times.items()}
    cores, per_k = cores_from_times(t)
    rows = [("forward 16x32 tokens, one Ray worker alone", t[1], t[1])]
    rows += [(f"the same on {k} Ray workers at once ({per_k[k]:.2f} cores)", t[k], t[1] * max(1.0, k / cores))
             for k in ks]
    return cores, rows


def measure_runtime_step(workers: int, steps: int = 6, warmup: int = 2) -> tuple[float, object]:
    """The runtime's own fixed cost: PPO under the built-in "separate" plan with the `debug-llama` preset
    (2 layers, hidden 32), 2 prompts x 1 sample and 2 new tokens per step, so that compute is negligible
    and the step is dispatch, data movement between workers, batch merging and engine set-up.
    Returns (median time/step after `warmup` steps, the RLConfig)."""
    import logging
    import tempfile

    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig
    from reflow.data.tasks import write_task
    from reflow.models.presets import init_model
    from reflow.runtime.controller import Controller

    root = Path(tempfile.mkdtemp(prefix="reflow-profile-"))
    model = init_model("debug-llama", root / "model", seed=0)
    write_task("addition", root / "data", n_train=64, n_test=4, seed=0)
    role = {"path": str(model), "optim": {"lr": 1e-4}}
    cfg = from_dict(RLConfig, {
        "output_dir": str(root / "run"), "actor": role, "critic": {"optim": {"lr": 1e-4}},
        "reward": {"fn": "exact_match"}, "data": {"train": str(root / "data" / "train.jsonl"), "eval": None,
                                                 "max_prompt_len": 16},
        "rollout": {"prompts_per_step": 2, "n": 1, "max_new_tokens": 2},
        "algo": {"name": "ppo", "kl_coef": 0.01, "ppo_epochs": 1, "mini_batches": 1},
        "trainer": {"steps": steps, "progress": False, "save_every": 0},
        "runtime": {"workers": workers, "plan": "separate", "timeout_s": 120}})
    level = logging.getLogger("reflow").level
    logging.getLogger("reflow").setLevel(logging.WARNING)
    try:
        controller = Controller(cfg)
        try:
            history = controller.train()
        finally:
            controller.shutdown()
    finally:
        logging.getLogger("reflow").setLevel(level)
    return statistics.median(m["time/step"] for m in history[warmup:]), cfg


def fit_call_overhead(measured_step: float, problem, plan) -> float:
    """The per-call overhead that makes the simulator's iteration time of `plan` equal `measured_step`
    (bisection: the simulated time grows with it); 0 when the rest of the model already accounts for it."""
    import dataclasses

    from reflow.planner.simulator import evaluate

    def sim(c):
        pr = dataclasses.replace(problem, hw=problem.hw.with_(call_overhead=c), _cache={})
        return evaluate(pr, plan).time
    lo, hi = 0.0, max(measured_step, 1e-3)
    if sim(lo) >= measured_step:
        return 0.0
    while sim(hi) < measured_step:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sim(mid) < measured_step else (lo, mid)
    return (lo + hi) / 2


def one_rank_plan(graph, world_size: int):
    """Every call on rank 0 as d1t1p1: the calls run one after another, with no parallelism, no weight
    copies and no core sharing, so each call's time is its own work plus the runtime's per-call cost."""
    from reflow.parallel.layout import Layout
    from reflow.runtime.plan import Placement, Plan

    return Plan("one-rank", world_size, {c: Placement((0,), Layout(1, 1, 1)) for c in graph.order})


def measure_runtime_calls(cfg, workers: int, prompts: list[int], steps: int = 8, warmup: int = 2) -> list[dict]:
    """The workload's own calls in the runtime: `cfg` (an RLConfig) on `workers` Ray workers under
    one_rank_plan, once per prompts_per_step in `prompts` (the other
    workers idle, as in a real run's Ray session). Per run: {"prompts", "step" (median time/step after
    `warmup`), "calls" ({call: median seconds on its first rank, from the workers' timelines}), "cfg"}.
    Nothing is saved (steps run without `train`)."""
    import copy
    import logging
    import shutil
    import tempfile

    from reflow.runtime.controller import Controller
    from reflow.runtime.graphs import graph_for

    root = Path(tempfile.mkdtemp(prefix="reflow-profile-calls-"))
    plan = one_rank_plan(graph_for(cfg), workers)
    plan_path = root / f"plan-{plan.name}.yaml"
    plan.save(plan_path)
    runs = []
    level = logging.getLogger("reflow").level
    logging.getLogger("reflow").setLevel(logging.WARNING)
    try:
        for n in prompts:
            c = copy.deepcopy(cfg)
            c.output_dir = str(root / f"run-{n}")
            c.rollout.prompts_per_step = n
            c.trainer.steps, c.trainer.save_every, c.trainer.progress = steps, 0, False
            c.runtime.workers, c.runtime.plan, c.runtime.timeline = workers, str(plan_path), True
            controller = Controller(c)
            try:
                history = [controller.run_step() for _ in range(steps)]
                events = controller.timeline
            finally:
                controller.shutdown()
            per_call: dict[str, list[float]] = {}
            first = {name: pl.ranks[0] for name, pl in plan.calls.items()}
            for e in events:
                if e["step"] >= warmup and e["rank"] == first.get(e["name"]):
                    per_call.setdefault(e["name"], []).append(e["end"] - e["start"])
            steps_s = [m["time/step"] for m in history[warmup:]]
            runs.append({"prompts": n, "plan": plan.name, "cfg": c, "step_samples": steps_s, "call_samples": per_call,
                         "step": statistics.median(steps_s),
                         "calls": {k: statistics.median(v) for k, v in per_call.items()}})
    finally:
        logging.getLogger("reflow").setLevel(level)
        shutil.rmtree(root, ignore_errors=True)
    return runs


def fit_call_scales(runs: list[dict], workers: int, hw: Hardware) -> tuple[dict[str, float], float, list]:
    """hw.<kind>_scale per call kind from the measured calls of `runs` (measure_runtime_calls) and the cost
    model's own work p for them (call_overhead 0, scales 1): the relative non-negative least squares fit of

        measured = scale_kind x p + c

    with c a per-call cost shared by every kind (engine set-up, batch packing: what does not grow with
    the batch). c is returned for the report; the simulator's call_overhead (c plus the dispatch between
    calls) is fitted afterwards from the step time. Calls of a role without a model (reward functions)
    only carry per-call cost and are left out. Returns (scales, c, table rows (label, measured, fitted))."""
    from reflow.planner.config import problem_for_config
    from reflow.planner.simulator import evaluate

    base = hw.with_(call_overhead=0.0, generate_scale=1.0, infer_scale=1.0, train_scale=1.0)
    obs: list[tuple[str, str, float, float]] = []  # (kind, label, measured, modelled own work)
    for run in runs:
        problem = problem_for_config(run["cfg"], workers, base)
        ev = evaluate(problem, one_rank_plan(problem.graph, workers))
        for name in problem.graph.order:
            call = problem.graph.call(name)
            if problem.models.get(call.role) is None or name not in run["calls"]:
                continue
            label = f"{name} ({call.kind}), {problem.workload.batch} sequences, one rank"
            obs.append((call.kind, label, run["calls"][name], ev.call_times[name].time))
    kinds = sorted({k for k, *_ in obs})
    if not obs:
        return {}, 0.0, []
    coef = fit_linear([([p if k == kind else 0.0 for kind in kinds] + [1.0], t) for k, _, t, p in obs])
    scales = {kind: (coef[i] or 1.0) for i, kind in enumerate(kinds)}
    c = coef[-1]
    table = [(label, t, scales[k] * p + c) for k, label, t, p in obs]
    return scales, c, table


def _measured_shape(meas: dict):
    """The ModelShape of the preset model `measure` timed (meas["preset"], in its dtype)."""
    from reflow.models.presets import preset_config
    from reflow.models.tokenizer import build_byte_tokenizer
    from reflow.planner.models import ModelShape

    return ModelShape.of(preset_config(meas["preset"], build_byte_tokenizer()), "lm", dtype_bytes=meas["dtype_bytes"])


def pool_runs(runs: list[dict]) -> list[dict]:
    """Runs of the same plan and size taken at different times, as one each (in first-seen order): medians
    over all their steps. On a shared machine the speed drifts between runs; calibration runs spread over
    the time of a measurement (bench/planner.py) describe that time rather than one moment of it."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["plan"], r["prompts"]), []).append(r)
    out = []
    for rs in groups.values():
        steps = [x for r in rs for x in r["step_samples"]]
        calls = {k: [x for r in rs for x in r["call_samples"].get(k, [])] for k in rs[0]["call_samples"]}
        out.append(dict(rs[0], step_samples=steps, call_samples=calls, step=statistics.median(steps),
                        calls={k: statistics.median(v) for k, v in calls.items() if v}, runs=len(rs)))
    return out


def workload_fit(meas: dict, runs: list[dict], workers: int, name: str) -> Fit:
    """The figures from the microbenchmarks `meas` (`measure`, plus measure_ray_sharing's "ray_cores") and
    the workload's calibration runs (measure_runtime_calls; pooled per size, the first size the full one):
    per-kind scales (fit_call_scales), the microbenchmark fit again with them, and the per-call cost that
    makes the simulated one-rank step equal the measured one (fit_call_overhead)."""
    from reflow.planner.config import problem_for_config

    shape = _measured_shape(meas)
    cores = meas.get("ray_cores")
    runs = pool_runs(runs)
    base = fit_hardware(meas, shape, name, cores=cores).hardware
    scales, per_call, rows = fit_call_scales(runs, workers, base)
    fit = fit_hardware(meas, shape, name, scales=scales, cores=cores)
    problem = problem_for_config(runs[0]["cfg"], workers, fit.hardware)
    call = fit_call_overhead(runs[0]["step"], problem, one_rank_plan(problem.graph, workers))
    fit.hardware = fit.hardware.with_(call_overhead=call)
    meas["runtime_calls"] = [{k: r[k] for k in ("prompts", "plan", "step", "calls", "runs")} for r in runs]
    meas["runtime_call_fixed"] = per_call
    n = len(runs[0]["step_samples"])
    fit.table += meas.get("sharing_rows", []) + rows + [
        (f"runtime step, the workload ({runs[0]['prompts']} prompts), one-rank plan ({n} steps)", runs[0]["step"],
         runs[0]["step"])]
    return fit


def profile(workers: int = 4, preset: str = "tiny-llama", quick: bool = False, ray_calls: bool = True,
            name: str | None = None, config=None) -> tuple[Fit, dict]:
    """Measure on `workers` local processes and fit (see the module docstring): (Fit, raw measurements)."""
    from reflow.models.presets import PRESETS, PresetError
    from reflow.parallel.launch import launch

    if preset not in PRESETS:
        raise PresetError(f"unknown model preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if config is not None:  # a bad config fails here, in one line, before minutes of measuring
        from reflow.planner.config import problem_for_config

        problem_for_config(config, workers)
    meas = launch(measure, workers, args=(preset, quick), timeout_s=300.0)[0]
    if ray_calls:
        meas["call"], meas["call_local"] = measure_call_overhead(workers)
        if workers > 1:
            meas["data_hop"] = max(0.0, meas["call"] - meas["call_local"])
    shape = _measured_shape(meas)
    dev = "cuda" if meas["device"] == "cuda" else "cpu"
    cores = None
    if ray_calls and dev == "cpu" and workers > 1:  # shared cores as Ray workers see them
        threads = config.runtime.threads_per_worker if config is not None else 1
        cores, meas["sharing_rows"] = measure_ray_sharing(workers, preset, threads)
        meas["ray_cores"] = cores
    name = name or f"{dev}-profiled-{workers}"
    fit = fit_hardware(meas, shape, name, cores=cores)
    fit.table += meas.get("sharing_rows", [])
    if config is not None:  # the workload's own calls in the runtime: per-kind scales and per-call cost
        full = config.rollout.prompts_per_step
        meas["workload_runs"] = measure_runtime_calls(config, workers, sorted({full, max(1, full // 4)}, reverse=True))
        fit = workload_fit(meas, meas["workload_runs"], workers, name)
    elif ray_calls and workers > 1:
        from reflow.planner.config import problem_for_config
        from reflow.runtime.plan import separate

        step, cfg = measure_runtime_step(workers)
        problem = problem_for_config(cfg, workers, fit.hardware)
        plan = separate(problem.graph, workers)
        call = fit_call_overhead(step, problem, plan)
        fit.hardware = fit.hardware.with_(call_overhead=call)
        meas["runtime_step"] = step
        fit.table.append(("runtime step, debug model, separate plan", step, step))
    return fit, meas


def measured_for_yaml(meas: dict, fit: Fit) -> dict:
    """The raw measurements as plain YAML values, with the fitted predictions."""
    return {"preset": meas["preset"], "device": meas["device"], "world": meas["world"],
            "rows": [{"what": n, "measured_s": float(f"{t:.6g}"), "fitted_s": float(f"{p:.6g}")}
                     for n, t, p in fit.table],
            "alone_s": meas["alone"], "together_s": meas["together"]}
