"""The paper-style table: criterion x ratio x allocation x (no recovery, recovery) -> WikiText-2 perplexity,
zero-shot accuracy on every task and the averages, parameters, and decode ms/token.

Every model goes through the product's own commands: `amp-edge prune` (with `--recover ...` for the recovery
rows), `amp-edge export` (fp32, validated against PyTorch), `amp-edge eval` on the exported package (its scores
equal its PyTorch source's, see tests/test_eval.py, and it runs faster than lm-eval's HF model on CPU), and one
interleaved `amp-edge bench` of every package at the end. Finished steps are kept under --work, so an interrupted
run resumes where it stopped.

    python benchmarks/eval_comparison.py --model smollm2-135m --criteria amp,random,magnitude,wanda-sp \
        --ratios 0.2,0.3 --allocations uniform,global --recover "--recover distill --recover-steps 300" \
        --limit 200 --max-tokens 32768 --work out/eval_work --out results/eval_smollm2_135m
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from amp_edge.evaluation.compare import Delta, delta
from amp_edge.evaluation.tasks import PAPER_AVERAGE

DATA_DIR = Path(os.environ.get("AMP_EDGE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"]


def amp(*args: str, log: Path) -> None:
    """One amp-edge command; its output goes to ``log``, a failure stops the table with that log's tail."""
    cmd = [str(Path(sys.executable).with_name("amp-edge")), *args]
    print("$", shlex.join(["amp-edge", *args]), flush=True)
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(args[:2])}; see {log}:\n" + "".join(open(log).readlines()[-5:]))


