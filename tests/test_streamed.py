"""The layer-streamed prune equals the in-memory one: same scores, same plan, same pruned logits; bf16 stays bf16."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open

from amp_edge.data.calibration import CalibrationSpec, calibration_batches
from amp_edge.models.adapters import get_adapter
from amp_edge.models.checkpoint import load_pruned
from amp_edge.models.sources import load_model
from amp_edge.pruning import streamed
from amp_edge.pruning.pipeline import PruneOptions, prune
from amp_edge.pruning.scoring import score
from amp_edge.pruning.split import auto_rows, thin_candidates
from tests.tiny import FAMILIES, char_tokenizer, sample_ids, save_tiny


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    """Text of random printable characters: calibration without generation (fast, the same for both paths)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join("".join(chr(rng.randrange(32, 127)) for _ in range(200)) for _ in range(8)))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


def _opts(calib, **kw) -> PruneOptions:
    spec = CalibrationSpec(str(calib), num_samples=6, seq_len=24, batch_size=4)
    return PruneOptions(**{"ratio": 0.3, "min_keep": 0.25, "calibration": spec, **kw})


def _plan(folder) -> dict:
    return json.loads((folder / "amp_edge_plan.json").read_text())


def _both(src, tmp_path, opts, **kw):
    s = prune(str(src), tmp_path / "streamed", opts, **kw)
    m = prune(str(src), tmp_path / "memory", opts, stream=False, **kw)
    assert s.streamed and not m.streamed
    return s, m


def _same_outputs(tmp_path):
    ps, pm = _plan(tmp_path / "streamed"), _plan(tmp_path / "memory")
    assert ps["layers"] == pm["layers"] and ps["head_split"] == pm["head_split"] and ps["params"] == pm["params"]
    assert ps["calibration"] == pm["calibration"]
    ms, mm = load_pruned(tmp_path / "streamed"), load_pruned(tmp_path / "memory")
    ids = sample_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(ms(ids).logits, mm(ids).logits)
    cs, cm = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("streamed", "memory"))
    assert cs == cm
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == sorted(p.name for p in (tmp_path / "memory").iterdir())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_streamed_prune_equals_in_memory(family, allocation, folders, calib_file, tmp_path):
    s, m = _both(folders[family], tmp_path, _opts(calib_file, allocation=allocation))
    assert s.params_after == m.params_after < s.params_before and s.per_layer == m.per_layer
    _same_outputs(tmp_path)


