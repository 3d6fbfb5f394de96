"""`reflow rm`: a pairwise reward model (Bradley-Terry), as in InstructGPT / DeepSpeed-Chat step 2.

    L = -(1 / #pairs) * sum_pairs log sigmoid(s(prompt + chosen) - s(prompt + rejected))
s is the score head of a sequence-classification model at the last token. Saved as an HF
AutoModelForSequenceClassification folder that `reflow train reward.model=<folder>` uses.
"""

from __future__ import annotations

import torch

from reflow.algorithms.losses import pair_accuracy, pairwise_reward_loss
from reflow.config.schema import RMConfig
from reflow.data.batch import SampleBatch
from reflow.data.datasets import load_preferences
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import Norm
from reflow.experiments.common import seed_everything
from reflow.experiments.rl import train_engine_for
from reflow.experiments.supervised import SupervisedExperiment
from reflow.models.load import check_model_dir, load_reward_model, load_tokenizer
from reflow.models.packing import sequence_scores
from reflow.utils import checkpoint as ckpt_lib


def pair_batch(examples) -> SampleBatch:
    """Chosen and rejected sequences interleaved: sample 2i = chosen of pair i, 2i+1 = rejected; group_id = i."""
    seqs = [torch.tensor(e.prompt_ids + ids) for e in examples for ids in (e.chosen_ids, e.rejected_ids)]
    return SampleBatch.from_sequences(range(len(seqs)), {"input_ids": seqs},
                                      samples={"group_id": torch.arange(len(seqs)) // 2})


class RMExperiment(SupervisedExperiment):
    name = "rm"
    group_key = "group_id"
    curve_keys = ["loss", "accuracy", "eval/accuracy"]

    def __init__(self, cfg: RMConfig, resume=None):
        self.cfg = cfg
        resume_dir = ckpt_lib.find_resume(cfg.output_dir, resume) if resume else None
        check_model_dir(cfg.model.path, "model.path")
        self.tokenizer = load_tokenizer(cfg.model.path)
        pairs, self.skipped = load_preferences(cfg.data.train, self.tokenizer, max_len=cfg.data.max_len,
                                               on_bad_row=cfg.data.on_bad_row)
        self.examples, self.eval_pairs = self.split_held_out(pairs)  # held-out pairs measure ranking accuracy
        seed_everything(cfg.seed)
        self.model = load_reward_model(resume_dir / "model" if resume_dir else cfg.model.path, cfg.model.dtype)
        steps = cfg.max_steps or cfg.epochs * -(-len(self.examples) // cfg.batch_size)
        self.engine = train_engine_for(self.model, cfg.model, steps)
        self._setup_loop(resume_dir)

    def make_batch(self, examples) -> SampleBatch:
        return pair_batch(examples)

    def norm(self, batch):
        return Norm(tokens=float(batch.num_tokens), samples=len(batch) / 2)  # samples = pairs

    def loss_fn(self, model, mb, norm):
        s = sequence_scores(model, mb, self.cfg.model.attention)  # pairs stay whole: group_key = "group_id"
        return pairwise_reward_loss(s[0::2], s[1::2], norm.samples)

    def evaluate(self):
        if not self.eval_pairs:
            return {}
        s = InferenceEngine(self.model, self.cfg.model.micro_batch_tokens, self.cfg.model.attention).scores(
            pair_batch(self.eval_pairs))
        return {"eval/accuracy": pair_accuracy(s[0::2] - s[1::2]).mean().item(), "eval/margin": (s[0::2] - s[1::2]).mean().item()}
