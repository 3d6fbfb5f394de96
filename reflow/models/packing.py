"""Forward passes over packed batches: hidden states, token log-probs, values and rewards.

transformers' sdpa/eager attention on CPU does not keep packed sequences apart when given only
`position_ids` (the second sample then attends to the first: its logits are off by ~0.3), so the
packed path builds the mask itself: one row of T tokens and a [1, 1, T, T] block-diagonal causal
mask, plus per-sample position ids (rotary positions restart at 0 for every sample).

Two attention choices for the same computation, equal up to float rounding:
    "packed": one row, block-diagonal mask — no padding compute; attention is O(T^2) in the row,
              so micro-batches must be bounded in tokens (the engines do that).
    "padded": rows as long as the longest sample, L: the samples are binned first-fit decreasing into
              R <= B rows (several short samples share a row, kept apart by the [R, 1, L, L] mask), so
              attention per row stays <= L^2 while the padding shrinks: with long-tailed lengths one
              sample per row spends most of B x L on padding. When no two samples fit in one row
              (R = B) it is plain right padding [B, L] with transformers' 2-D mask, which needs no
              float [B, 1, L, L] mask (transformers builds a bool one when some row is padded, none
              when none is).

Prefix sharing (`AttentionSpec.share_prefix`): the samples of a group (`samples["group_id"]`, the n
responses of one prompt) that begin with the same P tokens are laid out as that prefix once, followed by
every sample's own tokens:

    row      = [prefix (P) | own_1 (L_1 - P) | own_2 (L_2 - P) | ... ]     T' = P + sum_i (L_i - P)
    position = 0..P-1, then P..L_i-1 for every own_i      (rotary positions continue from the prefix)
    mask     : own_i attends the prefix and itself (causally), never another own_j

Causal attention makes the prefix's hidden states independent of what follows, so this is the same
computation as n separate sequences with the prefix done once. Under "packed" every group of the
micro-batch goes into one row. Under "padded" the units (groups, and samples that share nothing) are
binned as above, into rows as long as the longest unit. The row states are gathered back into the
batch's flat [T, H] order (`PackedRows.gather`); a prefix state used by n samples then receives the sum of
their gradients in backward, exactly as n separate forwards give it.

The mask of R rows of length L is built either dense ([R, 1, L, L] additive in the model's dtype, through
the model's own sdpa attention) or as a flex_attention BlockMask (`kernel="flex"`: no L x L tensor is kept;
the model runs transformers' "flex_attention" implementation, compiled by transformers, for that forward).
torch has no flex_attention backward on CPU: there, forwards under autograd fall back to the dense mask.
The dense mask takes 4 R L^2 bytes in fp32 (1 MiB per row at L = 512, 64 MiB at L = 4096): fine at the
lengths reflow trains on CPU, where rows stay within a micro-batch's token budget; without sharing, binned
rows keep L and have R <= B, so it is at most 4x the bool [B, 1, L, L] mask transformers itself builds for
the same right-padded batch. For long sequences on an accelerator, the flex kernel keeps no L x L tensor.

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
    """How a batch is attended: `layout` "packed" | "padded"; `share_prefix`: the common prefix of the
    samples of a group (`samples[group_key]`) is computed once; `kernel`: "dense" mask or "flex" BlockMask
    for the rows built by `packed_rows`; `binned`: under "padded" the units (samples, or groups sharing a
    prefix) are binned first-fit decreasing into rows as long as the longest unit, when that takes fewer
    rows than units or a prefix is shared (False: a row per unit, plain right padding without sharing: the
    baseline the binning is measured and tested against)."""

    layout: Literal["packed", "padded"] = "padded"
    share_prefix: bool = False
    kernel: Literal["dense", "flex"] = "dense"
    group_key: str = "group_id"
    binned: bool = True

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
class PackedRows:
    """The R rows of length L the model attends, and how they map back to the batch's T flat tokens.

        input_ids, position_ids : [R, L]  (right-padded rows: padding has id 0, position 0)
        segment                 : [R, L]  segment of each row token (a sample's own tokens, a shared
                                          prefix; -1 on padding)
        sees                    : [R, L]  the prefix segment a token also attends (its own segment if none)
        gather                  : [T]     index into the flattened [R * L] rows of every flat batch token
                                          (a shared prefix's tokens are gathered once per sample)
        shared                  : whether any prefix is shared (else this is plain packing or padding)
    Row token q may attend token k of its row iff k <= q and segment[k] in {segment[q], sees[q]}.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    sees: torch.Tensor
    gather: torch.Tensor
    shared: bool

    @property
    def num_tokens(self) -> int:
        """Row tokens that are not padding (T' = T - sum over shared groups of (n - 1) P)."""
        return int((self.segment >= 0).sum())


Arrange = Literal["one_row", "per_unit", "first_fit"]


def packed_rows(batch: SampleBatch, key: str = "input_ids", group_key: str | None = None,
                arrange: Arrange = "one_row") -> PackedRows:
    """The batch as rows: with `group_key`, each group's common prefix appears once, followed by every
    sample's own tokens. The units are the groups that share a prefix and every other sample; `arrange`:

        "one_row"    all units one after the other in one row [1, T'] (attention costs T'^2)
        "per_unit"   a row per unit, right-padded to the longest unit [U, L] (sum over rows of L^2)
        "first_fit"  first-fit decreasing: units by decreasing length (ties: in batch order), each into the
                     first row with room, rows of capacity L = the longest unit [R <= U, L]; the same batch
                     always gives the same rows

    Without `group_key` and with "one_row" this is the plain block-diagonal packing (gather = arange(T))."""
    if arrange not in ("one_row", "per_unit", "first_fit"):
        raise ValueError(f"unknown row arrangement '{arrange}'; use 'one_row', 'per_unit' or 'first_fit'")
    ids, offs = batch.tokens[key], batch.offsets.tolist()
    units = []  # (samples, shared prefix length): a group that shares nothing is a sample per unit
    for group in (batch.groups(group_key) if group_key else [[p] for p in range(len(batch))]):
        P = batch.shared_prefix_len(group, key)
        units += [(group, P)] if P else [([p], 0) for p in group]
    built, shared = [], False  # per unit: (ids, pos, seg, sees, [(flat start, flat end, row indices)])
    nseg = 0
    for unit, P in units:
        shared |= P > 0
        parts, where, length = [], [], 0

        def put(tokens: torch.Tensor, start: int, segment: int, prefix: int) -> torch.Tensor:
            nonlocal length
            n = len(tokens)
            parts.append((tokens, torch.arange(start, start + n), torch.full((n,), segment), torch.full((n,), prefix)))
            length += n
            return torch.arange(length - n, length)

        prefix_seg = nseg
        prefix_idx = put(ids[offs[unit[0]]:offs[unit[0]] + P], 0, nseg, nseg) if P else None
        nseg += 1 if P else 0
        for p in unit:
            own = put(ids[offs[p] + P:offs[p + 1]], P, nseg, prefix_seg if P else nseg)
            nseg += 1
            where.append((offs[p], offs[p + 1], torch.cat([prefix_idx, own]) if P else own))
        built.append(([torch.cat(x) if x else torch.empty(0, dtype=torch.long) for x in zip(*parts)], where))
    sizes = [len(cols[0]) for cols, _ in built]
    if arrange == "one_row":
        bins = [list(range(len(built)))] if built else []
    elif arrange == "per_unit":
        bins = [[u] for u in range(len(built))]
    else:  # capacity = the longest unit, so no row grows past what a row per unit is padded to
        bins, room, capacity = [], [], max(sizes, default=0)
        for u in sorted(range(len(built)), key=lambda u: (-sizes[u], u)):
            r = next((r for r, free in enumerate(room) if free >= sizes[u]), len(bins))
            if r == len(bins):
                bins.append([])
                room.append(capacity)
            bins[r].append(u)
            room[r] -= sizes[u]
    rows = []  # each bin's units one after the other in its row
    for units_in_row in bins:
        starts = torch.tensor([0] + [sizes[u] for u in units_in_row]).cumsum(0).tolist()
        rows.append(([torch.cat(c) for c in zip(*(built[u][0] for u in units_in_row))],
                     [(a, b, idx + start) for u, start in zip(units_in_row, starts) for a, b, idx in built[u][1]]))
    built = rows
    L = max((len(b[0][0]) for b in built), default=0)
    out = [torch.full((len(built), L), fill, dtype=torch.long) for fill in (0, 0, -1, -1)]
    gather = torch.empty(batch.num_tokens, dtype=torch.long)
    for r, (cols, where) in enumerate(built):
        for t, c in zip(out, cols):
            t[r, :len(c)] = c
        for a, b, idx in where:
            gather[a:b] = r * L + idx
    return PackedRows(out[0].to(ids.dtype), out[1], out[2], out[3], gather, shared)


def row_mask_mod(rows: PackedRows, device=None):
    """mask_mod(b, h, q, k) -> whether token q of row b may attend token k of row b (flex_attention's
    signature; b, q and k broadcast, so the same function builds the dense mask)."""
    seg, sees = rows.segment.to(device), rows.sees.to(device)

    def mask_mod(b, h, q, k):
        return (k <= q) & ((seg[b, k] == seg[b, q]) | (seg[b, k] == sees[b, q]))

    return mask_mod


def row_mask(rows: PackedRows, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[R, 1, L, L] additive mask of the rows: 0 where q may attend k, else the dtype's minimum."""
    R, L = rows.segment.shape
    b, idx = torch.arange(R, device=device), torch.arange(L, device=device)
    allowed = row_mask_mod(rows, device)(b[:, None, None], None, idx[None, :, None], idx[None, None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def row_block_mask(rows: PackedRows, device=None):
    """The same mask as `row_mask`, as a flex_attention BlockMask: per 128 x 128 block, whether it is empty,
    full or partial, with `mask_mod` evaluated inside partial blocks; no L x L tensor is kept for the
    forward (building it evaluates mask_mod once on a transient [R, L, L] bool grid)."""
    from torch.nn.attention.flex_attention import create_block_mask

    R, L = rows.segment.shape
    return create_block_mask(row_mask_mod(rows, device), B=R, H=None, Q_LEN=L, KV_LEN=L, device=device or "cpu")


def block_causal_mask(seqlens: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, T, T] additive mask: 0 where token i may attend token j (same sample, j <= i), else -inf-ish."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), seqlens)[None]
    return row_mask(PackedRows(seg, seg, seg, seg, torch.arange(seg.shape[1]), False), dtype, device)


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
    rows = None
    if spec.layout == "packed" or spec.binned or spec.share_prefix:
        arrange = "one_row" if spec.layout == "packed" else "first_fit" if spec.binned else "per_unit"
        rows = packed_rows(batch, key, sharing_group_key(spec, batch), arrange=arrange)
        # padded, nothing shared and a row per sample anyway: the same rows under transformers' 2-D mask, with
        # no float [B, 1, L, L] mask (transformers builds a bool one, or none when no sample is padded)
        if spec.layout == "padded" and not rows.shared and len(rows.input_ids) >= len(batch):
            rows = None
    if rows is None:
        ids, real = batch.padded(key)
        ids, real = ids.to(device), real.to(device)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        hidden = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=real.long())
        return hidden[real]  # row-major order == the packed flat order
    ids, pos = rows.input_ids.to(device), rows.position_ids.to(device)
    if use_flex(spec, device):
        with _attn_implementation(model, "flex_attention"):
            h = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=row_block_mask(rows, device))
    else:
        h = _final_hidden(model, input_ids=ids, position_ids=pos, attention_mask=row_mask(rows, dtype, device))
    return h.flatten(0, 1)[rows.gather.to(device)]


def _action_positions(batch: SampleBatch) -> torch.Tensor:
    """Flat positions t with action_mask[t] = 1 (never the first token of a sample)."""
    mask = batch.tokens["action_mask"].bool()
    first = torch.zeros_like(mask)
    first[batch.offsets[:-1][batch.seqlens > 0]] = True
    if (mask & first).any():
        raise ValueError("action_mask is set on the first token of a sample; the first token has no context")
    return mask.nonzero(as_tuple=True)[0]


def token_logprobs(model, batch: SampleBatch, *, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = True, attention: Attention = "packed"
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(x_t | x_<t) / T at action positions, as [T] tensors (0 elsewhere); optionally the entropy.

    logits_t = lm_head(h_{t-1}) / temperature,  logp_t = logits_t[x_t] - logsumexp(logits_t),
    entropy_t = -sum_v softmax(logits_t)_v log softmax(logits_t)_v.
    Only the action positions go through the head, so prompt tokens cost no vocabulary projection.
    `entropy_grad=False` (the entropy is only logged): it is computed without autograd, in row blocks of
    ENTROPY_BLOCK_BYTES, so no second and third [A, V] tensor is allocated (with a 49k vocabulary each is
    ~200 kB per action token, and a fresh allocation that size pays its page faults on every step).
    """
    _, head = backbone_and_head(model)
    hidden = hidden_states(model, batch, attention)
    pos = _action_positions(batch).to(hidden.device)
    logits = head(hidden[pos - 1]).float()  # [A, V]
    if temperature != 1.0:  # in place: the head's backward does not need its output
        logits = logits.div_(temperature)
    targets = batch.tokens["input_ids"].to(hidden.device)[pos]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    out = hidden.new_zeros(batch.num_tokens, dtype=torch.float32).index_put((pos,), logp)
    ent = None
    if with_entropy:
        if entropy_grad:
            e = -(logp_all.exp() * logp_all).sum(-1)
        else:
            with torch.no_grad():
                e = _entropy_blocks(logp_all)
        ent = hidden.new_zeros(batch.num_tokens, dtype=torch.float32).index_put((pos,), e)
    return out, ent


ENTROPY_BLOCK_BYTES = 8 << 20  # below glibc's mmap threshold: blocks reuse heap memory


def _entropy_blocks(logp_all: torch.Tensor) -> torch.Tensor:
    """[A] -sum_v exp(logp) logp of [A, V] log-probabilities, in row blocks of ENTROPY_BLOCK_BYTES."""
    rows = max(1, ENTROPY_BLOCK_BYTES // max(1, logp_all.shape[-1] * logp_all.element_size()))
    out = logp_all.new_empty(logp_all.shape[0])
    for a in range(0, logp_all.shape[0], rows):
        block = logp_all[a:a + rows]
        out[a:a + rows] = -(block.exp() * block).sum(-1)
    return out


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
