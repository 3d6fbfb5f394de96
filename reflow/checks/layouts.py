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
from reflow.models.load import load_critic, load_policy
from reflow.models.packing import AttentionSpec, token_logprobs, token_values
from reflow.parallel.context import ParallelContext, equal_micro_batches
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


def check_layouts(rank: int, world: int, model_dir: str, layouts: list[str], micro_batch_tokens: int = 40) -> dict:
    """{layout: {"loss": |dloss|, "grad_norm": |dnorm|, "weights": max |dw|, "logprobs": max |dlogp|,
    "replica_logprobs": max |dlogp| with data-parallel replicas (`shard_data=False`), "replica_sharded":
    whether that copy holds any FSDP2 module (it must not), "moved": max |w1 - w0|}}.
    A layout may carry options after colons: its pipeline schedule, "d1t1p2:gpipe" (default 1f1b; pipeline
    layouts also report "in_flight": {"peak": micro-batches this stage held at once, "micro_batches": M,
    "stage": s}), and "shared": a batch of groups sharing prompts runs with prefix sharing under the layout,
    against the one-process engines without sharing ("d2t1p1:shared")."""
    out = {}
    for text in layouts:
        layout_text, *options = text.split(":")
        layout = Layout.parse(layout_text)
        schedule = next((o for o in options if o != "shared"), "1f1b")
        share_prefix = "shared" in options
        torch.manual_seed(0)
        batch = group_batch() if share_prefix else sample_batch()
        attention = AttentionSpec("padded", share_prefix=share_prefix)
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
                             attention=attention, parallel=ctx, pipeline_schedule=schedule)
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
        stage = getattr(engine.model, "_reflow_stage", None)
        if stage is not None:
            micro_batches = len(equal_micro_batches(ctx, ctx.local_part(batch), micro_batch_tokens))
            out[text]["in_flight"] = {"peak": stage.peak_in_flight, "micro_batches": micro_batches,
                                      "stage": stage.stage}
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


def value_mse(model, mb, norm):
    """Squared error of the critic's values to 1 at action positions, a sum over the mini-batch's tokens."""
    values = token_values(model, mb, attention="padded")
    return ((values - 1.0) ** 2 * mb.tokens["action_mask"]).sum() / norm.tokens, {}


def critic_with_random_head(model_dir: str):
    critic = load_critic(model_dir)
    torch.manual_seed(5)  # a random head (a fresh one is zero), the same on every rank: the backbone gets gradients
    with torch.no_grad():
        critic.score.weight.normal_(0.0, 0.3)
    return critic


def check_fused(rank: int, world: int, model_dir: str, micro_batch_tokens: int = 12) -> dict:
    """Fused actor + critic training on p = world ranks (actor stages on ranks 0..p-1, critic stages reversed)
    vs each model's one-process step: {"actor" | "critic": {"loss", "grad_norm", "weights", "moved"}} as in
    `check_layouts`, and {"schedule": {"span", "sequential", "micro_batches", "peak": {model: held at once}}}."""
    from reflow.engines.fused_train import fused_train_step
    from reflow.parallel.fused import FusedSpec, search_fused, sequential_1f1b

    torch.manual_seed(0)
    batch = sample_batch()
    jobs = {"actor": (lambda: load_policy(model_dir), nll_loss),
            "critic": (lambda: critic_with_random_head(model_dir), value_mse)}
    ref = {}
    for name, (load, loss_fn) in jobs.items():
        model = load()
        before = full_params(model)
        engine = TrainEngine(model, lr=LR, eps=EPS, grad_clip=1.0, micro_batch_tokens=micro_batch_tokens)
        stats = engine.step(batch, loss_fn)
        ref[name] = (stats, full_params(model), before)
    layout, ranks = Layout(1, 1, world), list(range(world))
    engines = {name: TrainEngine(load(), lr=LR, eps=EPS, grad_clip=1.0, micro_batch_tokens=micro_batch_tokens,
                                 parallel=ParallelContext.build(layout, ranks if name == "actor" else ranks[::-1]))
               for name, (load, _) in jobs.items()}
    spec = FusedSpec.actor_critic(world, len(equal_micro_batches(None, batch, micro_batch_tokens)))
    schedule, span = search_fused(spec, memory_limit=world, iters=300)
    stats = fused_train_step({n: (engines[n], batch, jobs[n][1]) for n in jobs}, spec, schedule, memory_limit=world)
    out = {"schedule": {"span": span, "sequential": sequential_1f1b(spec)[1], "micro_batches": spec.m,
                        "peak": {n: e.model._reflow_stage.peak_in_flight for n, e in engines.items()}}}
    for name in jobs:
        ref_stats, ref_after, before = ref[name]
        after = full_params(engines[name].model)
        out[name] = {"loss": abs(stats[name]["loss"] - ref_stats["loss"]),
                     "grad_norm": abs(stats[name]["grad_norm"] - ref_stats["grad_norm"]),
                     "weights": max(float((after[n] - ref_after[n]).abs().max()) for n in after),
                     "moved": max(float((ref_after[n] - before[n]).abs().max()) for n in before)}
    out["nonfinite"] = fused_nonfinite_critic(engines, batch, world)
    return out


def fused_nonfinite_critic(engines: dict, batch, world: int) -> str | None:
    """A fused step (runtime.fusion.FusedCalls) whose critic loss is NaN under on_nonfinite="stop", each call's
    error named by its call as the worker names it: "ErrorType: message" of what the fused call raises."""
    from reflow.engines.train import NonFiniteError
    from reflow.runtime.fusion import FusedCalls

    fused = FusedCalls(("actor", "critic"), world)

    def nan_value(model, mb, norm):
        loss, stats = value_mse(model, mb, norm)
        return loss * float("nan"), stats

    def call(name, loss_fn):
        engines[name].on_nonfinite = "stop"
        step = fused.stepper(name, engines[name])

        def body():
            try:
                return step(batch, loss_fn, None, None, ())
            except NonFiniteError as e:
                raise NonFiniteError(f"call '{name}': {e}") from None

        return body

    try:
        fused.run({"actor": call("actor", nll_loss), "critic": call("critic", nan_value)})
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return None
