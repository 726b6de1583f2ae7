"""``pnnh report DIR``: the table, plots and machine-readable results of a sweep.

Writes ``DIR/report.md``, ``DIR/results.csv`` (one row per cell), ``DIR/results.json`` (cells
and the aggregate rows) and PNG plots: accuracy vs depth, accuracy vs parameters, learning curves,
training throughput, and similarity to the input per layer.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from pnnh.experiments.launch import job_states  # noqa: E402
from pnnh.experiments.sweep import read_cells, unfinished_cells  # noqa: E402
from pnnh.io import atomic_write_text, format_table, write_csv, write_png  # noqa: E402

CSV_FIELDS = ("id", "variant", "model", "depth", "seed", "status", "test_acc", "best_acc", "val_acc", "params",
              "images_per_s", "seconds", "epochs", "reason")


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (variant, depth): accuracy mean and std over the seeds that finished."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["variant"], cell["depth"]), []).append(cell)
    rows = []
    for (variant, depth), group in groups.items():
        done = [c for c in group if c["status"] == "ok" and c["test_acc"] is not None]
        accs = [100 * c["test_acc"] for c in done]
        vals = [100 * c["val_acc"] for c in done if c.get("val_acc") is not None]
        rows.append({
            "variant": variant, "model": group[0]["model"], "depth": depth, "seeds": len(group),
            "finished": len(done), "failed": [f"{c['id']}: {c['status']} {c['reason']}".strip() for c in group
                                              if c["status"] != "ok"],
            "params": group[0]["params"] or next((c["params"] for c in group if c["params"]), None),
            "acc_mean": statistics.fmean(accs) if accs else None,
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
            "val_mean": statistics.fmean(vals) if vals else None,
            "images_per_s": statistics.fmean([c["images_per_s"] for c in done]) if done else None,
        })
    order = {v: i for i, v in enumerate(dict.fromkeys(c["variant"] for c in cells))}
    return sorted(rows, key=lambda r: (order[r["variant"]], r["depth"]))


def _acc_text(row: dict) -> str:
    """``mean ± std`` of an aggregate row; the mean alone for one seed (no spread to show)."""
    if row["acc_mean"] is None:
        return "—"
    return f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f}" if row["finished"] > 1 else f"{row['acc_mean']:.2f}"


def table_markdown(rows: list[dict]) -> str:
    """The aggregate table; a validation column appears when the sweep carved a validation split."""
    with_val = any(r["val_mean"] is not None for r in rows)
    head = "| variant | depth | params | test accuracy (mean ± std) |" + (" val accuracy (mean) |" if with_val else "")
    lines = [head + " seeds ok | train images/s |",
             "|---|---:|---:|---:|" + ("---:|" if with_val else "") + "---:|---:|"]
    for r in rows:
        acc = _acc_text(r)
        val = (f" {r['val_mean']:.2f} |" if r["val_mean"] is not None else " — |") if with_val else ""
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "—"
        params = f"{r['params']:,}" if r["params"] else "—"
        lines.append(f"| {r['variant']} | {r['depth']} | {params} | {acc} |{val} {r['finished']}/{r['seeds']} | {ips} |")
    return "\n".join(lines)


def table_by_depth(rows: list[dict]) -> str | None:
    """Variant x depth: test accuracy, parameters and training images/s side by side (the view
    of a baselines sweep); ``None`` for a sweep with a single depth or a single variant."""
    depths = sorted({r["depth"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if len(depths) < 2 or len(variants) < 2:
        return None
    at = {(r["variant"], r["depth"]): r for r in rows}
    lines = ["| variant | " + " | ".join(f"depth {d}: accuracy · params · images/s" for d in depths) + " |",
             "|---|" + "---:|" * len(depths)]
    for v in variants:
        cells = []
        for d in depths:
            r = at.get((v, d))
            if r is None or r["acc_mean"] is None:
                cells.append("—" if r is None else "failed")
                continue
            params = f"{r['params'] / 1e6:.2f}M" if r["params"] else "—"
            cells.append(f"{_acc_text(r)} · {params} · {r['images_per_s']:.0f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEFAULT_REFERENCE = "resnet"
NOTES_FILE = "notes.md"


def table_vs_reference(cells: list[dict], reference: str, metric: str = "test_acc") -> str | None:
    """Each variant minus ``reference`` at each depth, seed by seed (same seed: same data order and
    augmentation), in accuracy points (``metric``: ``test_acc`` or ``val_acc``), with the
    difference on every seed and the parameter ratio: the view that answers "does X match the
    reference at half its parameters?". ``None`` when nothing can be compared."""
    ok = {(c["variant"], c["depth"], c["seed"]): c for c in cells
          if c["status"] == "ok" and c.get(metric) is not None}
    lines = []
    for variant in dict.fromkeys(c["variant"] for c in cells):
        if variant == reference:
            continue
        for depth in sorted({c["depth"] for c in cells if c["variant"] == variant}):
            seeds = sorted(s for (v, d, s) in ok if v == variant and d == depth and (reference, d, s) in ok)
            if not seeds:
                continue
            deltas = [100 * (ok[variant, depth, s][metric] - ok[reference, depth, s][metric]) for s in seeds]
            mine, theirs = ok[variant, depth, seeds[0]]["params"], ok[reference, depth, seeds[0]]["params"]
            ratio = f"{mine / theirs:.2f}x" if mine and theirs else "—"
            spread = f" [{min(deltas):+.2f}, {max(deltas):+.2f}]" if len(deltas) > 1 else ""
            lines.append(f"| {variant} | {depth} | {statistics.fmean(deltas):+.2f}{spread} | "
                         f"{' / '.join(f'{d:+.2f}' for d in deltas)} | {', '.join(map(str, seeds))} | {ratio} |")
    if not lines:
        return None
    name = {"test_acc": "test", "val_acc": "validation"}.get(metric, metric)
    return "\n".join([f"| variant | depth | {name} accuracy − {reference} (points): mean [min, max] over seeds "
                      f"| per seed | seeds compared | params / {reference} |", "|---|---:|---:|---:|---|---:|", *lines])


