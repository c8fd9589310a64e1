"""Process memory: keep glibc from hoarding freed tensor buffers, and read peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's defaults, restored after heap_for_training_loop
_DEFAULT_TRIM_THRESHOLD = 128 << 10
_DEFAULT_TOP_PAD = 128 << 10
# Slack added to each heap extension while training: without it, a freed buffer is a few bytes short of the next
# aligned request of the same size (posix_memalign asks for more) and the heap grows, with fresh pages, every step
_TRAINING_TOP_PAD = 256 << 20
_TRIM_NEVER = -1  # mallopt(3): disables trimming
_MMAP_THRESHOLD_BYTES = 4 << 20
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit
# The mmap threshold is process-wide glibc state; the environment records it, so it is visible (and inherited by
# worker processes) without a module global. "off" set by the user keeps glibc's own dynamic threshold.
HEAP_CAP_ENV = "AMP_EDGE_HEAP_CAP"


def cap_heap_growth() -> bool:
    """Serve allocations of 4 MiB and more with mmap, so they go back to the OS when freed.

    glibc raises its mmap threshold after each large free; activation-sized temporaries then land on
    the heap and fragment it (measured: pruning SmolLM2-135M peaked at 1.85 GB instead of 1.12 GB).
    A fixed threshold stops that. A no-op off glibc, and where ``AMP_EDGE_HEAP_CAP=off``.
    """
    if os.environ.get(HEAP_CAP_ENV) == "off" or not _set_mmap_threshold(_MMAP_THRESHOLD_BYTES):
        return False
    os.environ[HEAP_CAP_ENV] = "on"
    return True


def heap_is_capped() -> bool:
    return os.environ.get(HEAP_CAP_ENV) == "on"


@contextmanager
def heap_for_growing_cache():
    """Lift the cap while ``generate()`` runs: its KV cache is copied into new, larger tensors at every token, and
    served by mmap each copy costs fresh zeroed pages (SmolLM2-135M, 128 rows, 2 cores: 106 tok/s capped, 151 not)."""
    lifted = heap_is_capped() and _set_mmap_threshold(_MMAP_THRESHOLD_MAX)
    try:
        yield
    finally:
        if lifted:
            _set_mmap_threshold(_MMAP_THRESHOLD_BYTES)
            trim_heap()


@contextmanager
def heap_for_training_loop():
    """Keep freed buffers on the heap while a training loop runs, and hand them back after.

    Each step allocates and frees the same large tensors (logits, gradients of the vocabulary-wide weights); served by
    mmap, every one costs fresh pages the kernel zero-fills on first touch. Gemma-3-270M distillation, 4 x 256 tokens a
    step, bf16, 2 cores (benchmarks/recovery_step.py): 13.6 s a step with 1.45M page faults, 8.3 s with none after
    the first steps, for 0.6 GB more peak RSS (8.2 GB). A no-op off glibc, and where ``AMP_EDGE_HEAP_CAP=off``
    (malloc left as glibc sets it).
    """
    libc = libc_handle()
    held = (os.environ.get(HEAP_CAP_ENV) != "off" and libc is not None and hasattr(libc, "mallopt")
            and bool(libc.mallopt(_M_MMAP_MAX, 0)))
    if held:
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER)
        libc.mallopt(_M_TOP_PAD, _TRAINING_TOP_PAD)
    try:
        yield held
    finally:
        if held:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD)
            trim_heap()


def _set_mmap_threshold(nbytes: int) -> bool:
    libc = libc_handle()
    return libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))


def release_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (weights under 4 MiB live on the heap)."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand free heap pages back to the OS (no garbage collection: cheap enough to call in a loop)."""
    libc = libc_handle()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def libc_handle():
    """The C library on Linux (glibc's mallopt/malloc_trim, renameat2), else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def available_bytes() -> int | None:
    """Memory the kernel says a new allocation can get without swapping (Linux MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
