"""The loop shared by supervised experiments (SFT, reward model): batches of examples, one optimizer
step each, periodic evaluation and checkpoints, resumable. Subclasses say how to build a batch,
what the loss is and how to evaluate."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from reflow.config.loader import save_config
from reflow.data.batch import SampleBatch
from reflow.engines.train import Norm
from reflow.experiments.common import PromptSampler
from reflow.models.load import save_model
from reflow.utils import checkpoint as ckpt_lib
from reflow.utils.console import RunConsole
from reflow.utils.metrics import MetricsLogger, read_metrics, truncate_metrics
from reflow.utils.plot import plot_curves


class SupervisedExperiment:
    name = "supervised"
    group_key: str | None = None  # samples sharing it stay in one micro-batch
    curve_keys: list[str] = ["loss"]

    # set by subclasses in __init__: cfg, tokenizer, model, engine, examples, resume_dir
    def _setup_loop(self, resume_dir: Path | None) -> None:
        cfg = self.cfg
        self.steps = cfg.max_steps or cfg.epochs * math.ceil(len(self.examples) / cfg.batch_size)
        self.sampler = PromptSampler(len(self.examples), cfg.seed, cfg.data.shuffle)
        self.step = 0
        if resume_dir:
            s = ckpt_lib.load_state(resume_dir)
            self.step = s["step"]
            self.engine.load_state_dict(s["engine"])
            self.sampler.load_state_dict(s["sampler"])
            ckpt_lib.set_rng_state(s["rng"])

    def load_eval_prompts(self) -> list:
        """The prompt set of `data.eval` (first `data.eval_size`), or [] when none is configured."""
        from reflow.data.datasets import load_prompts

        cfg = self.cfg
        if not cfg.data.eval:
            return []
        prompts, _ = load_prompts(cfg.data.eval, self.tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                  on_bad_row=cfg.data.on_bad_row)
        return prompts[: cfg.data.eval_size] if cfg.data.eval_size else prompts

    def split_held_out(self, examples: list) -> tuple[list, list]:
        """(train, held-out): a fixed, seeded `eval_fraction` share of the examples is held out."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        order = torch.randperm(len(examples), generator=g).tolist()
        n_eval = int(len(examples) * self.cfg.eval_fraction)
        return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]

    def make_batch(self, examples: list) -> SampleBatch:
        raise NotImplementedError

    def loss_fn(self, model, mb: SampleBatch, norm: Norm):
        raise NotImplementedError

    def norm(self, batch: SampleBatch) -> Norm | None:
        return None

    def evaluate(self) -> dict[str, float | None]:
        return {}

    def run(self) -> dict:
        cfg, out = self.cfg, Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        resumed = self.step > 0
        if resumed:
            truncate_metrics(out / "metrics.jsonl", self.step)
        logger = MetricsLogger(out, cfg.tensorboard, append=resumed)
        console = RunConsole(self.name, self.steps, enabled=cfg.progress)
        results = {}

        def do_eval(step):
            m = self.evaluate()
            if m:
                logger.log(step, m)
                console.print(f"step {step:>4}  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None))
            return m

        with console:
            if not resumed:
                results["initial_eval"] = do_eval(0)
            console.advance(self.step)
            while self.step < self.steps:
                t0 = time.perf_counter()
                batch = self.make_batch([self.examples[i] for i in self.sampler.next(cfg.batch_size)])
                metrics = self.engine.step(batch, self.loss_fn, self.norm(batch), self.group_key)
                dt = time.perf_counter() - t0
                metrics.update({"time/step": dt, "throughput/tokens_per_s": batch.num_tokens / dt})
                self.step += 1
                logger.log(self.step, metrics)
                console.step(self.step, metrics)
                last = self.step == self.steps
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    do_eval(self.step)
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    self.save_checkpoint()
            results["final_eval"] = do_eval(self.step)
        logger.close()
        save_model(self.model, self.tokenizer, out / "final")
        plot_curves(read_metrics(out / "metrics.jsonl"), self.curve_keys, out / "curves.png", title=f"{self.name}: {out}")
        return results

    def save_checkpoint(self) -> Path:
        d = ckpt_lib.checkpoint_dir(self.cfg.output_dir, self.step)
        save_model(self.model, self.tokenizer, d / "model")
        ckpt_lib.save_state(d, {"step": self.step, "engine": self.engine.state_dict(),
                                "sampler": self.sampler.state_dict(), "rng": ckpt_lib.rng_state()})
        ckpt_lib.prune(self.cfg.output_dir, 2)
        return d

