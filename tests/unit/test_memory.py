"""runtime/training.reuse_freed_memory: the CPU allocator setting every stage applies (train.reuse_memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_reuse_freed_memory_stops_page_faulting_large_tensors():
    """After reuse_freed_memory (every CPU stage's default, train.reuse_memory) a freed 48 MB tensor's pages
    serve the next one; before, each allocation over glibc's 32 MB mmap ceiling faulted its pages in anew.
    Its own process: the setting is process-wide and permanent."""
    code = (
        "import resource, torch\n"
        "from rlhfkit.runtime.training import reuse_freed_memory\n"
        "def faults():\n"
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        torch.zeros(12_000_000)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0\n"
        "before = faults()\n"
        "assert reuse_freed_memory(), 'not glibc'\n"
        "faults()\n"
        "print(before, faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "not glibc" in out.stderr:
        pytest.skip("libc is not glibc")
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split())
    assert before > 5 * 10_000  # 48 MB = 11.7k pages, each time
    assert after < before / 20
