"""Cost model: the time of one call of the graph under a layout on its ranks.

Notation: layout dXtYpZ on ranks R; B sequences per iteration of P prompt and G generated tokens
(S = P + G); a stage holds n_s decoder layers (stage_bounds), the last one also the head; F_layer and
the parameter counts are those of reflow.planner.models; b = bytes per value (bf16: 2); hw figures as in
hardware.py (F = flops x matmul efficiency, M = memory bandwidth x memory efficiency).

One pass of a stage over T tokens attending to c keys each (the building block):

    compute  = (n_s F_layer(T, c) / t + F_head(T)) / F          (the head is not tensor split here)
    weights  = (n_s (P_split / t + P_whole) + P_head) b / M      (every weight read once per pass)
    stage(T) = max(compute, weights) + n_s overhead + n_s k AR_t(T h b)

with AR_t an all-reduce over the stage's tensor-parallel group (k = 2 per layer forward: after attention
and after the MLP; 4 forward + backward; 6 with activation checkpointing, which reruns the forward).

infer (forward: log-probs, values, rewards), per data-parallel replica, B/d sequences, T = (B/d) S tokens
cut into m micro-batches (m = ceil(T / micro_tokens), at least p when pipelined), c = S/2 (causal):

    time = (m + p - 1) * max_s [stage_s(T/m) + send(T/m h b)]         bubble (p-1)/(m+p-1)

train (one optimizer step per mini-batch, `epochs` passes): T = B S / (d * mini_batches) tokens per
replica per step, m micro-batches; backward = 2 forward FLOPs (3 x, or 4 x with checkpointing);
FSDP over the d ranks of each (pp, tp) group gathers the stage's weights twice (forward, backward) and
reduce-scatters its gradients: per micro-batch without pipeline (reflow's engine syncs every micro-batch),
once per step with one (the pipeline keeps weights gathered until the last micro-batch):

    pipe   = (m + p - 1) * max_s train_stage_s(T/m)           GPipe and 1F1B alike (schedules.py); they
                                                             differ in activation memory (memory.py)
    fsdp   = k_sync (2 AG_d(W_s b) + RS_d(W_s b))            W_s: the stage's weights on one tp rank
    step   = max(pipe, fsdp) + fsdp / (k_sync n_s)           (prefetch hides the gathers behind compute,
                                                             except the first layer's)
    adam   = W_s / d * 28 bytes / M                           (read fp32 master, m, v, grad; write 3)
    time   = epochs * mini_batches * (step + adam)

generate (per replica b_r = B/d sequences, in waves of at most `concurrency` sequences: the KV cache of a
wave must fit, see memory.py): prefill is an infer pass over the wave's prompts (c = P/2); decode step k
processes one token per live sequence of the wave (n_k of them) attending to P + k keys:

    compute_k = (L F_layer(n_k, P + k) / t + F_head(n_k)) / F                 (linear in k)
    memory_k  = ((L (P_split / t + P_whole) + P_head) b + L n_k (P + k) kv / t) / M   (weights + KV read)
    step_k    = max(compute_k, memory_k) + L overhead + 2 L AR_t(n_k h b)
    time      = waves * (prefill + sum_k step_k)             (decode is memory-bandwidth bound at small
                                                             batch: every step reads all weights)

Response lengths (Workload.gen_lens): without a distribution every sequence decodes G = gen_len steps
(n_k = wave for k < G: the budget, an upper bound). With one, a wave's sequences get the lengths
l_1 <= ... <= l_wave of Workload.gen_lengths(wave) (the distribution's quantiles at (i - 1/2) / wave), the
wave decodes max l steps and n_k = #{i: l_i > k}: the batch shrinks through the long tail, so the tail's
steps are cheap in compute but still read every weight. n_k is constant between two lengths, so the sum
is taken segment by segment. Sequence i is complete at the end of its step l_i - 1 (waves one after the
other; the engine's refill of freed slots with waiting prompts is not modelled: an upper bound when the
KV cache limits the wave). CallCost.samples lists, for one replica in finish order, (seconds from the
sample's completion to the call's end, its length): what inter-stage fusion (stream.py) cuts the call at.
Infer and train calls compute on the mean length (Workload.mean_seq_tokens: packed batches have no
padding); memory (memory.py) keeps the budget, since one step's samples can all run long.

A generate / infer call that runs on the owner copy of a trained role (same placement as its train call)
uses the FSDP-sharded weights: every forward pass all-gathers the stage's weights over d (per micro-batch
for infer, per decode step and prefill for generate), overlapped with compute:
infer = max(pipe, m AG_d) + AG_d / n_s; decode = max(decode, G AG_d).

fused train calls (the plan's `fuse: [a, b]`, same ranks, p >= 2, M micro-batches each; per-micro-batch
forward + backward of the slowest stage u_a, u_b): RLHFuse's interleaved schedule replaces the two pipelines
run one after the other, per optimizer step

    sequential = (M + p - 1)(u_a + u_b)
    fused      = sequential x span(searched fused schedule) / span(1F1B of a, then of b)     (fused_ratio:
                 parallel/fused.py's search on integer op times f = 1..4 in the ratio u_a : u_b, b = 2 f)
    bound      = max((M + p - 1) max(u_a, u_b), M (u_a + u_b))            (for p M > 32 the bound is used)

and each call keeps its share (u_a : u_b) of the fused time; FSDP and optimizer terms are unchanged.
Activations: the fused schedule holds at most p micro-batches per rank, of either model (its memory limit),
as 1F1B does (memory.py).

Tensor parallel's fixed cost per layer per pass (DTensor dispatch, launching the all-reduces):
tp_overhead x n_s per forward pass and per decode step (x compute_passes in training), when t > 1.

FSDP's fixed cost per unit (a decoder layer, or the root module) per gather / reduce-scatter:
fsdp_overhead x (n_s + 1) per forward on the owner copy, 3 x that per micro-batch of a train call
(gathers in forward and backward, reduce-scatter), added to the time above.

Measured per-kind figures (hardware.py; 1 in the presets, fitted by `reflow profile --config` from the
workload's own calls): hw.generate_scale, infer_scale and train_scale multiply a call's own work (the
stage passes, decode steps and optimizer step above), never its collectives or reallocations.

Fixed overheads (hardware.py; 0 in the GPU presets, measured by `reflow profile` on CPU workers): every
decode step adds step_overhead, every optimizer step optimizer_overhead, every call of the graph (a reward
function too) call_overhead. A call on a role without a model (a reward function) costs only that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from reflow.parallel.layout import Layout
from reflow.parallel.pipeline import stage_bounds
from reflow.parallel.fused import FusedSpec, search_fused_in_memory, sequential_1f1b
from reflow.parallel.schedules import bubble_fraction
from reflow.planner.hardware import Hardware
from reflow.planner.models import ModelShape
from reflow.runtime.plan import Placement


@dataclass(frozen=True)
class Workload:
    """What one iteration processes.

    batch: sequences per iteration (prompts x samples per prompt); prompt_len / gen_len: tokens per
    sequence (gen_len: the budget; every sequence generates it unless gen_lens gives the distribution of
    response lengths); mini_batches: optimizer steps per train call;
    epochs: passes over the batch per train call; micro_tokens: tokens per micro-batch per data-parallel
    replica (train and infer); checkpointing: activation checkpointing in train calls; decode_batch: at most
    this many sequences decoded together per replica (None: as many as the KV cache holds)."""

    batch: int = 512
    prompt_len: int = 256
    gen_len: int = 256
    mini_batches: int = 1
    epochs: int = 1
    micro_tokens: int = 8192
    checkpointing: bool = True
    decode_batch: int | None = None
    # sequences per prompt that compute its tokens once: `share_prefill` in generate calls (the engine
    # prefills each distinct prompt once and copies its K/V), `share_prefix` in train and infer calls
    # (prefix sharing: a group's prompt runs once per forward and backward); 1 = every sequence its own
    share_prefill: int = 1
    share_prefix: int = 1
    # the response lengths' distribution: its quantiles at evenly spaced levels 0, 1/(N-1), ..., 1, ascending
    # (min, ..., max; a sorted sample of measured lengths is one, so are the deciles of the metrics
    # response_len/min, p10, ..., p90, max); None: every response uses its whole budget gen_len
    gen_lens: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.gen_lens is not None:
            if not self.gen_lens or min(self.gen_lens) < 0:
                raise ValueError(f"Workload.gen_lens: give response lengths >= 0, got {self.gen_lens!r}")
            object.__setattr__(self, "gen_lens", tuple(sorted(min(float(x), self.gen_len) for x in self.gen_lens)))

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    @property
    def seq_tokens(self) -> float:
        """Tokens a sequence may hold in a train / infer call (the budget; memory): gen_len + prompt_len /
        share_prefix."""
        return self.gen_len + self.prompt_len / max(1, self.share_prefix)

    @property
    def mean_gen(self) -> float:
        """The mean response length: the integral of the piecewise-linear quantile function through gen_lens
        (gen_len without a distribution)."""
        q = self.gen_lens
        if q is None:
            return float(self.gen_len)
        if len(q) == 1:
            return q[0]
        return (sum(q) - (q[0] + q[-1]) / 2) / (len(q) - 1)

    @property
    def mean_seq_len(self) -> float:
        """prompt_len + mean_gen: the mean tokens of a sequence (time of infer / train; data moved)."""
        return self.prompt_len + self.mean_gen

    @property
    def mean_seq_tokens(self) -> float:
        """mean_gen + prompt_len / share_prefix: the tokens a train / infer call computes per sequence."""
        return self.mean_gen + self.prompt_len / max(1, self.share_prefix)

    def gen_lengths(self, n: int) -> list[int]:
        """n response lengths that stand for the distribution, ascending: its quantiles at (i - 1/2) / n,
        i = 1..n, rounded, each in [1, gen_len] (all gen_len without a distribution)."""
        q = self.gen_lens
        if q is None:
            return [self.gen_len] * n
        out = []
        for i in range(n):
            u = (i + 0.5) / n * (len(q) - 1)
            j = min(int(u), len(q) - 2) if len(q) > 1 else 0
            x = q[j] + (u - j) * (q[j + 1] - q[j]) if len(q) > 1 else q[0]
            out.append(max(1, min(self.gen_len, round(x))))
        return out


@dataclass
class CallCost:
    """A call's seconds and their parts. samples (generate calls): per sample of one replica, in the order they
    finish, (seconds from its completion to the call's end, its response length). stream (a streamed generate
    call under fusion.inter_stage, set by reflow.planner.stream): how it and its consumers run in chunks."""

    time: float
    parts: dict[str, float] = field(default_factory=dict)
    samples: tuple[tuple[float, int], ...] = ()
    stream: object = None  # reflow.planner.stream.Stream


# ---------------------------------------------------------------------------------------------- groups
@lru_cache(maxsize=1 << 16)
def groups(pl: Placement) -> dict[str, list[tuple[int, ...]]]:
    """The tensor-, data- and pipeline-parallel groups (global ranks) of a placement."""
    L = pl.layout
    d, t, p = L.d, L.t, L.p
    idx = lambda pp, dp, tp: pl.ranks[pp * d * t + dp * t + tp]  # noqa: E731 (layout.coords inverted)
    return {
        "tp": [tuple(idx(pp, dp, tp) for tp in range(t)) for pp in range(p) for dp in range(d)],
        "dp": [tuple(idx(pp, dp, tp) for dp in range(d)) for pp in range(p) for tp in range(t)],
        "pp": [tuple(idx(pp, dp, tp) for pp in range(p)) for dp in range(d) for tp in range(t)],
    }


def _worst_group(hw: Hardware, gs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The group on the slowest link (inter-node if any is), as the representative one."""
    for g in gs:
        if hw.link(g) != (hw.intra_bw, hw.intra_lat):
            return g
    return gs[0]


