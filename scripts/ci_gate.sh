#!/usr/bin/env bash
# The regression gate's common steps, sourced by scripts/ci_cpu.sh and scripts/ci_gpu.sh after they set:
#   SUITE       the `kvbench run` arguments of the fixed suite (array)
#   BASELINE    the committed baseline directory (ci/baseline-cpu, ci/baseline-gpu)
#   OUT         where the suite's results go (emptied first)
#   GATE_FLAGS  `kvbench compare` flags (array; e.g. --exact, --no-timings)
#   TITLE       heading of the GitHub step summary
# With --update-baseline it makes the run the new baseline instead of gating (review BASELINE/TABLE.md, then
# commit BASELINE with a message that says why predictions moved). Exit codes are kvbench compare's:
# 0 passed, 1 a check failed, 2 bad input (no baseline, fingerprints that differ, a bad flag).
KVBENCH=${KVBENCH:-.venv/bin/kvbench}

gate_main() {
  case "${1:-}" in
    --update-baseline)
      local tmp="$BASELINE.new"
      rm -rf "$tmp"
      local start=$SECONDS
      "$KVBENCH" run "${SUITE[@]}" --results "$tmp"
      "$KVBENCH" table --results "$tmp" --format md --out "$tmp/TABLE.md"
      rm -rf "$BASELINE"
      mv "$tmp" "$BASELINE"
      echo "new baseline in $BASELINE ($((SECONDS - start)) s): review $BASELINE/TABLE.md, then git add $BASELINE" \
           "and commit it saying why predictions moved"
      ;;
    "")
      [ -d "$BASELINE" ] || { echo "no baseline at $BASELINE: run $0 --update-baseline first" >&2; exit 2; }
      rm -rf "$OUT"
      local start=$SECONDS
      "$KVBENCH" run "${SUITE[@]}" --results "$OUT"
      echo "suite ran in $((SECONDS - start)) s"
      local rc=0
      "$KVBENCH" compare "$BASELINE" "$OUT" "${GATE_FLAGS[@]}" --junit "$OUT/junit.xml" --format md \
        > "$OUT/compare.md" || rc=$?
      cat "$OUT/compare.md"
      if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ -f "$OUT/compare.md" ]; then
        { echo "## $TITLE"; cat "$OUT/compare.md"; } >> "$GITHUB_STEP_SUMMARY"
      fi
      exit "$rc"
      ;;
    *)
      echo "usage: $0 [--update-baseline]" >&2
      exit 2
      ;;
  esac
}
