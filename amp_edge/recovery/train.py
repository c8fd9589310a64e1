"""Recovery after pruning: distill the dense model's next-token distributions into the pruned one, or
fine-tune it with LoRA (the AMP paper's recipe) and merge the adapters into the weights.

``recover(student, teacher, tokenizer, spec)`` trains in place and returns what it did. The run is a
pure function of the starting weights, the data and the spec (seeded batch order, dropout and LoRA
init); its state is saved every ``save_minutes`` (or ``save_every`` steps, whichever comes first; atomically,
safetensors) into ``resume_dir``, and a run restarted with the same folder continues from there and ends with the
same weights.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from amp_edge.models.adapters import get_adapter
from amp_edge.data.calibration import SELF
from amp_edge.errors import InvalidOptionError
from amp_edge.hardware import half_is_fast
from amp_edge.memory import heap_for_training_loop
from amp_edge.data.recovery_data import recovery_rows, recovery_texts
from amp_edge.recovery.state import ResumeState, fingerprint, load_state, save_state

log = logging.getLogger(__name__)
METHODS = ("distill", "lora")
SCHEDULES = ("cosine", "linear")
PRECISIONS = ("auto", "fp32", "bf16")
ADAPTERS = ("auto", "full", "lora")
_KL_ROWS = 128  # rows of logits the distillation loss handles at a time (bounds its vocab-wide temporaries)
DEFAULT_LR = {"distill": 1e-4, "lora": 3e-4}
# What `prune --recover METHOD` trains when an option is not given: the recipe measured best for a 2-core box's
# ~2 hours on SmolLM2-135M (docs/recovery.md#which-recipe): refit first, then 500 distillation steps of 4 x 256 tokens
# in bf16 where the CPU has bf16 kernels, on C4 + Alpaca (RECIPE_DATA) when the data folder has them
RECIPE = {"distill": {"steps": 500, "batch_size": 4, "precision": "auto", "refit": True},
          "lora": {"steps": 100, "batch_size": 8, "precision": "fp32", "refit": False}}
RECOVERY_FILE = "amp_edge_recovery.json"
Progress = Callable[[int, int, float], None]


@dataclass
class RecoverySpec:
    method: str = "distill"
    steps: int = 100
    data: str | None = None  # 'self' (the dense model's own samples), a .txt/.jsonl/.json file, a hub data set;
    # None: 'self' here, the calibration source when called through prune()
    field: str | None = None  # text field of .jsonl / data set records; guessed when None
    lr: float | None = None  # None: 1e-4 for distill, 3e-4 for lora
    batch_size: int = 8
    micro_batch_size: int | None = None  # sequences per forward pass (gradient accumulation); None: up to 4
    seq_len: int = 256
    seed: int = 0
    warmup_steps: int | None = None  # None: 5% of steps
    schedule: str = "cosine"
    max_grad_norm: float = 1.0  # 0: no clipping
    weight_decay: float = 0.0
    temperature: float = 1.0  # distill
    ce_weight: float = 0.0  # distill: loss = KL + ce_weight * cross-entropy on the data
    hidden_weight: float = 0.0  # distill: + hidden_weight * each layer's output matched to the teacher's (_hidden_loss)
    freeze_embeddings: bool = False  # distill; with tied embeddings this freezes the LM head too
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # bf16: forward and backward under bfloat16 autocast (fp32 master weights, optimizer and loss); 2.7x faster
    # steps on a CPU with AMX/AVX512-BF16 (SmolLM2-135M at 30%, 4 x 256 tokens: 7.3 -> 2.7 s with the fused loss)
    precision: str = "fp32"
    resume_dir: str | None = None  # None: no checkpoints, an interrupted run starts over
    # Saved by time, not steps: a save costs the same whatever the step rate (Gemma-3-270M: 2.86 GB in 5.8 s, 6.4% of
    # its training every 10 steps, 1.9% every 5 minutes; benchmarks/recovery_step.py); a kill loses at most this much,
    # Ctrl-C nothing (it saves on the way out).
    save_minutes: float = 5.0
    save_every: int | None = None  # also every N steps
    restart_on_mismatch: bool = False  # a resume_dir from another run: start over (True) or refuse (False)
    self_samples: int = 128  # sequences the dense model writes when data == 'self'
    # distill: what trains. full: every weight; lora: adapters on frozen weights (merged after); auto: full where
    # it fits in memory, else lora on bf16 weights (amp_edge.recovery.budget). lora always trains adapters.
    adapter: str = "auto"

    @property
    def trains_adapters(self) -> bool:
        return self.method == "lora" or self.adapter == "lora"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method, 1e-4)

    @property
    def source(self) -> str:
        return self.data or SELF

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20

    @property
    def micro(self) -> int:
        return self.micro_batch_size or min(self.batch_size, 4)

    def check(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionError(f"unknown recovery method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise InvalidOptionError(f"unknown recovery precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.adapter not in ADAPTERS:
            raise InvalidOptionError(f"unknown recovery adapter {self.adapter!r}; choose from {', '.join(ADAPTERS)}")
        if self.method == "lora" and self.adapter == "full":
            raise InvalidOptionError("--recover lora trains adapters; --recover-adapter full goes with --recover distill")
        if self.schedule not in SCHEDULES:
            raise InvalidOptionError(f"unknown recovery schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.save_every is not None and self.save_every < 1:
            raise InvalidOptionError(f"recovery save_every must be >= 1, got {self.save_every}")
        for name in ("steps", "batch_size", "micro", "lora_r", "self_samples"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"recovery {name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise InvalidOptionError(f"recovery seq_len must be >= 2, got {self.seq_len}")
        for name in ("learning_rate", "temperature", "lora_alpha", "save_minutes"):
            if not getattr(self, name) > 0:
                raise InvalidOptionError(f"recovery {name.replace('learning_rate', 'lr')} must be > 0, got {getattr(self, name)}")
        for name in ("max_grad_norm", "weight_decay", "ce_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise InvalidOptionError(f"recovery {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidOptionError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup < self.steps:
            raise InvalidOptionError(f"recovery warmup steps must be in [0, steps={self.steps}), got {self.warmup}")

    def trajectory(self) -> dict:
        """The fields the trained weights depend on (not where or how often state is saved)."""
        d = asdict(self)
        for k in ("resume_dir", "save_every", "save_minutes", "restart_on_mismatch"):
            d.pop(k)
        d["lr"], d["warmup_steps"], d["micro_batch_size"], d["data"] = self.learning_rate, self.warmup, self.micro, self.source
        d["adapter"] = "lora" if self.trains_adapters else "full"
        return d


def usable_precision(spec: RecoverySpec, device: torch.device) -> RecoverySpec:
    """``spec``, in fp32 when it asks for bf16 where bf16 has no fast kernels (its steps would be ~12x slower, not faster);
    ``auto`` becomes bf16 where it is fast and fp32 elsewhere, without a warning."""
    if spec.precision == "auto":
        return replace(spec, precision="bf16" if half_is_fast(torch.bfloat16, device) else "fp32")
    if spec.precision != "bf16" or half_is_fast(torch.bfloat16, device):
        return spec
    why = ("CPU has no native bfloat16 kernels (no AVX512-BF16/AMX), where bf16 matmuls run ~100x slower than fp32"
           if device.type == "cpu" else f"{device.type.upper()} device has no native bfloat16 kernels")
    log.warning("recovery: this %s; training in fp32 instead (--recover-precision fp32)", why)
    return replace(spec, precision="fp32")


@dataclass
class RecoveryResult:
    method: str
    steps: int
    lr: float
    data: str
    sequences: int  # rows of seq_len tokens available
    tokens_seen: int
    first_loss: float
    final_loss: float  # mean of the last tenth of the steps (at least one)
    seconds: float  # this process's time, data preparation included
    resumed_from_step: int = 0
    losses: list[float] = field(default_factory=list)
    spec: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["losses"] = [round(x, 5) for x in self.losses]
        d["seconds"] = round(self.seconds, 1)
        return d


def recover(student: torch.nn.Module, teacher: torch.nn.Module | None, tokenizer, spec: RecoverySpec,
            data: torch.Tensor | None = None, progress: bool | Progress = True) -> RecoveryResult:
    """Train ``student`` in place (distill from ``teacher``, or LoRA merged back) and return what was done.

    ``data``: token rows (n, seq_len); None reads ``spec.data`` (``self``: the teacher, or the student when
    there is none, writes the samples). ``progress``: a tqdm bar (True), none (False), or a callback
    ``(step, steps, loss)`` called after every step.
    """
    start = time.perf_counter()
    spec.check()
    if spec.method == "distill" and teacher is None:
        raise InvalidOptionError("recovery method 'distill' needs the dense teacher model")
    if any(p.dtype != torch.float32 for p in student.parameters()) and not (spec.trains_adapters and spec.precision == "bf16"):
        raise InvalidOptionError("recovery trains in float32 (or LoRA on bf16 weights under --recover-precision bf16); "
                                 "load the model with dtype float32")
    label = spec.data or (SELF if data is None else "(token rows given)")
    if data is None:
        texts = recovery_texts(spec.source, spec.field)
        data = recovery_rows(texts, tokenizer, spec.seq_len, spec.seed, spec.source, teacher or student, spec.self_samples)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    inputs = _fingerprint_inputs(student, data)
    torch.manual_seed(spec.seed)
    model, params = _trainable(student, spec)
    teacher_mode = teacher.training if teacher is not None else False
    try:
        state = _resume(spec, model, params, inputs)
        optimizer = torch.optim.AdamW([p for _, p in params], lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=True)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
            torch.set_rng_state(state.rng)
        resumed_from = state.step
        with heap_for_training_loop():
            _train(model, teacher, params, optimizer, data, spec, state, progress)
    except BaseException:
        if spec.trains_adapters:
            model.unload()  # the student gets its plain Linears back, untrained
        raise
    finally:
        if teacher is not None:
            teacher.train(teacher_mode)
    if spec.trains_adapters:
        model.merge_and_unload()  # folds B·A·alpha/r into each base Linear and puts the plain Linear back
    for n, p in student.named_parameters():
        p.requires_grad_(flags.get(n, True))
    student.eval()
    losses = state.losses
    tail = losses[-max(1, spec.steps // 10):]
    return RecoveryResult(spec.method, spec.steps, spec.learning_rate, label, int(data.shape[0]),
                          spec.steps * spec.batch_size * int(data.shape[1]), losses[0], sum(tail) / len(tail),
                          time.perf_counter() - start, resumed_from, losses, spec.trajectory())


def _trainable(student, spec: RecoverySpec):
    """The module to train and its trainable (name, parameter) pairs."""
    if spec.trains_adapters:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                            target_modules=lora_targets(student), bias="none")
        with warnings.catch_warnings():  # peft reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(student, config)
    else:
        model = student
        student.requires_grad_(True)
        if spec.freeze_embeddings:
            student.get_input_embeddings().weight.requires_grad_(False)  # tied: the LM head is the same tensor
    model.train()
    return model, [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_targets(model) -> list[str]:
    """Full names of every decoder projection, from the architecture's adapter (q/k/v/o + MLP, fused or not)."""
    adapter = get_adapter(model)
    wanted = {id(m) for i in range(adapter.num_layers) for m in adapter.projections(i)}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def lr_at(step: int, spec: RecoverySpec) -> float:
    """Linear warmup over ``warmup`` steps, then cosine (or linear) decay towards 0 at ``steps``."""
    if step < spec.warmup:
        return spec.learning_rate * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / (spec.steps - spec.warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1 - progress
    return spec.learning_rate * decay


def batch_rows(step: int, n: int, spec: RecoverySpec) -> torch.Tensor:
    """Row indices of the batch at ``step``: a seeded permutation per epoch, a pure function of the step."""
    positions = range(step * spec.batch_size, (step + 1) * spec.batch_size)
    perms: dict[int, torch.Tensor] = {}
    rows = []
    for p in positions:
        epoch = p // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch))
        rows.append(perms[epoch][p % n])
    return torch.stack(rows)


def _train(model, teacher, params, optimizer, data, spec, state: ResumeState, progress) -> None:
    bar = tqdm(total=spec.steps, initial=state.step, desc=f"recovery ({spec.method})", unit="step", leave=False,
               disable=progress is not True)
    saved, saved_at = state.step, time.monotonic()
    workspace = KLWorkspace()
    try:
        while state.step < spec.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, spec)
            loss = _step(model, teacher, params, optimizer, data[batch_rows(state.step, data.shape[0], spec)], spec,
                         workspace)
            state.step += 1
            state.losses.append(loss)
            if spec.resume_dir and _save_due(spec, state.step, time.monotonic() - saved_at):
                save_state(spec.resume_dir, params, optimizer, state)
                saved, saved_at = state.step, time.monotonic()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if callable(progress):
                progress(state.step, spec.steps, loss)
    except KeyboardInterrupt:
        if spec.resume_dir and state.step > saved:
            save_state(spec.resume_dir, params, optimizer, state)
        if spec.resume_dir:
            log.warning("recovery interrupted after step %d; its state is in %s, run again to resume", state.step, spec.resume_dir)
        raise
    finally:
        bar.close()


