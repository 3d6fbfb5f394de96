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
import socket
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
           timeout_s: float = 120.0) -> list[Any]:
    """Run fn(rank, world_size, *args) on `nprocs` processes; return their results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, backend or default_backend(), timeout_s, fn, args, queue))
             for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    for _ in range(nprocs):
        rank, status, value = queue.get()
        if status == "ok":
            results[rank] = value
        else:
            errors.append(f"rank {rank}: {value}")
    for p in procs:
        p.join()
    if errors:
        raise WorkerError("worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(nprocs)]
