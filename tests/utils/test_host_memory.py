"""tune_host_allocator: tensors up to 32 MiB come from glibc's heap, and freed heap memory stays with it."""

import subprocess
import sys

import pytest

# A fresh interpreter: allocate 8 tensors of 16 MiB, touch and free them; then read glibc's mallinfo2: the
# free bytes kept in the heap (fordblks) and the bytes in mmapped chunks (hblkhd).
PROBE = """
import ctypes, sys, torch
from reflow.utils.host_memory import tune_host_allocator
applied = tune_host_allocator() if sys.argv[1] == "tuned" else None
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
xs = [torch.empty(4 << 20).fill_(1.0) for _ in range(8)]
mapped = libc.mallinfo2().hblkhd
del xs
print(applied, mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


def probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, mapped_mib, kept_mib = out.split()
    return applied, int(mapped_mib), int(kept_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_tuned_allocator_serves_16_mib_tensors_from_the_heap_and_keeps_them_after_free_where_the_default_maps_them():
    applied, mapped, kept = probe("tuned")
    _, default_mapped, default_kept = probe("default")
    assert applied == "True"
    assert mapped < 16 and kept >= 128  # all eight from the heap, and the 128 MiB stay there after free
    assert default_mapped >= 112 and default_kept < 64  # the default maps them (and unmaps them on free)
