"""The library end to end in a page: prune -> load -> export -> bench, the same steps as the CLI's commands.

    python examples/python_api.py                                  # SmolLM2-135M (embedded), 30%: two ~4-min exports on 2 cores
    python examples/python_api.py path/to/model --ratio 0.2 --out out/api --calib-samples 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from amp_edge import CalibrationSpec, load_pruned
from amp_edge.pruning.pipeline import PruneOptions, prune
from exporters import ExportOptions, export
from runtime_bench.bench import BenchSpec, run_bench
from runtime_bench.report import markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2-135m", help="short name, local folder, .gguf or hub id")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path("out/python-api"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    # 1. prune: score heads and neurons with AMP on calibration text the model writes itself, save the compact model
    opts = PruneOptions(ratio=args.ratio, calibration=CalibrationSpec(num_samples=args.calib_samples, seq_len=args.calib_seq_len))
    result = prune(args.model, args.out / "pruned", opts)
    print(f"pruned: {result.params_before:,} -> {result.params_after:,} parameters in {result.seconds:.0f} s")

    # 2. load: a pruned checkpoint is a transformers model (load_pruned also handles per-layer sizes)
    model = load_pruned(args.out / "pruned")
    ids = torch.tensor([[1, 2, 3, 4]]) % model.config.vocab_size
    print("greedy tokens from PyTorch:", model.generate(ids, max_new_tokens=8, do_sample=False)[0, 4:].tolist())
    del model

    # 3. export: ONNX with KV cache, validated against PyTorch; the dense model too, as the bench's baseline
    dense = export(args.model, args.out / "dense-fp32", ExportOptions(ratio=0))
    pruned = export(str(args.out / "pruned"), args.out / "pruned-fp32", ExportOptions())
    print(f"parity: max |dlogits| {pruned.manifest['parity']['max_abs_diff']:.2e}, "
          f"graph {dense.manifest['onnx_bytes'] / 2**20:.1f} -> {pruned.manifest['onnx_bytes'] / 2**20:.1f} MiB")

    # 4. bench: each package in its own torch-free worker process, interleaved; the first is the baseline
    spec = BenchSpec(threads=2, prompt_lens=(args.prompt_len,), gen_len=args.gen_len, repeat=args.repeat, warmup=1)
    report = run_bench([dense.out, pruned.out], spec)
    print(markdown(report))


if __name__ == "__main__":
    main()
