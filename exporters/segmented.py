"""Run a package's own graph one decoder layer at a time, for validating packages whose ONNX Runtime session would not
fit in memory.

ONNX Runtime's CPU provider has no fp16 MatMul on x86: a session over an fp16 package casts every weight to fp32 and
keeps both (11.4 GB for the 5.5 GB of a 2.75B model). Here the graph is cut into one piece per decoder layer (the
embedding goes with the first, the final norm and head with the last), each piece a session over the same
``model.onnx.data`` that is opened, run and closed before the next, so one layer's weights are in memory at a time.

Nothing is rebuilt or approximated: every node of the package runs, with its own attributes and weights; only the
order changes. A teacher-forced decode (a prefill, then one cached step per given token) is layer-separable, since each
call's input to layer k is layer k-1's output for that same call: each piece runs every call of every sequence, keeps
the tensors later pieces read, and its own KV cache from one call to the next.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from amp_edge.errors import PackageError

_CALL_INPUTS = ("input_ids", "attention_mask", "position_ids")
_LAYER = re.compile(r"layers[./](\d+)[./]")


@dataclass
class Call:
    """One call of the whole graph: its input values by name (input_ids, attention_mask, position_ids)."""

    feeds: dict[str, np.ndarray]


def layer_of(name: str) -> int | None:
    """The decoder layer a weight or tensor name belongs to ("...layers.3..." -> 3), None for shared ones."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def split(graph: onnx.GraphProto) -> list[list[int]]:
    """Node indices of each piece, in the graph's order. A node goes to the latest layer among its own weights and its
    inputs' producers (so every edge runs forward); nodes that read no graph input (constants and what is computed
    from them alone) are repeated in every piece that reads them."""
    inits = {i.name for i in graph.initializer}
    produced: dict[str, int] = {}  # tensor -> index of the node making it
    for i, node in enumerate(graph.node):
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise PackageError(f"node {node.name!r} ({node.op_type}) has a subgraph: cannot run this graph layer by layer")
        for out in node.output:
            if out:
                produced[out] = i
    piece: list[int | None] = [None] * len(graph.node)  # None: reads constants only
    for i, node in enumerate(graph.node):
        dynamic = [x for x in node.input if x and x not in inits and (x not in produced or piece[produced[x]] is not None)]
        if dynamic:
            own = [layer_of(x) for x in node.input if x in inits]
            ups = [piece[produced[x]] for x in dynamic if x in produced]
            piece[i] = max([0, *(k for k in own if k is not None), *ups])
    pieces = []
    for k in sorted({p for p in piece if p is not None}):
        nodes = {i for i, p in enumerate(piece) if p == k}
        todo = list(nodes)
        while todo:  # the constant-only nodes these read, and theirs
            for x in graph.node[todo.pop()].input:
                j = produced.get(x)
                if j is not None and piece[j] is None and j not in nodes:
                    nodes.add(j)
                    todo.append(j)
        pieces.append(sorted(nodes))
    return pieces