def stage_layers(m: ModelShape, p: int) -> list[int]:
    return [b - a for a, b in (stage_bounds(m.layers, p, s) for s in range(p))]


def stage_weight_elems(m: ModelShape, t: int, n_layers: int, last: bool) -> float:
    """Weights one tensor-parallel rank of a stage holds whole (before any FSDP sharding)."""
    return n_layers * (m.layer_split_params / t + m.layer_whole_params) + m.vocab * m.hidden + \
        ((m.hidden + m.head_params) if last else 0)


# ---------------------------------------------------------------------------------------------- passes
def stage_pass(m: ModelShape, hw: Hardware, t: int, tp: tuple[int, ...], tokens: float, context: float,
               n_layers: int, head: bool, compute_passes: float = 1.0, weight_reads: float = 1.0,
               allreduces: int = 2, scale: float = 1.0) -> tuple[float, dict]:
    """Time of one stage over `tokens` tokens: scale (max(compute, weights) + overhead) + TP all-reduces
    (scale: the call kind's measured / modelled figure, hw.<kind>_scale)."""
    flops = (n_layers * m.layer_flops(tokens, context) / t + (m.head_flops(tokens) if head else 0)) * compute_passes
    compute = flops / hw.eff_flops
    weights = (n_layers * (m.layer_split_params / t + m.layer_whole_params) + (m.head_params if head else 0)) \
        * m.dtype_bytes * weight_reads / hw.eff_mem_bw
    tp_comm = n_layers * (allreduces * hw.all_reduce(tokens * m.hidden * m.dtype_bytes, tp)
                          + hw.tp_overhead * compute_passes) if t > 1 else 0.0
    overhead = n_layers * hw.layer_overhead * compute_passes
    return scale * (max(compute, weights) + overhead) + tp_comm, {
        "compute": scale * compute, "weights": scale * weights, "tp_comm": tp_comm, "overhead": scale * overhead}


