"""The closed sets of option values, as enums so that --help lists them (tests check they match the library's)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value


Criterion = Choice("Criterion", {v: v for v in ("amp", "wanda-sp", "magnitude", "random")})
Allocation = Choice("Allocation", {v: v for v in ("uniform", "global")})
Gqa = Choice("Gqa", {v: v for v in ("query", "group")})
RatioOf = Choice("RatioOf", {v: v for v in ("total", "layers")})
Normalization = Choice("Normalization", {v: v for v in ("mean", "zscore")})
WeightDtype = Choice("WeightDtype", {v: v for v in ("float32", "float16", "bfloat16", "auto")})
RecoverMethod = Choice("RecoverMethod", {v: v for v in ("distill", "lora")})
RecoverAdapter = Choice("RecoverAdapter", {v: v for v in ("auto", "full", "lora")})
Schedule = Choice("Schedule", {v: v for v in ("cosine", "linear")})
Precision = Choice("Precision", {v: v for v in ("auto", "fp32", "bf16")})
ExportDtype = Choice("ExportDtype", {v: v for v in ("fp32", "fp16", "int8", "int4")})
Optimize = Choice("Optimize", {v: v for v in ("fuse", "none")})
Attention = Choice("Attention", {v: v for v in ("auto", "gqa", "sdpa")})
Int8Scheme = Choice("Int8Scheme", {v: v for v in ("weight-only", "dynamic")})
Embedding = Choice("Embedding", {v: v for v in ("shared", "fp16")})
QuantMethod = Choice("QuantMethod", {v: v for v in ("auto", "rtn", "grid", "grid-fit", "hqq", "k-quant")})
Provider = Choice("Provider", {v: v for v in ("cpu", "cuda", "openvino", "webgpu", "tensorrt-rtx")})


def value(choice):
    """The plain string the library takes (None stays None)."""
    return None if choice is None else str(choice)



RATIO_OF_HELP = ("What --ratio counts: total (all parameters, embeddings included, as the paper's tables and the file "
                 "size count) | layers (the attention and MLP weights of the decoder layers, the only ones pruned).")
DEVICE_MAP_HELP = ("Place the layers through accelerate: auto | balanced | sequential (GPUs, then CPU, then disk), one "
                   "device (cpu, cuda:1), or a JSON file of module -> device ('disk' offloads). Folders and hub ids only.")
