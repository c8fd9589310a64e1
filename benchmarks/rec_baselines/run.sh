#!/usr/bin/env bash
# One recovery row of the n=1000 comparison: CRITERION at RATIO + the 500-step recipe (row name *-rec-71215d),
# with the commands benchmarks/eval_comparison.py runs for that row (prune, export, eval), timed.
# Usage: run.sh CRITERION RATIO   e.g. run.sh random 0.2   (from any checkout; writes under out/eval_work1000)
set -euo pipefail
criterion=$1 ratio=$2
cd "$(dirname "$0")/../.."; . .venv/bin/activate; export AMP_EDGE_DATA_DIR=${AMP_EDGE_DATA_DIR:-../shared/data}
W=out/eval_work1000 N=$criterion-$ratio-uniform-rec-71215d D=$AMP_EDGE_DATA_DIR
mkdir -p $W
if [ ! -f $W/$N-ckpt/amp_edge_plan.json ]; then
  t0=$(date +%s)
  /usr/bin/time -v amp-edge prune smollm2-135m --ratio "$ratio" --criterion "$criterion" --allocation uniform --heads auto \
    --calib $D/calibration/c4_demo.jsonl --seed 0 --out $W/$N-ckpt --overwrite \
    --refit --recover distill --recover-precision bf16 --recover-steps 500 --recover-batch-size 4 \
    --recover-data $D/calibration/c4_demo.jsonl,$D/calibration/alpaca_en_demo.json >> $W/$N.log 2>&1
  echo $(( $(date +%s) - t0 )) > $W/$N.prune_seconds
fi
[ -f $W/$N-pkg/amp_edge.json ] || amp-edge export $W/$N-ckpt --out $W/$N-pkg --overwrite >> $W/$N.log 2>&1
[ -f $W/$N-eval/eval.json ] || /usr/bin/time -v amp-edge eval $W/$N-pkg \
  --tasks wikitext2,piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa --limit 1000 --max-tokens 32768 \
  --window 1024 --data-dir $D --out $W/$N-eval --overwrite >> $W/$N.log 2>&1
# Keep the report (with each document's outcome, for paired errors) beside the tables: out/ does not survive a new checkout.
cp $W/$N-eval/eval.json results/eval_smollm2_135m_n1000_rec_baselines/$N.eval.json
echo "$N: results/eval_smollm2_135m_n1000_rec_baselines/$N.eval.json"
