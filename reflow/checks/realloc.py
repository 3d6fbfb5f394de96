"""Reallocation checks, run on every rank of a `launch`ed world (tests, benchmarks, a user's machine).

`check_pairs` reallocates a model's weights (as plain per-rank slices cut from one full state dict
that every rank generates from the same seed) between every pair of layouts, on identical, overlapping
and disjoint rank sets, and compares every arrived slice with the full tensor bit for bit; then it
reallocates back (a round trip) into fresh buffers and compares with the original slices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from reflow.parallel.layout import Layout
from reflow.parallel.shards import Sharding
from reflow.realloc.execute import reallocate
from reflow.realloc.plan import plan_reallocation


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def slices_of(full: dict[str, torch.Tensor], sharding: Sharding, rank: int, fill: float | None = None) -> dict:
    """This rank's slices of `full` under `sharding` (copies; `fill` = a constant instead, as a target)."""
    out = {}
    for n, t in full.items():
        box = sharding.box(rank, n)
        if box is not None:
            piece = t[box.slices()]
            out[n] = torch.full_like(piece, fill) if fill is not None else piece.clone()
    return out


def placements(src_size: int, dst_size: int) -> dict[str, tuple[list[int], list[int]]]:
    """Source and destination rank lists: the same first ranks, partly overlapping, and disjoint."""
    out = {"identical": (list(range(src_size)), list(range(dst_size)))}
    if src_size > 1:
        k = max(1, src_size // 2)
        out["overlapping"] = (list(range(src_size)), list(range(k, k + dst_size)))
    out["disjoint"] = (list(range(src_size)), list(range(src_size, src_size + dst_size)))
    return out


def _mismatches(got: dict, want: dict) -> list[str]:
    bad = [n for n in want if n not in got or not torch.equal(got[n], want[n])]
    return bad + [n for n in got if n not in want]


def check_pairs(rank: int, world: int, shapes: dict, num_layers: int, layouts: list[str],
                modes: tuple[tuple[bool, bool], ...] = ((True, False), (True, True))) -> dict:
    """Every (source, destination) layout pair x placement x (source shard_data, destination shard_data)
    mode: forward and back. Returns {"checked": pairs run, "failures": what differed on this rank}."""
    full = random_state(shapes)
    failures, count = [], 0
    for a in layouts:
        for b in layouts:
            for where, (src_ranks, dst_ranks) in placements(Layout.parse(a).size, Layout.parse(b).size).items():
                if max(src_ranks + dst_ranks) >= world:
                    continue
                for src_shard, dst_shard in modes:
                    src = Sharding.of(a, src_ranks, shapes, num_layers, src_shard)
                    dst = Sharding.of(b, dst_ranks, shapes, num_layers, dst_shard)
                    plan = plan_reallocation(src, dst, world_size=world)
                    got = slices_of(full, dst, rank, fill=float("nan"))
                    reallocate(plan, slices_of(full, src, rank), got)
                    tag = f"{src.describe()} -> {dst.describe()} [{where}]"
                    failures += [f"{tag}: '{n}'" for n in _mismatches(got, slices_of(full, dst, rank))]
                    back = slices_of(full, src, rank, fill=float("nan"))
                    reallocate(plan_reallocation(dst, src, world_size=world), got, back)
                    failures += [f"{tag} and back: '{n}'" for n in _mismatches(back, slices_of(full, src, rank))]
                    count += 1
    dist.barrier()
    return {"checked": count, "failures": failures}


def check_module_slices(rank: int, world: int, model_dir: str, layouts: list[str]) -> dict:
    """The slices `Sharding.box` promises equal the local tensors of really parallelized modules, for
    sharded (train) and replicated (generation) data parallelism. {layout/mode: max |diff| on this rank}."""
    from reflow.models.load import load_policy
    from reflow.parallel.context import ParallelContext
    from reflow.parallel.parallelize import parallelize
    from reflow.realloc.model import resharded_tensors

    full = {n: p.detach().clone() for n, p in load_policy(model_dir).named_parameters()}
    out = {}
    for text in layouts:
        size = Layout.parse(text).size
        ctx = ParallelContext.build(text, list(range(size)))
        for shard_data in (True, False):
            if ctx.index is None:
                continue
            sharding = Sharding.of(text, ctx.ranks, {n: t.shape for n, t in full.items()},
                                   len(full) and _num_layers(model_dir), shard_data)
            model = parallelize(load_policy(model_dir), ctx, shard_data=shard_data)
            local = resharded_tensors(model)
            key = f"{text}/{'sharded' if shard_data else 'replicated'}"
            if Sharding.of_model(model, text, ctx.ranks, shard_data) != sharding:
                out[key] = "Sharding.of_model of the parallelized model differs"
                continue
            want = slices_of(full, sharding, rank)
            # an empty FSDP chunk is a zero-size local tensor and no slice
            local = {n: t for n, t in local.items() if t.numel()}
            if set(local) != set(want):
                out[key] = f"names differ: {sorted(set(local) ^ set(want))[:3]}"
            elif any(local[n].shape != want[n].shape for n in want):
                out[key] = f"shapes differ: {[n for n in want if local[n].shape != want[n].shape][:3]}"
            else:
                out[key] = max((float((local[n] - want[n]).abs().max()) for n in want), default=0.0)
    dist.barrier()
    return out


def _num_layers(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).num_hidden_layers


def check_train_generate_train(rank: int, world: int, model_dir: str) -> dict:
    """Train under d2t1p1 on ranks 0-1, reallocate into generation models under d1t2p1 on disjoint (2-3),
    identical (0-1) and overlapping (1-2) ranks, generate, train again, and reallocate back into a
    sharded model (round trip). Everything is compared with one process doing the same on its own copy."""
    from transformers import AutoModelForCausalLM

    from reflow.checks.layouts import (EPS, LR, SAMPLING, compare_generation, full_params, nll_loss, sample_batch,
                                       scramble)
    from reflow.engines.train import TrainEngine
    from reflow.models.load import load_policy, load_tokenizer
    from reflow.parallel.context import ParallelContext
    from reflow.realloc.model import build_destination, reallocate_model

    tok = load_tokenizer(model_dir)
    ref = load_policy(model_dir)
    scramble(ref)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    config = ref.config
    shapes = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    batches = [sample_batch(seed=0), sample_batch(seed=1)]
    ref_engine = TrainEngine(ref, lr=LR, eps=EPS, micro_batch_tokens=40)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 261, (n,), generator=g).tolist() for n in (3, 7, 5, 9)]

    train_ctx = ParallelContext.build("d2t1p1", [0, 1])
    src = Sharding.of_model(ref, "d2t1p1", [0, 1], shard_data=True)
    engine = None
    if train_ctx.index is not None:
        model = load_policy(model_dir)
        model.load_state_dict(init)
        engine = TrainEngine(model, lr=LR, eps=EPS, micro_batch_tokens=40, parallel=train_ctx)
    out = {"generation": {}, "weights_after_train": [], "round_trip": None, "bytes": {}}
    for step, batch in enumerate(batches):
        ref_engine.step(batch, nll_loss)
        if engine is not None:
            engine.step(batch, nll_loss)
            out["weights_after_train"].append(max(float((w - full_params(ref)[n]).abs().max())
                                                  for n, w in full_params(engine.model).items()))
        for where, ranks in {"disjoint": [2, 3], "identical": [0, 1], "overlapping": [1, 2]}.items():
            gen_ctx = ParallelContext.build("d1t2p1", ranks)
            dst = Sharding.of("d1t2p1", ranks, shapes, config.num_hidden_layers, shard_data=False)
            gen_model = build_destination(AutoModelForCausalLM, config, gen_ctx, shard_data=False)
            stats = reallocate_model(engine.model if engine else None, src, gen_model, dst)
            out["bytes"][f"{step}/{where}"] = stats.received_bytes
            if gen_model is None:
                continue
            for name, sp in SAMPLING.items():
                out["generation"][f"{step}/{where}/{name}"] = compare_generation(ref, gen_model, tok, prompts, sp)
            del gen_model  # temporary copies are dropped after their call

    # round trip: the last generation layout (ranks 1-2) back into a fresh sharded d2t1p1 on ranks 2-3
    gen_ctx = ParallelContext.build("d1t2p1", [1, 2])
    gen = Sharding.of("d1t2p1", [1, 2], shapes, config.num_hidden_layers, shard_data=False)
    gen_model = build_destination(AutoModelForCausalLM, config, gen_ctx, shard_data=False)
    reallocate_model(engine.model if engine else None, src, gen_model, gen)
    back_ctx = ParallelContext.build("d2t1p1", [2, 3])
    back = Sharding.of("d2t1p1", [2, 3], shapes, config.num_hidden_layers, shard_data=True)
    back_model = build_destination(AutoModelForCausalLM, config, back_ctx, shard_data=True)
    reallocate_model(gen_model, gen, back_model, back)
    # the trained copy on 0-1 and its round-tripped copy on 2-3 are compared as full tensors on every rank
    mine = full_params(engine.model) if engine is not None else full_params(back_model) if back_model else None
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    out["round_trip"] = all(torch.equal(gathered[0][n], gathered[2][n]) for n in gathered[0])
    return out


