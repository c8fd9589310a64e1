"""Decode speed of amp-edge packages next to onnxruntime-genai model-builder output, same runtime, same machine.

Both kinds of package run in onnxruntime-genai's generator (so the comparison is about the graphs), and
amp-edge packages also in amp-edge's own ONNX Runtime loop. Runs are interleaved (A B A B ...) so drift
hits all alike. The builder's output is made in its own environment (it needs transformers 5):

    python -m onnxruntime_genai.models.builder -i DENSE_HF_FOLDER -o builder_int4 -p int4 -e cpu

    python benchmarks/compare_builder.py --threads 2 --prompt-len 128 --gen-len 64 --repeat 5 \
        amp-fp32=pk/dense_fp32 builder-fp32=builder_fp32 amp-int4=pk/dense_int4 builder-int4=builder_int4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np


def genai_run(model, ids: np.ndarray, gen_len: int) -> tuple[float, list[float]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + gen_len, min_length=ids.shape[1] + gen_len, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids.astype(np.int32))
    gen.generate_next_token()
    prefill = time.perf_counter() - t0
    steps = []
    while not gen.is_done():
        t = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t)
    return prefill, steps


def loop_run(decoder, ids: np.ndarray, gen_len: int) -> tuple[float, list[float]]:
    from amp_edge_runtime.decoder import StepTimes

    times = StepTimes()
    decoder.generate(ids, gen_len, times=times)
    return times.prefill_s, times.decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packages", nargs="+", help="name=folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    import onnxruntime as ort
    import onnxruntime_genai as og

    from amp_edge_runtime.decoder import OnnxDecoder
    from amp_edge_runtime.session import session_options

    ids = np.random.default_rng(0).integers(100, 20000, (1, args.prompt_len))
    runners = {}
    for spec in args.packages:
        name, folder = spec.split("=", 1)
        config = og.Config(folder)
        config.clear_providers()
        # the same thread count in both runtimes (genai's default session leaves it to ONNX Runtime)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads,
                                                                              "inter_op_num_threads": 1}}}}))
        model = og.Model(config)
        runners[f"{name} [genai]"] = (genai_run, model)
        # every graph in amp-edge's loop too (the builder's has the same inputs): graph against graph in both runtimes
        runners[f"{name} [amp-edge loop]"] = (loop_run, OnnxDecoder(folder, options=session_options(args.threads)))
    samples = {k: {"prefill": [], "decode": []} for k in runners}
    for rep in range(args.repeat + 1):  # the first round warms up and is dropped
        for name, (fn, obj) in runners.items():
            prefill, steps = fn(obj, ids, args.gen_len)
            if rep:
                samples[name]["prefill"].append(prefill * 1e3)
                samples[name]["decode"] += [s * 1e3 for s in steps]
    print(f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}, "
          f"prompt {args.prompt_len}, {args.gen_len} new tokens, {args.repeat} repeats")
    print("| run | prefill ms (median) | decode ms/token (median) | p90 |")
    print("|---|---:|---:|---:|")
    for name, s in samples.items():
        d = sorted(s["decode"])
        print(f"| {name} | {statistics.median(s['prefill']):.1f} | {statistics.median(d):.2f} | {d[int(0.9 * (len(d) - 1))]:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "samples": samples}, f)


if __name__ == "__main__":
    main()