@contextmanager
def row_lock(work: Path, name: str):
    """One process at a time per row of a --work folder: a second run of the table (another ratio's, a --finished-only)
    waits for the row's prune/export/eval in progress and then reuses it, instead of writing the same files."""
    with open(work / f"{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting: another process is building row {name} in {work}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(row: dict, args, work: Path) -> Path:
    """prune (+ recovery) -> export; returns the package folder (reused when it is already there)."""
    name = row["name"]
    pkg = work / f"{name}-pkg"
    if (pkg / "amp_edge.json").is_file():
        return pkg
    log = work / f"{name}.log"
    if row["criterion"] == "dense":
        amp("export", args.model, "--ratio", "0", "--out", str(pkg), "--overwrite", log=log)
        return pkg
    ckpt = work / f"{name}-ckpt"
    if not (ckpt / "amp_edge_plan.json").is_file():
        t0 = time.perf_counter()
        cmd = ["prune", args.model, "--ratio", str(row["ratio"]), "--criterion", row["criterion"], "--allocation",
               row["allocation"], "--heads", row["heads"], "--calib", args.calib, "--seed", str(args.seed), "--out", str(ckpt), "--overwrite", *shlex.split(args.prune_args)]
        amp(*cmd, *(shlex.split(row["recipe"]) if row["recovery"] else []), log=log)
        (work / f"{name}.prune_seconds").write_text(f"{time.perf_counter() - t0:.1f}")
    amp("export", str(ckpt), "--out", str(pkg), "--overwrite", *shlex.split(args.export_args), log=log)
    return pkg


def evaluate(row: dict, pkg: Path, args, work: Path) -> dict:
    out = work / f"{row['name']}-eval"
    if not (out / "eval.json").is_file():
        tokens = ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []
        amp("eval", str(pkg), "--tasks", ",".join(["wikitext2", *args.tasks]), "--limit", str(args.limit), *tokens,
            "--window", str(args.window), "--data-dir", str(args.data_dir), "--out", str(out), "--overwrite", log=work / f"{row['name']}.log")
    return json.loads((out / "eval.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--criteria", default="amp,random,magnitude,wanda-sp")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--allocations", default="uniform")
    ap.add_argument("--heads", default="auto", help="head rules (prune --heads), comma-separated; rows other than auto's are "
                    "named with the rule, e.g. amp-0.3-uniform-proportional")
    ap.add_argument("--heads-criteria", default="amp", help="criteria that get the head rules other than the first "
                    "(uniform allocation only)")
    ap.add_argument("--recover", action="append", default=[], help='prune options of a recovery recipe, e.g. "--recover distill '
                    '--recover-steps 300"; repeat it for several recipes (a row each); none: no recovery rows')
    ap.add_argument("--prune-args", default="", help='extra prune options for every row, e.g. "--ratio-of layers"')
    ap.add_argument("--export-args", default="", help='extra export options, e.g. "--max-abs-diff 2e-3"')
    ap.add_argument("--recover-criteria", default="amp", help="criteria that also get a recovery row")
    ap.add_argument("--recover-ratios", default="", help="ratios that get recovery rows (default: all of --ratios)")
    ap.add_argument("--global-criteria", default="", help="criteria that get the non-uniform allocations (default: all)")
    ap.add_argument("--calib", default=str(DATA_DIR / "calibration" / "c4_demo.jsonl"))
    ap.add_argument("--data-dir", default=str(DATA_DIR))
    ap.add_argument("--tasks", default=",".join(TASKS), help="zero-shot tasks (default: all seven); the table shows - for "
                    "the others and avg7 only when all seven ran")
    ap.add_argument("--limit", type=int, default=200, help="documents per zero-shot task (first N of the validation split)")
    ap.add_argument("--max-tokens", type=int, default=32768, help="WikiText-2 test tokens scored (disjoint windows); 0: the whole file")
    ap.add_argument("--window", type=int, default=1024, help="WikiText-2 window (tokens each forward pass sees)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench-prompt", default="128")
    ap.add_argument("--bench-repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="out/eval_work")
    ap.add_argument("--out", default="results/eval_comparison")
    ap.add_argument("--rows-only", action="store_true", help="build and evaluate the rows, then stop (no bench, no table)")
    ap.add_argument("--finished-only", action="store_true",
                    help="build nothing: bench and tabulate the rows already evaluated under --work, list the others as not run")
    args = ap.parse_args()
    args.tasks = [t for t in TASKS if t in args.tasks.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    rows = plan_rows(args)
    args.not_run = []
    if args.finished_only:
        args.not_run = [r["name"] for r in rows if not (work / f"{r['name']}-eval" / "eval.json").is_file()]
        rows = [r for r in rows if r["name"] not in args.not_run]

    start = time.perf_counter()
    for row in rows:
        with row_lock(work, row["name"]):
            pkg = build(row, args, work)
            report = evaluate(row, pkg, args, work)
        manifest = json.loads((pkg / "amp_edge.json").read_text())
        row.update(package=str(pkg), params=manifest["params"]["after"], eval=report, heads_removed=heads_removed(manifest))
        seconds = work / f"{row['name']}.prune_seconds"
        row["prune_seconds"] = float(seconds.read_text()) if seconds.is_file() else None
        print(json.dumps({k: row[k] for k in ("name", "params")} | {"ppl": report["tasks"]["wikitext2"]["perplexity"],
                          "paper5": report["average"]["paper5_acc"]}), flush=True)

    if args.rows_only:
        return
    bench_dir = work / "bench"
    packages = [r["package"] for r in rows]
    if not (bench_dir / "bench.json").is_file() or _benched(bench_dir) != packages:  # a new row: bench them all again
        amp("bench", *(r["package"] for r in rows), "--threads", str(args.threads), "--prompt-len", args.bench_prompt,
            "--repeat", str(args.bench_repeat), "--gen-len", "64", "--out", str(bench_dir), "--overwrite", log=work / "bench.log")
    bench = json.loads((bench_dir / "bench.json").read_text())
    decode = {b["path"]: b["decode_ms_mean"] for b in bench["rows"] if b["kind"] == "onnx"}
    for row in rows:
        row["decode_ms"] = decode.get(row["package"])
        if row["criterion"] != "dense":  # rows[0] is the dense model
            row["delta_avg5"] = asdict(delta(row["eval"]["tasks"], rows[0]["eval"]["tasks"], PAPER_AVERAGE))

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    command = "python benchmarks/eval_comparison.py " + shlex.join(sys.argv[1:])
    (tmp / "eval_comparison.json").write_text(json.dumps({"command": command, "rows": rows, "bench_environment": bench["environment"],
                                                           "seconds": time.perf_counter() - start}, indent=1))
    (tmp / "eval_comparison.md").write_text(table(rows, args, command, bench["environment"]))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print((out / "eval_comparison.md").read_text())


def plan_rows(args) -> list[dict]:
    """The table's rows. A recovery row's name carries a hash of its recipe, so a new recipe never reuses
    a checkpoint trained with another one."""
    ratios = [float(r) for r in args.ratios.split(",")]
    rec_ratios = [float(r) for r in args.recover_ratios.split(",")] if args.recover_ratios else ratios
    non_uniform = args.global_criteria.split(",") if args.global_criteria else None
    rules = args.heads.split(",")
    rows = [{"name": "dense", "criterion": "dense", "ratio": 0.0, "allocation": "-", "heads": "-", "recovery": False}]
    for criterion in args.criteria.split(","):
        for ratio in ratios:
            for allocation in args.allocations.split(","):
                if allocation != "uniform" and non_uniform is not None and criterion not in non_uniform:
                    continue
                more_rules = criterion in args.heads_criteria.split(",") and allocation == "uniform"  # the paper's setting
                for heads in rules if more_rules else rules[:1]:
                    name = f"{criterion}-{ratio:g}-{allocation}" + ("" if heads == "auto" else f"-{heads}")
                    base = {"criterion": criterion, "ratio": ratio, "allocation": allocation, "heads": heads}
                    rows.append({"name": name, **base, "recovery": False})
                    if criterion not in args.recover_criteria.split(",") or ratio not in rec_ratios:
                        continue
                    for recipe in args.recover:
                        tag = hashlib.sha1(recipe.encode()).hexdigest()[:6]
                        rows.append({"name": f"{name}-rec-{tag}", **base, "recovery": True, "recipe": recipe})
    return rows


def recipe_label(recipe: str) -> str:
    """'refit + distill 120 x c4_demo+alpaca_en_demo' from the recipe's options."""
    opts = shlex.split(recipe)
    value = lambda flag, default: opts[opts.index(flag) + 1] if flag in opts[:-1] else default  # noqa: E731
    parts = ["refit"] if "--refit" in opts else []
    if "--recover" in opts:
        data = "+".join(Path(d).stem for d in value("--recover-data", "calib").split(","))
        parts.append(f"{value('--recover', '?')} {value('--recover-steps', '')} x {data}")
    return " + ".join(parts) or "?"


def heads_removed(manifest: dict) -> tuple[int, int]:
    """(query heads removed, query heads before), over all layers, from the package's plan."""
    plan = manifest.get("plan") or {}
    before = sum(s["num_heads"] for s in plan.get("original_shapes", []))
    return before - sum(len(layer["q_heads"]) for layer in plan.get("layers", [])), before


def _benched(bench_dir: Path) -> list[str]:
    report = json.loads((bench_dir / "bench.json").read_text())
    return list(dict.fromkeys(b["path"] for b in report["rows"] if b["kind"] == "onnx"))


def _delta_cell(d: dict | None) -> str:
    return "-" if d is None else Delta(**d).cell() + ("" if d["paired"] else " †")


def table(rows: list[dict], args, command: str, env: dict) -> str:
    head = ["criterion", "ratio", "alloc", "heads removed", "recovery", "params", "wikitext2 ppl", *TASKS, "avg5", "avg7", "Δavg5 vs dense", "decode ms/tok",
            "prune s", "eval s"]
    lines = [f"# Zero-shot accuracy (acc, %) and perplexity of {args.model}, pruned", "",
             f"Command: `{command}`", "",
             f"Validation splits, first {args.limit} documents of each task, or all of a shorter split "
             f"(lm-evaluation-harness prompts, acc); "
             f"WikiText-2 test perplexity over {f'the first {args.max_tokens} tokens' if args.max_tokens else 'the whole file'} "
             f"(window {args.window}, disjoint windows); scores "
             f"of the exported fp32 ONNX package. avg5 = PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c (the paper's average); "
             f"avg7 = all seven tasks. Decode: fp32, prompt {args.bench_prompt}, 64 new tokens, {args.threads} threads, "
             f"{env.get('cpu', '')}.", "",
             *[f"Recovery `{recipe_label(r)}`: `amp-edge prune ... {r}`." for r in args.recover], "",
             "heads removed: `prune --heads` rule and the query heads removed over all layers (auto: the count per layer "
             "with the lowest calibration loss; proportional: the paper's rule, the unit fraction nearest the ratio).", "",
             "Δavg5 vs dense: the difference in points ± one standard error, paired (from each document's outcome in "
             "both evals) unless marked †: unpaired, from lm-eval's per-task errors, for evals made before outcomes "
             "were recorded. See `amp-edge eval-compare`.", "",
             "prune s: wall time of `amp-edge prune` (calibration, scoring and recovery); eval s: `amp-edge eval` of the "
             "package on every task. Both on a 2-core box that often ran other jobs at the same time: upper bounds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["eval"]["tasks"]
        avg = r["eval"]["average"]
        gone, before = r.get("heads_removed") or (0, 0)
        heads = "-" if r["criterion"] == "dense" else f"{r.get('heads', 'auto')}: {gone} of {before}"
        cells = [r["criterion"], f"{r['ratio']:g}", r["allocation"], heads, recipe_label(r["recipe"]) if r["recovery"] else "no", f"{r['params']:,}",
                 f"{t['wikitext2']['perplexity']:.2f}", *(f"{100 * t[k]['acc']:.1f}" if k in t else "-" for k in TASKS),
                 f"{100 * avg['paper5_acc']:.1f}", f"{100 * avg['all_acc']:.1f}" if len(avg["tasks"]) == len(TASKS) else "-", _delta_cell(r.get("delta_avg5")),
                 f"{r['decode_ms']:.2f}" if r.get("decode_ms") else "-",
                 f"{r['prune_seconds']:.0f}" if r.get("prune_seconds") else "-", f"{r['eval']['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = args.limit
    if args.not_run:
        lines += ["", f"Rows of this command not run yet (left out): {', '.join(args.not_run)}."]
    lines += ["", f"Standard error of one task's accuracy at n={n}: about {100 * (0.25 / n) ** 0.5:.1f} points (p=0.5); "
              f"per-task stderr values are in eval_comparison.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
