"""minidiff/memory.py: after keep_freed_memory(), a network run again reuses the pages of its freed activations
instead of asking the kernel for fresh zero-filled ones (the cost it removes from every denoising step)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")

SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from minidiff.memory import keep_freed_memory
    keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])
x = torch.randn(2, 32, 256, 256)  # 16 MiB activations, as in a UNet's outer blocks
with torch.no_grad():
    net(x)  # the first pass may take fresh memory either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no MALLOC_* variables from the caller
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return int(result.stdout.strip())


def test_freed_memory_is_reused():
    pages = 3 * 4 * (16 << 20) // 4096  # 3 passes, 4 activations of 16 MiB each
    assert page_faults("default") > 0.9 * pages  # glibc's default: every activation is new memory (measured 1.5x)
    assert page_faults("keep") < 0.01 * pages  # measured 0
