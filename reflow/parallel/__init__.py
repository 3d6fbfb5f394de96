"""Parallel layouts: data (FSDP2), tensor (DTensor) and pipeline parallel degrees on an ordered list of ranks."""
