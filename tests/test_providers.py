"""Execution providers: names, missing plugins, and the cross-provider check (CPU vs OpenVINO, WebGPU) on a tiny
exported model. The plugin tests skip when the plugin package is absent (CI installs the [openvino] extra) or offers no device on
the CPU at hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from amp_edge_runtime import providers
from amp_edge_runtime.crosscheck import Bounds, cross_check
from amp_edge_runtime.decoder import OnnxDecoder
from amp_edge_runtime.errors import ProviderError, ProviderMismatchError
from exporters import ExportOptions, GraphSpec, QuantSpec, export
from tests.conftest import run_cli
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The tiny GQA Llama exported dense: fp32 with GroupQueryAttention, fp32 plain attention, int4."""
    root = tmp_path_factory.mktemp("providers")
    src = save_tiny("llama-gqa", root / "src")
    out = {}
    for name, attention, dtype in (("gqa", "auto", "fp32"), ("sdpa", "sdpa", "fp32"), ("int4", "auto", "int4")):
        out[name] = root / name
        export(str(src), out[name], ExportOptions(ratio=0, graph=GraphSpec(attention=attention), quant=QuantSpec(dtype),
                                                  min_top1=0.0 if dtype == "int4" else None))
    return out


def test_unknown_and_missing_providers(packages, monkeypatch):
    with pytest.raises(ProviderError, match="unknown provider 'tpu'; choose from cpu, cuda, openvino, webgpu, tensorrt-rtx"):
        OnnxDecoder(packages["gqa"], provider="tpu")
    monkeypatch.setitem(providers.PLUGINS, "openvino", providers.Plugin("NoSuchEP", "no_such_ep_package", "openvino"))
    with pytest.raises(ProviderError, match=r"needs the no-such-ep-package package: pip install 'amp-edge\[openvino\]'"):
        OnnxDecoder(packages["gqa"], provider="openvino")
    result = run_cli("validate", packages["gqa"], "--provider", "openvino")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "amp-edge[openvino]" in result.output


def _openvino():
    pytest.importorskip("onnxruntime_ep_openvino", reason="the [openvino] extra is not installed")
    from amp_edge_runtime.providers import devices

    try:
        devices("openvino")
    except ProviderError as e:  # seen: the 1.8.1 plugin listed no device on an AMD EPYC with AVX2 and no AVX-512
        pytest.skip(f"OpenVINO has no device on this CPU: {e}")


@pytest.mark.parametrize("name", ["gqa", "sdpa"])
def test_openvino_computes_what_cpu_computes(packages, name):
    _openvino()
    report = cross_check(packages[name], "openvino", new_tokens=8)
    # measured 8.5e-6 (gqa) with the f32 precision hint; without it the CPU plugin runs bf16 on AMX CPUs (0.17-0.23)
    assert report["ok"] and report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-4 and report["greedy_equal"]
    placed = report["placement"]
    assert placed["OpenVINOExecutionProvider"]["ops"]["MatMul"] >= 3 * 4
    if name == "gqa":  # OpenVINO has no GroupQueryAttention: each layer's attention falls back to the CPU provider
        assert placed["CPUExecutionProvider"]["ops"] == {"GroupQueryAttention": 3}
    else:  # the plain attention graph (RotaryEmbedding included) runs entirely in OpenVINO, as one subgraph
        assert list(placed) == ["OpenVINOExecutionProvider"] and placed["OpenVINOExecutionProvider"]["subgraphs"] == 1
        assert placed["OpenVINOExecutionProvider"]["ops"]["RotaryEmbedding"] == 6


