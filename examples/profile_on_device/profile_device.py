"""Bench packages on a device that has only Python, onnxruntime and numpy, and bring the report back.

    # a self-contained folder to copy by any means (adb push, scp, an SD card): runtime_bench/ + amp_edge_runtime/ + packages/ + run.sh
    python examples/profile_on_device/profile_device.py stage PKG... --to bench-kit --prompt-len 128,512
    # or all of it over ssh: copy, run, fetch bench.json
    python examples/profile_on_device/profile_device.py ssh user@device PKG... --out device.json --prompt-len 128,512
    # then, on the desktop, the same packages side by side with the device's rows
    amp-edge bench PKG... --out cmp --prompt-len 128,512 --compare-json device.json

On the device only runtime_bench/ runs (``python -m runtime_bench``): no torch, no transformers, no amp-edge.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import amp_edge_runtime
import runtime_bench
from runtime_bench.bench import _names

BENCH_OPTIONS = ("provider", "threads", "prompt_len", "gen_len", "batch", "repeat", "warmup")
RUN_SH = """#!/bin/sh
# Runs on the device. Needs python3 with onnxruntime and numpy: pip install onnxruntime numpy
set -e
cd "$(dirname "$0")"
exec "${{PYTHON:-python3}}" -m runtime_bench {packages} --out result --overwrite {options}
"""


def stage(packages: list[str], folder: Path, options: list[str]) -> Path:
    """``folder``: the sources of runtime_bench and amp_edge_runtime, the packages (hard links where possible) and run.sh."""
    if folder.exists():
        raise SystemExit(f"error: {folder} already exists; pick a new folder")
    for p in packages:
        if not (Path(p) / "model.onnx").is_file():
            raise SystemExit(f"error: {p} is not a package (no model.onnx)")
    for module in (amp_edge_runtime, runtime_bench):  # the bench and the torch-free decoder it runs
        code = folder / module.__name__
        code.mkdir(parents=True)
        for src in Path(module.__file__).parent.glob("*.py"):
            shutil.copy2(src, code / src.name)
    staged = []
    # the same relative names the desktop report gives them, so the rows match in --compare-json
    for src, name in _names(packages).items():
        dst = folder / "packages" / name
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        staged.append(f"packages/{name}")
    script = folder / "run.sh"
    script.write_text(RUN_SH.format(packages=" ".join(shlex.quote(s) for s in staged), options=" ".join(map(shlex.quote, options))))
    script.chmod(0o755)
    return folder


def over_ssh(host: str, packages: list[str], out: Path, options: list[str], remote_dir: str, python: str) -> None:
    """Stage, copy to ``host:remote_dir``, run there, fetch result/bench.json into ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        kit = stage(packages, Path(tmp) / "kit", options)
        d = shlex.quote(remote_dir)  # replace only what a kit holds, never the folder itself
        _call(["ssh", host, f"mkdir -p {d} && cd {d} && rm -rf runtime_bench amp_edge_runtime packages result run.sh"])
        _call(["scp", "-rq"] + [str(p) for p in sorted(kit.iterdir())] + [f"{host}:{remote_dir}/"])
        _call(["ssh", host, f"PYTHON={shlex.quote(python)} sh {shlex.quote(remote_dir)}/run.sh"])
        _call(["scp", "-q", f"{host}:{remote_dir}/result/bench.json", str(out)])
    print(f"device report: {out}\ncompare: amp-edge bench {' '.join(packages)} --out cmp {' '.join(options)} --compare-json {out}")


def _call(cmd: list[str]) -> None:
    print("+", " ".join(map(shlex.quote, cmd)), file=sys.stderr)
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"error: {cmd[0]} failed: {' '.join(cmd[:3])} ...")


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # a package is hundreds of MB: no second copy on the desktop's disk
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _bench_options(args) -> list[str]:
    options = []
    for name in BENCH_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    return options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="write a folder to copy to the device")
    s.add_argument("packages", nargs="+")
    s.add_argument("--to", required=True, type=Path)
    r = sub.add_parser("ssh", help="copy, run on HOST over ssh, fetch bench.json")
    r.add_argument("host")
    r.add_argument("packages", nargs="+")
    r.add_argument("--out", required=True, type=Path, help="where the device's bench.json goes")
    r.add_argument("--remote-dir", default="/tmp/amp-edge-bench")
    r.add_argument("--python", default="python3", help="the device's interpreter")
    for sp in (s, r):  # passed through to python -m runtime_bench on the device
        sp.add_argument("--provider")
        sp.add_argument("--threads", type=int)
        sp.add_argument("--prompt-len")
        sp.add_argument("--gen-len", type=int)
        sp.add_argument("--batch", type=int)
        sp.add_argument("--repeat", type=int)
        sp.add_argument("--warmup", type=int)
    args = p.parse_args(argv)
    if args.command == "stage":
        kit = stage(args.packages, args.to, _bench_options(args))
        print(f"copy {kit} to the device and run: sh {kit.name}/run.sh   (result: {kit.name}/result/bench.json)")
    else:
        over_ssh(args.host, args.packages, args.out, _bench_options(args), args.remote_dir, args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
