"""Inference engine: forward-only log-probs, values and rewards of a packed batch, micro-batched by tokens."""

from __future__ import annotations

import torch

from reflow.data.batch import SampleBatch
from reflow.models.packing import (Attention, attention_spec, sequence_scores, sharing_group_key,
                                   token_and_sequence_values, token_logprobs)


class InferenceEngine:
    """`parallel`: a ParallelContext under whose layout `model` runs (parallelized by the caller or by
    `parallelize=True`; with `shard_data=False` the data-parallel ranks then hold replicas instead of FSDP2
    shards); each data-parallel rank computes its share and every rank returns the whole batch's outputs."""

    def __init__(self, model: torch.nn.Module, micro_batch_tokens: int = 4096, attention: Attention = "padded",
                 parallel=None, parallelize: bool = False, shard_data: bool = True):
        from reflow.parallel.parallelize import parallelize as apply_layout

        self.ctx = parallel
        self.model = apply_layout(model, parallel, shard_data=shard_data) if parallelize else model
        self.micro_batch_tokens = micro_batch_tokens
        self.attention = attention_spec(attention)

    def _map(self, batch: SampleBatch, fn) -> list:
        """fn over the micro-batches of this rank's part; padding micro-batches' outputs are dropped."""
        from reflow.parallel.context import equal_micro_batches

        # shared prefixes need a group's samples in one micro-batch (and one data-parallel part)
        key = sharing_group_key(self.attention, batch, 1 if self.ctx is None else self.ctx.layout.d)
        part = batch if self.ctx is None else self.ctx.local_part(batch, key)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                mbs = equal_micro_batches(self.ctx, part, self.micro_batch_tokens, key, share_prefix=key is not None)
                out = [(fn(mb), real) for mb, real in mbs]
                return [o for o, real in out if real], part
        finally:
            self.model.train(was_training)

    def _gather(self, batch, part, token_out=None, sample_out=None):
        """Outputs of this rank's part -> the whole batch's outputs on every rank (from the last pipeline stage)."""
        import torch.distributed as dist

        from reflow.parallel.context import gather_by_id

        stage = getattr(self.model, "_reflow_stage", None)
        if stage is not None:
            stage.reset()
            box = [(token_out, sample_out)]
            dist.broadcast_object_list(box, src=stage.ranks[-1], group=stage.group)
            token_out, sample_out = box[0]
        return gather_by_id(self.ctx, batch, part, token_out, sample_out)

    def logprobs(self, batch: SampleBatch, temperature: float = 1.0, with_entropy: bool = False):
        """[T] log-probs of the batch's own tokens at action positions (and [T] entropy if asked)."""
        outs, part = self._map(batch, lambda mb: token_logprobs(self.model, mb, temperature=temperature,
                                                                with_entropy=with_entropy, attention=self.attention))
        logp = torch.cat([o[0].cpu() for o in outs])
        logp, _ = self._gather(batch, part, logp)
        ent = None
        if with_entropy:
            ent, _ = self._gather(batch, part, torch.cat([o[1].cpu() for o in outs]))
        return logp, ent

    def values(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] values V(x_<t) at action positions, and [B] values of the whole sequences (for bootstrapping)."""
        def fn(mb):  # one backbone forward gives both
            tok, seq = token_and_sequence_values(self.model, mb, self.attention)
            return tok.cpu(), seq.cpu()
        outs, part = self._map(batch, fn)
        return self._gather(batch, part, torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))

    def scores(self, batch: SampleBatch) -> torch.Tensor:
        """[B] reward-model scores at each sample's last token."""
        outs, part = self._map(batch, lambda mb: sequence_scores(self.model, mb, self.attention))
        return self._gather(batch, part, sample_out=torch.cat([o.cpu() for o in outs]))[1]
