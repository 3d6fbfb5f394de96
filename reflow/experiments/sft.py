"""`reflow sft`: supervised fine-tuning on (prompt, response) pairs; loss on response tokens only.

    L = -(1 / #response tokens) * sum_i sum_{t in response_i} log pi(x_t | x_<t)
"""

from __future__ import annotations

import torch

from reflow.config.schema import SFTConfig
from reflow.data.batch import SampleBatch
from reflow.data.datasets import load_sft
from reflow.algorithms.losses import sequence_nll
from reflow.experiments.common import evaluate, seed_everything
from reflow.experiments.rl import train_engine_for
from reflow.experiments.supervised import SupervisedExperiment
from reflow.models.load import check_model_dir, load_policy, load_tokenizer
from reflow.models.packing import token_logprobs
from reflow.utils import checkpoint as ckpt_lib


class SFTExperiment(SupervisedExperiment):
    name = "sft"
    curve_keys = ["loss", "eval/accuracy"]

    def __init__(self, cfg: SFTConfig, resume=None):
        self.cfg = cfg
        resume_dir = ckpt_lib.find_resume(cfg.output_dir, resume) if resume else None
        check_model_dir(cfg.model.path, "model.path")
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.examples, self.skipped = load_sft(cfg.data.train, self.tokenizer, max_len=cfg.data.max_len,
                                               on_bad_row=cfg.data.on_bad_row)
        self.eval_set = self.load_eval_prompts()
        seed_everything(cfg.seed)
        self.model = load_policy(resume_dir / "model" if resume_dir else cfg.model.path, cfg.model.dtype)
        steps = cfg.max_steps or cfg.epochs * -(-len(self.examples) // cfg.batch_size)
        self.engine = train_engine_for(self.model, cfg.model, steps)
        self._setup_loop(resume_dir)

    def make_batch(self, examples) -> SampleBatch:
        return SampleBatch.from_sequences(
            range(len(examples)),
            {"input_ids": [torch.tensor(e.prompt_ids + e.response_ids) for e in examples],
             "action_mask": [torch.tensor([0] * len(e.prompt_ids) + [1] * len(e.response_ids)) for e in examples]})

    def loss_fn(self, model, mb, norm):
        logp, _ = token_logprobs(model, mb, attention=self.cfg.model.attention)
        return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}

    def evaluate(self):
        if not self.eval_set:
            return {}
        r = evaluate(self.model, self.tokenizer, self.eval_set, max_new_tokens=self.cfg.eval_max_new_tokens)
        return r.metrics()
