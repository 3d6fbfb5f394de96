"""Layouts: how one model is spread over a mesh, written `dXtYpZ` (data, tensor, pipeline degrees).

Ranks of a layout are laid out pipeline-major, then data, then tensor (tensor-parallel peers are
adjacent ranks, as they want the fastest links):

    rank index i (into the layout's rank list) -> (pp, dp, tp) = (i // (d*t), (i // t) % d, i % t)

`validate_layout` checks a layout against a model config and a rank list before anything starts and
says which number is wrong and what would fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYOUT_RE = re.compile(r"^d(\d+)t(\d+)p(\d+)$")


class LayoutError(ValueError):
    """A layout that cannot run this model on these ranks; the message says what would fit."""


@dataclass(frozen=True)
class Layout:
    d: int = 1  # data-parallel degree (FSDP2 shards within a data-parallel group)
    t: int = 1  # tensor-parallel degree (attention heads / MLP columns split)
    p: int = 1  # pipeline-parallel degree (layers split into stages)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        m = LAYOUT_RE.match(text.strip())
        if not m:
            raise LayoutError(f"layout '{text}' is not of the form dXtYpZ, e.g. d2t1p1 or d1t2p2")
        d, t, p = (int(x) for x in m.groups())
        if min(d, t, p) < 1:
            raise LayoutError(f"layout '{text}': every degree must be >= 1")
        return cls(d, t, p)

    @property
    def size(self) -> int:
        return self.d * self.t * self.p

    def coords(self, index: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of the index-th rank of the layout."""
        return index // (self.d * self.t), (index // self.t) % self.d, index % self.t

    def __str__(self) -> str:
        return f"d{self.d}t{self.t}p{self.p}"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def validate_layout(layout: Layout, model_config, ranks: list[int] | None = None, world_size: int | None = None,
                    source: str = "model") -> None:
    """Raise LayoutError unless `layout` fits the model and the ranks (checked before any work starts)."""
    if ranks is not None:
        if len(set(ranks)) != len(ranks):
            raise LayoutError(f"layout {layout}: rank list {ranks} repeats a rank")
        if layout.size != len(ranks):
            raise LayoutError(f"layout {layout} needs d*t*p = {layout.size} ranks but {len(ranks)} were given "
                              f"({ranks}); use a layout whose degrees multiply to {len(ranks)}")
        if world_size is not None and any(r < 0 or r >= world_size for r in ranks):
            bad = [r for r in ranks if r < 0 or r >= world_size]
            raise LayoutError(f"layout {layout}: ranks {bad} do not exist (world size {world_size})")
    c = model_config
    # Embeddings and the output head stay replicated (see parallelize.py), so the vocabulary is not split
    # and need not divide by t; vocab-parallel embeddings will add "vocab_size" here.
    checks = {
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
    }
    for key, value in checks.items():
        if value % layout.t:
            fits = [k for k in _divisors(checks["num_key_value_heads"]) if all(v % k == 0 for v in checks.values())]
            raise LayoutError(f"layout {layout}: tensor degree t={layout.t} does not divide {key}={value} of {source}; "
                              f"t must divide heads, KV heads and intermediate size: t in {fits} would fit")
    if layout.p > c.num_hidden_layers:
        raise LayoutError(f"layout {layout}: pipeline degree p={layout.p} exceeds the {c.num_hidden_layers} layers "
                          f"of {source}; use p <= {c.num_hidden_layers}")
