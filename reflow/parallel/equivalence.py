"""Layout equivalence checks: a layout must give the numbers of the one-process engines.

Run on every rank of a `launch`ed world (tests, and a user checking a layout on their machine). For each
layout, every rank builds the one-process reference on its own copy of the model, then the same step
under the layout, and reports the largest differences in loss, updated weights and log-probs.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from reflow.algorithms.losses import sequence_nll
from reflow.data.batch import SampleBatch
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import TrainEngine
from reflow.models.load import load_policy
from reflow.models.packing import token_logprobs
from reflow.parallel.context import ParallelContext
from reflow.parallel.layout import Layout, validate_layout

# Adam's first step is lr * g / (|g| + eps); with eps far above |g| the update is proportional to g,
# so comparing weights after one step compares gradients (a tiny eps would compare only their signs).
LR, EPS = 1.0, 10.0


def sample_batch(n: int = 8, seed: int = 0) -> SampleBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 14, (n,), generator=g).tolist()
    seqs = [torch.randint(5, 261, (length,), generator=g) for length in lens]
    masks = [(torch.arange(length) >= 3).long() for length in lens]
    return SampleBatch.from_sequences(range(n), {"input_ids": seqs, "action_mask": masks})


def nll_loss(model, mb, norm):
    logp, _ = token_logprobs(model, mb)
    return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def check_layouts(rank: int, world: int, model_dir: str, layouts: list[str], micro_batch_tokens: int = 40) -> dict:
    """{layout: {"loss": |dloss|, "weights": max |dw|, "logprobs": max |dlogp|, "moved": max |w1 - w0|}}."""
    torch.manual_seed(0)
    batch = sample_batch()
    out = {}
    for text in layouts:
        layout = Layout.parse(text)
        ref_model = load_policy(model_dir)
        validate_layout(layout, ref_model.config, list(range(world)), world)
        before = full_params(ref_model)
        ref_logp, _ = InferenceEngine(ref_model, micro_batch_tokens).logprobs(batch)
        ref_engine = TrainEngine(ref_model, lr=LR, eps=EPS, grad_clip=1.0, micro_batch_tokens=micro_batch_tokens)
        ref_stats = ref_engine.step(batch, nll_loss)
        ref_after = full_params(ref_model)

        ctx = ParallelContext.build(layout)
        model = load_policy(model_dir)
        engine = TrainEngine(model, lr=LR, eps=EPS, grad_clip=1.0, micro_batch_tokens=micro_batch_tokens, parallel=ctx)
        logp, _ = InferenceEngine(engine.model, micro_batch_tokens, parallel=ctx).logprobs(batch)
        stats = engine.step(batch, nll_loss)
        after = full_params(engine.model)
        out[text] = {
            "loss": abs(stats["loss"] - ref_stats["loss"]),
            "grad_norm": abs(stats["grad_norm"] - ref_stats["grad_norm"]),
            "weights": max(float((after[n] - ref_after[n]).abs().max()) for n in ref_after),
            "logprobs": float((logp - ref_logp).abs().max()),
            "moved": max(float((ref_after[n] - before[n]).abs().max()) for n in before),
        }
    return out