class SegmentedGraph:
    """The package at ``folder`` cut into pieces (``split``), each run by its own short-lived session."""

    def __init__(self, folder: str | Path, options=None):
        self.folder = Path(folder)
        model_file = self.folder / "model.onnx"
        if not model_file.is_file():
            raise PackageError(f"{self.folder} has no model.onnx; not an exported package")
        self.model = onnx.load(str(model_file), load_external_data=False)
        self.options = options
        graph = self.model.graph
        self.pieces = split(graph)
        self.outputs = [o.name for o in graph.output]
        self.graph_inputs = {i.name: i for i in graph.input}

    def _piece_model(self, nodes: list[int], needed_after: set[str]) -> tuple[onnx.ModelProto, list[str], list[str]]:
        """The piece as a model: its nodes, the initializers they read, its inputs (graph inputs and tensors earlier
        pieces made) and outputs (graph outputs and what later pieces read)."""
        graph = self.model.graph
        inits = {i.name: i for i in graph.initializer}
        made = {o for i in nodes for o in graph.node[i].output if o}
        reads = [x for i in nodes for x in graph.node[i].input if x]
        inputs = list(dict.fromkeys(x for x in reads if x not in made and x not in inits))
        outputs = [o for o in dict.fromkeys(o for i in nodes for o in graph.node[i].output if o)
                   if o in needed_after or o in self.outputs]
        sub = onnx.helper.make_graph(
            [graph.node[i] for i in nodes], f"{graph.name}-piece",
            [onnx.ValueInfoProto(name=x) for x in inputs],  # typed when the piece runs (``_typed``)
            [onnx.ValueInfoProto(name=x) for x in outputs],
            [inits[x] for x in dict.fromkeys(reads) if x in inits])
        model = onnx.helper.make_model(sub, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        return model, inputs, outputs

    def _needed_after(self) -> list[set[str]]:
        """For each piece, the tensors any later piece reads."""
        graph = self.model.graph
        later: list[set[str]] = []
        acc: set[str] = set()
        for nodes in reversed(self.pieces):
            later.append(set(acc))
            acc |= {x for i in nodes for x in graph.node[i].input if x}
        return later[::-1]

    def run(self, sequences: list[list[Call]], desc: str | None = "validating: onnx layers") -> list[list[dict]]:
        """Every call of every sequence (a sequence's calls share a KV cache, in order), through every piece.
        Returns, per sequence and call, the graph outputs other than the cache ("logits")."""
        import onnxruntime as ort

        values = [[dict(c.feeds) for c in seq] for seq in sequences]  # per call: every tensor a later piece reads
        for seq, vals in zip(sequences, values):
            for v in vals:
                v.update({n: a for n, a in self._empty_cache(v).items() if n not in v})
        needed_after = self._needed_after()
        opts = self.options or ort.SessionOptions()
        # each piece's weights are read from the package's own model.onnx.data
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        results: list[list[dict]] = [[{} for _ in seq] for seq in sequences]
        with tempfile.TemporaryDirectory(dir=self.folder) as scratch:
            for nodes, after in tqdm(list(zip(self.pieces, needed_after)), desc=desc, unit="layer", leave=False,
                                     disable=desc is None):
                model, inputs, outputs = self._piece_model(nodes, after)
                path = Path(scratch) / "piece.onnx"
                session = None
                for seq_vals, seq_results in zip(values, results):
                    cache: dict[str, np.ndarray] = {}
                    for vals, res in zip(seq_vals, seq_results):
                        feed = {x: cache.get(x, vals.get(x)) for x in inputs}
                        missing = [x for x, a in feed.items() if a is None]
                        if missing:
                            raise PackageError(f"{self.folder}: a layer piece reads {missing[:3]}, which nothing computed")
                        if session is None:
                            _typed(model, feed)
                            onnx.save_model(model, str(path))
                            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
                        got = dict(zip(outputs, session.run(outputs, feed)))
                        for name, value in got.items():
                            if name.startswith("present."):
                                cache["past_key_values." + name[len("present."):]] = value
                            elif name in self.outputs:
                                res[name] = value
                            if name in after:
                                vals[name] = value
                del session
                for vals in (v for seq_vals in values for v in seq_vals):  # drop what no later piece reads
                    for name in [n for n in vals if n not in after and n not in _CALL_INPUTS]:
                        del vals[name]
        return results

    def _empty_cache(self, feeds: dict) -> dict[str, np.ndarray]:
        batch = feeds["input_ids"].shape[0]
        out = {}
        for name, info in self.graph_inputs.items():
            if name.startswith("past_key_values."):
                t = info.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
                dims[0], dims[2] = batch, 0
                out[name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        return out


def _typed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """Give the piece's inputs the types of the values they get (every dim symbolic: later calls differ in length)."""
    for vi in model.graph.input:
        a = feed[vi.name]
        elem = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
        vi.type.CopyFrom(onnx.helper.make_tensor_type_proto(elem, [f"{vi.name}_d{i}" for i in range(a.ndim)]))


def teacher_forced(folder: str | Path, runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], options=None) -> list[np.ndarray]:
    """For each (prompt ids, prompt mask, tokens): the package's logits of a prefill of the prompt, then of one cached
    step per token but the last (exporters.validate's teacher forcing), run one layer at a time. Returns (batch,
    prompt + tokens - 1, vocab) fp32 arrays."""
    seg = SegmentedGraph(folder, options)
    uses_positions = "position_ids" in seg.graph_inputs
    sequences = []
    for ids, mask, tokens in runs:
        positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
        calls = [Call(_feeds(ids, mask, positions, uses_positions))]
        cur = mask
        for t in range(tokens.shape[1] - 1):
            cur = np.concatenate([cur, np.ones((len(ids), 1), dtype=mask.dtype)], 1)
            calls.append(Call(_feeds(tokens[:, t:t + 1], cur, positions[:, -1:] + t + 1, uses_positions)))
        sequences.append(calls)
    out = seg.run(sequences)
    return [np.concatenate([c["logits"].astype(np.float32) for c in seq], 1) for seq in out]


def _feeds(ids, mask, positions, uses_positions: bool) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "attention_mask": np.ascontiguousarray(mask, dtype=np.int64)}
    if uses_positions:
        feeds["position_ids"] = np.ascontiguousarray(positions, dtype=np.int64)
    return feeds
