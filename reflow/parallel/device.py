"""Where a worker computes: the one placement function every model, batch and optimizer state goes through.

    runtime.device = auto  -> cuda:<local index> when CUDA is available, else cpu
                     cuda  -> cuda:<local index> (an error when CUDA is not available)
                     cpu   -> cpu
A Ray worker sees only the GPU Ray gave it (CUDA_VISIBLE_DEVICES), so its local index is 0. The collective
backend follows the device: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device request this machine cannot honour."""


def resolve_device(pref: str = "auto", local_index: int = 0) -> torch.device:
    if pref not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"runtime.device must be auto, cpu or cuda, got {pref!r}")
    if pref == "cuda" and not torch.cuda.is_available():
        raise DeviceError("runtime.device=cuda but torch sees no CUDA device; use runtime.device=auto or cpu")
    if pref != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_index)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, and gloo beside it on CUDA: small CPU tensors (micro-batch counts, loss sums,
    a grad norm, CPU-held EMA shadows) still go through collectives."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def place(obj, device: torch.device):
    """A module, tensor or SampleBatch on `device` (modules in place, as torch does)."""
    return obj.to(device)
