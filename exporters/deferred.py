"""Deferred weights: graph initializers whose bytes are made only when the package is written, one tensor at a time.

The streamed export traces a weight-free skeleton; each weight initializer records where its values come from (checkpoint
tensors, concatenated rows, a folded transpose) and what the dtype pass made of it (fp16, or one output of 4/8-bit
block quantization). ``write_weights`` then reads, converts and appends each tensor to model.onnx.data and frees it,
so no second copy of the weights is ever in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from tqdm.auto import tqdm

from exporters import grid

log = logging.getLogger(__name__)
DEFERRED = "amp_edge.deferred"  # the location a deferred initializer names until it is written (no such file)
ALIGN = 64 * 1024  # tensors of 1 MiB and more start on a 64 KiB boundary (what onnx's own writer does: mmap-able)


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]  # checkpoint tensors, concatenated along dim 0
    perm: tuple[int, ...] | None = None  # a folded Transpose
    # (bits, block_size, symmetric, part): part "q" | "scales" | "zp" of round-to-nearest, "grid-q" | "grid-scales" |
    # "grid-zp" of a weight that keeps its 4-bit grid (exporters.grid), "gridfit-q" ... where one is fitted if it has none
    quant: tuple[int, int, bool, str] | None = None


class WeightStore:
    """Deferred initializers and how to make them from a checkpoint (amp_edge.models.layered.Checkpoint)."""

    def __init__(self, ckpt, tied: dict[str, str]):
        self.ckpt, self.tied = ckpt, tied
        self.recipes: dict[str, Recipe] = {}
        self._cache: tuple[Recipe, tuple] | None = None

    def initializer(self, name: str, recipe: Recipe, dims, data_type: int = onnx.TensorProto.FLOAT) -> onnx.TensorProto:
        self.recipes[name] = recipe
        t = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=DEFERRED)
        t.external_data.add(key="offset", value="0")
        nbytes = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(data_type).itemsize
        t.external_data.add(key="length", value=str(nbytes))
        self.largest = max(getattr(self, "largest", 0), nbytes)
        return t

    def placeholder_file(self, folder: Path) -> Path:
        """A sparse file (no disk blocks) as long as the largest deferred tensor: tools that check external data
        (the fusions' shape inference) find a file there; nothing reads values of weights from it."""
        path = folder / DEFERRED
        with open(path, "wb") as f:
            f.truncate(getattr(self, "largest", 0))
        return path

    def source(self, name: str) -> torch.Tensor:
        if name not in self.ckpt and name in self.tied:
            name = self.tied[name]
        return self.ckpt.tensor(name)

    def array(self, recipe: Recipe) -> np.ndarray:
        """The fp32 values of a recipe without its quantization."""
        parts = [self.source(n) for n in recipe.sources]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        del parts
        if recipe.perm is not None:
            t = t.permute(*recipe.perm).contiguous()  # in the stored dtype first: half the bytes of an fp32 transpose
        return t.to(torch.float32).numpy()

    def quantized(self, recipe: Recipe) -> np.ndarray:
        bits, block, sym, part = recipe.quant
        kind, _, piece = part.rpartition("-")  # "grid" | "gridfit" | "" (round to nearest), then q | scales | zp
        key = replace(recipe, quant=(bits, block, sym, kind))
        if self._cache is None or self._cache[0] != key:  # q, scales and zero points are written one after another
            self._cache = None
            if kind:
                fitted = grid.fit(self.array(key), block, fitted=kind == "gridfit")
                self._cache = (key, (fitted.packed, fitted.scales, fitted.zero_points))
            else:
                self._cache = (key, quantize_block(self.array(key), bits, block, sym))
        return self._cache[1][("q", "scales", "zp").index(piece)]

    def bytes_of(self, t: onnx.TensorProto) -> np.ndarray:
        recipe = self.recipes[t.name]
        if recipe.quant is not None:
            return self.quantized(recipe)
        a = self.array(recipe)
        if t.data_type == onnx.TensorProto.FLOAT16:
            a = np.clip(a, -65504, 65504).astype(np.float16)  # as ORT's converter and materialize_weights do
        return a


def is_deferred(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(e.key == "location" and e.value == DEFERRED for e in t.external_data)


def quantize_block(weight: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORT's MatMulNBits block quantization of a (K, N) weight (the C++ kernels MatMulNBitsQuantizer calls)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    kpack = 8 // bits
    k_blocks = (rows + block - 1) // block
    if k_blocks * block > rows:
        weight = np.pad(weight, ((0, k_blocks * block - rows), (0, 0)), "constant")
    packed = np.zeros((cols, k_blocks, (block + kpack - 1) // kpack), dtype="uint8")
    zero_point = np.zeros((cols, (k_blocks + kpack - 1) // kpack), dtype="uint8")
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    fn = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    fn(packed, weight, scales, zero_point, block, cols, rows, symmetric)
    return packed, scales, zero_point


def fold_transposes(graph: onnx.ModelProto, store: WeightStore) -> int:
    """Transpose(deferred weight) -> a deferred transposed weight (nothing is read; fold_weight_transposes' job)."""
    inits = {t.name: t for t in graph.graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    keep, folded = [], 0
    for node in graph.graph.node:
        src = inits.get(node.input[0]) if node.op_type == "Transpose" else None
        if src is None or not is_deferred(src):
            keep.append(node)
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None) or list(range(len(src.dims)))[::-1]
        recipe = store.recipes[src.name]
        graph.graph.initializer.append(store.initializer(node.output[0], replace(recipe, perm=tuple(perm)),
                                                         [src.dims[p] for p in perm], src.data_type))
        consumers[src.name] -= 1
        folded += 1
    del graph.graph.node[:]
    graph.graph.node.extend(keep)
    for t in [t for t in graph.graph.initializer if consumers.get(t.name, 0) == 0 and t.name in inits]:
        graph.graph.initializer.remove(t)
    return folded


def quantize_matmuls(graph: onnx.ModelProto, store: WeightStore, bits: int, block: int, symmetric: bool,
                     accuracy_level: int, exclude: set[str]) -> int:
    """MatMul(x, deferred W) -> MatMulNBits, named and laid out as onnxruntime's MatMulNBitsQuantizer does."""
    inits = {t.name: t for t in graph.graph.initializer}
    nodes, count = [], 0
    for node in graph.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is None or node.name in exclude or not is_deferred(w) or len(w.dims) != 2:
            nodes.append(node)
            continue
        k, n = w.dims
        k_blocks = (k + block - 1) // block
        kpack = 8 // bits
        base = store.recipes[w.name]
        made = [store.initializer(w.name + f"_Q{bits}", replace(base, quant=(bits, block, symmetric, "q")),
                                  [n, k_blocks, (block + kpack - 1) // kpack], onnx.TensorProto.UINT8),
                store.initializer(w.name + "_scales", replace(base, quant=(bits, block, symmetric, "scales")), [n, k_blocks])]
        if not symmetric:
            made.append(store.initializer(w.name + "_zero_points", replace(base, quant=(bits, block, symmetric, "zp")),
                                          [n, (k_blocks + kpack - 1) // kpack], onnx.TensorProto.UINT8))
        graph.graph.initializer.extend(made)
        attrs = dict(K=k, N=n, bits=bits, block_size=block, **({"accuracy_level": accuracy_level} if accuracy_level else {}))
        nodes.append(helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in made], [node.output[0]],
                                      name=node.name + f"_Q{bits}" if node.name else "", domain="com.microsoft", **attrs))
        count += 1
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for node in graph.graph.node for i in node.input}
    for t in [t for t in graph.graph.initializer if t.name not in used]:
        graph.graph.initializer.remove(t)
    return count


def grid_matmuls(graph: onnx.ModelProto, store: WeightStore, accuracy_level: int, exclude: set[str],
                 fitted: bool = False, candidates: frozenset[str] | set[str] = frozenset()) -> tuple[set[str], set[str]]:
    """exporters.grid on deferred weights: each MatMul whose weight lies on a 4-bit grid becomes the MatMulNBits that
    keeps it. Telling reads the weight once here (its packed form is made again when written); only an fp32 checkpoint
    can hold such a grid (bf16 rounds it off), so others are not read. ``fitted`` (grid-fit, auto): every other MatMul
    of a 32-multiple K takes that form, a fitted grid where it has none; nothing is read to tell, except for
    ``candidates`` (auto's LM head and MLP outputs), which keep an exact grid or are left for 8 bits. Returns the
    block-sum MatMuls added and the candidates on no grid."""
    fp32 = store.ckpt.dtype() == torch.float32
    if not fp32 and not fitted:
        return set(), set()
    weights = {t.name: len(t.dims) for t in graph.graph.initializer}
    matmuls = sum(n.op_type == "MatMul" and len(n.input) > 1 and weights.get(n.input[1]) == 2 for n in graph.graph.node)
    bar = tqdm(total=matmuls, desc="finding 4-bit grids", unit="MatMul", leave=False)
    off_grid = set()

    def on_grid(w) -> bool:
        return fp32 and w.dims[0] % grid.BLOCK == 0 and grid.fit(store.array(store.recipes[w.name])) is not None

    def tensors(node, w):
        bar.update(1)
        if node.name in exclude or not is_deferred(w):
            return None
        k, n = w.dims
        if node.name in candidates or not fitted:
            if not on_grid(w):
                off_grid.update({node.name} & candidates)
                return None
            kind = "grid"
        elif k % grid.BLOCK:
            return None
        else:
            kind = "gridfit"
        base, blocks = store.recipes[w.name], grid.augmented_k(k) // grid.BLOCK
        parts = [(f"{kind}-q", [n, blocks, grid.BLOCK // 2], onnx.TensorProto.UINT8),
                 (f"{kind}-scales", [n, blocks], onnx.TensorProto.FLOAT),
                 (f"{kind}-zp", [n, (blocks + 1) // 2], onnx.TensorProto.UINT8)]
        return [store.initializer(name, replace(base, quant=(4, grid.BLOCK, False, part)), dims, dtype)
                for name, (part, dims, dtype) in zip(grid.tensor_names(w.name), parts)]

    with bar:
        return grid.rewrite(graph, tensors, accuracy_level), off_grid


def half_embeddings(graph: onnx.ModelProto) -> int:
    """exporters.quantize.half_embeddings for a deferred table: relabel it FLOAT16 (cast when written) and cast rows back."""
    inits = {t.name: t for t in graph.graph.initializer}
    count = 0
    for node in list(graph.graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT or table.dims[0] < 1024:
            continue
        if not is_deferred(table):
            continue
        table.data_type = onnx.TensorProto.FLOAT16
        out = node.output[0]
        node.output[0] = out + "_fp16"
        cast = helper.make_node("Cast", [out + "_fp16"], [out], to=onnx.TensorProto.FLOAT, name=node.name + "_cast_fp32")
        graph.graph.node.insert(list(graph.graph.node).index(node) + 1, cast)
        count += 1
    return count


def planned_bytes(graph: onnx.ModelProto) -> int:
    """Bytes the weights will take once written (known from the dims and types alone)."""
    total = 0
    for t in graph.graph.initializer:
        if is_deferred(t):
            total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        else:
            total += len(t.raw_data)
    return total


def write_weights(graph: onnx.ModelProto, store: WeightStore, folder: Path, data: str = "model.onnx.data") -> Path:
    """Make each deferred initializer and append it (and every inline tensor of 1 KiB or more) to ``data``."""
    todo = [t for t in graph.graph.initializer if is_deferred(t) or len(t.raw_data) >= 1024
            or (t.data_location != onnx.TensorProto.EXTERNAL and numpy_helper.to_array(t).nbytes >= 1024)]
    path = folder / data
    with open(path, "wb") as sink, tqdm(todo, desc="writing weights", unit="tensor", leave=False) as bar:
        for t in bar:
            array = store.bytes_of(t) if is_deferred(t) else numpy_helper.to_array(t)
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            if raw.nbytes >= 1 << 20 and sink.tell() % ALIGN:
                sink.write(b"\0" * (ALIGN - sink.tell() % ALIGN))
            offset = sink.tell()
            sink.write(raw.data)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data), ("offset", str(offset)), ("length", str(raw.nbytes))):
                t.external_data.add(key=key, value=value)
            del array, raw
    store._cache = None
    return path
