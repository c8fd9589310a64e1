"""Recovery after pruning: distillation moves the pruned model towards the dense one, LoRA lowers the
loss and is merged away, runs are reproducible and resumable, the CLI refuses bad input in one line."""

import copy
import dataclasses
import json
import re
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from amp_edge import allocate, apply_plan, get_adapter, load_pruned, score
from amp_edge.errors import InvalidOptionError, RecoveryError
from amp_edge.hardware import half_is_fast
from amp_edge.recovery.train import RecoverySpec, kl_to_teacher, lora_targets, lr_at, recover, usable_precision
from amp_edge.data.recovery_data import pack, read_recovery_file, recovery_rows, recovery_texts, wants_self
from amp_edge.recovery.state import ROWS_FILE, STATE_FILE

from tests.conftest import run_cli as run
from tests.tiny import char_tokenizer, tiny_model

TEXTS = [f"Note {i}: the quick brown fox jumps over the lazy dog, and the cat sat on mat {i % 7}. " * 2 for i in range(60)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core box makes them slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows():
    return pack(TEXTS, char_tokenizer(), 32, seed=0)


def _pruned(family, allocation="uniform"):
    dense = tiny_model(family)
    student = copy.deepcopy(dense)
    adapter = get_adapter(student)
    apply_plan(student, allocate(adapter, score("magnitude", adapter), 0.3, allocation, "query", min_keep=0.25))
    return dense, student


def _spec(method, **kw):
    base = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, seed=0)
    return RecoverySpec(method, **{**base, **kw})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family,allocation", [("llama", "uniform"), ("phi3-gqa", "global"), ("phi", "global")])
def test_distillation_lowers_kl_to_teacher_on_held_out_text(rows, family, allocation):
    dense, student = _pruned(family, allocation)
    train, held_out = rows[:-8], rows[-8:]
    before = kl_to_teacher(student, dense, held_out)
    teacher_before = _weights(dense)
    result = recover(student, dense, char_tokenizer(), _spec("distill", steps=20), data=train, progress=False)
    after = kl_to_teacher(student, dense, held_out)
    assert after < 0.6 * before, (before, after)
    assert result.final_loss < result.first_loss and len(result.losses) == 20
    assert _same(_weights(dense), teacher_before)  # the teacher is not trained
    assert not student.training and all(p.requires_grad for p in student.parameters())


def test_hidden_state_matching_is_zero_on_the_teacher_and_brings_layers_closer(rows):
    from amp_edge.recovery.train import _hidden_loss

    dense, student = _pruned("llama")
    ids = rows[:4]

    def hidden(model):
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states

    t = hidden(dense)
    assert len(t) == dense.config.num_hidden_layers + 1
    assert _hidden_loss(t, t).item() == 0.0
    before = _hidden_loss(hidden(student), t).item()
    after = {}
    for weight in (0.0, 1.0):
        trained = copy.deepcopy(student)
        recover(trained, dense, char_tokenizer(), _spec("distill", steps=20, hidden_weight=weight), data=rows, progress=False)
        after[weight] = _hidden_loss(hidden(trained), t).item()
    assert after[1.0] < 0.8 * before and after[1.0] < 0.8 * after[0.0], (before, after)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_distillation_loss_equals_autograd_kl(temperature):
    from amp_edge.recovery.train import KLWorkspace, _KLToTeacher

    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(300, 50, generator=gen) * 3).requires_grad_(True)  # 300 rows: more than one block of 128
    t = torch.randn(300, 50, generator=gen) * 3
    ref_s = s.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.kl_div((ref_s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1),
                                     log_target=True, reduction="sum")
    ref.backward()
    workspace = KLWorkspace()
    _KLToTeacher.apply(s[:200].detach(), t[:200], temperature, workspace)  # blocks reused by the next call
    got = _KLToTeacher.apply(s, t, temperature, workspace)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-4 * ref.item()
    assert torch.allclose(s.grad, ref_s.grad, atol=1e-6)


def test_bf16_distillation_lowers_kl_and_keeps_fp32_weights(rows):
    dense, student = _pruned("llama")
    train, held_out = rows[:-8], rows[-8:]
    before = kl_to_teacher(student, dense, held_out)
    teacher = copy.deepcopy(dense).to(torch.bfloat16)  # what prune() hands recover() for precision bf16
    recover(student, teacher, char_tokenizer(), _spec("distill", steps=20, precision="bf16"), data=train, progress=False)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert kl_to_teacher(student, dense, held_out) < 0.6 * before


