"""`pnnh data`: list the datasets, download one, or describe one as pnnh loads it."""
from __future__ import annotations

import argparse
import json
import os
import sys

from pnnh.data.datasets import DATA_ENV, default_cache_dir, list_datasets, load_dataset
from pnnh.data.download import BASE_URL_ENV, SHA256, download
from pnnh.io import os_error_line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command (subcommands list, download, info)."""
    parser = subparsers.add_parser("data", help="list, download and inspect datasets")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    sub.add_parser("list", help="names accepted by --dataset")
    dl = sub.add_parser("download", help="fetch a dataset and verify its SHA-256 digests")
    dl.add_argument("name", choices=sorted(SHA256))
    dl.add_argument("--data-dir", help=f"root directory (default ${DATA_ENV} or {default_cache_dir()})")
    dl.add_argument("--base-url", help=f"mirror URL (default ${BASE_URL_ENV} or the official site)")
    info = sub.add_parser("info", help="load a dataset and print its shapes and statistics as JSON")
    info.add_argument("name", choices=list_datasets())
    info.add_argument("--data-dir")
    info.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    info.add_argument("--img-size", type=int)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run one `pnnh data` subcommand; exit status 0, or 2 with one line on stderr when the data
    cannot be found, read or fetched."""
    try:
        return _run(args)
    except (ValueError, OSError) as err:  # not found, bad format, download failed, unwritable directory
        print(f"pnnh data: error: {os_error_line(err) if isinstance(err, OSError) else err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        print("\n".join(list_datasets()))
    elif args.data_command == "download":
        root = args.data_dir or os.environ.get(DATA_ENV) or default_cache_dir()
        print(download(args.name, root, base_url=args.base_url))
    else:
        s = load_dataset(args.name, data_dir=args.data_dir, download=args.download, img_size=args.img_size)
        print(json.dumps({
            "name": s.name, "train": list(s.train_x.shape), "test": list(s.test_x.shape),
            "num_classes": s.num_classes, "mean": s.mean, "std": s.std, "hflip": s.hflip,
        }, indent=2))
    return 0
