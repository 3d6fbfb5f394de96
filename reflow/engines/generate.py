"""Generation engine: continuous batching with a KV cache, returning tokens and their log-probs.

Up to `batch_size` prompts are decoded at once ("live rows"); a prompt's row leaves the batch as soon as
it ends (EOS or its token budget), and waiting prompts are prefilled and merged into the running batch,
so the batch stays full while the long tail of responses is still decoding:

    admit  : waiting prompts, left-padded to their longest [k, P] -> a forward with a fresh DynamicCache
             (logits of the last position), then their K/V are copied into free slots of the slot cache
    decode : one token per live row per step (a [b, 1] forward); the cache grows by one column
    retire : rows that emitted EOS (or reached their budget) are yielded and their slots freed

The slot cache (`_SlotCache`) owns one preallocated [batch_size, H_kv, L_cap, D] K and V buffer per layer.
Rows are *right-aligned*: every live row's last cached token sits in column `end - 1`, a row of cache length
n fills columns [end - n, end), and the model sees columns [start, end) with start = end - (longest live
row). Rows of different lengths are therefore left-padded; the padding (and whatever stale K/V a freed slot
left behind) is hidden by the attention mask, built each step from the rows' lengths, and positions are
per row (`position_ids` = tokens the row has), so a row decodes exactly as it would alone, up to float
rounding. A decode step writes one column in place and attends to a view of the buffers: no per-step
concatenation of the cache (which DynamicCache does). When rows leave, `start` moves right (leading all-pad
columns are dropped from the view for free); when `end` reaches the buffer's end, the live window is moved
back to column 0 (rare: the buffer holds 1.25x the longest prompt + budget).

A freed slot is refilled once `refill_min` slots are free (default batch_size // 8, at least 1), so that a
prefill forward is shared by several prompts instead of costing one extra forward per finished row.
`refill=False` admits new prompts only when the batch is empty: static chunks of `batch_size` prompts whose
finished rows still leave early (a baseline for benchmarks).

Shared prompts (share_prefill, on by default): rows of a call with the same prompt tokens -- the n samples of a
GRPO group, however the caller numbers them -- are prefilled once per admission: the admission's distinct
prompts go through the [d, P] forward and each new slot gets its prompt's K/V copied in (an index_select per
layer), and its last logits. Prefill then costs d instead of k prompt rows (2 x params x P FLOPs per row
saved). A prompt whose rows do not all fit in the free slots keeps its prefix ([1, H_kv, P, D] per layer)
until its last row is admitted, so a group split across refills is prefilled once too. The K/V are copied,
not shared: the model's attention reads one dense [rows, H_kv, L, D] K/V view of the slot cache, and rows of
a group diverge after the prompt, so reading one prompt copy for several rows needs an attention kernel that
splits the prefix from the rows' own tokens (cascade / paged attention), which the HF forward does not take.
The copy moves rows x P x 2 x layers x H_kv x D elements once per admission, far less than the prefill
FLOPs it saves. Each row's result equals prefilling it on its own, up to float rounding (the prefill's batch
is smaller).

Log-probs are those of the temperature-scaled full distribution, log softmax(logits / T)[token]
(before top-k/top-p filtering, as the inference engine computes them for the same tokens), so
sampled log-probs agree with `token_logprobs(..., temperature=T)` up to float rounding.

Sampling has two sources of randomness:

  generator : one [b, V] multinomial per step over the live rows in slot order. The schedule depends only
              on the prompts, budgets and sampled tokens, so the same seed gives the same samples -- but a
              prompt's tokens depend on which other prompts share the call and in which order.
  keys+seed : batch-invariant, keyed by sample. Each prompt carries an integer key (e.g. its sample id) and
              the call a seed; the noise of prompt key k at response position j is a pure function of
              (seed, k, j) (counter-based: a SplitMix64 hash of (seed, k, j, vocab index), see
              `keyed_uniforms`), and the token is the Gumbel-max of the filtered, temperature-scaled
              logits: argmax(filter(logits / T) + Gumbel). A prompt therefore gets the same tokens alone,
              in any batch, in any order, or on any data-parallel replica (up to the model's own float
              rounding, which batch composition can change).
"""

from __future__ import annotations

import inspect
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False


@dataclass
class Generation:
    index: int  # position of the prompt in the request
    prompt_ids: list[int]
    tokens: list[int]  # response tokens, EOS included when the sample ended with it
    logprobs: list[float]  # one per response token
    finished: bool  # True if it ended with EOS, False if cut at max_new_tokens


