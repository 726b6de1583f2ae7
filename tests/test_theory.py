"""Thm 3.2 / 3.3 formulas against a Monte-Carlo estimate that samples W and x."""
from __future__ import annotations

import csv
import json
import math

import pytest

from pnnh import theory
from pnnh.cli import main

MU, SIGMA = 0.4, 0.58


@pytest.fixture(scope="module")
def mc():
    return theory.monte_carlo(MU, SIGMA, width=64, n_samples=6000, seed=0)


def test_monte_carlo_matches_exact_moments_within_2_percent(mc):
    plain_mean, plain_var = theory.plain_moments(MU, SIGMA, "exact")
    res_mean, res_var = theory.residual_moments(MU, SIGMA, "exact")
    assert plain_var == pytest.approx(2 * (MU**2 + SIGMA**2))
    assert res_var == pytest.approx(3 * SIGMA**2 + 2 * MU**2)
    # the plain mean is 0, so "relative" is taken against the standard deviation
    assert abs(mc["plain"]["mean"] - plain_mean) < 0.02 * math.sqrt(plain_var)
    assert mc["plain"]["var"] == pytest.approx(plain_var, rel=0.02)
    assert mc["residual"]["mean"] == pytest.approx(res_mean, rel=0.02)
    assert mc["residual"]["var"] == pytest.approx(res_var, rel=0.02)


def test_monte_carlo_rejects_the_paper_variance_when_mu_is_not_zero(mc):
    # the gap between the forms is 2 mu^2 = 0.32, far beyond Monte-Carlo error
    _, paper_var = theory.plain_moments(MU, SIGMA, "paper")
    assert abs(mc["plain"]["var"] - paper_var) > 0.25


@pytest.mark.parametrize("moments", [theory.plain_moments, theory.residual_moments])
def test_paper_form_equals_exact_at_zero_mean_and_differs_by_2_mu_squared(moments):
    assert moments(0.0, SIGMA, "paper") == pytest.approx(moments(0.0, SIGMA, "exact"))
    paper_mean, paper_var = moments(MU, SIGMA, "paper")
    exact_mean, exact_var = moments(MU, SIGMA, "exact")
    assert paper_mean == exact_mean
    assert exact_var - paper_var == pytest.approx(2 * MU**2)


def test_survival_at_least_the_bound_and_plain_survival_one_half(mc):
    assert mc["plain"]["survival"] == pytest.approx(0.5, abs=0.01)
    for net, moments in (("plain", theory.plain_moments), ("residual", theory.residual_moments)):
        for form in theory.FORMS:
            bound = theory.cantelli_survival_bound(*moments(MU, SIGMA, form))
            assert mc[net]["survival"] >= bound
    assert theory.cantelli_survival_bound(*theory.residual_moments(MU, SIGMA, "paper")) \
        == pytest.approx(MU**2 / (MU**2 + 3 * SIGMA**2))


def test_cantelli_bound_values_and_edge_cases():
    assert theory.cantelli_survival_bound(1.0, 3.0) == pytest.approx(0.25)
    assert theory.cantelli_survival_bound(0.0, 1.0) == 0.0
    assert theory.cantelli_survival_bound(-1.0, 1.0) == 0.0
    assert theory.cantelli_survival_bound(2.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="var"):
        theory.cantelli_survival_bound(1.0, -1.0)


@pytest.mark.parametrize("dist", ["uniform", "relu"])
def test_exact_moments_hold_for_other_input_distributions(dist):
    mc = theory.monte_carlo(MU, SIGMA, width=64, n_samples=3000, seed=1, input_dist=dist)
    assert mc["plain"]["var"] == pytest.approx(theory.plain_moments(MU, SIGMA)[1], rel=0.03)
    assert mc["residual"]["var"] == pytest.approx(theory.residual_moments(MU, SIGMA)[1], rel=0.03)


def test_monte_carlo_is_reproducible_by_seed():
    a = theory.monte_carlo(MU, SIGMA, width=8, n_samples=50, seed=3)
    assert a == theory.monte_carlo(MU, SIGMA, width=8, n_samples=50, seed=3)
    assert a != theory.monte_carlo(MU, SIGMA, width=8, n_samples=50, seed=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"sigma": math.nan}, "sigma"),
    ({"width": 0}, "width"), ({"n_samples": 0}, "n_samples"), ({"mu": math.inf}, "mu"),
    ({"input_dist": "cauchy"}, "input_dist"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = {"mu": MU, "sigma": SIGMA, "width": 8, "n_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        theory.monte_carlo(**args)


def test_bad_form_is_rejected():
    with pytest.raises(ValueError, match="form"):
        theory.plain_moments(MU, SIGMA, "approx")


def test_theory_table_rows():
    rows = theory.theory_table(MU, SIGMA, width=32, n_samples=200)
    assert [(r["net"], r["quantity"]) for r in rows] == [
        (net, q) for net in ("plain", "residual") for q in ("mean", "variance", "P(y>0)")]
    by = {(r["net"], r["quantity"]): r for r in rows}
    assert by["residual", "variance"]["exact"] == pytest.approx(3 * SIGMA**2 + 2 * MU**2)
    assert by["residual", "variance"]["paper"] == pytest.approx(3 * SIGMA**2)
    assert by["residual", "P(y>0)"]["monte_carlo"] > by["residual", "P(y>0)"]["paper"]


def test_cli_prints_table_json_and_writes_files(tmp_path, capsys):
    assert main(["theory", "--width", "16", "--samples", "50", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "paper formula" in text and "3σ²+2μ²" in text and "Monte Carlo" in text
    assert main(["theory", "--width", "16", "--samples", "50", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["settings"]["width"] == 16 and len(printed["rows"]) == 6
    assert json.loads((tmp_path / "theory.json").read_text())["rows"] == printed["rows"]
    with open(tmp_path / "theory.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (tmp_path / "theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag, value", [("--sigma", "0"), ("--width", "0"), ("--samples", "0")])
def test_cli_rejects_bad_values(flag, value, capsys):
    assert main(["theory", flag, value]) == 2
    assert "error" in capsys.readouterr().err
