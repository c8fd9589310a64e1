"""Layer-streamed prune of a safetensors folder: never the whole model in memory, the output in the source dtype.

The model is a skeleton on the meta device (amp_edge.models.layered). Calibration carries the hidden states of every
calibration row through one decoder layer at a time (sequential onloading, as llm-compressor and AWQ do), the layer
filled in float32 from the checkpoint and emptied after; each layer's scores are taken on the way with the same
accumulators as the in-memory pass (amp_edge.pruning.scoring.Accumulator). ``--heads auto`` carries one set of
hidden states per candidate through each filled layer. The surgery then fills each layer in its stored dtype, slices
it and hands it to a shard writer, so peak memory is about one layer in float32 plus the activations, whatever the
depth. The plan, the scores and the pruned weights equal the in-memory path's (tests/test_streamed.py).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from amp_edge.data.calibration import SELF, calibration_batches
from amp_edge.errors import CalibrationError
from amp_edge.io import atomic_dir, require_free_space
from amp_edge.memory import release_memory
from amp_edge.models.adapters import get_adapter
from amp_edge.models.compat import make_portable, pruned_heads_allowed
from amp_edge.models.layered import INDEX_FILE, SINGLE_FILE, Checkpoint, empty, fill, filled, skeleton, tied_names
from amp_edge.pruning import distributed
from amp_edge.pruning.plan import PLAN_FILE, PruningPlan, validate_plan
from amp_edge.pruning.scoring import Accumulator, LayerScores, input_hooks, magnitude_layer, score
from amp_edge.pruning.surgery import apply_plan, count_parameters, needs_load_pruned, write_shapes_to_config

log = logging.getLogger(__name__)

SELF_MAX_BYTES = 2 << 30  # --calib self loads the dense model (float32) to write its samples only up to this size
SELF_FALLBACK = "calibration/c4_demo.jsonl"  # under the data folder (AMP_EDGE_DATA_DIR): larger models calibrate on it
SHARD_BYTES = 1 << 30  # the writer holds at most about this much of the output at once


class _Stop(Exception):
    """Raised by the last layer's recorder: the inputs of every layer are known, nothing more to run."""


