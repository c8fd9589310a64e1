"""Where models come from and go to: sources, the GGUF cache, checkpoints, per-family adapters."""
