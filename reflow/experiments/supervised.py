"""Supervised experiments on the step loop: `reflow sft`, `reflow rm`, `reflow am`, `reflow dpo`. Each is a graph
of one train call (DPO: the reference's log-probs, then the train call; AM: the SFT policy's samples, then the
train call; reflow.runtime.graphs), so they take
runtime.workers and a plan like `reflow train` (e.g. SFT with FSDP2 over 4 workers: runtime.workers=4
runtime.plan=colocate) and give the one-process numbers.

    sft  L = -(1 / #response tokens) sum log pi(response | prompt)                 (final/: the policy)
    rm   L = -(1 / #pairs) sum log sigmoid(s(chosen) - s(rejected))                 (final/: the reward model)
    am   L = L_BT + centre_coef * L_centre + bound_coef * L_bound                   (final/: the advantage model,
         reflow/algorithms/advantage_model.py)                                       marked by advantage_model.json)
    dpo  L = -log sigmoid(beta h), h = log-ratio margin of chosen over rejected      (final/: the policy)
"""

from __future__ import annotations

import json
import math

from reflow.config.schema import AMConfig, DPOConfig, RMConfig, SFTConfig
from reflow.data.sampler import PromptSampler
from reflow.experiments.loop import StepLoop
from reflow.runtime.roles import model_configs
from reflow.models.load import AM_MARKER, check_model_dir, check_same_tokenizer, load_tokenizer
from reflow.runtime.data import WorkerData
from reflow.runtime.graphs import graph_for
from reflow.utils import checkpoint as ckpt_lib


def supervised_steps(cfg, num_examples: int) -> int:
    """Optimizer steps of a supervised run: max_steps, else epochs over the examples in batches."""
    return cfg.max_steps or cfg.epochs * -(-num_examples // cfg.batch_size)


class SupervisedExperiment(StepLoop):
    dataset = "sft"  # the WorkerData attribute a step samples from

    def __init__(self, cfg, resume=None):
        self.cfg = cfg
        resume_dir = ckpt_lib.find_resume(cfg.output_dir, resume) if resume else None
        check_model_dir(cfg.model.path, "model.path")
        tokenizer = load_tokenizer(cfg.model.path)
        for key in ("ref", "policy"):  # DPO's reference, the AM's SFT policy
            if getattr(cfg, key, None) is not None:
                check_same_tokenizer(tokenizer, "model.path", cfg.model.path, {f"{key}.path": getattr(cfg, key).path})
        self.graph = graph_for(cfg)
        data = WorkerData(cfg, tokenizer)  # bad rows fail here, before models load
        examples = getattr(data, self.dataset)
        if self.graph.evals is not None and any(c.impl == "eval_generate" for c in self.graph.evals.calls):
            _ = data.eval_prompts  # bad rows fail now
        self.skipped_rows = data.skipped
        self.total_steps = supervised_steps(cfg, len(examples))
        self.samplers = {"examples": PromptSampler(len(examples), cfg.seed, cfg.data.shuffle)}
        self.start(resume_dir, model_configs(cfg, self.graph))

    def step_meta(self) -> dict:
        return {"examples": self.samplers["examples"].next(self.cfg.batch_size)}

    def after_step(self, metrics: dict) -> dict:
        metrics["throughput/tokens_per_s"] = metrics.pop("tokens", 0.0) / metrics["time/step"]
        return metrics


class SFTExperiment(SupervisedExperiment):
    name = "sft"
    curve_keys = ["loss", "eval/accuracy"]

    def __init__(self, cfg: SFTConfig, resume=None):
        super().__init__(cfg, resume)


class RMExperiment(SupervisedExperiment):
    name = "rm"
    main_role = "reward"
    dataset = "pairs"
    curve_keys = ["loss", "accuracy", "eval/accuracy"]

    def __init__(self, cfg: RMConfig, resume=None):
        super().__init__(cfg, resume)


class AMExperiment(SupervisedExperiment):
    """`reflow am`: final/ is a reward-model folder (`reward.model=` takes it) with advantage_model.json: the
    policy it is centred on, its coefficients, and per task the mean and std of its scores of SFT samples of
    the held-out prompts at the final evaluation."""

    name = "am"
    main_role = "reward"
    dataset = "pairs"
    curve_keys = ["loss", "bt_loss", "centre", "accuracy", "eval/accuracy", "eval/prompt_mean_abs"]

    def __init__(self, cfg: AMConfig, resume=None):
        super().__init__(cfg, resume)

    def after_eval(self, metrics: dict) -> dict:
        """eval/score_sq/<t> (second moment) -> eval/score_std/<t>."""
        for k in [k for k in metrics if k.startswith("eval/score_sq/")]:
            t, sq = k[len("eval/score_sq/"):], metrics.pop(k)
            mean = metrics.get(f"eval/score_mean/{t}")
            if sq is not None and mean is not None:
                metrics[f"eval/score_std/{t}"] = math.sqrt(max(sq - mean * mean, 0.0))
        return metrics

    def run(self) -> dict:
        results = super().run()
        final = results.get("final_eval") or {}
        cfg = self.cfg
        prefix = "eval/score_mean/"
        tasks = {k[len(prefix):]: {"mean": v, "std": final.get(f"eval/score_std/{k[len(prefix):]}")}
                 for k, v in final.items() if k.startswith(prefix)}
        record = {"kind": "advantage_model", "policy": cfg.policy.path or cfg.model.path,
                  "samples_per_prompt": cfg.samples_per_prompt, "centre_coef": cfg.centre_coef,
                  "bound_coef": cfg.bound_coef, "eval_accuracy": final.get("eval/accuracy"),
                  "prompt_mean_abs": final.get("eval/prompt_mean_abs"), "tasks": tasks}
        (self.out / "final" / AM_MARKER).write_text(json.dumps(record, indent=1) + "\n")
        return results


class DPOExperiment(SupervisedExperiment):
    name = "dpo"
    dataset = "pairs"
    curve_keys = ["loss", "accuracy", "eval/pair_accuracy", "eval/accuracy"]

    def __init__(self, cfg: DPOConfig, resume=None):
        super().__init__(cfg, resume)
