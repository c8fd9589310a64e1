"""Criterion x ratio x allocation -> WikiText-2 perplexity and parameter counts, as a Markdown table.

Each criterion is scored once; every (ratio, allocation) plan is applied to a fresh copy of the dense model.

    python benchmarks/prune_comparison.py --model smollm2-135m \
        --calib ../shared/data/calibration/c4_demo.jsonl --data ../shared/data/wikitext2/test.txt \
        --max-tokens 32768 --out results/prune_smollm2_135m
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from amp_edge import (CalibrationSpec, apply_plan, calibration_batches, count_parameters, get_adapter, load_model, perplexity, score,
                      split_plan)
from amp_edge.evaluation.perplexity import read_eval_text
from amp_edge.pruning.scoring import needs_calibration

DATA_DIR = Path(os.environ.get("AMP_EDGE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default=str(DATA_DIR / "calibration" / "c4_demo.jsonl"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--data", default=str(DATA_DIR / "wikitext2" / "test.txt"))
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--criteria", default="amp,random,magnitude,wanda-sp")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--allocations", default="uniform,global")
    ap.add_argument("--gqa", default="query")
    ap.add_argument("--heads", default="auto", help="head units removed per layer: auto | proportional | N (prune --heads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/prune_comparison")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    loaded = load_model(args.model)
    text = read_eval_text(args.data)
    spec = CalibrationSpec(args.calib, args.calib_samples, args.calib_seq_len, args.seed)
    batches = calibration_batches(spec, loaded.model, loaded.tokenizer)

    def ppl(model) -> float:
        return perplexity(model, loaded.tokenizer, text, args.window, None, args.max_tokens).perplexity

    start = time.perf_counter()
    dense_params = count_parameters(loaded.model)
    rows = [{"criterion": "dense", "ratio": 0.0, "allocation": "-", "params": dense_params, "ppl": ppl(loaded.model)}]
    print(json.dumps(rows[-1]), flush=True)
    for criterion in args.criteria.split(","):
        scores = score(criterion, get_adapter(loaded.model), batches if needs_calibration(criterion) else [], seed=args.seed)
        for ratio in map(float, args.ratios.split(",")):
            for allocation in args.allocations.split(","):
                plan = split_plan(get_adapter(loaded.model), scores, args.heads, ratio, allocation, args.gqa, 0.1, "mean", batches)
                model = apply_plan(copy.deepcopy(loaded.model), plan)
                rows.append({"criterion": criterion, "ratio": ratio, "allocation": allocation,
                             "params": count_parameters(model), "ppl": ppl(model),
                             "heads": [len(lp.q_heads) for lp in plan.layers], "ffn": [len(lp.neurons) for lp in plan.layers]})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("heads", "ffn")}), flush=True)
                del model
    meta = {"model": args.model, "calibration": spec.to_dict(), "data": args.data, "window": args.window,
            "max_tokens": args.max_tokens, "gqa": args.gqa, "heads": args.heads, "seconds": round(time.perf_counter() - start),
            "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    write(Path(args.out), rows, meta)


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dense = rows[0]
    lines = [
        f"# Pruning comparison: {meta['model']}", "",
        f"WikiText-2 perplexity on the first {meta['max_tokens']} tokens of `{Path(meta['data']).name}` "
        f"(window {meta['window']}, disjoint); calibration {meta['calibration']['num_samples']} x "
        f"{meta['calibration']['seq_len']} tokens from `{Path(meta['calibration']['source']).name}`; gqa={meta['gqa']}, "
        f"heads={meta.get('heads', 'proportional')}. "
        f"Dense: {dense['params']:,} parameters, perplexity {dense['ppl']:.2f}.", "",
        "| ratio | allocation | params | " + " | ".join(c for c in _criteria(rows)) + " |",
        "|---|---|---|" + "---|" * len(_criteria(rows)),
    ]
    for ratio in sorted({r["ratio"] for r in rows[1:]}):
        for alloc in dict.fromkeys(r["allocation"] for r in rows[1:]):
            cells = {r["criterion"]: r for r in rows[1:] if r["ratio"] == ratio and r["allocation"] == alloc}
            if not cells:
                continue
            params = next(iter(cells.values()))["params"]
            vals = [f"{cells[c]['ppl']:.2f}" if c in cells else "-" for c in _criteria(rows)]
            lines.append(f"| {ratio:.1f} | {alloc} | {params:,} | " + " | ".join(vals) + " |")
    lines += ["", f"Generated by `python benchmarks/prune_comparison.py` in {meta['seconds']} s "
              f"({meta['torch_threads']} torch threads)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _criteria(rows) -> list[str]:
    return list(dict.fromkeys(r["criterion"] for r in rows[1:]))


if __name__ == "__main__":
    main()