@pytest.mark.parametrize("family", ["llama", "phi3-gqa"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_proportional_heads_streamed(family, allocation, folders, calib_file, tmp_path):
    s, _ = _both(folders[family], tmp_path, _opts(calib_file, allocation=allocation, heads="proportional"))
    assert s.plan.head_split["rule"] == "proportional" and sum(s.plan.head_split["heads_removed"]) > 0
    _same_outputs(tmp_path)


@pytest.mark.parametrize("criterion", ["wanda-sp", "magnitude", "random"])
def test_every_criterion_streams(criterion, folders, calib_file, tmp_path):
    _both(folders["qwen2"], tmp_path, _opts(calib_file, criterion=criterion, allocation="global"))
    _same_outputs(tmp_path)


@pytest.mark.parametrize("criterion", ["amp", "wanda-sp", "magnitude"])
@pytest.mark.parametrize("family", ["phi", "phi3-gqa", "qwen3"])
def test_streamed_scores_equal_in_memory_scores(criterion, family, folders, calib_file):
    folder = folders[family]
    batches = calibration_batches(_opts(calib_file).calibration, None, char_tokenizer())
    got = streamed.stream_scores(streamed.StreamedModel(folder), criterion, batches)
    want = score(criterion, get_adapter(load_model(str(folder)).model), batches)
    for g, w in zip(got, want):
        assert torch.allclose(g.heads, w.heads, rtol=1e-6, atol=1e-9)
        assert torch.allclose(g.neurons, w.neurons, rtol=1e-6, atol=1e-9)


def test_bf16_source_stays_bf16(folders, calib_file, tmp_path):
    model = load_model(str(folders["llama"])).model.to(torch.bfloat16)
    src = tmp_path / "bf16"
    model.save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    result = prune(str(src), tmp_path / "out", _opts(calib_file))
    assert result.streamed
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    pruned = load_pruned(tmp_path / "out")
    assert pruned.dtype == torch.bfloat16
    # the same weights as the in-memory prune, cast to bf16 (the source values are bf16, so exactly)
    prune(str(src), tmp_path / "memory", _opts(calib_file), stream=False)
    ref = load_pruned(tmp_path / "memory")
    for (n, a), (_, b) in zip(pruned.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16)), n


def test_shards_and_index(folders, calib_file, tmp_path, monkeypatch):
    """A small shard limit writes several shards and an index that plain loading reads."""
    monkeypatch.setattr(streamed, "SHARD_BYTES", 20_000)
    prune(str(folders["phi3"]), tmp_path / "streamed", _opts(calib_file))
    out = tmp_path / "streamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert not list(out.glob("*.part"))
    prune(str(folders["phi3"]), tmp_path / "memory", _opts(calib_file), stream=False)
    ids = sample_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(load_pruned(out)(ids).logits, load_pruned(tmp_path / "memory")(ids).logits)


def test_self_calibration(folders, tmp_path, monkeypatch, caplog):
    """A small model writes its own samples (the same rows as in memory); a large one falls back to c4_demo."""
    spec = CalibrationSpec("self", num_samples=4, seq_len=16, batch_size=4)
    _both(folders["llama"], tmp_path, PruneOptions(ratio=0.3, calibration=spec))
    _same_outputs(tmp_path)
    from tests.conftest import require_data

    data = require_data(streamed.SELF_FALLBACK)
    monkeypatch.setenv("AMP_EDGE_DATA_DIR", str(data))
    monkeypatch.setattr(streamed, "SELF_MAX_BYTES", 0)
    result = prune(str(folders["llama"]), tmp_path / "fallback", PruneOptions(ratio=0.3, calibration=spec))
    assert result.plan.calibration["source"].endswith("c4_demo.jsonl") and result.plan.calibration["requested"] == "self"
    assert "c4_demo" in caplog.text
    monkeypatch.setenv("AMP_EDGE_DATA_DIR", str(tmp_path / "nowhere"))
    from amp_edge.errors import CalibrationError

    with pytest.raises(CalibrationError, match="--no-stream"):
        prune(str(folders["llama"]), tmp_path / "none", PruneOptions(ratio=0.3, calibration=spec))
    assert not (tmp_path / "none").exists()


def test_replayed_plan_streams(folders, calib_file, tmp_path):
    _both(folders["mistral"], tmp_path, _opts(calib_file, allocation="global"))
    prune(str(folders["mistral"]), tmp_path / "replayed", _opts(calib_file), plan_path=tmp_path / "memory")
    assert _plan(tmp_path / "replayed")["layers"] == _plan(tmp_path / "memory")["layers"]
    ids = sample_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "replayed")(ids).logits, load_pruned(tmp_path / "memory")(ids).logits)


def test_auto_bounds():
    plans = {k: k for k in range(29)}
    assert list(thin_candidates(plans)) == [0, 7, 14, 21, 28]
    assert list(thin_candidates({0: 0, 1: 1, 2: 2})) == [0, 1, 2]
    batches = [torch.zeros(8, 128, dtype=torch.long)] * 4
    assert [b.shape for b in auto_rows(batches)] == [torch.Size([8, 128])]
    assert [b.shape for b in auto_rows(batches, tokens=1500)] == [torch.Size([8, 128]), torch.Size([3, 128])]
    assert [b.shape for b in auto_rows([torch.zeros(2, 4000, dtype=torch.long)])] == [torch.Size([1, 4000])]
