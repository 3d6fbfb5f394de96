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
    step_overhead      fixed time per decode step beyond the layers (sampling, masks, cache bookkeeping)
    optimizer_overhead fixed time per optimizer step (launching the Adam update per parameter tensor)
    call_overhead      fixed time per call of the graph (dispatching the task to the worker, moving and
                       merging its input batches, building the engine)
    dispatch           fixed time per further task of one call: a streamed consumer's chunk after its first
                       (handing one more task to a worker; the call's set-up is paid once, in call_overhead);
                       0 = call_overhead (no measurement)
    realloc_overhead   fixed time per reallocation (building the destination model, planning the moves)
    data_hop           fixed time for a call to fetch inputs that another worker produced (Ray's object
                       transfer: locate, pull, deserialise); a call whose inputs are all on its own rank
                       does not pay it; the bytes themselves move at intra_bw / inter_bw
    fsdp_overhead      fixed time per FSDP unit (a decoder layer) per all-gather / reduce-scatter (hooks,
                       DTensor bookkeeping, a collective's launch)
    tp_overhead        fixed time per decoder layer per pass under tensor parallel (t > 1)
    generate_scale, infer_scale, train_scale
                       measured / modelled time of one call kind's own work on one device (the model's
                       passes, decode steps and optimizer step; not its collectives): what the analytic
                       formulas miss at the profiled workload's sizes (skinny decode matmuls, sampling,
                       log-prob gathers, batch packing, the worker's bookkeeping). `reflow profile --config`
                       fits them from the workload's own calls in the runtime; 1 in the presets
    cores_per_node     None: every device computes independently (GPUs). A number: the devices of a node
                       share this many cores (CPU workers): when more of a node's ranks are busy at once,
                       each computes at cores / busy of its speed (the simulator shares them)

`reflow profile` measures these on the current devices and writes them as YAML (`save` / `load`).

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
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

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
    step_overhead: float = 0.0
    optimizer_overhead: float = 0.0
    call_overhead: float = 0.0
    dispatch: float = 0.0
    realloc_overhead: float = 0.0
    data_hop: float = 0.0
    fsdp_overhead: float = 0.0
    tp_overhead: float = 0.0
    generate_scale: float = 1.0
    infer_scale: float = 1.0
    train_scale: float = 1.0
    cores_per_node: float | None = None

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

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        def plain(v):
            return v if v is None or isinstance(v, (str, int)) else float(v)
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "hardware") -> "Hardware":
        if not isinstance(data, dict):
            raise HardwareError(f"{source}: expected a mapping of hardware figures, got {type(data).__name__}")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(names) - {"measured"})
        if unknown:
            raise HardwareError(f"{source}: unknown hardware figure(s) {', '.join(unknown)}; known: {', '.join(names)}")
        missing = [n for n, f in names.items() if f.default is MISSING and n not in data]
        if missing:
            raise HardwareError(f"{source}: missing hardware figure(s) {', '.join(missing)}")
        out = {}
        for k, v in data.items():
            if k == "measured":
                continue
            if k == "name":
                out[k] = str(v)
            elif k == "devices_per_node":
                out[k] = int(v)
            elif v is None and k == "cores_per_node":
                out[k] = None
            else:
                try:
                    out[k] = float(v)
                except (TypeError, ValueError):
                    raise HardwareError(f"{source}: '{k}' must be a number, got {v!r}") from None
                if out[k] < 0 or (k in ("flops", "mem_bw", "memory", "intra_bw", "inter_bw") and out[k] <= 0):
                    raise HardwareError(f"{source}: '{k}' must be positive, got {v!r}")
        return cls(**out)

    def save(self, path, measured: dict | None = None) -> None:
        """Write the figures as YAML (with `measured`: the raw measurements they were fitted from)."""
        import yaml

        data = self.to_dict()
        if measured:
            data["measured"] = measured
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path) -> "Hardware":
        """Figures written by `save` / `reflow profile`."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise HardwareError(f"hardware file {p} does not exist; write one with `reflow profile --out {p}` or "
                                f"use --preset ({', '.join(PRESETS)})")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise HardwareError(f"hardware file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data or {}, source=str(p))


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
    """A preset by name (a100-80g, h100-80g, cpu) or a YAML file from `reflow profile` (a name ending in
    .yaml / .yml), optionally with figures overridden."""
    if isinstance(name, Hardware):
        hw = name
    elif isinstance(name, (str, Path)) and str(name).endswith((".yaml", ".yml")):
        hw = Hardware.load(name)
    elif name in PRESETS:
        hw = PRESETS[name]
    else:
        raise HardwareError(f"unknown hardware preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return hw.with_(**overrides) if overrides else hw