def test_openvino_int4_bounds_and_validate_cli(packages):
    _openvino()
    report = cross_check(packages["int4"], "openvino", new_tokens=8)
    # OpenVINO computes MatMulNBits with other activations than ORT's int8 path (accuracy_level 4): measured top-1
    # 0.93-0.98, max |Δlogits| 0.19 on logits up to 6.6; the quantized bounds are top-1 0.9 and 0.2 x max |logit|
    assert report["ok"] and report["top1_agreement"] >= 0.9 and 0.01 < report["max_abs_diff"] < 0.5
    assert report["bounds"]["greedy"] is False
    with pytest.raises(ProviderMismatchError, match=r"provider openvino computes something else than cpu .*max \|Δlogits\|"):
        cross_check(packages["int4"], "openvino", Bounds(max_abs_diff=1e-3), new_tokens=4)
    ok = run_cli("validate", packages["gqa"], "--provider", "openvino", "--json", "--new-tokens", "4")
    assert ok.exit_code == 0, ok.output
    body = json.loads(ok.output[ok.output.index("{"):])
    assert body["ok"] and body["provider"]["ep"] == "OpenVINOExecutionProvider" and body["provider"]["device_type"] == "CPU"
    bad = run_cli("validate", packages["int4"], "--provider", "openvino", "--max-abs-diff", "1e-6", "--new-tokens", "4")
    assert bad.exit_code == 1 and "error: provider openvino computes something else" in bad.output


def test_webgpu_runs_or_says_why(packages):
    pytest.importorskip("onnxruntime_ep_webgpu", reason="the [webgpu] extra is not installed")
    try:
        report = cross_check(packages["gqa"], "webgpu", new_tokens=4)
    except ProviderError as e:  # no GPU: no device, or Mesa's lavapipe rejected by Dawn (measured on Debian 12)
        assert str(e).startswith("provider webgpu ") and "\n" not in str(e)
        pytest.skip(f"WebGPU has no working device here: {e}")
    assert report["ok"] and report["top1_agreement"] >= 0.98 and np.isfinite(report["max_abs_diff"])


def test_webgpu_software_adapter_error_is_one_line(packages, monkeypatch):
    pytest.importorskip("onnxruntime_ep_webgpu", reason="the [webgpu] extra is not installed")
    if os.environ.get(providers.WEBGPU_SOFTWARE) == "1":
        pytest.skip("the software adapter is already allowed in this process")
    with pytest.raises(ProviderError) as info:
        try:
            providers.devices("webgpu")
        except ProviderError:
            raise
        else:
            pytest.skip("a WebGPU device exists here (a GPU)")
    assert providers.WEBGPU_SOFTWARE in str(info.value)


def test_bench_runs_on_openvino(packages):
    _openvino()
    from runtime_bench.bench import BenchSpec, run_bench

    report = run_bench([str(packages["gqa"])], BenchSpec("openvino", None, (8,), 4, 1, 1, 0))
    assert report["environment"]["provider"] == "openvino"
    row = report["rows"][0]
    assert len(row["samples"]) == 1 and len(row["samples"][0]["decode_ms"]) == 3 and row["decode_ms_p50"] > 0


def test_tensorrt_rtx_missing_package_or_driver_is_one_line(packages, monkeypatch, tmp_path):
    """The TensorRT-RTX plugin is a GPU-machine extra: absent, the error names it; present without an NVIDIA driver,
    registration fails in one line (its library needs libcuda.so.1, measured with the 0.5.0 wheel here)."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "onnxruntime_ep_nv_tensorrt_rtx", None)  # as if not installed
    result = run_cli("validate", packages["gqa"], "--provider", "tensorrt-rtx")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "onnxruntime-ep-nv-tensorrt-rtx package: pip install 'amp-edge[tensorrt-rtx]'" in result.output
    fake = types.ModuleType("onnxruntime_ep_nv_tensorrt_rtx")
    fake.get_library_path = lambda: str(tmp_path / "libonnxruntime_providers_nv_tensorrt_rtx.so")
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_nv_tensorrt_rtx", fake)
    with pytest.raises(ProviderError, match=r"^cannot register provider tensorrt-rtx with onnxruntime [\d.]+: ") as info:
        OnnxDecoder(packages["gqa"], provider="tensorrt-rtx")
    assert "\n" not in str(info.value)
