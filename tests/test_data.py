"""Calibration sources and the perplexity function."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

from amp_edge import CalibrationSpec, calibration_batches, perplexity
from amp_edge.data.calibration import generate_rows
from amp_edge.errors import CalibrationError, DataError, InvalidOptionError
from amp_edge.evaluation.perplexity import read_eval_text

from .tiny import char_tokenizer, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def _rows(batches):
    return torch.cat(batches)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "alpaca"])
def test_file_sources_give_full_samples(tmp_path, kind):
    path = {"txt": tmp_path / "c.txt", "jsonl": tmp_path / "c.jsonl", "alpaca": tmp_path / "c.json"}[kind]
    if kind == "txt":
        path.write_text("\n\n".join([TEXT] * 5))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": TEXT, "id": i}) for i in range(5)))
    else:
        path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": TEXT}] * 5))
    spec = CalibrationSpec(str(path), num_samples=6, seq_len=32, batch_size=4)
    rows = _rows(calibration_batches(spec, None, char_tokenizer()))
    assert rows.shape == (6, 32)
    assert [len(b) for b in calibration_batches(spec, None, char_tokenizer())] == [4, 2]
    if kind == "alpaca":
        decoded = char_tokenizer().decode(rows.flatten().tolist())
        assert "Say hi." in decoded


def test_hub_style_dataset_folder_loads_through_datasets(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(8)))
    spec = CalibrationSpec(str(tmp_path / "ds"), num_samples=4, seq_len=16)
    assert _rows(calibration_batches(spec, None, char_tokenizer())).shape == (4, 16)


def test_self_generated_calibration_is_seeded_and_full_length():
    model, tok = tiny_model("llama"), char_tokenizer()
    spec = CalibrationSpec("self", num_samples=3, seq_len=10, batch_size=2, seed=5)
    a, b = _rows(calibration_batches(spec, model, tok)), _rows(calibration_batches(spec, model, tok))
    assert a.shape == (3, 10) and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()


@pytest.mark.parametrize("config, rows, long_rows", [
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims; 256 tokens fill 11.8 MB a row, so the cap of 128 rows binds
    (LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152), 128, 2),
    # Phi-3-mini: 32 layers x 32 KV heads x 96 dims, 201 MB a row: 10 rows in 2 GiB
    (Phi3Config(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, intermediate_size=8192,
                vocab_size=32064), 10, 1),
])
def test_generate_rows_keep_the_kv_cache_within_budget(config, rows, long_rows):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert generate_rows(model, 256) == rows
    assert generate_rows(model, 256 * 64) == long_rows  # 16k tokens: 2 rows of 754 MB; one of 12.9 GB, never 0


@pytest.mark.parametrize("content, match", [
    ("", "holds no text"), ("{not json", "not valid JSON"), ('{"title": "x"}', "none of the fields"),
])
def test_bad_calibration_files(tmp_path, content, match):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        calibration_batches(CalibrationSpec(str(path)), None, char_tokenizer())


def test_missing_and_short_calibration(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        calibration_batches(CalibrationSpec(str(tmp_path / "nope.txt")), None, char_tokenizer())
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(CalibrationError, match="fewer than one sample"):
        calibration_batches(CalibrationSpec(str(tmp_path / "short.txt"), seq_len=64), None, char_tokenizer())
    with pytest.raises(InvalidOptionError, match="num_samples"):
        calibration_batches(CalibrationSpec("self", num_samples=0), None, char_tokenizer())


def test_perplexity_matches_cross_entropy_of_disjoint_windows():
    model, tok = tiny_model("llama"), char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    res = perplexity(model, tok, TEXT, window=40, max_tokens=80)
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin in (0, 40):
            chunk = ids[:, begin:begin + 40]
            logits = model(input_ids=chunk).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            n += 39
    assert res.tokens == n and res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    overlapped = perplexity(model, tok, TEXT, window=40, stride=10, max_tokens=80)
    assert overlapped.tokens == 79  # every token after the first is scored exactly once


def test_perplexity_bad_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_eval_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_eval_text(tmp_path / "empty.txt")
    with pytest.raises(InvalidOptionError, match="stride"):
        perplexity(tiny_model("llama"), char_tokenizer(), TEXT, window=16, stride=32)


@pytest.mark.parametrize("capped, calls", [(True, [32 << 20, 4 << 20]), (False, [])])
def test_generation_lifts_the_mmap_cap_only_where_the_cli_set_it(monkeypatch, capped, calls):
    from amp_edge import memory

    seen = []
    monkeypatch.setenv(memory.HEAP_CAP_ENV, "on" if capped else "off")
    monkeypatch.setattr(memory, "_set_mmap_threshold", lambda n: seen.append(n) or True)
    spec = CalibrationSpec("self", num_samples=2, seq_len=6, batch_size=2)
    calibration_batches(spec, tiny_model("llama"), char_tokenizer())
    assert seen == calls  # one generate() call: lifted to 32 MiB, then back to 4 MiB
