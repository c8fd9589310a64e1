"""prune(): load -> calibrate -> score -> allocate -> apply -> save, as one library call."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from amp_edge.models.adapters import adapter_class, get_adapter, supported_model_types
from amp_edge.pruning import distributed
from amp_edge.pruning.allocation import check_options, check_ratio_of
from amp_edge.pruning.allocation import budget as ratio_budget
from amp_edge.notice import notice
from amp_edge.data.calibration import SELF, CalibrationSpec, calibration_batches, generate_rows
from amp_edge.io import check_output
from amp_edge.models.checkpoint import save_pruned
from amp_edge.errors import InvalidOptionError
from amp_edge.memory import release_memory
from amp_edge.pruning.plan import PruningPlan
from amp_edge.recovery.budget import apply_budget, plan_budget, source_params
from amp_edge.recovery.train import RECOVERY_FILE, RecoverySpec, recover, usable_precision
from amp_edge.data.recovery_data import default_source, recovery_rows, recovery_texts, wants_self, write_samples
from amp_edge.recovery.state import fingerprint, load_rows, save_rows
from amp_edge.pruning.refit import RefitSpec, load_refitted, refit_weights
from amp_edge.pruning.scoring import criteria, needs_calibration, score
from amp_edge.pruning.split import parse_heads, split_plan
from amp_edge.models.sources import LoadedModel, load_model, resolve
from amp_edge.pruning.surgery import apply_plan, count_parameters, needs_load_pruned
from amp_edge.versions import versions

log = logging.getLogger(__name__)


@dataclass
class PruneOptions:
    ratio: float = 0.3
    criterion: str = "amp"
    allocation: str = "uniform"
    gqa: str = "query"
    min_keep: float = 0.1
    normalization: str = "mean"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    seed: int = 0
    refit: RefitSpec | None = None  # least-squares refit of o_proj/down_proj after pruning (amp_edge.pruning.refit)
    heads: str = "auto"  # head units removed per layer: auto | proportional | N (amp_edge.pruning.split)
    ratio_of: str = "total"  # total: all parameters (the paper's count) | layers: the prunable layer weights

    def check(self) -> None:
        check_options(self.ratio, self.allocation, self.gqa, self.min_keep, self.normalization)
        check_ratio_of(self.ratio_of)
        parse_heads(self.heads)
        if self.refit is not None:
            self.refit.check()
        if self.criterion not in criteria():
            raise InvalidOptionError(f"unknown criterion {self.criterion!r}; choose from {', '.join(criteria())}")
        if self.needs_calibration():
            self.calibration.check()

    def needs_calibration(self) -> bool:
        """The criterion reads activations, or auto compares head splits by their loss on calibration text."""
        return needs_calibration(self.criterion) or parse_heads(self.heads) == "auto"


@dataclass
class PruneResult:
    plan: PruningPlan
    layers: list[dict]
    params_before: int
    params_after: int
    seconds: float
    out: str | None = None
    per_layer: bool = False  # True: the config carries per-layer sizes, load with amp_edge.load_pruned
    recovery: dict | None = None  # what recovery training ran (RecoveryResult.to_dict()), if any
    refit: dict | None = None  # what the least-squares refit used (RefitSpec, tokens, seconds), if it ran
    streamed: bool = False  # True: pruned layer by layer from the safetensors files (amp_edge.pruning.streamed)

    def to_dict(self) -> dict:
        return {
            "out": self.out, "criterion": self.plan.criterion, "ratio": self.plan.ratio,
            "allocation": self.plan.allocation, "gqa": self.plan.gqa,
            "params_before": self.params_before, "params_after": self.params_after,
            "params_removed_fraction": 1 - self.params_after / self.params_before,
            "head_split": self.plan.head_split,
            "uniform": self.plan.is_uniform, "per_layer_config": self.per_layer, "seconds": round(self.seconds, 2),
            "streamed": self.streamed, "layers": self.layers,
            **({"refit": self.refit} if self.refit else {}),
            **({"recovery": self.recovery} if self.recovery else {}),
        }

    def after_pruning(self) -> dict | None:
        """What changed the weights after the plan was applied (saved as amp_edge_recovery.json), or None."""
        if not (self.refit or self.recovery):
            return None
        return {**(self.recovery or {}), **({"refit": self.refit} if self.refit else {})}


def make_plan(loaded: LoadedModel, opts: PruneOptions) -> PruningPlan:
    """Score the model and decide what to keep; the model is not changed. Under torchrun each rank scores its share
    of the calibration rows and the sums are added (amp_edge.pruning.distributed): every rank gets the same plan."""
    opts.check()
    adapter = get_adapter(loaded.model)
    adapter.check_prunable()
    check_feasible(adapter, opts)
    batches = _calibration(opts.calibration, loaded) if opts.needs_calibration() else []
    distributed.require_same_rows(batches)
    announce_budget(adapter, opts)
    scores = score(opts.criterion, adapter, distributed.share_rows(batches), seed=opts.seed)
    plan = split_plan(adapter, scores, opts.heads, opts.ratio, opts.allocation, opts.gqa, opts.min_keep, opts.normalization, batches,
                      ratio_of=opts.ratio_of)
    plan.criterion = opts.criterion
    plan.calibration = calibration_record(opts, opts.calibration)
    return plan


def check_feasible(adapter, opts: PruneOptions) -> None:
    """The ratio's feasibility depends on shapes only: refuse it before spending time on calibration."""
    shape_only = "proportional" if parse_heads(opts.heads) == "auto" else opts.heads  # auto: at least the paper's rule fits
    split_plan(adapter, score("random", adapter), shape_only, opts.ratio, opts.allocation, opts.gqa, opts.min_keep, opts.normalization,
               ratio_of=opts.ratio_of)



