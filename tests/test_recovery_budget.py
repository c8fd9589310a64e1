"""Recovery within the memory there is: full fp32 training where it fits, LoRA on bf16 weights where it does not."""

import copy
import json

import pytest
import torch

from amp_edge.errors import InvalidOptionError
from amp_edge.recovery.budget import footprint, plan_budget
from amp_edge.recovery.train import kl_to_teacher, recover
from amp_edge.data.recovery_data import pack
from tests.conftest import run_cli
from tests.test_recovery import TEXTS, _pruned, _spec
from tests.tiny import char_tokenizer

GIB = 1024 ** 3


@pytest.fixture
def fast_bf16(monkeypatch):
    """The budget's bf16 fallback asks whether this CPU computes bf16 fast (a timed matmul, amp_edge.hardware): these
    tests fix the answer, so they test the budget and not the box (AMX machines say yes, AVX2-only ones no)."""
    _fast_bf16(monkeypatch)


def _fast_bf16(monkeypatch):
    from amp_edge.recovery import budget, train

    for module in (budget, train):  # the budget's choice and the trainer's precision check must agree
        monkeypatch.setattr(module, "half_is_fast", lambda dtype, device: True)


def test_without_fast_bf16_what_needs_it_is_refused(monkeypatch):
    from amp_edge.recovery import budget

    monkeypatch.setattr(budget, "half_is_fast", lambda dtype, device: False)
    with pytest.raises(InvalidOptionError, match="needs about 77 GiB in fp32 .* this CPU has no fast bf16"):
        plan_budget(3_930_000_000, "distill", "auto", "fp32", available=22 * GIB)


def test_a_small_model_trains_in_full_fp32_as_before():
    b = plan_budget(135_000_000, "distill", "auto", "fp32", available=20 * GIB)
    assert (b.dtype, b.adapter, b.precision, b.why) == ("float32", "full", "fp32", "")
    assert b.need_bytes == footprint(135_000_000, "full", 4, teacher=True)


def test_the_phi3_shape_distills_lora_on_bf16_weights_within_20_gib(fast_bf16):
    b = plan_budget(3_930_000_000, "distill", "auto", "fp32", available=22 * GIB)
    assert (b.dtype, b.adapter, b.precision) == ("bfloat16", "lora", "bf16")
    assert b.need_bytes < 20 * GIB and "LoRA" in b.why
    assert plan_budget(3_930_000_000, "lora", "auto", "fp32", available=22 * GIB).dtype == "bfloat16"


@pytest.mark.parametrize("params, method, adapter, why", [
    (3_930_000_000, "distill", "full", "use --recover-adapter lora"),
    (70_000_000_000, "distill", "auto", "even with LoRA on bf16 weights"),
])
def test_what_cannot_fit_is_refused_before_loading(params, method, adapter, why):
    with pytest.raises(InvalidOptionError, match=why):
        plan_budget(params, method, adapter, "fp32", available=22 * GIB)


def test_distillation_into_lora_adapters_on_bf16_weights_moves_towards_the_teacher():
    dense, student = _pruned("llama")
    student.to(torch.bfloat16)
    teacher = copy.deepcopy(dense).to(torch.bfloat16)
    rows = pack(TEXTS, char_tokenizer(), 32, seed=0)
    before = kl_to_teacher(student.float(), dense, rows[:8])
    student.to(torch.bfloat16)
    res = recover(student, teacher, char_tokenizer(), _spec("distill", adapter="lora", precision="bf16", steps=15),
                  data=rows, progress=False)
    assert res.spec["adapter"] == "lora" and res.final_loss < res.first_loss
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())  # merged back into the bf16 Linears
    assert not any("lora" in n for n, _ in student.named_parameters())
    assert kl_to_teacher(student.float(), dense, rows[:8]) < 0.9 * before


