"""--device-map: layers placed through accelerate (tested with the CPU and disk offload, the devices CI has)."""

import json

import pytest
import torch

from amp_edge.errors import InvalidOptionError
from amp_edge.models.placement import devices_of, parse_device_map
from amp_edge.models.sources import load_model
from tests.tiny import sample_ids


def _split_map(tmp_path):
    """Embeddings and layer 0 on the CPU, layers 1-2 and the rest offloaded to disk."""
    mapping = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
               "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    return path


def test_placed_model_computes_what_the_whole_one_does(tiny_dir, tmp_path):
    plain = load_model(str(tiny_dir)).model
    placed = load_model(str(tiny_dir), device_map=str(_split_map(tmp_path))).model
    where = devices_of(placed)
    assert where.get("meta", 0) > 0  # two layers really live on disk, not in memory
    ids = sample_ids()
    with torch.no_grad():
        diff = (plain(ids).logits - placed(ids).logits).abs().max().item()
    assert diff < 1e-5


def test_auto_on_a_cpu_machine_keeps_every_layer_on_the_cpu(tiny_dir):
    placed = load_model(str(tiny_dir), device_map="auto").model
    assert set(devices_of(placed)) == {"cpu"}


@pytest.mark.parametrize("bad, why", [
    ("cuda:3", "CUDA device"), ("tpu", "unknown device"), ("missing.json", "not a readable JSON map"),
])
def test_bad_maps_are_refused_in_one_line(bad, why):
    if bad.startswith("cuda") and torch.cuda.device_count() > 3:
        pytest.skip("this machine has that GPU")
    with pytest.raises(InvalidOptionError, match=why):
        parse_device_map(bad)


def test_a_gguf_source_with_a_map_is_refused_before_loading(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InvalidOptionError, match="not the GGUF"):
        load_model(str(gguf), device_map="auto")


def test_ppl_with_a_map_equals_ppl_without(tiny_dir, tmp_path):
    from tests.conftest import run_cli

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    runs = [run_cli("ppl", tiny_dir, "--data", text, "--window", 64, "--json", *extra)
            for extra in ((), ("--device-map", _split_map(tmp_path)))]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1])["perplexity"] for r in runs)
    assert abs(a - b) < 1e-4 * a


def test_a_missing_gpu_is_one_line_from_the_cli(tiny_dir, tmp_path):
    from tests.conftest import run_cli

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 40)
    r = run_cli("ppl", tiny_dir, "--data", text, "--device-map", "cuda:7")
    assert r.exit_code == 2 and "CUDA device" in r.output and "Traceback" not in r.output
