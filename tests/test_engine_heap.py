"""keep_heap: freed activations stay in the process heap (no page faults when the next pass
allocates the same size again).  Each case runs in its own interpreter: the setting is process-wide."""

import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "keep":
    from rayeval.eval.engines import keep_heap
    assert keep_heap()
x = torch.ones(1024, 576, dtype=torch.bfloat16)
ws = [torch.ones(6144, 576, dtype=torch.bfloat16)] * 8   # eight outputs of 12 MiB
def step():   # a layer's pattern: several activations alive at once, freed together
    ys = [torch.nn.functional.linear(x, w) for w in ws]
    del ys
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_heap_stops_page_faults_on_reallocation():
    default, kept = _faults("default"), _faults("keep")
    # 20 rounds of 96 MiB of activations: glibc's defaults trim the freed heap back to the kernel
    # and fault it in again (24,576 pages a round); kept in the heap, the same memory is reused
    assert default > 20 * 1000
    assert kept < default / 10
