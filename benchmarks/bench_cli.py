"""Start-up time of the console script: every help text and `reference families`.

    python benchmarks/bench_cli.py [--repeat 5] [--root DIR]

Each command is `python -m reference ...` in a fresh process, its whole wall time, run
--repeat times round-robin over the rows (so that load from other processes hits every row
alike); the median, best and worst are shown. The first row is the interpreter alone. The
package timed is the one in --root (default: this checkout), whatever is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--help"], ["convert", "--help"], ["families", "--help"], ["demo", "--help"],
            ["train", "--help"], ["families"]]


def wall(argv: list[str], root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    subprocess.run(argv, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per row; the median is shown")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose `reference` package is timed")
    args = parser.parse_args()
    rows = {"python -c pass": [sys.executable, "-c", "pass"]}
    rows.update({"reference " + " ".join(c): [sys.executable, "-m", "reference", *c] for c in COMMANDS})
    for argv in rows.values():  # once untimed: every file in the page cache
        wall(argv, args.root)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeat):
        for name, argv in rows.items():
            times[name].append(wall(argv, args.root))
    from reference.families.cli import table

    out = [["command", "median s", "best s", "worst s"]]
    out += [[name, f"{statistics.median(t):.3f}", f"{min(t):.3f}", f"{max(t):.3f}"]
            for name, t in times.items()]
    print(table(out))


if __name__ == "__main__":
    main()
