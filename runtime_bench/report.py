"""Bench reports: JSON (every sample), a Markdown table and a PNG chart, written atomically."""

from __future__ import annotations

import json
from pathlib import Path


def markdown(report: dict) -> str:
    env = report["environment"]
    bandwidth = env.get("copy_bandwidth_bytes_per_s")
    gpu = env.get("provider") == "cuda"
    where = f"{env.get('gpu') or 'GPU'} (host: {env['cpu']})" if gpu else env["cpu"]
    device_memory = any(r.get("device_memory") for r in report["rows"])
    lines = [
        f"# amp-edge bench ({env['date']})",
        "",
        f"{where} · provider {env['provider']} · threads {env['threads'] or 'default'} · onnxruntime {env['onnxruntime']} · "
        f"batch {env['batch']} · {env['gen_len']} new tokens · {env['repeat']} repeats after {env['warmup']} warm-up · "
        f"{'device ' if gpu else ''}copy bandwidth " + (f"{bandwidth / 1e9:.1f} GB/s" if bandwidth else "not measured"),
        "",
        f"Ratios are against `{report['baseline']}`. The limit is bytes read per decode token (weights except lookup "
        f"tables, plus the mean KV cache) divided by the {'GPU memory' if gpu else 'copy'} bandwidth.",
        "",
        "| package | dtype | prompt | prefill ms | decode ms/token (p50 / p90) | tokens/s | decode speed-up | bytes-ratio | × limit | peak RSS MiB | "
        + ("GPU MiB | " if device_memory else "") + "package MiB | KV MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if device_memory else "") + "---:|---:|",
    ]
    for r in report["rows"]:
        gpu_mib = (f"{r['device_memory'] / 2**20:.0f} | " if r.get("device_memory") else "- | ") if device_memory else ""
        lines.append(
            f"| {r['name']} | {r.get('dtype') or '-'} | {r['prompt_len']} | {r['prefill_ms_mean']:.1f} | "
            f"{r['decode_ms_mean']:.2f} ({r['decode_ms_p50']:.2f} / {r['decode_ms_p90']:.2f}) | {r['tokens_per_s']:.1f} | "
            f"{_x(r['decode_speedup_vs_baseline'])} | {_x(r.get('bytes_ratio_vs_baseline'))} | {_x(r['x_of_limit'])} | "
            f"{r['peak_rss'] / 2**20:.0f} | {gpu_mib}{(r['package_bytes'] or 0) / 2**20:.0f} | {r['kv_bytes_end'] / 2**20:.1f} |")
    if report.get("comparisons"):  # --compare-json: another machine's rows next to these
        from runtime_bench.compare import markdown as compare_markdown

        lines += compare_markdown(report["comparisons"])
    return "\n".join(lines) + "\n"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"{r['name']}\n{r['prompt_len']}" for r in rows]
    panels = [("decode_ms_mean", "decode ms/token"), ("prefill_ms_mean", "prefill ms"), ("peak_rss", "peak RSS MiB")]
    if any(r.get("device_memory") for r in rows):
        panels.append(("device_memory", "GPU memory MiB"))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(3 * len(panels), 1.6 * len(rows)), 4))
    for ax, (key, title) in zip(axes, panels):
        values = [(r.get(key) or 0) / (2**20 if key in ("peak_rss", "device_memory") else 1) for r in rows]
        ax.bar(range(len(rows)), values, color=["#4c72b0" if r["kind"] == "onnx" else "#dd8452" for r in rows])
        if key == "decode_ms_mean":
            limits = [r["limit_ms"] or 0 for r in rows]
            ax.scatter(range(len(rows)), limits, color="black", marker="_", s=300, label="bandwidth limit", zorder=3)
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=45, ha="right")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, folder: Path) -> None:
    (folder / "bench.json").write_text(json.dumps(report, indent=1))
    (folder / "bench.md").write_text(markdown(report))
    chart(report, folder / "bench.png")
