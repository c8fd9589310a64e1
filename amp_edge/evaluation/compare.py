"""Several ``amp-edge eval`` reports side by side, each as a difference from a reference row (the dense model, or a
package's own PyTorch source) with the standard error of that difference.

Reports made on the same documents that carry each document's outcome (``acc_per_doc``) are compared pairwise: the
error of a difference then comes from the per-document differences, which is much smaller than the two accuracies'
own errors combined, because both models miss mostly the same hard questions. Reports without per-document outcomes
fall back to the unpaired error sqrt(se_a^2 + se_b^2), and the table says which one it used.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from amp_edge.errors import DataError, InvalidOptionError
from amp_edge.evaluation.report import write_folder
from amp_edge.evaluation.tasks import PAPER_AVERAGE, PERPLEXITY_TASK

# Spec fields that change what a number means; reports that differ in one of them are not comparable.
_SAME_SPEC = ("limit", "window", "stride", "max_tokens")


@dataclass
class Delta:
    """row minus reference, in accuracy points (0-100)."""

    value: float
    stderr: float | None
    paired: bool

    def cell(self) -> str:
        err = "" if self.stderr is None else f" ± {self.stderr:.2f}"
        return f"{self.value:+.2f}{err}"


def load_report(path: str | Path) -> dict:
    """eval.json, the folder ``amp-edge eval --out`` wrote it into, or ``TABLE.json#ROW``: one row of the
    eval_comparison.json that benchmarks/eval_comparison.py writes (it embeds each row's full report), so a comparison
    can be rebuilt from the tables kept in the repository."""
    path, row = _split_row(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no eval report at {path} (expected an eval.json or the folder `amp-edge eval --out` made)")
    try:
        report = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not an eval report: {e}") from None
    if row is not None:
        report = _table_row(report, row, file)
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict) or "spec" not in report:
        raise DataError(f"{file} is not an eval report (no 'tasks' and 'spec')")
    return report


def report_label(path: str | Path) -> str:
    """Default row name: the ROW of ``TABLE.json#ROW``, else the report's folder name."""
    path, row = _split_row(path)
    return row if row is not None else (path if path.is_dir() else path.parent).name


def _split_row(path: str | Path) -> tuple[Path, str | None]:
    """``TABLE.json#ROW`` -> (TABLE.json, ROW); any other path (one with a '#' that exists too) -> (path, None)."""
    text = str(path)
    if "#" in text and not Path(text).expanduser().exists():
        head, row = text.rsplit("#", 1)
        return Path(head).expanduser(), row
    return Path(text).expanduser(), None


def _table_row(table: object, name: str, file: Path) -> dict:
    rows = table.get("rows") if isinstance(table, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "eval" in r for r in rows):
        raise DataError(f"{file} is not an eval_comparison.json (no 'rows' with an 'eval' report); #ROW needs one")
    for r in rows:
        if r.get("name") == name:
            return r["eval"]
    known = ", ".join(str(r.get("name")) for r in rows)
    raise DataError(f"no row {name!r} in {file}; its rows: {known}")


def compare(reports: list[tuple[str, dict]], ref: int = 0) -> dict:
    """Rows of (name, report) against ``reports[ref]``: each task's accuracy, the averages, and their differences."""
    if len(reports) < 2:
        raise InvalidOptionError(f"eval-compare needs at least two reports, got {len(reports)}")
    if not 0 <= ref < len(reports):
        raise InvalidOptionError(f"--ref must index one of the {len(reports)} reports (0-{len(reports) - 1}), got {ref}")
    _check_comparable(reports)
    base = reports[ref][1]["tasks"]
    tasks = [t for t in base if "acc" in base[t]]
    averages = {"avg5": [t for t in PAPER_AVERAGE if t in tasks], f"avg{len(tasks)}": tasks}
    averages = {k: v for k, v in averages.items() if v and (k != "avg5" or len(v) == len(PAPER_AVERAGE))}
    rows = []
    for i, (name, report) in enumerate(reports):
        got = report["tasks"]
        ppl = got.get(PERPLEXITY_TASK, {}).get("perplexity")
        row = {"name": name, "source": report.get("source"), "kind": report.get("kind"), "params": report.get("params"),
               "perplexity": ppl, "acc": {t: 100 * got[t]["acc"] for t in tasks},
               "averages": {k: 100 * sum(got[t]["acc"] for t in ts) / len(ts) for k, ts in averages.items()},
               "reference": i == ref}
        if i != ref:
            row["delta_tasks"] = {t: asdict(delta(got, base, [t])) for t in tasks}
            row["delta_averages"] = {k: asdict(delta(got, base, ts)) for k, ts in averages.items()}
        rows.append(row)
    return {"reference": reports[ref][0], "tasks": tasks, "averages": averages, "rows": rows,
            "spec": {k: reports[ref][1]["spec"].get(k) for k in _SAME_SPEC}}


def _check_comparable(reports: list[tuple[str, dict]]) -> None:
    (name0, first), rest = reports[0], reports[1:]
    for name, report in rest:
        for key in _SAME_SPEC:
            a, b = first["spec"].get(key), report["spec"].get(key)
            if a != b:
                raise InvalidOptionError(f"reports made with different --{key.replace('_', '-')}: {a} in {name0}, "
                                         f"{b} in {name}; their numbers are not comparable")
        acc_a = sorted(t for t, r in first["tasks"].items() if "acc" in r)
        acc_b = sorted(t for t, r in report["tasks"].items() if "acc" in r)
        if acc_a != acc_b:
            raise InvalidOptionError(f"reports on different tasks: {','.join(acc_a)} in {name0}, {','.join(acc_b)} in {name}")
        for task in acc_a:
            n_a, n_b = first["tasks"][task].get("n"), report["tasks"][task].get("n")
            if n_a != n_b:
                raise InvalidOptionError(f"{task} scored on {n_a} documents in {name0} and {n_b} in {name}")


def delta(row: dict, base: dict, tasks: list[str]) -> Delta:
    """Mean over ``tasks`` of (row acc - base acc) and its standard error (tasks are independent samples)."""
    value = 100 * sum(row[t]["acc"] - base[t]["acc"] for t in tasks) / len(tasks)
    paired = all(_same_documents(row[t], base[t]) for t in tasks)
    variances = [_paired_var(row[t], base[t]) if paired else _unpaired_var(row[t], base[t]) for t in tasks]
    if any(v is None for v in variances):
        return Delta(value, None, paired)
    return Delta(value, 100 * math.sqrt(sum(variances)) / len(tasks), paired)


def _same_documents(a: dict, b: dict) -> bool:
    return ("acc_per_doc" in a and "acc_per_doc" in b and a.get("docs_sha256") == b.get("docs_sha256")
            and len(a["acc_per_doc"]) == len(b["acc_per_doc"]) > 1)


def _paired_var(a: dict, b: dict) -> float:
    """Variance of the mean per-document difference (sample variance / n)."""
    d = [int(x) - int(y) for x, y in zip(a["acc_per_doc"], b["acc_per_doc"])]
    n = len(d)
    mean = sum(d) / n
    return sum((x - mean) ** 2 for x in d) / (n - 1) / n


def _unpaired_var(a: dict, b: dict) -> float | None:
    if a.get("acc_stderr") is None or b.get("acc_stderr") is None:
        return None
    return a["acc_stderr"] ** 2 + b["acc_stderr"] ** 2


def markdown(result: dict) -> str:
    tasks, avgs = result["tasks"], list(result["averages"])
    spec = result["spec"]
    limit = f"first {spec['limit']} documents of each validation split" if spec["limit"] else "full validation splits"
    ppl_note = f"WikiText-2 test, window {spec['window']}" + (f", first {spec['max_tokens']:,} tokens" if spec["max_tokens"] else "")
    lines = [f"# amp-edge eval-compare against {result['reference']}", "",
             *([f"Command: `{result['command']}`", ""] if result.get("command") else []),
             f"Zero-shot acc, {limit}; {ppl_note}.", "",
             "| model | params | wikitext2 ppl | " + " | ".join(tasks) + " | " + " | ".join(avgs) + " | "
             + " | ".join(f"Δ{a}" for a in avgs) + " |",
             "|---|---:|---:|" + "---:|" * (len(tasks) + 2 * len(avgs))]
    for row in result["rows"]:
        deltas = ["-" if row["reference"] else Delta(**row["delta_averages"][a]).cell() for a in avgs]
        ppl = "" if row["perplexity"] is None else f"{row['perplexity']:.2f}"
        params = "" if row["params"] is None else f"{row['params']:,}"
        lines.append(f"| {row['name']} | {params} | {ppl} | " + " | ".join(f"{row['acc'][t]:.1f}" for t in tasks) + " | "
                     + " | ".join(f"{row['averages'][a]:.2f}" for a in avgs) + " | " + " | ".join(deltas) + " |")
    lines += ["", f"Per task, difference from {result['reference']} (accuracy points ± one standard error):", "",
              "| model | " + " | ".join(tasks) + " | errors |", "|---|" + "---:|" * len(tasks) + "---|"]
    for row in result["rows"]:
        if row["reference"]:
            continue
        cells = [Delta(**row["delta_tasks"][t]).cell() for t in tasks]
        kind = "paired" if all(row["delta_tasks"][t]["paired"] for t in tasks) else "unpaired"
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {kind} |")
    lines += ["", "Paired: from each document's outcome in both reports (same documents); unpaired: sqrt(se_a² + se_b²) "
              "from lm-eval's standard errors, for reports without per-document outcomes. An average's error treats the "
              "tasks as independent samples."]
    return "\n".join(lines) + "\n"


def write(result: dict, out: str | Path, overwrite: bool = False) -> Path:
    return write_folder(out, "compare", result, markdown(result), overwrite)
