"""The recovery curve of SmolLM2-135M: 5-task average and WikiText-2 perplexity against distillation steps, AMP 20% and
30%, dense as a line. Reads only files in results/ (the n=1000 table and what run.sh kept), so it reruns from a clean
checkout:

    python -m benchmarks.recovery_curve.chart        # -> results/recovery_curve/{recovery_curve.png,curve.md,curve.json}

Each point is a whole run of the recipe with that many steps (the cosine schedule fitted to it), not a snapshot of one
longer run; step 0 is the refit alone, "pruned" the model before refit and training.
"""

from __future__ import annotations

import json
from pathlib import Path

from amp_edge.evaluation.compare import compare, load_report

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "results/eval_smollm2_135m_n1000/eval_comparison.json"
CURVE = ROOT / "results/recovery_curve"
# rows of the n=1000 table: the recipe at 500 and 800 steps (its recovery column names them)
TABLE_STEPS = {"rec-71215d": 500, "rec-8b3e54": 800}


def points() -> list[dict]:
    """(ratio, steps, report name, source) for every point there is a report of; steps None: pruned, no refit."""
    rows = json.loads(TABLE.read_text())["rows"]
    found = [{"ratio": 0.0, "steps": None, "name": "dense", "source": f"{TABLE}#dense", "prune_s": None}]
    for r in rows:
        if r["criterion"] != "amp" or r["allocation"] != "uniform":
            continue
        tag = r["name"].split("uniform-")[-1] if "-rec-" in r["name"] else None
        if tag is None or tag in TABLE_STEPS:
            found.append({"ratio": float(r["ratio"]), "steps": TABLE_STEPS.get(tag), "name": r["name"],
                          "source": f"{TABLE}#{r['name']}", "prune_s": r.get("prune_seconds")})
    for f in sorted(CURVE.glob("amp-*-refit-r*.eval.json")):
        ratio, steps = f.name.removeprefix("amp-").removesuffix(".eval.json").split("-refit-r")
        timing = CURVE / f.name.replace(".eval.json", ".prune_seconds.txt")
        seconds = int(timing.read_text().split()[0]) if timing.is_file() else None
        found.append({"ratio": float(ratio), "steps": int(steps), "name": f.name.removesuffix(".eval.json"),
                      "source": str(f), "prune_s": seconds})
    return found


def measure(found: list[dict]) -> list[dict]:
    result = compare([(p["name"], load_report(p["source"])) for p in found], ref=0)
    by_name = {r["name"]: r for r in result["rows"]}
    out = []
    for p in found:
        row = by_name[p["name"]]
        avgs = {k: v for k, v in row["averages"].items()}
        deltas = row.get("delta_averages", {})
        out.append({**{k: p[k] for k in ("ratio", "steps", "name", "prune_s")}, "perplexity": row["perplexity"],
                    "averages": avgs, "delta": {k: (d["value"], d["stderr"]) for k, d in deltas.items()}})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["# Recovery curve: SmolLM2-135M, AMP uniform, refit + distillation (the default recipe)", "",
             "Command: `python -m benchmarks.recovery_curve.chart` (points: `benchmarks/recovery_curve/run.sh RATIO STEPS` "
             "and the n=1000 table's recovery rows). Validation, first 1000 documents of each task; WikiText-2 test, first "
             "32,768 tokens. Δ: paired difference from dense in points ± one standard error. prune s: the whole `amp-edge "
             "prune` (scoring, refit, training), 2-core AMD EPYC with bf16 kernels.", "",
             "| ratio | steps | avg5 | Δavg5 | avg7 | Δavg7 | WikiText-2 ppl | prune s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], -1 if r["steps"] is None else r["steps"])):
        steps = "dense" if r["ratio"] == 0 else ("pruned, no refit" if r["steps"] is None else
                                                  ("refit only" if r["steps"] == 0 else str(r["steps"])))
        cells = []
        for k in ("avg5", "avg7"):
            v, se = r["delta"].get(k, (None, None))
            cells += [f"{r['averages'][k]:.2f}", "-" if v is None else f"{v:+.2f} ± {se:.2f}"]
        lines.append(f"| {r['ratio']:.1f} | {steps} | {' | '.join(cells)} | {r['perplexity']:.2f} | "
                     f"{'-' if r['prune_s'] is None else round(r['prune_s'])} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["ratio"] == 0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ratio, color in ((0.2, "tab:blue"), (0.3, "tab:orange")):
        curve = sorted((r for r in rows if r["ratio"] == ratio and r["steps"] is not None), key=lambda r: r["steps"])
        raw = [r for r in rows if r["ratio"] == ratio and r["steps"] is None]
        xs = [r["steps"] for r in curve]
        left.errorbar(xs, [r["averages"]["avg5"] for r in curve], yerr=[r["delta"]["avg5"][1] for r in curve],
                      marker="o", color=color, capsize=3, label=f"AMP {ratio:.0%}, refit + distill")
        right.plot(xs, [r["perplexity"] for r in curve], marker="o", color=color, label=f"AMP {ratio:.0%}")
        for r in raw:
            left.plot([0], [r["averages"]["avg5"]], marker="x", color=color, linestyle="none",
                      label=f"AMP {ratio:.0%}, pruned (no refit)")
            right.plot([0], [r["perplexity"]], marker="x", color=color, linestyle="none")
    left.axhline(dense["averages"]["avg5"], color="k", linestyle="--", label="dense")
    right.axhline(dense["perplexity"], color="k", linestyle="--", label="dense")
    left.set(xlabel="distillation steps (4 x 256 tokens)", ylabel="5-task average, % (± paired s.e. vs dense)",
             title="zero-shot, n=1000 per task")
    right.set(xlabel="distillation steps (4 x 256 tokens)", ylabel="WikiText-2 perplexity", yscale="log",
              title="perplexity (x: pruned, before refit)")
    from matplotlib.ticker import ScalarFormatter

    right.yaxis.set_major_formatter(ScalarFormatter())
    right.yaxis.set_minor_formatter(ScalarFormatter())
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: recovery against steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    rows = measure(points())
    CURVE.mkdir(parents=True, exist_ok=True)
    (CURVE / "curve.json").write_text(json.dumps(rows, indent=1))
    (CURVE / "curve.md").write_text(markdown(rows))
    chart(rows, CURVE / "recovery_curve.png")
    print(markdown(rows))
    print(CURVE / "recovery_curve.png")


if __name__ == "__main__":
    main()
