"""Bytes a decode step must read: every weight except lookup tables (a Gather reads one row per token)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto

_SIZES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.UINT8: 1, TensorProto.INT8: 1,
          TensorProto.INT64: 8, TensorProto.INT32: 4, TensorProto.DOUBLE: 8, TensorProto.BOOL: 1}


def weight_bytes_per_token(model_path: str | Path) -> dict:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    users: dict[str, set[str]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, set()).add(node.op_type if i == 0 else node.op_type + ":other")
    total = table = 0
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        size = n * _SIZES.get(t.data_type, 4)
        total += size
        if users.get(t.name) == {"Gather"} and len(t.dims) == 2:
            table += size
    return {"weights": total, "lookup_tables": table, "read_per_token": total - table}
