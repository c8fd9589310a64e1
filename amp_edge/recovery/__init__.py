"""Training a pruned model back: distillation or LoRA, resumable."""
