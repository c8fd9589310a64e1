#!/usr/bin/env bash
# The paired comparison for one recovery row that run.sh made: dense, AMP with and without the same recovery, and
# CRITERION with and without it, against dense (compare_CRITERION-RATIO_dense) and against AMP + R500
# (compare_CRITERION-RATIO_amp_r500); for CRITERION amp, AMP with and without recovery against dense
# (compare_amp-RATIO_dense). Reads only files in results/, so it reruns from a clean checkout.
# Usage: compare.sh CRITERION RATIO   e.g. compare.sh magnitude 0.2
set -euo pipefail
criterion=$1 ratio=$2
cd "$(dirname "$0")/../.."; . .venv/bin/activate
R=results/eval_smollm2_135m_n1000_rec_baselines T=results/eval_smollm2_135m_n1000/eval_comparison.json
# 10% rows without recovery are in their own table (same documents, the same dense report).
[ "$ratio" = 0.1 ] && T=results/eval_smollm2_135m_n1000_ratio01/eval_comparison.json
pct=$(python3 -c "print(round(100 * $ratio))")
# A row of the n=1000 table if it has one, else the report run.sh kept here.
row() { if grep -q "\"name\": \"$1\"" $T; then echo "$T#$1"; else echo "$R/$1.eval.json"; fi; }
rows=("$(row dense)" "$(row amp-$ratio-uniform)" "$(row amp-$ratio-uniform-rec-71215d)")
names=dense,amp$pct,amp$pct-R500 refs="0 2"
if [ "$criterion" = amp ]; then
  refs=0
else
  rows+=("$(row $criterion-$ratio-uniform)" "$(row $criterion-$ratio-uniform-rec-71215d)")
  names=$names,$criterion$pct,$criterion$pct-R500
fi
for ref in $refs; do
  tag=$([ $ref = 0 ] && echo dense || echo amp_r500)
  amp-edge eval-compare "${rows[@]}" --names $names --ref $ref --out $R/cmp-tmp --overwrite > /dev/null
  mv $R/cmp-tmp/compare.md $R/compare_$criterion-${ratio}_$tag.md
  mv $R/cmp-tmp/compare.json $R/compare_$criterion-${ratio}_$tag.json
  rmdir $R/cmp-tmp
  echo "$R/compare_$criterion-${ratio}_$tag.md"
done
