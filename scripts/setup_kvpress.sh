#!/usr/bin/env bash
# Build ./.venv-kvpress: NVIDIA kvpress 0.5.5 in its own virtualenv, for the P3 side-by-side
# (scripts/bench.py P3, tests/test_kvpress_parity.py). kvpress 0.5.5 needs transformers < 5.3 and
# pandas < 3, which kvbench's own environment (transformers 5.23) cannot hold.
#   PYTHON      interpreter for the virtualenv (default python3; kvpress needs >= 3.10)
#   TORCH_SPEC  torch to install first (default torch==2.13.0, the CPU wheel on our machines; an unpinned
#               torch would pull torch 2.15 and about 20 CUDA wheels)
# Idempotent: re-running it only checks what is installed. Needs the package index (network) once; the
# test and the benchmark never do.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${KVPRESS_VENV:-.venv-kvpress}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: kvpress only asks for torch<3,>=2.3.1, which an existing 2.13.0 satisfies.
pip install "$TORCH_SPEC"
# kvpress itself. Its own pins (transformers<5.3, pandas<3, accelerate<2, numpy<3) decide the rest; the
# constraint keeps pip from ever replacing the CPU torch.
echo "$TORCH_SPEC" > "$VENV/torch-constraint.txt"
pip install -c "$VENV/torch-constraint.txt" "kvpress==0.5.5"
# The embedded SmolLM2 is read from kvbench's converted safetensors folder (made by scripts/setup.sh), so
# gguf is not needed here. Report what pip resolved, and check torch is still the CPU build.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
names = ["kvpress", "torch", "transformers", "accelerate", "pandas", "numpy", "datasets", "peft", "tokenizers",
         "safetensors", "huggingface_hub"]
print("kvpress environment:", ", ".join(f"{n}=={md.version(n)}" for n in names))
print("torch build:", torch.__version__, f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
import kvpress  # noqa: F401  (imports the presses and the pipeline: a broken resolution fails here)
PY
echo "kvpress ready in $VENV"