def check_memory(rank: int, world: int, model_dir: str, pairs: list[tuple[str, str]],
                 bucket_bytes: int = 64 << 10) -> dict:
    """{"train->gen": `memory_after_reallocation`} for each (train layout, generation layout) pair."""
    return {f"{a}->{b}": memory_after_reallocation(rank, world, model_dir, a, b, bucket_bytes) for a, b in pairs}


def memory_after_reallocation(rank: int, world: int, model_dir: str, train: str, gen: str, bucket_bytes: int) -> dict:
    """A train layout's sharded model -> a generation layout on the same ranks: what this rank holds and
    receives, against one full model copy. Every rank reuses its own training slice (received bytes =
    destination slice - what it already holds) and its peak (both copies + transfer buffers) stays below a
    full copy when the destination is sharded."""
    from transformers import AutoModelForCausalLM

    from reflow.models.load import load_policy
    from reflow.parallel.context import ParallelContext
    from reflow.parallel.parallelize import parallelize
    from reflow.realloc.model import build_destination, reallocate_model, storage_bytes

    full = {n: p.detach().clone() for n, p in load_policy(model_dir).named_parameters()}
    shapes = {n: tuple(t.shape) for n, t in full.items()}
    layers = _num_layers(model_dir)
    train_ctx = ParallelContext.build(train, list(range(world)))
    src = Sharding.of(train, range(world), shapes, layers, shard_data=True)
    dst = Sharding.of(gen, range(world), shapes, layers, shard_data=False)
    model = parallelize(load_policy(model_dir), train_ctx)
    gen_model = build_destination(AutoModelForCausalLM, load_policy(model_dir).config,
                                  ParallelContext.build(gen, list(range(world))), shard_data=False)
    stats = reallocate_model(model, src, gen_model, dst, bucket_bytes=bucket_bytes)
    from reflow.parallel.shards import local_tensors

    got = local_tensors(gen_model)
    want = slices_of(full, dst, rank)
    overlap = 0
    for n in shapes:
        a, b = src.box(rank, n), dst.box(rank, n)
        if a is not None and b is not None and (c := a.intersect(b)) is not None:
            overlap += c.numel * 4
    return {
        "exact": set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want),
        "full_bytes": sum(t.numel() * 4 for t in full.values()),
        "dst_bytes": storage_bytes(got.values()),
        "resident_bytes": stats.extra["resident_bytes"],
        "buffer_peak_bytes": stats.buffer_peak_bytes,
        "received_bytes": stats.received_bytes,
        "expected_received_bytes": dst.local_bytes(rank) - overlap,
    }