def _micro_batches(tokens: float, seqs: int, wl: Workload, p: int) -> int:
    m = max(1, math.ceil(tokens / wl.micro_tokens))
    if p > 1:
        m = max(m, p)
    return max(1, min(m, seqs))


def _pipeline(m: ModelShape, hw: Hardware, pl: Placement, tokens: float, context: float, micro: int,
              **kw) -> tuple[float, dict]:
    """(micro + p - 1) x the slowest stage's per-micro-batch time (GPipe or 1F1B), with activation sends."""
    L = pl.layout
    g = groups(pl)
    tp = _worst_group(hw, g["tp"])
    layers = stage_layers(m, L.p)
    tm = tokens / micro
    worst, parts = 0.0, {}
    for s, n in enumerate(layers):
        t_s, parts_s = stage_pass(m, hw, L.t, tp, tm, context, n, s == L.p - 1, **kw)
        if t_s > worst:
            worst, parts = t_s, parts_s
    send = 0.0
    if L.p > 1:
        pp = _worst_group(hw, g["pp"])
        bw, lat = hw.link(pp)
        send = tm * m.hidden * m.dtype_bytes * kw.get("weight_reads", 1.0) / bw + lat
    per_micro = worst + send
    total = (micro + L.p - 1) * per_micro
    out = {k: v * micro for k, v in parts.items()}
    out["pp_send"] = send * micro
    out["pp_bubble"] = (L.p - 1) * per_micro
    return total, out