def announce_budget(adapter, opts: PruneOptions) -> None:
    """What the ratio removes, in both measures, and a warning when a ratio of all parameters falls mostly on the
    layers: said before scoring, once the input has passed every check (a refusal stays one line)."""
    need = ratio_budget(adapter, opts.ratio, opts.ratio_of)
    notice(need.describe())
    if need.warning():
        log.warning(need.warning())


def calibration_record(opts: PruneOptions, spec: CalibrationSpec | None) -> dict:
    """What the plan records of the calibration: the spec used (the data a streamed ``self`` fell back to), the seed,
    and the torchrun world size when there were several processes."""
    record = spec.to_dict() if opts.needs_calibration() and spec is not None else {}
    if opts.needs_calibration() and spec is not None and spec.source != opts.calibration.source:
        record["requested"] = opts.calibration.source
    record["seed"] = opts.seed
    if distributed.world().size > 1:
        record["world_size"] = distributed.world().size
    return record


def _calibration(spec: CalibrationSpec, loaded: LoadedModel) -> list[torch.Tensor]:
    """Calibration batches; under torchrun the model's own samples are written by rank 0 and sent to the others."""
    if spec.source != SELF or distributed.world().size == 1:
        return calibration_batches(spec, loaded.model, loaded.tokenizer)
    rows = torch.cat(calibration_batches(spec, loaded.model, loaded.tokenizer)) if distributed.world().main else None
    return list(distributed.broadcast_rows(rows).split(spec.batch_size))


def streams(source: str, opts: PruneOptions, plan_path=None, recovery: RecoverySpec | None = None) -> bool:
    """Whether ``prune`` takes the layer-streamed path: a local safetensors folder, no recovery, no refit."""
    if recovery is not None or opts.refit is not None:
        return False
    where = resolve(source)
    return where["kind"] == "folder" and any(Path(where["path"]).glob("*.safetensors"))


