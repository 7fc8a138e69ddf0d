"""minidiff/loading/memory.py: after keep_freed_memory(), a network run again reuses the pages of its freed activations
instead of asking the kernel for fresh zero-filled ones (the cost it removes from every denoising step).

Measured per pass over many passes, compared by the median: a one-off fault (a heap that grows once because
of where the first passes left its free blocks, which depends on what the process imported before) moves one
pass, not the median, so the test does not depend on the working directory or the import order."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")

PASSES = 12
SCRIPT = f"""
import resource, statistics, sys, torch
if sys.argv[1] == "keep":
    from minidiff.loading.memory import keep_freed_memory
    keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])
x = torch.randn(2, 32, 256, 256)  # 16 MiB activations, as in a UNet's outer blocks
faults = []
with torch.no_grad():
    net(x)  # the first pass takes fresh memory either way
    for _ in range({PASSES}):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def median_page_faults(mode: str) -> float:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no MALLOC_* variables from the caller
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.strip())


def test_freed_memory_is_reused():
    pages = 4 * (16 << 20) // 4096  # one pass: 4 activations of 16 MiB each
    assert median_page_faults("default") > 0.9 * pages  # glibc's default: every activation is new memory
    assert median_page_faults("keep") < 0.01 * pages  # measured 0 in every pass after the first
