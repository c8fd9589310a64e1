"""heap_for_training_loop: a training loop's repeated large buffers stop costing fresh pages, and glibc is put back."""

import resource

import pytest
import torch

from amp_edge.memory import cap_heap_growth, heap_for_training_loop, libc_handle


def _faults_per_round(rounds: int = 4) -> list[int]:
    out = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(8 << 20)  # 32 MiB: mmapped under the CLI's heap cap
        b = a * 2
        del a, b
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


@pytest.mark.skipif(libc_handle() is None or not hasattr(libc_handle(), "mallopt"), reason="glibc's mallopt only")
def test_training_loop_reuses_freed_buffers_and_restores_the_cap(monkeypatch):
    monkeypatch.delenv("AMP_EDGE_HEAP_CAP", raising=False)
    assert cap_heap_growth()
    pages = 2 * (32 << 20) // 4096
    assert min(_faults_per_round()) > 0.9 * pages  # capped: both buffers freshly mapped every round
    with heap_for_training_loop() as held:
        assert held
        inside = _faults_per_round()
    assert max(inside[2:]) < 0.05 * pages, inside  # after the heap has grown once, no fresh pages
    assert min(_faults_per_round()) > 0.9 * pages  # the cap is back


def test_heap_left_alone_when_the_user_says_off(monkeypatch):
    monkeypatch.setenv("AMP_EDGE_HEAP_CAP", "off")
    with heap_for_training_loop() as held:
        assert not held
