"""Generation engine: batched sampling with a KV cache, returning tokens and their log-probs.

One prompt chunk of up to `batch_size` prompts is decoded at a time:
    prefill  : left-padded prompts [B, P] -> KV cache, logits of the last position
    decode   : one token per live row per step; the cache grows by one position
    retire   : rows that emitted EOS (or hit max_new_tokens) leave the batch *and the cache*
               (`batch_select_indices`), so the long tail is decoded by a shrinking batch.
Log-probs are those of the temperature-scaled full distribution, log softmax(logits / T)[token]
(before top-k/top-p filtering, as the inference engine computes them for the same tokens), so
sampled log-probs agree with `token_logprobs(..., temperature=T)` up to float rounding.
Continuous batching across chunks (refilling retired slots from the prompt queue) and the
layout-aware version belong to the parallel-engines issue; the interface stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache


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


class GenerationEngine:
    """Decodes prompts with a (one-process) HF causal LM. Stateless between calls but for the model."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int, batch_size: int = 256):
        self.model = model
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)))
        self.pad = int(pad_token_id)
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Generation]:
        """All generations, in prompt order."""
        out = sorted(self.stream(prompts, params, generator), key=lambda g: g.index)
        return out

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               generator: torch.Generator | None = None) -> Iterator[Generation]:
        """Yield each generation as soon as it finishes (finish order, not prompt order)."""
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(prompts))))
                yield from self._decode_chunk(chunk, prompts, params, generator)
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

    def _decode_chunk(self, chunk: list[int], prompts, params: SamplingParams, generator) -> Iterator[Generation]:
        device = next(self.model.parameters()).device
        B = len(chunk)
        lens = [len(prompts[i]) for i in chunk]
        if min(lens) == 0:
            raise ValueError("cannot generate from an empty prompt")
        P = max(lens)
        ids = torch.full((B, P), self.pad, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, P - lens[r]:] = torch.as_tensor(prompts[i])
            attn[r, P - lens[r]:] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        rows = torch.arange(B)  # live row -> position in `chunk`
        next_pos = pos[:, -1] + 1
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        eos = self.eos.to(device)
        for step in range(params.max_new_tokens):
            tok, lp = self._sample(logits, params, generator)
            ended = torch.isin(tok, eos)
            for r, t, l in zip(rows.tolist(), tok.tolist(), lp.tolist()):
                tokens[r].append(t)
                logps[r].append(l)
            last_step = step == params.max_new_tokens - 1
            done = ended | last_step
            for k in done.nonzero(as_tuple=True)[0].tolist():
                r = int(rows[k])
                yield Generation(chunk[r], list(prompts[chunk[r]]), tokens[r], logps[r], bool(ended[k]))
            if last_step or bool(done.all()):
                break
            if done.any():
                keep = (~done).nonzero(as_tuple=True)[0]
                cache.batch_select_indices(keep)
                rows, tok, attn, next_pos = rows[keep.cpu()], tok[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
