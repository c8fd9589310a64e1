"""Whether half-precision PyTorch math is fast here. A CPU without AVX512-BF16/AVX512-FP16 or AMX (an AVX2-only
EPYC, say) has no native bf16/fp16 kernels: torch falls back to a scalar one-thread gemm, measured at 1611 ms
(bf16) and 1567 ms (fp16) against 15.8 ms in fp32 for 1024x576 @ 576x1536 on such a 2-core box."""

from __future__ import annotations

import torch

_PROBES = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


def half_is_fast(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """True for float32 and wherever ``dtype`` has native kernels on ``device``."""
    device = torch.device(device)
    if dtype not in _PROBES:
        return True
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, _PROBES[dtype])())
    except (AttributeError, RuntimeError):  # a build without the probe: trust the choice
        return True
