"""``python -m benchmarks [--only NAME] [options...]``: run every ``bench_*`` module of this package.

Options other than ``--only`` are handed to each benchmark's ``main(argv)``, e.g.
``make bench BENCH_ARGS="--ops 20000 --rounds 3"``. ``--list`` names the benchmarks. Afterwards
``docs/performance.md`` is regenerated from every result (``benchmarks/report.py``) unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def discover() -> list[str]:
    """Names of the benchmark modules present (``bench_*.py``), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, add_help=False)
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)")
    parser.add_argument("--list", action="store_true", help="name the benchmarks and exit")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate docs/performance.md afterwards")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    available = discover()
    if args.help:
        parser.print_help()
        print(f"\nbenchmarks: {', '.join(available)}; `python -m benchmarks.<name> --help` for their options")
        return 0
    if args.list:
        print("\n".join(available))
        return 0
    chosen = args.only or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    status = 0
    for name in chosen:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        status = max(status, module.main(rest))
    if not args.no_report:
        from .report import main as report

        report([])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
