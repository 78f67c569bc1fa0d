"""Measure `nbkit demo` end to end: wall time and peak RSS of the process (CPU, offline).

    python bench/demo_time.py [--steps N] [--repeat K]

Prints one line per run and the median. The README's promise is "under 3 minutes on 2 cores".
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(steps: int | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "nbkit", "demo", "--out", out]
        if steps:
            cmd += ["--steps", str(steps)]
        env_offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        import os

        started = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, **env_offline},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return elapsed, peak_mib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    import os

    print(f"cores: {os.cpu_count()}  python: {sys.version.split()[0]}")
    times = []
    for i in range(args.repeat):
        elapsed, peak = run_once(args.steps)
        times.append(elapsed)
        print(f"run {i + 1}: {elapsed:.1f} s wall, peak child RSS so far {peak:.0f} MiB")
    print(f"median: {statistics.median(times):.1f} s over {len(times)} run(s)")


if __name__ == "__main__":
    main()