def write_report(out: str | Path, reference: str | None = None) -> Path:
    """Write the report files for the sweep in ``out``; return the path of report.md.

    ``reference``: the variant every other one is compared with, seed by seed (default:
    ``resnet`` when the sweep has it, else no comparison); a name the sweep lacks is a ValueError.
    Text in ``out/notes.md`` (how the sweep was run, caveats) goes under the title: report.md
    itself is rewritten on every call, so write notes there, not in report.md."""
    out = Path(out)
    cells = read_cells(out)
    if not cells:
        running = unfinished_cells(out)[0]
        now = f" (training now: {', '.join(running)})" if running else ""
        raise FileNotFoundError(f"no finished cell under {out}/cells{now}: run `pnnh sweep --out {out}` first")
    manifest = yaml.safe_load((out / "sweep.yaml").read_text()) if (out / "sweep.yaml").exists() else {}
    order = {v: i for i, v in enumerate((manifest.get("sweep") or {}).get("variants") or {})}
    cells.sort(key=lambda c: (order.get(c["variant"], len(order)), c["depth"], c["seed"]))  # the recipe's order
    rows = aggregate(cells)
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    if reference is not None and reference not in variants:
        raise ValueError(f"reference variant {reference!r} is not in this sweep's results; "
                         f"it has: {', '.join(variants)}")
    reference = reference or (DEFAULT_REFERENCE if DEFAULT_REFERENCE in variants else None)
    write_csv(out / "results.csv", cells, CSV_FIELDS)
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "cells": cells}, indent=1) + "\n")
    colors = variant_colors(variants)  # aggregate keeps the cells' variant order
    plots = [plot_accuracy_vs_depth(rows, out, colors), plot_accuracy_vs_params(rows, out, colors),
             plot_curves(cells, out, colors), plot_throughput(rows, out, colors),
             plot_similarity(cells, out, colors)]
    versions = manifest.get("versions", {})
    train = manifest.get("train", {})
    failed = [f for r in rows for f in r["failed"]]
    notes = out / NOTES_FILE  # the user's words about this sweep: kept when the report is rewritten
    text = [
        "# pnnh sweep report", "",
        *([notes.read_text().strip(), ""] if notes.exists() else []),
        f"Command: `{manifest.get('command', '?')}`", "",
        *([f"Also run as (execution settings may differ; each cell's config.yaml says how it ran): "
           + "; ".join(f"`{c}`" for c in manifest["also_run_as"]), ""] if manifest.get("also_run_as") else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None), "",
        "Training recipe (shared by every cell): " + ", ".join(f"{k}={v}" for k, v in train.items()), "",
        "Accuracies are the last epoch's, in percent; test: mean ± sample std over seeds. Choose designs on "
        "the validation column when there is one; the test column is for final comparisons.", "",
        table_markdown(rows), "",
    ]
    wide = table_by_depth(rows)
    if wide is not None:
        text += ["The same, one row per variant:", "", wide, ""]
    versus = table_vs_reference(cells, reference, "val_acc") if reference else None
    if versus is not None:  # the deciding comparison, when the sweep held out a validation split
        text += [f"Each variant against {reference}, seed by seed, on validation accuracy:", "", versus, ""]
    versus = table_vs_reference(cells, reference) if reference else None
    if versus is not None:
        text += [f"Each variant against {reference}, seed by seed:", "", versus, ""]
    if failed:
        text += ["Cells that did not finish:", ""] + [f"- {f}" for f in failed] + [""]
    running, waiting = unfinished_cells(out)
    if running or waiting:
        total = len(cells) + len(running) + len(waiting)
        text += [f"**Part-way: {len(cells)} of {total} cells recorded.** Training now: "
                 f"{', '.join(running) or 'none'}. Not started or interrupted (re-run the command to resume): "
                 f"{', '.join(waiting) or 'none'}.", ""]
        jobs = job_states(out)
        held = [f"- {c}: {_job_line(jobs[c])}" for c in running + waiting if c in jobs]
        if held:
            text += ["Cluster jobs (`.jobs/<cell>.json`):", ""] + held + [""]
    text += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(text) + "\n")
    return report


