"""`pnnh data`: list the datasets, download one, describe one as pnnh loads it, convert a class-folder
dataset to webdataset tar shards, or write a generated class-folder dataset to try things on."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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
    sh = sub.add_parser("shards", help="copy a class-folder dataset (DIR/train, DIR/val) into webdataset tar shards")
    sh.add_argument("src", help="folder dataset: SRC/train/<class>/<image> and SRC/val (or test)")
    sh.add_argument("dest", help="writes DEST/train/shard-NNNNNN.tar and DEST/val (or test)")
    sh.add_argument("--per-shard", type=int, default=1000, help="images per shard (default 1000)")
    mk = sub.add_parser("make-folder", help="write a generated class-folder dataset (coloured noise, 10 classes)")
    mk.add_argument("dest")
    mk.add_argument("--train", type=int, default=2000, help="train images (default 2000)")
    mk.add_argument("--test", type=int, default=400, help="val images (default 400)")
    mk.add_argument("--classes", type=int, default=10)
    mk.add_argument("--size", type=int, nargs=2, default=(16, 16), metavar=("W", "H"), help="pixels (default 16 16)")
    mk.add_argument("--ext", choices=(".png", ".jpg"), default=".png")
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
    elif args.data_command == "shards":
        from pnnh.data.datasets import folder_splits
        from pnnh.data.streaming import write_shards

        train, test = folder_splits(args.src)
        _, classes = write_shards(train, Path(args.dest) / "train", args.per_shard)
        write_shards(test, Path(args.dest) / test.name, args.per_shard, classes)
        print(f"{args.dest}: train/ and {test.name}/ as tar shards ({len(classes)} classes)")
    elif args.data_command == "make-folder":
        from pnnh.data.streaming import make_image_folder

        print(make_image_folder(args.dest, train=args.train, test=args.test, classes=args.classes,
                                size=tuple(args.size), ext=args.ext))
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
