"""Forward passes over packed batches: hidden states, token log-probs, values and rewards.

transformers' sdpa/eager attention on CPU does not keep packed sequences apart when given only
`position_ids` (the second sample then attends to the first: its logits are off by ~0.3), so the
packed path builds the mask itself: one row of T tokens and a [1, 1, T, T] block-diagonal causal
mask, plus per-sample position ids (rotary positions restart at 0 for every sample).

Two attention choices for the same computation, equal up to float rounding:
    "packed": one row, block-diagonal mask — no padding compute; attention is O(T^2) in the row,
              so micro-batches must be bounded in tokens (the engines do that).
    "padded": right-padded [B, Lmax] with a 2-D mask — cheaper attention when many short samples.

Per-token outputs follow the batch convention: position t holds the quantity for *emitting* token t,
computed from the hidden state at t-1; position 0 of each sample holds 0.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
import torch.nn.functional as F

from reflow.data.batch import SampleBatch

Attention = Literal["packed", "padded"]


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer backbone, output head) of an HF causal-LM, token- or sequence-classification model."""
    backbone = model.base_model
    for name in ("lm_head", "score"):
        head = getattr(model, name, None)
        if head is not None:
            return backbone, head
    raise TypeError(f"{type(model).__name__} has neither an lm_head nor a score head")


def block_causal_mask(seqlens: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, T, T] additive mask: 0 where token i may attend token j (same sample, j <= i), else -inf-ish."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens), device=device), seqlens.to(device))
    pos = torch.arange(len(seg), device=device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _final_hidden(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The model's final (normed) hidden states, through the model's *own* forward.

    Going through the root module (not `model.base_model`) matters under FSDP2: its hooks gather the
    root's parameters (embeddings, final norm, head) there. A causal LM computes logits for one position
    only (`logits_to_keep=1`); the engines apply the head themselves where they need it.
    """
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(**inputs, output_hidden_states=True, use_cache=False, **extra)
    return out.hidden_states[-1]


def _param(model: torch.nn.Module) -> torch.Tensor:
    p = next(model.parameters())
    return p.to_local() if hasattr(p, "to_local") else p


def hidden_states(model: torch.nn.Module, batch: SampleBatch, attention: Attention = "packed",
                  key: str = "input_ids") -> torch.Tensor:
    """[T, H] last hidden states of every token of the packed batch."""
    device, dtype = _param(model).device, _param(model).dtype
    if attention == "packed":
        ids = batch.tokens[key].to(device)[None]
        pos = batch.position_in_sample().to(device)[None]
        mask = block_causal_mask(batch.seqlens, dtype, device)
        return _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=mask)[0]
    if attention == "padded":
        ids, real = batch.padded(key)
        ids, real = ids.to(device), real.to(device)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        hidden = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=real.long())
        return hidden[real]  # row-major order == the packed flat order
    raise ValueError(f"unknown attention '{attention}'; use 'packed' or 'padded'")


def _action_positions(batch: SampleBatch) -> torch.Tensor:
    """Flat positions t with action_mask[t] = 1 (never the first token of a sample)."""
    mask = batch.tokens["action_mask"].bool()
    first = torch.zeros_like(mask)
    first[batch.offsets[:-1][batch.seqlens > 0]] = True
    if (mask & first).any():
        raise ValueError("action_mask is set on the first token of a sample; the first token has no context")
    return mask.nonzero(as_tuple=True)[0]


def token_logprobs(model, batch: SampleBatch, *, temperature: float = 1.0, with_entropy: bool = False,
                   attention: Attention = "packed") -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(x_t | x_<t) / T at action positions, as [T] tensors (0 elsewhere); optionally the entropy.

    logits_t = lm_head(h_{t-1}) / temperature,  logp_t = logits_t[x_t] - logsumexp(logits_t),
    entropy_t = -sum_v softmax(logits_t)_v log softmax(logits_t)_v.
    Only the action positions go through the head, so prompt tokens cost no vocabulary projection.
    """
    _, head = backbone_and_head(model)
    hidden = hidden_states(model, batch, attention)
    pos = _action_positions(batch).to(hidden.device)
    logits = head(hidden[pos - 1]).float() / temperature  # [A, V]
    targets = batch.tokens["input_ids"].to(hidden.device)[pos]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    out = hidden.new_zeros(batch.num_tokens, dtype=torch.float32).index_put((pos,), logp)
    ent = None
    if with_entropy:
        e = -(logp_all.exp() * logp_all).sum(-1)
        ent = hidden.new_zeros(batch.num_tokens, dtype=torch.float32).index_put((pos,), e)
    return out, ent


def _values_at_actions(head, hidden: torch.Tensor, batch: SampleBatch) -> torch.Tensor:
    pos = _action_positions(batch).to(hidden.device)
    v = head(hidden[pos - 1]).float()[:, 0]
    return hidden.new_zeros(batch.num_tokens, dtype=torch.float32).index_put((pos,), v)


def _scores_at_last(head, hidden: torch.Tensor, batch: SampleBatch) -> torch.Tensor:
    last = (batch.offsets[1:] - 1).to(hidden.device)
    return head(hidden[last]).float()[:, 0]


def token_values(critic, batch: SampleBatch, attention: Attention = "packed") -> torch.Tensor:
    """[T] V(x_<t) = score(h_{t-1}) at action positions, 0 elsewhere (critic: token-classification model)."""
    _, head = backbone_and_head(critic)
    return _values_at_actions(head, hidden_states(critic, batch, attention), batch)


def sequence_scores(reward_model, batch: SampleBatch, attention: Attention = "packed") -> torch.Tensor:
    """[B] score(h_last) of each sample (reward model: sequence-classification model, last token)."""
    _, head = backbone_and_head(reward_model)
    return _scores_at_last(head, hidden_states(reward_model, batch, attention), batch)


def token_and_sequence_values(critic, batch: SampleBatch,
                              attention: Attention = "packed") -> tuple[torch.Tensor, torch.Tensor]:
    """(token_values, sequence_scores) of one model from a single forward pass: [T] and [B]."""
    _, head = backbone_and_head(critic)
    hidden = hidden_states(critic, batch, attention)
    return _values_at_actions(head, hidden, batch), _scores_at_last(head, hidden, batch)
