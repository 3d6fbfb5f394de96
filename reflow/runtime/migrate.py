"""Long-tail migration (fusion.migrate_below): when few samples of a streamed generate call are still decoding,
its data-parallel replicas move them onto as few replicas as hold them, and the others end their generate task,
so their ranks run the next calls (the consumers' chunks) while the long tail finishes.

Each replica's generation engine calls its `Migration` before every decode step (the engine's `steer`):

    report : the rows it finished since its last poll go into a counter of the world's rendezvous store
             (torch.distributed's TCPStore, one small round trip); done = the batch's finished samples so far
    trigger: unfinished U = batch - done < migrate_below x batch (done only grows, so every replica still
             decoding sees the trigger at its next poll)
    join   : the replica stops decoding and writes its unfinished rows n_r; a replica whose rows all ended
             before it saw the trigger writes n_r = 0 as it ends (`finish`). Once all d replicas have written,
             each joined one computes the same moves from the same n (`plan_migration`, capacity =
             rollout.batch_size live rows per replica)
    move   : a source takes its rows out of its engine (prompt, tokens and log-probs so far, sampling key),
             writes them to the store and ends; a target reads its share and adopts them into its engine,
             which re-prefills prompt + tokens so far and decodes on

Once per call: after the moves every replica decodes without polling. Keyed sampling makes a moved sample's
tokens the ones it would have got where it started (its draws are keyed by (seed, step, sample, position)),
so samples, rewards and metrics are those of a run without migration, up to the model's float rounding
(which batch composition already changes).

Re-prefill, not a copy of the K/V cache: a moved row carries its tokens only (a few hundred integers through
the store), and the target recomputes its K/V in one batched prefill forward of the moved rows (2 x params x
(prompt + tokens so far) FLOPs per row, like the prompt's own prefill), where a copy would send layers x 2 x
H_kv x D x length values per row between the two ranks over a collective both would have to enter at once.
At the trigger few rows move, each at most prompt + max_new_tokens long, once per call. Measured on a CPU
(bench/fusion.py --migrate, tiny-llama, one thread): re-prefilling 4 rows of 20-94 tokens costs 2.5-6.7 decode
steps of 4 rows; the copy would move 160-752 KiB. A poll is one store round trip (~15 us on one node).

The moved rows are deleted from the store by their last reader; the small counters (a few bytes per call) stay.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time

import torch.distributed as dist

from reflow.engines.generate import Handover


def plan_migration(unfinished: list[int], capacity: int) -> list[tuple[int, int, int]]:
    """unfinished[r]: the rows replica r still decodes -> moves [(source, target, rows)] that put them on the fewest
    replicas that hold them: m = max(1, ceil(U / capacity)) targets (U = sum of unfinished), the replicas that hold
    the most rows (ties: the lower index), each filled up to `capacity` with the other replicas' rows, sources in
    index order. [] when the rows sit on m replicas or fewer already. Sum over targets of max(0, capacity - n_t)
    >= m capacity - sum n_t >= U - sum n_t, so every source's rows find room."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 rows, got {capacity}")
    holders = [r for r, n in enumerate(unfinished) if n > 0]
    m = max(1, -(-sum(unfinished) // capacity))
    if len(holders) <= m:
        return []
    targets = sorted(holders, key=lambda r: (-unfinished[r], r))[:m]
    room = {t: max(0, capacity - unfinished[t]) for t in targets}
    moves = []
    for s in holders:
        left = 0 if s in room else unfinished[s]
        for t in targets:
            k = min(left, room[t])
            if k:
                moves.append((s, t, k))
                room[t] -= k
                left -= k
    return moves


class Migration:
    """The steer of one data-parallel replica's engine in one streamed generate call (see the module docstring).

    store: a store shared by the call's replicas, holding only this call's keys (a PrefixStore); replica: this
    replica's index among the call's `replicas`; batch: the call's samples over every replica; rows: this
    replica's; below: fusion.migrate_below; capacity: live rows per replica (rollout.batch_size).
    After the call, `counts`: every replica's unfinished rows at the migration (None if this replica ended
    before it), `moves`: plan_migration's; `sent` / `received`: the sampling keys (sample ids) of the rows this
    replica handed over / adopted; `joined`: (start, end) of its part in the migration, or None."""

    def __init__(self, store, replica: int, replicas: int, batch: int, rows: int, below: float, capacity: int):
        self.store, self.replica, self.replicas = store, replica, replicas
        self.batch, self.below, self.capacity = batch, below, capacity
        self.unfinished = rows  # at the last poll
        self.over = False  # moved (or never will: this replica ended)
        self.sent: list[int] = []
        self.received: list[int] = []
        self.joined: tuple[float, float] | None = None
        self.counts: list[int] | None = None
        self.moves: list[tuple[int, int, int]] = []

    @staticmethod
    def store_for(base, name: str, step: int, round_: int = 0):
        """The keys of one call of one step (a generate call runs once per step and round)."""
        return dist.PrefixStore(f"reflow/migrate/{name}/{step}/{round_}", base)

    def _report(self, unfinished: int) -> int:
        """Count this replica's rows finished since the last poll -> the batch's finished samples so far."""
        done = self.store.add("done", self.unfinished - unfinished)
        self.unfinished = unfinished
        return done

    def _arrive(self, unfinished: int) -> None:
        self.store.set(f"unfinished/{self.replica}", str(unfinished))
        if self.store.add("arrived", 1) == self.replicas:
            self.store.set("all", "1")

    def __call__(self, unfinished: int, take) -> list[Handover] | None:
        if self.over:
            return None
        done = self._report(unfinished)
        if self.batch - done >= self.below * self.batch:
            return None
        t0 = time.time()
        self.over = True
        self._arrive(unfinished)
        self._wait("all", "the other replicas to report their unfinished rows")
        self.counts = [int(self.store.get(f"unfinished/{r}")) for r in range(self.replicas)]
        self.moves = moves = plan_migration(self.counts, self.capacity)
        adopt: list[Handover] = []
        if any(s == self.replica for s, _, _ in moves):
            rows = sorted(take(), key=lambda h: h.key)  # sample order: every target slices the same list
            self.store.set(f"rows/{self.replica}", pickle.dumps(rows))
            self.sent = [h.key for h in rows]
        else:
            given: dict[int, int] = {}  # source -> its rows assigned so far (to targets before this one)
            readers = {s: sum(1 for src, _, _ in moves if src == s) for s, _, _ in moves}
            for s, t, k in moves:
                at = given.get(s, 0)
                if t == self.replica:
                    self._wait(f"rows/{s}", f"replica {s} to hand over its rows")
                    adopt += pickle.loads(self.store.get(f"rows/{s}"))[at:at + k]
                    if self.store.add(f"read/{s}", 1) == readers[s]:  # the last reader frees the rows (rank
                        self.store.delete_key(f"rows/{s}")  # 0's store would otherwise grow every step)
                given[s] = at + k
            self.received = [h.key for h in adopt]
        self.joined = (t0, time.time())
        return adopt or None

    def _wait(self, key: str, what: str) -> None:
        """Wait for `key` (the store's timeout: runtime.timeout_s); a replica that never comes (dead, or its rank
        busy with another task all that time) ends the call with a message naming the wait."""
        try:
            self.store.wait([key])
        except dist.DistStoreError:
            raise RuntimeError(f"long-tail migration (fusion.migrate_below): replica {self.replica} of the generate "
                               f"call waited runtime.timeout_s for {what}; a replica died or its rank ran another "
                               "task meanwhile (raise runtime.timeout_s, or set fusion.migrate_below=0)") from None

    def finish(self) -> None:
        """The replica's call has ended: a replica that never joined counts its last rows and arrives with none."""
        if not self.over:
            self.over = True
            self._report(0)
            self._arrive(0)


def rendezvous_store(timeout_s: float):
    """A client of the world's rendezvous store (the TCPStore rank 0 hosts for init_process_group, at
    MASTER_ADDR:MASTER_PORT): a key-value store every rank reaches without a collective."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def check_migration(cfg, graph, plan) -> None:
    """fusion.migrate_below hands rows between whole data-parallel replicas, each one engine on one rank: a
    streamed generate call must run dXt1p1 (PlanError naming the call and the key, before anything starts)."""
    from reflow.runtime.executor import streamed
    from reflow.runtime.plan import PlanError, placements

    fusion = getattr(cfg, "fusion", None)
    if fusion is None or not fusion.inter_stage or not fusion.migrate_below:
        return
    where = placements(plan, graph)
    for name in streamed(graph, graph.order):
        layout = where[name].layout
        if layout.t > 1 or layout.p > 1:
            raise PlanError(f"plan call '{name}': fusion.migrate_below moves samples between data-parallel replicas "
                            f"of one rank each, not {layout}; use d{layout.d * layout.t * layout.p}t1p1 on its "
                            "ranks, or set fusion.migrate_below=0")