def _job_line(state: dict) -> str:
    """``running on HOST since T (job J, start 2)`` from a cell's job record."""
    where = {"queued": f"queued since {state.get('submitted')}", "running": f"running on {state.get('host')} since "
             f"{state.get('started')}", "requeued": f"requeued at {state.get('requeued')}"}
    text = where.get(state.get("state"), state.get("state", "?"))
    return f"{text} (job {state.get('job')}, start {state.get('starts', 0)})"


def variant_colors(variants: list[str]) -> dict[str, tuple]:
    """One colour per variant, the same in every plot of a report (tab10, tab20 beyond 10)."""
    cmap, n = (plt.cm.tab10, 10) if len(variants) <= 10 else (plt.cm.tab20, 20)
    return {v: cmap(i % n) for i, v in enumerate(variants)}


def _by_variant(rows):
    variants: dict[str, list[dict]] = {}
    for r in rows:
        if r["acc_mean"] is not None:
            variants.setdefault(r["variant"], []).append(r)
    return variants


def _legend(ax) -> None:
    """Inside the axes for a few variants; outside on the right when it would cover the data;
    none when nothing was plotted (every cell of the sweep failed)."""
    labels = len(ax.get_legend_handles_labels()[1])
    if labels == 0:
        return
    if labels > 5:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    else:
        ax.legend()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    write_png(path, fig, dpi=120, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
    plt.close(fig)
    return path


def plot_accuracy_vs_depth(rows: list[dict], out: Path, colors: dict | None = None) -> Path:
    colors = colors or variant_colors(list(_by_variant(rows)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, rs in _by_variant(rows).items():
        ax.errorbar([r["depth"] for r in rs], [r["acc_mean"] for r in rs], yerr=[r["acc_std"] for r in rs],
                    marker="o", capsize=3, label=variant, color=colors[variant])
    ax.set(xlabel="depth (weight layers)", ylabel="test accuracy (%)", title="Accuracy vs depth")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, out / "accuracy_vs_depth.png")


def plot_accuracy_vs_params(rows: list[dict], out: Path, colors: dict | None = None) -> Path:
    colors = colors or variant_colors(list(_by_variant(rows)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, rs in _by_variant(rows).items():
        ax.plot([r["params"] for r in rs], [r["acc_mean"] for r in rs], marker="o", label=variant,
                color=colors[variant])
        for r in rs:
            ax.annotate(str(r["depth"]), (r["params"], r["acc_mean"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale; labels = depth)", ylabel="test accuracy (%)",
           title="Accuracy vs parameters")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, out / "accuracy_vs_params.png")


def plot_throughput(rows: list[dict], out: Path, colors: dict | None = None) -> Path:
    variants = _by_variant(rows)
    colors = colors or variant_colors(list(variants))
    depths = sorted({r["depth"] for rs in variants.values() for r in rs})
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (variant, rs) in enumerate(variants.items()):
        by_depth = {r["depth"]: r["images_per_s"] or 0 for r in rs}
        xs = [d + (i - (len(variants) - 1) / 2) * width for d in range(len(depths))]
        ax.bar(xs, [by_depth.get(d, 0) for d in depths], width, label=variant, color=colors[variant])
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set(xlabel="depth", ylabel="training images / s", title="Training throughput (this machine)")
    _legend(ax)
    return _save(fig, out / "throughput.png")


def read_history(cell_dir: Path) -> list[dict]:
    """A cell's per-epoch metrics (``metrics.jsonl``), one entry per epoch (the last line written
    for an epoch wins: a run killed and resumed may have written one twice); [] without a file."""
    path = cell_dir / "metrics.jsonl"
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: the epoch before it stands
            continue
        if isinstance(entry, dict) and "epoch" in entry:
            by_epoch[entry["epoch"]] = entry
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(cells: list[dict], out: Path, colors: dict | None = None) -> Path | None:
    """Per depth: held-out accuracy (validation when every epoch has it, else test) and training
    loss per epoch, mean over the finished seeds of each variant with their min-max band: does each
    net converge within the budget? ``None`` when no cell has a history."""
    curves: dict[tuple, list[list[dict]]] = {}
    for cell in cells:
        history = read_history(out / "cells" / cell["id"]) if cell["status"] == "ok" else []
        if history:
            curves.setdefault((cell["depth"], cell["variant"]), []).append(history)
    if not curves:
        return None
    use_val = all(h.get("val_acc") is not None for runs in curves.values() for run in runs for h in run)
    key, split = ("val_acc", "validation") if use_val else ("test_acc", "test")
    depths = sorted({d for d, _ in curves})
    colors = colors or variant_colors(list(dict.fromkeys(v for _, v in curves)))
    fig, axes = plt.subplots(2, len(depths), figsize=(3.6 * len(depths) + 1, 6), squeeze=False, sharex="col")
    handles = {}  # one legend entry per variant, whichever depths it has curves at
    for col, depth in enumerate(depths):
        top, bottom = axes[0][col], axes[1][col]
        for (d, variant), runs in curves.items():
            if d != depth:
                continue
            epochs = min(len(run) for run in runs)  # seeds agree on the budget; be safe with a short one
            xs = [runs[0][i]["epoch"] for i in range(epochs)]
            for ax, name, scale in ((top, key, 100.0), (bottom, "train_loss", 1.0)):
                ys = [[scale * run[i][name] for run in runs if run[i].get(name) is not None] for i in range(epochs)]
                if not all(ys):
                    continue
                line, = ax.plot(xs, [statistics.fmean(y) for y in ys], marker=".", color=colors[variant])
                handles.setdefault(variant, line)
                if len(runs) > 1:
                    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=colors[variant], alpha=0.15)
        top.set(title=f"depth {depth}", ylabel=f"{split} accuracy (%)" if col == 0 else None)
        bottom.set(xlabel="epoch", ylabel="training loss (log)" if col == 0 else None, yscale="log")
        bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    order = [v for v in colors if v in handles]
    axes[0][-1].legend([handles[v] for v in order], order, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle("Learning curves: mean over the finished seeds, band = min to max")
    return _save(fig, out / "learning_curves.png")


def plot_similarity(cells: list[dict], out: Path, colors: dict | None = None) -> Path | None:
    """Linear CKA to the input per layer, at init (dashed) and after training (solid), seed 0 of
    each variant at the deepest depth, with the noise floor dotted."""
    probed = [c for c in cells if c.get("probe")]
    if not probed:
        return None
    deepest = max(c["depth"] for c in probed)
    chosen = {}
    for c in sorted(probed, key=lambda c: c["seed"]):
        if c["depth"] == deepest:
            chosen.setdefault(c["variant"], c)
    colors = colors or variant_colors(list(dict.fromkeys(c["variant"] for c in cells)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage in zip(axes, ("init", "end")):
        for variant, c in chosen.items():
            curve = c["probe"].get(stage)
            if curve is None:
                continue
            ax.plot(curve["cka"], color=colors[variant], label=variant)
            ax.plot(curve["cka_noise"], color=colors[variant], linestyle=":", linewidth=1)
        ax.set(xlabel="layer index", title=f"depth {deepest}, {'at init' if stage == 'init' else 'after training'}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("linear CKA to the input (dotted: noise floor)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return _save(fig, out / "similarity_to_input.png")


def format_console_table(rows: list[dict]) -> str:
    header = ("variant", "depth", "params", "test acc %", "val acc %", "seeds", "img/s")
    body = [(r["variant"], r["depth"], f"{r['params']:,}" if r["params"] else "—", _acc_text(r),
             f"{r['val_mean']:.2f}" if r["val_mean"] is not None else "—", f"{r['finished']}/{r['seeds']}",
             f"{r['images_per_s']:.0f}" if r["images_per_s"] else "—") for r in rows]
    return format_table(header, body, align="<>>>>>>")
