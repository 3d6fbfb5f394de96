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

Inter-stage fusion (fusion.inter_stage): a generate call with per-sample consumers (`streamed`) runs as a
stream; the controller follows its chunks and submits each to the consumers as soon as it is complete, so on
workers the consumers run while the long tail still generates (the transports say where the overlap comes
from). The consumers' chunks merge back into the whole batch, in sample-id order, for the train calls.

The plan's fused pair (`fuse: [a, b]`) is submitted as one task per rank at the later call's place in the
order (the graph's order is a topological one, so both calls' inputs are ready; nothing reads their output);
each rank returns each call's data and info handles, so metrics and times are per call as when run apart.

Transports (runtime.workers): 0 = one local worker in this process (the plan is every call d1t1p1 on
rank 0), N = N Ray workers (an embedded Ray, or a cluster at runtime.ray_address).
"""

from __future__ import annotations

import json
from pathlib import Path

from reflow.runtime.calls import get_stream, is_per_sample
from reflow.runtime.graph import Graph
from reflow.runtime.plan import Plan, needs_copy, placements
from reflow.runtime.transport import LocalTransport, RayTransport, WorkerFailed  # noqa: F401 (re-exported)
from reflow.runtime.worker import Worker


def streamed(graph: Graph, names: list[str]) -> dict[str, list[str]]:
    """Inter-stage fusion: {generate call: the calls among `names` that run on its chunks}. A call runs on chunks
    when it is an infer call whose implementation works per sample and it reads that generate call's output
    only (train calls and group-level calls wait for the whole batch); a generate call streams when it has a
    streaming implementation and such consumers."""
    out: dict[str, list[str]] = {}
    for name in names:
        call = graph.call(name)
        if call.kind != "generate" or get_stream(call.impl) is None:
            continue
        users = [n for n in names if graph.deps[n] == [name] and graph.call(n).kind == "infer"
                 and is_per_sample(graph.call(n).impl) and not graph.call(n).options.get("every")]
        if users:
            out[name] = users
    return out


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

    def _submit_call(self, graph: Graph, name: str, step: int, meta: dict, refs: list, parts: list,
                     pending: list, send: bool = True) -> list:
        """Submit one call (or one chunk of it) on every rank of its mesh -> its data handles, one per rank."""
        if send:
            for r in self._senders(graph, name):
                pending.append((self.transport.send_weights(r, step, name), (f"{name}:send_weights", r)))
        outs = []
        for r in self.placements[name].ranks:
            data, info = self.transport.run(r, step, name, {**meta, "parts": parts}, *refs)
            pending.append((info, (name, r)))
            outs.append(data)
        return outs

    def submit(self, graph: Graph, names: list[str], step: int, meta: dict, outputs: dict[str, list],
               again: bool = False) -> list:
        """Submit the calls `names` of `graph` (in its order) for step `step`, without waiting; their inputs come
        from `outputs` (call -> data handles; calls submitted earlier, maybe by another submit) and their own
        data handles are added to it. `again`: each call runs once more on its own previous output instead
        (a partial rollout's later segments), which its new output replaces. Returns the pending info handles
        [(handle, (what, rank))] for collect().

        A generate call that streams (fusion.inter_stage, see `streamed`) is the one wait: the controller follows
        its chunks as they finish and submits each chunk to the consumers at once, so they run while the long
        tail still generates; their outputs are then the handles of all their chunks."""
        pending: list = []  # (info handle, (what, rank)), in submission order
        fusion = getattr(self.cfg, "fusion", None)
        streams = streamed(graph, names) if fusion is not None and fusion.inter_stage else {}
        chunked = {n for users in streams.values() for n in users}
        fuse = [n for n in self.plan.fuse if graph is self.graph]
        for name in names:
            call = graph.call(name)
            every = call.options.get("every")
            if name in chunked or (every and (step + 1) % every):
                continue
            if name in fuse:
                if name == max(fuse, key=graph.order.index):
                    self._submit_fused(graph, fuse, step, meta, outputs, pending)
                continue
            refs, parts = self._inputs(graph, [name] if again else graph.deps[name], outputs)
            if name in streams:
                self._stream(graph, name, step, {**meta, "parts": parts}, refs, streams[name], outputs, pending)
            else:
                outputs[name] = self._submit_call(graph, name, step, meta, refs, parts, pending)
        return pending

    @staticmethod
    def _inputs(graph: Graph, deps: list[str], outputs: dict[str, list]) -> tuple[list, list]:
        """(data handles of the producers `deps`, their "parts" [(prefix, count)] for the call's meta)."""
        refs = [ref for d in deps for ref in outputs[d]]
        parts = [(graph.call(d).prefix if i else "", len(outputs[d])) for i, d in enumerate(deps)]
        return refs, parts

    def _submit_fused(self, graph: Graph, names: list[str], step: int, meta: dict, outputs: dict[str, list],
                      pending: list) -> None:
        """The fused pair, one task per rank of the first call's ranks (the second's are the same, reordered)."""
        inputs = [self._inputs(graph, graph.deps[n], outputs) for n in names]
        refs = [ref for r, _ in inputs for ref in r]
        for n in names:
            outputs[n] = []
        for r in self.placements[names[0]].ranks:
            handles = self.transport.run_fused(r, step, names, [{**meta, "parts": parts} for _, parts in inputs],
                                               *refs)
            for i, n in enumerate(names):
                outputs[n].append(handles[i])
                pending.append((handles[len(names) + i], (n, r)))

    def _stream(self, graph: Graph, name: str, step: int, meta: dict, refs: list, users: list[str],
                outputs: dict[str, list], pending: list) -> None:
        """Run the generate call `name` as a stream and its `users` on each chunk as soon as it finishes."""
        for r in self._senders(graph, name):
            pending.append((self.transport.send_weights(r, step, name), (f"{name}:send_weights", r)))
        ranks = self.placements[name].ranks
        streams = [self.transport.run_stream(r, step, name, {**meta, "chunk_size": self.cfg.fusion.chunk}, *refs)
                   for r in ranks]
        outputs[name] = []
        # a consumer's chunk holds at least as many samples as it has data-parallel replicas (each gets one or
        # more): chunks wait in `held` until then, and until the samples still to come (known once each rank has
        # said how many it returns: their sum less those handed on, whichever rank hands them on, as long-tail
        # migration moves samples between ranks) can make the consumer's last chunk as big
        need = {n: self.placements[n].layout.d for n in users}
        held: dict[str, list] = {n: [] for n in users}  # (data handle, samples) not yet submitted
        done = {n: 0 for n in users}  # chunks submitted per consumer
        totals: list = [None] * len(streams)
        emitted = 0

        def submit_held(n: str) -> None:
            refs = [ref for ref, _ in held[n]]
            outputs[n] += self._submit_call(graph, n, step, {**meta, "chunk": done[n]}, refs, [("", len(refs))],
                                            pending, send=done[n] == 0)
            held[n], done[n] = [], done[n] + 1

        for n in users:
            outputs[n] = []
        for i, kind, value in self.transport.stream(streams, [(name, r) for r in ranks], pending,
                                                    self.cfg.runtime.timeout_s):
            if kind == "total":
                totals[i] = value
            elif kind == "end":
                pending.append((value, (name, ranks[i])))
            else:
                marker, data = value
                emitted += marker["samples"]
                outputs[name].append(data)
                for n in users:
                    held[n].append((data, marker["samples"]))
            coming = None if None in totals else sum(totals) - emitted
            for n in users:
                if sum(c for _, c in held[n]) >= need[n] and coming is not None and (coming == 0 or coming >= need[n]):
                    submit_held(n)
        for n in users:
            if held[n]:
                submit_held(n)
        for n in users:  # the copies of weights the chunks shared go
            pending += [(self.transport.call(r, "end_stream", n), (f"{n}:end_stream", r))
                        for r in self.placements[n].ranks]

    def collect(self, pending: list) -> dict:
        """Wait for submitted calls -> {"metrics": their merged metrics, "times": {call: seconds, slowest rank}}.
        A call run on chunks: its time on a rank is the sum over its chunks, its scalar metrics (counts) are
        summed over them."""
        infos = self.transport.wait(pending, self.cfg.runtime.timeout_s)
        sums: dict[str, list[float]] = {}
        scalars: dict[str, dict[str, float]] = {}  # call -> metric -> sum over its chunks (first rank)
        busy: dict[tuple[str, int], float] = {}
        for (_, (what, rank)), info in zip(pending, infos):
            busy[what, rank] = busy.get((what, rank), 0.0) + info["time"]
            first = rank == self.placements[what.split(":")[0]].ranks[0]
            for k, v in (info.get("metrics") or {}).items():
                if isinstance(v, (list, tuple)):  # partial sums from every replica: add up
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + v[0], acc[1] + v[1]
                elif first:
                    mine = scalars.setdefault(what, {})
                    mine[k] = mine[k] + v if k in mine and v is not None else v
        metrics = {k: v for mine in scalars.values() for k, v in mine.items()}
        metrics.update({k: (num / den if den else None) for k, (num, den) in sums.items()})
        times: dict[str, float] = {}
        for (what, _), t in busy.items():
            if ":" not in what:
                times[what] = max(times.get(what, 0.0), t)
        return {"metrics": metrics, "times": times}

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
        """Chrome-trace JSON: one row per worker, one slice per call (and per reallocation); a call streamed in
        chunks (fusion.inter_stage) has one slice per chunk, with args.chunk = its index (a generate call's
        slice k ends when it hands on chunk k); a replica's part in long-tail migration is a slice
        `<call>:migrate` with args.sent / args.received = the sample ids it handed over / adopted."""
        if not self.timeline:
            return
        t0 = min(e["start"] for e in self.timeline)
        events = [{"name": e["name"], "cat": f"step {e['step']}", "ph": "X", "pid": 0, "tid": e["rank"],
                   "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
                   **({"args": {**e.get("args", {}), **({"chunk": e["chunk"]} if "chunk" in e else {})}}
                      if "chunk" in e or "args" in e else {})} for e in self.timeline]
        events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"worker {r}"}}
                   for r in range(self.transport.size)]
        Path(path).write_text(json.dumps({"traceEvents": events}))

    def shutdown(self) -> None:
        self.transport.shutdown()
