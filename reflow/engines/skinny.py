"""Few-row linear layers for CPU decode: compute y^T = W x^T instead of y = x W^T.

A decode step multiplies b live rows (b small, often 1-16 in a long tail) by every weight matrix:
x [b, K] times W^T, W [N, K] with N, K in the hundreds to tens of thousands. CPU BLAS (MKL/oneDNN
sgemm, which `F.linear` reaches) handles this "skinny" shape poorly when the b rows are the M dimension of
the GEMM: measured on a 2-core EPYC with 2 threads, a [4, 576] x [576, 49152] LM head takes 12.8 ms (about
9 GB/s of a 78 GB/s memory bandwidth), while the same product as W [49152, 576] @ x^T [576, 4] takes
3.6 ms. The second orientation puts the large N in the M dimension, where the kernel blocks well. Measured
ratios over the SmolLM2-135M shapes (`bench/generation.py --cases skinny` prints them for the machine at hand):

    rows b           1      4      16     64     256
    MLP up [1536]    1.1x   3.1x   1.5x   1.5x   1.2x
    LM head [49k]    1.0x   3.5x   1.8x   1.6x   1.2x

Both orientations compute the same sums in a different order, so results agree to float rounding (the
relative difference is that of any two BLAS blockings, ~1e-6 in fp32), not bit for bit.

`weight_major_linears(model)` switches the model's `nn.Linear` layers to the weight-major product for the
duration of one forward, for inputs of at most `max_rows` rows; it is entered around each decode forward
only (never across a yield of the streaming generator), so training and inference forwards that run while
a generation is suspended are untouched. GPU BLAS has no such asymmetry, and tensor-parallel (DTensor)
weights keep their own linear, so the switch applies to plain CPU weights only.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F

MAX_ROWS = 256  # above this the two orientations are within ~20% of each other (table above)


def _weight_major(layer: torch.nn.Linear, x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """layer(x) for x [..., K]: (W @ x^T)^T (+ bias) when x has at most `max_rows` rows, else F.linear.

    The result is the transposed view of the [N, rows] product (its consumers in a transformer block,
    elementwise ops and the next linear, take strided inputs at no measurable cost)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows > max_rows:
        return F.linear(x, layer.weight, layer.bias)
    flat = x.reshape(rows, x.shape[-1])
    if layer.bias is None:
        y = torch.mm(layer.weight, flat.t())
    else:
        y = torch.addmm(layer.bias[:, None], layer.weight, flat.t())
    return y.t().reshape(*x.shape[:-1], layer.weight.shape[0])


def eligible_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The model's nn.Linear layers whose weight is a plain CPU tensor (not DTensor, not on an accelerator)."""
    from torch.distributed.tensor import DTensor

    return [m for m in model.modules() if type(m) is torch.nn.Linear and not isinstance(m.weight, DTensor)
            and m.weight.device.type == "cpu"]


@contextlib.contextmanager
def weight_major_linears(layers: list[torch.nn.Linear], max_rows: int = MAX_ROWS):
    """Within the block, every layer in `layers` computes (W @ x^T)^T for inputs of <= max_rows rows.

    The override is an instance attribute (`layer.forward`), removed on exit even on error, so the
    modules are left exactly as they were (no state is kept on them between forwards)."""
    for layer in layers:
        layer.forward = partial(_weight_major, layer, max_rows=max_rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
