"""Export: parity on every family (uniform and per-layer), quantized graphs, interop, bad input."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from amp_edge import CalibrationSpec, load_model
from amp_edge.errors import AmpEdgeError, ExportError, ExportValidationError, InvalidOptionError, OutputExistsError
from amp_edge.pruning.pipeline import PruneOptions, prune
from exporters import MANIFEST, ExportOptions, QuantSpec, export
from amp_edge_runtime.decoder import OnnxDecoder
from tests.conftest import SMALL_CALIB
from tests.tiny import FAMILIES, matmul_bits, save_tiny

PROMPT = [[5, 9, 33, 70, 12, 44]]
EOS = 2  # the tiny configs' eos_token_id


def pruned(tmp_path: Path, family: str, allocation: str) -> Path:
    dense = save_tiny(family, tmp_path / "dense")
    out = tmp_path / "pruned"
    prune(str(dense), out, PruneOptions(ratio=0.3, criterion="random", allocation=allocation, min_keep=0.25,
                                          calibration=CalibrationSpec(**SMALL_CALIB)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_per_layer_every_family(tmp_path, family):
    src = pruned(tmp_path, family, "global")
    result = export(str(src), tmp_path / "pkg", ExportOptions())
    parity = result.manifest["parity"]
    assert parity["bound"]["max_abs_diff"] == 1e-3  # tiny models' logits stay small: the plain 1e-3 applies
    assert parity["ok"] and parity["max_abs_diff"] <= 1e-3
    # a sliding-window family gets a third prompt, longer than its window
    assert all(s["greedy_equal"] for s in parity["shapes"]) and len(parity["shapes"]) == (3 if family == "gemma3" else 2)
    # each layer's KV inputs carry that layer's head count
    decoder = OnnxDecoder(tmp_path / "pkg")
    assert decoder.kv_heads == result.manifest["kv_layout"]["kv_heads"]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_uniform_package_contents(tmp_path, family):
    src = pruned(tmp_path, family, "uniform")
    export(str(src), tmp_path / "pkg", ExportOptions())
    pkg = tmp_path / "pkg"
    for name in ("model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json", "genai_config.json", MANIFEST):
        assert (pkg / name).is_file(), name
    manifest = json.loads((pkg / MANIFEST).read_text())
    assert manifest["pruned"] and manifest["uniform"] and manifest["params"]["after"] < manifest["params"]["before"]
    assert manifest["file_sizes"]["model.onnx.data"] > 0 and manifest["plan"]["criterion"] == "random"
    assert json.loads((pkg / "config.json").read_text())["head_dim"] == load_model(str(src)).model.config.head_dim
    # greedy is do_sample=False with the model's own top_k (genai's top_k=1 path costs ~2 ms/token)
    search = json.loads((pkg / "genai_config.json").read_text())["search"]
    assert search["do_sample"] is False and search["top_k"] == 50 and search["top_p"] == 1.0


def test_dense_export_with_ratio_zero_and_prune_in_one_command(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    a = export(str(dense), tmp_path / "a", ExportOptions(ratio=0))
    b = export(str(dense), tmp_path / "b", ExportOptions(ratio=0.3, prune=PruneOptions(criterion="magnitude", calibration=CalibrationSpec(**SMALL_CALIB))))
    assert not a.manifest["pruned"] and a.manifest["params"]["after"] == a.manifest["params"]["before"]
    assert b.manifest["pruned"] and b.manifest["params"]["after"] < 0.75 * b.manifest["params"]["before"]


# Measured on tiny_model("llama") seed 0 (random weights: far more fragile than a trained model's), with the serving
# session's prepacked MatMulNBits (accuracy level 4: int8 activations): top-1 agreement fp16 0.988, int8 0.885, int4
# 0.386; max |Δlogits| 0.048, 0.647, 4.76 (without prepacking, weights dequantized to fp32: int8 0.928 / 0.33, int4
# 0.398 / 4.71). The bounds sit a little outside those.
QUANT_BOUNDS = {"fp16": (0.95, 0.1), "int8": (0.85, 0.8), "int4": (0.35, 6.0)}


@pytest.mark.parametrize("dtype", ["fp16", "int8", "int4"])
def test_quantized_exports_report_parity(tmp_path, dtype):
    dense = save_tiny("llama", tmp_path / "dense")
    fp32 = export(str(dense), tmp_path / "fp32", ExportOptions(ratio=0))
    min_top1, max_diff = QUANT_BOUNDS[dtype]
    q = export(str(dense), tmp_path / dtype, ExportOptions(ratio=0, quant=QuantSpec(dtype), min_top1=min_top1))
    parity = q.manifest["parity"]
    assert parity["dtype"] == dtype and parity["ok"] and parity["bound"]["min_top1_agreement"] == min_top1
    assert min_top1 <= parity["top1_agreement"] <= 1 and 0 < parity["max_abs_diff"] <= max_diff
    assert q.manifest["onnx_bytes"] < fp32.manifest["onnx_bytes"]
    bits = matmul_bits(tmp_path / dtype)
    if dtype == "fp16":
        assert not bits
    else:
        assert any("lm_head" in n for n in bits)  # the output head is quantized too
        # int4's default (auto) on weights on no grid: the head and the MLP outputs at 8 bits, the rest at 4
        if dtype == "int8":
            assert set(bits.values()) == {8}
        else:
            wide = {n for n in bits if "lm_head" in n or "down_proj" in n}
            assert {bits[n] for n in wide} == {8} and {b for n, b in bits.items() if n not in wide} == {4}


def test_keep_8bit_and_bound_failure(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    mixed = export(str(dense), tmp_path / "mixed", ExportOptions(ratio=0, quant=QuantSpec("int4", method="rtn", keep_8bit=("down_proj",)),
                                                                 min_top1=0.42))  # measured 0.470 (all-int4: 0.398)
    assert mixed.manifest["parity"]["top1_agreement"] >= 0.42
    bits = matmul_bits(tmp_path / "mixed")
    assert {b for n, b in bits.items() if "down_proj" in n} == {8}
    assert {b for n, b in bits.items() if "down_proj" not in n} == {4}
    with pytest.raises(ExportValidationError) as e:  # every shape's failure is listed, nothing is written
        export(str(dense), tmp_path / "strict", ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=1.0))
    assert len(e.value.mismatches) == 2 and "single" in str(e.value) and "padded-batch" in str(e.value)
    assert not (tmp_path / "strict").exists()
    with pytest.raises(ExportValidationError, match="max \\|Δlogits\\| .* > 1.00e-12 .*top-1 agreement 1.000; --max-abs-diff sets the bound"):  # an fp32 bound set by the caller
        export(str(dense), tmp_path / "strict32", ExportOptions(ratio=0, max_abs_diff=1e-12))
    with pytest.raises(InvalidOptionError, match="--max-abs-diff must be > 0, got -1"):
        export(str(dense), tmp_path / "bad", ExportOptions(ratio=0, max_abs_diff=-1))
    with pytest.raises(InvalidOptionError, match="no MatMul: gate"):
        export(str(dense), tmp_path / "bad", ExportOptions(ratio=0, quant=QuantSpec("int4", keep_8bit=("gate",))))


@pytest.fixture(scope="module")
def interop_packages(tmp_path_factory):
    """(family, allocation, package, PyTorch's greedy tokens, OnnxDecoder's) for the runtimes below.

    llama (head_dim 8): the plain attention graph; phi3 and llama-gqa (head_dim 16): GroupQueryAttention graphs."""
    out = []
    for family, allocation in (("llama", "uniform"), ("phi3", "uniform"), ("llama", "global"), ("llama-gqa", "global")):
        root = tmp_path_factory.mktemp(f"{family}-{allocation}")
        src = pruned(root, family, allocation)
        export(str(src), root / "pkg", ExportOptions())
        ids = torch.tensor(PROMPT)
        want = load_model(str(src)).model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
        ours = OnnxDecoder(root / "pkg").generate(ids.numpy(), 12, eos_token_ids=[EOS])[0].tolist()  # all stop at EOS
        out.append((family, allocation, root / "pkg", want, ours))
    return out


def test_interop_genai_matches_pytorch(interop_packages):
    og = pytest.importorskip("onnxruntime_genai")
    for family, allocation, pkg, want, ours in interop_packages:
        model = og.Model(str(pkg))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPT[0]) + 12, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(PROMPT, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        got_genai = gen.get_sequence(0).tolist()
        if want[-1] == EOS and len(got_genai) == len(want) - 1:  # genai leaves out the EOS that ended generation
            got_genai.append(EOS)
        assert ours == want and got_genai == want, (family, allocation)


def test_interop_optimum_matches_pytorch(interop_packages):
    pytest.importorskip("optimum.onnxruntime", reason="the [optimum] extra (transformers 4.57): make test-optimum")
    from exporters.optimum_model import PrunedORTModelForCausalLM

    for family, allocation, pkg, want, ours in interop_packages:
        opt = PrunedORTModelForCausalLM.from_pretrained(pkg, use_cache=True, use_io_binding=False)
        got_optimum = opt.generate(torch.tensor(PROMPT), max_new_tokens=12, do_sample=False)[0].tolist()
        assert ours == want and got_optimum == want, (family, allocation)


def test_bad_input(tmp_path, monkeypatch):
    dense = save_tiny("llama", tmp_path / "dense")
    with pytest.raises(InvalidOptionError, match="unknown dtype 'int3'"):
        export(str(dense), tmp_path / "x", ExportOptions(ratio=0, quant=QuantSpec("int3")))
    with pytest.raises(InvalidOptionError, match="opset 11 is too old"):
        export(str(dense), tmp_path / "x", ExportOptions(ratio=0, graph=__import__("exporters").GraphSpec(opset=11)))
    with pytest.raises(InvalidOptionError, match="not a pruned checkpoint"):
        export(str(dense), tmp_path / "x", ExportOptions())
    with pytest.raises(AmpEdgeError, match="not a model"):
        (tmp_path / "empty").mkdir()
        export(str(tmp_path / "empty"), tmp_path / "x", ExportOptions(ratio=0))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        export(str(dense), tmp_path / "full", ExportOptions(ratio=0))
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "x").exists()

    import exporters.package as package

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import exporters.deferred as deferred

    monkeypatch.setattr(package, "save_graph", disk_full)  # the in-memory path
    monkeypatch.setattr(deferred, "write_weights", disk_full)  # the streamed path (a checkpoint folder)
    with pytest.raises(ExportError, match="disk full"):
        export(str(dense), tmp_path / "y", ExportOptions(ratio=0))
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "save_graph", interrupted)
    monkeypatch.setattr(deferred, "write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(str(dense), tmp_path / "z", ExportOptions(ratio=0))
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z.tmp-*"))


def test_cli_export(tmp_path):
    from typer.testing import CliRunner

    from amp_edge.cli import app

    dense = save_tiny("llama", tmp_path / "dense")
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(dense), "--ratio", "0", "--out", str(tmp_path / "pkg"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["parity"]["ok"]
    r = runner.invoke(app, ["export", str(dense), "--ratio", "0", "--out", str(tmp_path / "pkg")])
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["export", str(dense), "--ratio", "0", "--dtype", "int3", "--out", str(tmp_path / "p2")])
    assert r.exit_code == 2 and "--dtype': 'int3' is not one of 'fp32', 'fp16', 'int8', 'int4'" in r.output


@pytest.mark.parametrize("dtype,symmetric", [("int4", False), ("int4", True), ("int8", False)])
def test_shared_embedding_rows_equal_the_quantized_head(dtype, symmetric):
    """GatherBlockQuantized reads the LM head's quantized weights: row v of the lookup is column v of the head."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.quantize import quantize

    vocab, hidden = 96, 64
    table = np.random.default_rng(0).standard_normal((vocab, hidden)).astype(np.float32)
    graph = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("MatMul", ["h", "head"], ["logits"])],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None]),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, hidden])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "head")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    untied_graph = onnx.ModelProto()
    untied_graph.CopyFrom(graph)  # the quantizer rewrites its input in place
    q = quantize(graph, QuantSpec(dtype, symmetric=symmetric), tied=True)
    ops = [n.op_type for n in q.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert "table" not in {t.name for t in q.graph.initializer}  # one copy of the weights
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    # one-hot activations are exact in the int8 compute path, so the head's output is its dequantized weight
    rows, logits = sess.run(None, {"ids": np.arange(vocab), "h": np.eye(hidden, dtype=np.float32)})
    np.testing.assert_allclose(rows, logits.T, atol=1e-5)
    assert 0 < np.abs(rows - table).max() < (0.5 if dtype == "int4" else 0.05)  # quantized, and close to the table
    # an untied graph keeps its own (fp16) table
    untied = quantize(untied_graph, QuantSpec(dtype, symmetric=symmetric), tied=False)
    assert "GatherBlockQuantized" not in [n.op_type for n in untied.graph.node]


def test_int4_export_of_a_tied_model_keeps_one_copy_of_the_embedding(tmp_path):
    from tests.tiny import char_tokenizer, tiny_model

    model = tiny_model("llama-gqa")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "dense", safe_serialization=True)
    char_tokenizer().save_pretrained(tmp_path / "dense")
    # measured top-1 agreement on the in-memory path's teacher-forced prompts: 0.313 shared (the 4-bit head also serves
    # the lookups), 0.386 with the fp16 table (the streamed path measures along ONNX Runtime's own continuation instead)
    shared = export(str(tmp_path / "dense"), tmp_path / "shared",
                    ExportOptions(ratio=0, quant=QuantSpec("int4"), min_top1=0.27, stream=False))
    fp16 = export(str(tmp_path / "dense"), tmp_path / "fp16",
                  ExportOptions(ratio=0, quant=QuantSpec("int4", embedding="fp16"), min_top1=0.34, stream=False))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "shared" / "model.onnx")).graph.node}
    assert "GatherBlockQuantized" in ops
    # the fp16 table (128 x 64 x 2 bytes) is gone; the 4-bit head is read twice
    assert fp16.manifest["onnx_bytes"] - shared.manifest["onnx_bytes"] >= 128 * 64 * 2 - 1024
    assert shared.manifest["parity"]["ok"] and shared.manifest["quantization"]["embedding"] == "shared"
    with pytest.raises(InvalidOptionError, match="unknown embedding storage 'int2'"):
        export(str(tmp_path / "dense"), tmp_path / "bad", ExportOptions(ratio=0, quant=QuantSpec("int4", embedding="int2")))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fp_export_of_a_tied_model_stores_the_table_once(tmp_path, dtype):
    from tests.tiny import char_tokenizer, tiny_model

    model = tiny_model("llama-gqa")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "dense", safe_serialization=True)
    char_tokenizer().save_pretrained(tmp_path / "dense")
    shared = export(str(tmp_path / "dense"), tmp_path / "shared", ExportOptions(ratio=0, quant=QuantSpec(dtype)))
    separate = export(str(tmp_path / "dense"), tmp_path / "separate", ExportOptions(ratio=0, quant=QuantSpec(dtype, embedding="fp16")))
    graph = onnx.load(str(tmp_path / "shared" / "model.onnx"))
    assert not any("embed_tokens" in t.name for t in graph.graph.initializer)  # rows come from the LM head's weight
    gather = next(n for n in graph.graph.node if n.op_type == "Gather" and "input_ids" in n.input)
    assert next(n for n in graph.graph.node if gather.input[0] in n.output).op_type == "Transpose"
    item = 4 if dtype == "fp32" else 2
    assert separate.manifest["onnx_bytes"] - shared.manifest["onnx_bytes"] >= 128 * 64 * item - 1024
    assert shared.manifest["parity"]["ok"] and shared.manifest["parity"]["max_abs_diff"] == separate.manifest["parity"]["max_abs_diff"]
