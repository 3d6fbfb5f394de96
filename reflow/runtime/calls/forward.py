"""Forward-only calls on a packed batch (micro-batched by tokens, split over the data-parallel replicas):

    logprobs   tokens[out] [T] = log softmax(logits / T_rollout)[x_t] at action positions (0 elsewhere)
               (the reference's `ref_logprobs`, the behaviour policy's `old_logprobs`)
    values     tokens["values"] [T] = V(x_<t) at action positions; samples["last_values"] [B] = V(whole sequence)
"""

from __future__ import annotations

from reflow.data.batch import SampleBatch
from reflow.engines.infer import InferenceEngine
from reflow.models.packing import attention_spec
from reflow.runtime.calls import CallContext, register_call


def engine(cc: CallContext) -> InferenceEngine:
    mcfg = cc.worker.role_config(cc.call.weights)
    return InferenceEngine(cc.model, mcfg.micro_batch_tokens, attention_spec(mcfg), parallel=cc.ctx)


@register_call("logprobs", per_sample=True)
def logprobs(cc: CallContext, batch: SampleBatch) -> SampleBatch:
    temperature = cc.cfg.rollout.temperature if hasattr(cc.cfg, "rollout") else 1.0
    return batch.with_tokens(**{cc.output_key(): engine(cc).logprobs(batch, temperature)[0]})


@register_call("values", per_sample=True)
def values(cc: CallContext, batch: SampleBatch) -> SampleBatch:
    tok, last = engine(cc).values(batch)
    return batch.with_tokens(**{cc.output_key(0): tok}).with_samples(**{cc.output_key(1): last})
