"""Wall time and peak memory of prune and export against depth, on random-weight checkpoints of real shapes.

    python -m benchmarks.scale --shape phi-3-mini --layers 8,16,32 --out results/scale
    python -m benchmarks.scale --shape llama-3.1-8b --layers 32 --steps prune,export-int4 --out results/scale

Each step runs the amp-edge command line in its own process (its peak RSS is that process's, from wait4), with the
default options unless ``--prune-args`` / ``--export-args`` add some. Checkpoints are written once by
benchmarks.synth into ``--work`` and reused. Appends one JSON line per step to OUT/runs.jsonl and rewrites
OUT/table.md from all the lines there (and OUT/memory_vs_depth.png when matplotlib is present).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("prune", "export-int4", "export-fp16", "export-dense-int4")


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``, its output to ``log``; wall seconds, peak RSS (of the process and its waited-for children), rc."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),
            "rc": proc.returncode, "command": shlex.join(cmd)}


def ensure_checkpoint(shape: str, layers: int, work: Path) -> Path:
    folder = work / f"{shape}-{layers}"
    if not (folder / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.synth", "--shape", shape, "--layers", str(layers),
                        "--out", str(folder), "--overwrite"], check=True)
    return folder


def step_command(step: str, src: Path, pruned: Path, work: Path, args) -> tuple[list[str], Path]:
    amp = [sys.executable, "-m", "amp_edge.cli"]
    if step == "prune":
        return amp + ["prune", str(src), "--ratio", str(args.ratio), "--out", str(pruned), "--overwrite",
                      *shlex.split(args.prune_args)], pruned
    if step == "export-dense-int4":  # the dense package, for the bench's dense vs pruned comparison
        out = work / f"{src.name}-dense-int4"
        return amp + ["export", str(src), "--ratio", "0", "--dtype", "int4", "--out", str(out), "--overwrite",
                      "--min-top1", "0", *shlex.split(args.export_args)], out
    if step.startswith("export-"):
        dtype = step.split("-", 1)[1]
        out = work / f"{pruned.name}-{dtype}"
        return amp + ["export", str(pruned), "--dtype", dtype, "--out", str(out), "--overwrite", "--min-top1", "0",
                      *shlex.split(args.export_args)], out
    raise SystemExit(f"unknown step {step!r}; choose from {', '.join(STEPS)}")


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| shape | layers | step | wall | peak RSS | rc | output |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['output_gb']:.2f} GB" if r.get("output_gb") is not None else ""
        lines.append(f"| {r['shape']} | {r['layers']} | {r['step']} | {r['seconds'] / 60:.1f} min | {r['peak_rss_gb']:.2f} GB "
                     f"| {r['rc']} | {size} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["shape"], r["step"]) for r in rows if r["rc"] == 0}):
        pts = sorted((r["layers"], r["peak_rss_gb"]) for r in rows if (r["shape"], r["step"]) == key and r["rc"] == 0)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory_vs_depth.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="phi-3-mini")
    ap.add_argument("--layers", default="8,16,32")
    ap.add_argument("--steps", default="prune,export-int4,export-fp16")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--prune-args", default="", help="extra options for amp-edge prune, one string")
    ap.add_argument("--export-args", default="", help="extra options for amp-edge export, one string")
    ap.add_argument("--work", type=Path, default=Path("/tmp/amp-edge-scale"), help="checkpoints and packages (large)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and packages written")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    for layers in (int(n) for n in args.layers.split(",")):
        src = ensure_checkpoint(args.shape, layers, args.work)
        pruned = args.work / f"{args.shape}-{layers}-p{int(args.ratio * 100)}"
        for step in steps:
            cmd, target = step_command(step, src, pruned, args.work, args)
            log = args.out / f"{args.shape}-{layers}-{step}.log"
            print(f"{args.shape} x {layers} layers: {step} ...", file=sys.stderr, flush=True)
            r = run_measured(cmd, log)
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) if target.is_dir() else None
            row = {"shape": args.shape, "layers": layers, "step": step, **r,
                   "output_gb": round(size / 1e9, 3) if size is not None else None,
                   "machine": f"{platform.machine()} {os.cpu_count()} cpus", "log": log.name}
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {r['seconds'] / 60:.1f} min, peak RSS {r['peak_rss_gb']:.2f} GB, rc {r['rc']}", file=sys.stderr, flush=True)
            if r["rc"] != 0:
                break
        if not args.keep:
            for p in [*args.work.glob(f"{args.shape}-{layers}-p*"), args.work / f"{src.name}-dense-int4"]:
                shutil.rmtree(p, ignore_errors=True)
    write_table(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
