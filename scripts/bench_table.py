"""How long a whole `kvbench table` command takes, start-up included, in fresh interpreters.

    python scripts/bench_table.py --results ci/baseline-cpu [--against /path/to/old/checkout:/path/to/its/deps]

Runs the command --repeat times (default 10) and prints the median and the minimum wall time and CPU time
(user + sys of the child). With --against, a second variant runs the same command with that PYTHONPATH
first on the path (another checkout of kvbench, other dependency versions); the two alternate run by run so
that the machine's load falls on both alike, and the last line is the ratio of their medians. Every child
runs in an empty temporary folder with this checkout (or --against) first on PYTHONPATH: `python -m` puts the
working folder ahead of PYTHONPATH, so a child started in a checkout would import that checkout's kvbench.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CHECKOUT = str(Path(__file__).resolve().parents[1])
EMPTY = tempfile.mkdtemp(prefix="bench_table-")


def one_run(results: str, pythonpath: str) -> tuple[float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvbench", "table", "--results", results], env=env, cwd=EMPTY,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"kvbench table failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summary(name: str, runs: list[tuple[float, float]]) -> str:
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    return (f"{name}: wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}), "
            f"CPU median {statistics.median(cpus):.2f} s (min {min(cpus):.2f}), {len(runs)} runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="a results directory kvbench table reads")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--against", help="PYTHONPATH of the variant to compare with (e.g. an older checkout)")
    args = parser.parse_args()
    results = str(Path(args.results).resolve())
    variants = {"this checkout": CHECKOUT} | ({"against": args.against} if args.against else {})
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for pythonpath in variants.values():  # warm the file cache and the bytecode of both sides before timing
        one_run(results, pythonpath)
    for index in range(args.repeat):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            runs[name].append(one_run(results, variants[name]))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in variants:
        print(summary(name, runs[name]))
    if args.against:
        ours = statistics.median(w for w, _ in runs["this checkout"])
        theirs = statistics.median(w for w, _ in runs["against"])
        print(f"wall median ratio this checkout / against: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
