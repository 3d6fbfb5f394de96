"""The step loop, written once for every experiment (RL, SFT, reward model, DPO) and both transports:

    resume -> [initial eval] -> for each step: sample indices -> executor.step -> KL control -> log
           -> eval every N -> checkpoint every M -> final eval -> final/ (HF folder) -> curves.png

An experiment (a subclass) says what its graph is, what a step's metadata is (which prompts or examples,
as dataset indices: the workers hold the data) and what state it adds to checkpoints; the executor runs
the graph under the plan, in this process (runtime.workers = 0) or on Ray workers. Checkpoints hold the
saved roles whole plus `trainer_state.pt` (step, samplers, KL coefficient), so a run written under any
plan or transport resumes under any other.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from reflow.config.loader import save_config
from reflow.runtime.executor import Executor, WorkerFailed
from reflow.runtime.graph import Graph
from reflow.runtime.calls import get_call
from reflow.runtime.fusion import check_fuse
from reflow.runtime.migrate import check_migration
from reflow.runtime.plan import Plan, PlanError, check_plan_workers, colocate, placements, resolve_plan
from reflow.runtime.roles import check_lora, config_key, role_config
from reflow.utils import checkpoint as ckpt_lib
from reflow.utils.console import RunConsole
from reflow.utils.failpoint import failpoint
from reflow.utils.metrics import MetricsLogger, read_metrics, truncate_metrics
from reflow.utils.plot import plot_curves

log = logging.getLogger("reflow")


def experiment_plan(cfg, graph: Graph, model_configs: dict | None = None) -> Plan:
    """The plan a run uses, checked before anything starts: runtime.plan on runtime.workers ranks; in one
    process every call at d1t1p1 on rank 0 (a built-in plan name is then moot; a plan file is an error,
    it would be silently ignored). Every call's implementation must be registered."""
    rt = cfg.runtime
    for call in [*graph.calls, *(graph.evals.calls if graph.evals is not None else [])]:
        get_call(call.impl)  # GraphError naming the implementation and the known ones
    if rt.workers == 0:
        if rt.plan not in ("colocate", "separate"):
            raise PlanError(f"runtime.plan={rt.plan} needs workers: set runtime.workers to its world size "
                            "(runtime.workers=0 runs every call in this process)")
        plan = colocate(graph, 1)
        plan.name = "one-process"
    else:
        plan = check_plan_workers(resolve_plan(rt.plan, graph, rt.workers), rt.workers)
    plan.validate(graph, model_configs)
    check_fuse(cfg, graph, plan)
    check_migration(cfg, graph, plan)
    check_lora(cfg, graph, placements(plan, graph))  # (placements also places the eval calls)
    return plan


