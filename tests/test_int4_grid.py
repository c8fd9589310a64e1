"""int4 that keeps a 4-bit source's grid (exporters.grid, --quant-method grid): exact on weights that lie on one,
round-to-nearest elsewhere (grid-fit: a fitted grid), the same graph from both export paths; auto, the default: grid-fit
with the LM head and the MLP output projections at 8 bits where their weights are on no grid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from amp_edge_runtime.decoder import OnnxDecoder
from exporters import ExportOptions, QuantSpec, export
from exporters import grid
from tests.tiny import matmul_bits, save_tiny

IDS = np.array([[5, 9, 33, 70, 12, 44, 7, 81, 3, 17, 60, 2]])


def on_grid(w: np.ndarray) -> np.ndarray:
    """A (K, N) weight snapped to a Q4_1-like grid: per block of 32 inputs, d * q + m with q in 0..15, m a float."""
    k, n = w.shape
    b = w.T.reshape(n, k // 32, 32)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / 15
    return (np.round((b - lo) / d) * d + lo).astype(np.float32).reshape(n, k).T


def _dequantize(g: grid.GridWeight) -> np.ndarray:
    """(K + sums, N) values MatMulNBits computes with: scale * (q - zero point) per block."""
    levels = np.stack([g.packed & 15, g.packed >> 4], -1).reshape(g.packed.shape[0], g.packed.shape[1], -1).astype(int)
    zps = np.stack([g.zero_points & 15, g.zero_points >> 4], -1).reshape(g.zero_points.shape[0], -1)[:, :g.scales.shape[1]].astype(int)
    return (g.scales[..., None] * (levels - zps[..., None])).reshape(g.packed.shape[0], -1).T


def test_a_weight_on_a_grid_is_kept_exactly_but_for_its_offsets():
    rng = np.random.default_rng(0)
    w = on_grid(rng.standard_normal((128, 48)).astype(np.float32) * 0.05)
    g = grid.fit(w)
    assert g is not None and g.on_grid == 1.0 and g.k_augmented == 128 + 32
    x = rng.standard_normal((5, 128))
    augmented = np.concatenate([x, x.reshape(5, 4, 32).sum(-1), np.zeros((5, 28))], 1)
    exact, got = x @ w, augmented @ _dequantize(g)
    # only the block offsets are rounded (4-bit, over the 4 blocks of a column): measured 14x below round-to-nearest
    from exporters.deferred import quantize_block

    p, s, z = quantize_block(w, 4, 32, False)
    rtn = (np.stack([p & 15, p >> 4], -1).reshape(48, 4, 32).astype(int)
           - np.stack([z & 15, z >> 4], -1).reshape(48, -1)[:, :4, None].astype(int))
    rtn_w = (s[..., None] * rtn).reshape(48, 128).T
    err, rtn_err = np.abs(got - exact).max(), np.abs(x @ rtn_w - exact).max()
    assert err < rtn_err / 10, (err, rtn_err)


def test_weights_without_a_grid_are_left_to_round_to_nearest():
    rng = np.random.default_rng(1)
    assert grid.fit(rng.standard_normal((128, 48)).astype(np.float32)) is None  # continuous values
    assert grid.fit(on_grid(rng.standard_normal((96, 8)).astype(np.float32))[:80]) is None  # K not a multiple of 32
    assert grid.fit(on_grid(rng.standard_normal((128, 8)).astype(np.float32)), block=64) is None  # other block sizes
    bf16 = torch.from_numpy(on_grid(rng.standard_normal((128, 48)).astype(np.float32))).bfloat16().float().numpy()
    assert grid.fit(bf16) is None  # bf16 storage rounds the grid off


def _snap(folder):
    """Every linear weight of a saved tiny model put on a 4-bit grid (as if read from a Q4_1 GGUF)."""
    path = folder / "model.safetensors"
    state = load_file(path)
    for name, t in state.items():
        if t.ndim == 2 and "embed" not in name and t.shape[1] % 32 == 0:
            state[name] = torch.from_numpy(on_grid(t.float().numpy().T).T.copy())
    save_file(state, path, metadata={"format": "pt"})
    return folder


def _ops(pkg) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph.node]


def _logits(pkg) -> np.ndarray:
    d = OnnxDecoder(pkg)
    return d.step(IDS, np.ones_like(IDS), np.arange(IDS.shape[1])[None], d.empty_cache(1))[0]


@pytest.mark.parametrize("stream", [True, False])
def test_grid_export_is_closer_to_fp32_than_rtn_and_both_paths_agree(tmp_path, stream):
    src = _snap(save_tiny("llama", tmp_path / "dense"))
    fp32 = export(str(src), tmp_path / "fp32", ExportOptions(ratio=0, validate=False))
    made = {m: export(str(src), tmp_path / m, ExportOptions(ratio=0, quant=QuantSpec("int4", method=m), min_top1=0,
                                                          stream=stream)) for m in ("grid", "rtn")}
    assert made["grid"].manifest["quantization"]["method"] == "grid"
    ref = _logits(tmp_path / "fp32")
    err = {m: np.abs(_logits(tmp_path / m) - ref).max() for m in made}
    assert err["grid"] < err["rtn"] / 5, err
    nbits = lambda p: [n for n in onnx.load(str(p / "model.onnx"), load_external_data=False).graph.node  # noqa: E731
                       if n.op_type == "MatMulNBits"]
    kept = [n for n in nbits(tmp_path / "grid") if n.name.endswith("_Q4G")]
    assert len(kept) == len(nbits(tmp_path / "rtn")) > 3  # every MatMul (the untied head too) keeps its grid
    assert all(n.input[0].endswith("/grid_augmented") for n in kept)
    assert made["grid"].manifest["parity"]["continuation_agreement"] >= made["rtn"].manifest["parity"]["continuation_agreement"]
    if stream:
        assert fp32.manifest["streamed"] and made["grid"].manifest["streamed"]
        memory = export(str(src), tmp_path / "memory", ExportOptions(ratio=0, quant=QuantSpec("int4", method="grid"),
                                                                     min_top1=0, stream=False))
        assert _ops(tmp_path / "grid") == _ops(tmp_path / "memory") and "streamed" not in memory.manifest
        assert np.abs(_logits(tmp_path / "grid") - _logits(tmp_path / "memory")).max() == 0.0


def test_without_a_grid_grid_is_round_to_nearest_exactly(tmp_path):
    src = save_tiny("qwen3-gqa", tmp_path / "dense")  # tied embeddings, random (continuous) weights
    grid_pkg = export(str(src), tmp_path / "grid", ExportOptions(ratio=0, quant=QuantSpec("int4", method="grid"), min_top1=0))
    export(str(src), tmp_path / "rtn", ExportOptions(ratio=0, quant=QuantSpec("int4", method="rtn"), min_top1=0))
    assert grid_pkg.manifest["quantization"]["method"] == "grid"
    assert _ops(tmp_path / "grid") == _ops(tmp_path / "rtn")
    assert np.abs(_logits(tmp_path / "grid") - _logits(tmp_path / "rtn")).max() == 0.0


def test_a_weight_on_no_grid_gets_a_fitted_one_with_less_error_than_rtn():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((256, 96)) * 0.05).astype(np.float32)
    g = grid.fit(w, fitted=True)
    assert g is not None and g.on_grid == 0.0 and grid.fit(w) is None
    d = _dequantize(g)
    fitted = d[:256] + np.repeat(d[256:256 + 8], 32, 0)  # levels plus each block's offset row
    from exporters.deferred import quantize_block

    p, s, z = quantize_block(w, 4, 32, False)
    levels = np.stack([p & 15, p >> 4], -1).reshape(96, 8, 32).astype(int)
    zps = np.stack([z & 15, z >> 4], -1).reshape(96, -1)[:, :8, None].astype(int)
    rtn = (s[..., None] * (levels - zps)).reshape(96, 256).T
    err, rtn_err = ((fitted - w) ** 2).mean(), ((rtn - w) ** 2).mean()
    assert err < 0.9 * rtn_err, (err, rtn_err)  # measured 18% less on Gaussian weights
    on = on_grid(w)
    assert grid.fit(on, fitted=True).on_grid == 1.0  # a weight on a grid keeps it exactly, fitted or not


@pytest.mark.parametrize("tied", [True, False])
def test_grid_fit_export_streamed_and_in_memory_agree_and_beat_rtn(tmp_path, tied):
    src = save_tiny("qwen3-gqa" if tied else "llama", tmp_path / "dense")  # random weights: on no grid
    export(str(src), tmp_path / "fp32", ExportOptions(ratio=0, validate=False))
    spec = QuantSpec("int4", method="grid-fit")
    streamed = export(str(src), tmp_path / "s", ExportOptions(ratio=0, quant=spec, min_top1=0, stream=True))
    export(str(src), tmp_path / "m", ExportOptions(ratio=0, quant=spec, min_top1=0, stream=False))
    export(str(src), tmp_path / "rtn", ExportOptions(ratio=0, quant=QuantSpec("int4", method="rtn"), min_top1=0))
    assert streamed.manifest["streamed"] and streamed.manifest["quantization"]["method"] == "grid-fit"
    assert _ops(tmp_path / "s") == _ops(tmp_path / "m") and any(n.endswith("_Q4G") for _, n in _ops(tmp_path / "s"))
    assert np.abs(_logits(tmp_path / "s") - _logits(tmp_path / "m")).max() == 0.0
    ref = _logits(tmp_path / "fp32")
    err = {p: float(((_logits(tmp_path / p) - ref) ** 2).mean()) for p in ("s", "rtn")}
    assert err["s"] < err["rtn"], err


def test_auto_keeps_every_grid_and_puts_the_head_and_mlp_outputs_on_no_grid_at_8_bits(tmp_path):
    src = _snap(save_tiny("llama", tmp_path / "dense"))  # every linear weight on a grid, the untied head included
    export(str(src), tmp_path / "fp32", ExportOptions(ratio=0, validate=False))
    on = export(str(src), tmp_path / "on", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0))
    export(str(src), tmp_path / "grid", ExportOptions(ratio=0, quant=QuantSpec("int4", method="grid"), min_top1=0))
    assert on.manifest["quantization"]["method"] == "auto"
    assert _ops(tmp_path / "on") == _ops(tmp_path / "grid")  # on a grid everywhere: auto is grid, all 4-bit
    assert set(matmul_bits(tmp_path / "on").values()) == {4}
    # the same model with its head moved off the grid (an 8-bit GGUF table): the head alone goes to 8 bits
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] + 1e-3 * torch.randn(state["lm_head.weight"].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    export(str(src), tmp_path / "fp32b", ExportOptions(ratio=0, validate=False))
    for stream in (True, False):
        export(str(src), tmp_path / f"head{stream}", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0, stream=stream))
        eight = [n for n, b in matmul_bits(tmp_path / f"head{stream}").items() if b == 8]
        assert eight == [n for n in eight if "lm_head" in n] and len(eight) == 1, eight
    export(str(src), tmp_path / "gridb", ExportOptions(ratio=0, quant=QuantSpec("int4", method="grid"), min_top1=0))
    ref = _logits(tmp_path / "fp32b")
    assert np.abs(_logits(tmp_path / "headTrue") - ref).max() < np.abs(_logits(tmp_path / "gridb") - ref).max()


@pytest.mark.parametrize("tied", [True, False])
def test_auto_on_no_grid_both_paths_agree_and_beat_grid_fit(tmp_path, tied):
    src = save_tiny("qwen3-gqa" if tied else "llama", tmp_path / "dense")  # random weights: on no grid
    export(str(src), tmp_path / "fp32", ExportOptions(ratio=0, validate=False))
    streamed = export(str(src), tmp_path / "s", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0, stream=True))
    export(str(src), tmp_path / "m", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0, stream=False))
    export(str(src), tmp_path / "fit", ExportOptions(ratio=0, quant=QuantSpec("int4", method="grid-fit"), min_top1=0))
    mixed = QuantSpec("int4", method="grid-fit", keep_8bit=("lm_head", "down_proj"))  # what docs/export.md measured
    export(str(src), tmp_path / "mixed", ExportOptions(ratio=0, quant=mixed, min_top1=0))
    assert streamed.manifest["streamed"]
    assert _ops(tmp_path / "s") == _ops(tmp_path / "m") == _ops(tmp_path / "mixed")
    assert np.abs(_logits(tmp_path / "s") - _logits(tmp_path / "m")).max() == 0.0
    assert np.abs(_logits(tmp_path / "s") - _logits(tmp_path / "mixed")).max() == 0.0
    bits = matmul_bits(tmp_path / "s")
    eight = {n for n, b in bits.items() if b == 8}
    assert streamed.manifest["quantization"]["matmuls"] == {"8-bit": len(eight), "4-bit grid": len(bits) - len(eight)}
    assert eight == {n for n in bits if "down_proj" in n or "lm_head" in n} and len(eight) >= 3, bits
    four = [n for n, b in bits.items() if b == 4]
    assert four and all(n.endswith("_Q4G") for n in four), four  # the rest: fitted grids
    ref = _logits(tmp_path / "fp32")
    err = {p: float(((_logits(tmp_path / p) - ref) ** 2).mean()) for p in ("s", "fit")}
    assert err["s"] < err["fit"], err
