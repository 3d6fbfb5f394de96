"""Hardware figures the cost model predicts from, and presets for planning clusters one does not have.

A `Hardware` describes one kind of device and how devices are wired:

    flops              dense 16-bit matmul peak, FLOP/s per device
    matmul_efficiency  fraction of the peak large matmuls reach (time = flops / (flops * efficiency))
    mem_bw             device memory bandwidth, bytes/s (HBM); `memory_efficiency` of it is reached
    memory             device memory, bytes; `reserved` of it is never available (CUDA context, NCCL
                       buffers, allocator fragmentation)
    intra_bw, intra_lat  one device's effective bandwidth (bytes/s) and per-message latency (s) to
                       devices of its own node (NVLink: the NCCL "bus bandwidth" a ring reaches)
    inter_bw, inter_lat  the same across nodes: a node's network bandwidth divided by its devices,
                       since every device of a node talks across nodes at once in a data-parallel step
    devices_per_node   ranks r and q share a node when r // devices_per_node == q // devices_per_node
    layer_overhead     fixed time per decoder layer per forward (kernel launches, Python): what makes
                       small decode steps slower than their bytes

Collective times on a group of n ranks (ring bandwidth term, tree-like latency term):

    all_reduce(B)                 = 2 (n-1)/n * B / bw + 2 ceil(log2 n) * lat
    all_gather(B), reduce_scatter = (n-1)/n * B / bw + ceil(log2 n) * lat      (B: the full tensor)

with (bw, lat) the intra-node figures when the group's ranks share one node, the inter-node ones
otherwise.

Presets (commonly cited vendor / NCCL-test figures; `reflow profile` will calibrate later):

    a100-80g  312 TFLOP/s bf16 dense, 2.04 TB/s HBM2e, 80 GB; NVLink3 600 GB/s bidirectional, ~230 GB/s
              all-reduce bus bandwidth in nccl-tests on DGX A100; 4x HDR 200 Gb/s InfiniBand per node
              = 100 GB/s per node = 12.5 GB/s per device
    h100-80g  989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB; NVLink4 900 GB/s bidirectional, ~360 GB/s
              bus bandwidth; 8x NDR 400 Gb/s per node = 400 GB/s per node = 50 GB/s per device
    cpu       one gloo CPU worker per device, placeholders of the right order of magnitude for this
              repository's CPU runs, to be replaced by `reflow profile`
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float
    mem_bw: float
    memory: float
    intra_bw: float
    intra_lat: float
    inter_bw: float
    inter_lat: float
    devices_per_node: int
    matmul_efficiency: float = 0.55
    memory_efficiency: float = 0.8
    reserved: float = 4 * GB
    layer_overhead: float = 20e-6

    # ------------------------------------------------------------------ derived figures
    @property
    def eff_flops(self) -> float:
        return self.flops * self.matmul_efficiency

    @property
    def eff_mem_bw(self) -> float:
        return self.mem_bw * self.memory_efficiency

    @property
    def usable_memory(self) -> float:
        return self.memory - self.reserved

    def node(self, rank: int) -> int:
        return rank // self.devices_per_node

    def link(self, ranks) -> tuple[float, float]:
        """(bandwidth, latency) of a group: intra-node when all its ranks share one node."""
        ranks = list(ranks)
        if not ranks or all(self.node(r) == self.node(ranks[0]) for r in ranks):
            return self.intra_bw, self.intra_lat
        return self.inter_bw, self.inter_lat

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, nbytes: float, ranks) -> float:
        n = len(ranks)
        if n <= 1 or nbytes <= 0:
            return 0.0
        bw, lat = self.link(ranks)
        return 2 * (n - 1) / n * nbytes / bw + 2 * math.ceil(math.log2(n)) * lat

    def all_gather(self, nbytes: float, ranks) -> float:
        """Gather a tensor of `nbytes` (full size) from n equal shards; reduce-scatter costs the same."""
        n = len(ranks)
        if n <= 1 or nbytes <= 0:
            return 0.0
        bw, lat = self.link(ranks)
        return (n - 1) / n * nbytes / bw + math.ceil(math.log2(n)) * lat

    reduce_scatter = all_gather

    def p2p(self, nbytes: float, a: int, b: int) -> float:
        bw, lat = self.link((a, b))
        return nbytes / bw + lat

    def with_(self, **changes) -> "Hardware":
        return replace(self, **changes)


PRESETS: dict[str, Hardware] = {
    "a100-80g": Hardware("a100-80g", flops=312e12, mem_bw=2039e9, memory=80 * GB,
                         intra_bw=230e9, intra_lat=8e-6, inter_bw=100e9 / 8, inter_lat=15e-6,
                         devices_per_node=8),
    "h100-80g": Hardware("h100-80g", flops=989e12, mem_bw=3350e9, memory=80 * GB,
                         intra_bw=360e9, intra_lat=6e-6, inter_bw=400e9 / 8, inter_lat=12e-6,
                         devices_per_node=8),
    "cpu": Hardware("cpu", flops=50e9, mem_bw=10e9, memory=8 * GB, intra_bw=1e9, intra_lat=50e-6,
                    inter_bw=0.1e9, inter_lat=200e-6, devices_per_node=64, matmul_efficiency=0.5,
                    memory_efficiency=0.5, reserved=0.5 * GB, layer_overhead=100e-6),
}


class HardwareError(ValueError):
    """An unknown hardware preset."""


def hardware(name: str | Hardware, **overrides) -> Hardware:
    """A preset by name (a100-80g, h100-80g, cpu), optionally with figures overridden."""
    if isinstance(name, Hardware):
        hw = name
    elif name in PRESETS:
        hw = PRESETS[name]
    else:
        raise HardwareError(f"unknown hardware preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return hw.with_(**overrides) if overrides else hw
