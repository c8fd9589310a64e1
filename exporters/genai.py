"""genai_config.json: what onnxruntime-genai needs to run the package with its own generator."""

from __future__ import annotations

from amp_edge.models.adapters import get_adapter



def genai_config(model, tokenizer=None) -> dict:
    config = model.config
    adapter = get_adapter(model)
    shapes = adapter.shapes()
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        extra = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos += [e for e in extra if e not in eos]
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else (eos[0] if eos else 0)
    context = getattr(config, "max_position_embeddings", 2048)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": adapter.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                # Per-layer packages: genai reads each layer's KV head count from the graph's input shapes.
                "num_attention_heads": max(s.num_heads for s in shapes),
                "num_hidden_layers": len(shapes),
                "num_key_value_heads": max(s.num_kv_heads for s in shapes),
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": adapter.genai_type or config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # plain attention concatenates past and new keys; all-GQA graphs: True (package.py)
            **_sampling(gen),
        },
    }


def _sampling(gen) -> dict:
    """Sampling settings from the model's generation config, genai's defaults where it has none.

    Greedy is do_sample=False; top_k is not forced to 1, since genai then takes its top-k path on every token
    (about 2 ms/token more on SmolLM2-135M, measured against the model builder's output).
    """
    out = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    for key in out:
        value = getattr(gen, key, None) if gen is not None else None
        if value is not None:
            out[key] = value
    if gen is not None and getattr(gen, "do_sample", None):
        out["do_sample"] = True
    return out