# ---------------------------------------------------------------------------------------------- calls
def _owner_gather(m: ModelShape, pl: Placement, hw: Hardware) -> float:
    """One all-gather of a stage's weights over its data-parallel group (a forward on the FSDP owner copy)."""
    L = pl.layout
    if L.d <= 1:
        return 0.0
    layers = stage_layers(m, L.p)
    w = max(stage_weight_elems(m, L.t, n, s == L.p - 1) for s, n in enumerate(layers))
    return hw.all_gather(w * m.dtype_bytes, _worst_group(hw, groups(pl)["dp"]))


def _fsdp_units(m: ModelShape, p: int) -> int:
    """FSDP units of the largest stage: one per decoder layer and the root (embeddings, norm, head)."""
    return max(stage_layers(m, p)) + 1


def infer_cost(m: ModelShape, pl: Placement, hw: Hardware, wl: Workload, owner_sharded: bool = False) -> CallCost:
    L = pl.layout
    seqs = math.ceil(wl.batch / L.d)
    tokens = seqs * wl.mean_seq_tokens
    micro = _micro_batches(tokens, seqs, wl, L.p)
    total, parts = _pipeline(m, hw, pl, tokens, wl.mean_seq_len / 2, micro, scale=hw.infer_scale)
    if owner_sharded and L.d > 1:
        ag = _owner_gather(m, pl, hw)
        fixed = micro * _fsdp_units(m, L.p) * hw.fsdp_overhead
        parts["fsdp"] = micro * ag + fixed
        total = max(total, micro * ag) + ag / max(1, max(stage_layers(m, L.p))) + fixed
    parts.update(micro_batches=micro, pp_bubble_fraction=bubble_fraction(L.p, micro))
    return CallCost(total, parts)


