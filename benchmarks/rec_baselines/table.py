"""The paper-style grid of results/eval_smollm2_135m_n1000_rec_baselines: criterion x ratio x (no recovery, + R500), gathered from the n=1000 tables
(every row without recovery, AMP + R500, and each row's decode bench) and the compare_*.json files that compare.sh
wrote there (the baselines + R500), so it reruns from a clean checkout; a row not measured yet shows as "-".

Usage: python benchmarks/rec_baselines/table.py   (writes results/eval_smollm2_135m_n1000_rec_baselines/table.md)
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "results" / "eval_smollm2_135m_n1000_rec_baselines"  # the data: results/ holds no code
# 10% has its own table (same documents, dense report reused); the dense row comes from the 20%/30% one.
MAIN_TABLES = [HERE.parent / d / "eval_comparison.json" for d in ("eval_smollm2_135m_n1000_ratio01", "eval_smollm2_135m_n1000")]
CRITERIA = ("amp", "wanda-sp", "random", "magnitude")
RATIOS = (10, 20, 30)
NAME = re.compile(r"^(?P<criterion>.+?)(?P<pct>\d+)(?P<rec>-R500)?$")


def rows_by_key(reference: str) -> dict:
    """(criterion, pct, recovered) -> row, from every compare file whose reference row is ``reference`` (dense or
    amp PCT + R500)."""
    found = {}
    for path in sorted(HERE.glob("compare*.json")):
        table = json.loads(path.read_text())
        if not re.fullmatch(reference, table["reference"]):
            continue
        for row in table["rows"]:
            m = NAME.match(row["name"])
            if m:
                found.setdefault((m["criterion"], int(m["pct"]), bool(m["rec"])), row)
    return found


def main_table_rows() -> dict:
    """(criterion, pct, recovered) -> row in the compare files' shape, from the n=1000 tables (uniform, 500 steps),
    with its decode ms/token relative to the dense row benched in the same run; the dense row under (None, 0, False)."""
    found = {}
    for path in MAIN_TABLES:
        rows = json.loads(path.read_text())["rows"]
        dense_ms = next(r["decode_ms"] for r in rows if r["name"] == "dense")
        for row in rows:
            if row["name"] != "dense" and (row["allocation"] != "uniform" or row["name"].endswith("-8b3e54")):
                continue  # -8b3e54: the 800-step recipe
            report = row["eval"]
            key = (None, 0, False) if row["name"] == "dense" else (row["criterion"], round(100 * row["ratio"]), row["recovery"])
            found[key] = {"params": row["params"], "averages": {"avg5": 100 * report["average"]["paper5_acc"]},
                          "perplexity": report["tasks"]["wikitext2"]["perplexity"],
                          "delta_averages": {"avg5": row.get("delta_avg5")},
                          "decode": (row["decode_ms"], dense_ms) if row["decode_ms"] else None}
    return found


def delta(row: dict, sign: float = 1.0) -> str:
    d = row["delta_averages"]["avg5"]
    return f"{sign * d['value']:+.2f} ± {d['stderr']:.2f}"


def main() -> None:
    benched = main_table_rows()
    vs_dense, vs_amp = {**benched, **rows_by_key("dense")}, rows_by_key(r"amp\d+-R500")
    dense = vs_dense[(None, 0, False)]
    lines = ["# Recovery for every criterion: SmolLM2-135M, avg5 and WikiText-2 perplexity", "",
             "Made by `python benchmarks/rec_baselines/table.py` from "
             + " and ".join(str(t.relative_to(HERE.parents[1])) for t in MAIN_TABLES) + " "
             "and the compare_*.json files here (each made by `compare.sh CRITERION RATIO`). avg5: mean accuracy on PIQA, HellaSwag, WinoGrande, ARC-e, "
             "ARC-c, first 1000 documents of each validation split; Δ: points from dense "
             f"(avg5 {dense['averages']['avg5']:.2f}, ppl {dense['perplexity']:.2f}, {dense['params']:,} parameters), "
             "paired standard error. R500: refit + 500 distillation steps on C4 + Alpaca (AMP 20% and 30% rows trained in bf16 on another box, "
             "the other rows in fp32 on this one). `--heads auto`, uniform allocation.", "",
             "| criterion | " + " | ".join(f"{p}% | {p}% + R500" for p in RATIOS) + " |",
             "|---|" + "---:|" * (2 * len(RATIOS))]
    for criterion in CRITERIA:
        cells = []
        for pct in RATIOS:
            for rec in (False, True):
                row = vs_dense.get((criterion, pct, rec))
                cells.append("-" if row is None else
                             f"{row['averages']['avg5']:.2f} ({delta(row)}), ppl {row['perplexity']:,.2f}")
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    # Every criterion removes the same number of parameters at a ratio; a cell lists each count found.
    counts = [" / ".join(f"{n:,}" for n in sorted({r["params"] for k, r in vs_dense.items() if k[1:] == (pct, rec)})) or "-"
              for pct in RATIOS for rec in (False, True)]
    lines.append("| parameters | " + " | ".join(counts) + " |")
    lines += ["", "AMP + R500 minus CRITERION + R500, avg5 points (paired: same documents):", "",
              "| criterion | " + " | ".join(f"{p}% + R500" for p in RATIOS) + " |", "|---|" + "---:|" * len(RATIOS)]
    for criterion in CRITERIA[1:]:
        cells = [delta(vs_amp[(criterion, pct, True)], -1.0) if (criterion, pct, True) in vs_amp else "-" for pct in RATIOS]
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    lines += ["", "Decode ms/token of each package without recovery (recovery keeps the shapes), ONNX Runtime fp32, 2 threads, "
              "AMD EPYC, batch 1, 128-token prompt, 64 new tokens; in brackets: dense's time in the same bench run "
              "divided by it. Packages of one shape (all but magnitude at 10%, all at 20%, all but random at 30%) differ only "
              "by this bench's noise, up to 11% here:", "", "| criterion | " + " | ".join(f"{p}%" for p in RATIOS) + " |", "|---|" + "---:|" * len(RATIOS)]
    for criterion in CRITERIA:
        cells = []
        for pct in RATIOS:
            ms = (benched.get((criterion, pct, False)) or {}).get("decode")
            cells.append("-" if ms is None else f"{ms[0]:.2f} ({ms[1] / ms[0]:.2f}x)")
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    if any("| - |" in line for line in lines):  # the legend only while some cell is still empty
        lines += ["", "\"-\": not measured."]
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    print(HERE / "table.md")


if __name__ == "__main__":
    main()
