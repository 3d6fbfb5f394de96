"""SampleBatch: the one batch type every stage passes on.

Samples are *packed*: for every per-token key the tokens of all samples are concatenated into one flat
tensor (no padding), and `seqlens` says how many belong to each sample. Per-sample keys hold one row
per sample. Every sample carries a unique integer id, so a batch can be split over workers, processed,
and stitched back together by id.

    ids      : list[int]                   B sample ids (unique)
    seqlens  : LongTensor [B]              tokens per sample
    tokens   : {key: Tensor [T, ...]}      T = seqlens.sum(); sample i owns rows offsets[i]:offsets[i+1]
    samples  : {key: Tensor [B, ...]}      one row per sample (rewards, prompt lengths, group ids, ...)
    meta     : {key: list[Any] of len B}   Python objects that are not tensors (prompt text, answers)

Conventions used by the engines and algorithms:
    tokens["input_ids"]   prompt followed by response, per sample
    tokens["action_mask"] 1 at response positions (the tokens the policy chose), 0 on the prompt
    tokens[...]           per-token quantities at position t concern *emitting token t*
                          (log pi(x_t | x_<t), V(x_<t), ...); position 0 of a sample is always 0
    tokens["versions"]    the policy version (weight updates seen) that emitted each response token, -1 on the
                          prompt; one sample mixes versions when a partial rollout continued it after an update
    tokens["gen_logprobs"] the behaviour log-prob of each response token, under the version that emitted it
    samples["group_id"]   samples generated from the same prompt share a group id (GRPO/RLOO groups)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch


@dataclass
class SampleBatch:
    ids: list[int]
    seqlens: torch.Tensor
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self):
        self.ids = [int(i) for i in self.ids]
        self.seqlens = torch.as_tensor(self.seqlens, dtype=torch.long)
        if self.seqlens.dim() != 1 or len(self.seqlens) != len(self.ids):
            raise ValueError(f"seqlens must be 1-D with one entry per id ({len(self.ids)}), got {tuple(self.seqlens.shape)}")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("sample ids must be unique within a batch")
        self._check()

    def _check(self):
        total, n = int(self.seqlens.sum()), len(self.ids)
        for k, v in self.tokens.items():
            if v.shape[0] != total:
                raise ValueError(f"token key '{k}' has {v.shape[0]} rows, expected {total} (sum of seqlens)")
        for k, v in self.samples.items():
            if v.shape[0] != n:
                raise ValueError(f"sample key '{k}' has {v.shape[0]} rows, expected {n} samples")
        for k, v in self.meta.items():
            if len(v) != n:
                raise ValueError(f"meta key '{k}' has {len(v)} entries, expected {n} samples")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_sequences(
        cls,
        ids: Sequence[int],
        tokens: dict[str, Sequence[torch.Tensor | Sequence]],
        samples: dict[str, Any] | None = None,
        meta: dict[str, list] | None = None,
    ) -> "SampleBatch":
        """Pack per-sample sequences. All token keys must have the same length per sample."""
        if not tokens:
            raise ValueError("from_sequences needs at least one token key")
        first = next(iter(tokens))
        seqs = {k: [torch.as_tensor(s) for s in v] for k, v in tokens.items()}
        seqlens = torch.tensor([len(s) for s in seqs[first]], dtype=torch.long)
        for k, v in seqs.items():
            lens = torch.tensor([len(s) for s in v], dtype=torch.long)
            if not torch.equal(lens, seqlens):
                raise ValueError(f"token key '{k}' has per-sample lengths different from '{first}'")
        flat = {k: torch.cat(v) if v else torch.empty(0) for k, v in seqs.items()}
        samples = {k: torch.as_tensor(v) for k, v in (samples or {}).items()}
        return cls(list(ids), seqlens, flat, samples, dict(meta or {}))

    # ----------------------------------------------------------------- geometry
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return int(self.seqlens.sum())

    @property
    def offsets(self) -> torch.Tensor:
        """[B+1] cumulative sequence lengths (cu_seqlens): sample i is rows offsets[i]:offsets[i+1]."""
        return torch.nn.functional.pad(self.seqlens.cumsum(0), (1, 0))

    def sample_index(self) -> torch.Tensor:
        """[T] which sample each flat token belongs to."""
        return torch.repeat_interleave(torch.arange(len(self)), self.seqlens)

    def unpack(self, key: str) -> list[torch.Tensor]:
        """Per-sample views of a token key."""
        return list(torch.split(self.tokens[key], self.seqlens.tolist()))

    def padded(self, key: str, pad_value: float = 0, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Lmax] padded copy of a token key and its [B, Lmax] bool mask of real tokens."""
        seqs = self.unpack(key)
        lmax = int(self.seqlens.max()) if len(self) else 0
        out = self.tokens[key].new_full((len(self), lmax) + self.tokens[key].shape[1:], pad_value)
        mask = torch.zeros(len(self), lmax, dtype=torch.bool)
        for i, s in enumerate(seqs):
            sl = slice(lmax - len(s), lmax) if left else slice(0, len(s))
            out[i, sl] = s
            mask[i, sl] = True
        return out, mask

    def position_in_sample(self) -> torch.Tensor:
        """[T] 0-based position of each flat token inside its sample (the packed position_ids)."""
        starts = torch.repeat_interleave(self.offsets[:-1], self.seqlens)
        return torch.arange(self.num_tokens) - starts

    # ----------------------------------------------------------------- selection
    def index(self, positions: Sequence[int]) -> "SampleBatch":
        """New batch with the samples at `positions` (in that order)."""
        positions = [int(p) for p in positions]
        return self._gather(positions, [self.ids[p] for p in positions])

    def _gather(self, positions: list[int], ids: list[int]) -> "SampleBatch":
        """The samples at `positions`, renamed to `ids` (repeat() repeats positions under new ids)."""
        pos_t = torch.tensor(positions, dtype=torch.long)
        if self.tokens and positions:
            offs = self.offsets
            tok_idx = torch.cat([torch.arange(offs[p], offs[p + 1]) for p in positions])
        else:
            tok_idx = torch.empty(0, dtype=torch.long)
        return SampleBatch(
            ids,
            self.seqlens[pos_t] if positions else self.seqlens[:0],
            {k: v[tok_idx] for k, v in self.tokens.items()},
            {k: v[pos_t] if positions else v[:0] for k, v in self.samples.items()},
            {k: [v[p] for p in positions] for k, v in self.meta.items()},
        )

    def select(self, ids: Iterable[int]) -> "SampleBatch":
        """New batch with the samples whose ids are given (in that order)."""
        where = {sid: p for p, sid in enumerate(self.ids)}
        try:
            return self.index([where[int(i)] for i in ids])
        except KeyError as e:
            raise KeyError(f"sample id {e.args[0]} is not in this batch") from None

    def groups(self, key: str = "group_id") -> list[list[int]]:
        """Positions of the samples of each group (by `samples[key]`), groups in order of first appearance."""
        out: dict[int, list[int]] = {}
        for p, g in enumerate(self.samples[key].tolist()):
            out.setdefault(g, []).append(p)
        return list(out.values())

    def repeat(self, n: int, first_id: int = 0) -> "SampleBatch":
        """Each sample n times in a row (n responses per prompt): new ids first_id.., group_id = old id."""
        positions = [p for p in range(len(self)) for _ in range(n)]
        # gathered under the new ids directly: indexing under the old ids would repeat them
        out = self._gather(positions, list(range(first_id, first_id + len(positions))))
        out.samples["group_id"] = torch.tensor([self.ids[p] for p in positions], dtype=torch.long)
        return out

    # ----------------------------------------------------------------- combining and splitting
    @staticmethod
    def concat(batches: Sequence["SampleBatch"]) -> "SampleBatch":
        """One batch with the samples of all `batches` in order; keys must match."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        b0 = batches[0]
        for b in batches[1:]:
            for kind in ("tokens", "samples", "meta"):
                if set(getattr(b, kind)) != set(getattr(b0, kind)):
                    raise ValueError(f"cannot concat batches with different {kind} keys: "
                                     f"{sorted(getattr(b0, kind))} vs {sorted(getattr(b, kind))}")
        return SampleBatch(
            [i for b in batches for i in b.ids],
            torch.cat([b.seqlens for b in batches]),
            {k: torch.cat([b.tokens[k] for b in batches]) for k in b0.tokens},
            {k: torch.cat([b.samples[k] for b in batches]) for k in b0.samples},
            {k: [x for b in batches for x in b.meta[k]] for k in b0.meta},
        )

    def split(self, n: int, group_key: str | None = None) -> list["SampleBatch"]:
        """Split into n parts with balanced token counts (greedy longest-first onto the lightest part).

        With `group_key`, samples of one group stay in one part. Inside each part the original
        order is kept, so split + concat + select(ids) restores the batch.
        """
        if n < 1:
            raise ValueError("split needs n >= 1")
        units = self.groups(group_key) if group_key else [[p] for p in range(len(self))]
        if len(units) < n:
            raise ValueError(f"cannot split {len(units)} {'groups' if group_key else 'samples'} into {n} non-empty parts")
        lens = self.seqlens.tolist()
        cost = [sum(lens[p] for p in u) for u in units]
        heap = [(0, part) for part in range(n)]  # (tokens so far, part)
        assign: list[list[int]] = [[] for _ in range(n)]
        for u in sorted(range(len(units)), key=lambda u: -cost[u]):
            tok, part = heapq.heappop(heap)
            assign[part].extend(units[u])
            heapq.heappush(heap, (tok + cost[u], part))
        return [self.index(sorted(a)) for a in assign]

    def shared_prefix_len(self, positions: Sequence[int], key: str = "input_ids") -> int:
        """P: the tokens every sample at `positions` starts with, when worth sharing (two or more samples,
        P >= 2: a one-token prefix saves nothing but still cuts a packed row into more segments), else 0."""
        if len(positions) < 2:
            return 0
        offs = self.offsets.tolist()
        seqs = [self.tokens[key][offs[p]:offs[p + 1]] for p in positions]
        m = min(len(s) for s in seqs)
        same = (torch.stack([s[:m] for s in seqs]) == seqs[0][:m]).all(0)
        P = m if bool(same.all()) else int((~same).nonzero()[0, 0])
        return P if P >= 2 else 0

    def micro_batches(self, max_tokens: int, group_key: str | None = None,
                      share_prefix: bool = False) -> list["SampleBatch"]:
        """Consecutive slices whose token count stays within `max_tokens` (a longer unit goes alone).

        With `group_key`, consecutive samples of the same group are one unit and never cut apart
        (e.g. the chosen and rejected halves of a preference pair). With `share_prefix`, a unit's common
        prefix counts once (the tokens of its shared packed row: sum L_i - (n - 1) P).
        """
        n = len(self)
        keys = self.samples[group_key].tolist() if group_key else list(range(n))
        lens = self.seqlens.tolist()
        units, p = [], 0  # (start, end, tokens) of runs of equal group key
        while p < n:
            q = p + 1
            while q < n and keys[q] == keys[p]:
                q += 1
            saved = (q - p - 1) * self.shared_prefix_len(range(p, q)) if share_prefix else 0
            units.append((p, q, sum(lens[p:q]) - saved))
            p = q
        out, start, tok = [], 0, 0
        for a, b, t in units:
            if a > start and tok + t > max_tokens:
                out.append(self.index(range(start, a)))
                start, tok = a, 0
            tok += t
        if start < n:
            out.append(self.index(range(start, n)))
        return out

    def chunks(self, n: int) -> list["SampleBatch"]:
        """n consecutive parts with equal sample counts (as equal as possible); mini-batches for PPO."""
        bounds = torch.linspace(0, len(self), n + 1).round().long().tolist()
        return [self.index(range(bounds[i], bounds[i + 1])) for i in range(n) if bounds[i + 1] > bounds[i]]

    # ----------------------------------------------------------------- updates
    def with_tokens(self, **tensors: torch.Tensor) -> "SampleBatch":
        """Add or replace per-token keys (in place); returns self for chaining."""
        self.tokens.update(tensors)
        self._check()
        return self

    def with_samples(self, **tensors: torch.Tensor) -> "SampleBatch":
        """Add or replace per-sample keys (in place); returns self for chaining."""
        self.samples.update({k: torch.as_tensor(v) for k, v in tensors.items()})
        self._check()
        return self

    def to(self, device) -> "SampleBatch":
        return SampleBatch(
            self.ids,
            self.seqlens,
            {k: v.to(device) for k, v in self.tokens.items()},
            {k: v.to(device) for k, v in self.samples.items()},
            self.meta,
        )


def nonfinite_samples(batch: SampleBatch | None, limit: int = 8, undefined: tuple[str, ...] = ("correct",)) -> str:
    """Which samples of `batch` hold a NaN / inf in a float field: "samples with non-finite values: 12
    (advantages, score), ..." (at most `limit` of them), for errors that must name the rows. Fields in
    `undefined` use NaN for "not defined" and are not reported (`correct`: the reward declares no success)."""
    if batch is None or not len(batch):
        return "no input samples"
    bad: dict[int, set[str]] = {}
    owner = torch.repeat_interleave(torch.arange(len(batch)), batch.seqlens)
    for where, fields in (("tokens", batch.tokens), ("samples", batch.samples)):
        for k, v in fields.items():
            if not v.is_floating_point() or k in undefined:
                continue
            rows = ~torch.isfinite(v).reshape(v.shape[0], -1).all(dim=1)
            idx = owner[rows] if where == "tokens" else rows.nonzero().flatten()
            for i in set(idx.tolist()):
                bad.setdefault(batch.ids[i], set()).add(k)
    if not bad:
        return "every input value is finite (the model's own outputs or gradients overflowed)"
    shown = ", ".join(f"{i} ({', '.join(sorted(bad[i]))})" for i in sorted(bad)[:limit])
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"samples with non-finite values: {shown}{more}"
