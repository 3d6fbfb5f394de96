"""Layout equivalence checks: a layout must give the numbers of the one-process engines.

Run on every rank of a `launch`ed world (tests, and a user checking a layout on their machine). For each
layout, every rank builds the one-process reference on its own copy of the model, then the same step
under the layout, and reports the largest differences in loss, updated weights and log-probs.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from reflow.algorithms.losses import sequence_nll
from reflow.data.batch import SampleBatch
from reflow.engines.generate import GenerationEngine, SamplingParams
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import TrainEngine
from reflow.models.load import load_policy
from reflow.models.packing import AttentionSpec, token_logprobs
from reflow.parallel.context import ParallelContext
from reflow.parallel.layout import Layout, validate_layout

# Adam's first step is lr * g / (|g| + eps); with eps far above |g| the update is proportional to g,
# so comparing weights after one step compares gradients (a tiny eps would compare only their signs).
LR, EPS = 1.0, 10.0
# generation is compared greedy (the same argmax) and sampled (the same draws from the same seed)
SAMPLING = {"greedy": SamplingParams(8, greedy=True), "sampled": SamplingParams(8, temperature=0.9)}


def sample_batch(n: int = 8, seed: int = 0) -> SampleBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 14, (n,), generator=g).tolist()
    seqs = [torch.randint(5, 261, (length,), generator=g) for length in lens]
    masks = [(torch.arange(length) >= 3).long() for length in lens]
    return SampleBatch.from_sequences(range(n), {"input_ids": seqs, "action_mask": masks})


def group_batch(prompt_lens=(5, 7), response_lens=(2, 6, 3, 4), seed: int = 0, vocab: int = 261) -> SampleBatch:
    """GRPO-shaped: a prompt of each length in `prompt_lens`, each followed by responses of `response_lens`
    (random ids in [5, vocab)); group_id = the prompt's index, actions = the response tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs, masks, gids = [], [], []
    for gid, p in enumerate(prompt_lens):
        prompt = torch.randint(5, vocab, (p,), generator=g)
        for r in response_lens:
            seqs.append(torch.cat([prompt, torch.randint(5, vocab, (r,), generator=g)]))
            masks.append((torch.arange(p + r) >= p).long())
            gids.append(gid)
    return SampleBatch.from_sequences(range(len(seqs)), {"input_ids": seqs, "action_mask": masks},
                                      {"group_id": gids})


def nll_loss_under(attention):
    def nll_loss(model, mb, norm):
        logp, _ = token_logprobs(model, mb, attention=attention)
        return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}

    return nll_loss


nll_loss = nll_loss_under("padded")  # the engines' default attention


def full_params(model) -> dict[str, torch.Tensor]:
    """Unsharded parameters by their plain HF names (a pipeline stage holds only its own layers; the
    Recv/Send wrappers around a stage's boundary layers are dropped from the names)."""
    out = {}
    for n, p in model.named_parameters():
        n = n.replace(".recv_mod.layer.", ".").replace(".layer.", ".")
        out[n] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def scramble(model) -> None:
    """Random weights, the same on every rank (seed 3): a fresh preset repeats its last token greedily,
    scrambled weights make the outputs depend on the context, so that a wrong layout shows."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def compare_generation(ref, model, tok, prompts: list[list[int]], params: SamplingParams) -> tuple[bool, float]:
    """Generate with the one-process `ref` and with `model` from the same seed: (every prompt got the same
    tokens, max |difference| of the generated tokens' log-probs)."""
    a = GenerationEngine(ref, [tok.eos_token_id], tok.pad_token_id).generate(
        prompts, params, torch.Generator().manual_seed(7))
    b = GenerationEngine(model, [tok.eos_token_id], tok.pad_token_id).generate(
        prompts, params, torch.Generator().manual_seed(7))
    return (all(x.tokens == y.tokens for x, y in zip(a, b)),
            max(max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) for x, y in zip(a, b)))


def check_layouts(rank: int, world: int, model_dir: str, layouts: list[str], micro_batch_tokens: int = 40,
                  share_prefix: bool = False) -> dict:
    """{layout: {"loss": |dloss|, "grad_norm": |dnorm|, "weights": max |dw|, "logprobs": max |dlogp|,
    "replica_logprobs": max |dlogp| with data-parallel replicas (`shard_data=False`), "replica_sharded":
    whether that copy holds any FSDP2 module (it must not), "moved": max |w1 - w0|}}.
    With `share_prefix`, a batch of groups sharing prompts runs shared under the layout, against the
    one-process engines without sharing."""
    torch.manual_seed(0)
    batch = group_batch() if share_prefix else sample_batch()
    attention = AttentionSpec("padded", share_prefix=share_prefix)
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
        engine = TrainEngine(model, lr=LR, eps=EPS, grad_clip=1.0, micro_batch_tokens=micro_batch_tokens,
                             attention=attention, parallel=ctx)
        logp, _ = InferenceEngine(engine.model, micro_batch_tokens, attention, parallel=ctx).logprobs(batch)
        stats = engine.step(batch, nll_loss_under(attention))
        after = full_params(engine.model)
        # the same layout with data-parallel replicas instead of FSDP2 shards (generation/inference copies)
        replica = InferenceEngine(load_policy(model_dir), micro_batch_tokens, attention, parallel=ctx,
                                  parallelize=True, shard_data=False)
        replica_logp, _ = replica.logprobs(batch)
        out[text] = {
            "loss": abs(stats["loss"] - ref_stats["loss"]),
            "grad_norm": abs(stats["grad_norm"] - ref_stats["grad_norm"]),
            "weights": max(float((after[n] - ref_after[n]).abs().max()) for n in after),
            "logprobs": float((logp - ref_logp).abs().max()),
            "replica_logprobs": float((replica_logp - ref_logp).abs().max()),
            "replica_sharded": any(isinstance(m, FSDPModule) for m in replica.model.modules()),
            "moved": max(float((ref_after[n] - before[n]).abs().max()) for n in before),
        }
    return out


def check_generation(rank: int, world: int, model_dir: str, layout: str = "d1t2p1") -> dict:
    """Generation under a tensor-parallel layout vs one process: greedy tokens, and sampled tokens and
    log-probs with the same seed (every tensor-parallel rank samples the same token from the same logits)."""
    from reflow.models.load import load_tokenizer
    from reflow.parallel.parallelize import apply_tp

    ctx = ParallelContext.build(layout)
    tok = load_tokenizer(model_dir)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 261, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4)]
    out = {}
    for name, params in SAMPLING.items():
        ref = load_policy(model_dir)
        scramble(ref)
        tp_model = load_policy(model_dir)
        tp_model.load_state_dict(ref.state_dict())
        apply_tp(tp_model, ctx.sub_mesh("tp"))
        same, diff = compare_generation(ref, tp_model, tok, prompts, params)
        out[name] = {"same_tokens": same, "logprob_diff": diff}
    return out
