"""Keep freed activation memory in the process instead of handing it back to the OS (Linux, glibc).

PyTorch's CPU allocator is plain malloc. glibc serves large blocks with a fresh mmap and trims the heap
when its top grows past a threshold, so every denoising step asks the kernel for new pages that it must
zero-fill: measured at SD 1.5, 256x256, fp32, 5.3M page faults and ~25% of txt2img time. glibc raises
those thresholds by itself after the first large free of an mmapped block, which a loader that reads
weights into malloc'd memory triggers by accident; minidiff memory-maps its weights, so it never does.
We set the two thresholds once, as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables would.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
THRESHOLD = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap

_done = False


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed blocks up to 1 GiB; once per process, a no-op off glibc or when the user set
    the thresholds through the environment."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return
    mallopt(M_MMAP_THRESHOLD, THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, THRESHOLD)
