"""`amp-edge export`: a model (pruned, or pruned here) -> a validated ONNX package folder.

The package: model.onnx (+ model.onnx.data), config.json, generation_config.json, tokenizer files,
genai_config.json (onnxruntime-genai) and amp_edge.json (the manifest: source, plan, dtype, sizes, parity).
"""

from __future__ import annotations

import errno
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from amp_edge.io import atomic_dir, check_output
from amp_edge.models.compat import make_portable, pruned_heads_allowed
from amp_edge.models.sources import is_pruned_checkpoint
from amp_edge.errors import ExportError, ExportValidationError, InvalidOptionError
from amp_edge.memory import release_memory
from amp_edge.pruning.pipeline import PruneOptions, prune_in_memory
from amp_edge.pruning.plan import PLAN_FILE, PruningPlan
from amp_edge.models.sources import LoadedModel, load_model
from amp_edge.pruning.surgery import count_parameters
from amp_edge.versions import versions
from amp_edge_runtime.decoder import OnnxDecoder

from exporters.attention import check_mode, gqa_layers
from exporters.genai import genai_config
from exporters.graph import MIN_OPSET, OPTIMIZE_LEVELS, GraphSpec, export_graph, materialize_weights, save_graph
from exporters.quantize import QUANTIZED, QuantSpec, quantize, weight_kinds
from exporters.validate import compare, pad_token, reference, validation_options
from exporters.wrapper import kv_layout

log = logging.getLogger(__name__)
MANIFEST = "amp_edge.json"
MANIFEST_FORMAT = 1


