"""Which slice of every parameter a rank holds under a layout: the map reallocation plans over.

A slice is a `Box`: one half-open index range per dimension of the full parameter. Under a layout
dXtYpZ on an ordered rank list, rank index i with coordinates (pp, dp, tp) = layout.coords(i) holds

    pipeline   decoder layer parameters `...layers.<l>....` only for l in its stage's layers
               (`stage_bounds`); embeddings, final norm and heads on every stage
    tensor     q/k/v (weight and bias) and gate/up weights: chunk tp of t along dim 0 (ColwiseParallel)
               o/down weights: chunk tp of t along dim 1 (RowwiseParallel); everything else whole
    data       sharded (train, FSDP2): chunk dp of d along dim 0 of the tensor-parallel slice, with
               torch.chunk's sizes (ceil(n/d) each, the last ones shorter or empty)
               replicated (generation, inference): the whole tensor-parallel slice on every dp rank

These rules mirror `parallelize.py` and `pipeline.py`; tests/parallel/test_shards.py checks them against
the local tensors of really parallelized modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.tensor import DTensor

from reflow.parallel.layout import Layout
from reflow.parallel.pipeline import stage_bounds

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
COLWISE = re.compile(r"\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")
ROWWISE = re.compile(r"\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")


@dataclass(frozen=True)
class Box:
    """A slice of a tensor: [starts[k], stops[k]) along every dimension k."""

    starts: tuple[int, ...]
    stops: tuple[int, ...]

    @classmethod
    def full(cls, shape) -> "Box":
        return cls(tuple(0 for _ in shape), tuple(int(s) for s in shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.starts, self.stops))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= max(0, s)
        return n

    def intersect(self, other: "Box") -> "Box | None":
        starts = tuple(max(a, b) for a, b in zip(self.starts, other.starts))
        stops = tuple(min(a, b) for a, b in zip(self.stops, other.stops))
        box = Box(starts, stops)
        return box if all(b > a for a, b in zip(starts, stops)) else None

    def contains(self, other: "Box") -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.starts, self.stops, other.starts, other.stops))

    def narrow(self, dim: int, parts: int, index: int) -> "Box":
        """Chunk `index` of `parts` along `dim`, with torch.chunk's sizes (ceil(n/parts), possibly empty)."""
        a, b = self.starts[dim], self.stops[dim]
        size = -(-(b - a) // parts)
        lo, hi = min(b, a + index * size), min(b, a + (index + 1) * size)
        return Box(self.starts[:dim] + (lo,) + self.starts[dim + 1:], self.stops[:dim] + (hi,) + self.stops[dim + 1:])

    def slices(self, within: "Box | None" = None) -> tuple[slice, ...]:
        """Index of this box in a tensor holding `within` (default: the full tensor)."""
        off = within.starts if within is not None else (0,) * len(self.starts)
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.starts, self.stops, off))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.starts, self.stops)) + "]"


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def tensor_dim(name: str) -> int | None:
    """Dimension a tensor-parallel layout splits parameter `name` along (None: replicated)."""
    if layer_index(name) is None:
        return None
    if COLWISE.search(name):
        return 0
    if ROWWISE.search(name):
        return 1
    return None


@dataclass(frozen=True)
class Sharding:
    """A model's parameters spread over `ranks` by `layout`.

    shapes: full shape of every parameter, by its plain HF name (`canonical_name`)
    shard_data: True for a train engine (FSDP2 shards over data-parallel ranks), False for replicas
    """

    layout: Layout
    ranks: tuple[int, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    num_layers: int
    shard_data: bool = True

    @classmethod
    def of(cls, layout: Layout | str, ranks, shapes: dict[str, tuple[int, ...]], num_layers: int,
           shard_data: bool = True) -> "Sharding":
        layout = Layout.parse(layout) if isinstance(layout, str) else layout
        shapes_t = tuple((n, tuple(int(s) for s in shape)) for n, shape in shapes.items())
        return cls(layout, tuple(int(r) for r in ranks), shapes_t, int(num_layers), shard_data)

    @classmethod
    def of_model(cls, model: torch.nn.Module, layout, ranks, shard_data: bool = True) -> "Sharding":
        """From any copy of the model (whole, sharded or a pipeline stage): the full names and shapes come
        from an empty (meta) model of the same class and config."""
        from reflow.models.empty import empty_model

        # FSDP2 swaps the class for a generated FSDP<name> subclass: build the original one
        model_cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
        shapes = param_shapes(empty_model(model_cls, model.config))
        return cls.of(layout, ranks, shapes, model.config.num_hidden_layers, shard_data)

    def only(self, names) -> "Sharding":
        """The same layout over a subset of the parameters (a LoRA role's adapters: what changes in training)."""
        keep = set(names)
        return Sharding(self.layout, self.ranks, tuple((n, s) for n, s in self.shapes if n in keep), self.num_layers,
                        self.shard_data)

    @cached_property
    def shape_of(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def box(self, rank: int, name: str) -> Box | None:
        """The slice of parameter `name` that global rank `rank` holds (None: none of it)."""
        if rank not in self.ranks:
            return None
        L = self.layout
        pp, dp, tp = L.coords(self.ranks.index(rank))
        layer = layer_index(name)
        if layer is not None:
            a, b = stage_bounds(self.num_layers, L.p, pp)
            if not a <= layer < b:
                return None
        box = Box.full(self.shape_of[name])
        dim = tensor_dim(name)
        if dim is not None and L.t > 1:
            box = box.narrow(dim, L.t, tp)
        if self.shard_data and L.d > 1:
            box = box.narrow(0, L.d, dp)
            if box.numel == 0:
                return None
        return box

    def holders(self, name: str) -> dict[Box, list[int]]:
        """Distinct slices of `name` and the ranks holding each (replicas share a slice)."""
        out: dict[Box, list[int]] = {}
        for r in self.ranks:
            b = self.box(r, name)
            if b is not None:
                out.setdefault(b, []).append(r)
        return out

    def local_bytes(self, rank: int, dtype_bytes: int = 4) -> int:
        return sum(b.numel for n in self.shape_of if (b := self.box(rank, n)) is not None) * dtype_bytes

    def describe(self) -> str:
        return f"{self.layout} on ranks {list(self.ranks)} ({'sharded' if self.shard_data else 'replicated'} data)"


def canonical_name(name: str) -> str:
    """A parameter's plain HF name: pipeline stages wrap boundary layers in Recv/Send (see pipeline.py)."""
    return name.replace(".recv_mod.layer.", ".").replace(".layer.", ".")


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full shapes by plain name; DTensor parameters report their global shape."""
    return {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of every parameter it holds, by plain name, as plain tensors sharing the storage
    (DTensor -> its local tensor), so writing into them writes the module's weights."""
    out = {}
    for n, p in model.named_parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        out[canonical_name(n)] = t.data
    return out
