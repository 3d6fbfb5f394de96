"""Inter-stage fusion (fusion.inter_stage) in the planner: a streamed generate call cut where its chunks are
complete, and its per-sample consumers run as chunk tasks that wait for their chunk only.

The runtime (reflow.runtime.executor._stream): each replica of the generate call hands on its finished
samples in chunks of `chunk` (the last one smaller); the controller gives each chunk to every consumer
(`executor.streamed`: the per-sample infer calls reading only that call's output), holding chunks back until
the consumer gets at least as many samples as it has data-parallel replicas, and until the samples still to
come can fill its last chunk as well. Train calls wait for the whole batch.

The model: a replica's samples finish at the times cost.generate_cost gives (CallCost.samples: from the
response-length distribution, in finish order; the replicas are alike, so chunk k of every replica is
complete at the same time)

    done_k     = T - left(sample min((k + 1) c, b_r) - 1)          c = chunk, b_r = samples per replica,
                                                                  k = 0..K-1, K = ceil(b_r / c), done_K-1 = T
    segment_k  = done_k - done_(k-1)                             the generate call's time, cut at the done_k

and each consumer task (the executor's rule above on the replicas' chunks in (k, replica) order) costs the
consumer's call on its samples (their mean length; the call's fixed costs and the data hop once per task)
and waits for the segment its last chunk ends. The simulator (simulator.py) runs the segments one after the
other on the generate call's ranks and the consumer tasks in submission order on theirs: a consumer on
other ranks overlaps with the rest of the generation; one on the generating ranks queues behind all of it
(a worker runs one task at a time). Without a length distribution every sample ends at the last step, so
every chunk is complete at the end and fusion gains nothing (only the per-chunk costs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from reflow.planner.cost import CallCost


@dataclass(frozen=True)
class Stream:
    """chunk: samples per chunk per replica; segments: the generate call's seconds cut at done_0..done_K-1 (they
    sum to its time); chunks: (consumer call, index of the segment it waits for, seconds) in the order the
    controller submits them."""

    chunk: int
    segments: tuple[float, ...]
    chunks: tuple[tuple[str, int, float], ...]

    def consumer_time(self, name: str) -> float:
        return sum(t for n, _, t in self.chunks if n == name)


def submissions(per_replica: int, replicas: int, chunk: int, needs: dict[str, int]) -> list[tuple[str, int, list[int]]]:
    """The executor's rule for handing chunks to consumers: -> (consumer, index of the chunk whose arrival
    submits it, sizes of the chunks it holds) in submission order. Every replica returns per_replica samples
    (each says so before its first chunk); chunk k of every replica arrives before chunk k + 1 of any;
    needs: consumer -> its data-parallel replicas."""
    sizes = [min(chunk, per_replica - k * chunk) for k in range(math.ceil(per_replica / chunk))]
    left = per_replica * replicas
    held: dict[str, list[int]] = {n: [] for n in needs}
    out = []
    for k, size in enumerate(sizes):
        for _ in range(replicas):
            left -= size
            for n, need in needs.items():
                held[n].append(size)
                if sum(held[n]) >= need and (left == 0 or left >= need):
                    out.append((n, k, held[n]))
                    held[n] = []
    for n in needs:  # what is still held goes with the last chunk
        if held[n]:
            out.append((n, len(sizes) - 1, held[n]))
    return out


def build_stream(gen: CallCost, replicas: int, chunk: int, needs: dict[str, int],
                 cost: Callable[[str, list[int]], float]) -> Stream:
    """The Stream of a generate call (its cost with `samples`: one replica's) over `replicas` replicas, chunks of
    `chunk`, consumers `needs` (name -> data-parallel replicas); cost(consumer, response lengths of a task's
    samples) -> the task's seconds."""
    left = [t for t, _ in gen.samples]
    lengths = [n for _, n in gen.samples]
    b = len(left)
    K = math.ceil(b / chunk)
    last = [min((k + 1) * chunk, b) - 1 for k in range(K)]
    done = [gen.time - left[i] for i in last[:-1]] + [gen.time]
    segments = tuple(max(0.0, d - (done[k - 1] if k else 0.0)) for k, d in enumerate(done))
    taken = {n: 0 for n in needs}  # chunks handed to each consumer so far, in (k, replica) order
    chunks = []
    for n, k, sizes in submissions(b, replicas, chunk, needs):
        lens = []
        for _ in sizes:  # chunk number j of the (k, replica) order is chunk j // replicas of a replica
            k_j = taken[n] // replicas
            lens += lengths[k_j * chunk:min((k_j + 1) * chunk, b)]
            taken[n] += 1
        chunks.append((n, k, cost(n, lens)))
    return Stream(chunk, segments, tuple(chunks))
