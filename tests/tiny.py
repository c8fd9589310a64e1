"""Tiny random models of every supported family, and a character tokenizer, built locally (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, PhiConfig, Phi3Config, Qwen2Config, Qwen3Config

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, intermediate_size=96, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def gemma3_config(num_key_value_heads: int = 2, sliding_window: int = 8) -> Gemma3TextConfig:
    """Gemma 3 in small: sliding-window layers around a full one, their own rope bases, head_dim 32 != hidden/heads."""
    return Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=num_key_value_heads, head_dim=32,
                            sliding_window=sliding_window, query_pre_attn_scalar=32, rope_theta=1e6,
                            rope_local_base_freq=1e4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            **COMMON)


def _configs() -> dict:
    return {
        "llama": LlamaConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8, **COMMON),
        "llama-mha": LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **COMMON),
        "mistral": MistralConfig(num_attention_heads=8, num_key_value_heads=4, head_dim=8, **COMMON),
        "qwen2": Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **COMMON),
        "qwen3": Qwen3Config(num_attention_heads=6, num_key_value_heads=2, head_dim=16, **COMMON),
        "phi": PhiConfig(num_attention_heads=4, partial_rotary_factor=0.5, **COMMON),
        "phi3": Phi3Config(num_attention_heads=4, num_key_value_heads=4, **COMMON),
        "phi3-gqa": Phi3Config(num_attention_heads=8, num_key_value_heads=2, partial_rotary_factor=0.75, **COMMON),
        "gemma3": gemma3_config(),
    }


FAMILIES = list(_configs())
# head_dim 16: the smallest head ONNX Runtime's GroupQueryAttention takes (the families above mostly use 8)
GQA_CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=16, **COMMON),
    "qwen2-gqa": lambda: Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON),  # q/k/v biases
    "qwen3-gqa": lambda: Qwen3Config(num_attention_heads=6, num_key_value_heads=2, head_dim=16, **COMMON),
    "gemma3-kv1": lambda: gemma3_config(num_key_value_heads=1),  # Gemma-3-270M's shape: 4 query heads, 1 KV head
    "phi3-gqa32": lambda: Phi3Config(num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5, **COMMON),
}


def tiny_model(name: str, seed: int = 0):
    return model_from_config(GQA_CONFIGS[name]() if name in GQA_CONFIGS else _configs()[name], seed)


def model_from_config(config, seed: int = 0):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init gives near-uniform logits; larger weights make differences between heads visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus <unk>/<s>/</s>/<pad>."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    model = tiny_model(name, seed)
    model.save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    return folder


def sample_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# A chat template the character tokenizer can encode; it uses a special-token variable, as real templates do.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def set_chat_template(folder: Path, inline: bool = False) -> Path:
    """chat_template.jinja (how transformers 4.57 saves it), or ``inline`` in tokenizer_config.json (older saves)."""
    import json

    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if inline:
        jinja.unlink(missing_ok=True)
        config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHAT_TEMPLATE}, indent=1))
    else:
        jinja.write_text(CHAT_TEMPLATE)
    return folder


def staggered_plan(model):
    """Layer 0 keeps every KV group, layer i > 0 drops group i mod kv (with its query heads) and 8 i neurons."""
    from amp_edge.models.adapters import get_adapter
    from amp_edge.pruning.plan import PruningPlan

    adapter = get_adapter(model)
    plan = PruningPlan.keep_all(adapter, criterion="manual", allocation="global", gqa="group")
    for i, (layer, shape) in enumerate(zip(plan.layers, plan.original_shapes)):
        if i:
            drop = i % shape.num_kv_heads
            layer.kv_heads = [g for g in layer.kv_heads if g != drop]
            layer.q_heads = [h for h in layer.q_heads if h // shape.group_size != drop]
            layer.neurons = layer.neurons[: shape.intermediate_size - 8 * i]
    return plan


def matmul_bits(package: Path) -> dict[str, int]:
    """Each MatMulNBits of an exported package and its bits, by node name."""
    import onnx

    g = onnx.load(str(package / "model.onnx"), load_external_data=False)
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in g.graph.node if n.op_type == "MatMulNBits"}
