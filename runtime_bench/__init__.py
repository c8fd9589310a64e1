"""Runtime side of amp-edge: a torch-free generation loop and latency/memory benchmarks under ONNX Runtime."""