def check_lora_adapter_moves(rank: int, world: int, model_dir: str) -> dict:
    """A LoRA model trained under FSDP2 d2t1p1 on ranks 0-1 and its kept replica under d2 (replicated) on ranks
    1-2 (rank 0 only sends, rank 2 only receives): the first move carries every weight, then after each train
    step only the adapters move. The replica must equal the trained model's whole weights bit for bit.
    Returns (on every rank) the mismatching names after each adapter-only move and the bytes each move received."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from reflow.checks.layouts import EPS, LR, full_params, nll_loss, sample_batch
    from reflow.engines.train import TrainEngine
    from reflow.models.load import load_policy
    from reflow.models.lora import add_adapters, inject, trainable_names
    from reflow.parallel.context import ParallelContext
    from reflow.parallel.shards import param_shapes
    from reflow.realloc.model import build_destination, reallocate_model

    lora = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = load_policy(model_dir)
    config = add_adapters(model, lora).peft_config["default"]
    shapes, names = param_shapes(model), trainable_names(model)
    layers = model.config.num_hidden_layers
    src = Sharding.of("d2t1p1", [0, 1], shapes, layers, shard_data=True)
    dst = Sharding.of("d2t1p1", [1, 2], shapes, layers, shard_data=False)
    everything = plan_reallocation(src, dst, world_size=world)
    adapters = plan_reallocation(src.only(names), dst.only(names), world_size=world)
    train_ctx, copy_ctx = ParallelContext.build("d2t1p1", [0, 1]), ParallelContext.build("d2t1p1", [1, 2])
    engine = TrainEngine(model, lr=LR, eps=EPS, grad_clip=0.0, micro_batch_tokens=40, parallel=train_ctx) \
        if train_ctx.index is not None else None
    kept = build_destination(AutoModelForCausalLM, model.config, copy_ctx, shard_data=False,
                             prepare=lambda m: inject(m, config))
    out = {"mismatches": [], "received": []}
    for step, plan in enumerate([everything, adapters, adapters]):
        if step and engine is not None:  # the adapters change; the base does not
            engine.step(sample_batch(seed=step), nll_loss)
        stats = reallocate_model(engine.model if engine else None, src, kept, dst, plan=plan)
        out["received"].append(stats.received_bytes)
        want = [full_params(engine.model) if engine is not None else None]
        gathered = [None] * world
        dist.all_gather_object(gathered, want[0])
        if kept is not None:
            got = dict(kept.named_parameters())
            out["mismatches"].append([n for n, t in gathered[0].items() if not torch.equal(got[n], t)])
    return out
