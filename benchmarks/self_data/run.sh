#!/usr/bin/env bash
# AMP 20% + refit + distill R500 on c4_demo + alpaca + 1024 dense-written samples; resumable (rerun the same script)
cd "$(dirname "$0")/../.."; . .venv/bin/activate; export AMP_EDGE_DATA_DIR=${AMP_EDGE_DATA_DIR:-../shared/data}
/usr/bin/time -v amp-edge prune smollm2-135m --ratio 0.2 --criterion amp --allocation uniform --heads auto \
  --calib $AMP_EDGE_DATA_DIR/calibration/c4_demo.jsonl --seed 0 --out out/self/amp20-self-ckpt --overwrite \
  --refit --recover distill --recover-precision bf16 --recover-steps 500 --recover-batch-size 4 \
  --recover-data $AMP_EDGE_DATA_DIR/calibration/c4_demo.jsonl,$AMP_EDGE_DATA_DIR/calibration/alpaca_en_demo.json,self \
  --recover-self-samples 1024 --recover-resume-dir out/self/amp20-self-resume
