"""How the executor reaches its workers: one interface, two transports.

    LocalTransport  one Worker object in this process (runtime.workers = 0); a call runs when submitted,
                    its output is passed on as the Python object itself
    RayTransport    one Ray actor per device (runtime.workers = N); a call is a task on each rank of its
                    mesh, its output stays in the object store and moves worker to worker

Both return *handles*: `run` gives (data handle, info handle); the executor passes data handles on to the
consumers and only ever fetches info handles (`wait`): small dicts of rank, seconds and metrics. Sample data
never passes through the controller.

A streamed call (fusion.inter_stage) is `run_stream` on each rank, followed with `stream`, which yields
each finished chunk's data handle as it comes (the controller reads only a small marker before each) and
then each rank's info handle. On Ray the chunks come while the call runs (a Ray streaming generator); in
one process the worker is the controller's own thread, so the call runs to its end first and its chunks
follow (nothing else could run meanwhile: interleaving would only reorder the same work).
"""

from __future__ import annotations

import logging
import os

from reflow.config.loader import ConfigError
from reflow.utils.failpoint import ENV as FAILPOINT_ENV, ONCE_ENV as FAILPOINT_ONCE_ENV


def _event(i: int, marker: dict, data, info) -> tuple:
    """A streamed call's event from a marker its worker yielded (Worker.run_stream); data(): the next handle."""
    if "total" in marker:
        return i, "total", marker["total"]
    if "chunk" in marker:
        return i, "chunk", (marker, data())
    return i, "end", info


class WorkerFailed(RuntimeError):
    """A worker raised or died; the message carries its rank, the call and its traceback."""


class ClusterError(ConfigError):
    """runtime.ray_address names no cluster this process can join."""


def _token_auth_for_cluster() -> None:
    """`ray start --head` turns on token authentication when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    or ~/.ray/auth_token, which any earlier ray.init leaves behind), but a driver joining by address sends
    its token only in token mode: turn it on when a token is at hand, as `ray start --address` does."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def _user_error(e) -> bool:
    """reflow's user errors (bad config, data, reward function, plan, ...) are ValueErrors of its own."""
    return isinstance(e, ValueError) and type(e).__module__.startswith("reflow.")


def _running(pending: list, where: dict, refs) -> str:
    """The (call, rank) pairs of unfinished handles, in submission order: the first is the likeliest culprit
    (later calls wait on its output)."""
    stuck = [pending[i][1] for i in sorted(where[r] for r in refs)]
    more = f", and {len(stuck) - 6} more" if len(stuck) > 6 else ""
    return ", ".join(f"rank {rank} in '{what}'" for what, rank in stuck[:6]) + more


def _cause(e: BaseException) -> str:
    """A Ray failure in a few words (the worker's own traceback follows on the next lines, when it has one)."""
    import ray.exceptions as rex

    if isinstance(e, rex.ActorDiedError) or isinstance(e, rex.ActorUnavailableError):
        return ("the worker process died (killed by a signal, out of memory, or crashed in native code)\n"
                + str(e).strip())
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}\n{e}"
    return str(e)


class Watchdog:
    """In one process a hung call has no other process to notice it: a timer thread ends the process when one
    call runs longer than `timeout_s`, naming the call and printing every thread's stack (where it hangs).
    The exit is abrupt (os._exit: a hung thread cannot be unwound); checkpoints are written whole or not at
    all, so `--resume` continues from the last one."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __call__(self, what: str, fn, *args):
        import threading

        timer = threading.Timer(self.timeout_s, self._expire, (what,))
        timer.daemon = True
        timer.start()
        try:
            return fn(*args)
        finally:
            timer.cancel()

    def _expire(self, what: str) -> None:
        import faulthandler
        import sys

        print(f"reflow: error: hang: {what} has run for {self.timeout_s:.0f} s (runtime.timeout_s) in this process; "
              "raise runtime.timeout_s if a call legitimately takes longer. Stacks:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)


class LocalTransport:
    """The worker in this process; exceptions surface where the call is submitted. A call that runs longer than
    runtime.timeout_s ends the process (Watchdog)."""

    def __init__(self, worker, timeout_s: float | None = None):
        self.worker = worker
        self.size = 1
        self.watch = Watchdog(timeout_s) if timeout_s else (lambda what, fn, *args: fn(*args))

    def start(self) -> list[dict]:
        return [self.worker.start()]

    def run(self, rank: int, step: int, name: str, *args):
        return self.watch(f"call '{name}' of step {step}", self.worker.run, step, name, *args)

    def run_fused(self, rank: int, step: int, names: list[str], *args):
        """The plan's fused pair as one call -> (data handle of each call, then the info handle of each)."""
        return self.watch(f"fused calls {', '.join(names)} of step {step}", self.worker.run_fused, step, names, *args)

    def send_weights(self, rank: int, *args):
        return self.worker.send_weights(*args)

    def run_stream(self, rank: int, step: int, name: str, *args) -> list:
        return self.watch(f"call '{name}' of step {step}", lambda: list(self.worker.run_stream(step, name, *args)))

    def stream(self, streams: list, whats: list, pending: list, timeout_s: float):
        """streams: what run_stream returned per rank -> (stream index, "total", samples it returns in all)
        first, then (stream index, "chunk", (marker, data handle)) per chunk and (stream index, "end", info
        handle) at its end."""
        for i, items in enumerate(streams):
            it = iter(items)
            for marker in it:
                yield _event(i, marker, lambda: next(it), marker)

    def call(self, rank: int, method: str, *args):
        return self.watch(f"'{method}'", getattr(self.worker, method), *args)

    def wait(self, pending: list, timeout_s: float) -> list[dict]:
        """pending: [(info handle, (what, rank))] -> the infos (already computed: the handle is the info)."""
        return [h for h, _ in pending]

    def fetch(self, handle):
        return handle

    def shutdown(self) -> None:
        self.worker.shutdown()


