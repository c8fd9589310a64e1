"""Execution providers by short name: the built-in CPU and CUDA ones, and plugin EPs installed from PyPI.

Plugin EPs (``onnxruntime-ep-openvino``, ``onnxruntime-ep-webgpu``) are registered the current way: their library
with ``onnxruntime.register_execution_provider_library``, their devices from ``onnxruntime.get_ep_devices()``,
added to the session options with ``SessionOptions.add_provider_for_devices``. A missing package, library or
device is a ``ProviderError``: one line, exit 2.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from dataclasses import dataclass

import onnxruntime as ort

from amp_edge_runtime.errors import ProviderError


@dataclass(frozen=True)
class Plugin:
    ep_name: str
    module: str  # the Python package that ships the library
    extra: str  # amp-edge's pip extra that installs it


BUILTIN = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PLUGINS = {
    "openvino": Plugin("OpenVINOExecutionProvider", "onnxruntime_ep_openvino", "openvino"),
    "webgpu": Plugin("WebGpuExecutionProvider", "onnxruntime_ep_webgpu", "webgpu"),
    # NVIDIA's TensorRT for RTX (CUDA 13 build, TensorRT-RTX bundled in the wheel, ~150 MB): needs the NVIDIA driver
    "tensorrt-rtx": Plugin("NvTensorRTRTXExecutionProvider", "onnxruntime_ep_nv_tensorrt_rtx", "tensorrt-rtx"),
}
PROVIDERS = (*BUILTIN, *PLUGINS)
# The OpenVINO CPU plugin computes in bf16 on CPUs with AMX/AVX512-BF16 unless told otherwise, and the EP's own
# `precision` option (FP32, ACCURACY) does not change that: measured on dense SmolLM2, max |Δlogits| 0.44 vs CPU with
# either value, 1.4e-4 with this hint. amp-edge asks for f32 so that a package computes what it was validated for.
OPENVINO_CPU_CONFIG = {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
# With no GPU, the WebGPU plugin offers a device only when allowed to use a software adapter (Mesa's lavapipe).
WEBGPU_SOFTWARE = "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER"
_registered: set[str] = set()


def check_name(provider: str) -> None:
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def register(provider: str) -> Plugin:
    """Register ``provider``'s plugin library once per process."""
    plugin = PLUGINS[provider]
    if plugin.ep_name in _registered:
        return plugin
    try:
        module = importlib.import_module(plugin.module)
    except ImportError:
        raise ProviderError(f"provider {provider} needs the {plugin.module.replace('_', '-')} package: "
                            f"pip install 'amp-edge[{plugin.extra}]'") from None
    try:
        ort.register_execution_provider_library(plugin.ep_name, module.get_library_path())
    except Exception as e:  # onnxruntime's untyped error: wrong onnxruntime version, missing libvulkan or libcuda
        hint = " (no NVIDIA driver here)" if "libcuda.so" in str(e) else ""
        raise ProviderError(f"cannot register provider {provider} with onnxruntime {ort.__version__}: "
                            f"{_first_line(e)}{hint}") from None
    _registered.add(plugin.ep_name)
    return plugin


def devices(provider: str) -> list:
    """The ``OrtEpDevice``s of a plugin provider (the first is used), after registering it."""
    plugin = register(provider)
    found = [d for d in ort.get_ep_devices() if d.ep_name == plugin.ep_name]
    if not found:
        hint = (f" (no GPU; a software Vulkan device needs {WEBGPU_SOFTWARE}=1 and mesa-vulkan-drivers)"
                if provider == "webgpu" and os.environ.get(WEBGPU_SOFTWARE) != "1" else "")
        raise ProviderError(f"provider {provider} is installed but offers no device here{hint}")
    return found[:1]


def provider_options(provider: str) -> dict[str, str]:
    if provider == "openvino":
        return {"device_type": "CPU", "load_config": _config_file("openvino_cpu.json", OPENVINO_CPU_CONFIG)}
    return {}


def apply(options: ort.SessionOptions, provider: str) -> list[str] | None:
    """Add ``provider`` to ``options``; returns the ``providers=`` list for InferenceSession (None for plugins,
    whose devices the options carry)."""
    check_name(provider)
    if provider in BUILTIN:
        name = BUILTIN[provider]
        available = ort.get_available_providers()
        if name not in available:
            raise ProviderError(f"provider {provider} is not available here (onnxruntime {ort.__version__} has: "
                                f"{', '.join(available)}); cuda needs onnxruntime-gpu and a GPU")
        return [name]
    options.add_provider_for_devices(devices(provider), provider_options(provider))
    return None


def describe(provider: str) -> dict:
    """What a report records about the provider's device."""
    if provider in BUILTIN:
        return {"provider": provider, "ep": BUILTIN[provider]}
    device = devices(provider)[0]
    meta = dict(device.ep_metadata)
    return {"provider": provider, "ep": device.ep_name, "device_type": str(device.device.type).rsplit(".", 1)[-1],
            "device": meta.get("FULL_DEVICE_NAME") or device.device.vendor, "ep_version": meta.get("version"),
            "options": provider_options(provider)}


def placement(session: ort.InferenceSession) -> dict:
    """Nodes and subgraphs per execution provider, by op type (the session must be made with
    ``session.record_ep_graph_assignment_info=1``)."""
    out: dict = {}
    for sub in session.get_provider_graph_assignment_info():
        entry = out.setdefault(sub.ep_name, {"subgraphs": 0, "nodes": 0, "ops": {}})
        entry["subgraphs"] += 1
        for node in sub.get_nodes():
            entry["nodes"] += 1
            entry["ops"][node.op_type] = entry["ops"].get(node.op_type, 0) + 1
    return out


def _config_file(name: str, content: dict) -> str:
    """The plugin reads its config from a file: one per process user, rewritten if it differs."""
    path = os.path.join(tempfile.gettempdir(), f"amp_edge_{os.getuid() if hasattr(os, 'getuid') else 0}_{name}")
    text = json.dumps(content)
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