def prune(source: str, out: str | Path | None, opts: PruneOptions, plan_path: str | Path | None = None,
          overwrite: bool = False, dtype: str | None = None, trust_remote_code: bool = False,
          recovery: RecoverySpec | None = None, stream: bool = True,
          device_map: str | dict | None = None) -> PruneResult:
    """Prune ``source`` with AMP (or a replayed plan), optionally recover, and save the compact model to ``out``.

    A safetensors folder without recovery or refit is pruned layer by layer (amp_edge.pruning.streamed) and saved in
    its own dtype (``dtype`` None or "auto"); ``stream=False``, GGUF files, short names, hub ids, recovery and refit
    load the whole model (in ``dtype``, float32 by default). Under torchrun only rank 0 writes ``out``.

    With recovery and no ``recovery.resume_dir``, the training state goes to ``.<out>.recover-state`` beside
    ``out``: rerunning the same command after an interruption resumes there; it is removed once ``out`` is saved.
    """
    start = time.perf_counter()
    if out is not None:
        check_output(out, overwrite)
    _precheck_architecture(source)
    if stream and device_map is None and streams(source, opts, plan_path, recovery):  # a map places a whole model
        from amp_edge.pruning.streamed import prune_streamed

        return prune_streamed(source, out, opts, plan_path, overwrite, dtype)
    dtype = "float32" if dtype is None else dtype
    state_dir = None
    if recovery is not None and recovery.resume_dir is None and out is not None:
        state_dir = Path(out).expanduser().parent / f".{Path(out).name}.recover-state"
        recovery = replace(recovery, resume_dir=str(state_dir), restart_on_mismatch=True)
    loaded, result = prune_in_memory(source, opts, plan_path, dtype, trust_remote_code, recovery, device_map)
    if out is not None and distributed.world().main:
        after = result.after_pruning()
        extra = {RECOVERY_FILE: after} if after else None
        save_pruned(loaded.model, loaded.tokenizer, result.plan, out, overwrite=overwrite, extra=extra)
        result.out = str(out)
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    result.seconds = time.perf_counter() - start  # the whole job, saving included
    return result


def prune_in_memory(source: str, opts: PruneOptions, plan_path: str | Path | None = None, dtype: str = "float32",
                    trust_remote_code: bool = False, recovery: RecoverySpec | None = None,
                    device_map: str | dict | None = None) -> tuple[LoadedModel, PruneResult]:
    """Load ``source`` and prune it in memory (then recover, if asked); returns the pruned model and what was done.

    Recovery data defaults to the calibration source (with ``self`` calibration, the recipe's C4 + Alpaca files where
    the data folder has them: amp_edge.data.recovery_data.default_source); ``self`` samples are written by the dense model.
    """
    start = time.perf_counter()
    plan = PruningPlan.load(plan_path) if plan_path else None
    if plan is None:
        opts.check()
    elif opts.refit is not None:
        opts.refit.check()
    recipe_data = recovery is not None and recovery.data is None and default_source(opts.calibration.source)
    if recipe_data:
        recovery = replace(recovery, data=recipe_data, field=recovery.field or opts.calibration.field)
    texts = _check_recovery(recovery, dtype)  # bad recovery options and data fail before any loading
    if recipe_data and recipe_data != opts.calibration.source:
        notice(f"recovery data: {recipe_data} (the recipe's C4 + Alpaca; --recover-data chooses)")
    elif recipe_data:  # said before the long step: a calibration file alone is not the recipe's data
        notice(f"recovery data: {recipe_data}, the calibration source (--recover-data chooses, e.g. the recipe's C4 + Alpaca)")
    _precheck_architecture(source)
    if recovery is not None:  # full fp32 training where it fits, else LoRA on bf16 weights; refused before loading
        params = source_params(source)  # a safetensors folder: it can also serve as a layer-by-layer teacher
        budget = plan_budget(params, recovery.method, recovery.adapter, recovery.precision, teacher_streams=params is not None)
        dtype, recovery = budget.dtype, apply_budget(recovery, budget)
        if budget.streamed_teacher and recovery.hidden_weight:  # the layer-by-layer teacher gives logits only
            raise InvalidOptionError(f"--recover-hidden-weight {recovery.hidden_weight} needs the teacher in memory; "
                                     "this model's teacher is read layer by layer (too large for a copy)")
    loaded = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map)
    adapter = get_adapter(loaded.model)
    before_shapes = adapter.shapes()
    teacher, rows = None, None
    if recovery is not None:  # tokenized before scoring, so data too short for one sequence fails first
        recovery = usable_precision(recovery, next(loaded.model.parameters()).device)
        rows = _recovery_rows(recovery, texts, loaded)
    if plan is None:
        plan = make_plan(loaded, opts)
    plan.source = {k: v for k, v in loaded.source.items()}
    plan.versions = versions()
    if recovery is not None:  # from the dense model, before the plan is applied
        teacher = _teacher(loaded, recovery, budget)
    refitted = _refit(loaded, adapter, plan, opts) if opts.refit is not None else None
    params_before = count_parameters(loaded.model)
    apply_plan(loaded.model, plan)
    if refitted is not None:
        load_refitted(adapter, refitted[0])
    params_after = count_parameters(loaded.model)
    plan.params = {"before": params_before, "after": params_after}
    result = PruneResult(plan, _layer_summary(before_shapes, adapter), params_before, params_after,
                         time.perf_counter() - start, None, needs_load_pruned(loaded.model.config))
    result.refit = refitted[1] if refitted is not None else None
    if recovery is not None:
        result.recovery = recover(loaded.model, teacher, loaded.tokenizer, recovery, data=rows).to_dict()
        del teacher
        release_memory()
        result.seconds = time.perf_counter() - start
    return loaded, result


