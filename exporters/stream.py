"""Layer-streamed export of a safetensors checkpoint: no fp32 model in memory, no second copy of the weights.

The graph is traced once from a meta-device skeleton (shapes only: the trace takes placeholder weights, as the
in-memory path does after ``release_weights``); every weight initializer is deferred (exporters.deferred) and written
by ``write_weights`` tensor by tensor, converted (fp16) or block-quantized (int4/int8 MatMulNBits) on the way.
Validation: ONNX Runtime decodes greedily and keeps its logits; the PyTorch reference then runs the prompt and that
continuation in one forward pass whose layers are filled from the checkpoint one at a time (fill before, empty after).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from amp_edge.models.adapters import get_adapter
from amp_edge.notice import notice
from amp_edge.models.layered import Checkpoint, skeleton, streamed_logits, tied_names
from exporters import deferred
from exporters.attention import gqa_attention, gqa_layers
from exporters.graph import GraphSpec, _bind_weights, fuse, rotary_as_matmul, trim_rotary_caches, working_dir
from exporters.quantize import (FITTED_METHODS, GRID_METHODS, QUANTIZED, QuantSpec, auto_candidates, eight_bit_auto,
                                float_pass, matmul_names, select, share_tied_embedding, shared_head)
from exporters.validate import (GREEDY_STEPS, Parity, ShapeResult, _judge, pad, pad_token, prompts, sliding_window,
                               validation_options)
from exporters.wrapper import DecoderStep, example_inputs, kv_layout

log = logging.getLogger(__name__)


def streamable(quant: QuantSpec) -> bool:
    """Dynamic int8 re-saves the whole model through ORT's quantizer, and the hqq / k-quant quantizers run on the
    whole graph (the streamed pass quantizes tensor by tensor, with round-to-nearest or a weight's own 4-bit grid):
    they keep the in-memory path."""
    return not (quant.dtype == "int8" and quant.int8_scheme == "dynamic") and quant.method in ("rtn", *GRID_METHODS)


def load_skeleton(path: str | Path):
    ckpt = Checkpoint.open(path)
    model = skeleton(ckpt.config()).to(torch.float32)
    return ckpt, model


def build_graph(model, ckpt: Checkpoint, folder: Path, spec: GraphSpec) -> tuple[onnx.ModelProto, deferred.WeightStore]:
    """Trace the skeleton (weights as graph inputs), bind deferred initializers, fold transposes, fuse."""
    store = deferred.WeightStore(ckpt, tied_names(model))
    layout = kv_layout(model)
    names = {id(m): n for n, m in model.named_modules()}
    with gqa_attention(model, gqa_layers(model, spec.attention), spec.pack_mlp is not False) as gqa, rotary_as_matmul(model):
        step = DecoderStep(model, gqa).eval()
        stored = _deferred_inputs(step, names, store)
        _placeholders(step)
        traced = folder / "traced.onnx"
        # the trace runs each layer once (a bar per layer), then TorchScript's ONNX passes run silently
        # (most of the time at Phi-3-mini's depth: 2 of the 3 minutes): a notice says so
        with torch.no_grad(), warnings.catch_warnings(), _layer_bar(model, "tracing"):
            warnings.simplefilter("ignore")
            torch.onnx.export(step, example_inputs(model), str(traced), input_names=layout.input_names(),
                              output_names=layout.output_names(), dynamic_axes=layout.dynamic_axes(),
                              opset_version=spec.opset, do_constant_folding=False, export_params=False, dynamo=False)
    graph = onnx.load(str(traced))
    traced.unlink()
    _bind_weights(graph, stored)
    deferred.fold_transposes(graph, store)
    if spec.optimize == "fuse":
        notice(f"fusing operators (ONNX Runtime's transformer optimizer, {layout.num_layers} layers)")
        scratch = store.placeholder_file(folder)
        with working_dir(folder):
            graph = fuse(graph)
        scratch.unlink()
        trim_rotary_caches(graph, getattr(model.config, "max_position_embeddings", None))
    return graph, store


@contextmanager
def _layer_bar(model, desc: str):
    """A progress bar advanced by each decoder layer's forward, then a notice for the passes after the last one."""
    layers = get_adapter(model).layers()
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)

    def done(_m, _a, _o):
        bar.update(1)
        if bar.n == bar.total:
            bar.close()
            notice(f"{desc}: ONNX passes over the traced graph (no progress to show; about 2 minutes for the 32 layers of Phi-3-mini)")

    handles = [layer.register_forward_hook(done) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        bar.close()


def _deferred_inputs(step: torch.nn.Module, names: dict[int, str], store) -> dict[str, onnx.TensorProto]:
    """One initializer per traced parameter (deferred: its checkpoint sources) and per buffer (real values)."""
    from onnx import numpy_helper

    out = {}
    for mod_name, sub in step.named_modules():
        for pname, p in sub._parameters.items():
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            parts = getattr(sub, "amp_parts", None) or (sub,)
            sources = tuple(f"{names[id(m)]}.{pname}" for m in parts)
            out[full] = store.initializer(full, deferred.Recipe(sources), tuple(p.shape))
        for bname, b in sub._buffers.items():
            if b is not None:
                full = f"{mod_name}.{bname}" if mod_name else bname
                out[full] = numpy_helper.from_array(b.detach().contiguous().numpy(), full)
    return out


def _placeholders(step: torch.nn.Module) -> None:
    """Meta parameters -> distinct constant placeholders (the exporter merges initializers of equal content); tied
    parameters stay one object."""
    made: dict[int, torch.nn.Parameter] = {}
    for sub in step.modules():
        for pname, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                value = torch.full((), float(len(made) + 1), dtype=p.dtype).expand(p.shape)
                made[id(p)] = torch.nn.Parameter(value, requires_grad=False)
            sub._parameters[pname] = made[id(p)]


def convert(graph: onnx.ModelProto, store, spec: QuantSpec, tied: bool) -> onnx.ModelProto:
    """The dtype pass of exporters.quantize.quantize, on deferred weights."""
    if spec.dtype in ("fp32", "fp16"):
        return float_pass(graph, spec, tied)
    names = matmul_names(graph)
    kept = set(select(names, spec.keep_8bit)) if spec.keep_8bit else set()
    if spec.dtype == "int8":
        deferred.quantize_matmuls(graph, store, 8, spec.block_size, spec.symmetric, spec.accuracy_level, set())
    else:
        sums = set()
        if spec.grid_form:
            head = shared_head(graph, spec, tied)
            sums, off_grid = deferred.grid_matmuls(graph, store, spec.accuracy_level, kept | head,
                                                   fitted=spec.method in FITTED_METHODS,
                                                   candidates=auto_candidates(graph, spec) - kept - head)
            kept |= eight_bit_auto(spec, off_grid, head)
        deferred.quantize_matmuls(graph, store, 4, spec.block_size, spec.symmetric, spec.accuracy_level, kept | sums)
        if kept:
            deferred.quantize_matmuls(graph, store, 8, spec.block_size, spec.symmetric, spec.accuracy_level,
                                      {n for n in matmul_names(graph) if n not in kept})
    if not (tied and spec.embedding == "shared" and share_tied_embedding(graph, spec.block_size)):
        deferred.half_embeddings(graph)
    return graph


# --- validation -------------------------------------------------------------------------------------------------


def ort_greedy(decoder, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's greedy tokens and the logits of every step (prefill, then one cached step per token)."""
    from amp_edge_runtime.decoder import last_real

    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    logits, cache = decoder.step(ids, mask, positions, decoder.empty_cache(ids.shape[0]))
    got, tokens = [logits.astype(np.float32)], []
    last = last_real(mask)
    cur_mask = mask
    for t in tqdm(range(steps), desc="validating: onnx greedy", unit="token", leave=False):
        step_logits = logits[np.arange(len(last)), last] if t == 0 else logits[:, -1]
        nxt = step_logits.argmax(-1)[:, None].astype(np.int64)
        tokens.append(nxt)
        if t == steps - 1:
            break
        cur_mask = np.concatenate([cur_mask, np.ones_like(nxt)], 1)
        logits, cache = decoder.step(nxt, cur_mask, positions[:, -1:] + t + 1, cache)
        got.append(logits.astype(np.float32))
    return np.concatenate(tokens, 1), np.concatenate(got, 1)


def torch_logits(model, ckpt: Checkpoint, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """fp32 logits of one forward pass over ``ids``, about one layer of weights in memory (layered.streamed_logits)."""
    with torch.no_grad():
        return streamed_logits(model, ckpt, torch.from_numpy(ids), torch.from_numpy(mask), torch.float32,
                               desc="validating: pytorch layers").numpy()


def _rows_alone(model, ckpt: Checkpoint, full: np.ndarray, full_mask: np.ndarray) -> np.ndarray:
    """A right-padded batch's reference row by row without its pad slots (as exporters.validate._rows_alone: GQA's
    window covers a row's own tokens, transformers' covers pad slots too); pad positions stay 0 and are not judged."""
    out = None
    for r in range(len(full)):
        keep = full_mask[r].astype(bool)
        row = full[r:r + 1, keep]
        logits = torch_logits(model, ckpt, row, np.ones_like(row))
        out = np.zeros((*full.shape, logits.shape[-1]), dtype=np.float32) if out is None else out
        out[r, keep] = logits[0]
    return out


def validate(open_decoder, model, ckpt: Checkpoint, tokenizer, dtype: str, padding: str, min_top1=None,
             max_abs=None, folder: Path | None = None) -> Parity:
    """Greedy ONNX tokens, then PyTorch's logits on prompt + those tokens (teacher forcing, one pass): max |Δlogits|,
    top-1 agreement, and (fp32) whether PyTorch's greedy choice is ONNX's token at every step.

    ``open_decoder()`` makes the ONNX Runtime session; it is closed before the PyTorch side runs, so the peak is the
    larger of the two, not their sum (the Llama-3.1-8B shape's int4 export: 7.9 GiB with both open).

    fp16 (``folder``: the package): ONNX Runtime's CPU session would hold fp32 copies of every weight, so the package
    runs one layer at a time instead (exporters.segmented), teacher-forced on a fixed natural continuation rather than
    its own greedy one (a layer-by-layer run cannot choose tokens); fp16 is judged on top-1 agreement, not on tokens."""
    from amp_edge.memory import release_memory
    from exporters.validate import MIN_TOP1

    parity = Parity(dtype, None if dtype == "fp32" else (min_top1 if min_top1 is not None else MIN_TOP1[dtype]), max_abs)
    pad_id = pad_token(tokenizer)
    window = sliding_window(model)  # a model with one gets a prompt longer than it (exporters.validate.prompts)
    shapes = [(name, *pad(rows, pad_id, padding)) for name, rows in prompts(tokenizer, model.config.vocab_size, window)]
    if dtype == "fp16" and folder is not None:
        from exporters.segmented import teacher_forced

        fed = [np.repeat(fixed_continuation(tokenizer, model.config.vocab_size), len(ids), 0) for _, ids, _ in shapes]
        got = teacher_forced(folder, [(ids, mask, tokens) for (_, ids, mask), tokens in zip(shapes, fed)],
                             validation_options())
        runs = [(name, ids, mask, tokens, g) for (name, ids, mask), tokens, g in zip(shapes, fed, got)]
    else:
        decoder = open_decoder()
        runs = [(name, ids, mask, *ort_greedy(decoder, ids, mask, GREEDY_STEPS)) for name, ids, mask in shapes]
        del decoder
    release_memory()
    for name, ids, mask, tokens, got in runs:
        full = np.concatenate([ids, tokens[:, :-1]], 1)
        full_mask = np.concatenate([mask, np.ones_like(tokens[:, :-1])], 1)
        if window and padding == "right" and len(ids) > 1:
            expected = _rows_alone(model, ckpt, full, full_mask)
        else:
            expected = torch_logits(model, ckpt, full, full_mask)
        parity.shapes.append(_result(name, ids, mask, tokens, got, expected, full_mask, dtype))
        parity.mismatches += _judge(parity.shapes[-1], dtype, parity.min_top1, max_abs)
    if dtype in QUANTIZED:
        parity.continuation_agreement = _continuation_agreement(open_decoder, model, ckpt, tokenizer)
    return parity


def fixed_continuation(tokenizer, vocab: int, steps: int = GREEDY_STEPS) -> np.ndarray:
    """(1, steps) tokens of natural text (random ids without a tokenizer), fed after every prompt of a layer-by-layer
    validation."""
    from exporters.validate import LONG_TEXT

    ids = tokenizer(" " + LONG_TEXT, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
    if len(ids) < steps:
        ids = np.random.default_rng(1).integers(min(4, vocab - 1), vocab, steps).tolist()
    return np.array([ids[:steps]], dtype=np.int64)


def _continuation_agreement(open_decoder, model, ckpt: Checkpoint, tokenizer) -> float:
    """exporters.agreement's measure: the streamed model continues the prompts (one streamed pass per token, all
    prompts in one batch), then the package is reopened and teacher-forced on that text."""
    from amp_edge.memory import release_memory
    from exporters.agreement import agreement, prompt_ids, torch_continuations

    pad_id = pad_token(tokenizer)
    forward = lambda ids, mask, cache: streamed_logits(model, ckpt, ids, mask, torch.float32, cache=cache)  # noqa: E731
    conts = torch_continuations(forward, prompt_ids(tokenizer, model.config.vocab_size), pad_id)
    decoder = open_decoder()
    try:
        return agreement(decoder, conts)
    finally:
        del decoder
        release_memory()


def _result(name, ids, mask, tokens, got, expected, full_mask, dtype) -> ShapeResult:
    from amp_edge_runtime.decoder import last_real

    valid = full_mask.astype(bool)
    steps = tokens.shape[1]
    if not np.isfinite(got[valid]).all():
        return ShapeResult(name, ids.shape[0], mask.sum(1).tolist(), steps - 1, float("inf"), float("inf"), 0.0, int(valid.sum()))
    diff = np.abs(got - expected)[valid]
    span = float((expected[valid].max(-1) - expected[valid].min(-1)).mean())
    agree = (got.argmax(-1) == expected.argmax(-1))[valid]
    result = ShapeResult(name, ids.shape[0], mask.sum(1).tolist(), steps - 1, float(diff.max()),
                         float(diff.max() / span) if span else 0.0, float(agree.mean()), int(valid.sum()),
                         float(np.abs(expected[valid]).max()))
    if dtype == "fp32":  # PyTorch's greedy choice at each step: the last real prompt position, then each new token
        cols = np.stack([last_real(mask)] + [np.full(ids.shape[0], ids.shape[1] + t) for t in range(steps - 1)], 1)
        choice = np.take_along_axis(expected.argmax(-1), cols, 1)
        differ = np.nonzero((choice != tokens).any(0))[0]
        result.greedy_equal = not len(differ)
        result.greedy_first_mismatch = int(differ[0]) if len(differ) else None
    return result
