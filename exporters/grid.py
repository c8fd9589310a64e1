"""int4 that keeps a 4-bit source's own grid: lossless re-quantization of weights that already lie on one.

A model read from a Q4_0 / Q4_1 / Q4_K GGUF (SmolLM2-135M's and Gemma-3-270M's here) has weights that are exactly
``d * q + m`` per block of 32 inputs, q in 0..15, with a float offset m. ONNX Runtime's fast int4 kernel (MatMulNBits,
prepacked) computes ``scale * (q - zp)`` with an *integer* zero point, so round-to-nearest re-quantization shifts that
grid by up to half a step: on dense SmolLM2 it agrees with its fp32 on 0.66-0.70 of next tokens. hqq's float zero points
reproduce the grid but take a kernel path without prepacking (16-24x slower decode).

Here the grid is kept on the fast kernel: ``w = d * (q - z) + r`` with z the nearest integer to -m/d and r = m + d*z the
block's residual offset. Since ``sum_k x_k w_k = sum_blocks [d * sum (q - z) x_k] + sum_blocks r_b * S_b(x)`` with S_b the
sum of x over block b, the MatMul becomes one MatMulNBits over ``Concat(x, S(x))``: the first K rows are the grid, the
K/32 extra rows hold r (itself 4-bit, its only error). Cost: K/32 more rows (3%) and three small ops per distinct input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32
SUM_SUFFIX = "/GridBlockSum"  # the block-sum MatMuls (weights 0/1: never quantized themselves)
MIN_ON_GRID = 0.5  # share of a weight's blocks on a grid for it to keep one: an off-grid block takes min/max float
# offsets, never a coarser step than round-to-nearest's, so the bound only skips the extra ops where little is gained
_TOL = 1e-3  # of the grid step
_CHUNK = 1024  # output columns examined at a time (bounds the float64 temporaries: 117 MB at K = 14336)


@dataclass
class GridWeight:
    """MatMulNBits inputs for a (K, N) weight on its grid, over K + K/32 inputs (the block sums appended)."""

    packed: np.ndarray  # (N, blocks, 16) uint8
    scales: np.ndarray  # (N, blocks) float32
    zero_points: np.ndarray  # (N, ceil(blocks / 2)) uint8
    k: int  # the original K
    on_grid: float  # share of blocks found exactly on a grid

    @property
    def k_augmented(self) -> int:
        return augmented_k(self.k)


def augmented_k(k: int) -> int:
    """K plus the block sums, padded to whole blocks (MatMulNBits' fast path wants K a multiple of the block)."""
    return k + -(-(k // BLOCK) // BLOCK) * BLOCK


def fit(weight: np.ndarray, block: int = BLOCK, fitted: bool = False) -> GridWeight | None:
    """The grid form of a (K, N) weight, or None where it has none (K not a multiple of 32, block size other than 32,
    or fewer than half of its blocks on a 16-level grid: those weights take round-to-nearest).

    ``fitted`` (--quant-method grid-fit): a weight on no grid gets a fitted one instead of None: per block, the step
    and float offset that minimise the squared error for its levels (least squares, alternated with rounding, from
    min/max), carried by the same block sums. On a recovered SmolLM2 (every weight moved off its source grid by
    training) with the LM head and down_proj at 8 bits: top-1 on WikiText-2 0.739 -> 0.793 against rtn's offsets."""
    k, n = weight.shape
    if block != BLOCK or k % BLOCK or k < BLOCK:
        return None
    first = _fit_columns(weight[:, :_CHUNK])
    if first[4][:256].mean() < MIN_ON_GRID:  # told from the first columns before the rest is examined
        return _least_squares(weight) if fitted else None
    parts = [first] + [_fit_columns(weight[:, c:c + _CHUNK]) for c in range(_CHUNK, n, _CHUNK)]
    q, s, z, r, exact = (np.concatenate([p[i] for p in parts], 0) for i in range(5))
    on_grid = float(exact.mean())
    if on_grid < MIN_ON_GRID:
        return _least_squares(weight) if fitted else None
    return _pack(q, s, z, r, k, on_grid)


def _least_squares(weight: np.ndarray) -> GridWeight:
    parts = [_fit_least_squares(weight[:, c:c + _CHUNK]) for c in range(0, weight.shape[1], _CHUNK)]
    q, s, z, r = (np.concatenate([p[i] for p in parts], 0) for i in range(4))
    return _pack(q, s, z, r, weight.shape[0], 0.0)


def _fit_least_squares(w: np.ndarray, rounds: int = 3):
    """Per block of 32: levels q in 0..15 and the (step s, offset m) minimising sum (s*q + m - w)^2, alternating the
    closed-form fit of (s, m) with re-rounding, from min/max (three rounds: 18% less squared error than rtn on Gaussian
    weights; more rounds gained nothing measurable)."""
    b = np.ascontiguousarray(w.T, dtype=np.float64).reshape(w.shape[1], -1, BLOCK)
    lo, hi = b.min(-1), b.max(-1)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    m = lo
    q = np.clip(np.round((b - m[..., None]) / s[..., None]), 0, 15)
    mean_b = b.mean(-1)
    for _ in range(rounds):
        mean_q = q.mean(-1)
        var = ((q - mean_q[..., None]) ** 2).mean(-1)
        cov = ((q - mean_q[..., None]) * (b - mean_b[..., None])).mean(-1)
        ok = (var > 0) & (cov > 0)  # a block of one level keeps its min/max fit
        s = np.where(ok, cov / np.where(ok, var, 1.0), s)
        m = np.where(ok, mean_b - s * mean_q, m)
        q = np.clip(np.round((b - m[..., None]) / s[..., None]), 0, 15)
    z = np.clip(np.round(-m / s), 0, 15)
    return q, s, z, m + s * z


def _fit_columns(w: np.ndarray):
    cols = w.shape[1]
    b = np.ascontiguousarray(w.T, dtype=np.float64).reshape(cols, -1, BLOCK)
    lo, hi = b.min(-1), b.max(-1)
    srt = np.sort(b, -1)
    gaps = np.diff(srt, axis=-1)
    gaps[gaps <= (hi - lo)[..., None] * 1e-6] = np.inf  # equal values (one grid level) are no gap
    step = gaps.min(-1)
    level = (b - lo[..., None]) / np.where(np.isfinite(step), step, 1.0)[..., None]
    exact = np.isfinite(step) & (np.abs(level - np.round(level)) < _TOL).all(-1) & (np.round(level).max(-1) <= 15)
    exact |= hi == lo  # one value: any step
    s = np.where(exact & np.isfinite(step), step, (hi - lo) / 15)
    s[s == 0] = 1.0
    q = np.clip(np.round((b - lo[..., None]) / s[..., None]), 0, 15)
    z = np.clip(np.round(-lo / s), 0, 15)
    return q, s, z, lo + s * z, exact


def _pack(q, s, z, r, k, on_grid) -> GridWeight:
    n, kb = s.shape
    rb = -(-kb // BLOCK)
    padded = np.zeros((n, rb * BLOCK))
    padded[:, :kb] = r
    rq, rs, rz = _rtn(padded.reshape(n, rb, BLOCK))
    levels = np.concatenate([q, rq], 1).astype(np.uint8)
    zps = np.concatenate([z, rz], 1).astype(np.uint8)
    if zps.shape[1] % 2:
        zps = np.concatenate([zps, np.zeros((n, 1), np.uint8)], 1)
    return GridWeight(packed=(levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8),
                      scales=np.concatenate([s, rs], 1).astype(np.float32),
                      zero_points=(zps[:, 0::2] | (zps[:, 1::2] << 4)).astype(np.uint8), k=k, on_grid=on_grid)


def _rtn(blocks: np.ndarray):
    """4-bit round to nearest with the range widened to hold 0 (padding rows are exact zeros), as ONNX Runtime's."""
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    s = (hi - lo) / 15
    s[s == 0] = 1.0
    z = np.clip(np.round(-lo / s), 0, 15)
    return np.clip(np.round(blocks / s[..., None] + z[..., None]), 0, 15), s, z


def block_sum_nodes(x: str, k: int) -> tuple[list, list, str]:
    """Nodes and constants making ``Concat(x, S(x))``, S the sum of x over each block of 32 inputs, zero-padded to a
    whole block: S = x @ E with E the (K, blocks) block indicator (one small MatMul, and K' a multiple of 32)."""
    indicator = np.zeros((k, augmented_k(k) - k), np.float32)
    indicator[np.arange(k), np.arange(k) // BLOCK] = 1.0
    e, out = f"grid_block_indicator_{k}", f"{x}/grid_augmented"  # one per K, shared by the inputs of that width
    nodes = [helper.make_node("MatMul", [x, e], [f"{x}/grid_sums"], name=x + SUM_SUFFIX),
             helper.make_node("Concat", [x, f"{x}/grid_sums"], [out], name=f"{x}/GridConcat", axis=-1)]
    return nodes, [numpy_helper.from_array(indicator, e)], out


def matmul_node(name: str, x_augmented: str, inputs: list[str], output: str, k: int, n: int, accuracy_level: int):
    attrs = dict(K=augmented_k(k), N=n, bits=4, block_size=BLOCK, **({"accuracy_level": accuracy_level} if accuracy_level else {}))
    return helper.make_node("MatMulNBits", [x_augmented, *inputs], [output], name=name + "_Q4G", domain="com.microsoft", **attrs)


def rewrite(graph: onnx.ModelProto, tensors: Callable[[onnx.NodeProto, onnx.TensorProto], list | None],
            accuracy_level: int) -> set[str]:
    """Every MatMul for which ``tensors(node, weight)`` gives the three MatMulNBits inputs of its grid form (packed
    levels, scales, zero points, as TensorProtos; None: the weight has no grid) becomes that MatMulNBits over its
    input with the block sums appended (one block-sum per distinct input). Shared by the in-memory and the streamed
    export. Returns the block-sum MatMuls added (never to be quantized themselves)."""
    inits = {t.name: t for t in graph.graph.initializer}
    nodes, augmented, sums = [], {}, set()
    for node in graph.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        made = tensors(node, w) if w is not None and len(w.dims) == 2 else None
        if made is None:
            nodes.append(node)
            continue
        k, n = w.dims
        x = node.input[0]
        if x not in augmented:
            added, consts, augmented[x] = block_sum_nodes(x, k)
            nodes += added
            sums |= {a.name for a in added if a.op_type == "MatMul"}
            graph.graph.initializer.extend(c for c in consts if c.name not in inits)
            inits.update({c.name: c for c in consts})
        graph.graph.initializer.extend(made)
        nodes.append(matmul_node(node.name, augmented[x], [t.name for t in made], node.output[0], k, n, accuracy_level))
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {i for node in graph.graph.node for i in node.input}
    for t in [t for t in graph.graph.initializer if t.name not in used]:
        graph.graph.initializer.remove(t)
    if sums and not any(o.domain == "com.microsoft" for o in graph.opset_import):
        graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sums


def tensor_names(weight: str) -> list[str]:
    return [f"{weight}_Q4G", f"{weight}_Q4G_scales", f"{weight}_Q4G_zero_points"]
