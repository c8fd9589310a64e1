"""Bench reports side by side: another machine's bench.json (a phone, a board) against this one's (the desktop).

Rows are matched on package name, prompt length and dtype; the ratios are other / this, so 2.0 means the other
machine takes twice as long (or twice the memory). Torch-free, like the rest of runtime_bench.
"""

from __future__ import annotations

import json
from pathlib import Path

from amp_edge_runtime.errors import BenchError

# what bench.json rows and environment always hold, and the reports read
_ROW_KEYS = ("name", "kind", "prompt_len", "prefill_ms_mean", "decode_ms_mean", "decode_ms_p50", "decode_ms_p90", "tokens_per_s",
             "peak_rss", "kv_bytes_end", "package_bytes", "x_of_limit", "decode_speedup_vs_baseline")
_ENV_KEYS = ("date", "cpu", "provider", "threads", "onnxruntime", "batch", "gen_len", "repeat", "warmup", "copy_bandwidth_bytes_per_s")
_SETTINGS = ("provider", "threads", "batch", "gen_len", "repeat")
_METRICS = (("decode_ms_mean", "decode_ms_ratio"), ("prefill_ms_mean", "prefill_ms_ratio"), ("peak_rss", "peak_rss_ratio"))


def load_report(path: str | Path) -> dict:
    """A bench.json written by ``amp-edge bench`` or ``python -m runtime_bench``; BenchError names what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"bench report {path} not found") from None
    except json.JSONDecodeError as e:
        raise BenchError(f"{path} is not JSON (line {e.lineno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read bench report {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("environment"), dict):
        raise BenchError(f"{path} is not a bench report: it needs 'environment' and 'rows' (amp-edge bench --out writes one)")
    missing = [k for k in _ENV_KEYS if k not in data["environment"]]
    if missing:
        raise BenchError(f"{path}: environment lacks {', '.join(missing)}")
    for i, row in enumerate(data["rows"]):
        missing = [k for k in _ROW_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise BenchError(f"{path}: row {i} lacks {', '.join(missing)}")
    return data


def compare(base: dict, other: dict, label: str) -> dict:
    """``other``'s rows next to ``base``'s. Rows only one side has are listed by name, not dropped silently."""
    others = {_key(r): r for r in other["rows"]}
    bandwidth = other["environment"].get("copy_bandwidth_bytes_per_s")
    rows = []
    for b in base["rows"]:
        o = others.pop(_key(b), None)
        if o is None:
            continue
        row = {"name": b["name"], "prompt_len": b["prompt_len"], "dtype": b.get("dtype"), "kind": b.get("kind")}
        for metric, ratio in _METRICS:
            row[metric] = {"this": b[metric], "other": o[metric]}
            row[ratio] = o[metric] / b[metric] if b[metric] else None
        # the other side may lack the onnx package and so the bytes read; they are a property of the graph, take ours
        read = o.get("bytes_read_per_token") or b.get("bytes_read_per_token")
        row["other_x_of_limit"] = o["decode_ms_mean"] / (read / bandwidth * 1e3) if read and bandwidth else None
        rows.append(row)
    matched = {_key(r) for r in rows}
    env_b, env_o = base["environment"], other["environment"]
    return {
        "label": label, "environment": env_o, "rows": rows,
        "only_here": sorted({_label(r) for r in base["rows"] if _key(r) not in matched}),
        "only_there": sorted({_label(r) for r in others.values()}),
        "settings_differ": {k: [env_b.get(k), env_o.get(k)] for k in _SETTINGS if env_b.get(k) != env_o.get(k)},
    }


def _key(row: dict) -> tuple:
    return row["name"], int(row["prompt_len"]), row.get("dtype")


def _label(row: dict) -> str:
    return f"{row['name']} @ {row['prompt_len']}"


def markdown(comparisons: list[dict]) -> list[str]:
    lines = []
    for c in comparisons:
        env = c["environment"]
        lines += [
            "", f"## Compared with `{c['label']}`", "",
            f"{env.get('cpu', '?')} ({env.get('machine', '?')}) · provider {env.get('provider')} · threads "
            f"{env.get('threads') or 'default'} · onnxruntime {env.get('onnxruntime')} · copy bandwidth "
            f"{(env.get('copy_bandwidth_bytes_per_s') or 0) / 1e9:.1f} GB/s. Ratios are `{c['label']}` / this run: "
            "above 1 is slower or larger there.", "",
            "| package | dtype | prompt | decode ms/token here → there | ratio | prefill ms here → there | ratio | "
            "peak RSS MiB here → there | ratio | there × limit |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in c["rows"]:
            d, p, m = r["decode_ms_mean"], r["prefill_ms_mean"], r["peak_rss"]
            lines.append(
                f"| {r['name']} | {r.get('dtype') or '-'} | {r['prompt_len']} | {d['this']:.2f} → {d['other']:.2f} | "
                f"{_x(r['decode_ms_ratio'])} | {p['this']:.1f} → {p['other']:.1f} | {_x(r['prefill_ms_ratio'])} | "
                f"{m['this'] / 2**20:.0f} → {m['other'] / 2**20:.0f} | {_x(r['peak_rss_ratio'])} | {_x(r['other_x_of_limit'])} |")
        if not c["rows"]:
            lines.append("| (no rows match: compare the same packages, prompt lengths and dtypes) | | | | | | | | | |")
        for what, names in (("only in this run", c["only_here"]), (f"only in `{c['label']}`", c["only_there"])):
            if names:
                lines += ["", f"Not compared, {what}: {', '.join(names)}."]
        if c["settings_differ"]:
            diff = ", ".join(f"{k} {a} here vs {b} there" for k, (a, b) in c["settings_differ"].items())
            lines += ["", f"Settings differ ({diff}): the ratios mix machine and settings."]
    return lines


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"
