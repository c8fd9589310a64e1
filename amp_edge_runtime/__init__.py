"""Torch-free runtime for exported packages: what an app copies (onnxruntime, numpy, tokenizers)."""
