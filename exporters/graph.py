"""Trace a (pruned) decoder to ONNX and apply ONNX Runtime's transformer fusions."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import torch

from amp_edge.memory import release_memory

from amp_edge.models.compat import rope_type
from exporters.attention import STATIC_ROPE, gqa_attention, gqa_layers
from exporters.wrapper import DecoderStep, example_inputs, kv_layout

log = logging.getLogger(__name__)
PROTOBUF_LIMIT = 2 * 1024**3
MIN_OPSET = 14  # scaled_dot_product_attention and Trilu-free causal masks need 14
DEFAULT_OPSET = 17
OPTIMIZE_LEVELS = ("none", "fuse")  # what the package holds; the session adds ORT's own level at load time


@dataclass(frozen=True)
class GraphSpec:
    """Declarative export settings: everything that shapes the traced graph."""

    opset: int = DEFAULT_OPSET
    optimize: str = "fuse"
    attention: str = "auto"  # auto: GroupQueryAttention wherever a layer allows it; gqa: every layer; sdpa: none
    # GQA layers: gate|up in one MatMul (gate_up_proj). None: packed for int4/int8 (one MatMulNBits: 6.38 vs 6.51
    # ms/token against the builder's separate ones), separate for fp32/fp16 (20.16 separate vs 20.74 packed in genai)
    pack_mlp: bool | None = None


def export_graph(model: torch.nn.Module, folder: Path, spec: GraphSpec, release_weights: bool = False) -> onnx.ModelProto:
    """Trace ``model`` in ``folder`` (scratch space) and return the graph, fused as ``spec.optimize`` says.

    The graph's weights stay in scratch files in ``folder`` (external data): ``materialize_weights`` reads them in.

    Memory matters here (the target is under 3x the fp32 weights). The trace is taken without its
    weights (they become graph inputs, so the tracer never serializes a copy of them); each weight is then
    streamed from the PyTorch tensor into a scratch file, the fusions run on the weight-free graph, and
    the weight transposes are folded one tensor at a time.
    """
    layout = kv_layout(model)
    with gqa_attention(model, gqa_layers(model, spec.attention), spec.pack_mlp is not False) as gqa, \
            rotary_as_matmul(model):
        stored = _trace(model, DecoderStep(model, gqa).eval(), layout, folder, spec, release_weights,
                       gqa.replaced if gqa is not None else [])
    traced = folder / "traced.onnx"
    graph = onnx.load(str(traced))
    traced.unlink()
    _bind_weights(graph, stored)
    fold_weight_transposes(graph, folder, "weights_t.bin")
    if spec.optimize == "fuse":
        with working_dir(folder):  # the optimizer's shape inference resolves weights.bin relative to the cwd
            graph = fuse(graph)
        trim_rotary_caches(graph, getattr(model.config, "max_position_embeddings", None))
    release_memory()
    return graph


@contextlib.contextmanager
def rotary_as_matmul(model: torch.nn.Module):
    """While tracing, the rotary module computes its angles as inv_freq @ positions (a MatMul, then Transpose).

    ORT's RotaryEmbedding fusion matches that subgraph, the one transformers 4.57 traces; transformers 5 computes
    the same products as a broadcast Mul, which the fusion does not match (no RotaryEmbedding node, a slower graph).
    Each angle is one product either way, so the values are identical. Rope types whose tables change with the
    sequence length (dynamic, longrope) keep their own forward.
    """
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if (rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor)
            or not hasattr(rotary, "attention_scaling") or rope_type(model.config) not in STATIC_ROPE):
        yield
        return

    def forward(x, position_ids):
        inv_freq = rotary.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rotary.attention_scaling).to(x.dtype), (emb.sin() * rotary.attention_scaling).to(x.dtype)

    rotary.forward = forward
    try:
        yield
    finally:
        del rotary.forward  # the class's forward again


SCRATCH_FILES = ("weights.bin", "weights_t.bin")
_CHUNK = 16 << 20  # bytes read at a time when materializing a weight


def materialize_weights(graph: onnx.ModelProto, folder: Path) -> None:
    """Read every weight still in ``folder``'s scratch files into the graph, then delete those files.

    Weights stay on disk until the dtype pass is done, so quantization reads one weight at a time and never holds
    the fp32 graph whole. A tensor that the fp16 conversion relabelled FLOAT16 still has fp32 bytes on disk: it is
    cast here, chunk by chunk (clipped to fp16's finite range, as ORT's converter does).
    """
    for t in graph.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        to_half = t.data_type == onnx.TensorProto.FLOAT16 and length == 4 * int(np.prod(t.dims, dtype=np.int64))
        out = bytearray()
        with open(folder / info["location"], "rb") as f:
            f.seek(offset)
            for start in range(0, length, _CHUNK):
                chunk = f.read(min(_CHUNK, length - start))
                if to_half:
                    chunk = np.clip(np.frombuffer(chunk, np.float32), -65504, 65504).astype(np.float16).tobytes()
                out += chunk
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = bytes(out)
    for name in SCRATCH_FILES:
        (folder / name).unlink(missing_ok=True)


def _trace(model, step: DecoderStep, layout, folder: Path, spec: GraphSpec, release_weights: bool,
           replaced) -> dict[str, onnx.TensorProto]:
    """Write the weights to a scratch file and trace ``step`` without them; returns the weights' initializers."""
    release_memory()  # packing q|k|v and gate|up freed the per-projection tensors: give their heap pages back
    tensors = dict(step.named_parameters(remove_duplicate=False))
    tensors.update(step.named_buffers(remove_duplicate=False))
    stored = _write_tensors(tensors, folder / "weights.bin")
    del tensors
    if release_weights:
        # The trace needs shapes, not values (it has no value-dependent branches; validation would catch one),
        # and it makes a transient copy of every parameter (~1.3x the weights): free the real ones first
        # (the attention modules swapped out for GroupQueryAttention too).
        # Each placeholder gets its own value: the exporter merges initializers of equal content.
        params = [*model.parameters(), *(p for m in replaced for p in m.parameters())]
        for i, p in enumerate(params):
            p.data = torch.full((), float(i + 1), dtype=p.dtype).expand(p.shape)
        release_memory()
    traced = folder / "traced.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent branches: the branches are shape-only
        torch.onnx.export(
            step, example_inputs(model), str(traced), input_names=layout.input_names(),
            output_names=layout.output_names(), dynamic_axes=layout.dynamic_axes(),
            opset_version=spec.opset, do_constant_folding=False, export_params=False, dynamo=False,
        )
    return stored


