"""Architecture adapters, registered by ``model_type``. Importing this package registers them all."""

from amp_edge.models.adapters import gemma3, llama, phi, phi3  # noqa: F401  (registration side effect)
from amp_edge.models.adapters.base import (Adapter, LayerShape, UnitCosts, adapter_class, get_adapter, gguf_architectures, register,
                                           supported_model_types)

__all__ = ["Adapter", "LayerShape", "UnitCosts", "adapter_class", "get_adapter", "gguf_architectures", "register", "supported_model_types"]