def test_lora_adapter_choice_reaches_the_saved_record(tiny_dir, calib_file, tmp_path):
    r = run_cli("prune", tiny_dir, "--out", tmp_path / "p", "--ratio", 0.3, "--calib", calib_file, "--calib-samples", 4,
                "--calib-seq-len", 16, "--heads", "proportional", "--recover", "distill", "--recover-adapter", "lora",
                "--recover-steps", 2, "--recover-batch-size", 2, "--recover-seq-len", 16, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["recovery"]["spec"]["adapter"] == "lora"
    bad = run_cli("prune", tiny_dir, "--out", tmp_path / "q", "--recover", "lora", "--recover-adapter", "full")
    assert bad.exit_code == 2 and "goes with --recover distill" in bad.output and not (tmp_path / "q").exists()


def test_a_safetensors_source_teaches_layer_by_layer_within_the_budget(fast_bf16):
    streamed = plan_budget(3_930_000_000, "distill", "auto", "fp32", available=22 * GIB, teacher_streams=True)
    copied = plan_budget(3_930_000_000, "distill", "auto", "fp32", available=22 * GIB)
    assert streamed.streamed_teacher and not copied.streamed_teacher and "layer by layer" in streamed.why
    assert streamed.need_bytes == footprint(3_930_000_000, "lora", 2, teacher=False) < copied.need_bytes
    # where fp32 fits, the copy is kept (faster steps); lora recovery has no teacher to stream
    assert not plan_budget(135_000_000, "distill", "auto", "fp32", available=20 * GIB, teacher_streams=True).streamed_teacher
    assert not plan_budget(3_930_000_000, "lora", "auto", "fp32", available=22 * GIB, teacher_streams=True).streamed_teacher


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_teacher_computes_the_dense_models_logits(family, tmp_path):
    from amp_edge.recovery.teacher import StreamedTeacher
    from tests.tiny import sample_ids, save_tiny, tiny_model

    save_tiny(family, tmp_path / "src")
    dense = tiny_model(family).eval()
    ids = sample_ids(2, 12)
    teacher = StreamedTeacher(tmp_path / "src", torch.float32)
    with torch.no_grad():
        expected = dense(input_ids=ids, use_cache=False).logits
    got = teacher(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert all(p.device.type == "meta" for p in teacher.model.parameters())  # emptied again after the pass
    assert teacher(input_ids=ids).logits.shape == expected.shape  # and usable again


def test_distill_with_the_streamed_teacher_through_the_pipeline(tiny_dir, calib_file, tmp_path, monkeypatch):
    """A budget that only fits LoRA on bf16: the teacher comes from the folder, not a copy, and it teaches what the
    copy teaches (the first step's loss, before any update, is the same)."""
    import amp_edge.pruning.pipeline as pipeline
    from amp_edge.recovery import budget as budget_mod
    from amp_edge.recovery.teacher import StreamedTeacher

    runs = {}
    for streams in (True, False):
        def tight(params, method, adapter, precision, available=None, teacher_streams=False, streams=streams):
            return budget_mod.plan_budget(10**9, method, adapter, precision, available=6 * GIB, teacher_streams=streams)

        made = []
        real = pipeline._teacher
        monkeypatch.setattr(pipeline, "plan_budget", tight)
        _fast_bf16(monkeypatch)
        monkeypatch.setattr(pipeline, "_teacher", lambda *a, real=real, made=made: made.append(real(*a)) or made[-1])
        r = run_cli("prune", tiny_dir, "--out", tmp_path / str(streams), "--ratio", 0.3, "--calib", calib_file,
                    "--calib-samples", 4, "--calib-seq-len", 16, "--heads", "proportional", "--recover", "distill",
                    "--recover-steps", 3, "--recover-batch-size", 2, "--recover-seq-len", 16, "--json")
        monkeypatch.undo()
        assert r.exit_code == 0, r.output
        runs[streams] = (made[0], json.loads(r.stdout)["recovery"])
    (streamed, rec), (copied, rec_copy) = runs[True], runs[False]
    assert isinstance(streamed, StreamedTeacher) and not isinstance(copied, StreamedTeacher)
    assert rec["spec"]["adapter"] == rec_copy["spec"]["adapter"] == "lora" and rec["steps"] == 3
    # bf16 both; measured 1.7323 vs 1.7341 (the copy's .to(bfloat16) also rounds its rotary buffers, the skeleton's
    # stay fp32); a broken teacher (wrong layer, stale weights) moves the loss far more
    assert rec["first_loss"] == pytest.approx(rec_copy["first_loss"], rel=1e-2)


def test_hidden_state_matching_with_the_streamed_teacher_is_refused_before_loading(tiny_dir, calib_file, tmp_path, monkeypatch):
    """The layer-by-layer teacher gives logits only: --recover-hidden-weight there is one line, before the model loads."""
    import amp_edge.pruning.pipeline as pipeline
    from amp_edge.recovery import budget as budget_mod

    monkeypatch.setattr(pipeline, "plan_budget", lambda params, method, adapter, precision, **kw: budget_mod.plan_budget(
        10**9, method, adapter, precision, available=6 * GIB, teacher_streams=True))
    _fast_bf16(monkeypatch)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    out = tmp_path / "out"
    r = run_cli("prune", tiny_dir, "--out", out, "--ratio", 0.3, "--calib", calib_file, "--recover", "distill",
                "--recover-hidden-weight", 1, "--recover-steps", 3)
    assert r.exit_code != 0 and "--recover-hidden-weight 1.0 needs the teacher in memory" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()