@dataclass
class Handover:
    """An unfinished row handed from one running `stream` to another (long-tail migration between data-parallel
    replicas, see `GenerationEngine.stream`'s `steer`). The receiving engine re-prefills prompt + tokens so far
    and decodes on; with keyed sampling and the same weights it emits the tokens the row would have got where
    it started, up to the model's float rounding."""

    generation: Generation  # its prompt and response so far (finished False); index = its index where it ran
    key: int  # its sampling key
    budget: int  # response tokens it may have in all, generation.tokens included
    start: int = 0  # keyed position of generation.tokens[0] (as `start_positions`)


# steer(unfinished rows, take) -> rows to adopt, or None; see `GenerationEngine.stream`
Steer = Callable[[int, Callable[[], list[Handover]]], "list[Handover] | None"]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] logits with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---------------------------------------------------------------- keyed (counter-based) sampling noise
# SplitMix64 (Steele, Lea & Flood 2014) in int64 torch ops. torch's int64 add and multiply wrap modulo 2^64
# (two's complement), which is what the hash needs; `>>` on int64 is arithmetic, so the hash's logical
# shifts mask off the copied sign bits.
_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A Python int reduced mod 2^64 to the signed int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GAMMA = _i64(0x9E3779B97F4A7C15)
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _xorshift_(z: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """z ^= z >>> s (logical shift) in place, with `tmp` (z's shape, int64) as scratch: three passes over z
    and no allocation."""
    torch.bitwise_right_shift(z, s, out=tmp)
    tmp.bitwise_and_((1 << (64 - s)) - 1)
    z.bitwise_xor_(tmp)


def _fmix_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function (a bijection of 64-bit words), in place on z; tmp: scratch like z."""
    _xorshift_(z, 30, tmp)
    z.mul_(_MUL1)
    _xorshift_(z, 27, tmp)
    z.mul_(_MUL2)
    _xorshift_(z, 31, tmp)
    return z


def _fmix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on a copy of z."""
    z = z.clone()
    return _fmix_(z, torch.empty_like(z))


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """The first SplitMix64 output of state x."""
    return _fmix(x + _GAMMA)


def sample_seed(*parts: int) -> int:
    """One int64 seed from several integers (e.g. a run seed and a step), for `generate(..., seed=)`."""
    h = torch.tensor(_i64(0x5EED))
    for p in parts:
        h = _splitmix(h ^ _i64(int(p)))
    return int(h)


def _row_states(seed: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] int64 stream states of (seed, key, position); distinct keys (or positions) give distinct states."""
    s = _splitmix(torch.tensor(_i64(int(seed)), device=keys.device))
    return _splitmix(_splitmix(s ^ keys) ^ positions)


def _counters(lo: int, hi: int, device) -> torch.Tensor:
    """[hi - lo] int64 SplitMix64 stream offsets (v + 1) * gamma of vocabulary entries v in [lo, hi)."""
    return (torch.arange(lo, hi, device=device, dtype=torch.long) + 1) * _GAMMA


def _uniforms_into(u: torch.Tensor, states: torch.Tensor, counters: torch.Tensor, bits: torch.Tensor,
                   tmp: torch.Tensor) -> torch.Tensor:
    """u [b, n] float64 <- the uniforms of `keyed_uniforms` for row states [b] and counters [n], in place, with
    bits and tmp ([b, n] int64) as scratch: bits = fmix(state + counter), u = (bits >>> 11 + 0.5) * 2^-53."""
    torch.add(states[:, None], counters[None, :], out=bits)
    _fmix_(bits, tmp)
    torch.bitwise_right_shift(bits, 11, out=tmp)
    tmp.bitwise_and_((1 << 53) - 1)
    u.copy_(tmp)  # < 2^53: exact in float64
    return u.add_(0.5).mul_(2.0 ** -53)


def keyed_uniforms(seed: int, keys: torch.Tensor, positions: torch.Tensor, vocab: int,
                   lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """[B, hi - lo] float64 uniforms in (0, 1): entry [b, v] is a pure function of
    (seed, keys[b], positions[b], lo + v) -- the (v+1)-th SplitMix64 output of the row's state, its top
    53 bits mapped to (0, 1) -- independent of the other rows, of the batch size and of `vocab`."""
    hi = vocab if hi is None else hi
    keys = torch.as_tensor(keys, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long, device=keys.device)
    states = _row_states(seed, keys, positions)
    bits = torch.empty(len(keys), hi - lo, dtype=torch.long, device=keys.device)
    u = torch.empty(bits.shape, dtype=torch.float64, device=keys.device)
    return _uniforms_into(u, states, _counters(lo, hi, keys.device), bits, torch.empty_like(bits))


# [rows, V] elements of noise made at once: on CPU a block of a few rows whose int64 and float64 scratch stays
# in cache across the ~20 in-place passes (fresh [B, V] temporaries per pass cost more than the arithmetic); on
# an accelerator large blocks, as each pass is a kernel launch
_NOISE_ELEMENTS = 1 << 18
_NOISE_ELEMENTS_ACCELERATOR = 1 << 24


def gumbel_sample(logits: torch.Tensor, seed: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, V] (already scaled and filtered; -inf = excluded) logits -> [B] tokens, argmax(logits + Gumbel)
    with the Gumbel noise of `keyed_uniforms(seed, keys, positions)`: a draw from softmax(logits) that is
    a pure function of each row's logits and (seed, key, position).

    Per row: G = -log(-log u) in float64 and the token is argmax(float64(logits) - log(-log u)), which is
    logits + G exactly (IEEE subtraction is the addition of the negation); rows go in blocks of about
    `_NOISE_ELEMENTS` entries through preallocated scratch, and a row's draw does not depend on its block."""
    B, V = logits.shape
    dev = logits.device
    keys = torch.as_tensor(keys, dtype=torch.long).to(dev)
    positions = torch.as_tensor(positions, dtype=torch.long).to(dev)
    states = _row_states(seed, keys, positions)
    counters = _counters(0, V, dev)
    out = torch.empty(B, dtype=torch.long, device=dev)
    block = _NOISE_ELEMENTS if dev.type == "cpu" else _NOISE_ELEMENTS_ACCELERATOR
    step = max(1, min(B, block // max(V, 1)))
    bits = torch.empty(step, V, dtype=torch.long, device=dev)
    tmp = torch.empty_like(bits)
    u = torch.empty(step, V, dtype=torch.float64, device=dev)
    for r in range(0, B, step):
        k = min(step, B - r)
        g = _uniforms_into(u[:k], states[r:r + k], counters, bits[:k], tmp[:k])
        g.log_().neg_().log_()  # log E, E = -log u ~ Exp(1)
        torch.sub(logits[r:r + k], g, out=g)  # float32 logits promoted exactly to float64
        out[r:r + k] = g.argmax(-1)
    return out


class _SlotLayer(CacheLayerMixin):
    """One layer's K/V: slots [0, owner.rows) of preallocated buffers, live columns [owner.start, owner.end)."""

    is_sliding = False

    def __init__(self, owner: "_SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are allocated by the owner
        raise RuntimeError("slot cache layer used before its buffers were allocated")

    def allocate(self, like: torch.Tensor, rows: int, cols: int) -> None:
        _, h, _, d = like.shape
        self.keys = like.new_zeros(rows, h, cols, d)
        self.values = like.new_zeros(rows, h, cols, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        q = key_states.shape[-2]
        self.keys[:o.rows, :, o.end:o.end + q] = key_states
        self.values[:o.rows, :, o.end:o.end + q] = value_states
        return self.keys[:o.rows, :, o.start:o.end + q], self.values[:o.rows, :, o.start:o.end + q]

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _SlotCache(Cache):
    """KV cache of the live rows, right-aligned in preallocated per-layer buffers (see the module docstring).

    The engine keeps `rows` (live slots, always the prefix [0, rows)), the window [start, end) and each
    row's length; the model reads and writes through the `_SlotLayer`s during a forward, and the engine
    calls `advance(q)` after it.
    """

    def __init__(self, num_layers: int, max_rows: int, max_len: int):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.max_rows, self.max_len = max_rows, max_len
        self.cap = max_len + max(8, max_len // 4)  # columns per buffer; the window never exceeds max_len
        self.rows = 0
        self.start = self.end = 0

    def advance(self, q: int) -> None:
        self.end += q

    def _window(self, width: int) -> None:
        """Make the window [start, end) `width` wide with room for one more column after it."""
        if width > self.max_len:
            raise ValueError(f"slot cache window {width} exceeds its maximum {self.max_len}")
        if self.end >= width and self.end < self.cap:
            self.start = self.end - width
            return
        # move the live window to the start of the buffers (end reached the buffer's end, or too few
        # columns before end for a longer new prompt); stale columns stay masked
        old = self.end - self.start
        keep = min(old, width)
        for layer in self.layers:
            for buf in (layer.keys, layer.values):
                live = buf[:self.rows, :, self.end - keep:self.end].clone()
                buf[:self.rows, :, width - keep:width] = live
        self.start, self.end = 0, width

    def make_room(self) -> None:
        """Room for one more column after the window (moves the window to column 0 when at the buffer's end)."""
        if self.end >= self.cap:
            self._window(self.end - self.start)

    def admit(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int,
              rows: torch.Tensor | None = None) -> None:
        """Append new slots [self.rows, self.rows + k) from per-layer prefill K/V `kv` ([d, H, width, D] each,
        left-padded): new slot j gets source row rows[j] (rows: [k] indices into d, repeated when several slots
        share a prompt's prefix; None = the d rows in order, k = d)."""
        k = kv[0][0].shape[0] if rows is None else len(rows)
        if not self.layers[0].is_initialized:
            for mine, (keys, _) in zip(self.layers, kv):
                mine.allocate(keys, self.max_rows, self.cap)
        self._window(max(self.end - self.start if self.rows else 0, width))
        lo, hi = self.rows, self.rows + k
        for mine, (keys, values) in zip(self.layers, kv):
            if rows is not None:
                keys, values = keys.index_select(0, rows), values.index_select(0, rows)
            mine.keys[lo:hi, :, self.end - width:self.end] = keys
            mine.values[lo:hi, :, self.end - width:self.end] = values
        self.rows = hi

    def row_kv(self, slot: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of slot `slot`'s last n cached columns, per layer (K, V) [1, H_kv, n, D]."""
        return [(layer.keys[slot:slot + 1, :, self.end - n:self.end].clone(),
                 layer.values[slot:slot + 1, :, self.end - n:self.end].clone()) for layer in self.layers]

    def retire(self, done: list[int]) -> list[tuple[int, int]]:
        """Free slots `done`; live slots past the new end fill the holes. Returns the (from, to) moves."""
        n = self.rows - len(done)
        holes = [s for s in done if s < n]
        gone = set(done)
        movers = [s for s in range(n, self.rows) if s not in gone]
        if holes:
            src = torch.tensor(movers, device=self.layers[0].keys.device)
            dst = torch.tensor(holes, device=self.layers[0].keys.device)
            for layer in self.layers:
                for buf in (layer.keys, layer.values):
                    buf[:, :, self.start:self.end].index_copy_(0, dst, buf[:, :, self.start:self.end].index_select(0, src))
        self.rows = n
        return list(zip(movers, holes))

    def grow(self, max_rows: int, max_len: int) -> None:
        """At least `max_rows` slots and windows of `max_len` columns (for rows adopted mid-call): larger buffers,
        the live window copied to their first columns."""
        if max_rows <= self.max_rows and max_len <= self.max_len:
            return
        self.max_rows, self.max_len = max(self.max_rows, max_rows), max(self.max_len, max_len)
        self.cap = self.max_len + max(8, self.max_len // 4)
        if not self.layers[0].is_initialized:
            return
        width = self.end - self.start
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros(self.max_rows, old.shape[1], self.cap, old.shape[3])
                new[:self.rows, :, :width] = old[:self.rows, :, self.start:self.end]
                setattr(layer, name, new)
        self.start, self.end = 0, width

    def trim(self, longest: int) -> None:
        """Drop leading columns that no live row uses (a free move of `start`)."""
        self.start = self.end - longest


class _SharedPrefixes:
    """Rows of one call with the same prompt tokens (a GRPO group's n samples): `waiting` counts each prompt's
    rows not yet admitted; `saved` holds the prefix of a prompt whose rows did not all fit in one admission,
    per layer (K, V) [1, H_kv, P, D] and its last-position logits [1, V], until its last row is admitted. When a
    group's rows are consecutive in the call (as the rollout call builds them) that is at most the one group
    straddling an admission; a prompt repeated far apart in the call keeps its prefix in between."""

    def __init__(self, waiting: Sequence[tuple[int, ...]]):
        self.waiting = Counter(waiting)
        self.saved: dict[tuple[int, ...], tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {}


class KVStore:
    """K/V of finished rows that a later call continues (the next turn of a multi-turn episode), by the rows'
    sampling keys: key -> (the tokens they cover, per layer (K, V) [1, H_kv, L, D]).

    A generate call given a store saves each finished row's K/V under its key: the prompt and the response
    but its last token (sampled, never fed), L = prompt + response - 1 tokens. A later call admits a row whose
    prompt extends its key's entry by feeding only the tokens after it (`GenerationEngine._extend`). The caller
    drops the entries it will not continue; an entry that is no prefix of the row's prompt is ignored.
    """

    def __init__(self):
        self.entries: dict[int, tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def drop(self, key: int) -> None:
        self.entries.pop(_i64(int(key)), None)

    def __len__(self) -> int:
        return len(self.entries)

    def continues(self, key: int, prompt: Sequence[int]):
        """The entry of `key` if `prompt` extends it by at least one token, else None."""
        entry = self.entries.get(key)
        if entry is None or not 0 < len(entry[0]) < len(prompt) or tuple(prompt[:len(entry[0])]) != entry[0]:
            return None
        return entry


class GenerationEngine:
    """Decodes prompts with a (one-process) HF causal LM. Stateless between calls but for the model.

    batch_size: live rows at most; refill: refill freed slots from the waiting prompts (continuous batching)
    or only start new prompts once the batch is empty (static chunks); refill_min: freed slots that trigger
    a refill (default batch_size // 8, at least 1); share_prefill: rows with the same prompt tokens share one
    prefill (see the module docstring; False prefills every row on its own, the baseline of the benchmark).
    """

    def __init__(self, model: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 256,
                 *, refill: bool = True, refill_min: int | None = None, share_prefill: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long)
        self.pad = int(pad_token_id)
        self.batch_size = batch_size
        self.refill = refill
        self.refill_min = max(1, batch_size // 8) if refill_min is None else max(1, int(refill_min))
        self.share_prefill = share_prefill
        # The KV cache goes in under the name the model's forward takes: `cache` in recent transformers
        # (where `past_key_values` is deprecated and warns on every forward), `past_key_values` before.
        forward_args = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 generator: torch.Generator | None = None,
                 max_new_tokens: Sequence[int] | None = None, *,
                 keys: Sequence[int] | None = None, seed: int = 0, kv_store: KVStore | None = None,
                 start_positions: Sequence[int] | None = None) -> list[Generation]:
        """All generations, in prompt order. `max_new_tokens`: a budget per prompt (default params.max_new_tokens).

        Sampling randomness comes from `generator` (shared by the batch), or, batch-invariant, from
        `keys` (one distinct integer per prompt, e.g. its sample id) and `seed`: prompt key k's draw at
        response position j is a pure function of (seed, k, j), whatever else is in the call.
        kv_store (needs keys): continue rows from their key's K/V and keep every finished row's (see KVStore).
        `start_positions`: response tokens each prompt already ends with (a continued response, re-prefilled
        with its tokens so far): its keyed draws start at that position, so a response continued with the
        same weights gets the tokens it would have got in one call.
        """
        out = sorted(self.stream(prompts, params, generator, max_new_tokens, keys=keys, seed=seed, kv_store=kv_store,
                                 start_positions=start_positions),
                     key=lambda g: g.index)
        return out

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               generator: torch.Generator | None = None,
               max_new_tokens: Sequence[int] | None = None, *,
               keys: Sequence[int] | None = None, seed: int = 0,
               kv_store: KVStore | None = None,
               start_positions: Sequence[int] | None = None, steer: Steer | None = None) -> Iterator[Generation]:
        """Yield each generation as soon as it finishes (finish order, not prompt order). Arguments as `generate`.

        steer (needs keys): moves unfinished rows into or out of the running call (long-tail migration). Before
        each decode step the engine calls steer(unfinished rows, take): `take()` removes every unfinished row
        (live or waiting) from the call and returns them as `Handover`s (the call then ends once the steer
        returns, yielding nothing for them); the steer returns rows to adopt (`Handover`s from another call,
        re-prefilled with their tokens so far when a slot is free) or None. An adopted row is yielded with index
        len(prompts) + j (j: its order of adoption), its own prompt, and its tokens so far followed by the new.
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot generate from an empty prompt")
        if kv_store is not None and keys is None:
            raise ValueError("a kv_store keeps rows by their keys: pass keys too")
        if keys is not None:
            if generator is not None:
                raise ValueError("pass either a generator or keys (keyed sampling), not both")
            keys = [_i64(int(k)) for k in keys]
            if len(keys) != len(prompts):
                raise ValueError(f"keys has {len(keys)} entries for {len(prompts)} prompts")
            if len(set(keys)) != len(keys):
                raise ValueError("keys must be distinct: prompts with the same key would get the same random draws")
        if max_new_tokens is None:
            budgets = [int(params.max_new_tokens)] * len(prompts)
        else:
            budgets = [int(m) for m in max_new_tokens]
            if len(budgets) != len(prompts):
                raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(prompts)} prompts")
        if any(m < 0 for m in budgets):
            raise ValueError("max_new_tokens must be >= 0")
        if steer is not None and keys is None:
            raise ValueError("a steer hands rows between calls, which only keyed sampling continues alike: pass keys")
        starts = [0] * len(prompts) if start_positions is None else [int(p) for p in start_positions]
        if len(starts) != len(prompts):
            raise ValueError(f"start_positions has {len(starts)} entries for {len(prompts)} prompts")
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._run(prompts, budgets, params, generator, keys, seed, kv_store, starts, steer)
        finally:
            self.model.train(was_training)

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator,
                keyed: tuple[int, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, V] logits of the next position -> (tokens [B], their log-probs [B]).

        keyed: (seed, keys [B], response positions [B]) for batch-invariant Gumbel-max sampling, else None
        (multinomial from `generator`)."""
        logits = logits.float()
        if params.greedy:
            tok = logits.argmax(-1)
            logp = F.log_softmax(logits, -1)
        else:
            scaled = logits / params.temperature
            logp = F.log_softmax(scaled, -1)
            filtered = filter_logits(scaled, params.top_k, params.top_p)
            if keyed is not None:
                tok = gumbel_sample(filtered, *keyed)
            else:
                tok = torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]
        return tok, logp.gather(-1, tok[:, None])[:, 0]

    def _prefill(self, prompts: Sequence[Sequence[int]], device) -> tuple[DynamicCache, torch.Tensor, int]:
        """Left-padded forward of `prompts` (k of them): (their cache, last-position logits [k, V], padded width)."""
        lens = [len(p) for p in prompts]
        P = max(lens)
        ids = torch.full((len(prompts), P), self.pad, dtype=torch.long)
        attn = torch.zeros((len(prompts), P), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, P - lens[r]:] = torch.as_tensor(p)
            attn[r, P - lens[r]:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                            use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}).logits[:, -1]
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise ValueError("the generation engine supports full-attention models only (no sliding-window, "
                             "linear-attention or shared-KV cache layers)")
        return cache, logits, P

    def _admit(self, cache: "_SlotCache", idx: list[int], prompts, device,
               shared: "_SharedPrefixes | None") -> torch.Tensor:
        """Prefill prompts `idx` into new slots of `cache`; returns their next-token logits [k, V].

        shared (None = every row prefilled on its own): rows with the same prompt tokens get one prefill, its
        K/V copied into each of their slots (`_SlotCache.admit` with repeated source rows); a prompt kept from
        an earlier admission (`shared.saved`) is not prefilled again.
        """
        if shared is None:
            pre, logits, width = self._prefill([prompts[i] for i in idx], device)
            cache.admit([(layer.keys, layer.values) for layer in pre.layers], width)
            return logits
        toks = [tuple(prompts[i]) for i in idx]
        distinct = list(dict.fromkeys(toks))
        fresh = [p for p in distinct if p not in shared.saved]
        width = max(len(p) for p in distinct)
        if fresh:
            pre, fresh_logits, _ = self._prefill(fresh, device)
            fresh_kv = [(layer.keys, layer.values) for layer in pre.layers]
        if len(fresh) == len(distinct):  # the prefill's rows are the sources as they are
            kv, src_logits = fresh_kv, fresh_logits
        else:  # some prefixes come from an earlier admission: right-align every source to `width` columns
            at = {p: j for j, p in enumerate(fresh)}
            parts = [shared.saved[p] if p in shared.saved else
                     ([(k[at[p]:at[p] + 1, :, k.shape[2] - len(p):], v[at[p]:at[p] + 1, :, v.shape[2] - len(p):])
                       for k, v in fresh_kv], fresh_logits[at[p]:at[p] + 1]) for p in distinct]
            kv = []
            for layer in range(len(parts[0][0])):
                like = parts[0][0][layer][0]
                keys = like.new_zeros(len(distinct), like.shape[1], width, like.shape[3])
                values = torch.zeros_like(keys)
                for j, (p, (pkv, _)) in enumerate(zip(distinct, parts)):
                    keys[j, :, width - len(p):] = pkv[layer][0][0]
                    values[j, :, width - len(p):] = pkv[layer][1][0]
                kv.append((keys, values))
            src_logits = torch.cat([lg for _, lg in parts])
        rows = None
        if len(distinct) < len(toks):
            at = {p: j for j, p in enumerate(distinct)}
            rows = torch.tensor([at[p] for p in toks], device=device)
        cache.admit(kv, width, rows)
        # keep the prefix of a prompt with rows still waiting (a group split across refills), drop it with its last
        for p in toks:
            shared.waiting[p] -= 1
        for j, p in enumerate(distinct):
            if shared.waiting[p] <= 0:
                shared.saved.pop(p, None)
                del shared.waiting[p]
            elif p not in shared.saved:
                shared.saved[p] = ([(k[j:j + 1, :, width - len(p):].clone(), v[j:j + 1, :, width - len(p):].clone())
                                    for k, v in kv], src_logits[j:j + 1].clone())
        return src_logits if rows is None else src_logits.index_select(0, rows)

    def _extend(self, cache: "_SlotCache", idx: list[int], prompts, device,
                past: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        """Admit rows `idx` whose prompts extend stored K/V past[r] ([1, H_kv, L_r, D] per layer, the first L_r
        tokens of the prompt): one forward of the tokens after the reused ones; their next-token logits [k, V].

        With n_r = |prompt_r| and Q = max_r (n_r - L_r) (the longest extension), row r reuses R_r = max(0, n_r - Q)
        stored columns and feeds its last n_r - R_r <= Q tokens (left-padded to Q; a row with a shorter extension
        recomputes a few stored tokens so that every row's valid columns stay one contiguous suffix):

            cache [k, H_kv, max R + Q, D]:  pad | past (R_r) | fed (n_r - R_r)      attention mask: last n_r columns
        """
        lens = [len(prompts[i]) for i in idx]
        Q = max(n - kv[0][0].shape[2] for n, kv in zip(lens, past))
        R = [max(0, n - Q) for n in lens]
        Rm, k = max(R), len(idx)
        pre = DynamicCache(config=self.model.config)
        if Rm:
            for layer in range(len(past[0])):
                like = past[0][layer][0]
                keys = like.new_zeros(k, like.shape[1], Rm, like.shape[3])
                values = torch.zeros_like(keys)
                for r, kv in enumerate(past):
                    keys[r, :, Rm - R[r]:] = kv[layer][0][0, :, :R[r]]
                    values[r, :, Rm - R[r]:] = kv[layer][1][0, :, :R[r]]
                pre.update(keys, values, layer)
        ids = torch.full((k, Q), self.pad, dtype=torch.long)
        pos = torch.zeros((k, Q), dtype=torch.long)
        attn = torch.zeros((k, Rm + Q), dtype=torch.long)
        for r, (i, n) in enumerate(zip(idx, lens)):
            fed = n - R[r]
            ids[r, Q - fed:] = torch.as_tensor(prompts[i][R[r]:])
            pos[r, Q - fed:] = torch.arange(R[r], n)
            attn[r, Rm + Q - n:] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                            use_cache=True, logits_to_keep=1, **{self._cache_arg: pre}).logits[:, -1]
        cache.admit([(layer.keys, layer.values) for layer in pre.layers], Rm + Q)
        return logits

    def _run(self, prompts, budgets: list[int], params: SamplingParams, generator,
             keys: list[int] | None = None, seed: int = 0, store: KVStore | None = None,
             starts: list[int] | None = None, steer: Steer | None = None) -> Iterator[Generation]:
        device = next(self.model.parameters()).device
        # adopted rows (steer) are appended: row i >= the caller's prompts is adopted[i]'s continuation
        prompts, budgets, keys = list(prompts), list(budgets), None if keys is None else list(keys)
        starts = [0] * len(prompts) if starts is None else list(starts)
        adopted: dict[int, Generation] = {}
        eos = self.eos.to(device)
        for i, m in enumerate(budgets):  # nothing to decode: done before anything runs
            if m == 0:
                yield Generation(i, list(prompts[i]), [], [], False)
        queue = deque(i for i, m in enumerate(budgets) if m > 0)
        if not queue:
            return
        max_len = max(len(prompts[i]) + budgets[i] for i in queue)
        cache = _SlotCache(self.model.config.get_text_config(decoder=True).num_hidden_layers,
                           min(self.batch_size, len(queue)), max_len)
        # rows that continue a stored entry (keys are distinct, so entries saved during this call continue none)
        past = {} if store is None else {i: e[1] for i in queue if (e := store.continues(keys[i], prompts[i]))}
        shared = _SharedPrefixes([tuple(prompts[i]) for i in queue if i not in past]) if self.share_prefill else None
        slot: list[int] = []  # slot -> prompt index
        lens = torch.zeros(0, dtype=torch.long, device=device)  # slot -> tokens in the cache
        logits = None  # slot -> next-token logits [rows, V]
        tokens: dict[int, list[int]] = {}
        logps: dict[int, list[float]] = {}

        def so_far(i: int) -> Generation:
            """Row i's generation up to now (an adopted row's tokens from before its adoption first)."""
            g = adopted.get(i)
            t, lp = tokens.get(i, []), logps.get(i, [])
            if g is None:
                return Generation(i, list(prompts[i]), list(t), list(lp), False)
            return Generation(i, g.prompt_ids, g.tokens + t, g.logprobs + lp, False)

        def take() -> list[Handover]:
            nonlocal slot, lens, logits
            rows = []
            for i in [*slot, *queue]:
                g = so_far(i)
                head = len(adopted[i].tokens) if i in adopted else 0  # tokens of the row that prompts[i] holds
                rows.append(Handover(g, keys[i], budgets[i] + head, starts[i] - head))
                tokens.pop(i, None)
                logps.pop(i, None)
            slot, logits, lens = [], None, lens[:0]
            queue.clear()
            cache.rows = 0
            return rows

        while queue or slot:
            if steer is not None:
                rows = steer(len(slot) + len(queue), take)
                for h in rows or ():
                    g, i = h.generation, len(prompts)
                    if h.budget <= len(g.tokens):
                        raise ValueError(f"row {g.index} handed over with no budget left ({h.budget} tokens)")
                    adopted[i] = g
                    prompts.append(list(g.prompt_ids) + list(g.tokens))
                    budgets.append(h.budget - len(g.tokens))
                    keys.append(_i64(int(h.key)))
                    starts.append(h.start + len(g.tokens))
                    queue.append(i)
                    if shared is not None:
                        shared.waiting[tuple(prompts[i])] += 1
                if rows:
                    cache.grow(min(self.batch_size, len(slot) + len(queue)),
                               max(len(prompts[i]) + budgets[i] for i in queue))
                if not (queue or slot):
                    break
            free = cache.max_rows - len(slot)
            if queue and free and (not slot or (self.refill and free >= min(self.refill_min, len(queue)))):
                taken = [queue.popleft() for _ in range(min(free, len(queue)))]
                fresh, cont = [i for i in taken if i not in past], [i for i in taken if i in past]
                parts = []
                if fresh:
                    parts.append(self._admit(cache, fresh, prompts, device, shared))
                if cont:
                    parts.append(self._extend(cache, cont, prompts, device, [past.pop(i) for i in cont]))
                new_logits = torch.cat(parts) if len(parts) > 1 else parts[0]
                idx = fresh + cont
                slot += idx
                new_lens = torch.tensor([len(prompts[i]) for i in idx], device=device)
                lens = torch.cat([lens, new_lens])
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
                for i in idx:
                    tokens[i], logps[i] = [], []
            keyed = None
            if keys is not None and not params.greedy:  # each live row's key and response position
                keyed = (seed, torch.tensor([keys[i] for i in slot], device=device),
                         torch.tensor([len(tokens[i]) + (starts[i] if starts else 0) for i in slot], device=device))
            tok, lp = self._sample(logits, params, generator, keyed)
            ended = torch.isin(tok, eos).tolist()
            done = []
            for s, (i, t, l) in enumerate(zip(slot, tok.tolist(), lp.tolist())):
                tokens[i].append(t)
                logps[i].append(l)
                if ended[s] or len(tokens[i]) >= budgets[i]:
                    done.append(s)
            for s in done:
                i = slot[s]
                if store is not None:  # its K/V: the prompt and the response but the last (sampled) token
                    store.entries[keys[i]] = (tuple(prompts[i]) + tuple(tokens[i][:-1]), cache.row_kv(s, int(lens[s])))
                g = so_far(i)
                tokens.pop(i), logps.pop(i)
                yield Generation(i, g.prompt_ids, g.tokens, g.logprobs, bool(ended[s]))
            if done:
                moves = cache.retire(done)
                keep = list(range(cache.rows))
                for src, dst in moves:
                    keep[dst] = src
                slot = [slot[s] for s in keep]
                if not slot:
                    logits, lens = None, lens[:0]
                    continue
                keep_t = torch.tensor(keep, device=device)
                tok, lens = tok[keep_t], lens[keep_t]
                cache.trim(int(lens.max()))
            # decode: the sampled token of every live row, at position = the row's length
            cache.make_room()
            width = cache.end - cache.start + 1
            attn = torch.arange(width, device=device)[None, :] >= (width - 1 - lens)[:, None]
            logits = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=lens[:, None],
                                use_cache=True, **{self._cache_arg: cache}).logits[:, -1]
            cache.advance(1)
            lens = lens + 1
