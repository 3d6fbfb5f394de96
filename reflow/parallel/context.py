"""ParallelContext: one model's layout on its ranks, as DeviceMesh + process groups, for the engines.

    mesh dims ("pp", "dp", "tp"), shape (p, d, t), over the layout's ordered ranks
    dp group : ranks holding different samples of a batch (FSDP2 shards parameters over it)
    tp group : ranks holding different columns/rows of the same layers (DTensor)
    group    : all ranks of the layout (global reductions: grad norm, loss sums)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from reflow.data.batch import SampleBatch
from reflow.parallel.layout import Layout


@dataclass
class ParallelContext:
    layout: Layout
    ranks: list[int]
    device_type: str = "cpu"
    mesh: DeviceMesh = field(init=False)
    group: dist.ProcessGroup | None = field(init=False)

    def __post_init__(self):
        L = self.layout
        self.mesh = DeviceMesh(self.device_type, torch.tensor(self.ranks).view(L.p, L.d, L.t),
                               mesh_dim_names=("pp", "dp", "tp"))
        # every rank of the world must take part in creating groups, members or not
        self.group = None if len(self.ranks) == dist.get_world_size() else dist.new_group(self.ranks)
        me = dist.get_rank()
        self.index = self.ranks.index(me) if me in self.ranks else None

    @classmethod
    def build(cls, layout: str | Layout, ranks: list[int] | None = None) -> "ParallelContext":
        layout = Layout.parse(layout) if isinstance(layout, str) else layout
        ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
        device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        return cls(layout, ranks, device)

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.index)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.index)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.index)[2]

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    def sub_mesh(self, name: str) -> DeviceMesh:
        return self.mesh[name]

    def local_part(self, batch: SampleBatch, group_key: str | None = None) -> SampleBatch:
        """This data-parallel rank's share of a batch every rank holds (token-balanced, deterministic)."""
        if self.layout.d == 1:
            return batch
        return batch.split(self.layout.d, group_key)[self.dp_rank]

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM, dim: str | None = None) -> torch.Tensor:
        group = self.mesh.get_group(dim) if dim else self.group
        dist.all_reduce(x, op=op, group=group)
        return x


def equal_micro_batches(ctx: "ParallelContext | None", batch: SampleBatch, max_tokens: int,
                        group_key: str | None = None, share_prefix: bool = False) -> list[tuple[SampleBatch, bool]]:
    """Micro-batches of this rank's part, as (micro_batch, real) pairs, with the same count on every
    data-parallel rank: FSDP2 all-gathers on every forward, so a rank with fewer micro-batches would hang
    its peers. Missing ones are filled with a copy of the first micro-batch marked real=False, whose loss
    and outputs the caller multiplies by zero / drops (the collectives still run). `share_prefix`: see
    SampleBatch.micro_batches."""
    mbs = batch.micro_batches(max_tokens, group_key, share_prefix)
    if ctx is None or ctx.layout.d == 1:
        return [(mb, True) for mb in mbs]
    n = torch.tensor(len(mbs))
    ctx.all_reduce(n, dist.ReduceOp.MAX, dim="dp")
    return [(mb, True) for mb in mbs] + [(mbs[0], False)] * (int(n) - len(mbs))


def gather_by_id(ctx: "ParallelContext", full: SampleBatch, local: SampleBatch, token_out=None, sample_out=None):
    """Outputs computed on this dp rank's part -> outputs for the whole batch in its order (all ranks get all)."""
    if ctx is None or ctx.layout.d == 1:
        return token_out, sample_out
    parts = [None] * ctx.layout.d
    payload = (local.ids, local.seqlens, token_out, sample_out)
    dist.all_gather_object(parts, payload, group=ctx.dp_group)
    tok_by_id, smp_by_id = {}, {}
    for ids, seqlens, tok, smp in parts:
        tok_split = torch.split(tok, seqlens.tolist()) if tok is not None else [None] * len(ids)
        for j, sid in enumerate(ids):
            tok_by_id[sid] = tok_split[j]
            if smp is not None:
                smp_by_id[sid] = smp[j]
    tok_full = torch.cat([tok_by_id[i] for i in full.ids]) if token_out is not None else None
    smp_full = torch.stack([smp_by_id[i] for i in full.ids]) if sample_out is not None else None
    return tok_full, smp_full
