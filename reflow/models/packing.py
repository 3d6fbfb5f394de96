"""Forward passes over packed batches: hidden states, token log-probs, values and rewards.

transformers' sdpa/eager attention on CPU does not keep packed sequences apart when given only
`position_ids` (the second sample then attends to the first: its logits are off by ~0.3), so the
packed path builds the mask itself: one row of T tokens and a [1, 1, T, T] block-diagonal causal
mask, plus per-sample position ids (rotary positions restart at 0 for every sample).

Two attention choices for the same computation, equal up to float rounding:
    "packed": one row, block-diagonal mask — no padding compute; attention is O(T^2) in the row,
              so micro-batches must be bounded in tokens (the engines do that).
    "padded": right-padded [B, Lmax] with a 2-D mask — cheaper attention when many short samples.

Prefix sharing (`AttentionSpec.share_prefix`): the samples of a group (`samples["group_id"]`, the n
responses of one prompt) that begin with the same P tokens are laid out as that prefix once, followed by
every sample's own tokens, in one packed row:

    row      = [prefix (P) | own_1 (L_1 - P) | own_2 (L_2 - P) | ... ]     T' = P + sum_i (L_i - P)
    position = 0..P-1, then P..L_i-1 for every own_i      (rotary positions continue from the prefix)
    mask     : own_i attends the prefix and itself (causally), never another own_j

Causal attention makes the prefix's hidden states independent of what follows, so this is the same
computation as n separate sequences with the prefix done once. The [T', H] row states are gathered
back into the batch's flat [T, H] order (`PackedRow.gather`); a prefix state used by n samples then
receives the sum of their gradients in backward, exactly as n separate forwards would give it.

The mask is built either dense ([1, 1, T', T'] additive, through the model's own sdpa attention) or as
a flex_attention BlockMask (`kernel="flex"`: no T' x T' tensor; the model runs transformers'
"flex_attention" implementation, compiled by transformers, for that forward). torch has no flex_attention
backward on CPU: there, forwards under autograd fall back to the dense mask.

Per-token outputs follow the batch convention: position t holds the quantity for *emitting* token t,
computed from the hidden state at t-1; position 0 of each sample holds 0.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from reflow.data.batch import SampleBatch


@dataclass(frozen=True)
class AttentionSpec:
    """How a batch is attended: `layout` "packed" | "padded"; `share_prefix`: a group's common prefix is
    computed once (its micro-batches run as one packed row); `kernel`: "dense" mask or "flex" BlockMask
    for packed rows."""

    layout: Literal["packed", "padded"] = "padded"
    share_prefix: bool = False
    kernel: Literal["dense", "flex"] = "dense"
    group_key: str = "group_id"

    def __post_init__(self):
        if self.layout not in ("packed", "padded"):
            raise ValueError(f"unknown attention '{self.layout}'; use 'packed' or 'padded'")
        if self.kernel not in ("dense", "flex"):
            raise ValueError(f"unknown attention kernel '{self.kernel}'; use 'dense' or 'flex'")


Attention = Literal["packed", "padded"] | AttentionSpec


def attention_spec(attention) -> AttentionSpec:
    """An AttentionSpec from a layout name ("packed" / "padded"), a spec, or a role's ModelConfig
    (`attention`, `prefix_sharing`, `attention_kernel`)."""
    if isinstance(attention, AttentionSpec):
        return attention
    if isinstance(attention, str):
        return AttentionSpec(attention)
    return AttentionSpec(attention.attention, share_prefix=bool(attention.prefix_sharing),
                         kernel=attention.attention_kernel)


def sharing_group_key(attention, batch: SampleBatch, parts: int = 1) -> str | None:
    """The key that keeps a group's samples in one micro-batch (and one of `parts` data-parallel parts) when
    its prefix is shared; None when sharing is off, or with fewer groups than parts (samples then spread)."""
    spec = attention_spec(attention)
    if not spec.share_prefix or spec.group_key not in batch.samples:
        return None
    return spec.group_key if len(batch.groups(spec.group_key)) >= parts else None


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer backbone, output head) of an HF causal-LM, token- or sequence-classification model."""
    backbone = model.base_model
    for name in ("lm_head", "score"):
        head = getattr(model, name, None)
        if head is not None:
            return backbone, head
    raise TypeError(f"{type(model).__name__} has neither an lm_head nor a score head")