def _save_due(spec: RecoverySpec, step: int, seconds_since_save: float) -> bool:
    return (step == spec.steps or seconds_since_save >= 60 * spec.save_minutes
            or (spec.save_every is not None and step % spec.save_every == 0))


def _step(model, teacher, params, optimizer, batch: torch.Tensor, spec: RecoverySpec,
          workspace: KLWorkspace | None = None) -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for ids in batch.split(spec.micro):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            loss = _distill_loss(model, teacher, ids, spec, workspace) if spec.method == "distill" else model(input_ids=ids, labels=ids, use_cache=False).loss
        (loss * ids.shape[0] / batch.shape[0]).backward()
        total += loss.item() * ids.shape[0] / batch.shape[0]
    if spec.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in params], spec.max_grad_norm)
    optimizer.step()
    return total


def _distill_loss(student, teacher, ids: torch.Tensor, spec: RecoverySpec, workspace: KLWorkspace | None = None) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at every position (× T², as Hinton et al.)."""
    teacher.eval()
    hidden = spec.hidden_weight > 0
    with torch.no_grad():
        t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    s_logits, t_logits = out.logits.flatten(0, 1), t_out.logits.flatten(0, 1)
    loss = _KLToTeacher.apply(s_logits, t_logits, spec.temperature, workspace) / s_logits.shape[0] * spec.temperature ** 2
    if spec.ce_weight:
        ce = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + spec.ce_weight * ce
    if hidden:
        loss = loss + spec.hidden_weight * _hidden_loss(out.hidden_states, t_out.hidden_states)
    return loss


def _hidden_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    """Mean over decoder layers of ||h_s - h_t||^2 / ||h_t||^2 (pruning keeps the hidden size, so the layers' outputs
    line up one to one). Relative per layer: the residual stream grows with depth and would let the last layers rule."""
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        t = t.float()
        terms.append(((s.float() - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


class KLWorkspace:
    """Four reusable (rows x vocab) fp32 blocks for _KLToTeacher. Fresh blocks every call cost more than the
    arithmetic: glibc maps allocations this large anew each time and the kernel zero-fills every page on first touch
    (Gemma's 262k vocabulary, a step of 4 x 256 tokens: 4.0M page faults with fresh blocks, 1.4M with these)."""

    def __init__(self):
        self._blocks: torch.Tensor | None = None

    def blocks(self, rows: int, vocab: int, device) -> torch.Tensor:
        b = self._blocks
        if b is None or b.shape[1] < rows or b.shape[2] != vocab or b.device != device:
            self._blocks = b = torch.empty(4, rows, vocab, device=device)
        return b[:, :rows]


def _log_softmax_(x: torch.Tensor, probs: torch.Tensor) -> None:
    """In place: ``x`` becomes log_softmax(x) and ``probs`` softmax(x), with no other row-wide temporary."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=probs)
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    x.sub_(total.log_())


class _KLToTeacher(torch.autograd.Function):
    """sum over rows of KL(softmax(t / T) || softmax(s / T)), with its gradient computed in the same pass.

    Row blocks in fp32, worked on in place in a reused workspace: autograd's log_softmax + kl_div kept several full
    (tokens x vocab) tensors and took a third of a distillation step on a 49k vocabulary.
    """

    @staticmethod
    def forward(ctx, s_logits, t_logits, temperature: float, workspace: KLWorkspace | None = None):
        grad = torch.empty_like(s_logits)
        total = torch.zeros((), dtype=torch.float64, device=s_logits.device)
        blocks = (workspace or KLWorkspace()).blocks(min(_KL_ROWS, s_logits.shape[0]), s_logits.shape[1], s_logits.device)
        for a in range(0, s_logits.shape[0], _KL_ROWS):
            n = min(_KL_ROWS, s_logits.shape[0] - a)
            s_lp, p_s, t_lp, p_t = (b[:n] for b in blocks)
            s_lp.copy_(s_logits[a:a + n]).div_(temperature)
            t_lp.copy_(t_logits[a:a + n]).div_(temperature)
            _log_softmax_(s_lp, p_s)
            _log_softmax_(t_lp, p_t)
            total += t_lp.sub_(s_lp).mul_(p_t).sum(dtype=torch.float64)
            grad[a:a + n] = p_s.sub_(p_t).div_(temperature)  # d KL / d s_logits
        ctx.save_for_backward(grad)
        return total.float()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad.mul_(g.to(grad.dtype)), None, None, None  # in place: the saved gradient is used once


def kl_to_teacher(student, teacher, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean per-token KL(teacher || student) on ``rows`` (a measure of how far distillation has come)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows.split(batch_size):
            t = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
            s = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
            total += F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="sum").item()
            count += ids.numel()
    return total / count


def _fingerprint_inputs(student, data: torch.Tensor) -> dict:
    return {"weights": fingerprint(t for _, t in sorted(student.state_dict().items())), "data": fingerprint([data])}


def _resume(spec: RecoverySpec, model, params, inputs: dict) -> ResumeState:
    """The saved state of this run (weights loaded into ``params``), or a fresh start."""
    meta = {"spec": spec.trajectory(), **inputs}
    if not spec.resume_dir:
        return ResumeState(meta=meta)
    state = load_state(spec.resume_dir, params, meta, spec.restart_on_mismatch)
    if state.step:
        log.info("resuming recovery from step %d of %d (%s)", state.step, spec.steps, spec.resume_dir)
    return state