@contextlib.contextmanager
def working_dir(folder: Path):
    """Run with ``folder`` as the cwd: tools that read external weights resolve their paths relative to it."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _external(name: str, data_type: int, dims, location: str, offset: int, length: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, onnx.TensorProto]:
    """Write every tensor once (tied weights share one copy) and return external-data initializers for them."""
    from onnx.helper import np_dtype_to_tensor_dtype

    stored: dict[str, onnx.TensorProto] = {}
    written: dict[tuple, tuple[int, int]] = {}
    with open(path, "wb") as sink:
        for name, tensor in tensors.items():
            array = tensor.detach().contiguous().numpy()
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)  # same memory, same view: a tied weight
            if key not in written:
                written[key] = (sink.tell(), array.nbytes)
                sink.write(array.reshape(-1).view(np.uint8).data)  # the tensor's own buffer, no bytes copy
            offset, length = written[key]
            stored[name] = _external(name, np_dtype_to_tensor_dtype(array.dtype), array.shape, path.name, offset, length)
    return stored


def _bind_weights(graph: onnx.ModelProto, stored: dict[str, onnx.TensorProto]) -> None:
    """A trace taken with export_params=False has the weights as graph inputs: make them initializers again."""
    weights = [i for i in graph.graph.input if i.name in stored]
    for inp in weights:
        graph.graph.initializer.append(stored[inp.name])
        graph.graph.input.remove(inp)


def fold_weight_transposes(graph: onnx.ModelProto, folder: Path, data: str) -> int:
    """Replace Transpose(weight) by the transposed weight (what constant folding would do), reading one weight at a time."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded, keep = 0, []
    with open(folder / data, "wb") as sink:
        for node in graph.graph.node:
            src = inits.get(node.input[0]) if node.op_type == "Transpose" else None
            if src is None:
                keep.append(node)
                continue
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(src, base_dir=str(folder)).transpose(perm)
            # the folded weight goes to the scratch file, not into the graph
            graph.graph.initializer.append(_external(node.output[0], src.data_type, array.shape, data, sink.tell(), array.nbytes))
            sink.write(array.tobytes())
            consumers[src.name] -= 1
            folded += 1
    del graph.graph.node[:]
    graph.graph.node.extend(keep)
    unused = [t for t in graph.graph.initializer if consumers.get(t.name, 0) == 0 and t.name in inits]
    for t in unused:
        graph.graph.initializer.remove(t)
    return folded


def fuse(graph: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's transformer optimizer: RMSNorm -> (Skip)SimplifiedLayerNormalization, rotary -> RotaryEmbedding.

    Only portable contrib ops (CPU and CUDA kernels exist for all of them); the hardware-specific
    rewrites are left to the inference session's own optimization level.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_attention = False  # per-layer head counts; the plain attention subgraph is kept
    for name in ("onnxruntime.transformers", "symbolic_shape_infer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optimized = optimize_model(graph, model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=options, only_onnxruntime=False)
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    log.info("fused operators: %s", stats)
    return optimized.model


def trim_rotary_caches(graph: onnx.ModelProto, positions: int | None) -> None:
    """The rotary fusion writes cos/sin tables for 131072 positions; keep the model's context length."""
    from onnx import numpy_helper

    if not positions:
        return
    for t in graph.graph.initializer:
        if t.name in ("cos_cache", "sin_cache") and t.dims[0] > positions:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:positions].copy(), t.name))


def save_graph(graph: onnx.ModelProto, path: Path, external: bool = True) -> list[Path]:
    """Write ``graph``; weights go to ``<name>.data`` unless a single file is asked for and fits in protobuf's 2 GB.

    External data is the default because a single file is serialized whole in memory first: for
    SmolLM2-135M that raised the export's peak memory from 1.8 GB to 2.3 GB.
    """
    external = external or weight_bytes(graph) >= PROTOBUF_LIMIT - 64 * 1024**2  # leave room for the graph itself
    if external:
        data = path.name + ".data"
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path, path.with_name(data)]
    onnx.save_model(graph, str(path))
    return [path]


def weight_bytes(graph: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in graph.graph.initializer)