class RayTransport:
    """N Ray actors (one CPU, and one GPU when CUDA is available, each), placed by a placement group: one
    bundle per worker, packed onto as few nodes as hold them (`STRICT_PACK` is not required: a plan spread
    over two nodes gets its ranks per node from Ray and the reallocation planner prefers same-node senders)."""

    def __init__(self, worker_cls, world_size: int, make_args, rt):
        import ray

        self.rt = rt
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            # an embedded Ray (no set-up) on one machine, or join a cluster: `ray start --head` / --address
            if rt.ray_address:
                _token_auth_for_cluster()
            try:
                ray.init(address=rt.ray_address,
                         num_cpus=None if rt.ray_address else max(world_size, os.cpu_count() or 1),
                         include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING,
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([os.getcwd(),
                                                                                   os.environ.get("PYTHONPATH", "")])}})
            except ConnectionError as e:
                raise ClusterError(f"runtime.ray_address={rt.ray_address}: could not join the Ray cluster ({e}); is "
                                   "`ray start --head` running there? With token authentication, give the head's "
                                   "token in RAY_AUTH_TOKEN") from None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from reflow.parallel.device import resolve_device

        gpus = 1 if resolve_device(rt.device).type == "cuda" else 0
        bundle = {"CPU": 1, **({"GPU": 1} if gpus else {})}
        have = ray.cluster_resources()
        for kind, need in bundle.items():
            if have.get(kind, 0) < need * world_size:
                self.shutdown()
                raise ClusterError(f"runtime.workers={world_size} needs {need * world_size:g} {kind} in the Ray "
                                   f"cluster, which has {have.get(kind, 0):g}; lower runtime.workers or add nodes")
        self.pg = placement_group([bundle] * world_size, strategy="PACK")
        ray.get(self.pg.ready(), timeout=max(300.0, rt.timeout_s))
        table = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        self.nodes = [table[r] for r in range(world_size)]  # the Ray node of each rank
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(worker_cls)
        # failpoints (tests, bench/chaos.py) reach every worker of the run, also on a Ray started earlier
        env = {k: os.environ[k] for k in (FAILPOINT_ENV, FAILPOINT_ONCE_ENV) if k in os.environ}
        self.workers = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=r),
            **({"runtime_env": {"env_vars": env}} if env else {})).remote(*make_args(r))
            for r in range(world_size)]
        self.size = world_size

    def start(self) -> list[dict]:
        import ray

        # starting actors imports torch and transformers in each, and `start` loads the weights and forms the
        # process group: slow on a loaded machine or for a big model, not a hang, so start-up gets the same
        # floor as the placement group instead of the per-call runtime.timeout_s
        budget = max(300.0, self.rt.timeout_s)
        addr, port = ray.get(self.workers[0].endpoint.remote(), timeout=budget)
        return self.wait([(w.start.remote(addr, port, self.nodes), ("start", r)) for r, w in enumerate(self.workers)],
                         budget)

    def run(self, rank: int, *args):
        return self.workers[rank].run.options(num_returns=2).remote(*args)

    def run_fused(self, rank: int, step: int, names: list[str], *args):
        return self.workers[rank].run_fused.options(num_returns=2 * len(names)).remote(step, names, *args)

    def send_weights(self, rank: int, *args):
        return self.workers[rank].send_weights.remote(*args)

    def run_stream(self, rank: int, *args):
        return self.workers[rank].run_stream.options(num_returns="streaming").remote(*args)

    def stream(self, streams: list, whats: list, pending: list, timeout_s: float):
        """streams: Ray streaming generators, one per rank; whats: their (call, rank). Yields the events of
        LocalTransport.stream, each chunk as soon as a rank has yielded it. A failing rank ends the run with its error (as `wait`); `timeout_s`
        without a chunk from any rank ends it as a hang."""
        import ray

        live = list(range(len(streams)))
        while live:
            ready, _ = ray.wait([streams[i] for i in live], num_returns=1, timeout=timeout_s, fetch_local=False)
            if not ready:
                self.shutdown()
                running = ", ".join(f"rank {rank} in '{what}'" for what, rank in (whats[i] for i in live))
                raise WorkerFailed(f"hang: no chunk came for {timeout_s:.0f} s (runtime.timeout_s) from {running}; "
                                   "raise runtime.timeout_s if a call legitimately takes longer")
            i = next(j for j in live if streams[j] is ready[0])
            ref = next(streams[i])
            try:
                marker = ray.get(ref)  # a few numbers: the chunk's index and size, or the rank's info at the end
            except Exception:  # noqa: BLE001 - RayTaskError / ActorDiedError carry the worker's traceback
                every = [*pending, (ref, whats[i])]
                raise self._failure(every, {h: k for k, (h, _) in enumerate(every)}) from None
            if "chunk" not in marker and "total" not in marker:
                live.remove(i)
            yield _event(i, marker, lambda: next(streams[i]), ref)  # a chunk's data comes right after its marker

    def call(self, rank: int, method: str, *args):
        return getattr(self.workers[rank], method).remote(*args)

    def fetch(self, handle):
        import ray

        return ray.get(handle)

    def wait(self, pending: list, timeout_s: float) -> list[dict]:
        """Wait for every info handle of pending = [(handle, (what, rank))]; the first failure (an exception,
        or a dead worker) ends the run at once with the worker's error, and `timeout_s` without any of them
        finishing ends it as a hang, naming the calls and ranks still running. Returns the infos in order.
        Only these small handles are ever fetched."""
        import ray

        where = {h: i for i, (h, _) in enumerate(pending)}
        left, out = list(where), [None] * len(pending)
        while left:
            done, left = ray.wait(left, num_returns=1, timeout=timeout_s)
            if not done:
                self.shutdown()
                running = _running(pending, where, left)
                raise WorkerFailed(f"hang: no call finished for {timeout_s:.0f} s (runtime.timeout_s); still running: "
                                   f"{running}; raise runtime.timeout_s if a call legitimately takes longer")
            try:
                out[where[done[0]]] = ray.get(done[0])
            except Exception:  # noqa: BLE001 - RayTaskError / ActorDiedError carry the worker's traceback
                raise self._failure(pending, where) from None
        return out

    def _failure(self, pending: list, where: dict) -> Exception:
        """The error that ends the run once a task failed. One failure brings others: the peers of a dead
        worker fail in their collectives a moment later (or before Ray has noticed the death). So wait a few
        seconds for the rest, then report the root cause: a dead worker first, then a user error (a bad data
        row or reward function: its own one-line message), then the first failure in submission order."""
        import ray
        import ray.exceptions as rex

        ready, unfinished = ray.wait(list(where), num_returns=len(where), timeout=min(5.0, self.rt.timeout_s))
        ready = set(ready)
        failed = []
        for ref, (what, rank) in pending:
            if ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    failed.append((what, rank, e))
        self.shutdown()
        dead = [f for f in failed if isinstance(f[2], (rex.ActorDiedError, rex.ActorUnavailableError))]
        user = [f for f in failed if _user_error(getattr(f[2], "cause", None))]
        if user and not dead:
            return user[0][2].cause
        what, rank, e = (dead or failed)[0]
        still = f" (still running: {_running(pending, where, unfinished)})" if unfinished else ""
        cause = _cause(e).split("\n", 1)
        return WorkerFailed(f"worker {rank} failed in '{what}': {cause[0]}{still}"
                            + (f"\n{cause[1]}" if len(cause) > 1 else ""))

    def shutdown(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []
        if getattr(self, "pg", None) is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - Ray already down
                pass
            self.pg = None
        if self._own_ray and ray.is_initialized():
            ray.shutdown()


