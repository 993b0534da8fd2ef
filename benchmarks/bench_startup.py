"""Start-up cost of the plugin for every Python process of the environment.

``llamafactory_minorsft.pth`` runs at each interpreter start. This script starts ``python -c pass`` of the
environment ``--runs`` times with the plugin on and as many with ``LLAMAFACTORY_MINORSFT_DISABLE=1`` (alternating,
in one run), and reports the best and the median wall time of each and their difference. It also sums what
``python -X importtime`` reports for this package's modules at start-up (the .pth line's whole import cost, against
an interpreter without it). Target: at most 5 ms over the interpreter without the plugin.

    .venv/bin/python benchmarks/bench_startup.py          # writes benchmarks/STARTUP.md
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_MS = 5.0


def start(disabled: bool) -> float:
    env = {**os.environ, "LLAMAFACTORY_MINORSFT_DISABLE": "1" if disabled else "0"}
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - begin) * 1000


def import_time_ms() -> float:
    """The cumulative start-up import time of this package's top-level imports, from ``-X importtime``."""
    env = {**os.environ, "LLAMAFACTORY_MINORSFT_DISABLE": "0"}
    stderr = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], env=env, check=True, capture_output=True, text=True
    ).stderr
    entries = []  # (depth, cumulative µs) of this package's modules
    for line in stderr.splitlines():  # "import time: self [us] | cumulative | <2 spaces per depth>name"
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip().startswith("llamafactory_minorsft"):
            entries.append((len(parts[2]) - len(parts[2].lstrip()), int(parts[1])))
    top = min(depth for depth, _ in entries)
    total = sum(cumulative for depth, cumulative in entries if depth == top)  # the .pth line's imports
    return total / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--output", default=os.path.join(HERE, "STARTUP.md"))
    args = parser.parse_args()
    times = {True: [], False: []}
    for _ in range(args.runs):
        for disabled in (False, True):
            times[disabled].append(start(disabled))
    imports = statistics.median(import_time_ms() for _ in range(5))
    best = {key: min(values) for key, values in times.items()}
    median = {key: statistics.median(values) for key, values in times.items()}
    delta_best, delta_median = best[False] - best[True], median[False] - median[True]
    ok = max(delta_best, delta_median, imports) <= TARGET_MS
    text = "\n".join(
        [
            "# Start-up cost",
            "",
            f"Command: `.venv/bin/python benchmarks/bench_startup.py --runs {args.runs}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, Python "
            f"{platform.python_version()}; date {time.strftime('%Y-%m-%d')}. `python -c pass` of the environment, "
            f"{args.runs} starts each, alternating.",
            "",
            "| | best (ms) | median (ms) |",
            "|---|---|---|",
            f"| plugin on | {best[False]:.1f} | {median[False]:.1f} |",
            f"| `LLAMAFACTORY_MINORSFT_DISABLE=1` | {best[True]:.1f} | {median[True]:.1f} |",
            f"| difference | {delta_best:+.1f} | {delta_median:+.1f} |",
            "",
            f"`python -X importtime -c pass`: this package's start-up imports take {imports:.1f} ms (cumulative, median "
            "of 5), against an interpreter without the .pth line.",
            "",
            f"Target ≤ {TARGET_MS:.0f} ms: {'met' if ok else '**missed**'}.",
            "",
        ]
    )
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
