"""`reflow dpo`: direct preference optimisation from (prompt, chosen, rejected) pairs.

Each pair is two samples of a packed batch (2i = chosen, 2i+1 = rejected, group_id = i). The frozen
reference's sequence log-probs are computed once per batch (no grad); the policy's inside the loss:

    log pi(y | x) = sum over response tokens of log pi(y_t | x, y_<t)
    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    sigmoid: -log sigma(beta h)  (with label smoothing eps: -(1-eps) log sigma(beta h) - eps log sigma(-beta h))
    ipo    : (h - 1 / (2 beta))^2
"""

from __future__ import annotations

import torch

from reflow.algorithms.losses import dpo_loss, pair_accuracy
from reflow.config.schema import DPOConfig
from reflow.data.batch import SampleBatch
from reflow.data.datasets import load_preferences
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import Norm
from reflow.experiments.common import evaluate, seed_everything
from reflow.experiments.rl import train_engine_for
from reflow.experiments.supervised import SupervisedExperiment
from reflow.models.load import check_model_dir, load_policy, load_tokenizer
from reflow.models.packing import token_logprobs
from reflow.utils import checkpoint as ckpt_lib


def sequence_logprobs(token_logp: torch.Tensor, batch: SampleBatch) -> torch.Tensor:
    """[T] per-token log-probs (0 off the action mask) -> [B] per-sample sums."""
    return torch.zeros(len(batch), dtype=token_logp.dtype, device=token_logp.device).index_add_(
        0, batch.sample_index().to(token_logp.device), token_logp)


def preference_batch(examples) -> SampleBatch:
    """Chosen and rejected interleaved (2i, 2i+1), action_mask on the responses, group_id = pair index."""
    seqs, masks = [], []
    for e in examples:
        for resp in (e.chosen_ids, e.rejected_ids):
            seqs.append(torch.tensor(e.prompt_ids + resp))
            masks.append(torch.tensor([0] * len(e.prompt_ids) + [1] * len(resp)))
    return SampleBatch.from_sequences(range(len(seqs)), {"input_ids": seqs, "action_mask": masks},
                                      samples={"group_id": torch.arange(len(seqs)) // 2})


class DPOExperiment(SupervisedExperiment):
    name = "dpo"
    group_key = "group_id"  # a pair never straddles two micro-batches
    curve_keys = ["loss", "accuracy", "eval/pair_accuracy", "eval/accuracy"]

    def __init__(self, cfg: DPOConfig, resume=None):
        self.cfg = cfg
        resume_dir = ckpt_lib.find_resume(cfg.output_dir, resume) if resume else None
        check_model_dir(cfg.model.path, "model.path")
        if cfg.ref.path:
            check_model_dir(cfg.ref.path, "ref.path")
        self.tokenizer = load_tokenizer(cfg.model.path)
        pairs, self.skipped = load_preferences(cfg.data.train, self.tokenizer, max_len=cfg.data.max_len,
                                               on_bad_row=cfg.data.on_bad_row)
        self.examples, self.eval_pairs = self.split_held_out(pairs)  # held-out pairs measure ranking accuracy
        self.eval_set = self.load_eval_prompts()
        seed_everything(cfg.seed)
        self.model = load_policy(resume_dir / "model" if resume_dir else cfg.model.path, cfg.model.dtype)
        self.ref = load_policy(cfg.ref.path or cfg.model.path, cfg.ref.dtype).eval().requires_grad_(False)
        self.ref_engine = InferenceEngine(self.ref, cfg.ref.micro_batch_tokens, cfg.ref.attention)
        steps = cfg.max_steps or cfg.epochs * -(-len(self.examples) // cfg.batch_size)
        self.engine = train_engine_for(self.model, cfg.model, steps)
        self._setup_loop(resume_dir)

    def make_batch(self, examples) -> SampleBatch:
        batch = preference_batch(examples)
        ref_logp, _ = self.ref_engine.logprobs(batch)
        return batch.with_samples(ref_logp=sequence_logprobs(ref_logp, batch))

    def norm(self, batch):
        return Norm(tokens=float(batch.tokens["action_mask"].sum()), samples=len(batch) / 2)  # samples = pairs

    def loss_fn(self, model, mb, norm):
        logp, _ = token_logprobs(model, mb, attention=self.cfg.model.attention)
        seq = sequence_logprobs(logp, mb)
        ref = mb.samples["ref_logp"].to(seq.device)
        return dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], norm.samples, beta=self.cfg.beta,
                        kind=self.cfg.loss, label_smoothing=self.cfg.label_smoothing)

    def evaluate(self):
        out = {}
        if self.eval_pairs:
            batch = self.make_batch(self.eval_pairs)
            logp, _ = InferenceEngine(self.model, self.cfg.model.micro_batch_tokens, self.cfg.model.attention).logprobs(batch)
            h = sequence_logprobs(logp, batch) - batch.samples["ref_logp"]
            margin = h[0::2] - h[1::2]
            out["eval/pair_accuracy"] = pair_accuracy(margin).mean().item()
            out["eval/margin"] = (self.cfg.beta * margin).mean().item()
        if self.eval_set:
            out.update(evaluate(self.model, self.tokenizer, self.eval_set,
                                max_new_tokens=self.cfg.eval_max_new_tokens).metrics())
        return out
