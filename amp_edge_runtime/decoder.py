"""Greedy generation with an exported decoder under ONNX Runtime.

Needs only onnxruntime and numpy (tokenizers for text), so an app on a device can use this module as is.
The graph's own input shapes say how many KV heads each layer has, so per-layer packages work too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from amp_edge_runtime.errors import PackageError, ProviderError
from amp_edge_runtime.providers import apply as apply_provider
from amp_edge_runtime.session import session_options

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
MODEL_FILE = "model.onnx"


@dataclass
class StepTimes:
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)


class OnnxDecoder:
    """One inference session over a decoder graph with inputs input_ids/attention_mask/position_ids/past_*."""

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None, share_buffer: bool | None = None, provider: str | None = None):
        """``provider``: a short name (cpu, cuda, openvino, webgpu; see amp_edge_runtime.providers) that replaces
        ``providers``; a missing one is a ProviderError. ``share_buffer``: decode into one max-length cache buffer bound as both past and present (GroupQueryAttention
        writes each new key in place); None: what the package's genai_config.json says (true for all-GQA graphs)."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise PackageError(f"{path} has no {MODEL_FILE}; not an exported package")
        options = options or session_options()
        if provider is not None:
            providers = apply_provider(options, provider) or ()
        self.provider = provider or ("cuda" if list(providers)[:1] == ["CUDAExecutionProvider"] else "cpu")
        try:
            # options that carry plugin EP devices (add_provider_for_devices) choose the providers themselves
            chosen = None if options.has_providers() else list(providers)
            self.session = ort.InferenceSession(str(model), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime raises its own untyped exceptions for unreadable graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "EP_FAIL" in first and self.provider not in ("cpu", "cuda"):  # the plugin's device did not start
                raise ProviderError(f"provider {self.provider} cannot start on this machine: {first[-300:]}") from None
            raise PackageError(f"cannot load {model}: {first}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(inputs)
        if missing:
            raise PackageError(f"{model} is not a decoder graph: it lacks inputs {sorted(missing)}")
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_key)
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        self.kv_heads = [inputs[n].shape[1] for n in self.past_names[::2]]
        self.head_dim = inputs[self.past_names[0]].shape[3] if self.past_names else 0
        if not isinstance(self.head_dim, int):  # a symbolic dim (the model builder's graphs): genai_config says it
            self.head_dim = _genai_config(model.parent).get("model", {}).get("decoder", {}).get("head_size")
            if not isinstance(self.head_dim, int):
                raise PackageError(f"{model}: the KV cache's head size is symbolic and no genai_config.json gives head_size")
        self.kv_dtype = _NP_TYPES.get(inputs[self.past_names[0]].type, np.float32) if self.past_names else np.float32
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is None:
            raise PackageError(f"{model} is not a decoder graph: it has no 'logits' output")
        self.logits_dtype = _NP_TYPES.get(logits.type, np.float32)
        self.vocab_size = logits.shape[-1]
        if not isinstance(self.vocab_size, int):
            self.vocab_size = _genai_config(model.parent).get("model", {}).get("vocab_size")
        self.path = model
        # The KV cache stays in ONNX Runtime's memory (on the GPU with CUDA): each step's present tensors are
        # bound as the next step's past, never copied through numpy.
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.share_buffer = _genai_share_buffer(model.parent) if share_buffer is None else share_buffer

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, self.head_dim), self.kv_dtype) for h in self.kv_heads for _ in range(2)]

    def kv_bytes(self, cache: Sequence) -> int:
        total = 0
        for a in cache:
            if isinstance(a, np.ndarray):
                total += a.nbytes
            else:  # OrtValue
                total += int(np.prod(a.shape())) * np.dtype(self.kv_dtype).itemsize
        return total

    def shared_cache(self, batch: int, capacity: int) -> list:
        """Zeroed (batch, kv_heads, capacity, head_dim) buffers for ``share_buffer`` decoding, on the session's device."""
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, capacity, self.head_dim), self.kv_dtype), self.device, 0)
                for h in self.kv_heads for _ in range(2)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Sequence, shared: bool = False) -> tuple[np.ndarray, list]:
        """One forward pass. ``cache`` is numpy arrays or the OrtValues a previous step returned; the new cache
        comes back as OrtValues that stay where ONNX Runtime put them (no copy through numpy). ``shared``: ``cache``
        is ``shared_cache`` buffers, bound as the outputs too, and comes back as it went in, updated in place."""
        return self._run(self._bind_cache(cache, shared), input_ids, attention_mask, position_ids, cache, shared)

    def _bind_cache(self, cache: Sequence, shared: bool) -> ort.IOBinding:
        """An IO binding holding the cache inputs (and, for shared buffers, the same buffers as outputs). A shared
        binding is reused for every step of a generation: only the token inputs and the logits change."""
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists the outputs in the order they were bound
        for name, value in zip(self.past_names, cache):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for i, name in enumerate(self.present_names):
            if shared:
                binding.bind_ortvalue_output(name, cache[i])
            else:
                binding.bind_output(name, self.device)
        return binding

    def _run(self, binding: ort.IOBinding, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Sequence, shared: bool, logits_out: np.ndarray | None = None) -> tuple[np.ndarray, list]:
        """``logits_out``: a numpy buffer of the logits' shape that ONNX Runtime writes into (decode steps reuse one;
        reading it back needs no OrtValue wrappers for the 2 x layers cache outputs)."""
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.has_position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        if logits_out is not None:
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits_out))
        else:
            binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        if logits_out is not None:
            return logits_out, list(cache)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(cache) if shared else list(outs[1:])

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None,
                 eos_token_ids: Sequence[int] = (), on_token: Callable[[np.ndarray], None] | None = None,
                 times: StepTimes | None = None) -> np.ndarray:
        """Greedy decoding; returns (batch, prompt + new) token ids. Padding via ``attention_mask``: left or right
        for the plain attention graph, right only for a graph with GroupQueryAttention layers."""
        new = list(self.stream(input_ids, max_new_tokens, attention_mask, eos_token_ids, on_token, times))
        return np.concatenate([input_ids] + [t[:, None] for t in new], axis=1)

    def stream(self, input_ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None,
               eos_token_ids: Sequence[int] = (), on_token: Callable[[np.ndarray], None] | None = None,
               times: StepTimes | None = None) -> Iterator[np.ndarray]:
        """Yield the next token of every row, one step at a time (rows that hit EOS repeat it)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch = input_ids.shape[0]
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        shared = self.share_buffer and bool(self.past_names)
        cache = self.shared_cache(batch, input_ids.shape[1] + max_new_tokens) if shared else self.empty_cache(batch)
        done = np.zeros(batch, dtype=bool)
        eos = np.asarray(list(eos_token_ids), dtype=np.int64)
        ids = input_ids
        prev = None
        binding = self._bind_cache(cache, True) if shared else None
        own = shared and isinstance(self.vocab_size, int)
        step_logits = np.empty((batch, 1, self.vocab_size), self.logits_dtype) if own else None
        for step in range(max_new_tokens):
            start = time.perf_counter()
            if shared:
                logits, cache = self._run(binding, ids, mask, positions, cache, True, step_logits if step else None)
            else:
                logits, cache = self.step(ids, mask, positions, cache)
            # a right-padded prompt's next token comes from its last real position, not from the padding
            last = logits[np.arange(batch), last_real(mask)] if step == 0 else logits[:, -1, :]
            token = last.argmax(-1).astype(np.int64)
            if times is not None:
                elapsed = time.perf_counter() - start
                if step == 0:
                    times.prefill_s = elapsed
                else:
                    times.decode_s.append(elapsed)
            if prev is not None:
                token = np.where(done, prev, token)
            done |= np.isin(token, eos)
            prev = token
            self.last_cache = cache
            if on_token is not None:
                on_token(token)
            yield token
            if done.all():
                return
            ids = token[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1


def _genai_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "genai_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _genai_share_buffer(folder: Path) -> bool:
    try:
        return bool(_genai_config(folder)["search"]["past_present_share_buffer"])
    except (KeyError, TypeError):
        return False


def last_real(mask: np.ndarray) -> np.ndarray:
    """Per row, the index of the last position the mask keeps (the last column with left padding)."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1] != 0, axis=1)


def _layer_key(name: str) -> tuple[int, int]:
    _, layer, kind = name.rsplit(".", 2)
    return int(layer), 0 if kind == "key" else 1
