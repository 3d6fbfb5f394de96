"""Reallocation planner: which rank sends which slice of which parameter to which ranks.

Given a source and a destination `Sharding` of the same model (layouts on rank lists), for every
parameter and every destination rank r with slice D (a `Box`), the pieces it needs are D ∩ S for each
distinct source slice S (source slices of one parameter partition the tensor; replicas share a slice).
Destination ranks needing the same piece are grouped, then:

    a receiver that holds S itself            -> local copy, no traffic
    the other receivers of the piece          -> one Transfer from one holder of S (a broadcast when
                                                 several receive it)
    the sender                                -> a holder on a receiver's node if any, then the least
                                                 loaded (bytes assigned so far), then the lowest rank

So a pipeline stage maps by intersecting layer sets (a layer's parameters exist only on its stage),
tensor shards split or concatenate by box intersection, and data-parallel (FSDP) shards are only
gathered where a destination slice spans them. Any pair of valid layouts works, including tensor
degrees where neither divides the other.

The plan is deterministic: every rank of the world computes the same plan from the same inputs, which
the executor relies on to order collectives identically everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from reflow.parallel.layout import validate_layout
from reflow.parallel.shards import Box, Sharding


# One message per bucket. 16 MB rather than larger: on gloo, 64 MB buckets were up to 2.9x slower on a 100M
# model (bench/results/realloc.md); on NCCL larger buckets may pay off (not yet measured).
DEFAULT_BUCKET_BYTES = 16 << 20


class ReallocError(ValueError):
    """A reallocation that cannot be planned; raised before any transfer, says why."""


@dataclass(frozen=True)
class Transfer:
    name: str
    box: Box  # in the full parameter's coordinates
    sender: int
    receivers: tuple[int, ...]  # never includes the sender

    @property
    def numel(self) -> int:
        return self.box.numel


@dataclass(frozen=True)
class LocalCopy:
    rank: int
    name: str
    box: Box


@dataclass
class Cost:
    """Traffic of a reallocation: bytes per rank and the number of collectives (after bucketing)."""

    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    collectives: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.received.values())

    @property
    def max_rank_bytes(self) -> int:
        """Bytes through the busiest rank (sent + received): what bounds the time on equal links."""
        ranks = set(self.sent) | set(self.received)
        return max((self.sent.get(r, 0) + self.received.get(r, 0) for r in ranks), default=0)

    def as_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "max_rank_bytes": self.max_rank_bytes,
                "collectives": self.collectives, "sent": dict(sorted(self.sent.items())),
                "received": dict(sorted(self.received.items()))}


@dataclass
class ReallocPlan:
    src: Sharding
    dst: Sharding
    copies: list[LocalCopy]
    transfers: list[Transfer]
    dtype_bytes: dict[str, int]
    bucket_bytes: int

    def buckets(self) -> dict[tuple[int, tuple[int, ...]], list[list[Transfer]]]:
        """Transfers grouped by (sender, receivers), cut into buckets of at most `bucket_bytes` (a single
        larger piece gets its own bucket): one message (point-to-point or broadcast) per bucket."""
        by_route: dict[tuple[int, tuple[int, ...]], list[Transfer]] = defaultdict(list)
        for t in self.transfers:
            by_route[(t.sender, t.receivers)].append(t)
        out = {}
        for route in sorted(by_route):
            buckets, cur, size = [], [], 0
            for t in by_route[route]:
                nbytes = t.numel * self.dtype_bytes[t.name]
                if cur and size + nbytes > self.bucket_bytes:
                    buckets.append(cur)
                    cur, size = [], 0
                cur.append(t)
                size += nbytes
            if cur:
                buckets.append(cur)
            out[route] = buckets
        return out

    def cost(self) -> Cost:
        c = Cost()
        for (sender, receivers), buckets in self.buckets().items():
            for bucket in buckets:
                nbytes = sum(t.numel * self.dtype_bytes[t.name] for t in bucket)
                # the root's bytes as if it sent to each receiver; a tree broadcast spreads this load
                c.sent[sender] = c.sent.get(sender, 0) + nbytes * len(receivers)
                for r in receivers:
                    c.received[r] = c.received.get(r, 0) + nbytes
                c.collectives += 1
        return c

    def for_rank(self, rank: int) -> tuple[list[LocalCopy], list[Transfer]]:
        return ([c for c in self.copies if c.rank == rank],
                [t for t in self.transfers if rank == t.sender or rank in t.receivers])


def check_compatible(src: Sharding, dst: Sharding) -> None:
    """Same parameter names and shapes on both sides, else the first difference."""
    a, b = src.shape_of, dst.shape_of
    missing = [n for n in b if n not in a]
    if missing:
        raise ReallocError(f"cannot reallocate: destination parameter '{missing[0]}' does not exist in the source "
                           f"model ({len(missing)} missing); source and destination must be the same model config")
    extra = [n for n in a if n not in b]
    if extra:
        raise ReallocError(f"cannot reallocate: source parameter '{extra[0]}' has no place in the destination "
                           f"model ({len(extra)} extra); source and destination must be the same model config")
    for n in a:
        if a[n] != b[n]:
            raise ReallocError(f"cannot reallocate: parameter '{n}' has shape {list(a[n])} in the source and "
                               f"{list(b[n])} in the destination; source and destination must be the same model config")
    if src.num_layers != dst.num_layers:
        raise ReallocError(f"cannot reallocate: {src.num_layers} layers in the source, {dst.num_layers} in the destination")


def plan_reallocation(src: Sharding, dst: Sharding, *, world_size: int | None = None, model_config=None,
                      ranks_per_node: int = 8, dtype_bytes: int | dict[str, int] = 4,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES, node_of=None) -> ReallocPlan:
    """The transfers that turn `src` into `dst`. Raises ReallocError / LayoutError before anything moves.

    ranks_per_node: ranks r and q share a node when r // ranks_per_node == q // ranks_per_node.
    node_of: the node of each rank (a sequence of any hashable ids, e.g. Ray node ids); replaces ranks_per_node.
    dtype_bytes: bytes per element (one number, or per parameter name).
    """
    check_compatible(src, dst)
    for side, s in (("source", src), ("destination", dst)):
        if model_config is not None:
            validate_layout(s.layout, model_config, list(s.ranks), world_size, source=f"the {side} model")
        elif world_size is not None and any(r < 0 or r >= world_size for r in s.ranks):
            bad = [r for r in s.ranks if r < 0 or r >= world_size]
            raise ReallocError(f"{side} ranks {bad} do not exist (world size {world_size})")
        if len(s.ranks) != s.layout.size:
            raise ReallocError(f"{side} layout {s.layout} needs {s.layout.size} ranks, got {list(s.ranks)}")
    sizes = dtype_bytes if isinstance(dtype_bytes, dict) else {n: int(dtype_bytes) for n in src.shape_of}

    def node(r: int):
        return node_of[r] if node_of is not None else r // ranks_per_node

    load: dict[int, int] = defaultdict(int)
    copies: list[LocalCopy] = []
    transfers: list[Transfer] = []
    for name in src.shape_of:
        sources = src.holders(name)
        need: dict[Box, list[int]] = defaultdict(list)  # piece -> destination ranks needing it
        for r in dst.ranks:
            d = dst.box(r, name)
            if d is None:
                continue
            for s in sources:
                piece = d.intersect(s)
                if piece is not None:
                    need[(piece, s)].append(r)
        for (piece, s), receivers in need.items():
            holders = sources[s]
            remote = []
            for r in receivers:
                (copies.append(LocalCopy(r, name, piece)) if r in holders else remote.append(r))
            if not remote:
                continue
            nodes = {node(r) for r in remote}
            sender = min(holders, key=lambda h: (node(h) not in nodes, load[h], h))
            nbytes = piece.numel * sizes[name]
            load[sender] += nbytes * len(remote)
            transfers.append(Transfer(name, piece, sender, tuple(sorted(remote))))
    plan = ReallocPlan(src, dst, copies, transfers, sizes, bucket_bytes)
    _check_coverage(plan)
    return plan


def _check_coverage(plan: ReallocPlan) -> None:
    """Every destination slice is covered exactly once by copies and received pieces (a planner bug
    otherwise, caught before any data moves)."""
    got: dict[tuple[int, str], int] = defaultdict(int)
    for c in plan.copies:
        got[(c.rank, c.name)] += c.box.numel
    for t in plan.transfers:
        for r in t.receivers:
            got[(r, t.name)] += t.box.numel
    for r in plan.dst.ranks:
        for name in plan.dst.shape_of:
            d = plan.dst.box(r, name)
            want = d.numel if d is not None else 0
            if got.get((r, name), 0) != want:
                raise AssertionError(f"reallocation plan covers {got.get((r, name), 0)} of {want} elements of "
                                     f"'{name}' on rank {r}")


def naive_cost(src: Sharding, dst: Sharding, dtype_bytes: int = 4) -> Cost:
    """Traffic of the naive method: gather every parameter whole on one source rank, broadcast it to every
    destination rank, and let each slice out its part (one broadcast per parameter)."""
    root = src.ranks[0]
    c = Cost()
    total = sum(Box.full(s).numel for s in src.shape_of.values()) * dtype_bytes
    own = src.local_bytes(root, dtype_bytes)
    c.received[root] = total - own  # the gather
    for r in src.ranks:
        if r != root:
            c.sent[r] = src.local_bytes(r, dtype_bytes)
    receivers = [r for r in dst.ranks if r != root]
    c.sent[root] = c.sent.get(root, 0) + total * len(receivers)
    for r in receivers:
        c.received[r] = c.received.get(r, 0) + total
    c.collectives = 2 * len(src.shape_of)
    return c
