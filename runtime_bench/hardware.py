"""What the machine can do: memory bandwidth (a copy benchmark), CPU/GPU names, peak RSS."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time

import numpy as np


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by a large numpy copy (read + write), best of ``repeats``.

    Single-threaded, like most of a decode step's memory traffic on small CPUs; on machines where one
    core cannot saturate memory this understates the limit, so a row can run faster than "1.0x".
    """
    src = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def session_copy_bandwidth(provider: str = "CUDAExecutionProvider", megabytes: int = 256, repeats: int = 5) -> float | None:
    """Bytes per second an ONNX Runtime session moves through memory on ``provider``'s device: Y = X + 0 over a
    buffer of ``megabytes``, both tensors bound on the device (read + write), best of ``repeats``. The limit for a
    CUDA row is the GPU's memory, not the host's. None without the onnx package (needed to build the graph)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime as ort

    graph = helper.make_graph([helper.make_node("Add", ["x", "zero"], ["y"])], "copy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    n = megabytes * 2**20 // 4
    x = ort.OrtValue.ortvalue_from_numpy(np.ones(n, np.float32), device, 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, device, 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_output("y", y)
    session.run_with_iobinding(binding)  # warm-up: kernels loaded, memory touched
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        session.run_with_iobinding(binding)  # returns after the device finished
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def gpu_name() -> str | None:
    """The first GPU's name, from nvidia-smi; None where there is none."""
    lines = _nvidia_smi("--query-gpu=name", "--format=csv,noheader")
    return lines[0] if lines else None


def gpu_memory_bytes(pid: int) -> int | None:
    """GPU memory held by process ``pid`` (its CUDA context, arena and buffers), from nvidia-smi; None where nvidia-smi
    is missing or does not list the process (a container's PID namespace can hide it)."""
    used = [line.split(",") for line in _nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")]
    mib = [int(m) for p, m in (u for u in used if len(u) == 2) if p.strip() == str(pid) and m.strip().isdigit()]
    return sum(mib) * 2**20 if mib else None


def _nvidia_smi(*args: str) -> list[str]:
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """This process's own peak: VmHWM on Linux (ru_maxrss would carry over the forking parent's RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