class StepLoop:
    """Subclasses set: name, cfg, graph, samplers, main_role (the role exported as final/), total_steps,
    curve_keys, and implement step_meta(); they may extend after_step(), state_dict() / load_state_dict()."""

    name = "run"
    main_role = "actor"
    curve_keys: list[str] = ["loss"]

    # trainer settings, as each experiment's config names them
    @property
    def settings(self) -> dict:
        c = self.cfg
        t = getattr(c, "trainer", c)
        return {"eval_every": t.eval_every, "save_every": t.save_every, "tensorboard": t.tensorboard,
                "progress": t.progress, "keep": getattr(t, "keep_checkpoints", 2)}

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run per trained role (the LR schedules' length)."""
        return self.total_steps

    def step_meta(self) -> dict:
        raise NotImplementedError

    def after_step(self, metrics: dict) -> dict:
        return metrics

    def after_eval(self, metrics: dict) -> dict:
        """An evaluation's metrics, completed by the experiment (derived statistics) before they are logged."""
        return metrics

    restarts = 0  # times the workers were restarted after a failure (runtime.max_restarts), before this start
    last_checkpoint: Path | None = None  # the checkpoint this run committed last
    samplers: dict = {}  # name -> PromptSampler (their positions are saved with checkpoints)
    skipped_rows = 0  # bad data rows skipped while the experiment checked its data (data.on_bad_row=skip)

    def state_dict(self) -> dict:
        return {"samplers": {k: s.state_dict() for k, s in self.samplers.items()}, "experiment": self.name}

    def load_state_dict(self, state: dict) -> None:
        for k, s in self.samplers.items():
            if k in state["samplers"]:
                s.load_state_dict(state["samplers"][k])

    # ------------------------------------------------------------------ set-up
    def start(self, resume_dir: Path | None, model_configs: dict | None = None) -> None:
        """Validate the plan, start the executor (workers load their shards), restore the run state."""
        self.out = Path(self.cfg.output_dir)
        self.plan = experiment_plan(self.cfg, self.graph, model_configs)
        ckpt_lib.check_output_dir(self.out)
        self.step = 0
        self.history: list[dict] = []
        state = None
        if resume_dir is not None:
            state = ckpt_lib.load_state(resume_dir)
            lora = {r: config_key(self.cfg, r) for r in self.graph.trained_roles() if role_config(self.cfg, r).lora.rank}
            ckpt_lib.check_compatible(state, resume_dir, self.name, self.graph.trained_roles(), model_configs, lora)
            if "samplers" not in state:
                raise ckpt_lib.CheckpointError(f"--resume: '{resume_dir}' was written by an earlier version of reflow "
                                               "(no sampler state); start the run afresh")
        self.executor = Executor(self.cfg, self.graph, self.plan, self.optimizer_steps, resume_dir)
        self.resumed_rows = None
        if state is not None:
            self.step = state["step"]
            self.resumed_rows = state.get("metrics_rows")
            self.load_state_dict(state)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg, out, s = self.cfg, self.out, self.settings
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        self.plan.save(out / "plan.yaml")
        resumed = self.step > 0
        ckpt_lib.clean_partial(out)
        if resumed:  # drop rows logged after the checkpoint by the interrupted run
            truncate_metrics(out / "metrics.jsonl", self.step, self.resumed_rows)
        logger = self.logger = MetricsLogger(out, s["tensorboard"], append=resumed,
                                             purge_step=self.step + 1 if resumed else None)
        console = RunConsole(self.name, self.total_steps, enabled=s["progress"])
        if self.skipped_rows:
            console.print(f"skipped {self.skipped_rows} bad data rows (data.on_bad_row=skip)")
        log.info("%s", self.plan.table(self.graph))
        results: dict = {}

        def do_eval(step):
            m = self.executor.evaluate(step)
            if m:
                m = self.after_eval(m)
                logger.log(step, m)
                console.print(f"step {step:>4}  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None))
            return m

        try:
            with console:
                if not resumed:
                    results["initial_eval"] = do_eval(0)
                console.advance(self.step)
                while self.step < self.total_steps:
                    metrics = self.run_step()
                    logger.log(self.step, metrics)
                    console.step(self.step, metrics)
                    last = self.step == self.total_steps
                    if s["eval_every"] and self.step % s["eval_every"] == 0 and not last:
                        do_eval(self.step)
                    if (s["save_every"] and self.step % s["save_every"] == 0) or last:
                        with ckpt_lib.write_errors(ckpt_lib.checkpoint_dir(out, self.step), out):
                            self.save_checkpoint()
                results["final_eval"] = do_eval(self.step)
            with ckpt_lib.write_errors(out / "final", out):
                self.export_final()
        finally:
            logger.close()
            if cfg.runtime.timeline:
                self.executor.write_timeline(out / "timeline.json")
        plot_curves(read_metrics(out / "metrics.jsonl"), self.curve_keys, out / "curves.png",
                    title=f"{self.name}: {out}")
        return results

    @property
    def logged_rows(self) -> int:
        """Rows in metrics.jsonl so far (a checkpoint records them: a resumed run drops the rest)."""
        logger = getattr(self, "logger", None)
        return logger.rows if logger is not None else 0

    def run_step(self) -> dict:
        """One step of the graph (no logging, evaluation or checkpoint): its metrics, also kept in `history`."""
        t0 = time.perf_counter()
        return self.finish_step(self.executor.step(self.step, self.step_meta()), t0)

    def finish_step(self, metrics: dict, t0: float) -> dict:
        """A step's metrics, completed (time/step since t0, after_step), counted and kept in `history`."""
        metrics["time/step"] = time.perf_counter() - t0
        if self.restarts:
            metrics["run/restarts"] = float(self.restarts)
        metrics = self.after_step(metrics)
        self.step += 1
        self.history.append(metrics)
        return metrics

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of this step into a temporary folder and rename it when complete (a kill at
        any moment leaves the previous checkpoints and no half-written one), then keep the newest K."""
        tmp = ckpt_lib.begin_checkpoint(self.out, self.step)
        tag = ckpt_lib.checkpoint_name(tmp)
        self.executor.save(tmp)
        failpoint(f"checkpoint.models.{tag}")
        ckpt_lib.save_state(tmp, {"step": self.step, "plan": self.plan.to_dict(), "metrics_rows": self.logged_rows,
                                  **self.state_dict()})
        failpoint(f"checkpoint.state.{tag}")
        later = [p for s, p in ckpt_lib.list_checkpoints(self.out) if s > self.step]
        if later:  # resumed from an earlier checkpoint: the later ones belong to the abandoned run
            log.warning("discarding %d checkpoint(s) after step %d, written by the run this one resumed "
                        "from an earlier point: %s", len(later), self.step, ", ".join(p.name for p in later))
            for p in later:
                ckpt_lib.discard(p)
        d = ckpt_lib.commit_checkpoint(tmp)
        self.last_checkpoint = d
        failpoint(f"checkpoint.commit.{tag}")
        ckpt_lib.prune(self.out, self.settings["keep"])
        return d

    def export_final(self) -> None:
        """final/: the main role's weights as an HF folder (and final_ema/ with an EMA of them)."""
        tmp = self.out / ".final.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        self.executor.save(tmp, optimizer=False, roles=[self.main_role])
        for src, dst in ((self.main_role, "final"), (f"ema_{self.main_role}", "final_ema")):
            if (tmp / src).is_dir():  # the new folder replaces the old one by renames: never half a model
                old = self.out / f".{dst}.old"
                shutil.rmtree(old, ignore_errors=True)
                if (self.out / dst).exists():
                    (self.out / dst).rename(old)
                (tmp / src).rename(self.out / dst)
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def shutdown(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()
            self.executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def run_with_restarts(make: Callable[[str | bool | None], StepLoop], resume: str | bool | None = None):
    """make(resume) -> a started experiment; run it -> (experiment, results). When a worker dies or hangs
    (WorkerFailed), start again from the last complete checkpoint (from scratch when there is none yet), up
    to runtime.max_restarts times; other errors (bad input, a non-finite loss with on_nonfinite=stop) end
    the run, since running again would fail again."""
    restarts = 0
    while True:
        exp = make(resume)
        exp.restarts = restarts
        try:
            with exp:
                return exp, exp.run()
        except WorkerFailed as e:
            if restarts >= exp.cfg.runtime.max_restarts:
                raise
            restarts += 1
            # the checkpoint this run wrote last, else where it started: never a later one of another run
            resume = str(exp.last_checkpoint) if exp.last_checkpoint is not None else resume
            log.warning("%s\nrestarting the workers (%d of runtime.max_restarts=%d) from %s", str(e).splitlines()[0],
                        restarts, exp.cfg.runtime.max_restarts, resume if resume else "the start")
