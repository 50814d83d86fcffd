#!/usr/bin/env bash
# CPU regression gate, run by .ci/run on every landing: a small fixed suite (SmolLM2-135M from the embedded
# GGUF, float32, one thread, 4 methods x the first real LongBench record of each ci/suite task, prompts
# middle-truncated to 1024 tokens by the official rule, so the suite takes minutes on a busy 2-core machine) gated with
# `kvbench compare --exact` against the committed ci/baseline-cpu. One thread and float32 make every greedy
# decode reproducible on this machine, so any changed prediction fails; timings are reported, not gated (the
# CI machine is shared). See ci/README.md.
#
#   scripts/ci_cpu.sh                     run the suite into $OUT (default out/ci-cpu) and gate it
#   scripts/ci_cpu.sh --update-baseline   run it and make the result the new ci/baseline-cpu (then commit it)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

BASELINE=ci/baseline-cpu
OUT=${OUT:-out/ci-cpu}
TITLE="kvbench CPU regression gate (exact)"
SUITE=(--model smollm2-135m --method fullkv,snapkv,streamingllm_prefill,chunkkv --ratio 0.2
       --tasks 2wikimqa,multifieldqa_en,lcc --data-dir ci/suite --limit 1 --max-length 1024 --dtype float32
       --device cpu)
GATE_FLAGS=(--exact --no-timings)
source scripts/ci_gate.sh
gate_main "$@"
