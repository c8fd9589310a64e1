"""amp-edge eval: zero-shot tasks (lm-evaluation-harness) and WikiText-2 perplexity for models, checkpoints and ONNX packages."""
