"""Throughput, peak memory and FLOPs of plain, residual and PNNH nets at matched depth and width.

The same benchmark as ``pnnh bench`` (see pnnh.experiments.bench for how each figure is
measured), as a script:

    python benchmarks/throughput.py                       # all groups, fp32 + bf16, channels_last
    python benchmarks/throughput.py --group cifar56 --precision bf16 --out runs/bench/cifar56

Writes bench.json / bench.csv / bench.png / bench.txt to --out and prints the table.
"""
from __future__ import annotations

import argparse
import sys

from pnnh.cli.bench import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
