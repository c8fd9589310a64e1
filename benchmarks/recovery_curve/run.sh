#!/usr/bin/env bash
# One point of the recovery curve: AMP at RATIO, refit, then STEPS steps of the default distillation recipe (STEPS 0:
# refit only), exported to fp32 and evaluated at n=1000 like the rows of results/eval_smollm2_135m_n1000; the report
# (with each document's outcome, for paired errors) is kept in results/recovery_curve/. Resumable: rerun the same line.
# Usage: run.sh RATIO STEPS [TAG PRUNE-OPTION...]   e.g. run.sh 0.3 150   (writes under out/recovery_curve)
# A TAG names a variant of the recipe, its options added to the prune command (e.g. run.sh 0.3 150 lr3e-4 --recover-lr
# 3e-4); variants are kept in results/recovery_variants/ and stay off the curve.
set -euo pipefail
ratio=$1 steps=$2 tag=${3:-}; extra=("${@:4}")
cd "$(dirname "$0")/../.."; . .venv/bin/activate; export AMP_EDGE_DATA_DIR=${AMP_EDGE_DATA_DIR:-../shared/data}
W=out/recovery_curve N=amp-$ratio-refit-r$steps${tag:+-$tag} D=$AMP_EDGE_DATA_DIR R=results/recovery_curve
[ -n "$tag" ] && R=results/recovery_variants
mkdir -p $W $R
recover=()
[ "$steps" -gt 0 ] && recover=(--recover distill --recover-precision bf16 --recover-steps "$steps" --recover-batch-size 4
  --recover-data "$D/calibration/c4_demo.jsonl,$D/calibration/alpaca_en_demo.json")
if [ ! -f $W/$N-ckpt/amp_edge_plan.json ]; then
  t0=$(date +%s)
  /usr/bin/time -v amp-edge prune smollm2-135m --ratio "$ratio" --criterion amp --allocation uniform --heads auto \
    --calib $D/calibration/c4_demo.jsonl --seed 0 --out $W/$N-ckpt --overwrite --refit "${recover[@]}" "${extra[@]}" >> $W/$N.log 2>&1
  echo $(( $(date +%s) - t0 )) > $W/$N.prune_seconds
fi
[ -f $W/$N-pkg/amp_edge.json ] || amp-edge export $W/$N-ckpt --out $W/$N-pkg --overwrite >> $W/$N.log 2>&1
[ -f $W/$N-eval/eval.json ] || /usr/bin/time -v amp-edge eval $W/$N-pkg \
  --tasks wikitext2,piqa,hellaswag,winogrande,arc_easy,arc_challenge,boolq,openbookqa --limit 1000 --max-tokens 32768 \
  --window 1024 --data-dir $D --out $W/$N-eval --overwrite >> $W/$N.log 2>&1
cp $W/$N-eval/eval.json $R/$N.eval.json
echo "$(cat $W/$N.prune_seconds) s prune" > $R/$N.prune_seconds.txt
echo "$N: $R/$N.eval.json"
