"""PNG plots of probe results, one line per model.

Figures are built with matplotlib's object API (``Figure``, rendered by Agg) rather than
pyplot, so importing pnnh never changes the user's backend or open figures.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pnnh.probe.core import crossing_layer
from pnnh.io import write_png


def _values(result: dict, key: str) -> list[float]:
    return [math.nan if v is None else v for v in result[key]]


def _panel(ax, result_by_model: dict[str, dict], key: str, ylabel: str, *, log: bool = False) -> None:
    """One line per model; where the result has ``key + "_noise"`` (the noise floor) it is
    drawn dashed, and ``key + "_noise_self"`` dotted, in the model's colour."""
    styles = {}
    for name, result in result_by_model.items():
        if key not in result:
            continue
        layers = range(len(result[key]))
        (line,) = ax.plot(layers, _values(result, key), label=name, linewidth=1.6)
        for suffix, style, width in (("_noise", "--", 1.0), ("_noise_self", ":", 1.0)):
            if key + suffix in result:
                ax.plot(layers, _values(result, key + suffix), linestyle=style, color=line.get_color(),
                        linewidth=width)
                styles[suffix] = style
    legend = {"_noise": "noise floor (features of noise vs input)",
              "_noise_self": "noise input kept (features of noise vs noise)"}
    for suffix, style in styles.items():
        ax.plot([], [], linestyle=style, color="gray", label=legend[suffix])
    ax.set_xlabel("layer index (0 = first feature layer)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    write_png(path, fig)
    return path


def _figure(panels: int, width: float = 6.5):
    fig = Figure(figsize=(width * panels, 4.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, axes


def plot_probe(result_by_model: dict[str, dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write the probe plots for ``{model name: probe_model result}`` into ``out_dir``.

    similarity.png (CKA and ridge recoverability to the input, noise floors dashed, noise
    kept dotted, crossing layers circled; DISTS too when measured), survival.png (surviving and dead units),
    signal.png (squared channel mean and channel variance, log y), grad_norm.png (log y, when
    gradients were measured). Returns the paths written.
    """
    if not result_by_model:
        raise ValueError("plot_probe needs at least one model's result")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f" — {title}" if title else ""
    results = result_by_model.values()
    paths = []

    similarity = [("cka", "linear CKA to the input"),
                  ("recoverability", "input recoverability (held-out ridge R²)")]
    if any("dists" in r for r in results):
        similarity.append(("dists", "DISTS distance to the input (0 = same)"))
    fig, axes = _figure(len(similarity))
    for ax, (key, label) in zip(axes, similarity):
        _panel(ax, result_by_model, key, label)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, measure in zip(axes, ("cka", "recoverability")):
        for color, result in zip(colors, results):
            cross = crossing_layer(result, measure=measure) if f"{measure}_noise" in result else None
            if cross is not None:
                ax.plot([cross], [result[measure][cross]], "o", color=color, markersize=8,
                        markerfacecolor="none")
    axes[0].set_ylim(bottom=0)
    axes[0].set_title("similarity to the input (circle: reaches its noise floor)")
    axes[1].set_title("how much of the input a linear map recovers")
    fig.suptitle(f"Dissipating inputs{suffix}")
    paths.append(_save(fig, out_dir / "similarity.png"))

    fig, axes = _figure(2)
    _panel(axes[0], result_by_model, "survival", "fraction of features > 0")
    _panel(axes[1], result_by_model, "dead", "fraction of units never > 0 over the batch")
    axes[0].set_title("surviving neurons")
    axes[1].set_title("dead units")
    fig.suptitle(f"Neuron survival{suffix}")
    paths.append(_save(fig, out_dir / "survival.png"))

    fig, axes = _figure(2)
    _panel(axes[0], result_by_model, "sq_channel_mean", "mean over channels of (channel mean)²", log=True)
    _panel(axes[1], result_by_model, "channel_var", "mean channel variance", log=True)
    axes[0].set_title("average squared channel mean")
    axes[1].set_title("average channel variance")
    fig.suptitle(f"Signal propagation{suffix}")
    paths.append(_save(fig, out_dir / "signal.png"))

    if any("grad_norm" in r for r in results):
        fig, (ax,) = _figure(1, width=7)
        _panel(ax, result_by_model, "grad_norm", "‖dLoss / d(features)‖", log=True)
        ax.set_title(f"Gradient norm per layer{suffix}")
        paths.append(_save(fig, out_dir / "grad_norm.png"))
    return paths
