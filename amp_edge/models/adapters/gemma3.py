"""Gemma 3 (text): Llama's projection names, plus what the generic code must not miss.

- Sliding-window attention on most layers (``layer_types``), each layer type with its own rope base
  (``rope_local_base_freq`` on local layers): the exporter reads ``sliding_window(i)`` and ``rope_layer_type(i)``.
- q_norm/k_norm act on head_dim and are shared by every head, so head pruning leaves them as they are; the four
  norms per layer, the sqrt(hidden) embedding scale and the GELU-tanh gated MLP sit outside the pruned weights.
- head_dim (256) is not hidden/heads; pruned configs keep it explicit (compat.pruned_heads_allowed relaxes 5.x's
  Gemma3TextConfig, which checks hidden % heads).
- At 270M four query heads share one KV head: only query heads can go (``--gqa query``).
"""

from amp_edge.models.adapters.base import Adapter, refuse, register


@register
class Gemma3Adapter(Adapter):
    model_type = "gemma3_text"
    gguf_arch = "gemma3"  # a text-only Gemma 3 GGUF says "gemma3"; transformers loads it as gemma3_text
    genai_type = "gemma3_text"


refuse("gemma3", "Gemma 3 multimodal (model_type 'gemma3', vision tower included) is not supported; "
                 "use a text-only checkpoint (model_type 'gemma3_text', e.g. gemma3-270m)")
