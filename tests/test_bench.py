"""Bench: interleaved runs in worker processes, reports, provider selection, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from amp_edge import CalibrationSpec
from amp_edge.cli import app
from amp_edge.errors import BenchError
from amp_edge.pruning.pipeline import PruneOptions
from exporters import ExportOptions, QuantSpec, export
from runtime_bench.bench import BenchSpec, run_bench
from tests.conftest import SMALL_CALIB
from tests.tiny import save_tiny

MIN_TOP1 = 0.34  # the int4 package's agreement with PyTorch, measured 0.386 on this fixed tiny model


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense = save_tiny("llama", root / "dense")
    export(str(dense), root / "dense-fp32", ExportOptions(ratio=0))
    prune_opts = PruneOptions(calibration=CalibrationSpec(**SMALL_CALIB))
    export(str(dense), root / "amp30-int4", ExportOptions(ratio=0.3, prune=prune_opts, quant=QuantSpec("int4"), min_top1=MIN_TOP1))
    return root


def test_report_rows_ratios_and_limit(packages):
    spec = BenchSpec(threads=1, prompt_lens=(8, 16), gen_len=6, repeat=2, warmup=1)
    report = run_bench([str(packages / "dense-fp32"), str(packages / "amp30-int4")], spec, torch_reference=True)
    rows = report["rows"]
    assert len(rows) == 3 * 2 and report["baseline"] == "dense-fp32"
    env = report["environment"]
    assert env["provider"] == "cpu" and env["copy_bandwidth_bytes_per_s"] > 1e8 and env["onnxruntime"]
    for r in rows:
        assert len(r["samples"]) == 2 and all(len(s["decode_ms"]) == 5 for s in r["samples"])
        assert r["decode_ms_p50"] > 0 and r["peak_rss"] > 10 * 2**20 and r["kv_bytes_end"] > 0
    base = [r for r in rows if r["name"] == "dense-fp32"]
    assert all(r["decode_speedup_vs_baseline"] == pytest.approx(1.0) for r in base)
    int4 = [r for r in rows if r["name"] == "amp30-int4"]
    assert all(r["bytes_ratio_vs_baseline"] > 2 for r in int4)  # 30% fewer weights at 4 bits read far less
    torch_rows = [r for r in rows if r["kind"] == "torch"]
    assert torch_rows and all(r["limit_ms"] is None for r in torch_rows)
    # KV bytes at the end: layers x 2 x kv_heads x (prompt + new - 1) x head_dim x 4 bytes (fp32)
    r8 = next(r for r in base if r["prompt_len"] == 8)
    assert r8["kv_bytes_end"] == 3 * 2 * 2 * (8 + 6 - 1) * 8 * 4


def test_cli_writes_json_markdown_png(packages, tmp_path):
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["bench", str(packages / "dense-fp32"), str(packages / "amp30-int4"), "--prompt-len", "8",
                                 "--gen-len", "4", "--repeat", "1", "--warmup", "0", "--threads", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"]
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    assert (out / "bench.png").stat().st_size > 1000 and "| amp30-int4 |" in (out / "bench.md").read_text()


def test_bad_input(packages, tmp_path):
    spec = BenchSpec(prompt_lens=(8,), gen_len=2, repeat=1, warmup=0)
    with pytest.raises(BenchError, match="not a package"):
        run_bench([str(tmp_path)], spec)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(BenchError, match="not a readable ONNX graph"):
        run_bench([str(corrupt)], spec)
    with pytest.raises(BenchError, match="unknown provider 'tpu'"):
        run_bench([str(packages / "dense-fp32")], BenchSpec(provider="tpu"))
    with pytest.raises(BenchError, match="exceeds"):
        run_bench([str(packages / "dense-fp32")], BenchSpec(prompt_lens=(300,), gen_len=2))
    runner = CliRunner()
    r = runner.invoke(app, ["bench", str(packages / "dense-fp32"), "--provider", "cuda", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not available" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    # raised while the progress display is up: still exactly one line, no blank line left by the display before it
    r = runner.invoke(app, ["bench", str(corrupt), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.splitlines()) == 1, repr(r.output)


def test_thread_spinning_is_a_choice():
    from amp_edge_runtime.session import session_options

    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options(2, spin=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_decoder_takes_head_size_from_genai_config_when_the_graph_leaves_it_symbolic(packages, tmp_path):
    """The model builder's graphs name the KV head size 'kv_cache_dim'; genai_config.json gives its value."""
    import shutil

    import numpy as np
    import onnx

    from amp_edge_runtime.decoder import OnnxDecoder
    from amp_edge_runtime.errors import PackageError

    pkg = tmp_path / "symbolic"
    shutil.copytree(packages / "dense-fp32", pkg)
    graph = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    for value in [*graph.graph.input, *graph.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    onnx.save(graph, str(pkg / "model.onnx"))
    ids = np.array([[5, 9, 14, 20, 33]])
    want = OnnxDecoder(packages / "dense-fp32").generate(ids, 6)
    assert OnnxDecoder(pkg).head_dim == OnnxDecoder(packages / "dense-fp32").head_dim
    assert np.array_equal(OnnxDecoder(pkg).generate(ids, 6), want)
    (pkg / "genai_config.json").unlink()
    with pytest.raises(PackageError, match="head size is symbolic and no genai_config.json gives head_size"):
        OnnxDecoder(pkg)


def test_session_copy_bandwidth_measures_the_providers_memory():
    """The CUDA limit comes from a copy inside an ONNX Runtime session on the device; the same code runs on the CPU."""
    from runtime_bench.hardware import session_copy_bandwidth

    assert session_copy_bandwidth("CPUExecutionProvider", megabytes=16, repeats=2) > 1e8


def test_gpu_name_and_memory_from_nvidia_smi(monkeypatch):
    import subprocess

    from runtime_bench import hardware

    answers = {"--query-gpu=name": "NVIDIA H200\n",
               "--query-compute-apps=pid,used_memory": "4321, 812\n1234, 1500\n1234, 20\n"}

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=answers[cmd[1]], stderr="")

    monkeypatch.setattr(hardware.subprocess, "run", fake_run)
    assert hardware.gpu_name() == "NVIDIA H200"
    assert hardware.gpu_memory_bytes(1234) == 1520 * 2**20  # every context the process holds
    assert hardware.gpu_memory_bytes(999) is None

    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(hardware.subprocess, "run", missing)
    assert hardware.gpu_name() is None and hardware.gpu_memory_bytes(1234) is None


