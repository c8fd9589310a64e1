"""``python -m runtime_bench PKG... --out DIR``: the bench without amp-edge, torch or transformers, for a device.

It needs onnxruntime and numpy only (with the onnx package the report also gets the bytes-read limit). It writes the
same bench.json as ``amp-edge bench --out DIR`` (and bench.md; no chart, so no matplotlib); bring bench.json back and
put it next to the desktop's rows with ``amp-edge bench PKG... --out DIR --compare-json bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from amp_edge_runtime.errors import BenchError
from runtime_bench.bench import BenchSpec, run_bench
from runtime_bench.report import markdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime_bench", description="Latency and memory of ONNX packages (torch-free).")
    p.add_argument("packages", nargs="+", help="package folders; the first is the baseline for ratios")
    p.add_argument("--out", required=True, type=Path, help="folder for bench.json and bench.md")
    p.add_argument("--provider", default="cpu", help="cpu | cuda | openvino | webgpu (plugin EPs: pip install amp-edge[openvino] or [webgpu])")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument("--prompt-len", default="128,512", help="prompt lengths, comma-separated")
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    try:
        lens = tuple(int(x) for x in args.prompt_len.split(",") if x.strip())
    except ValueError:
        return _fail(f"--prompt-len must be integers separated by commas, got {args.prompt_len!r}")
    if args.out.exists() and not args.overwrite:
        return _fail(f"output {args.out} already exists; pass --overwrite to replace it")
    spec = BenchSpec(args.provider, args.threads, lens, args.gen_len, args.batch, args.repeat, args.warmup)
    try:
        report = run_bench(args.packages, spec, progress=_progress)
    except BenchError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    print(file=sys.stderr)
    _write(report, args.out)
    print(markdown(report))
    return 0


def _write(report: dict, out: Path) -> None:
    """Into a temporary folder first, so an interrupted run never leaves half a report."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    (tmp / "bench.json").write_text(json.dumps(report, indent=1))
    (tmp / "bench.md").write_text(markdown(report))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _progress(done: int, total: int) -> None:
    print(f"\rbenchmarking {done}/{total}", end="", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
