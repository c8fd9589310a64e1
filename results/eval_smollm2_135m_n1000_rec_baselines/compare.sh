#!/usr/bin/env bash
# The paired comparison for one recovery row that run.sh made: dense, AMP with and without the same recovery, and
# CRITERION with and without it, against dense (compare_CRITERION-RATIO_dense) and against AMP + R500
# (compare_CRITERION-RATIO_amp_r500). Reads only files in results/, so it reruns from a clean checkout.
# Usage: compare.sh CRITERION RATIO   e.g. compare.sh magnitude 0.2
set -euo pipefail
criterion=$1 ratio=$2
cd "$(dirname "$0")/../.."; . .venv/bin/activate
R=results/eval_smollm2_135m_n1000_rec_baselines T=results/eval_smollm2_135m_n1000/eval_comparison.json
pct=$(python3 -c "print(round(100 * $ratio))")
rows=("$T#dense" "$T#amp-$ratio-uniform" "$T#amp-$ratio-uniform-rec-71215d" "$T#$criterion-$ratio-uniform"
      "$R/$criterion-$ratio-uniform-rec-71215d.eval.json")
names=dense,amp$pct,amp$pct-R500,$criterion$pct,$criterion$pct-R500
for ref in 0 2; do
  tag=$([ $ref = 0 ] && echo dense || echo amp_r500)
  amp-edge eval-compare "${rows[@]}" --names $names --ref $ref --out $R/cmp-tmp --overwrite > /dev/null
  mv $R/cmp-tmp/compare.md $R/compare_$criterion-${ratio}_$tag.md
  mv $R/cmp-tmp/compare.json $R/compare_$criterion-${ratio}_$tag.json
  rmdir $R/cmp-tmp
  echo "$R/compare_$criterion-${ratio}_$tag.md"
done
