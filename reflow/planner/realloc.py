"""Reallocation cost: the traffic and time of moving a role's weights from its owner layout to the layout
of a call, as the runtime does it (reflow.realloc: the owner copy sends, the call's ranks receive a
replicated copy: generate / infer layouts never shard over d).

Two ways to get the byte counts, which agree (tests/planner/test_realloc_cost.py):

    exact     reflow.realloc.plan.plan_reallocation(src, dst).cost() over the model's real parameter
              shapes: bytes sent and received per rank and the number of collectives, exactly what the
              executor will move. Its cost grows with (parameters x ranks x slices): fine for the CPU
              models this repository runs, seconds per pair for a 70B model on 128 ranks.
    analytic  the same counts from slice fractions, in O(ranks x layers) arithmetic; what the search uses.

The analytic count. A parameter category is a set of tensors split alike (see shards.py):

    column-wise   q, k, v (+ biases), gate, up: tensor chunk along rows, FSDP chunk of that along rows
    row-wise      o, down: tensor chunk along columns, FSDP chunk along rows
    whole         the layer norms, and (outside the layers, on every stage) embeddings, final norm, head:
                  FSDP chunk along rows only

A rank holds a rectangle [r0, r1) x [c0, c1) of every tensor in relative coordinates; the bytes two
ranks share are numel x |rows overlap| x |cols overlap|. For destination rank r' (replicated layout
d't'p') and source rank r (owner layout dtp, sharded over d when the role trains, replicated otherwise):

    need(r')      = bytes of the slices r' must hold
    local(r)      = bytes r holds in the source that it needs in the destination (copied, not sent)
    received(r')  = need(r') - local(r')
    sent(r)       = sum over categories of (hold(r) * copies - local summed over the holders of r's
                    slice) / holders
                    copies: destination ranks needing each element (d' for tensor-split layer tensors,
                    d't' for whole layer tensors, d't'p' outside the layers); holders: the source ranks
                    with the same slice (replicas over dp when the source is not sharded, also over tp
                    for whole layer tensors, also over pp outside the layers), the load spread evenly
                    over them (the planner picks the least loaded holder)

    time          = max_r (sent(r) + received(r)) / bw + collectives * latency + realloc_overhead

with (bw, latency) the intra-node link when source and destination ranks share one node, the inter-node
link otherwise, and collectives ~ ceil(bytes / bucket) + number of senders (the executor's buckets);
realloc_overhead (hardware.py, measured by `reflow profile`) is building the destination model and planning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from reflow.parallel.pipeline import stage_bounds
from reflow.planner.hardware import Hardware
from reflow.planner.models import ModelShape, param_shapes
from reflow.realloc.plan import DEFAULT_BUCKET_BYTES, Cost
from reflow.runtime.plan import Placement

BUCKET_BYTES = DEFAULT_BUCKET_BYTES  # the executor's bucket size


@dataclass
class ReallocCost(Cost):
    """The executor's traffic figures (bytes per rank, collectives; see reflow.realloc.plan.Cost) plus the
    predicted time in seconds."""

    time: float = 0.0


def adapters_only(cost: ReallocCost, fraction: float) -> ReallocCost:
    """The steady-state move of a LoRA role into a copy that keeps its frozen base (reflow.runtime.worker): only
    the adapters, a `fraction` of the parameters spread over the same layers, so of the bytes and time too."""
    return ReallocCost(sent={r: b * fraction for r, b in cost.sent.items()},
                       received={r: b * fraction for r, b in cost.received.items()},
                       collectives=cost.collectives, time=cost.time * fraction)


def _chunk(lo: float, hi: float, parts: int, index: int) -> tuple[float, float]:
    size = (hi - lo) / parts
    return lo + index * size, lo + (index + 1) * size


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def _rect(cat: str, tp: int, t: int, dp: int, d: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Relative (rows, cols) rectangle of a category's tensor held by coordinates (tp of t, dp of d);
    d = 1 for a replicated copy."""
    rows, cols = (0.0, 1.0), (0.0, 1.0)
    if cat == "col" and t > 1:
        rows = _chunk(0.0, 1.0, t, tp)
    elif cat == "row" and t > 1:
        cols = _chunk(0.0, 1.0, t, tp)
    if d > 1:
        rows = _chunk(rows[0], rows[1], d, dp)
    return rows, cols


def _frac(rect) -> float:
    return (rect[0][1] - rect[0][0]) * (rect[1][1] - rect[1][0])


def _shared(a, b) -> float:
    return _overlap(a[0], b[0]) * _overlap(a[1], b[1])


def _category_numels(m: ModelShape) -> dict[str, float]:
    h = m.hidden
    bias = (m.q_dim + 2 * m.kv_dim) if m.qkv_bias else 0
    return {"col": h * (m.q_dim + 2 * m.kv_dim) + bias + 2 * h * m.intermediate,
            "row": h * m.q_dim + h * m.intermediate, "whole": m.layer_whole_params}


def realloc_cost(m: ModelShape, src: Placement, dst: Placement, hw: Hardware, *, src_sharded: bool = True,
                 bucket_bytes: int = BUCKET_BYTES) -> ReallocCost:
    """Analytic traffic and time of reallocating `m` from `src` (the owner copy) to a replicated copy on
    `dst` (see the module docstring). Same placement: nothing moves."""
    return _realloc_cost(m, src, dst, hw, src_sharded, bucket_bytes)


