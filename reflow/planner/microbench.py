"""Micro-benchmarks for calibration (`reflow profile`): what the devices do with a model of the preset
(random weights, the byte tokenizer), one small operation at a time, so that fit.py can fit the cost
model's per-device figures from them.

`measure` runs on N processes in one torch.distributed world (reflow.parallel.launch: gloo on CPU, NCCL on
GPUs; one intra-op thread per process, as the runtime's workers use):

    compute     forward and forward+backward over 128..2048 tokens (sequences of 32), on rank 0 alone
                while the others wait
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

`measure_ray_sharing` (needs Ray; CPU, N > 1): N Ray actors like the runtime's workers (one CPU, the
configured threads) run the same forwards on one actor alone, then on 2 and on N at once: effective
cores = k t_alone / t_k, averaged over k. This replaces the bare processes' figure: Ray's own processes
(raylet, object store, the driver) take a share of the cores.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

from reflow.planner.hardware import GB

SEQ = 32  # sequence length of the compute measurements


@contextmanager
def ray_session(workers: int):
    """A local Ray session with a CPU for each of `workers` actors; a session the caller already runs is
    used as it is (and left running), so that calibration can share a caller's session."""
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    try:
        yield
    finally:
        if own:
            ray.shutdown()


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

    with ray_session(workers):
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
    t = {k: statistics.median(v) / reps for k, v in times.items()}
    cores, per_k = cores_from_times(t)
    rows = [("forward 16x32 tokens, one Ray worker alone", t[1], t[1])]
    rows += [(f"the same on {k} Ray workers at once ({per_k[k]:.2f} cores)", t[k], t[1] * max(1.0, k / cores))
             for k in ks]
    return cores, rows