def test_distillation_can_freeze_tied_embeddings(rows):
    dense, student = _pruned("llama")
    student.config.tie_word_embeddings = True
    student.tie_weights()
    emb = student.get_input_embeddings().weight.clone()
    recover(student, dense, char_tokenizer(), _spec("distill", steps=3, freeze_embeddings=True, ce_weight=0.5), data=rows, progress=False)
    assert torch.equal(student.get_input_embeddings().weight, emb)
    assert student.lm_head.weight is student.get_input_embeddings().weight
    assert not torch.equal(student.model.norm.weight, dense.model.norm.weight)  # the rest is trained


@pytest.mark.parametrize("family,allocation", [("llama", "uniform"), ("phi", "uniform"), ("phi3", "global"), ("phi3-gqa", "uniform")])
def test_lora_lowers_loss_and_is_merged_into_plain_linears(rows, family, allocation):
    _, student = _pruned(family, allocation)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    before = _weights(student)
    result = recover(student, None, char_tokenizer(), _spec("lora", steps=20), data=rows, progress=False)
    assert result.final_loss < 0.8 * result.first_loss, result.losses
    assert {k: v.shape for k, v in student.state_dict().items()} == shapes  # same keys, same shapes: no adapters left
    assert not any("lora" in name for name, _ in student.named_modules())
    adapter = get_adapter(student)
    assert all(type(m) is torch.nn.Linear for i in range(adapter.num_layers) for m in adapter.projections(i))
    changed = {k for k in shapes if not torch.equal(before[k], student.state_dict()[k])}
    assert changed and all(re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+\.weight$", k) for k in changed)


@pytest.mark.parametrize("family,names", [
    ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("phi", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_lora_targets_come_from_the_adapter(family, names):
    model = tiny_model(family)
    targets = lora_targets(model)
    assert len(targets) == len(names) * model.config.num_hidden_layers
    assert {t.rsplit(".", 1)[1] for t in targets} == names


@pytest.mark.parametrize("method", ["distill", "lora"])
def test_same_seed_gives_identical_weights(rows, method):
    runs = []
    for seed in (0, 0, 1):
        dense, student = _pruned("llama")
        recover(student, dense if method == "distill" else None, char_tokenizer(), _spec(method, steps=4, seed=seed), data=rows, progress=False)
        runs.append(_weights(student))
    assert _same(runs[0], runs[1])
    assert not _same(runs[0], runs[2])


class Stop(Exception):
    pass


@pytest.mark.parametrize("method,stop,error", [("lora", 5, Stop), ("distill", 3, KeyboardInterrupt)])
def test_interrupted_run_resumes_to_the_same_weights(rows, tmp_path, method, stop, error):
    spec = _spec(method, steps=8, resume_dir=str(tmp_path / "state"), save_every=2)
    dense, student = _pruned("llama")
    teacher = dense if method == "distill" else None
    reference = copy.deepcopy(student)
    whole = recover(reference, teacher, char_tokenizer(), _spec(method, steps=8), data=rows, progress=False)

    def interrupt(done, total, loss):
        if done == stop:
            raise error
    stopped = copy.deepcopy(student)
    with pytest.raises(error):
        recover(stopped, teacher, char_tokenizer(), spec, data=rows, progress=interrupt)
    assert not any("lora" in name for name, _ in stopped.named_modules())  # adapters removed on the way out
    with safe_open(tmp_path / "state" / STATE_FILE, "pt") as f:
        saved = json.loads(f.metadata()["amp_edge_recovery_state"])
    # A hook's exception loses the steps since the last save; Ctrl-C saves the step it stopped at.
    assert saved["step"] == (stop if error is KeyboardInterrupt else stop - stop % 2)
    resumed = copy.deepcopy(student)
    result = recover(resumed, teacher, char_tokenizer(), spec, data=rows, progress=False)
    assert result.resumed_from_step == saved["step"]
    assert _same(_weights(resumed), _weights(reference))
    assert result.losses == whole.losses


@pytest.mark.parametrize("minutes,every,saved_at", [(60.0, None, [6]), (60.0, 4, [4, 6]), (1e-9, None, [1, 2, 3, 4, 5, 6])])
def test_state_is_saved_by_time_or_steps_whichever_comes_first(rows, tmp_path, monkeypatch, minutes, every, saved_at):
    import amp_edge.recovery.train as train
    saves = []
    monkeypatch.setattr(train, "save_state", lambda folder, params, optimizer, state: saves.append(state.step))
    spec = _spec("distill", steps=6, resume_dir=str(tmp_path / "state"), save_minutes=minutes, save_every=every)
    dense, student = _pruned("llama")
    recover(student, dense, char_tokenizer(), spec, data=rows, progress=False)
    assert saves == saved_at


def test_resume_folder_of_another_run_is_refused_or_restarted(rows, tmp_path):
    spec = _spec("lora", steps=4, resume_dir=str(tmp_path / "state"), save_every=2)
    _, student = _pruned("llama")
    recover(copy.deepcopy(student), None, char_tokenizer(), spec, data=rows, progress=False)
    other = dataclasses.replace(spec, lr=1e-3)
    with pytest.raises(RecoveryError, match=r"different recovery run \(differs in: spec.lr\)"):
        recover(copy.deepcopy(student), None, char_tokenizer(), other, data=rows, progress=False)
    other.restart_on_mismatch = True
    result = recover(copy.deepcopy(student), None, char_tokenizer(), other, data=rows, progress=False)
    assert result.resumed_from_step == 0 and len(result.losses) == 4


def test_resume_compares_the_data_rows_not_the_path_they_came_from(rows, tmp_path):
    spec = _spec("lora", steps=4, resume_dir=str(tmp_path / "state"), save_every=2, data="data/c4.jsonl")

    def stop(done, total, loss):
        if done == 2:
            raise Stop
    _, student = _pruned("llama")
    with pytest.raises(Stop):
        recover(copy.deepcopy(student), None, char_tokenizer(), spec, data=rows, progress=stop)
    moved = dataclasses.replace(spec, data=str(tmp_path / "data/c4.jsonl"))
    assert recover(copy.deepcopy(student), None, char_tokenizer(), moved, data=rows, progress=False).resumed_from_step == 2
    with pytest.raises(RecoveryError, match=r"differs in: data\)"):
        recover(copy.deepcopy(student), None, char_tokenizer(), moved, data=rows[1:], progress=False)


def test_schedule_warms_up_then_decays():
    spec = RecoverySpec("lora", steps=100, lr=1e-3, warmup_steps=10)
    lrs = [lr_at(s, spec) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and 0 < lrs[-1] < 1e-5


def test_data_files_alpaca_jsonl_txt(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Greet", "input": "", "output": "Hi"}]))
    texts = read_recovery_file(alpaca)
    assert "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n5" in texts[0]
    assert "### Input" not in texts[1] and texts[1].endswith("### Response:\nHi")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:3]))
    assert read_recovery_file(jsonl) == TEXTS[:3]
    txt = tmp_path / "t.txt"
    txt.write_text("one doc\n\nanother doc")
    assert read_recovery_file(txt) == ["one doc", "another doc"]
    mixed = recovery_texts(f"{jsonl},{txt}")
    assert mixed == TEXTS[:3] + ["one doc", "another doc"]
    assert recovery_texts(f"self,{txt}") == ["one doc", "another doc"] and wants_self(f"{txt}, self")
    assert recovery_texts("self") is None and not wants_self(f"{jsonl},{txt}")
    for empty in ("", " , "):
        with pytest.raises(RecoveryError, match="recovery data is empty"):
            recovery_texts(empty)
    rows = pack(TEXTS, char_tokenizer(), 16, seed=0)
    assert rows.shape[1] == 16 and rows.shape[0] == sum(len(t) + 1 for t in TEXTS) // 16
    with pytest.raises(RecoveryError, match="fewer than one sequence of 4096"):
        pack(TEXTS[:1], char_tokenizer(), 4096, seed=0)


def test_spec_check_names_the_bad_value():
    for kw, match in [({"method": "prune"}, "'prune'; choose from distill, lora"), ({"steps": 0}, "steps must be >= 1, got 0"),
                      ({"lr": -1.0}, "lr must be > 0, got -1.0"), ({"lora_dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
                      ({"warmup_steps": 12}, "warmup steps must be in"), ({"schedule": "step"}, "'step'; choose from cosine, linear"),
                      ({"precision": "fp8"}, "'fp8'; choose from auto, fp32, bf16"),
                      ({"save_minutes": 0.0}, "save_minutes must be > 0, got 0.0"), ({"save_every": 0}, "save_every must be >= 1, got 0")]:
        with pytest.raises(InvalidOptionError, match=match):
            RecoverySpec(**{"method": "lora", "steps": 10, **kw}).check()


# --- through the pipeline and the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Repeat {i}", "input": "", "output": t} for i, t in enumerate(TEXTS)]))
    return path


SMALL = ["--calib-samples", 4, "--calib-seq-len", 16, "--recover-steps", 4, "--recover-batch-size", 2, "--recover-seq-len", 32]


def test_cli_lora_saves_a_plain_checkpoint(tiny_dir, data_file, tmp_path):
    plain, rec = tmp_path / "plain", tmp_path / "lora"
    assert run("prune", tiny_dir, "--calib", data_file, "--calib-samples", 4, "--calib-seq-len", 16, "--out", plain).exit_code == 0
    res = run("prune", tiny_dir, "--calib", data_file, *SMALL, "--recover", "lora", "--recover-data", data_file, "--out", rec, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)["recovery"]
    assert info["method"] == "lora" and info["steps"] == 4 and info["lr"] == 3e-4 and info["data"] == str(data_file)
    assert info["final_loss"] < info["first_loss"] and info["seconds"] > 0
    assert json.loads((rec / "amp_edge_recovery.json").read_text())["losses"] == info["losses"]
    assert sorted(p.name for p in rec.iterdir()) == sorted([p.name for p in plain.iterdir()] + ["amp_edge_recovery.json"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the resume state beside --out is gone
    a = AutoModelForCausalLM.from_pretrained(plain)
    b = AutoModelForCausalLM.from_pretrained(rec)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    plan_a, plan_b = (json.loads((d / "amp_edge_plan.json").read_text()) for d in (plain, rec))
    assert plan_a["layers"] == plan_b["layers"]  # the plan replays the pruning only; recovery is recorded beside it


def _recipe_folder(root, texts):
    (root / "calibration").mkdir(parents=True)
    (root / "calibration" / "c4_demo.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "calibration" / "alpaca_en_demo.json").write_text(json.dumps([{"instruction": "Say", "input": "", "output": t} for t in texts]))
    return root


def test_plain_recover_distill_is_the_recipe(tiny_dir, tmp_path, monkeypatch):
    """What `prune --recover distill` trains when no option is given: refit, 500 steps of 4 sequences, bf16 where it is
    fast, on the data folder's C4 + Alpaca files; an option given wins; LoRA keeps its own defaults."""
    from amp_edge.pruning import pipeline

    asked = {}
    monkeypatch.setattr(pipeline, "prune", lambda *a, **kw: asked.update(opts=a[2], recovery=kw["recovery"]) or 1 / 0)
    run("prune", tiny_dir, "--recover", "distill", "--out", tmp_path / "o")
    rec = asked["recovery"]
    assert (rec.steps, rec.batch_size, rec.precision, rec.data) == (500, 4, "auto", None) and asked["opts"].refit is not None
    run("prune", tiny_dir, "--recover", "distill", "--no-refit", "--recover-steps", 7, "--recover-batch-size", 2,
        "--recover-precision", "fp32", "--out", tmp_path / "o")
    rec = asked["recovery"]
    assert (rec.steps, rec.batch_size, rec.precision) == (7, 2, "fp32") and asked["opts"].refit is None
    run("prune", tiny_dir, "--recover", "lora", "--out", tmp_path / "o")
    rec = asked["recovery"]
    assert (rec.steps, rec.batch_size, rec.precision) == (100, 8, "fp32") and asked["opts"].refit is None
    run("prune", tiny_dir, "--out", tmp_path / "o")
    assert asked["recovery"] is None and asked["opts"].refit is None


def test_recipe_data_and_precision_resolve(tiny_dir, tmp_path, monkeypatch):
    folder = _recipe_folder(tmp_path / "data", TEXTS)
    monkeypatch.setenv("AMP_EDGE_DATA_DIR", str(folder))
    out = tmp_path / "out"
    res = run("prune", tiny_dir, "--calib-samples", 4, "--calib-seq-len", 16, "--refit-samples", 4, "--refit-seq-len", 16,
              "--recover", "distill", "--recover-steps", 2, "--recover-seq-len", 32, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    files = f"{folder}/calibration/c4_demo.jsonl,{folder}/calibration/alpaca_en_demo.json"
    assert info["recovery"]["data"] == files and info["refit"]["tokens"] > 0
    assert info["recovery"]["spec"]["precision"] == ("bf16" if half_is_fast(torch.bfloat16) else "fp32")
    assert info["recovery"]["spec"]["batch_size"] == 4
    # Calibration on a file: recovery reads that file, as before; no data folder: the model's own samples.
    from amp_edge.data.recovery_data import default_source

    assert default_source("my.jsonl") == "my.jsonl" and default_source("self") == files
    monkeypatch.setenv("AMP_EDGE_DATA_DIR", str(tmp_path / "none"))
    assert default_source("self") == "self"


def test_cli_distill_per_layer_with_default_data(tiny_dir, data_file, tmp_path):
    out = tmp_path / "distill"
    res = run("prune", tiny_dir, "--allocation", "global", "--calib", data_file, *SMALL, "--recover", "distill",
              "--recover-resume-dir", tmp_path / "state", "--recover-save-every", 2, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["per_layer_config"] and info["recovery"]["data"] == str(data_file)  # defaults to the calibration source
    assert (tmp_path / "state" / STATE_FILE).is_file()  # an explicit resume folder is kept
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == info["params_after"]
    # The same command again finds the finished state there: no step is trained twice, and the summary says so.
    res = run("prune", tiny_dir, "--allocation", "global", "--calib", data_file, *SMALL, "--recover", "distill",
              "--recover-resume-dir", tmp_path / "state", "--recover-save-every", 2, "--out", out, "--overwrite")
    assert res.exit_code == 0 and "steps on " in res.output and "(resumed from step 4)" in res.output, res.output
    assert f"recovery data: {data_file}, the calibration source" in res.output  # said before training, not after
    again = load_pruned(out).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def _matmul_seconds(dtype: torch.dtype) -> float:
    a, b = torch.randn(256, 512).to(dtype), torch.randn(512, 512).to(dtype)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)


def test_half_is_fast_agrees_with_a_timed_matmul():
    # Native bf16 kernels run a matmul about as fast as fp32 or faster; without them torch's scalar fallback is
    # ~100x slower (measured on an AVX2 EPYC). 10x splits the two cases with a wide margin either side.
    slow = _matmul_seconds(torch.bfloat16) > 10 * _matmul_seconds(torch.float32)
    assert half_is_fast(torch.bfloat16) == (not slow) and half_is_fast(torch.float32)


def test_bf16_recovery_trains_in_what_this_cpu_runs_fast(tiny_dir, data_file, tmp_path, caplog):
    # an AVX2-only CPU runs bf16 matmuls ~100x slower than fp32: asking for bf16 there must not cost a day
    fast = half_is_fast(torch.bfloat16)
    spec = _spec("distill", precision="bf16")
    assert usable_precision(spec, torch.device("cpu")).precision == ("bf16" if fast else "fp32") and spec.precision == "bf16"
    res = run("prune", tiny_dir, "--calib", data_file, *SMALL, "--recover", "distill", "--recover-precision", "bf16",
              "--out", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["recovery"]["spec"]["precision"] == ("bf16" if fast else "fp32")
    assert ("no native bfloat16 kernels" in caplog.text) == (not fast)


def test_half_precision_load_warns_where_it_is_slow(tiny_dir, monkeypatch, caplog):
    import amp_edge.models.sources as sources

    for fast, warned in ((True, False), (False, True)):
        caplog.clear()
        monkeypatch.setattr(sources, "half_is_fast", lambda dtype, fast=fast: fast)
        model = sources.load_model(str(tiny_dir), dtype="bfloat16").model
        assert next(model.parameters()).dtype == torch.bfloat16
        assert ("--dtype bfloat16 has no native kernels" in caplog.text) == warned


def test_recover_self_generated_data(tiny_dir):
    dense, student = _pruned("llama")
    result = recover(student, dense, char_tokenizer(), _spec("distill", steps=2, self_samples=4, seq_len=16), progress=False)
    assert result.data == "self" and result.sequences == 4


def test_self_written_rows_are_kept_for_a_rerun(tiny_dir, data_file, tmp_path, monkeypatch):
    import amp_edge.data.recovery_data as recovery_data

    written = []
    real = recovery_data.self_generated
    monkeypatch.setattr(recovery_data, "self_generated", lambda *a, **k: written.append(1) or real(*a, **k))
    state = tmp_path / "state"
    args = ["prune", tiny_dir, "--calib", data_file, *SMALL, "--recover", "distill", "--recover-resume-dir", state,
            "--out", tmp_path / "out", "--overwrite", "--recover-data"]
    args, self_only = [*args, f"{data_file},self"], [*args, "self"]
    assert run(*args, "--recover-self-samples", 3).exit_code == 0 and len(written) == 1
    assert (state / ROWS_FILE).is_file()
    first = load_pruned(tmp_path / "out").state_dict()
    (state / STATE_FILE).unlink()  # train again from step 0, on the kept rows
    res = run(*args, "--recover-self-samples", 3, "--json")
    assert res.exit_code == 0 and len(written) == 1, res.output
    again = load_pruned(tmp_path / "out").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    (state / STATE_FILE).unlink()
    assert run(*self_only, "--recover-self-samples", 3).exit_code == 0 and len(written) == 1  # self alone: the same kept samples
    (state / STATE_FILE).unlink()
    assert run(*args, "--recover-self-samples", 5).exit_code == 0 and len(written) == 2  # other samples: written anew


def test_self_samples_mixed_with_a_file(tmp_path):
    dense, _ = _pruned("llama")
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(TEXTS[:10]))
    source = f"{txt},self"
    packed = pack(recovery_texts(source), char_tokenizer(), 16, seed=0)
    mixed = recovery_rows(recovery_texts(source), char_tokenizer(), 16, 0, source, dense, self_samples=3)
    assert mixed.shape == (packed.shape[0] + 3, 16)
    assert torch.equal(mixed[: packed.shape[0]], packed)  # the file's rows first, then the 3 written ones
    assert torch.equal(mixed[-3:], recovery_rows(None, char_tokenizer(), 16, 0, "self", dense, self_samples=3))


def _bad_cases(tiny_dir, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    return {
        "unknown method": (["--recover", "prune"], "--recover.*'prune' is not one of 'distill', 'lora'"),
        "steps zero": (["--recover", "lora", "--recover-steps", 0], "steps must be >= 1, got 0"),
        "lr zero": (["--recover", "distill", "--recover-lr", 0], "lr must be > 0, got 0.0"),
        "lr negative": (["--recover", "lora", "--recover-lr", -1e-4], "lr must be > 0, got -0.0001"),
        "missing data": (["--recover", "lora", "--recover-data", tmp_path / "nope.json"], "recovery data file not found: .*nope.json"),
        "empty data": (["--recover", "lora", "--recover-data", empty], "holds no text"),
        "blank text": (["--recover", "distill", "--recover-data", blank], "holds no text"),
        "half precision": (["--recover", "lora", "--dtype", "float16"], "recovery trains in float32; got --dtype float16"),
        "no self samples": (["--recover", "distill", "--recover-data", "self", "--recover-self-samples", 0],
                            "self_samples must be >= 1, got 0"),
        "save minutes zero": (["--recover", "distill", "--recover-save-minutes", 0], "save_minutes must be > 0, got 0.0"),
    }


@pytest.mark.parametrize("case", ["unknown method", "steps zero", "lr zero", "lr negative", "missing data", "empty data",
                                  "blank text", "half precision", "no self samples", "save minutes zero"])
def test_cli_bad_recovery_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, case):
    args, match = _bad_cases(tiny_dir, tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run("prune", tiny_dir, "--calib-samples", 2, "--calib-seq-len", 16, *args, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_data_too_short_for_one_sequence_fails_before_scoring(tmp_path, tiny_dir, calib_file, monkeypatch):
    """Tokenizing the recovery data comes before calibration: a short file costs no scoring and writes nothing."""
    import amp_edge.pruning.pipeline as pipeline

    from .conftest import run_cli

    def no_scoring(*_a, **_k):
        raise AssertionError("scored before the recovery data was checked")

    monkeypatch.setattr(pipeline, "make_plan", no_scoring)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "hi"}\n')
    result = run_cli("prune", tiny_dir, "--ratio", 0.2, "--calib", calib_file, "--recover", "distill",
                     "--recover-data", short, "--recover-steps", 2, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "fewer than one sequence of 256" in result.output
    assert not (tmp_path / "out").exists()
