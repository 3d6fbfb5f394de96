"""Memory model: the bytes each rank holds while a plan runs, and the rejection of plans that do not fit.

Per rank (b = the model's bytes per value in calls, h hidden, V vocabulary, t/d/p of the layout, W the
weights of the rank's pipeline stage on one tensor-parallel rank: n_s (P_split/t + P_whole) + P_outer):

    resident (all the time, the owner copy of every role that has ranks here)
      trained role      W / d * 12      fp32 weights (the master copy) + Adam m and v (FSDP shards over d)
                        LoRA: W / d * (b + 12 f), f = trainable / all parameters (frozen base + adapters' state)
      frozen role       W * b           a replicated copy in its first call's layout
    during a train call
      gradients         W / d * 4 f     (with the resident 12: the usual 16 bytes / parameter; f = 1 without LoRA)
      gathered layers   2 P_layer / t * b   FSDP's current and prefetched layer, when d > 1
      activations       no checkpointing:  tokens x n_s x h (10 + 24/t) b/2     (Korthikanti et al. 2022,
                                           flash attention: no s^2 term)
                        checkpointing:     tokens x n_s x h b + T_micro h (10 + 24/t) b/2  (layer inputs
                                           kept, one layer recomputed at a time)
                        tokens = T_micro k, k = micro-batches in flight on the rank's stage s:
                        1 (p = 1), m (GPipe keeps all until the backward), min(p - s, m) (1F1B)
      logits            T_micro V 4 * 2 on the last stage (fp32 logits and their gradient; lm head only)
    during a generate / infer call that runs on a reallocated copy (reflow.runtime.plan.needs_copy)
      the copy          W * b           (temporary: built by reallocation, dropped after the call)
    generate            KV cache  wave x n_s x S x 2 n_kv d_h b / t  + logits wave V 4 + activations
    infer               activations T_micro (4 h + 2 i / t) b + logits T_micro V 4

    peak(rank) = resident(rank) + max over the calls that use the rank of their transient bytes

A generation's wave (sequences decoded together) is as large as the KV cache allows on the fullest rank
of its mesh, at most B/d (and at most workload.decode_batch); when not even one sequence fits, or any peak exceeds the device's usable
memory (memory - reserved), the plan is rejected with a reason naming the call, the rank and the GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from reflow.parallel.pipeline import stage_bounds
from reflow.parallel.schedules import peak_in_flight, stage_order
from reflow.planner.cost import Workload, _micro_batches
from reflow.planner.hardware import GB, Hardware
from reflow.planner.models import ModelShape
from reflow.runtime.plan import needs_copy
from reflow.runtime.graph import Graph
from reflow.runtime.plan import Placement, Plan

MASTER_ADAM_BYTES = 12  # fp32 weights + Adam m, v per parameter (resident)
GRAD_BYTES = 4  # fp32 gradients per parameter (during a train call)


def stage_of(pl: Placement, rank: int) -> tuple[int, int, int]:
    return pl.layout.coords(pl.ranks.index(rank))


def weight_elems(m: ModelShape, pl: Placement, rank: int, sharded: bool) -> float:
    """Weights `rank` holds under `pl` (embeddings, final norm and head are on every stage)."""
    L = pl.layout
    pp, _, _ = stage_of(pl, rank)
    a, b = stage_bounds(m.layers, L.p, pp)
    elems = (b - a) * (m.layer_split_params / L.t + m.layer_whole_params) + m.outer_params
    return elems / L.d if sharded else elems


def _act_per_token_layer(m: ModelShape, t: int) -> float:
    return m.hidden * (10 + 24 / t) * m.dtype_bytes / 2


def micro_batches_in_flight(pl: Placement, stage: int, micro: int) -> int:
    """Micro-batches whose activations stage `stage` holds at once in a train call (schedules.peak_in_flight)."""
    if pl.layout.p == 1:
        return 1
    return peak_in_flight(stage_order(pl.schedule, stage, pl.layout.p, micro))


def train_transient(m: ModelShape, pl: Placement, rank: int, wl: Workload) -> dict[str, float]:
    L = pl.layout
    pp, _, _ = stage_of(pl, rank)
    a, b = stage_bounds(m.layers, L.p, pp)
    n = b - a
    seqs = math.ceil(wl.batch / (L.d * wl.mini_batches))
    tokens = seqs * wl.seq_tokens  # a shared prompt prefix runs once (Workload.share_prefix)
    micro = _micro_batches(tokens, seqs, wl, L.p)
    t_micro = tokens / micro
    flat = t_micro * wl.seq_len / wl.seq_tokens  # the log-probs come out per sequence token, prefix repeated
    in_flight = t_micro * micro_batches_in_flight(pl, pp, micro)
    full = _act_per_token_layer(m, L.t)
    if wl.checkpointing:
        act = in_flight * n * m.hidden * m.dtype_bytes + t_micro * full
    else:
        act = in_flight * n * full
    out = {"gradients": weight_elems(m, pl, rank, True) * m.trainable_fraction * GRAD_BYTES, "activations": act}
    if L.d > 1:
        out["gathered layers"] = 2 * m.layer_params / L.t * m.dtype_bytes
    if pp == L.p - 1 and m.head == "lm":
        out["logits"] = flat * m.vocab * 4 * 2
    return out


def infer_transient(m: ModelShape, pl: Placement, rank: int, wl: Workload) -> dict[str, float]:
    L = pl.layout
    pp, _, _ = stage_of(pl, rank)
    seqs = math.ceil(wl.batch / L.d)
    tokens = seqs * wl.seq_tokens
    t_micro = tokens / _micro_batches(tokens, seqs, wl, L.p)
    out = {"activations": t_micro * (4 * m.hidden + 2 * m.intermediate / L.t) * m.dtype_bytes}
    if pp == L.p - 1 and m.head == "lm":
        out["logits"] = t_micro * wl.seq_len / wl.seq_tokens * m.vocab * 4
    return out


def kv_bytes_per_seq(m: ModelShape, pl: Placement, rank: int, wl: Workload) -> float:
    L = pl.layout
    pp, _, _ = stage_of(pl, rank)
    a, b = stage_bounds(m.layers, L.p, pp)
    return (b - a) * wl.seq_len * m.kv_bytes_per_token_layer / L.t


def generate_per_seq(m: ModelShape, pl: Placement, rank: int, wl: Workload) -> dict[str, float]:
    """Bytes per sequence of a wave: KV cache, logits (lm head on the last stage), activations."""
    L = pl.layout
    pp, _, _ = stage_of(pl, rank)
    return {"kv cache": kv_bytes_per_seq(m, pl, rank, wl),
            "logits": m.vocab * 4 if pp == L.p - 1 else 0.0,
            "activations": wl.prompt_len * (4 * m.hidden + 2 * m.intermediate / L.t) * m.dtype_bytes}


@dataclass
class MemoryReport:
    peak: dict[int, float]  # bytes per rank
    parts: dict[int, dict[str, float]]  # what makes up each rank's peak
    concurrency: dict[str, int]  # sequences per generation wave, per generate call
    feasible: bool = True
    reason: str = ""
    overflow: float = 0.0  # bytes above the usable memory, summed over ranks (0 when feasible)
    peak_call: dict[int, str] = field(default_factory=dict)

    def max_peak(self) -> float:
        return max(self.peak.values(), default=0.0)


def _stage_ranks(pl: Placement) -> list[tuple[int, int]]:
    """(rank, its pipeline stage) for every rank of a placement."""
    per_stage = pl.layout.d * pl.layout.t
    return [(r, i // per_stage) for i, r in enumerate(pl.ranks)]


@lru_cache(maxsize=1 << 14)
def _resident(m: ModelShape, owner: Placement, trained: bool) -> tuple[tuple[int, float], ...]:
    # LoRA: the frozen base in its dtype, master weights and Adam moments only for the trainable fraction f
    per_byte = (m.dtype_bytes + m.trainable_fraction * MASTER_ADAM_BYTES if m.lora_rank else MASTER_ADAM_BYTES) \
        if trained else m.dtype_bytes
    per_stage = [weight_elems(m, owner, owner.ranks[s * owner.layout.d * owner.layout.t], trained) * per_byte
                 for s in range(owner.layout.p)]
    return tuple((r, per_stage[s]) for r, s in _stage_ranks(owner))


@lru_cache(maxsize=1 << 15)
def _transient(kind: str, m: ModelShape, pl: Placement, copy: bool, wl: Workload,
               conc: int) -> tuple[tuple[int, dict], ...]:
    """Per rank: the transient parts of a call (conc: sequences per generation wave)."""
    stages = []
    for s in range(pl.layout.p):
        r = pl.ranks[s * pl.layout.d * pl.layout.t]
        parts: dict[str, float] = {}
        if copy:
            parts["weights copy"] = weight_elems(m, pl, r, False) * m.dtype_bytes
        if kind == "train":
            parts.update(train_transient(m, pl, r, wl))
        elif kind == "infer":
            parts.update(infer_transient(m, pl, r, wl))
        else:
            parts.update({k: v * conc for k, v in generate_per_seq(m, pl, r, wl).items()})
        stages.append(parts)
    return tuple((r, stages[s]) for r, s in _stage_ranks(pl))


@lru_cache(maxsize=1 << 15)
def _gen_fixed_per_seq(m: ModelShape, pl: Placement, copy: bool, wl: Workload) -> tuple[tuple[int, float, float], ...]:
    """Per rank: (bytes fixed by a generate call: its weights copy, bytes per sequence of a wave)."""
    out = []
    for s in range(pl.layout.p):
        r = pl.ranks[s * pl.layout.d * pl.layout.t]
        fixed = weight_elems(m, pl, r, False) * m.dtype_bytes if copy else 0.0
        out.append((fixed, sum(generate_per_seq(m, pl, r, wl).values())))
    return tuple((r, *out[s]) for r, s in _stage_ranks(pl))


def plan_memory(graph: Graph, plan: Plan, models: dict[str, ModelShape | None], hw: Hardware,
                wl: Workload) -> MemoryReport:
    """Per-rank peak memory of `plan` and whether it fits `hw` (see the module docstring)."""
    usable = hw.usable_memory
    trained = set(graph.trained_roles())
    base = [0.0] * plan.world_size
    owners: dict[str, Placement] = {}
    for role in graph.roles:
        m = models.get(role)
        if m is None:
            continue
        owners[role] = plan.owner(graph, role)
        for r, b in _resident(m, owners[role], role in trained):
            base[r] += b
    top = [0.0] * plan.world_size
    top_call: list[tuple[str, dict] | None] = [None] * plan.world_size
    concurrency: dict[str, int] = {}
    reason = ""
    overflow = 0.0
    for name in graph.order:
        call = graph.call(name)
        m = models.get(call.weights)  # the weights it runs on (an update runs on another role's)
        if m is None:
            continue
        pl = plan.calls[name]
        copy = needs_copy(call.kind, pl, owners[call.weights], call.weights in trained)
        conc = 0
        if call.kind == "generate":
            conc = math.ceil(wl.batch / pl.layout.d)
            if wl.decode_batch:
                conc = min(conc, wl.decode_batch)
            worst = None
            for r, fixed, per in _gen_fixed_per_seq(m, pl, copy, wl):
                free = usable - base[r] - fixed
                fits = int(free // per) if per > 0 else conc
                if fits < conc:
                    conc, worst = fits, (r, free, per)
            if conc < 1:
                r, free, per = worst
                overflow += per - max(free, 0.0)
                if not reason:
                    reason = (f"call '{name}' ({call.kind} {pl}): rank {r} has {max(free, 0) / GB:.1f} GB left after "
                              f"the weights for the KV cache but one sequence needs {per / GB:.2f} GB "
                              f"({hw.name}: {hw.memory / GB:.0f} GB per device); use a larger tensor degree "
                              f"or fewer resident models on these ranks")
                conc = 1
            concurrency[name] = conc
        for r, parts in _transient(call.kind, m, pl, copy, wl, conc):
            total = sum(parts.values())
            if total > top[r]:
                top[r], top_call[r] = total, (name, parts)
    peak, breakdown, where = {}, {}, {}
    for r in range(plan.world_size):
        peak[r] = base[r] + top[r]
        where[r] = top_call[r][0] if top_call[r] else ""
        if peak[r] > usable:
            overflow += peak[r] - usable
            if not reason:
                parts = rank_parts(graph, plan, models, wl, r, top_call[r])
                big = sorted(parts.items(), key=lambda kv: -kv[1])[:4]
                what = ", ".join(f"{k} {v / GB:.1f}" for k, v in big)
                reason = (f"call '{where[r] or '?'}' on rank {r}: needs {peak[r] / GB:.1f} GB ({what} GB) but the "
                          f"{hw.name} has {usable / GB:.1f} GB usable ({hw.memory / GB:.0f} GB - "
                          f"{hw.reserved / GB:.1f} GB reserved); spread the role over more ranks (d, t or p)")
    return MemoryReport(peak, breakdown, concurrency, feasible=not reason, reason=reason, overflow=overflow,
                        peak_call=where)


def rank_parts(graph: Graph, plan: Plan, models: dict, wl: Workload, rank: int, top_call=None) -> dict[str, float]:
    """What makes up `rank`'s peak: the resident copies and the transient parts of its largest call."""
    trained = set(graph.trained_roles())
    out: dict[str, float] = {}
    for role in graph.roles:
        m = models.get(role)
        if m is None:
            continue
        for r, b in _resident(m, plan.owner(graph, role), role in trained):
            if r == rank:
                out[f"{role} {'weights+adam' if role in trained else 'weights'}"] = b
    if top_call:
        name, parts = top_call
        out.update({f"{name} {k}": v for k, v in parts.items()})
    return out
