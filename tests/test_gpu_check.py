"""scripts/gpu_check.py, the engine-at-scale check prepared for a GPU machine, runs its whole code path on the
CPU with tiny shapes (`--device cpu --tiny`), so it cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--models", "qwen2-tiny", "--lengths", "64,96", "--prefill-chunk", "32", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    measures = {r["measure"] for r in rows}
    assert "prefill s (FullKV, chunks of 32)" in measures
    assert any(m.startswith("sweep 6 methods x 0.1, batched") for m in measures)
    assert any(m.startswith("sweep 6 methods x 0.1, sequential") for m in measures)
    assert "| prefill with H2O's column sums / without |" in proc.stdout


def test_gpu_check_refuses_an_unknown_shape():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--models", "gpt5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown model shape gpt5" in proc.stderr
