#!/usr/bin/env bash
# Regression gate: run a fixed small suite (ci/suite, see ci/README.md) and compare it with the committed
# baseline ci/baseline; exit 1 when any (method, budget, task) drops more than FAIL_BELOW points.
#
#   scripts/ci_gpu.sh                     run the suite into $OUT and gate it against ci/baseline
#   scripts/ci_gpu.sh --update-baseline   run the suite and make the result the new ci/baseline (then commit it)
#
# Environment:
#   KVBENCH_DEVICE  device for the suite (default cuda; `KVBENCH_DEVICE=cpu` works anywhere, slowly)
#   FAIL_BELOW      points a task may drop before the gate fails (default 5)
#   OUT             where the suite's results go (default out/ci-gpu; emptied first)
#   KVBENCH         the kvbench executable (default .venv/bin/kvbench, as scripts/setup.sh installs it)
#
# The suite pins --dtype float32 (dtype is part of the protocol fingerprint, so a baseline made on one device
# is comparable on another); `kvbench compare` refuses results of another fingerprint instead of averaging.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

KVBENCH=${KVBENCH:-.venv/bin/kvbench}
DEVICE=${KVBENCH_DEVICE:-cuda}
FAIL_BELOW=${FAIL_BELOW:-5}
OUT=${OUT:-out/ci-gpu}
BASELINE=ci/baseline
SUITE=(--model smollm2-135m --method fullkv,snapkv,chunkkv,streamingllm --ratio 0.2
       --tasks 2wikimqa,multifieldqa_en,lcc --data-dir ci/suite --dtype float32 --device "$DEVICE")

case "${1:-}" in
  --update-baseline)
    tmp="$BASELINE.new"
    rm -rf "$tmp"
    "$KVBENCH" run "${SUITE[@]}" --results "$tmp"
    "$KVBENCH" table --results "$tmp" --format md --out "$tmp/TABLE.md"
    rm -rf "$BASELINE"
    mv "$tmp" "$BASELINE"
    echo "new baseline in $BASELINE (made on $DEVICE): review $BASELINE/TABLE.md, then git add $BASELINE and commit"
    ;;
  "")
    [ -d "$BASELINE" ] || { echo "no baseline at $BASELINE: run $0 --update-baseline first" >&2; exit 2; }
    rm -rf "$OUT"
    "$KVBENCH" run "${SUITE[@]}" --results "$OUT"
    rc=0
    "$KVBENCH" compare "$BASELINE" "$OUT" --fail-below "$FAIL_BELOW" --format md > "$OUT/compare.md" || rc=$?
    cat "$OUT/compare.md"
    if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
      { echo "## kvbench regression gate (fail below -$FAIL_BELOW points)"; cat "$OUT/compare.md"; } >> "$GITHUB_STEP_SUMMARY"
    fi
    exit "$rc"
    ;;
  *)
    echo "usage: $0 [--update-baseline]" >&2
    exit 2
    ;;
esac
