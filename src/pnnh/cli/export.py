"""``pnnh export RUN_DIR --format torchscript|onnx --out FILE``: a trained run as a plain inference net.

Folds BatchNorm (and, for PNNH, the shared coder) into the convolutions, exports, verifies
the exported file against the trained model on real test images of the run's dataset (max
abs logits difference < 1e-4, fp32; the file is written only if it passes) and times its
inference against the unfolded model and the residual net of equal depth. Writes FILE,
FILE.report.json and FILE.report.png. ONNX needs: pip install 'pnnh[onnx]'.
"""
from __future__ import annotations

import argparse
import sys

from pnnh.cli import add_import_flag


def register(sub) -> None:
    p = sub.add_parser("export", help="fold a trained run into a plain inference net and export it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `pnnh train` run directory (config.yaml + best.pt/last.pt)")
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="default torchscript")
    p.add_argument("--out", required=True, metavar="FILE", help="exported model file (e.g. model.pt, model.onnx)")
    p.add_argument("--check-images", type=int, default=256, metavar="N",
                   help="verify on the first N test images (default 256)")
    p.add_argument("--checkpoint", choices=["auto", "best", "last"], default="auto",
                   help="auto = best.pt if present, else last.pt")
    p.add_argument("--data-dir", help="where the run's dataset is, if not where it was at training time")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward when timing (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, help="torch intra-op threads when timing (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists (default: refuse)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_import_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pnnh.experiments.export import ExportError, ExportMismatch, export_run, format_report, write_report
    from pnnh.train.config import ConfigError

    if args.threads is not None:
        if args.threads < 1:
            print(f"pnnh export: error: --threads={args.threads} is not valid; use 1 or more", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        report = export_run(args.run_dir, args.out, args.format, check_images=args.check_images,
                            checkpoint=args.checkpoint, data_dir=args.data_dir, batch_size=args.batch_size,
                            repeats=args.repeats, progress=args.progress, overwrite=args.force)
    except ExportMismatch as err:  # the work failed, the input was fine
        print(f"pnnh export: error: {err}", file=sys.stderr)
        return 1
    except (ExportError, ConfigError) as err:
        print(f"pnnh export: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    paths = write_report(report)
    print(f"wrote {report.out}, {', '.join(map(str, paths))}")
    return 0
