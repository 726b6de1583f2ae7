"""Neuron-response statistics at He-normal initialization (PNNH.md section 1, item 2).

The paper's Thm 3.2 gives the mean and variance of a pre-activation in a plain layer
(y = Wx) and in a residual layer (y = x + Wx); Thm 3.3 turns them into a lower bound on the
fraction of surviving neurons (pre-activation > 0) with Cantelli's inequality. This module
implements the paper's form, the exact moments, the bound, and a Monte-Carlo check that
samples W and x literally.

Assumptions shared by every function here (dks style: stated, then checked numerically):

- W is n x n with iid entries N(0, 2/n) (He-normal, fan_in = width n);
- the input x has iid elements with mean ``mu`` and variance ``sigma**2``, independent of W;
- moments are taken over the joint distribution of W and x (a random neuron of a random
  network on a random input).

Derivation of the exact moments. Plain: E[y_i] = sum_j E[W_ij] E[x_j] = 0 and, because the
W_ij are independent with mean 0, Var(y_i) = sum_j E[W_ij^2] E[x_j^2] = n (2/n)(mu^2 + sigma^2)
= 2(mu^2 + sigma^2). The second moment of x enters, not its variance: the paper's 2 sigma^2
holds when mu = 0 (or when sigma^2 is read as the second moment). Residual: E[y_i] = mu, and
Cov(x_i, (Wx)_i) = sum_j E[W_ij] E[x_i x_j] = 0, so Var(y_i) = sigma^2 + 2(mu^2 + sigma^2)
= 3 sigma^2 + 2 mu^2 (paper: 3 sigma^2).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pnnh.io import format_table as _format_table
from pnnh.io import write_png

FORMS = ("exact", "paper")
INPUT_DISTS = ("normal", "uniform", "relu")

# Mean and standard deviation of ReLU(z), z ~ N(0, 1): the "relu" input distribution is an
# affine map of ReLU(z) matched to (mu, sigma). The CLI defaults mu = 0.4, sigma = 0.58 are
# these values, i.e. the input of a layer that follows a ReLU of unit-variance pre-activations.
_RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)
_RELU_STD = math.sqrt(0.5 - 1.0 / (2.0 * math.pi))


def _check_inputs(mu: float, sigma: float) -> None:
    if not math.isfinite(mu):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def plain_moments(mu: float, sigma: float, form: str = "exact") -> tuple[float, float]:
    """Mean and variance of a plain pre-activation y = Wx at He-normal init.

    exact: (0, 2(mu^2 + sigma^2)); paper (Thm 3.2): (0, 2 sigma^2), equal to exact iff mu = 0.
    Assumptions: see the module docstring.
    """
    _check_inputs(mu, sigma)
    _check_form(form)
    second_moment = sigma**2 if form == "paper" else mu**2 + sigma**2
    return 0.0, 2.0 * second_moment


def residual_moments(mu: float, sigma: float, form: str = "exact") -> tuple[float, float]:
    """Mean and variance of a residual pre-activation y = x + Wx at He-normal init.

    exact: (mu, 3 sigma^2 + 2 mu^2); paper (Thm 3.2): (mu, 3 sigma^2). The identity path adds
    Var(x) = sigma^2 to the plain variance, and x_i is uncorrelated with (Wx)_i.
    Assumptions: see the module docstring.
    """
    _, plain_var = plain_moments(mu, sigma, form)
    return float(mu), sigma**2 + plain_var


def cantelli_survival_bound(mean: float, var: float) -> float:
    """Lower bound on P(y > 0) from Cantelli's inequality: mean^2 / (mean^2 + var).

    Valid for any y with that mean and variance when mean >= 0 (Thm 3.3). For mean <= 0
    Cantelli gives no positive lower bound, so the trivial bound 0 is returned.
    """
    if not (math.isfinite(var) and var >= 0):
        raise ValueError(f"var must be a finite number >= 0, got {var!r}")
    if mean <= 0:
        return 0.0
    return mean**2 / (mean**2 + var)


def _sample_inputs(rng: np.random.Generator, shape: tuple[int, ...], mu: float, sigma: float,
                   input_dist: str) -> np.ndarray:
    if input_dist == "normal":
        return rng.normal(mu, sigma, shape)
    if input_dist == "uniform":
        half = math.sqrt(3.0) * sigma  # U(-a, a) has variance a^2 / 3
        return rng.uniform(mu - half, mu + half, shape)
    relu = np.maximum(rng.standard_normal(shape), 0.0)
    return mu + (relu - _RELU_MEAN) * (sigma / _RELU_STD)


def monte_carlo(mu: float, sigma: float, width: int, n_samples: int, seed: int = 0,
                input_dist: str = "normal", progress: bool = False) -> dict:
    """Estimate plain and residual pre-activation mean, variance and survival rate P(y > 0).

    Each of ``n_samples`` draws samples a fresh W (width x width, N(0, 2/width)) and a fresh
    input x (width elements from ``input_dist`` with mean mu, std sigma: "normal", "uniform",
    or "relu" = an affine map of ReLU(N(0, 1))) and contributes all ``width`` neurons of
    y = Wx and y = x + Wx. Returns {"plain": {...}, "residual": {...}, "n_values": int} with
    "mean", "var" and "survival" per net.
    """
    _check_inputs(mu, sigma)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if input_dist not in INPUT_DISTS:
        raise ValueError(f"input_dist must be one of {INPUT_DISTS}, got {input_dist!r}")
    rng = np.random.default_rng(seed)
    # Sums are shifted by the exact mean so the variance does not come from a difference of
    # two large numbers.
    nets = {"plain": 0.0, "residual": float(mu)}
    sums = {net: np.zeros(3) for net in nets}  # sum(d), sum(d^2), count(y > 0); d = y - shift
    chunk = max(1, min(n_samples, 2**22 // (width * width)))  # ~32 MB of W per chunk
    done = 0
    with tqdm(total=n_samples, desc="monte carlo", unit="draw", disable=not progress) as bar:
        while done < n_samples:
            k = min(chunk, n_samples - done)
            w = rng.normal(0.0, math.sqrt(2.0 / width), (k, width, width))
            x = _sample_inputs(rng, (k, width), mu, sigma, input_dist)
            wx = np.einsum("kij,kj->ki", w, x)
            for net, y in (("plain", wx), ("residual", x + wx)):
                d = y - nets[net]
                sums[net] += (d.sum(), (d * d).sum(), (y > 0).sum())
            done += k
            bar.update(k)
    n_values = n_samples * width
    out: dict = {"n_values": n_values}
    for net, shift in nets.items():
        s, s2, pos = sums[net] / n_values
        out[net] = {"mean": shift + s, "var": s2 - s * s, "survival": pos}
    return out


_FORMULAS = {
    ("plain", "mean"): ("0", "0"),
    ("plain", "variance"): ("2σ²", "2(μ²+σ²)"),
    ("residual", "mean"): ("μ", "μ"),
    ("residual", "variance"): ("3σ²", "3σ²+2μ²"),
    ("plain", "P(y>0)"): ("≥ 0 (μ_y = 0)", "≥ 0 (μ_y = 0)"),
    ("residual", "P(y>0)"): ("≥ μ²/(μ²+3σ²)", "≥ μ²/(3μ²+3σ²)"),
}
_SURVIVAL = "P(y>0)"  # paper/exact columns hold the Cantelli lower bound, MC the measured rate


def theory_table(mu: float, sigma: float, width: int, n_samples: int = 1000, seed: int = 0,
                 input_dist: str = "normal", progress: bool = False) -> list[dict]:
    """Rows comparing the paper's formulas, the exact ones and a Monte-Carlo estimate.

    One row per (net, quantity) for net in plain/residual and quantity in mean, variance,
    P(y>0). Each row has net, quantity, paper_formula, paper, exact_formula, exact,
    monte_carlo. For P(y>0) the paper/exact columns are Cantelli lower bounds computed from
    that form's moments, and monte_carlo is the measured survival rate.
    """
    mc = monte_carlo(mu, sigma, width, n_samples, seed, input_dist, progress=progress)
    rows = []
    for net, moments in (("plain", plain_moments), ("residual", residual_moments)):
        paper, exact = moments(mu, sigma, "paper"), moments(mu, sigma, "exact")
        for i, quantity in enumerate(("mean", "variance")):
            paper_formula, exact_formula = _FORMULAS[net, quantity]
            rows.append({"net": net, "quantity": quantity,
                         "paper_formula": paper_formula, "paper": paper[i],
                         "exact_formula": exact_formula, "exact": exact[i],
                         "monte_carlo": mc[net]["mean" if i == 0 else "var"]})
        paper_formula, exact_formula = _FORMULAS[net, _SURVIVAL]
        rows.append({"net": net, "quantity": _SURVIVAL,
                     "paper_formula": paper_formula, "paper": cantelli_survival_bound(*paper),
                     "exact_formula": exact_formula, "exact": cantelli_survival_bound(*exact),
                     "monte_carlo": mc[net]["survival"]})
    return rows


def format_table(rows: list[dict]) -> str:
    """Fixed-width text rendering of ``theory_table`` rows."""
    header = ("net", "quantity", "paper formula", "paper", "exact formula", "exact", "Monte Carlo")
    body = [(r["net"], r["quantity"], r["paper_formula"], f"{r['paper']:.4f}",
             r["exact_formula"], f"{r['exact']:.4f}", f"{r['monte_carlo']:.4f}") for r in rows]
    return (_format_table(header, body) + f"\n{_SURVIVAL}: paper/exact columns are Cantelli lower bounds "
            "μ_y²/(μ_y²+σ_y²) from that form's moments; Monte Carlo is the measured rate.")


def plot_table(rows: list[dict], title: str, path: Path) -> None:
    """``theory_table`` rows as bars (paper, exact, Monte Carlo) per quantity, plain beside residual."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, net in zip(axes, ("plain", "residual")):
        net_rows = [r for r in rows if r["net"] == net]
        xs = np.arange(len(net_rows))
        for i, (key, label) in enumerate((("paper", "paper form"), ("exact", "exact form"),
                                          ("monte_carlo", "Monte Carlo"))):
            ax.bar(xs + (i - 1) * 0.27, [r[key] for r in net_rows], 0.27, label=label)
        ax.set_xticks(xs, [r["quantity"] if r["quantity"] != _SURVIVAL
                           else "P(y>0)\n(bound vs rate)" for r in net_rows])
        ax.set_title(f"{net}: y = {'Wx' if net == 'plain' else 'x + Wx'}")
        ax.set_ylabel("value")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    write_png(path, fig, dpi=120)
