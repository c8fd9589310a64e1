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


def test_a_small_model_trains_in_full_fp32_as_before():
    b = plan_budget(135_000_000, "distill", "auto", "fp32", available=20 * GIB)
    assert (b.dtype, b.adapter, b.precision, b.why) == ("float32", "full", "fp32", "")
    assert b.need_bytes == footprint(135_000_000, "full", 4, teacher=True)


def test_the_phi3_shape_distills_lora_on_bf16_weights_within_20_gib():
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
