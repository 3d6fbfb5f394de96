"""The executor: runs an experiment's graph of calls under a plan, in this process or on Ray workers.

    executor = Executor(cfg, graph, plan, steps, resume)  # starts the workers, loads every role's shards
    metrics = executor.step(step, meta)                  # one step of the graph (meta: prompt / example indices,
                                                         # KL coefficient, ...); metrics of its calls + times
    metrics = executor.evaluate(step)                    # the graph's eval calls
    executor.save(folder)                                # saved roles, whole (any plan resumes from them)

Per step it submits every call in the graph's order to the ranks of the call's mesh (and, when the call
runs on a reallocated copy, a send task to the owner ranks outside that mesh). A worker runs its tasks in
submission order, so collectives on shared ranks never cross, and calls on disjoint meshes run at the same
time. A call's inputs are the data handles of its producers: in one process the batches themselves, on
Ray object references that workers resolve from each other. The executor fetches only the small info dict
every task returns (rank, seconds, metrics), never a batch.

The plan's fused pair (`fuse: [a, b]`) is submitted as one task per rank at the later call's place in the
order (the graph's order is a topological one, so both calls' inputs are ready; nothing reads their output);
each rank returns each call's data and info handles, so metrics and times are per call as when run apart.

Transports (runtime.workers): 0 = one local worker in this process (the plan is every call d1t1p1 on
rank 0), N = N Ray workers (an embedded Ray, or a cluster at runtime.ray_address).
"""

from __future__ import annotations

import json
from pathlib import Path

from reflow.runtime.graph import Graph
from reflow.runtime.plan import Plan, needs_copy, placements
from reflow.runtime.transport import LocalTransport, RayTransport, WorkerFailed  # noqa: F401 (re-exported)
from reflow.runtime.worker import Worker


