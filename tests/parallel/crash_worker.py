"""A worker for the launcher tests that dies without reporting (as a segfault or an OOM kill would)."""

import os


def die(rank, world):
    os._exit(17)


def raise_while_peer_waits(rank, world):
    """Rank 1 raises; rank 0 waits in a group creation rank 1 never joins (the store wait does not obey
    the collective timeout), so only the launcher's grace period can end it."""
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("bad reward function")
    dist.new_group([0, 1])
