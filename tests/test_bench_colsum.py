"""scripts/bench_colsum.py (the cost and the floor of H2O's column sums, BENCHMARKS.md P5) runs its whole code
path on a short prompt, so it cannot rot between the rare runs that measure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_colsum_runs_on_a_short_prompt():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_colsum.py"), "--tokens", "300",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timed = re.findall(r"^\s*(\w+): \d+\.\d+ s", proc.stdout, flags=re.M)
    assert timed == ["layer", "flash", "sums", "matmul", "exp"]
    assert re.search(r"^colsum \| 300 tokens, .*sums / layer [+-]\d+\.\d%, floor \(matmul \+ exp\) / layer",
                     proc.stdout, flags=re.M)
