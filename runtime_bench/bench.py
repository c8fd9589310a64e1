"""Latency and memory of packages under ONNX Runtime, interleaved, each package in its own worker process.

Each worker holds one inference session and measures itself (its peak RSS is the session's process,
not the machine). The parent sends the same request to every worker in turn (A B A B ...), so drift
hits all packages alike. Torch is not imported here or in the ONNX Runtime workers.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from amp_edge_runtime.errors import BenchError

from amp_edge_runtime.providers import BUILTIN, PLUGINS

PROVIDERS = {**BUILTIN, **{name: p.ep_name for name, p in PLUGINS.items()}}


@dataclass
class BenchSpec:
    provider: str = "cpu"
    threads: int | None = None
    prompt_lens: tuple[int, ...] = (128, 512)
    gen_len: int = 64
    batch: int = 1
    repeat: int = 10
    warmup: int = 2
    seed: int = 0

    def check(self) -> None:
        if self.provider not in PROVIDERS:
            raise BenchError(f"unknown provider {self.provider!r}; choose from {', '.join(PROVIDERS)}")
        for name in ("gen_len", "batch", "repeat"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or any(p < 1 for p in self.prompt_lens) or not self.prompt_lens:
            raise BenchError(f"prompt lengths must be >= 1 and warmup >= 0, got {self.prompt_lens}, {self.warmup}")


@dataclass
class Run:
    prefill_ms: float
    decode_ms: list[float]
    kv_bytes: int


@dataclass
class Row:
    name: str
    path: str
    kind: str  # onnx | torch
    prompt_len: int
    runs: list[Run] = field(default_factory=list)
    peak_rss: int = 0
    device_memory: int | None = None  # CUDA: GPU memory the worker process holds (nvidia-smi), its peak over the runs
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        prefill = [r.prefill_ms for r in self.runs]
        decode = [d for r in self.runs for d in r.decode_ms]
        q = np.percentile(decode, [50, 90]) if decode else [float("nan")] * 2
        mean = statistics.fmean(decode) if decode else float("nan")
        return {
            "prefill_ms_mean": statistics.fmean(prefill), "prefill_ms_p50": float(np.median(prefill)),
            "prefill_ms_p90": float(np.percentile(prefill, 90)), "prefill_ms_stdev": statistics.pstdev(prefill),
            "decode_ms_mean": mean, "decode_ms_p50": float(q[0]), "decode_ms_p90": float(q[1]),
            "decode_ms_stdev": statistics.pstdev(decode) if decode else float("nan"),
            "tokens_per_s": 1000.0 / mean if decode else float("nan"),
            "kv_bytes_end": self.runs[-1].kv_bytes if self.runs else 0, "peak_rss": self.peak_rss,
            "device_memory": self.device_memory,
        }


def check_package(path: str | Path) -> dict:
    """A package folder: model.onnx readable, config for the context length; returns what the report needs."""
    path = Path(path)
    model = path / "model.onnx" if path.is_dir() else path
    if not model.is_file():
        raise BenchError(f"{path} is not a package: no model.onnx")
    info = {"package_bytes": sum(f.stat().st_size for f in model.parent.iterdir() if f.is_file())}
    for name in ("config.json", "genai_config.json"):
        f = model.parent / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            info["context"] = cfg.get("max_position_embeddings") or cfg.get("model", {}).get("context_length")
            info["vocab"] = cfg.get("vocab_size") or cfg.get("model", {}).get("vocab_size")
            break
    manifest = model.parent / "amp_edge.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        info.update(dtype=m.get("quantization", {}).get("dtype"), params=m.get("params", {}).get("after"),
                    pruned=m.get("pruned"), onnx_bytes=m.get("onnx_bytes"))
    try:
        from runtime_bench.graph_bytes import weight_bytes_per_token
    except ImportError:  # a device with only onnxruntime: no bytes-read limit (reading the graph needs the onnx package)
        return info
    try:
        info.update(weight_bytes_per_token(model))
    except Exception as e:  # onnx raises DecodeError and friends for corrupt files
        raise BenchError(f"{model} is not a readable ONNX graph: {type(e).__name__}") from None
    return info


def _onnx_worker(conn, path: str, provider: str, threads: int | None) -> None:
    import os

    from amp_edge_runtime.decoder import OnnxDecoder, StepTimes
    from amp_edge_runtime.errors import PackageError, ProviderError
    from amp_edge_runtime.session import session_options
    from runtime_bench.hardware import gpu_memory_bytes, peak_rss_bytes

    try:
        decoder = OnnxDecoder(path, options=session_options(threads), provider=provider)
    except (PackageError, ProviderError, OSError) as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", {"providers": decoder.session.get_providers(), "peak_rss": peak_rss_bytes()}))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, ids, gen_len = msg
        times = StepTimes()
        try:
            decoder.generate(ids, gen_len, times=times)
        except Exception as e:  # onnxruntime's untyped errors: report one line to the parent
            conn.send(("error", f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"))
            continue
        kv = decoder.kv_bytes(decoder.last_cache)
        device_memory = gpu_memory_bytes(os.getpid()) if provider == "cuda" else None
        conn.send(("run", Run(times.prefill_s * 1e3, [d * 1e3 for d in times.decode_s], kv), peak_rss_bytes(), device_memory))


def _torch_worker(conn, source: str, provider: str, threads: int | None) -> None:
    """PyTorch eager reference: the package's source model, rebuilt from its manifest (plan replayed)."""
    import os

    import torch

    from runtime_bench.hardware import gpu_memory_bytes, peak_rss_bytes
    from amp_edge.models.reference import model_from_package

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    model = model_from_package(source).to(device).eval()
    conn.send(("ready", {"device": device, "peak_rss": peak_rss_bytes()}))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, ids, gen_len = msg
        decode = []
        with torch.no_grad():
            x = torch.from_numpy(ids).to(device)
            t = time.perf_counter()
            out = model(input_ids=x, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            prefill = (time.perf_counter() - t) * 1e3
            cache = out.past_key_values
            for _ in range(gen_len - 1):
                t = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                _sync(device)
                cache = out.past_key_values
                decode.append((time.perf_counter() - t) * 1e3)
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        device_memory = None
        if device == "cuda":  # the process's whole footprint where nvidia-smi shows it, else torch's own reservation
            device_memory = gpu_memory_bytes(os.getpid()) or torch.cuda.max_memory_reserved()
        conn.send(("run", Run(prefill, decode, int(kv)), peak_rss_bytes(), device_memory))


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class Worker:
    """A child interpreter started as ``python -m runtime_bench.bench`` (not multiprocessing's spawn, which would
    re-import the CLI and with it torch): it imports only what its kind needs, so its peak RSS is the session's."""

    def __init__(self, kind: str, arg: str, spec: BenchSpec):
        import os
        import subprocess
        import sys

        # the folder holding runtime_bench/, so a copy of it on a device works from any working directory
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime_bench.bench", kind, arg, spec.provider, str(spec.threads or 0)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        kind, payload = self._recv()
        if kind == "error":
            self.close()
            raise BenchError(payload)
        self.ready = payload

    def _recv(self):
        import pickle

        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            raise BenchError("a bench worker died (out of memory?)") from None

    def run(self, ids: np.ndarray, gen_len: int) -> tuple[Run, int, int | None]:
        import pickle

        pickle.dump(("run", ids, gen_len), self.proc.stdin)
        self.proc.stdin.flush()
        reply = self._recv()
        if reply[0] == "error":
            raise BenchError(reply[1])
        return reply[1], reply[2], reply[3]

    def close(self) -> None:
        import pickle

        try:
            pickle.dump(("stop",), self.proc.stdin)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


class _Channel:
    """The worker's side: pickles over the stdin/stdout pipes; print() output goes to stderr instead."""

    def __init__(self):
        import os
        import sys

        self._out = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._in = sys.stdin.buffer

    def send(self, msg) -> None:
        import pickle

        pickle.dump(msg, self._out)
        self._out.flush()

    def recv(self):
        import pickle

        try:
            return pickle.load(self._in)
        except EOFError:
            return ("stop",)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def run_bench(packages: list[str], spec: BenchSpec, torch_reference: bool = False, progress=None) -> dict:
    from runtime_bench.hardware import copy_bandwidth, cpu_name, gpu_name, session_copy_bandwidth

    spec.check()
    available = available_providers()
    if spec.provider in PLUGINS:
        from amp_edge_runtime.providers import devices

        devices(spec.provider)  # a missing plugin package or device: one ProviderError line before any worker starts
    elif PROVIDERS[spec.provider] not in available:
        raise BenchError(f"provider {spec.provider} is not available here (ONNX Runtime has: {', '.join(available)}); "
                         "install onnxruntime-gpu on a machine with a GPU")
    infos = {p: check_package(p) for p in packages}
    for p, info in infos.items():
        if info.get("context") and max(spec.prompt_lens) + spec.gen_len > info["context"]:
            raise BenchError(f"prompt {max(spec.prompt_lens)} + {spec.gen_len} new tokens exceeds {p}'s context of {info['context']}")
    names = _names(packages)
    workers = {}
    try:
        for p in packages:
            workers[names[p]] = (Worker("onnx", str(p), spec), p, "onnx")
        if torch_reference:
            workers["torch (eager)"] = (Worker("torch", str(packages[0]), spec), packages[0], "torch")
        # the limit is set by the memory the weights live in: the GPU's on CUDA, the host's on CPU
        bandwidth = session_copy_bandwidth(PROVIDERS["cuda"]) if spec.provider == "cuda" else copy_bandwidth()
        rows = {(n, pl): Row(n, str(p), kind, pl, info=infos[p]) for n, (_, p, kind) in workers.items() for pl in spec.prompt_lens}
        rng = np.random.default_rng(spec.seed)
        vocab = min(info.get("vocab") or 32000 for info in infos.values())  # ids every package can embed
        total = len(spec.prompt_lens) * (spec.warmup + spec.repeat) * len(workers)
        done = 0
        for pl in spec.prompt_lens:
            for rep in range(spec.warmup + spec.repeat):
                ids = rng.integers(min(100, vocab // 2), vocab, (spec.batch, pl))
                for n, (w, _, _) in workers.items():  # interleaved: A B A B ...
                    run, peak, device_memory = w.run(ids, spec.gen_len)
                    if rep >= spec.warmup:
                        rows[(n, pl)].runs.append(run)
                    for key in [(n, q) for q in spec.prompt_lens]:
                        rows[key].peak_rss = max(rows[key].peak_rss, peak)
                        if device_memory is not None:
                            rows[key].device_memory = max(rows[key].device_memory or 0, device_memory)
                    done += 1
                    if progress:
                        progress(done, total)
        env = _environment(spec, bandwidth, cpu_name(), {n: w.ready for n, (w, _, _) in workers.items()})
        if spec.provider == "cuda":
            env["gpu"] = gpu_name()
    finally:
        for w, _, _ in workers.values():
            w.close()
    return _report(list(rows.values()), env, spec, names[packages[0]])


def _names(packages: list[str]) -> dict[str, str]:
    """Folder names, with the parent prepended where two packages share a name."""
    bases = [Path(p).resolve().name for p in packages]
    return {p: b if bases.count(b) == 1 else f"{Path(p).resolve().parent.name}/{b}" for p, b in zip(packages, bases)}


def _environment(spec: BenchSpec, bandwidth: float, cpu: str, ready: dict) -> dict:
    import platform

    import onnxruntime as ort

    return {"provider": spec.provider, "threads": spec.threads, "thread_spinning": True, "onnxruntime": ort.__version__, "cpu": cpu,
            "machine": platform.machine(), "python": platform.python_version(), "copy_bandwidth_bytes_per_s": bandwidth,
            "batch": spec.batch, "gen_len": spec.gen_len, "prompt_lens": list(spec.prompt_lens), "repeat": spec.repeat,
            "warmup": spec.warmup, "workers": ready, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _bytes_read(row: Row, summary: dict, spec: BenchSpec) -> float | None:
    """Weights read per decode token plus the KV cache at its mean length over the generation."""
    if row.kind != "onnx" or "read_per_token" not in row.info:
        return None
    kv_mean = summary["kv_bytes_end"] * (row.prompt_len + spec.gen_len / 2) / (row.prompt_len + spec.gen_len)
    return row.info["read_per_token"] + kv_mean


def _report(rows: list[Row], env: dict, spec: BenchSpec, baseline: str) -> dict:
    summaries = [r.summary() for r in rows]
    reads = [_bytes_read(r, s, spec) for r, s in zip(rows, summaries)]
    base = {r.prompt_len: (s, read) for r, s, read in zip(rows, summaries, reads) if r.name == baseline}
    out = []
    for r, s, read in zip(rows, summaries, reads):
        bandwidth = env["copy_bandwidth_bytes_per_s"]
        limit_ms = read / bandwidth * 1e3 if read and bandwidth else None
        b, b_read = base.get(r.prompt_len, (None, None))
        out.append({
            "name": r.name, "path": r.path, "kind": r.kind, "prompt_len": r.prompt_len, **s,
            "dtype": r.info.get("dtype"), "params": r.info.get("params"), "package_bytes": r.info.get("package_bytes"),
            "bytes_read_per_token": read, "limit_ms": limit_ms,
            "x_of_limit": s["decode_ms_mean"] / limit_ms if limit_ms else None,
            "decode_speedup_vs_baseline": b["decode_ms_mean"] / s["decode_ms_mean"] if b else None,
            "bytes_ratio_vs_baseline": b_read / read if read and b_read else None,
            "prefill_speedup_vs_baseline": b["prefill_ms_mean"] / s["prefill_ms_mean"] if b else None,
            "samples": [asdict(run) for run in r.runs],
        })
    return {"environment": env, "baseline": baseline, "rows": out}


if __name__ == "__main__":
    import sys

    from runtime_bench import bench as _module  # the importable module, so pickled classes resolve in the parent

    _kind, _arg, _provider, _threads = sys.argv[1:5]
    worker = _module._onnx_worker if _kind == "onnx" else _module._torch_worker
    worker(_module._Channel(), _arg, _provider, int(_threads) or None)
