"""How long `initscope methods` takes beside `import torch`, each in a fresh interpreter (issue 16: a user's
first command took 4 s, most of it torchvision's import, which pulls in torch._dynamo).

Target: ratio <= 1.3 (the listing costs little beyond torch, which the method registry needs).
Both are timed alternately, ``--repeat`` times each; the medians are compared.

Run: ``python benchmarks/cli_start.py [--repeat 5]`` (also by `make bench`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "initscope methods": [sys.executable, "-m", "initscope.cli", "methods"],
    "import torch, torchvision": [sys.executable, "-c", "import torch, torchvision"],
}


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, cmd in COMMANDS.items():
            times[name].append(_time(cmd))
    base = statistics.median(times["import torch"])
    for name, ts in times.items():
        print(f"{name:28s} median/import torch = {statistics.median(ts) / base:.2f}  (n={len(ts)})")


if __name__ == "__main__":
    main()