@dataclass
class ExportOptions:
    ratio: float | None = None  # None: SOURCE must be a pruned checkpoint; 0: export dense; > 0: prune first
    prune: PruneOptions = field(default_factory=PruneOptions)
    plan: str | None = None
    graph: GraphSpec = field(default_factory=GraphSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    validate: bool = True
    min_top1: float | None = None  # override the dtype's documented top-1 agreement bound
    max_abs_diff: float | None = None  # fp32: override the documented max |Δlogits| bound
    external_data: bool = True  # False: one file, when it fits protobuf's 2 GB limit
    trust_remote_code: bool = False
    stream: bool = True  # a checkpoint folder is exported layer by layer (exporters.stream); False: loaded whole

    def check(self) -> None:
        if self.graph.opset < MIN_OPSET:
            raise InvalidOptionError(f"opset {self.graph.opset} is too old; amp-edge exports opset {MIN_OPSET} or newer")
        if self.graph.optimize not in OPTIMIZE_LEVELS:
            raise InvalidOptionError(f"unknown optimize level {self.graph.optimize!r}; choose from {', '.join(OPTIMIZE_LEVELS)}")
        check_mode(self.graph.attention)
        self.quant.check(self.graph.opset)
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise InvalidOptionError(f"--min-top1 must be in [0, 1], got {self.min_top1}")
        if self.max_abs_diff is not None and not self.max_abs_diff > 0:
            raise InvalidOptionError(f"--max-abs-diff must be > 0, got {self.max_abs_diff}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise InvalidOptionError(f"ratio must be in [0, 1) (0 exports the dense model), got {self.ratio}")


@dataclass
class ExportResult:
    out: str
    manifest: dict

    def to_dict(self) -> dict:
        return {"out": self.out, **self.manifest}


def export(source: str, out: str | Path, opts: ExportOptions, overwrite: bool = False) -> ExportResult:
    """Build, quantize, validate and write a package; nothing is left at ``out`` unless all of it worked."""
    start = time.perf_counter()
    opts.check()
    if opts.graph.pack_mlp is None:
        opts.graph = replace(opts.graph, pack_mlp=opts.quant.dtype in ("int4", "int8"))
    out = Path(out).expanduser()
    if out.is_dir() and not any(out.iterdir()):
        overwrite = True  # an empty folder holds nothing to lose
    check_output(out, overwrite)
    folder = _stream_source(source, opts)
    if folder is not None:
        with pruned_heads_allowed():  # a head-pruned Llama config (heads x head_dim != hidden) reads on transformers 5
            return _export_streamed(source, folder, out, opts, overwrite, start)
    loaded, plan, params_before, refit = _model(source, opts)
    model = loaded.model
    opts.quant = _with_mlp_out(opts.quant, model)
    gqa = gqa_layers(model, opts.graph.attention)
    # GroupQueryAttention supports right padding only (it keeps each row's valid tokens as a prefix): a graph
    # with GQA layers is validated on a right-padded batch, the plain graph on a left-padded one
    padding = "right" if gqa else "left"
    facts = {"params_after": count_parameters(model), "kv_layout": kv_layout(model), "gqa_layers": gqa, "padding": padding,
             "refit": refit}
    refs = reference(model, loaded.tokenizer, padding=padding) if opts.validate else None
    conts = _continuations(model, loaded.tokenizer) if opts.validate and opts.quant.dtype in QUANTIZED else None
    try:
        with atomic_dir(out, overwrite) as tmp:
            _write_side_files(loaded, tmp)
            # PyTorch's part ends with the trace (references were taken above): its weights are freed then
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            files, inputs = _write_graph(export_graph(model, tmp, opts.graph, release_weights=True), tmp, opts, tied)
            _write_genai_config(loaded, tmp, inputs, all_gqa=len(gqa) == facts["kv_layout"].num_layers)
            parity = _validate(refs, tmp, opts, conts)
            manifest = _manifest(source, loaded, plan, params_before, facts, opts, files, parity, tmp, time.perf_counter() - start)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except OSError as e:
        raise _write_error(e, out) from None
    return ExportResult(str(out), manifest)


def _write_error(e: OSError, out) -> ExportError:
    """One line for an OS error while the package was written (the atomic folder left nothing behind)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"disk full while writing the package to {out}; nothing was written")
    return ExportError(f"cannot write the package to {out}: {e.strerror or e}")


def _stream_source(source: str, opts: ExportOptions) -> Path | None:
    """The safetensors folder to export layer by layer, or None for the in-memory path."""
    from exporters.stream import streamable

    if not opts.stream or not streamable(opts.quant) or opts.plan is not None:
        return None
    if is_pruned_checkpoint(source):
        if opts.ratio:
            raise InvalidOptionError(f"{source} is already a pruned checkpoint; export it without --ratio (got {opts.ratio})")
    elif opts.ratio != 0:
        return None
    path = Path(source).expanduser()
    if not path.is_dir() or not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return None
    return path


def _export_streamed(source: str, folder: Path, out: Path, opts: ExportOptions, overwrite: bool, start: float) -> ExportResult:
    from transformers import AutoTokenizer

    from amp_edge.io import require_free_space
    from exporters import deferred
    from exporters.stream import build_graph, convert, load_skeleton, validate

    ckpt, model = load_skeleton(folder)
    plan = PruningPlan.load(folder / PLAN_FILE) if (folder / PLAN_FILE).is_file() else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    loaded = LoadedModel(model, tokenizer, {"name": source, "kind": "folder", "path": str(folder.resolve())})
    params = count_parameters(model)
    gqa = gqa_layers(model, opts.graph.attention)
    padding = "right" if gqa else "left"
    facts = {"params_after": params, "kv_layout": kv_layout(model), "gqa_layers": gqa, "padding": padding, "refit": None}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    opts.quant = _with_mlp_out(opts.quant, model)
    try:
        with atomic_dir(out, overwrite) as tmp:
            _write_side_files(loaded, tmp)
            graph, store = build_graph(model, ckpt, tmp, opts.graph)
            inputs = {i.name for i in graph.graph.input}
            graph = convert(graph, store, opts.quant, tied)
            need = deferred.planned_bytes(graph)
            log.info("writing %.2f GB of weights to %s", need / 1e9, out)
            require_free_space(out, need, "the package")
            deferred.write_weights(graph, store, tmp)
            onnx.save_model(graph, str(tmp / "model.onnx"))
            del graph, store
            release_memory()
            files = [tmp / "model.onnx", tmp / "model.onnx.data"]
            _write_genai_config(loaded, tmp, inputs, all_gqa=len(gqa) == facts["kv_layout"].num_layers)
            parity = None
            if opts.validate:
                parity = validate(lambda: OnnxDecoder(tmp, options=validation_options()), model, ckpt, tokenizer,
                                  opts.quant.dtype, padding, opts.min_top1, opts.max_abs_diff, folder=tmp)
                if not parity.ok:
                    raise ExportValidationError(parity.mismatches)
            before = plan.params.get("before", params) if plan is not None else params
            manifest = _manifest(source, loaded, plan, before, facts, opts, files, parity, tmp, time.perf_counter() - start)
            manifest["streamed"] = True
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except OSError as e:
        raise _write_error(e, out) from None
    return ExportResult(str(out), manifest)


def _with_mlp_out(quant: QuantSpec, model) -> QuantSpec:
    """``quant`` naming the model's MLP output projection (its adapter's; int4 auto keeps those at 8 bits off-grid)."""
    from amp_edge.models.adapters import get_adapter

    return replace(quant, mlp_out=getattr(get_adapter(model), "mlp_out_name", quant.mlp_out))


def _weight_kinds(folder: Path, quant: QuantSpec) -> dict:
    """int4/int8: {"matmuls": how many weight MatMuls took each precision} (auto decides per weight)."""
    if quant.dtype not in QUANTIZED or not (folder / "model.onnx").is_file():
        return {}
    return {"matmuls": weight_kinds(onnx.load(str(folder / "model.onnx"), load_external_data=False))}


def _model(source: str, opts: ExportOptions) -> tuple[LoadedModel, PruningPlan | None, int, dict | None]:
    """The PyTorch model to export: a pruned checkpoint as saved, or ``source`` pruned here by ``opts.ratio``."""
    if is_pruned_checkpoint(source):
        if opts.ratio:
            raise InvalidOptionError(f"{source} is already a pruned checkpoint; export it without --ratio (got {opts.ratio})")
        loaded = load_model(source, dtype="float32")
        plan = PruningPlan.load(Path(loaded.source["path"]) / PLAN_FILE)
        return loaded, plan, plan.params.get("before", count_parameters(loaded.model)), None
    if opts.ratio is None and opts.plan is None:
        raise InvalidOptionError(
            f"{source} is not a pruned checkpoint: pass --ratio R to prune it first, or --ratio 0 to export it dense")
    if opts.ratio == 0 and opts.plan is None:
        loaded = load_model(source, dtype="float32", trust_remote_code=opts.trust_remote_code)
        return loaded, None, count_parameters(loaded.model), None
    if opts.ratio is not None:
        opts.prune.ratio = opts.ratio
    loaded, result = prune_in_memory(source, opts.prune, opts.plan, "float32", opts.trust_remote_code)
    return loaded, result.plan, result.params_before, result.refit


def _write_graph(graph, folder: Path, opts: ExportOptions, tied: bool) -> tuple[list[Path], set[str]]:
    """Quantize and save ``graph`` (the only reference to it, so the fp32 graph goes as soon as it can)."""
    inputs = {i.name for i in graph.graph.input}
    graph = quantize(graph, opts.quant, tied, weights_dir=folder)
    materialize_weights(graph, folder)
    files = save_graph(graph, folder / "model.onnx", opts.external_data)
    del graph
    release_memory()
    return files, inputs


def _continuations(model, tokenizer):
    """The in-memory model's greedy continuations of exporters.agreement's prompts (before its weights are freed)."""
    from exporters.agreement import model_forward, prompt_ids, torch_continuations

    return torch_continuations(model_forward(model.float().eval()), prompt_ids(tokenizer, model.config.vocab_size),
                               pad_token(tokenizer))


def _validate(refs, folder: Path, opts: ExportOptions, conts=None):
    from exporters.agreement import agreement

    if refs is None:
        return None
    decoder = OnnxDecoder(folder, options=validation_options())
    parity = compare(decoder, refs, opts.quant.dtype, opts.min_top1, opts.max_abs_diff)
    if conts is not None:
        parity.continuation_agreement = agreement(decoder, conts)
    del decoder
    release_memory()
    if not parity.ok:
        raise ExportValidationError(parity.mismatches)
    return parity


def _write_side_files(loaded: LoadedModel, folder: Path) -> None:
    model = loaded.model
    with pruned_heads_allowed():  # a head-pruned Llama's config on transformers 5
        model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    make_portable(folder)  # a package written under transformers 5 reads the same in 4.57 (optimum's environment)


def _write_genai_config(loaded: LoadedModel, folder: Path, graph_inputs: set[str], all_gqa: bool) -> None:
    config = genai_config(loaded.model, loaded.tokenizer)
    inputs = config["model"]["decoder"]["inputs"]
    if "position_ids" not in graph_inputs:  # a graph whose every layer is GQA reads positions from the mask
        del inputs["position_ids"]
    # GQA writes new keys into a max-length cache in place when past and present share one buffer (genai's
    # fixed-size cache): no copy of the whole cache per token. Plain attention layers concatenate, so they cannot.
    config["search"]["past_present_share_buffer"] = all_gqa
    (folder / "genai_config.json").write_text(json.dumps(config, indent=1))


def _manifest(source, loaded, plan, params_before, facts, opts: ExportOptions, files, parity, folder: Path, seconds: float) -> dict:
    model = loaded.model
    layout = facts["kv_layout"]
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {
        "format": MANIFEST_FORMAT,
        "source": {"argument": source, **loaded.source},
        "model_type": model.config.model_type,
        "plan": plan.to_dict() if plan is not None else None,
        "pruned": plan is not None,
        "refit": facts["refit"],  # export --ratio --refit: the weights are not the plan's replay alone
        "params": {"before": params_before, "after": facts["params_after"]},
        "kv_layout": layout.to_dict(),
        "uniform": layout.uniform(),
        "graph": {"opset": opts.graph.opset, "optimize": opts.graph.optimize, "files": [f.name for f in files],
                  "pack_mlp": opts.graph.pack_mlp,
                  "attention": opts.graph.attention, "gqa_layers": facts["gqa_layers"], "padding": facts["padding"]},
        "quantization": {**opts.quant.to_dict(), **_weight_kinds(folder, opts.quant)},
        "file_sizes": sizes,
        "onnx_bytes": sum(sizes[f.name] for f in files),
        "parity": parity.to_dict() if parity is not None else {"skipped": "--no-validate"},
        "export_seconds": round(seconds, 2),
        "versions": versions(),
    }
