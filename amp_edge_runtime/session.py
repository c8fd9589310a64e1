"""ONNX Runtime session options as amp-edge's decoder, bench and evaluation use them."""

from __future__ import annotations

import onnxruntime as ort

LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int | None = None, level: str = "all", spin: bool = True) -> ort.SessionOptions:
    """``spin``: ORT's worker threads busy-wait between ops (ORT's default). Measured on dense SmolLM2 (2 threads):
    on an idle 2-core box spinning is faster (fp32 13.2-14.8 vs 14.7-15.2 ms/token, int4 4.9-5.6 vs 7.1-7.4); on the
    same box shared with other work it is slower (fp32 25-40 vs 16.5-21). ``spin=False`` for devices whose cores are
    shared with the app."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.graph_optimization_level = LEVELS[level]
    return opts
