"""int4 export options against the fp32 package: size, agreement on the fp32 package's own continuations
(exporters.agreement: 4 prompts x 32 greedy tokens, teacher-forced; the issue's measure, 128 positions), top-1 agreement
and KL on 4 x 256 tokens of WikiText-2 test text (a larger, less noisy second measure), the exporter's validation
figure, export time.

    python -m benchmarks.int4_options smollm2-135m --work out/int4_options --out results/int4_options_smollm2
    python -m benchmarks.int4_options out/amp30-ckpt --variants rtn,rtn-head8,hqq --work out/int4_p30

Each variant is one export (kept under --work, so a rerun measures only what is missing); decode speed is measured
afterwards for all of them in one interleaved `amp-edge bench` run (--bench).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> export options (QuantSpec fields); "head8": the LM head (and with tied embeddings, the rows read from it)
# at 8 bits; "acc0": fp32 compute instead of int8 activations
RTN = {"method": "rtn"}
VARIANTS = {
    "rtn": RTN,
    "rtn-acc0": {**RTN, "accuracy_level": 0},
    "rtn-b16": {**RTN, "block_size": 16},
    "rtn-b64": {**RTN, "block_size": 64},
    "rtn-sym": {**RTN, "symmetric": True},
    "rtn-head8": {**RTN, "keep_8bit": ("lm_head",)},
    "rtn-head8-down8": {**RTN, "keep_8bit": ("lm_head", "down_proj")},
    "rtn-emb16": {**RTN, "embedding": "fp16"},
    "rtn-head8-ends8": {**RTN, "keep_8bit": ("lm_head", "layers.0", "layers.29")},
    "auto": {"method": "auto"},
    "grid": {"method": "grid"},
    "grid-head8": {"method": "grid", "keep_8bit": ("lm_head",)},
    "grid-emb16": {"method": "grid", "embedding": "fp16"},
    "grid-head8-down8": {"method": "grid", "keep_8bit": ("lm_head", "down_proj")},
    "gridfit": {"method": "grid-fit"},
    "gridfit-head8": {"method": "grid-fit", "keep_8bit": ("lm_head",)},
    "gridfit-head8-down8": {"method": "grid-fit", "keep_8bit": ("lm_head", "down_proj")},
    "hqq": {"method": "hqq"},
    "hqq-head8": {"method": "hqq", "keep_8bit": ("lm_head",)},
    "hqq-b64": {"method": "hqq", "block_size": 64},
    "hqq-b128": {"method": "hqq", "block_size": 128},
    "kquant": {"method": "k-quant"},
    "kquant-head8": {"method": "k-quant", "keep_8bit": ("lm_head",)},
}


def export_variant(source: str, work: Path, name: str, fields: dict) -> dict:
    from amp_edge.models.sources import is_pruned_checkpoint
    from exporters import ExportOptions, QuantSpec, export

    pkg = work / name
    if (pkg / "amp_edge.json").is_file():
        return json.loads((work / f"{name}.json").read_text())
    dtype = "fp32" if name == "fp32" else "int4"
    ratio = None if is_pruned_checkpoint(source) else 0
    t0 = time.perf_counter()
    result = export(source, pkg, ExportOptions(ratio=ratio, quant=QuantSpec(dtype, **fields), min_top1=0), overwrite=True)
    seconds = time.perf_counter() - t0
    m = result.manifest
    row = {"name": name, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
           "bytes": m["onnx_bytes"], "export_s": round(seconds, 1),
           "validation_top1": m["parity"]["top1_agreement"] if m.get("parity") else None}
    (work / f"{name}.json").write_text(json.dumps(row))
    return row


TEXT_ROWS, TEXT_LEN = 4, 256  # WikiText-2 test windows for the second, larger measure


def text_windows(tokenizer) -> list[list[int]]:
    """TEXT_ROWS windows of TEXT_LEN tokens from the start of WikiText-2 test (AMP_EDGE_DATA_DIR or ../shared/data)."""
    from amp_edge.evaluation.tasks import default_data_dir

    ids = tokenizer((default_data_dir() / "wikitext2" / "test.txt").read_text()[:200_000])["input_ids"]
    return [ids[i * TEXT_LEN:(i + 1) * TEXT_LEN] for i in range(TEXT_ROWS)]


def text_logits(decoder, windows) -> list:
    import numpy as np

    out = []
    for w in windows:
        ids = np.array([w], dtype=np.int64)
        out.append(decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], decoder.empty_cache(1))[0][0])
    return out


def text_agreement(logits, ref) -> tuple[float, float]:
    """Top-1 agreement with the fp32 package and mean KL(fp32 || package) per token, teacher-forced on WikiText-2."""
    import numpy as np

    hits = kl = total = 0
    for a, b in zip(logits, ref):
        hits += int((a.argmax(-1) == b.argmax(-1)).sum())
        la = a - a.max(-1, keepdims=True)
        la = la - np.log(np.exp(la).sum(-1, keepdims=True))
        lb = b - b.max(-1, keepdims=True)
        lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
        kl += float((np.exp(lb) * (lb - la)).sum())
        total += len(a)
    return hits / total, kl / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default="out/int4_options")
    ap.add_argument("--out", default="")
    ap.add_argument("--bench", action="store_true", help="also bench every package (interleaved, one run)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from amp_edge_runtime.decoder import OnnxDecoder
    from exporters.agreement import agreement, onnx_continuations, prompt_ids
    from transformers import AutoTokenizer

    base = export_variant(args.source, work, "fp32", {})
    tokenizer = AutoTokenizer.from_pretrained(work / "fp32")
    reference = OnnxDecoder(work / "fp32")
    ref = onnx_continuations(reference, prompt_ids(tokenizer, len(tokenizer)))
    windows = text_windows(tokenizer)
    ref_text = text_logits(reference, windows)
    del reference
    rows = [base | {"agreement": 1.0, "text_top1": 1.0, "text_kl": 0.0}]
    for name in args.variants.split(","):
        row = export_variant(args.source, work, name, VARIANTS[name])
        decoder = OnnxDecoder(work / name)
        row["agreement"] = agreement(decoder, ref)
        row["text_top1"], row["text_kl"] = text_agreement(text_logits(decoder, windows), ref_text)
        del decoder
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.bench:
        cmd = [str(Path(sys.executable).with_name("amp-edge")), "bench", *(str(work / r["name"]) for r in rows),
               "--prompt-len", "128", "--gen-len", "64", "--repeat", "3", "--out", str(work / "bench"), "--overwrite"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        bench = json.loads((work / "bench" / "bench.json").read_text())
        decode = {Path(b["path"]).name: b["decode_ms_mean"] for b in bench["rows"] if b["kind"] == "onnx"}
        for row in rows:
            row["decode_ms"] = decode.get(row["name"])
    lines = ["| variant | options | MB | agreement (fp32's continuations) | WikiText-2 top-1 | WikiText-2 KL | validation top-1 "
             "| decode ms/token | export s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {json.dumps(r['options']) if r['options'] else '-'} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['agreement']:.3f} | {r['text_top1']:.3f} | {r['text_kl']:.4f} | {r['validation_top1'] if r['validation_top1'] is None else round(r['validation_top1'], 3)} | "
                     f"{r.get('decode_ms') or '-'} | {r['export_s']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "int4_options.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
        (out / "int4_options.md").write_text(f"# int4 options on {args.source}\n\nCommand: `python -m benchmarks.int4_options "
                                             f"{' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