def _teacher(loaded: LoadedModel, recovery: RecoverySpec, budget) -> torch.nn.Module | None:
    """The dense model for distillation: read from its checkpoint layer by layer where the budget says so, else a copy
    (in bf16 when training runs under bf16 autocast: half the memory, no per-step weight casts)."""
    if recovery.method != "distill":
        return None
    if budget.streamed_teacher:
        from amp_edge.recovery.teacher import StreamedTeacher

        return StreamedTeacher(loaded.source["path"], torch.bfloat16 if recovery.precision == "bf16" else torch.float32)
    teacher = copy.deepcopy(loaded.model).eval()
    return teacher.to(torch.bfloat16) if recovery.precision == "bf16" else teacher


def _refit(loaded: LoadedModel, adapter, plan: PruningPlan, opts: PruneOptions):
    """Refitted output projections for ``plan`` (from the dense model) and a record of the fit."""
    start = time.perf_counter()
    spec = replace(opts.calibration, num_samples=opts.refit.num_samples, seq_len=opts.refit.seq_len)
    batches = calibration_batches(spec, loaded.model, loaded.tokenizer)
    weights = refit_weights(adapter, plan, batches, opts.refit.damp)
    info = {**opts.refit.to_dict(), "source": spec.source, "tokens": sum(b.numel() for b in batches),
            "seconds": round(time.perf_counter() - start, 1)}
    return weights, info


def _recovery_rows(recovery: RecoverySpec, texts: list[str] | None, loaded: LoadedModel) -> torch.Tensor:
    """Training rows. Those the dense model writes are slow (1024 x 256 tokens: 33 min on a 2-core CPU), so with a
    resume folder they are kept there and a rerun reads them back instead of writing them again."""
    r, written = recovery, None
    if r.resume_dir and wants_self(r.source):
        key = {"seq_len": r.seq_len, "seed": r.seed, "self_samples": r.self_samples, "batch_size": r.batch_size,
               "generate_rows": generate_rows(loaded.model, r.seq_len), "model": fingerprint(loaded.model.parameters())}
        written = load_rows(r.resume_dir, key)
        if written is None:
            written = write_samples(loaded.model, loaded.tokenizer, r.seq_len, r.seed, r.self_samples, r.batch_size)
            save_rows(r.resume_dir, written, key)
        else:
            log.info("recovery: the dense model's samples read back from %s", r.resume_dir)
    return recovery_rows(texts, loaded.tokenizer, r.seq_len, r.seed, r.source, loaded.model, r.self_samples,
                         r.batch_size, written)


def _check_recovery(recovery: RecoverySpec | None, dtype: str) -> list[str] | None:
    """Check the recovery options and read its data (None for self-generated); raises on bad input."""
    if recovery is None:
        return None
    recovery.check()
    if dtype != "float32":
        raise InvalidOptionError(f"recovery trains in float32; got --dtype {dtype}")
    return recovery_texts(recovery.source, recovery.field)


def _layer_summary(before, adapter) -> list[dict]:
    rows = []
    for i, (b, a) in enumerate(zip(before, adapter.shapes())):
        layer = adapter.layers()[i]
        rows.append({
            "layer": i, "heads": [b.num_heads, a.num_heads], "kv_heads": [b.num_kv_heads, a.num_kv_heads],
            "ffn": [b.intermediate_size, a.intermediate_size], "params_after": sum(p.numel() for p in layer.parameters()),
        })
    return rows


def _precheck_architecture(source: str) -> None:
    """Read a local folder's model_type before loading gigabytes of weights."""
    where = resolve(source)
    if where["kind"] != "folder":
        return
    try:
        model_type = json.loads((Path(where["path"]) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return
    if model_type not in supported_model_types():
        adapter_class(model_type)  # raises: the family's own line where it has one, else the supported list