def train_cost(m: ModelShape, pl: Placement, hw: Hardware, wl: Workload) -> CallCost:
    L = pl.layout
    seqs = math.ceil(wl.batch / (L.d * wl.mini_batches))
    tokens = seqs * wl.mean_seq_tokens
    micro = _micro_batches(tokens, seqs, wl, L.p)
    passes = 4.0 if wl.checkpointing else 3.0
    pipe, parts = _pipeline(m, hw, pl, tokens, wl.mean_seq_len / 2, micro, compute_passes=passes,
                            weight_reads=3.0, allreduces=6 if wl.checkpointing else 4, scale=hw.train_scale)
    layers = stage_layers(m, L.p)
    w_stage = max(stage_weight_elems(m, L.t, n, s == L.p - 1) for s, n in enumerate(layers))
    fsdp = 0.0
    if L.d > 1:
        dp = _worst_group(hw, groups(pl)["dp"])
        syncs = 1 if L.p > 1 else micro
        fsdp = syncs * (2 * hw.all_gather(w_stage * m.dtype_bytes, dp) + hw.reduce_scatter(w_stage * m.dtype_bytes, dp))
        fixed = syncs * 3 * _fsdp_units(m, L.p) * hw.fsdp_overhead
        step = max(pipe, fsdp) + fsdp / (syncs * max(1, max(layers))) + fixed
        fsdp += fixed
    else:
        step = pipe
    adam = hw.train_scale * (w_stage / L.d * 28 / hw.eff_mem_bw + hw.optimizer_overhead)
    steps = wl.epochs * wl.mini_batches
    parts = {k: v * steps for k, v in parts.items()}
    parts.update(fsdp=fsdp * steps, optimizer=adam * steps, micro_batches=micro, steps=steps,
                 pp_bubble_fraction=bubble_fraction(L.p, micro))
    return CallCost(steps * (step + adam), parts)


def _sum_max_linear(a1: float, b1: float, a2: float, b2: float, n: int) -> float:
    """sum_{k=0}^{n-1} max(a1 + b1 k, a2 + b2 k), exactly (the two lines cross at most once)."""
    def seg(a, b, lo, hi):  # sum over k in [lo, hi)
        cnt = hi - lo
        return a * cnt + b * (lo + hi - 1) * cnt / 2 if cnt > 0 else 0.0

    if n <= 0:
        return 0.0
    if b1 == b2:
        return seg(max(a1, a2), b1, 0, n)
    x = (a2 - a1) / (b1 - b2)  # f1 >= f2 for k >= x when b1 > b2
    k = min(n, max(0, math.ceil(x)))
    if b1 > b2:
        return seg(a2, b2, 0, k) + seg(a1, b1, k, n)
    return seg(a1, b1, 0, k) + seg(a2, b2, k, n)


def _decode_lines(m: ModelShape, hw: Hardware, pl: Placement, tp: tuple[int, ...], rows: int,
                  P: int) -> tuple[float, float, float, float, float, float]:
    """One decode step of `rows` sequences at step k as lines in k: (compute a, b, memory a, b) with
    compute_k = a + b k (likewise memory), the step's own fixed seconds (layer and step overheads, before
    hw.generate_scale) and its tensor- and pipeline-parallel communication (module docstring)."""
    L = pl.layout
    c0 = c1 = m0 = m1 = fixed = comm = 0.0
    for s, n in enumerate(stage_layers(m, L.p)):
        head = s == L.p - 1
        c0 += (n * m.layer_flops(rows, P) / L.t + (m.head_flops(rows) if head else 0)) / hw.eff_flops
        c1 += n * 4 * rows * m.q_dim / L.t / hw.eff_flops
        w = (n * (m.layer_split_params / L.t + m.layer_whole_params) + (m.head_params if head else 0)) * m.dtype_bytes
        m0 += (w + n * rows * P * m.kv_bytes_per_token_layer / L.t) / hw.eff_mem_bw
        m1 += n * rows * m.kv_bytes_per_token_layer / L.t / hw.eff_mem_bw
        fixed += n * hw.layer_overhead
        comm += n * (2 * hw.all_reduce(rows * m.hidden * m.dtype_bytes, tp) + hw.tp_overhead) if L.t > 1 else 0
    fixed += hw.step_overhead
    if L.p > 1:
        bw, lat = hw.link(_worst_group(hw, groups(pl)["pp"]))
        comm += (L.p - 1) * (rows * m.hidden * m.dtype_bytes / bw + lat)
    return c0, c1, m0, m1, fixed, comm


