"""The AMP pipeline: score, allocate, split heads/MLP, plan, surgery, refit."""