class StreamedModel:
    """A checkpoint folder as a meta skeleton whose modules are filled from the safetensors files when used."""

    def __init__(self, folder: str | Path):
        self.ckpt = Checkpoint.open(folder)
        self.model = skeleton(self.ckpt.config())
        self.adapter = get_adapter(self.model)
        names = {id(m): n for n, m in self.model.named_modules()}
        self.layers_prefix = names[id(self.adapter.layers())] + "."
        self.tied = tied_names(self.model)
        self._names = names

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}{i}."

    @contextmanager
    def layer(self, i: int, dtype: torch.dtype | None = torch.float32):
        with filled(self.adapter.layers()[i], self.layer_prefix(i), self.ckpt, dtype, self.tied) as layer:
            yield layer

    @contextmanager
    def outside(self, embeddings: bool, dtype: torch.dtype = torch.float32):
        """Fill the modules outside the decoder layers: the input embedding (``embeddings``) or the LM head, plus the
        small ones (final norm)."""
        skip = self.model.get_output_embeddings() if embeddings else self.model.get_input_embeddings()
        mods = [(n, m) for n, m in self.model.named_modules()
                if m is not skip and m._parameters and not n.startswith(self.layers_prefix)
                and not (skip is not None and n.startswith(self._names[id(skip)] + "."))]
        done = []
        try:
            for n, m in mods:
                fill_own(m, n + "." if n else "", self.ckpt, dtype, self.tied)
                done.append(m)
            yield
        finally:
            for m in done:
                empty_own(m)
            if self.tied:
                self.model.tie_weights()  # filling the head alone gave it its own tensor; shared again, it counts once

    def layer_inputs(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
        """Each batch's hidden states at the first layer, and the arguments (mask, positions, rotary tables) the model
        passes to every layer, recorded by running the model's own code with the layers replaced by recorders."""
        layers, n = self.adapter.layers(), self.num_layers
        hidden: list[torch.Tensor] = []
        calls: list[list[tuple]] = []

        def recorder(i):
            def forward(*args, **kw):
                h = args[0] if args else kw.pop("hidden_states")
                if i == 0:
                    hidden.append(h)
                    calls.append([None] * n)
                calls[-1][i] = (tuple(args[1:]), dict(kw))
                if i == n - 1:
                    raise _Stop
                return h
            return forward

        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        try:
            with self.outside(embeddings=True):
                for batch in batches:
                    try:
                        self.adapter.decoder(input_ids=batch, use_cache=False)
                    except _Stop:
                        pass
        finally:
            for layer in layers:
                del layer.forward
        return hidden, calls


def fill_own(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype, tied) -> None:
    """``fill`` for the module's own parameters only (not its children's)."""
    for pname, p in list(module._parameters.items()):
        if p is None:
            continue
        full = prefix + pname
        if full not in ckpt and full in tied:
            full = tied[full]
        module._parameters[pname] = nn.Parameter(ckpt.tensor(full, dtype), requires_grad=False)


def empty_own(module: nn.Module) -> None:
    for pname, p in list(module._parameters.items()):
        if p is not None:
            module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def _forward(layer: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kw = call
    out = layer(h, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


# --- scores -------------------------------------------------------------------------------------------------------
def stream_scores(src: StreamedModel, criterion: str, batches: list[torch.Tensor], seed: int = 0) -> list[LayerScores]:
    """Every layer's scores, one filled layer at a time; ``batches`` are this rank's rows."""
    adapter, n = src.adapter, src.num_layers
    if criterion == "random":  # shapes only
        return score("random", adapter, seed=seed)
    out = []
    if criterion == "magnitude":
        for i in tqdm(range(n), desc="scoring (magnitude)", unit="layer", leave=False):
            with src.layer(i), torch.no_grad():
                out.append(magnitude_layer(adapter, i))
        return out
    with torch.no_grad():
        states, calls = src.layer_inputs(batches)
        for i in tqdm(range(n), desc=f"scoring ({criterion})", unit="layer"):
            with src.layer(i) as layer:
                acc = Accumulator.for_layer(criterion, adapter, i)
                o, d = adapter.o_proj(i), adapter.down_proj(i)
                hook = lambda j, x: acc.attn(x, o) if j == 0 else acc.mlp(x)  # noqa: E731
                with input_hooks([o, d], hook):
                    for b in tqdm(range(len(states)), desc=f"layer {i}", unit="batch", leave=False):
                        states[b] = _forward(layer, states[b], calls[b][i])
                acc.reduce()
                out.append(acc.finish(o, d))
    return out


# --- --heads auto -------------------------------------------------------------------------------------------------
def stream_losses(src: StreamedModel, plans: dict[int, PruningPlan], batches: list[torch.Tensor]) -> dict[int, float]:
    """Each candidate plan's mean next-token loss (over every rank's rows), the masked models run side by side
    through each filled layer; equals split.masked_loss on the model in memory."""
    from amp_edge.pruning.split import layer_masks

    adapter, n = src.adapter, src.num_layers
    with torch.no_grad():
        states, calls = src.layer_inputs(batches)
        per = {k: list(states) for k in plans}
        for i in tqdm(range(n), desc=f"head split ({len(plans)} candidates)", unit="layer"):
            with src.layer(i) as layer:
                mods = [adapter.o_proj(i), adapter.down_proj(i)]
                for k, plan in plans.items():
                    masks = layer_masks(adapter, plan.layers[i], i, torch.device("cpu"))
                    with input_hooks(mods, lambda j, x: x * masks[j].to(x.dtype)):
                        per[k] = [_forward(layer, h, calls[b][i]) for b, h in enumerate(per[k])]
        decoder = adapter.decoder
        layers = decoder.layers
        decoder.layers = nn.ModuleList()  # the model's own tail (final norm, LM head, loss) on the carried states
        losses = {}
        try:
            with src.outside(embeddings=False):
                for k, hs in per.items():
                    total, tokens = 0.0, 0
                    for h, batch in zip(hs, batches):
                        loss = src.model(inputs_embeds=h, labels=batch, use_cache=False).loss
                        total += float(loss) * batch[:, 1:].numel()
                        tokens += batch[:, 1:].numel()
                    losses[k] = distributed.reduce_loss(total, tokens)
        finally:
            decoder.layers = layers
    return losses


# --- calibration data ---------------------------------------------------------------------------------------------
def stream_calibration(src: StreamedModel, spec, tokenizer, folder: str) -> tuple[list[torch.Tensor], object]:
    """Calibration batches and the spec they came from. ``self`` writes the model's own samples when the dense model
    fits in SELF_MAX_BYTES as float32 (as the in-memory path does, same rows); a larger model would have to be
    loaded whole to generate, so it calibrates on the shipped c4_demo file instead, with a one-line notice."""
    from amp_edge.evaluation.tasks import default_data_dir

    if spec.source != SELF:
        return calibration_batches(spec, None, tokenizer), spec
    size = src.ckpt.module_bytes("", torch.float32)
    if size <= SELF_MAX_BYTES:
        rows = None
        if distributed.world().main:  # rank 0 writes the samples, the others receive them
            from amp_edge.models.sources import load_model

            loaded = load_model(folder, dtype="float32")
            rows = torch.cat(calibration_batches(spec, loaded.model, loaded.tokenizer))
            del loaded
            release_memory()
        return list(distributed.broadcast_rows(rows).split(spec.batch_size)), spec
    fallback = default_data_dir() / SELF_FALLBACK
    if not fallback.is_file():
        raise CalibrationError(f"--calib self would load the whole model ({size / 1e9:.1f} GB in float32) to write its "
                               f"samples, and the default data {fallback} is missing: pass --calib FILE, or --no-stream")
    log.warning("--calib self: the model (%.1f GB in float32) is too large to write its own samples while streamed; "
                "calibrating on %s (--calib chooses the data, --no-stream generates in memory)", size / 1e9, fallback)
    spec = replace(spec, source=str(fallback))
    return calibration_batches(spec, None, tokenizer), spec


# --- surgery and saving -------------------------------------------------------------------------------------------
class ShardWriter:
    """Tensors into safetensors shards of about SHARD_BYTES, named and indexed as save_pretrained names them."""

    def __init__(self, folder: Path, limit: int | None = None):
        self.folder, self.limit = folder, limit or SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tmp = f"shard-{len(self.shards):05d}.part"
        save_file(self.pending, str(self.folder / tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for k, (tmp, names) in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_pruned(src: StreamedModel, plan: PruningPlan, tokenizer, out: str | Path, overwrite: bool,
                 dtype: torch.dtype) -> None:
    """Prune layer by layer and write the checkpoint shard by shard in ``dtype``, with config, tokenizer and plan, as
    save_pruned writes them (atomically)."""
    adapter, ckpt = src.adapter, src.ckpt
    require_free_space(out, plan.params["after"] * dtype.itemsize, "the pruned checkpoint")
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp)
        for name in ckpt.files:  # embeddings, final norm, LM head: as they are
            if not name.startswith(src.layers_prefix):
                writer.add(name, cast(ckpt.tensor(name)))
        for i, (lp, shape) in enumerate(tqdm(list(zip(plan.layers, adapter.shapes())), desc="pruning and writing",
                                             unit="layer")):
            layer = adapter.layers()[i]
            fill(layer, src.layer_prefix(i), ckpt, None, src.tied)
            try:
                if (len(lp.q_heads), len(lp.kv_heads)) != (shape.num_heads, shape.num_kv_heads):
                    adapter.prune_attention(i, lp.q_heads, lp.kv_heads)
                if len(lp.neurons) != shape.intermediate_size:
                    adapter.prune_mlp(i, lp.neurons)
                for name, t in layer.state_dict().items():
                    writer.add(src.layer_prefix(i) + name, cast(t.detach()))
            finally:
                empty(layer)
        writer.close()
        write_shapes_to_config(src.model)
        config = src.model.config
        config.dtype = dtype
        with pruned_heads_allowed():
            config.save_pretrained(tmp)
        gen = ckpt.path / "generation_config.json"
        if gen.is_file():
            (tmp / gen.name).write_bytes(gen.read_bytes())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        plan.save(tmp / PLAN_FILE)


def prune_streamed(source: str, out: str | Path | None, opts, plan_path=None, overwrite: bool = False,
                   dtype: str | None = None):
    """pipeline.prune for a safetensors folder, layer by layer; returns a PruneResult."""
    from transformers import AutoTokenizer

    from amp_edge.models.sources import resolve
    from amp_edge.pruning.pipeline import PruneResult, _layer_summary, announce_budget, calibration_record, check_feasible
    from amp_edge.pruning.split import split_plan
    from amp_edge.versions import versions

    start = time.perf_counter()
    where = resolve(source)
    plan = PruningPlan.load(plan_path) if plan_path else None
    if plan is None:
        opts.check()
    src = StreamedModel(where["path"])
    adapter = src.adapter
    adapter.check_prunable()
    src.ckpt.require_module_fits(torch.float32)
    out_dtype = src.ckpt.dtype() if dtype in (None, "auto") else getattr(torch, dtype)
    with pruned_heads_allowed():
        tokenizer = AutoTokenizer.from_pretrained(where["path"])
    before_shapes = adapter.shapes()
    params_before = count_parameters(src.model)
    if plan is None:
        check_feasible(adapter, opts)
        batches, spec = stream_calibration(src, opts.calibration, tokenizer, where["path"]) if opts.needs_calibration() else ([], None)
        distributed.require_same_rows(batches)
        announce_budget(adapter, opts)
        scores = stream_scores(src, opts.criterion, distributed.share_rows(batches), opts.seed)
        plan = split_plan(adapter, scores, opts.heads, opts.ratio, opts.allocation, opts.gqa, opts.min_keep,
                          opts.normalization, batches, losses=lambda plans, rows: stream_losses(src, plans, rows),
                          ratio_of=opts.ratio_of)
        plan.criterion = opts.criterion
        plan.calibration = calibration_record(opts, spec)
    validate_plan(plan, adapter)
    plan.source = dict(where)
    plan.versions = versions()
    plan.params = {"before": params_before, "after": _count_after(src, plan)}
    if out is not None and distributed.world().main:
        write_pruned(src, plan, tokenizer, out, overwrite, out_dtype)
    else:
        apply_plan(src.model, plan)  # shapes only, on the meta skeleton
    result = PruneResult(plan, _layer_summary(before_shapes, adapter), params_before, plan.params["after"],
                         time.perf_counter() - start, str(out) if out is not None else None,
                         needs_load_pruned(src.model.config), streamed=True)
    return result


def _count_after(src: StreamedModel, plan: PruningPlan) -> int:
    """Parameters of the pruned model, from shapes alone (a pruned copy of the meta skeleton)."""
    import copy

    shadow = copy.deepcopy(src.model)
    apply_plan(shadow, plan)
    return count_parameters(shadow)