@dataclass
class PackedRow:
    """One row of T' tokens the model attends, and how it maps back to the batch's T flat tokens.

        input_ids, position_ids : [T']
        segment                 : [T'] segment of each row token (a sample's own tokens, or a shared prefix)
        sees                    : [T'] the prefix segment a token also attends (its own segment if none)
        gather                  : [T]  row index of every flat batch token (prefix tokens repeat)
    Row token q may attend row token k iff k <= q and segment[k] in {segment[q], sees[q]}.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    sees: torch.Tensor
    gather: torch.Tensor

    @property
    def shared(self) -> bool:
        return len(self.input_ids) < len(self.gather)


def packed_row(batch: SampleBatch, key: str = "input_ids", group_key: str | None = None) -> PackedRow:
    """The batch as one packed row; with `group_key`, the common prefix of each group's samples appears once.

    Without sharing this is the plain block-diagonal packing (T' = T, gather = arange(T))."""
    ids, offs = batch.tokens[key], batch.offsets.tolist()
    units = batch.groups(group_key) if group_key else [[p] for p in range(len(batch))]
    seqs = [ids[offs[p]:offs[p + 1]] for p in range(len(batch))]
    row, pos, seg, sees = [], [], [], []
    gather = torch.empty(batch.num_tokens, dtype=torch.long)
    cursor = 0

    def put(tokens: torch.Tensor, start: int, segment: int, prefix: int) -> torch.Tensor:
        nonlocal cursor
        n = len(tokens)
        row.append(tokens)
        pos.append(torch.arange(start, start + n))
        seg.append(torch.full((n,), segment, dtype=torch.long))
        sees.append(torch.full((n,), prefix, dtype=torch.long))
        cursor += n
        return torch.arange(cursor - n, cursor)

    for unit in units:
        P = batch.shared_prefix_len(unit, key)
        prefix_seg = len(seg)
        prefix_rows = put(seqs[unit[0]][:P], 0, prefix_seg, prefix_seg) if P else None
        for p in unit:
            s = len(seg)
            own = put(seqs[p][P:], P, s, prefix_seg if P else s)
            gather[offs[p]:offs[p + 1]] = torch.cat([prefix_rows, own]) if P else own
    cat = (lambda xs, dt: torch.cat(xs) if xs else torch.empty(0, dtype=dt))
    return PackedRow(cat(row, ids.dtype), cat(pos, torch.long), cat(seg, torch.long), cat(sees, torch.long), gather)


def row_mask_mod(row: PackedRow, device=None):
    """mask_mod(b, h, q, k) -> whether row token q may attend row token k (flex_attention's signature;
    q and k broadcast, so the same function builds the dense mask)."""
    seg, sees = row.segment.to(device), row.sees.to(device)

    def mask_mod(b, h, q, k):
        return (k <= q) & ((seg[k] == seg[q]) | (seg[k] == sees[q]))

    return mask_mod


def row_mask(row: PackedRow, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, T', T'] additive mask of a packed row: 0 where q may attend k, else the dtype's minimum."""
    idx = torch.arange(len(row.segment), device=device)
    allowed = row_mask_mod(row, device)(None, None, idx[:, None], idx[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def row_block_mask(row: PackedRow, device=None):
    """The same mask as `row_mask`, as a flex_attention BlockMask: per 128 x 128 block, whether it is empty,
    full or partial, with `mask_mod` evaluated inside partial blocks; no T' x T' tensor is kept for the
    forward (building it evaluates mask_mod once on a transient [T', T'] bool grid)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = len(row.segment)
    return create_block_mask(row_mask_mod(row, device), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device or "cpu")


def block_causal_mask(seqlens: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, T, T] additive mask: 0 where token i may attend token j (same sample, j <= i), else -inf-ish."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), seqlens)
    return row_mask(PackedRow(seg, seg, seg, seg, torch.arange(len(seg))), dtype, device)


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


@contextlib.contextmanager
def _attn_implementation(model: torch.nn.Module, name: str):
    """Run `model` (and its submodules' configs) under attention implementation `name` for one forward."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
    before = [(c, c._attn_implementation) for c in configs]
    for c, _ in before:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, old in before:
            c._attn_implementation = old


def use_flex(attention, device) -> bool:
    """Whether a packed row runs flex_attention: asked for, and supported (torch has no flex_attention
    backward on CPU, so CPU training falls back to the dense mask; forward-only calls keep flex)."""
    return attention_spec(attention).kernel == "flex" and (torch.device(device).type != "cpu"
                                                          or not torch.is_grad_enabled())


def hidden_states(model: torch.nn.Module, batch: SampleBatch, attention: Attention = "packed",
                  key: str = "input_ids") -> torch.Tensor:
    """[T, H] last hidden states of every token of the packed batch (in the batch's flat order)."""
    spec = attention_spec(attention)
    device, dtype = _param(model).device, _param(model).dtype
    row = None
    if spec.share_prefix or spec.layout == "packed":
        row = packed_row(batch, key, sharing_group_key(spec, batch))
        if spec.layout == "padded" and not row.shared:  # nothing shared: the configured layout
            row = None
    if row is None:
        ids, real = batch.padded(key)
        ids, real = ids.to(device), real.to(device)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        hidden = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=real.long())
        return hidden[real]  # row-major order == the packed flat order
    ids, pos = row.input_ids.to(device)[None], row.position_ids.to(device)[None]
    if use_flex(spec, device):
        with _attn_implementation(model, "flex_attention"):
            h = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=row_block_mask(row, device))
    else:
        h = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=row_mask(row, dtype, device))
    return h[0][row.gather.to(device)] if row.shared else h[0]


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
