"""Inference engine: forward-only log-probs, values and rewards of a packed batch, micro-batched by tokens."""

from __future__ import annotations

import torch

from reflow.data.batch import SampleBatch
from reflow.models.packing import Layout, sequence_scores, token_logprobs, token_values


class InferenceEngine:
    def __init__(self, model: torch.nn.Module, micro_batch_tokens: int = 4096, layout: Layout = "padded"):
        self.model = model
        self.micro_batch_tokens = micro_batch_tokens
        self.layout = layout

    def _map(self, batch: SampleBatch, fn) -> list:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return [fn(mb) for mb in batch.micro_batches(self.micro_batch_tokens)]
        finally:
            self.model.train(was_training)

    def logprobs(self, batch: SampleBatch, temperature: float = 1.0, with_entropy: bool = False):
        """[T] log-probs of the batch's own tokens at action positions (and [T] entropy if asked)."""
        outs = self._map(batch, lambda mb: token_logprobs(self.model, mb, temperature=temperature,
                                                          with_entropy=with_entropy, layout=self.layout))
        logp = torch.cat([o[0].cpu() for o in outs])
        ent = torch.cat([o[1].cpu() for o in outs]) if with_entropy else None
        return logp, ent

    def values(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] values V(x_<t) at action positions, and [B] values of the whole sequences (for bootstrapping)."""
        def fn(mb):
            return token_values(self.model, mb, self.layout).cpu(), sequence_scores(self.model, mb, self.layout).cpu()
        outs = self._map(batch, fn)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def scores(self, batch: SampleBatch) -> torch.Tensor:
        """[B] reward-model scores at each sample's last token."""
        return torch.cat([o.cpu() for o in self._map(batch, lambda mb: sequence_scores(self.model, mb, self.layout))])
