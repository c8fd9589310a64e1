"""The least-squares refit: exact when nothing is removed, lower reconstruction error than plain slicing for
every layer and family (biases included), recorded with the checkpoint, and bad options refused in one line."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from amp_edge import PruningPlan, allocate, apply_plan, get_adapter, score
from amp_edge.cli import app
from amp_edge.errors import InvalidOptionError
from amp_edge.pruning.refit import RefitSpec, load_refitted, refit_weights

from .tiny import FAMILIES, sample_ids, tiny_model


def _batches(n=4, length=48):
    return [sample_ids(8, length, seed=s) for s in range(n)]


def _layer_io(model, batches):
    """Per layer: the inputs of o_proj and down_proj on the dense model, concatenated over the batches."""
    adapter = get_adapter(model)
    got = {}
    mods = {(i, kind): m for i in range(adapter.num_layers) for kind, m in (("o", adapter.o_proj(i)), ("down", adapter.down_proj(i)))}
    hooks = [m.register_forward_pre_hook(lambda _m, a, key=key: got.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for key, m in mods.items()]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def test_keep_all_plan_refits_to_the_same_logits():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = sample_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    weights = refit_weights(adapter, PruningPlan.keep_all(adapter), _batches(), damp=1e-8)
    load_refitted(adapter, weights)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_lowers_each_layers_reconstruction_error(family):
    dense = tiny_model(family)
    adapter = get_adapter(dense)
    plan = allocate(adapter, score("random", adapter, seed=1), 0.3, "uniform", "query", min_keep=0.25)
    calib = _batches()
    io = _layer_io(dense, calib)  # the dense model's own inputs: what the fit sees
    weights = refit_weights(adapter, plan, calib, damp=1e-4)
    sliced = apply_plan(copy.deepcopy(dense), plan)
    hd = adapter.head_dim
    for i, (lp, r) in enumerate(zip(plan.layers, weights)):
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in lp.q_heads])
        for kind, keep, w, b in (("o", cols, r.o_weight, r.o_bias), ("down", torch.tensor(lp.neurons), r.down_weight, r.down_bias)):
            full = adapter.o_proj(i) if kind == "o" else adapter.down_proj(i)
            cut = get_adapter(sliced).o_proj(i) if kind == "o" else get_adapter(sliced).down_proj(i)
            x = io[(i, kind)]
            with torch.no_grad():
                target = full(x)
                plain = (cut(x[:, keep]) - target).pow(2).mean()
                fitted = (torch.nn.functional.linear(x[:, keep], w, b) - target).pow(2).mean()
            assert (b is None) == (full.bias is None)
            assert fitted < plain, (family, i, kind, float(fitted), float(plain))


def test_refit_lowers_the_pruned_models_distance_to_dense():
    dense = tiny_model("llama")
    adapter = get_adapter(dense)
    plan = allocate(adapter, score("amp", adapter, _batches()), 0.3, "uniform", "query", min_keep=0.25)
    weights = refit_weights(adapter, plan, _batches(8), damp=1e-4)
    plain = apply_plan(copy.deepcopy(dense), plan)
    fitted = apply_plan(copy.deepcopy(dense), plan)
    load_refitted(get_adapter(fitted), weights)
    ids = sample_ids(4, 48, seed=99)  # held out
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        err_plain = (plain(input_ids=ids).logits - ref).pow(2).mean()
        err_fit = (fitted(input_ids=ids).logits - ref).pow(2).mean()
    assert err_fit < 0.97 * err_plain, (float(err_fit), float(err_plain))  # random weights: little to recover (SmolLM2: ppl 389 -> 73)


def test_refit_spec_is_checked():
    with pytest.raises(InvalidOptionError, match="damp must be > 0, got 0"):
        RefitSpec(damp=0).check()
    with pytest.raises(InvalidOptionError, match="num_samples must be >= 1, got 0"):
        RefitSpec(num_samples=0).check()


runner = CliRunner()


def test_prune_refit_cli_records_the_fit(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "refit"
    res = runner.invoke(app, [str(a) for a in ("prune", tiny_dir, "--ratio", 0.3, "--calib", calib_file, "--calib-samples", 8,
                                                "--calib-seq-len", 32, "--refit", "--refit-samples", 16, "--refit-seq-len", 32,
                                                "--out", out, "--json")])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["refit"]["tokens"] == 16 * 32 and info["refit"]["damp"] == 3e-4
    saved = json.loads((out / "amp_edge_recovery.json").read_text())
    assert saved["refit"] == info["refit"]
    plain = tmp_path / "plain"
    res = runner.invoke(app, [str(a) for a in ("prune", tiny_dir, "--plan", out / "amp_edge_plan.json", "--out", plain)])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM
    a, b = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(plain)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)  # only the output projections moved
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_prune_refit_bad_damp_is_one_line(tiny_dir, calib_file, tmp_path):
    res = runner.invoke(app, [str(a) for a in ("prune", tiny_dir, "--calib", calib_file, "--refit", "--refit-damp", -1,
                                                "--out", tmp_path / "x")])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "refit damp must be > 0, got -1" in lines[0], res.output
    assert not (tmp_path / "x").exists()


def test_export_with_ratio_and_refit_records_it_and_refuses_a_replayed_reference(tiny_dir, calib_file, tmp_path):
    from amp_edge.errors import PackageError
    from amp_edge.models.reference import model_from_package

    pkg = tmp_path / "pkg"
    res = runner.invoke(app, [str(a) for a in ("export", tiny_dir, "--ratio", 0.3, "--calib", calib_file, "--calib-samples", 8,
                                                "--calib-seq-len", 32, "--refit", "--out", pkg, "--json")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((pkg / "amp_edge.json").read_text())
    assert manifest["refit"]["tokens"] > 0 and manifest["parity"]["ok"]
    with pytest.raises(PackageError, match="refitted while exporting"):
        model_from_package(pkg)
