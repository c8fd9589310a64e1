"""Seconds, page faults and peak RSS of distillation steps, with glibc's heap as the CLI leaves it (large buffers
mmapped, so every step's logits and gradients are fresh pages) and as recovery holds it (amp_edge.memory.
heap_for_training_loop: freed buffers kept for the next step). Both phases in one process, one after the other,
on the same batch, so the ratio is what to read on a shared box. Then the seconds one save of the resumable training
state takes (weights + AdamW moments, written beside the student as `prune` does), and what share of the training
time it costs saved every 10 steps (the old default) or every 5 minutes (today's).

    python benchmarks/recovery_step.py out/g30-r0 gemma3-270m --steps 4
    python benchmarks/recovery_step.py PRUNED_FOLDER DENSE_SOURCE [--steps N] [--batch 4] [--seq-len 256] [--json]

PRUNED_FOLDER is the student (an `amp-edge prune --out` folder), DENSE_SOURCE the teacher (copied to bf16 where the
CPU trains in bf16, as `prune` does). The first two steps of each phase warm up and are not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("student")
    ap.add_argument("teacher")
    ap.add_argument("--steps", type=int, default=4, help="counted steps per phase (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from amp_edge.memory import cap_heap_growth, heap_for_training_loop
    from amp_edge.models.sources import load_model
    from amp_edge.recovery import train

    cap_heap_growth()  # what the CLI does at start
    student = load_model(args.student).model
    spec = train.usable_precision(train.RecoverySpec(method="distill", steps=1000, batch_size=args.batch,
                                                     seq_len=args.seq_len, precision="auto"), torch.device("cpu"))
    teacher = load_model(args.teacher).model.eval()
    if spec.precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    vocab = student.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model, params = train._trainable(student, spec)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-6, fused=True)  # tiny lr: later steps stay comparable
    workspace = train.KLWorkspace()
    report = {"student": args.student, "teacher": args.teacher, "precision": spec.precision,
              "tokens_per_step": args.batch * args.seq_len, "phases": {}}
    for phase, heap in (("heap capped (mmapped buffers)", nullcontext), ("heap held (recovery)", heap_for_training_loop)):
        rows = []
        with heap():
            for step in range(2 + args.steps):
                before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                train._step(model, teacher, params, optimizer, ids, spec, workspace)
                after = resource.getrusage(resource.RUSAGE_SELF)
                rows.append((time.perf_counter() - start, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
                if not args.json:
                    print(f"{phase:30s} step {step}: {rows[-1][0]:6.2f} s, {rows[-1][1]:>9,} page faults, "
                          f"{rows[-1][2]:5.1f} s in the kernel", flush=True)
        counted = rows[2:]
        report["phases"][phase] = {"seconds_per_step": statistics.median(r[0] for r in counted),
                                   "page_faults_per_step": statistics.median(r[1] for r in counted),
                                   "kernel_seconds_per_step": statistics.median(r[2] for r in counted),
                                   "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    capped, held = report["phases"].values()
    report["speedup"] = capped["seconds_per_step"] / held["seconds_per_step"]
    report["state_save"] = _time_saves(Path(args.student).resolve().parent, params, optimizer, held["seconds_per_step"])
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for phase, r in report["phases"].items():
        print(f"{phase:30s} median {r['seconds_per_step']:.2f} s/step, {r['page_faults_per_step']:,.0f} faults, "
              f"{r['kernel_seconds_per_step']:.1f} s kernel, peak RSS so far {r['peak_rss_gb']:.2f} GB")
    print(f"held / capped: {report['speedup']:.2f}x faster per step ({spec.precision}, {report['tokens_per_step']} tokens)")
    save = report["state_save"]
    print(f"state save: {save['seconds']:.1f} s for {save['gb']:.2f} GB; share of training time saved every 10 steps "
          f"{save['share_every_10_steps']:.1%}, every 5 minutes {save['share_every_5_minutes']:.1%}")


def _time_saves(where: Path, params, optimizer, step_seconds: float, repeats: int = 2) -> dict:
    """Median seconds of ``save_state`` (atomic safetensors + fsync) into a scratch folder beside the student."""
    from amp_edge.recovery.state import STATE_FILE, ResumeState, save_state

    seconds = []
    with tempfile.TemporaryDirectory(dir=where, prefix=".save-bench-") as folder:
        for _ in range(repeats):
            start = time.perf_counter()
            save_state(folder, params, optimizer, ResumeState(step=1, losses=[0.0], meta={}))
            seconds.append(time.perf_counter() - start)
        size = (Path(folder) / STATE_FILE).stat().st_size
    s = statistics.median(seconds)
    return {"seconds": s, "gb": size / 1e9, "share_every_10_steps": s / (10 * step_seconds + s),
            "share_every_5_minutes": s / (300 + s)}


if __name__ == "__main__":
    main()