class Executor:
    def __init__(self, cfg, graph: Graph, plan: Plan, optimizer_steps: int, resume_dir: Path | None = None):
        """optimizer_steps: of the whole run per trained role (the LR schedules' length)."""
        rt = cfg.runtime
        self.cfg, self.graph, self.plan = cfg, graph, plan
        resume = str(resume_dir) if resume_dir else None
        if rt.workers == 0:
            self.transport = LocalTransport(Worker(0, 1, cfg, plan, graph, optimizer_steps, resume), rt.timeout_s)
        else:
            self.transport = RayTransport(Worker, rt.workers,
                                          lambda r: (r, rt.workers, cfg, plan, graph, optimizer_steps, resume), rt)
        try:
            infos = self.transport.start()
        except BaseException:
            self.transport.shutdown()
            raise
        self.nodes = [i["node"] for i in infos]  # Ray node id of each rank (None in one process)
        self.placements = placements(plan, graph)
        self.timeline: list[dict] = []

    # ------------------------------------------------------------------ running calls
    def _senders(self, graph: Graph, name: str) -> list[int]:
        """Owner ranks of the call's weights outside its mesh: they send their shards when it needs a copy."""
        call, pl = graph.call(name), self.placements[name]
        if call.weights not in self.graph.weight_roles():
            return []
        owner = self.plan.owner(self.graph, call.weights)
        if not needs_copy(call.kind, pl, owner, call.weights in self.graph.trained_roles()):
            return []
        return [r for r in owner.ranks if r not in pl.ranks]

    def run_graph(self, graph: Graph, step: int, meta: dict) -> dict:
        """Every call of `graph` once -> {"metrics": merged metrics of its calls, "times": {call: seconds}}."""
        return self.collect(self.submit(graph, graph.order, step, meta, {}))

    def submit(self, graph: Graph, names: list[str], step: int, meta: dict, outputs: dict[str, list]) -> list:
        """Submit the calls `names` of `graph` (in its order) for step `step`, without waiting; their inputs come
        from `outputs` (call -> data handles; calls submitted earlier, maybe by another submit) and their own
        data handles are added to it. Returns the pending info handles [(handle, (what, rank))] for collect()."""
        pending: list = []  # (info handle, (what, rank)), in submission order
        fuse = [n for n in self.plan.fuse if graph is self.graph]
        for name in names:
            call = graph.call(name)
            every = call.options.get("every")
            if every and (step + 1) % every:
                continue
            if name in fuse:
                if name == max(fuse, key=graph.order.index):
                    self._submit_fused(graph, fuse, step, meta, outputs, pending)
                continue
            refs, m = self._inputs(graph, name, meta, outputs)
            for r in self._senders(graph, name):
                pending.append((self.transport.send_weights(r, step, name), (f"{name}:send_weights", r)))
            outs = []
            for r in self.placements[name].ranks:
                data, info = self.transport.run(r, step, name, m, *refs)
                pending.append((info, (name, r)))
                outs.append(data)
            outputs[name] = outs
        return pending

    def _inputs(self, graph: Graph, name: str, meta: dict, outputs: dict[str, list]) -> tuple[list, dict]:
        """(data handles of the call's producers, its meta with their "parts": [(prefix, count)])."""
        deps = graph.deps[name]
        refs = [ref for d in deps for ref in outputs[d]]
        parts = [(graph.call(d).prefix if i else "", len(outputs[d])) for i, d in enumerate(deps)]
        return refs, {**meta, "parts": parts}

    def _submit_fused(self, graph: Graph, names: list[str], step: int, meta: dict, outputs: dict[str, list],
                      pending: list) -> None:
        """The fused pair, one task per rank of the first call's ranks (the second's are the same, reordered)."""
        inputs = [self._inputs(graph, n, meta, outputs) for n in names]
        refs = [ref for r, _ in inputs for ref in r]
        for n in names:
            outputs[n] = []
        for r in self.placements[names[0]].ranks:
            handles = self.transport.run_fused(r, step, names, [m for _, m in inputs], *refs)
            for i, n in enumerate(names):
                outputs[n].append(handles[i])
                pending.append((handles[len(names) + i], (n, r)))

    def collect(self, pending: list) -> dict:
        """Wait for submitted calls -> {"metrics": their merged metrics, "times": {call: seconds, slowest rank}}."""
        infos = self.transport.wait(pending, self.cfg.runtime.timeout_s)
        metrics: dict = {}
        sums: dict[str, list[float]] = {}
        times: dict[str, float] = {}
        for (_, (what, rank)), info in zip(pending, infos):
            times[what] = max(times.get(what, 0.0), info["time"])
            first = rank == self.placements[what.split(":")[0]].ranks[0]
            for k, v in (info.get("metrics") or {}).items():
                if isinstance(v, (list, tuple)):  # partial sums from every replica: add up
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + v[0], acc[1] + v[1]
                elif first:
                    metrics[k] = v
        metrics.update({k: (num / den if den else None) for k, (num, den) in sums.items()})
        return {"metrics": metrics, "times": {k: v for k, v in times.items() if ":" not in k}}

    def step(self, step: int, meta: dict) -> dict:
        """One step of the graph -> its calls' metrics and `time/<call>` (slowest rank, reallocation included)."""
        return self.step_metrics(self.run_graph(self.graph, step, meta))

    def step_metrics(self, *collected: dict) -> dict:
        """collect() results of one step (its rollout and train phases, say) -> one row of metrics."""
        if self.cfg.runtime.timeline:
            self.timeline += self._timeline_events()
        out: dict = {}
        for c in collected:
            out.update(c["metrics"])
            for k, v in c["times"].items():  # a call run in several rounds: its total time
                out[f"time/{k}"] = out.get(f"time/{k}", 0.0) + v
        return out

    def evaluate(self, step: int) -> dict:
        if self.graph.evals is None:
            return {}
        return self.run_graph(self.graph.evals, step, {})["metrics"]

    def _all(self, method: str, *args) -> list[dict]:
        pending = [(self.transport.call(r, method, *args), (method, r)) for r in range(self.transport.size)]
        return self.transport.wait(pending, self.cfg.runtime.timeout_s)

    def save(self, folder: Path, optimizer: bool = True, roles: list[str] | None = None) -> None:
        """The saved roles (trained ones, and roles an update call changes; or only `roles`) as whole HF folders,
        with their optimizer states unless `optimizer=False`; the run state is the caller's."""
        folder.mkdir(parents=True, exist_ok=True)
        self._all("save", str(folder), optimizer, roles)

    # ------------------------------------------------------------------ timeline
    def _timeline_events(self) -> list[dict]:
        if isinstance(self.transport, LocalTransport):
            return self.transport.worker.timeline_events()
        return [e for events in self._all("timeline_events") for e in events]

    def write_timeline(self, path: Path) -> None:
        """Chrome-trace JSON: one row per worker, one slice per call (and per reallocation)."""
        if not self.timeline:
            return
        t0 = min(e["start"] for e in self.timeline)
        events = [{"name": e["name"], "cat": f"step {e['step']}", "ph": "X", "pid": 0, "tid": e["rank"],
                   "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6} for e in self.timeline]
        events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"worker {r}"}}
                   for r in range(self.transport.size)]
        Path(path).write_text(json.dumps({"traceEvents": events}))

    def shutdown(self) -> None:
        self.transport.shutdown()
