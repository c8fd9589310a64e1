"""Weight precision of an exported graph: fp16, 8-bit and 4-bit weight-only (MatMulNBits), dynamic int8."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from amp_edge.errors import InvalidOptionError

from exporters.graph import materialize_weights, working_dir

DTYPES = ("fp32", "fp16", "int8", "int4")
QUANTIZED = ("int8", "int4")  # weight-only integer dtypes: validated by agreement, not by a logits bound
INT8_SCHEMES = ("weight-only", "dynamic")
EMBEDDINGS = ("shared", "fp16")
# ONNX Runtime's 4-bit quantizers that need no calibration data, and grid (exporters.grid: rtn, except MatMuls whose
# weights already lie on a 4-bit grid, which keep it exactly)
METHODS = ("auto", "rtn", "grid", "grid-fit", "hqq", "k-quant")
GRID_METHODS = ("auto", "grid", "grid-fit")
FITTED_METHODS = ("auto", "grid-fit")  # a weight on no grid gets a fitted one (exporters.grid.fit(..., fitted=True))
MIN_QUANT_OPSET = 17  # what ONNX Runtime's weight-only quantizer is tested with
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantSpec:
    dtype: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits computes in int8 on CPU: the fast path; 0 keeps fp32 compute
    keep_8bit: tuple[str, ...] = ()  # MatMuls (module-name fragments) kept at 8 bits in an int4 graph
    int8_scheme: str = "weight-only"
    symmetric: bool = False  # zero points: top-1 agreement 0.645 vs 0.617 symmetric on SmolLM2-135M int4
    # tied embeddings: "shared" keeps one copy of the table (fp32/fp16: rows from Transpose(LM head); int4/int8: from
    # the quantized LM head, GatherBlockQuantized); "fp16" keeps a separate table (fp16 in int4/int8 graphs: exact rows)
    embedding: str = "shared"
    # the 4-bit MatMuls' quantizer: rtn (min/max per block, integer zero points) | hqq (half-quadratic: scale and
    # float zero point fitted per block; ONNX Runtime's CPU kernel does not prepack float zero points: 16-24x slower
    # decode on SmolLM2) | k-quant | grid (rtn, but a weight already on a 4-bit grid, as read from a Q4 GGUF, keeps it
    # exactly, on the fast kernel: exporters.grid) | grid-fit (grid, and a weight on no grid gets least-squares fitted
    # float offsets through the same block sums instead of rtn) | auto (grid-fit, and the LM head and the MLP's output
    # projections take 8 bits where their weight is on no 4-bit grid). MatMuls kept at 8 bits always use rtn.
    # auto is the default: a 4-bit source keeps its grid exactly and its 8-bit table stays 8-bit (dense SmolLM2: top-1
    # on the fp32 model's continuations 0.84 -> 0.97); a trained model's weights, on no grid, get the mix that measured
    # best (recovered SmolLM2 30%: 0.69 -> 0.84). Sizes and speeds in docs/export.md. With --symmetric or a block size
    # other than 32 no weight has a grid form: auto and grid are rtn there.
    method: str = "auto"
    mlp_out: str = "down_proj"  # the MLP's output projection's name (the adapter's mlp_out_name; auto's 8-bit set)

    @property
    def grid_form(self) -> bool:
        """Whether int4 weights can take exporters.grid's form: a grid method, block 32, zero points (for the offsets)."""
        return self.method in GRID_METHODS and self.block_size == 32 and not self.symmetric

    def check(self, opset: int) -> None:
        if self.dtype not in DTYPES:
            raise InvalidOptionError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.int8_scheme not in INT8_SCHEMES:
            raise InvalidOptionError(f"unknown int8 scheme {self.int8_scheme!r}; choose from {', '.join(INT8_SCHEMES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidOptionError(f"block size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidOptionError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        if self.embedding not in EMBEDDINGS:
            raise InvalidOptionError(f"unknown embedding storage {self.embedding!r}; choose from {', '.join(EMBEDDINGS)}")
        if self.method not in METHODS:
            raise InvalidOptionError(f"unknown quantization method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.method != QuantSpec.method and self.dtype != "int4":
            raise InvalidOptionError(f"--quant-method {self.method} applies to int4, not {self.dtype}")
        if self.keep_8bit and self.dtype != "int4":
            raise InvalidOptionError(f"--keep-8bit applies to int4 only, not {self.dtype}")
        if self.dtype in ("int4", "int8") and opset < MIN_QUANT_OPSET:
            raise InvalidOptionError(f"opset {opset} is too old for {self.dtype} (MatMulNBits needs opset >= {MIN_QUANT_OPSET})")

    def to_dict(self) -> dict:
        d = {"dtype": self.dtype, "embedding": self.embedding}
        if self.dtype in ("int4", "int8"):
            d.update(block_size=self.block_size, accuracy_level=self.accuracy_level, symmetric=self.symmetric)
        if self.dtype == "int4":
            d["method"] = self.method
        if self.dtype == "int8":
            d["int8_scheme"] = self.int8_scheme
        if self.keep_8bit:
            d["keep_8bit"] = list(self.keep_8bit)
        return d


def matmul_names(graph: onnx.ModelProto) -> list[str]:
    """MatMul nodes that multiply by a constant weight (the ones weight-only quantization applies to)."""
    inits = {t.name for t in graph.graph.initializer}
    return [n.name for n in graph.graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]


def select(names: list[str], fragments: tuple[str, ...]) -> list[str]:
    """The MatMuls whose node name contains one of ``fragments`` as a path part (``down_proj``, ``lm_head``)."""
    chosen = [n for n in names if set(fragments) & set(n.split("/"))]
    unmatched = [f for f in fragments if not any(f in n.split("/") for n in names)]
    if unmatched:
        known = sorted({part for n in names for part in n.split("/") if part.endswith(("proj", "head", "fc1", "fc2", "dense"))})
        raise InvalidOptionError(f"--keep-8bit names no MatMul: {', '.join(unmatched)}; known: {', '.join(known)}")
    return chosen


def float_pass(graph: onnx.ModelProto, spec: QuantSpec, tied: bool) -> onnx.ModelProto:
    """fp32 and fp16 packages: the shared embedding takes its rows from the LM head; fp16 relabels the weights."""
    if tied and spec.embedding == "shared":
        rows_from_head(graph)
    return graph if spec.dtype == "fp32" else to_fp16(graph)


def quantize(graph: onnx.ModelProto, spec: QuantSpec, tied: bool = False, weights_dir: Path | None = None) -> onnx.ModelProto:
    """``tied``: the token embedding and the LM head are one tensor in the model (tie_word_embeddings).

    ``weights_dir``: where the graph's external weights lie (export's scratch files). They are read one at a time
    (the weight-only quantizers) or not at all (fp16 relabels them; ``materialize_weights`` casts them), so the
    fp32 weights are never all in memory; the caller materializes the rest afterwards.
    """
    if spec.dtype in ("fp32", "fp16"):
        return float_pass(graph, spec, tied)
    if spec.dtype == "int8" and spec.int8_scheme == "dynamic":
        if weights_dir is not None:
            materialize_weights(graph, weights_dir)  # quantize_dynamic re-saves the model: it needs the weights inline
        return _dynamic_int8(graph)
    with working_dir(weights_dir) if weights_dir is not None else contextlib.nullcontext():
        return _weight_only(graph, spec, tied)


def _weight_only(graph: onnx.ModelProto, spec: QuantSpec, tied: bool) -> onnx.ModelProto:
    if spec.dtype == "int8":
        graph = _nbits(graph, spec, 8, exclude=[])
        return _embeddings(graph, spec, tied)
    kept = select(matmul_names(graph), spec.keep_8bit) if spec.keep_8bit else []
    if spec.grid_form:
        head = shared_head(graph, spec, tied)
        block_sums, off_grid = _grid(graph, spec, set(kept) | head)
        kept += sorted(eight_bit_auto(spec, off_grid, head) - set(kept))
        graph = _nbits(graph, spec, 4, exclude=kept + sorted(block_sums))
    else:
        graph = _nbits(graph, spec, 4, exclude=kept)
    if kept:
        graph = _nbits(graph, spec, 8, exclude=[n for n in matmul_names(graph) if n not in kept])
    return _embeddings(graph, spec, tied)


def weight_kinds(graph: onnx.ModelProto) -> dict[str, int]:
    """How many of a graph's weight MatMuls went where: "4-bit grid" (exporters.grid), "4-bit", "8-bit", "float"."""
    from exporters.grid import SUM_SUFFIX  # the block sums' 0/1 MatMuls are not weights

    inits = {t.name for t in graph.graph.initializer}
    kinds: dict[str, int] = {}
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits":
            bits = next(a.i for a in n.attribute if a.name == "bits")
            kind = f"{bits}-bit grid" if n.name.endswith("_Q4G") else f"{bits}-bit"
        elif n.op_type == "MatMul" and any(i in inits for i in n.input[1:]) and not n.name.endswith(SUM_SUFFIX):
            kind = "float"
        else:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def head_name(graph: onnx.ModelProto) -> str | None:
    """The LM head's MatMul (the node making "logits")."""
    return next((n.name for n in graph.graph.node if n.op_type == "MatMul" and "logits" in n.output), None)


def shared_head(graph: onnx.ModelProto, spec: QuantSpec, tied: bool) -> set[str]:
    """The LM head's MatMul where the embedding table is read from it (tied, --embedding shared): it never takes the
    grid form (the shared table is read as the head's K = hidden rows)."""
    return ({head_name(graph)} if tied and spec.embedding == "shared" else set()) - {None}


def auto_candidates(graph: onnx.ModelProto, spec: QuantSpec) -> set[str]:
    """--quant-method auto: the MatMuls that take 8 bits where their weight is on no 4-bit grid, the LM head and the
    MLP's output projections (on a recovered SmolLM2 each raised top-1 agreement by 0.06-0.08; docs/export.md)."""
    if spec.method != "auto":
        return set()
    head = head_name(graph)
    return {n for n in matmul_names(graph) if spec.mlp_out in n.split("/") or n == head}


def eight_bit_auto(spec: QuantSpec, off_grid: set[str], shared_head: set[str]) -> set[str]:
    """auto's MatMuls at 8 bits: the candidates found on no grid, and a head shared with the embedding table (the
    table is read as the head's rows, so it never takes the grid form)."""
    if spec.method != "auto":
        return set()
    eight = off_grid | shared_head
    if eight:
        parts = sorted({n.split("/")[-2] if n.count("/") > 1 else n for n in eight})
        log.info("int4 auto: %d MatMuls at 8 bits, on no 4-bit grid or shared with the embedding (%s)", len(eight),
                 ", ".join(parts))
    return eight


def _grid(graph: onnx.ModelProto, spec: QuantSpec, exclude: set[str]) -> tuple[set[str], set[str]]:
    """--quant-method grid / grid-fit / auto: every MatMul whose weight lies on a 4-bit grid becomes a MatMulNBits that
    keeps it (exporters.grid); the others are left to rtn (grid) or get a fitted grid (grid-fit, auto), except auto's
    candidates, which are left for 8 bits. A tied head shared with the embedding is left too (the shared table is read
    as the head's K = hidden rows). Returns the block-sum MatMuls added and the candidates on no grid."""
    from onnx import numpy_helper

    from exporters import grid

    candidates, off_grid = auto_candidates(graph, spec) - exclude, set()

    def tensors(node, w):
        if node.name in exclude:
            return None
        weight = numpy_helper.to_array(w)  # cwd: the weights
        fitted = grid.fit(weight, spec.block_size, fitted=spec.method in FITTED_METHODS and node.name not in candidates)
        if fitted is None:
            off_grid.update({node.name} & candidates)
            return None
        return [numpy_helper.from_array(a, n) for a, n in
                zip((fitted.packed, fitted.scales, fitted.zero_points), grid.tensor_names(w.name))]

    return grid.rewrite(graph, tensors, spec.accuracy_level), off_grid


def _embeddings(graph: onnx.ModelProto, spec: QuantSpec, tied: bool) -> onnx.ModelProto:
    if not (tied and spec.embedding == "shared" and share_tied_embedding(graph, spec.block_size)):
        half_embeddings(graph)
    return graph


def _nbits(graph: onnx.ModelProto, spec: QuantSpec, bits: int, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig

    algo = None
    if bits == 4 and spec.method == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=bits, op_types_to_quantize=("MatMul",))
    elif bits == 4 and spec.method == "k-quant":
        algo = KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(graph, bits=bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
                             accuracy_level=spec.accuracy_level, nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",),
                             algo_config=algo)
    q.process()
    return q.model.model


def to_fp16(graph: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights, activations and KV cache; ops without fp16 kernels stay fp32 behind casts.

    Weights still on disk (external) are shown to ORT's converter as typed graph inputs: it needs their types,
    not their values (it would read each one just for its shape). They come back as initializers labelled with
    the type the converter gave them; ``materialize_weights`` casts the FLOAT16 ones while reading them.
    """
    from onnx import helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    on_disk = []
    for t in graph.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT:
            on_disk.append(onnx.TensorProto())
            on_disk[-1].CopyFrom(t)
    names = {t.name for t in on_disk}
    kept = [t for t in graph.graph.initializer if t.name not in names]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    graph.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in on_disk)
    converted = convert_float_to_float16(graph, keep_io_types=False, disable_shape_infer=True)
    types = {i.name: i.type.tensor_type.elem_type for i in converted.graph.input if i.name in names}
    inputs = [i for i in converted.graph.input if i.name not in names]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    for t in on_disk:
        t.data_type = types[t.name]
    converted.graph.initializer.extend(on_disk)
    return converted


def _dynamic_int8(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic quantization: int8 weights, activations quantized per call (MatMulInteger)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(graph, str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        return onnx.load(str(dst))


def half_embeddings(graph: onnx.ModelProto) -> int:
    """Store token-embedding tables in fp16 and cast rows back after the lookup; returns bytes saved.

    In a 4-bit graph the embedding table (not a MatMul, so not quantized) is the largest tensor left:
    for SmolLM2-135M it is 113 MB of a 200 MB package. Halving it costs one Cast of a (batch, seq, hidden) tensor.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    saved = 0
    nodes = list(graph.graph.node)
    for node in nodes:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT or table.dims[0] < 1024:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(table).astype("float16"), table.name)
        saved += len(table.raw_data) - len(half.raw_data)
        table.CopyFrom(half)
        out = node.output[0]
        node.output[0] = out + "_fp16"
        cast = helper.make_node("Cast", [out + "_fp16"], [out], to=onnx.TensorProto.FLOAT, name=node.name + "_cast_fp32")
        graph.graph.node.insert(list(graph.graph.node).index(node) + 1, cast)
    return saved


def rows_from_head(graph: onnx.ModelProto) -> bool:
    """fp32/fp16 with tied embeddings: look token rows up in Transpose(LM head weight) instead of a second copy of
    the table; True when done.

    The trace stores the tied tensor twice (the table for Gather, its transpose for the head's MatMul). ONNX Runtime
    folds the Transpose once when the session loads, so inference is unchanged, and the package keeps one copy, as
    the model builder's does (SmolLM2-135M fp32: 627 -> 514 MB).
    """
    from onnx import helper

    inits = {t.name: t for t in graph.graph.initializer}
    head = next((n for n in graph.graph.node if n.op_type == "MatMul" and "logits" in n.output and n.input[1] in inits), None)
    gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if head is None or len(gathers) != 1:
        return False
    gather, table, weight = gathers[0], inits[gathers[0].input[0]], inits[head.input[1]]
    if list(table.dims) != list(weight.dims)[::-1] or table.data_type != weight.data_type:
        return False
    rows = f"{weight.name}_as_rows"
    nodes = list(graph.graph.node)
    graph.graph.node.insert(nodes.index(gather), helper.make_node("Transpose", [weight.name], [rows], name=rows, perm=[1, 0]))
    gather.input[0] = rows
    if not any(table.name in n.input for n in graph.graph.node):
        graph.graph.initializer.remove(table)
    return True


def share_tied_embedding(graph: onnx.ModelProto, block_size: int) -> bool:
    """Gather token rows from the quantized LM head instead of a separate table; True when done.

    With tied embeddings the table is the LM head's weight, which MatMulNBits already holds as N=vocab rows of
    K=hidden quantized values: GatherBlockQuantized reads rows of it directly (the model builder's layout), so
    the package keeps one 4-bit copy instead of a 4-bit head plus an fp16 table (SmolLM2-135M: 56 MB less).
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    head = next((n for n in graph.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if head is None or len(gathers) != 1:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    gather, table = gathers[0], inits[gathers[0].input[0]]
    vocab, hidden = table.dims
    if (attrs["N"], attrs["K"]) != (vocab, hidden) or hidden % attrs["block_size"] or attrs["bits"] not in (4, 8):
        return False
    zero_points = inits.get(head.input[3]) if len(head.input) > 3 and head.input[3] else None
    if zero_points is not None and zero_points.data_type != onnx.TensorProto.UINT8:
        return False  # HQQ's float zero points: GatherBlockQuantized reads packed uint8 ones only
    blocks = hidden // attrs["block_size"]

    def as_matrix(name: str, cols: int) -> str:
        """A (vocab, cols) view of one of the head's tensors; ONNX Runtime folds the Reshape at load."""
        shape = f"{name}_rows_shape"
        graph.graph.initializer.append(numpy_helper.from_array(np.array([vocab, cols], dtype=np.int64), shape))
        graph.graph.node.insert(0, helper.make_node("Reshape", [name, shape], [f"{name}_rows"], name=f"{name}_as_rows"))
        return f"{name}_rows"

    inputs = [as_matrix(head.input[1], hidden * attrs["bits"] // 8), gather.input[1], as_matrix(head.input[2], blocks)]
    if len(head.input) > 3 and head.input[3]:  # zero points: packed like the weights, ceil(blocks * bits / 8) bytes a row
        inputs.append(as_matrix(head.input[3], -(-blocks * attrs["bits"] // 8)))
    shared = helper.make_node("GatherBlockQuantized", inputs, list(gather.output), name=gather.name + "_quantized",
                              domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=attrs["block_size"],
                              bits=attrs["bits"])
    nodes = list(graph.graph.node)
    graph.graph.node.insert(nodes.index(gather), shared)
    graph.graph.node.remove(gather)
    if not any(table.name in n.input for n in graph.graph.node):
        graph.graph.initializer.remove(table)
    return True
