"""heap_for_training_loop: a training loop's repeated large buffers stop costing fresh pages, and glibc is put back.

glibc's heap is process-wide state that earlier tests leave behind (free chunks large enough to serve the buffers
below), so the measurement runs in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

from amp_edge.memory import heap_for_training_loop, libc_handle

_PROBE = r"""
import json, resource, torch
from amp_edge.memory import cap_heap_growth, heap_for_training_loop

def rounds(n=4, floats=8 << 20):
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(floats)  # 32 MiB: mmapped under the CLI's heap cap
        b = a * 2
        del a, b
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

assert cap_heap_growth()
capped = rounds()
with heap_for_training_loop() as held:
    inside = rounds(8)
print(json.dumps({"capped": capped, "held": held, "inside": inside, "after": rounds(3, 32 << 20)}))  # larger than any chunk left free
"""


@pytest.mark.skipif(libc_handle() is None or not hasattr(libc_handle(), "mallopt"), reason="glibc's mallopt only")
def test_training_loop_reuses_freed_buffers_and_restores_the_cap():
    env = {k: v for k, v in os.environ.items() if k != "AMP_EDGE_HEAP_CAP"}
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    pages = 2 * (32 << 20) // 4096
    assert got["held"] and min(got["capped"]) > 0.9 * pages, got  # capped: both buffers freshly mapped every round
    inside = got["inside"][3:]  # once the heap has grown to fit the loop: few fresh pages (glibc regrows it now and then)
    assert sum(inside) / len(inside) < 0.25 * pages, got
    assert min(got["after"]) > 0.9 * 4 * pages, got  # the cap is back: 128 MiB buffers freshly mapped each round


def test_heap_left_alone_when_the_user_says_off(monkeypatch):
    monkeypatch.setenv("AMP_EDGE_HEAP_CAP", "off")
    with heap_for_training_loop() as held:
        assert not held