def live_segments(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Ascending response lengths of a wave -> (first step, end step, live rows) for the runs of decode steps
    with the same number of live rows (a row of length l is live in steps 0..l-1)."""
    out, k0 = [], 0
    for j, length in enumerate(lengths):
        if length > k0:
            out.append((k0, length, len(lengths) - j))
            k0 = length
    return out


def generate_cost(m: ModelShape, pl: Placement, hw: Hardware, wl: Workload, concurrency: int | None = None,
                  owner_sharded: bool = False) -> CallCost:
    L = pl.layout
    seqs = math.ceil(wl.batch / L.d)
    conc = max(1, min(seqs, concurrency or seqs))
    waves = math.ceil(seqs / conc)
    wave = math.ceil(seqs / waves)
    tp = _worst_group(hw, groups(pl)["tp"])
    P = wl.prompt_len
    # the batch's lengths dealt round-robin into the waves (each wave of about `wave` rows keeps the spread and
    # the tail; the quantiles of a small wave alone would lose the tail and make less KV memory look faster)
    everyone = wl.gen_lengths(waves * wave)
    per_wave_lengths = [everyone[w::waves] for w in range(waves)]
    G = everyone[-1]  # decode steps of the longest wave
    # prefill: one pass over the wave's distinct prompts (pipelined over p micro-batches when p > 1)
    pre_micro = max(1, min(wave, L.p))
    prefill, _ = _pipeline(m, hw, pl, wave * P / max(1, wl.share_prefill), P / 2, pre_micro,
                           scale=hw.generate_scale)
    ag = _owner_gather(m, pl, hw) if owner_sharded and L.d > 1 else 0.0
    if ag:
        prefill = max(prefill, ag) + ag / max(1, max(stage_layers(m, L.p)))
    # decode: every stage in turn for each token (no pipelining across stages within a step), segment by
    # segment of constant live rows; ends[j]: seconds from the wave's first decode step to the end of segment j
    sc = hw.generate_scale

    def wave_decode(lengths: list[int]) -> tuple[float, float, dict[int, float]]:
        decode = fixed_s = 0.0
        ends: dict[int, float] = {}
        for k0, k1, rows in live_segments(lengths):
            c0, c1, m0, m1, fixed, comm = _decode_lines(m, hw, pl, tp, rows, P)
            steps = k1 - k0
            seg = sc * _sum_max_linear(c0 + c1 * k0, c1, m0 + m1 * k0, m1, steps) + steps * (sc * fixed + comm)
            if ag:  # every step all-gathers the owner's weights, overlapped with compute
                seg = max(seg, steps * ag)
            decode += seg
            fixed_s += steps * (sc * fixed + comm)
            ends[k1] = decode
        return decode, fixed_s, ends

    runs = [wave_decode(lw) for lw in per_wave_lengths]
    c0, c1, m0, m1, _, _ = _decode_lines(m, hw, pl, tp, wave, P)
    bound = "memory" if m0 + m1 * G / 2 > c0 + c1 * G / 2 else "compute"
    decode, fixed_s = sum(r[0] for r in runs), sum(r[1] for r in runs)
    total = waves * prefill + decode
    samples, start = [], 0.0
    for lw, (d, _, ends) in zip(per_wave_lengths, runs):
        samples += [(total - (start + prefill + ends[length]), length) for length in lw]
        start += prefill + d
    samples = tuple(sorted(samples, key=lambda x: -x[0]))  # in the order they finish
    return CallCost(total, {"prefill": waves * prefill, "decode": decode, "waves": waves, "wave_seqs": wave,
                            "decode_fixed": fixed_s, "fsdp": sum(lw[-1] + 1 for lw in per_wave_lengths) * ag,
                            f"decode_{bound}_bound": 1},
                    samples=samples)


def call_cost(kind: str, m: ModelShape | None, pl: Placement, hw: Hardware, wl: Workload,
              concurrency: int | None = None, owner_sharded: bool = False) -> CallCost:
    """Time of one call of `kind` (generate, infer, train, update); a role without a model costs nothing.
    owner_sharded: a generate / infer call on the FSDP owner copy of a trained role."""
    if m is None:
        return CallCost(hw.call_overhead, {"call_overhead": hw.call_overhead} if hw.call_overhead else {})
    if kind == "generate":
        c = generate_cost(m, pl, hw, wl, concurrency, owner_sharded)
    elif kind == "infer":
        c = infer_cost(m, pl, hw, wl, owner_sharded)
    elif kind == "train":
        c = train_cost(m, pl, hw, wl)
    elif kind == "update":  # target <- a * target + (1 - a) * source: read two copies, write one, per rank
        c = CallCost(3 * m.params * m.dtype_bytes / (pl.layout.t * pl.layout.p) / hw.eff_mem_bw)
    else:
        raise ValueError(f"unknown call kind '{kind}'")
    if hw.call_overhead:
        c.time += hw.call_overhead
        c.parts["call_overhead"] = hw.call_overhead
    return c


FUSED_SEARCH_MAX_OPS = 32  # p x M above it: the lower bound (the search costs a plan search seconds; long
#                           pipelines have small bubbles, where the search lands near the bound anyway)


@lru_cache(maxsize=None)
def fused_ratio(p: int, m: int, fa: int, fb: int) -> float:
    """Makespan of the searched fused schedule / that of a's 1F1B pipeline then b's: p stages, m micro-batches,
    forward times fa, fb (integers), backward twice the forward, memory limit p micro-batches per rank (more
    where the search needs it: search_fused_in_memory)."""
    spec = FusedSpec(p, m, {"a": tuple(range(p)), "b": tuple(reversed(range(p)))}, {"a": fa, "b": fb},
                     {"a": 2 * fa, "b": 2 * fb}, {"a": 1.0, "b": 1.0})
    sequential = sequential_1f1b(spec)[1]
    if p * m > FUSED_SEARCH_MAX_OPS:
        return spec.lower_bound() / sequential
    return min(sequential, search_fused_in_memory(spec)[1]) / sequential


def fused_costs(a: CallCost, b: CallCost, p: int) -> tuple[CallCost, CallCost]:
    """Two train calls' costs (train_cost, same p >= 2 and micro-batch count) -> their costs when fused: the
    pipeline time of both shrinks to the fused schedule's (module docstring), split u_a : u_b."""
    m, steps = int(a.parts["micro_batches"]), a.parts["steps"]
    per_micro = [c.parts["pp_bubble"] / (steps * (p - 1)) for c in (a, b)]  # u: slowest stage, per micro-batch
    top = max(per_micro)
    fa, fb = (max(1, round(4 * u / top)) for u in per_micro)
    ratio = fused_ratio(p, m, fa // math.gcd(fa, fb), fb // math.gcd(fa, fb))
    pipes = [steps * (m + p - 1) * u for u in per_micro]
    saved = (1.0 - ratio) * sum(pipes)
    fused = sum(pipes) - saved
    bubble = 1.0 - m * sum(per_micro) * steps / fused if fused > 0 else 0.0
    out = []
    for c, pipe in zip((a, b), pipes):
        share = pipe / sum(pipes) if sum(pipes) > 0 else 0.5
        out.append(CallCost(c.time - saved * share, {**c.parts, "fused_pipeline": fused, "fused_ratio": ratio,
                                                      "pp_bubble_fraction": bubble}))
    return out[0], out[1]


def placement(layout: str | Layout, ranks) -> Placement:
    """Placement('d2t2p1', range(4)) shorthand."""
    return Placement(tuple(int(r) for r in ranks), Layout.parse(layout) if isinstance(layout, str) else layout)