def test_cuda_report_shows_gpu_memory_and_the_device_bandwidth(tmp_path):
    from runtime_bench.report import chart, markdown

    env = {"date": "d", "cpu": "Xeon", "gpu": "NVIDIA H200", "provider": "cuda", "threads": None, "onnxruntime": "1.x",
           "batch": 1, "gen_len": 64, "repeat": 1, "warmup": 0, "copy_bandwidth_bytes_per_s": 3.9e12}
    row = {"name": "dense", "kind": "onnx", "prompt_len": 128, "prefill_ms_mean": 5.0, "decode_ms_mean": 2.0,
           "decode_ms_p50": 2.0, "decode_ms_p90": 2.1, "tokens_per_s": 500.0, "decode_speedup_vs_baseline": 1.0,
           "bytes_ratio_vs_baseline": 1.0, "x_of_limit": 14.8, "limit_ms": 0.135, "peak_rss": 900 * 2**20,
           "device_memory": 1200 * 2**20, "package_bytes": 519 * 2**20, "kv_bytes_end": 8 * 2**20, "dtype": "fp32"}
    text = markdown({"environment": env, "baseline": "dense", "rows": [row, {**row, "name": "torch", "kind": "torch",
                                                                             "device_memory": None, "x_of_limit": None}]})
    assert "NVIDIA H200 (host: Xeon)" in text and "device copy bandwidth 3900.0 GB/s" in text and "GPU memory bandwidth" in text
    assert "| GPU MiB |" in text and "| 900 | 1200 | 519 |" in text and "| 900 | - | 519 |" in text
    chart({"rows": [row]}, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000
