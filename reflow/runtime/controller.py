"""The controller: one process that runs an experiment's graph, step by step, under a plan, on Ray workers.

    controller = Controller(cfg)           # validates graph + plan, starts Ray (embedded unless
    metrics = controller.train()           # runtime.ray_address) and one worker actor per device

Per step it submits every call in the graph's order to the workers of the call's mesh (and, when the
call needs a reallocated copy of its role's weights, a send task to the owner ranks outside that mesh).
Each worker runs its tasks in submission order, so collectives on shared ranks never cross, and calls on
disjoint meshes run at the same time. Inputs are passed as Ray object references of the producing
calls' outputs: samples move worker to worker through the object store; the controller itself sees only
references, the prompt indices and the scalar metrics that train calls return.

Failures: the controller waits on all of a step's tasks at once; the first that raises or whose worker
dies ends the run with that worker's error and traceback, and the other workers are killed (they may be
blocked in a collective with the dead one).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from reflow.config.loader import save_config
from reflow.config.schema import RLConfig
from reflow.experiments.common import PromptSampler
from reflow.algorithms.losses import AdaptiveKLController
from reflow.models.load import check_model_dir, load_tokenizer
from reflow.runtime.graphs import graph_for
from reflow.runtime.plan import PlanError, needs_copy, resolve_plan
from reflow.utils import checkpoint as ckpt_lib
from reflow.utils.metrics import MetricsLogger, truncate_metrics

log = logging.getLogger("reflow")


class WorkerFailed(RuntimeError):
    """A worker raised or died; the message carries its rank, the call and its traceback."""


def model_configs(cfg: RLConfig, graph) -> dict:
    """role -> HF config of its model (for validating layouts before anything starts)."""
    from transformers import AutoConfig

    paths = {"actor": cfg.actor.path, "ref": cfg.ref.path or cfg.actor.path,
             "critic": cfg.critic.path or cfg.actor.path, "reward": cfg.reward.model}
    out = {}
    for role in graph.roles:
        if paths.get(role):
            out[role] = AutoConfig.from_pretrained(check_model_dir(paths[role], f"{role} path"))
    return out


class Controller:
    def __init__(self, cfg: RLConfig, resume: str | bool | None = None):
        """resume: True / "latest" or a checkpoint folder; it may have been written under another plan."""
        import ray

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        resume_dir = ckpt_lib.find_resume(self.out, resume) if resume else None
        rt = cfg.runtime
        self.graph = graph_for(cfg)
        self.plan = resolve_plan(rt.plan, self.graph, rt.workers).validate(self.graph, model_configs(cfg, self.graph))
        if self.plan.world_size != rt.workers:
            raise PlanError(f"plan '{self.plan.name}' is for {self.plan.world_size} worker(s) but runtime.workers="
                            f"{rt.workers}; set runtime.workers={self.plan.world_size} or edit the plan")
        tok = load_tokenizer(cfg.actor.path)
        from reflow.data.datasets import load_prompts

        self.num_prompts = len(load_prompts(cfg.data.train, tok, max_prompt_len=cfg.data.max_prompt_len,
                                            on_bad_row=cfg.data.on_bad_row)[0])
        self.sampler = PromptSampler(self.num_prompts, cfg.seed, cfg.data.shuffle)
        self.kl_ctl = AdaptiveKLController(cfg.algo.kl_coef, cfg.algo.kl_target, cfg.algo.kl_horizon)
        self.step = 0
        if resume_dir is not None:
            state = ckpt_lib.load_state(resume_dir)
            if not state.get("runtime"):
                raise ckpt_lib.CheckpointError(f"--resume: '{resume_dir}' was written by the one-process loop "
                                               "(runtime.workers=0); resume it with runtime.workers=0")
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.kl_ctl.load_state_dict(state["kl"])
        self.timeline: list[dict] = []
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            # an embedded Ray (no set-up) on one machine, or join a cluster: `ray start --head` / --address
            ray.init(address=rt.ray_address, num_cpus=None if rt.ray_address else max(rt.workers, os.cpu_count() or 1),
                     include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}})
        from reflow.runtime.worker import Worker

        gpus = 1 if _cuda_available() else 0
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(Worker)
        self.workers = [actor_cls.remote(r, rt.workers, cfg, self.plan, rt.timeout_s, rt.threads_per_worker,
                                         str(resume_dir) if resume_dir else None, self.graph)
                        for r in range(rt.workers)]
        # (starting actors imports torch and transformers in each: slow on a loaded machine, not a hang)
        addr, port = ray.get(self.workers[0].endpoint.remote(), timeout=max(300.0, rt.timeout_s))
        self._wait({w.start.remote(addr, port): ("start", r) for r, w in enumerate(self.workers)})

    # ------------------------------------------------------------------ one step
    def run_step(self) -> dict:
        step = self.step
        prompt_idx = self.sampler.next(self.cfg.rollout.prompts_per_step)
        outputs: dict[str, list] = {}
        pending: dict = {}
        metric_refs = []
        t0 = time.time()
        for name in self.graph.order:
            call, pl = self.graph.call(name), self.plan.calls[name]
            keys = [k for k in call.inputs if k in outputs]
            meta = {"prompt_idx": prompt_idx, "kl_coef": self.kl_ctl.value, "parts": [len(outputs[k]) for k in keys]}
            refs = [ref for k in keys for ref in outputs[k]]
            owner = self.plan.owner(self.graph, call.role)
            if needs_copy(call.kind, pl, owner, call.role in self.graph.trained_roles()):
                for r in owner.ranks:  # owner ranks outside the call's mesh only send their shards
                    if r not in pl.ranks:
                        pending[self.workers[r].send_weights.remote(step, name)] = (name, r)
            outs = []
            for r in pl.ranks:
                ref = self.workers[r].run.remote(step, name, meta, *refs)
                pending[ref] = (name, r)
                outs.append(ref)
            for k in call.outputs:
                outputs[k] = outs
            if call.kind == "train":
                metric_refs.append(outs[0])
        self._wait(pending)
        import ray

        metrics: dict = {}
        for m in ray.get(metric_refs):
            metrics.update(m)
        if "actor/kl" in metrics:
            self.kl_ctl.update(metrics["actor/kl"], 1)
        step_time = time.time() - t0
        metrics.update({"kl_coef": self.kl_ctl.value, "time/step": step_time,
                        "throughput/samples_per_s": metrics.get("samples", 0.0) / step_time})
        if self.cfg.runtime.timeline:
            for events in ray.get([w.timeline_events.remote() for w in self.workers]):
                self.timeline.extend(events)
        self.step += 1
        return metrics

    def _wait(self, pending: dict) -> None:
        """Wait for all tasks; the first failure (an exception, or a dead worker) ends the run at once."""
        import ray

        left = list(pending)
        while left:
            done, left = ray.wait(left, num_returns=1, timeout=self.cfg.runtime.timeout_s + 30)
            if not done:
                stuck = sorted({pending[r] for r in left})
                self.shutdown()
                raise WorkerFailed(f"no progress for {self.cfg.runtime.timeout_s + 30:.0f} s; still waiting on "
                                   f"(call, rank): {stuck[:6]}")
            try:
                ray.get(done[0])
            except Exception:  # noqa: BLE001 - RayTaskError / ActorDiedError carry the worker's traceback
                # a dead worker fails all its tasks at once: report the first failed one in submission order
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
                for ref in (r for r in pending if r in set(ready)):
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001
                        what, rank = pending[ref]
                        self.shutdown()
                        raise WorkerFailed(f"worker {rank} failed in '{what}': {e}") from None

    # ------------------------------------------------------------------ the run
    def train(self) -> list[dict]:
        cfg = self.cfg
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        self.plan.save(out / "plan.yaml")
        if self.step > 0:  # resumed: drop rows logged after the checkpoint by the interrupted run
            truncate_metrics(out / "metrics.jsonl", self.step)
        logger = MetricsLogger(out, tensorboard=cfg.trainer.tensorboard, append=self.step > 0)
        history = []
        log.info("%s", self.plan.table(self.graph))
        try:
            while self.step < cfg.trainer.steps:
                m = self.run_step()
                logger.log(self.step, m)
                history.append(m)
                log.info("step %d/%d reward %.3f acc %.3f  %.2fs", self.step, cfg.trainer.steps,
                         m.get("reward/mean", 0.0), m.get("accuracy", 0.0), m["time/step"])
                every = cfg.trainer.save_every
                if (every and self.step % every == 0) or self.step == cfg.trainer.steps:
                    self.save()
        finally:
            logger.close()
            if cfg.runtime.timeline:
                self.write_timeline(out / "timeline.json")
        return history

    def save(self) -> Path:
        """A checkpoint of the trained roles (whole tensors: any plan resumes from it) and the run state."""
        ckpt = ckpt_lib.checkpoint_dir(self.out, self.step)
        ckpt.mkdir(parents=True, exist_ok=True)
        self._wait({w.save.remote(str(ckpt)): ("save", r) for r, w in enumerate(self.workers)})
        ckpt_lib.save_state(ckpt, {"runtime": True, "step": self.step, "sampler": self.sampler.state_dict(),
                                   "kl": self.kl_ctl.state_dict(), "plan": self.plan.to_dict()})
        ckpt_lib.prune(self.out, self.cfg.trainer.keep_checkpoints)
        return ckpt

    def write_timeline(self, path: Path) -> None:
        """Chrome-trace JSON: one row per worker, one slice per call (and per reallocation)."""
        if not self.timeline:
            return
        t0 = min(e["start"] for e in self.timeline)
        events = [{"name": e["name"], "cat": f"step {e['step']}", "ph": "X", "pid": 0, "tid": e["rank"],
                   "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6} for e in self.timeline]
        events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"worker {r}"}}
                   for r in range(len(self.workers))]
        Path(path).write_text(json.dumps({"traceEvents": events}))

    def shutdown(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []
        if self._own_ray and ray.is_initialized():
            ray.shutdown()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
