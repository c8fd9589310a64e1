"""Families with Llama's layout: separate q/k/v/o, gate/up/down (biases and q/k norms carry over)."""

from amp_edge.models.adapters.base import Adapter, register


@register
class LlamaAdapter(Adapter):
    """Llama 1/2/3, SmolLM2."""

    model_type = "llama"


@register
class MistralAdapter(LlamaAdapter):
    """Mistral: ``config.sliding_window`` (4096 in 7B v0.1, null from v0.2) on every layer."""

    model_type = "mistral"
    window_on_every_layer = True


@register
class Qwen2Adapter(LlamaAdapter):
    """Qwen2: biases on q/k/v are sliced with their rows."""

    model_type = "qwen2"


@register
class Qwen3Adapter(LlamaAdapter):
    """Qwen3: q_norm/k_norm act on head_dim and are shared by all heads, so they stay as they are."""

    model_type = "qwen3"
