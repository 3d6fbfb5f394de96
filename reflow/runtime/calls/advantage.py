"""Advantage-model calls (`reflow am`; the loss is reflow/algorithms/advantage_model.py):

    sample_sft  the frozen SFT policy ("actor") samples K = samples_per_prompt responses for the prompt of
                each of the step's pairs (meta["examples"]), or of every held-out pair (options["dataset"]);
                sample j of pair i has id i*K + j and group_id i; keyed sampling on (seed, step, id), so
                every plan samples the same tokens (evaluation keys on options["key_step"]: the same samples
                at every evaluation)
    train_am    one optimizer step of the AM on the step's pairs and those samples:
                L = L_BT + centre_coef * L_centre + bound_coef * L_bound
    eval_am     held-out pairs: eval/accuracy, eval/margin as `reflow rm` reports them, and the scores of the
                SFT samples: eval/prompt_mean_abs = mean over prompts of |mean_k s(x, y'_k)| (0 when centred),
                per task t: eval/score_mean/<t> and eval/score_sq/<t> (the experiment turns the second moment
                into eval/score_std/<t>)

An AM batch holds, per pair i (group i, never split over micro-batches or replicas): its chosen and rejected
sequences, then its K samples; samples["kind"] [N] (CHOSEN / REJECTED / SAMPLED), ["bound_w"] [N].
"""

from __future__ import annotations

import torch

from reflow.algorithms.advantage_model import CHOSEN, REJECTED, SAMPLED, advantage_model_loss, bound_weights
from reflow.algorithms.aggregation import Norm
from reflow.algorithms.losses import pair_accuracy
from reflow.data.batch import SampleBatch
from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
from reflow.engines.infer import InferenceEngine
from reflow.models.packing import attention_spec, sequence_scores
from reflow.runtime.calls import CallContext, register_call
from reflow.runtime.calls.rollout import replica_share
from reflow.runtime.calls.supervised import examples


def task_of(row) -> str:
    """The task label of a preference row: its `task` column, or "all" without one."""
    t = row.meta.get("task")
    return "all" if t is None else str(t)


def am_batch(rows, sampled: SampleBatch | None) -> SampleBatch:
    """Pairs + the SFT samples of their prompts -> one AM batch (module docstring); meta["task"] per sequence."""
    per_group: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    if sampled is not None:
        ids = torch.split(sampled.tokens["input_ids"], sampled.seqlens.tolist())
        masks = torch.split(sampled.tokens["action_mask"], sampled.seqlens.tolist())
        for g, x, m in zip(sampled.samples["group_id"].tolist(), ids, masks):
            per_group.setdefault(g, []).append((x, m))
    seqs, acts, kinds, groups, tasks = [], [], [], [], []
    for i, r in enumerate(rows):
        p = len(r.prompt_ids)
        for kind, resp in ((CHOSEN, r.chosen_ids), (REJECTED, r.rejected_ids)):
            seqs.append(torch.tensor(r.prompt_ids + resp))
            acts.append(torch.tensor([0] * p + [1] * len(resp)))
            kinds.append(kind)
        for x, m in per_group.get(i, []):
            seqs.append(x)
            acts.append(m)
            kinds.append(SAMPLED)
        groups += [i] * (len(seqs) - len(groups))
        tasks += [task_of(r)] * (len(seqs) - len(tasks))
    return SampleBatch.from_sequences(range(len(seqs)), {"input_ids": seqs, "action_mask": acts},
                                      samples={"kind": torch.tensor(kinds), "group_id": torch.tensor(groups),
                                               "bound_w": bound_weights(tasks)},
                                      meta={"task": tasks})


@register_call("sample_sft")
def sample_sft(cc: CallContext, batch: SampleBatch | None) -> SampleBatch | None:
    cfg, tok, o = cc.cfg, cc.tokenizer, cc.call.options
    rows = examples(cc, o.get("dataset", "pairs"))
    k = cfg.samples_per_prompt
    prompts = [r.prompt_ids for r in rows for _ in range(k)]
    a, b = replica_share(len(prompts), cc.ctx)
    if b <= a:
        return None
    engine = GenerationEngine(cc.model, [tok.eos_token_id], tok.pad_token_id, min(256, len(prompts)))
    gens = engine.generate(prompts[a:b], SamplingParams(cfg.max_new_tokens, cfg.temperature), keys=range(a, b),
                           seed=sample_seed(cfg.seed, o.get("key_step", cc.step)))
    part = SampleBatch.from_sequences(
        range(a, b),
        {"input_ids": [torch.tensor(g.prompt_ids + g.tokens) for g in gens],
         "action_mask": [torch.tensor([0] * len(g.prompt_ids) + [1] * len(g.tokens)) for g in gens]},
        samples={"group_id": torch.arange(a, b) // k})
    tp_first = cc.ctx is None or cc.ctx.tp_rank == 0
    return part if tp_first else None  # one part per replica


@register_call("train_am")
def train_am(cc: CallContext, batch: SampleBatch | None) -> dict:
    cfg = cc.cfg
    attention = attention_spec(cc.worker.role_config(cc.call.role))
    rows = examples(cc, "pairs")
    b = am_batch(rows, batch)

    def loss_fn(model, mb, norm):
        s = sequence_scores(model, mb, attention)  # whole groups per micro-batch: group_key = "group_id"
        return advantage_model_loss(s, mb.samples["kind"].to(s.device), mb.samples["group_id"].to(s.device),
                                    mb.samples["bound_w"], pairs=norm.samples, centre_coef=cfg.centre_coef,
                                    bound_coef=cfg.bound_coef)

    norm = Norm(tokens=float(b.num_tokens), samples=float(len(rows)))  # samples = pairs = prompts
    return {**cc.train_step(b, loss_fn, norm, "group_id"), "tokens": float(b.num_tokens)}


@register_call("eval_am")
def eval_am(cc: CallContext, batch: SampleBatch | None) -> dict | None:
    rows = cc.data.eval_pairs
    if not rows:  # a held-out share too small to hold a pair
        return None
    mcfg = cc.worker.role_config(cc.call.weights)
    b = am_batch(rows, batch)
    s = InferenceEngine(cc.model, mcfg.micro_batch_tokens, attention_spec(mcfg), parallel=cc.ctx).scores(b)
    if not cc.first:
        return None
    kind, group = b.samples["kind"], b.samples["group_id"]
    margin = s[kind == CHOSEN] - s[kind == REJECTED]
    out = {"eval/accuracy": [pair_accuracy(margin).sum().item(), len(margin)],
           "eval/margin": [margin.sum().item(), len(margin)]}
    sampled = kind == SAMPLED
    if sampled.any():
        uniq, inv = torch.unique(group[sampled], return_inverse=True)
        means = torch.zeros(len(uniq)).index_add(0, inv, s[sampled]) / torch.bincount(inv).float()
        out["eval/prompt_mean_abs"] = [means.abs().sum().item(), len(uniq)]
        tasks = [t for t, m in zip(b.meta["task"], sampled.tolist()) if m]
        for t in sorted(set(tasks)):
            st = s[sampled][torch.tensor([x == t for x in tasks])]
            out[f"eval/score_mean/{t}"] = [st.sum().item(), len(st)]
            out[f"eval/score_sq/{t}"] = [(st ** 2).sum().item(), len(st)]
    return out