@lru_cache(maxsize=1 << 16)
def _realloc_cost(m: ModelShape, src: Placement, dst: Placement, hw: Hardware, src_sharded: bool,
                  bucket_bytes: int) -> ReallocCost:
    if src == dst and (not src_sharded or src.layout.d == 1):  # the call runs on the owner copy itself
        return ReallocCost()
    L = m.layers
    S, D = src.layout, dst.layout
    ds = S.d if src_sharded else 1  # FSDP shards of the source
    numel = _category_numels(m)
    outer = m.outer_params
    src_stage = [next(s for s in range(S.p) if l < stage_bounds(L, S.p, s)[1]) for l in range(L)]
    dst_stage = [next(s for s in range(D.p) if l < stage_bounds(L, D.p, s)[1]) for l in range(L)]
    # layers per (source stage, destination stage)
    both: dict[tuple[int, int], int] = {}
    for a, b in zip(src_stage, dst_stage):
        both[(a, b)] = both.get((a, b), 0) + 1
    src_layers = [sum(n for (a, _), n in both.items() if a == s) for s in range(S.p)]
    dst_layers = [sum(n for (_, b), n in both.items() if b == s) for s in range(D.p)]
    src_coords = {r: S.coords(i) for i, r in enumerate(src.ranks)}
    dst_coords = {r: D.coords(i) for i, r in enumerate(dst.ranks)}

    def src_rect(cat, c):
        pp, dp, tp = c
        return _rect(cat, tp, S.t, dp, ds)

    def dst_rect(cat, c):
        pp, dp, tp = c
        return _rect(cat, tp, D.t, dp, 1)

    cats = list(numel) + ["outer"]
    size = dict(numel, outer=outer)

    def layers_shared(cs, cd) -> int:
        return both.get((cs[0], cd[0]), 0)

    def local(r) -> dict[str, float]:
        """Elements of each category rank r holds in the source and needs in the destination."""
        if r not in src_coords or r not in dst_coords:
            return dict.fromkeys(cats, 0.0)
        cs, cd = src_coords[r], dst_coords[r]
        n = layers_shared(cs, cd)
        out = {c: n * numel[c] * _shared(src_rect(c, cs), dst_rect(c, cd)) for c in numel}
        out["outer"] = outer * _shared(src_rect("whole", cs), dst_rect("whole", cd))
        return out

    locals_ = {r: local(r) for r in set(src_coords) | set(dst_coords)}
    cost = ReallocCost()
    for r, cd in dst_coords.items():
        need = dst_layers[cd[0]] * sum(numel[c] * _frac(dst_rect(c, cd)) for c in numel) + outer
        got = need - sum(locals_[r].values())
        if got > 1e-9:
            cost.received[r] = got * m.dtype_bytes
    # the ranks holding the same slice of a category: tensor-split layer tensors are replicated over dp
    # (replicated source), whole layer tensors also over tp, tensors outside the layers also over pp
    copies = {"col": D.d, "row": D.d, "whole": D.d * D.t, "outer": D.d * D.t * D.p}
    sent: dict[int, float] = {}
    for c in cats:
        groups: dict[tuple, list[int]] = {}
        for r, (pp, dp, tp) in src_coords.items():
            key = (pp if c != "outer" else 0, tp if c in ("col", "row") else 0, dp if src_sharded else 0)
            groups.setdefault(key, []).append(r)
        for rs in groups.values():
            cs = src_coords[rs[0]]
            rect = src_rect("whole" if c == "outer" else c, cs)
            held = (size[c] if c == "outer" else src_layers[cs[0]] * size[c]) * _frac(rect)
            out = (held * copies[c] - sum(locals_[r][c] for r in rs)) / len(rs)
            for r in rs:
                sent[r] = sent.get(r, 0.0) + out
    cost.sent = {r: v * m.dtype_bytes for r, v in sent.items() if v > 1e-9}
    if cost.total_bytes <= 0:
        return ReallocCost()
    cost.collectives = math.ceil(cost.total_bytes / bucket_bytes) + len(cost.sent)
    bw, lat = hw.link(sorted(set(src.ranks) | set(dst.ranks)))
    cost.time = cost.max_rank_bytes / bw + cost.collectives * lat + hw.realloc_overhead
    return cost


def realloc_cost_exact(m: ModelShape, src: Placement, dst: Placement, hw: Hardware, *, src_sharded: bool = True,
                       bucket_bytes: int = BUCKET_BYTES) -> ReallocCost:
    """Byte counts from the real reallocation planner over the model's parameter shapes (slow for large
    models; cached per (model, src, dst))."""
    return _exact(m, src, dst, hw, src_sharded, bucket_bytes)


@lru_cache(maxsize=256)
def _exact(m: ModelShape, src: Placement, dst: Placement, hw: Hardware, src_sharded: bool, bucket_bytes: int) -> ReallocCost:
    from reflow.parallel.shards import Sharding
    from reflow.realloc.plan import plan_reallocation

    if m.config is None:
        raise ValueError("exact reallocation cost needs the model's config (ModelShape.of(config))")
    shapes = param_shapes(m.config, m.head)
    a = Sharding.of(src.layout, src.ranks, shapes, m.layers, shard_data=src_sharded)
    b = Sharding.of(dst.layout, dst.ranks, shapes, m.layers, shard_data=False)
    c = plan_reallocation(a, b, ranks_per_node=hw.devices_per_node, dtype_bytes=m.dtype_bytes,
                          bucket_bytes=bucket_bytes).cost()
    out = ReallocCost(dict(c.sent), dict(c.received), c.collectives)
    if out.total_bytes:
        bw, lat = hw.link(sorted(set(src.ranks) | set(dst.ranks)))
        out.time = out.max_rank_bytes / bw + out.collectives * lat + hw.realloc_overhead
    return out
