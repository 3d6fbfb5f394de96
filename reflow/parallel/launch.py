"""Run a function on N local processes that form one torch.distributed world (gloo on CPU, NCCL on CUDA).

    results = launch(fn, nprocs=4, args=(x,))      # fn(rank, world_size, x) on every rank; returns [r0, ..., r3]

For tests and benchmarks: the workers are spawned (not forked), each sets one intra-op thread (on a
small machine N processes share the cores), joins the world on a free local port, runs `fn`, and
sends its return value back. An exception in any worker is re-raised here with its traceback, and a
collective timeout keeps a dead peer from hanging the others.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A worker raised; the message carries its rank and traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, fn, args, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException as e:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, args: tuple = (), backend: str | None = None,
           timeout_s: float = 120.0, grace_s: float = 10.0) -> list[Any]:
    """Run fn(rank, world_size, *args) on `nprocs` processes; return their results in rank order.

    `fn` must be importable by the workers (defined at module level in an importable module). A worker
    that dies without reporting (a crash, or `fn` that cannot be unpickled) is an error, not a hang;
    once one worker has failed, the others get `grace_s` seconds to finish before they are stopped.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, backend or default_backend(), timeout_s, fn, args, queue))
             for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    first_error_at = None
    while len(results) + len(errors) < nprocs:
        if errors and first_error_at is None:
            first_error_at = time.monotonic()
        if first_error_at is not None and time.monotonic() - first_error_at > grace_s:
            # peers of a failed rank usually wait in a collective it never joins (a group creation waits
            # on the store, not the collective timeout): stop them instead of waiting
            for r, p in enumerate(procs):
                if r not in results and r not in errors:
                    p.kill()
                    errors[r] = f"stopped {grace_s:.0f} s after rank {min(errors)} failed (it was waiting for its peers)"
            break
        try:
            rank, status, value = queue.get(timeout=0.5)
            (results if status == "ok" else errors)[rank] = value
            continue
        except queue_mod.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in results and r not in errors and p.exitcode is not None:
                try:  # it may have reported just before exiting
                    rank, status, value = queue.get(timeout=1.0)
                    (results if status == "ok" else errors)[rank] = value
                    break
                except queue_mod.Empty:
                    errors[r] = (f"exited with code {p.exitcode} without reporting a result "
                                 f"(did it crash, or is {getattr(fn, '__qualname__', fn)!r} not importable by workers?)")
    for p in procs:
        p.join(timeout=timeout_s)
        if p.is_alive():
            p.kill()
    if errors:
        raise WorkerError("worker failed:\n" + "\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))
    return [results[r] for r in range(nprocs)]
