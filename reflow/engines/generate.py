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
finished rows still leave early (the engine's former behaviour, kept for benchmarks).

Log-probs are those of the temperature-scaled full distribution, log softmax(logits / T)[token]
(before top-k/top-p filtering, as the inference engine computes them for the same tokens), so
sampled log-probs agree with `token_logprobs(..., temperature=T)` up to float rounding.
Sampling draws from `generator` one [b, V] multinomial per step over the live rows in slot order; the
schedule depends only on the prompts, budgets and sampled tokens, so the same seed gives the same samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

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

    def admit(self, prefill: DynamicCache, width: int) -> None:
        """Append the rows of a prefill cache ([k, H, width, D] per layer, left-padded) as slots [rows, rows + k)."""
        k = prefill.layers[0].keys.shape[0]
        if not self.layers[0].is_initialized:
            for mine, theirs in zip(self.layers, prefill.layers):
                mine.allocate(theirs.keys, self.max_rows, self.cap)
        self._window(max(self.end - self.start if self.rows else 0, width))
        lo, hi = self.rows, self.rows + k
        for mine, theirs in zip(self.layers, prefill.layers):
            mine.keys[lo:hi, :, self.end - width:self.end] = theirs.keys
            mine.values[lo:hi, :, self.end - width:self.end] = theirs.values
        self.rows = hi

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

    def trim(self, longest: int) -> None:
        """Drop leading columns that no live row uses (a free move of `start`)."""
        self.start = self.end - longest


class GenerationEngine:
    """Decodes prompts with a (one-process) HF causal LM. Stateless between calls but for the model.

    batch_size: live rows at most; refill: refill freed slots from the waiting prompts (continuous batching)
    or only start new prompts once the batch is empty (static chunks); refill_min: freed slots that trigger
    a refill (default batch_size // 8, at least 1).
    """

    def __init__(self, model: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 256,
                 *, refill: bool = True, refill_min: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long)
        self.pad = int(pad_token_id)
        self.batch_size = batch_size
        self.refill = refill
        self.refill_min = max(1, batch_size // 8) if refill_min is None else max(1, int(refill_min))

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 generator: torch.Generator | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """All generations, in prompt order. `max_new_tokens`: a budget per prompt (default params.max_new_tokens)."""
        out = sorted(self.stream(prompts, params, generator, max_new_tokens), key=lambda g: g.index)
        return out

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               generator: torch.Generator | None = None,
               max_new_tokens: Sequence[int] | None = None) -> Iterator[Generation]:
        """Yield each generation as soon as it finishes (finish order, not prompt order)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot generate from an empty prompt")
        if max_new_tokens is None:
            budgets = [int(params.max_new_tokens)] * len(prompts)
        else:
            budgets = [int(m) for m in max_new_tokens]
            if len(budgets) != len(prompts):
                raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(prompts)} prompts")
        if any(m < 0 for m in budgets):
            raise ValueError("max_new_tokens must be >= 0")
        was_training = self.model.training
        self.model.eval()
        try:
            yield from self._run(prompts, budgets, params, generator)
        finally:
            self.model.train(was_training)

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, V] logits of the next position -> (tokens [B], their log-probs [B])."""
        logits = logits.float()
        if params.greedy:
            tok = logits.argmax(-1)
            logp = F.log_softmax(logits, -1)
        else:
            scaled = logits / params.temperature
            logp = F.log_softmax(scaled, -1)
            probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return tok, logp.gather(-1, tok[:, None])[:, 0]

    def _prefill(self, idx: list[int], prompts, device) -> tuple[DynamicCache, torch.Tensor, int]:
        """Left-padded forward of prompts `idx`: (their cache, last-position logits [k, V], padded width)."""
        lens = [len(prompts[i]) for i in idx]
        P = max(lens)
        ids = torch.full((len(idx), P), self.pad, dtype=torch.long)
        attn = torch.zeros((len(idx), P), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, P - lens[r]:] = torch.as_tensor(prompts[i])
            attn[r, P - lens[r]:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise ValueError("the generation engine supports full-attention models only (no sliding-window, "
                             "linear-attention or shared-KV cache layers)")
        return cache, logits, P

    def _run(self, prompts, budgets: list[int], params: SamplingParams, generator) -> Iterator[Generation]:
        device = next(self.model.parameters()).device
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
        slot: list[int] = []  # slot -> prompt index
        lens = torch.zeros(0, dtype=torch.long, device=device)  # slot -> tokens in the cache
        logits = None  # slot -> next-token logits [rows, V]
        tokens: dict[int, list[int]] = {}
        logps: dict[int, list[float]] = {}
        while queue or slot:
            free = cache.max_rows - len(slot)
            if queue and free and (not slot or (self.refill and free >= min(self.refill_min, len(queue)))):
                idx = [queue.popleft() for _ in range(min(free, len(queue)))]
                pre, new_logits, width = self._prefill(idx, prompts, device)
                cache.admit(pre, width)
                del pre
                slot += idx
                new_lens = torch.tensor([len(prompts[i]) for i in idx], device=device)
                lens = torch.cat([lens, new_lens])
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
                for i in idx:
                    tokens[i], logps[i] = [], []
            tok, lp = self._sample(logits, params, generator)
            ended = torch.isin(tok, eos).tolist()
            done = []
            for s, (i, t, l) in enumerate(zip(slot, tok.tolist(), lp.tolist())):
                tokens[i].append(t)
                logps[i].append(l)
                if ended[s] or len(tokens[i]) >= budgets[i]:
                    done.append(s)
            for s in done:
                i = slot[s]
                yield Generation(i, list(prompts[i]), tokens.pop(i), logps.pop(i), bool(ended[s]))
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
                                past_key_values=cache, use_cache=True).logits[:, -1]
            cache.advance(1)
            lens = lens + 1
