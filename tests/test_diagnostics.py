"""Diagnostics (PSIS k̂, KL per dimension, collapse, InferenceData) and paired run comparison."""

from __future__ import annotations

import json
import math
import statistics
import sys
import types

import arviz
import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from pyro_vae import VAE, evaluate, fit
from pyro_vae.comparison import compare_runs
from pyro_vae.diagnostics import (BOUNDED_PARETO_K, COLLAPSE_THRESHOLD, DIAGNOSTICS_FILE,
                                  PARETO_MIN_DRAWS, diagnose, inference_data,
                                  arviz_groups, kl_per_dimension, pareto_k, psis_backend)
from pyro_vae.errors import ConfigError, PyroVAEError

from helpers import make_linear_gaussian, set_diagonal_guide


@pytest.fixture(scope="module")
def trained(digits):
    vae = VAE(digits.data_shape, latent_dim=4, hidden=(64,))
    fit(vae, digits, epochs=60, progress=False, device="cpu", seed=0)
    return vae


def _copy(vae: VAE) -> VAE:
    """An independent copy (its own Pyro parameter names)."""
    twin = VAE.from_config(vae.config)
    twin.load_state_dict(vae.state_dict())
    return twin


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


# -- InferenceData -----------------------------------------------------------------------------

def test_inference_data_groups_dims_and_shapes():
    problem = make_linear_gaussian()
    vae, k, n = problem.vae, 40, 30
    idata = inference_data(vae, problem.x, particles=k, max_datapoints=n, seed=3)
    assert arviz_groups(idata) == {"posterior", "log_likelihood", "sample_stats", "observed_data"}
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "datapoint", "latent") and z.shape == (1, k, n, 2)
    assert list(z.coords["latent"].values) == [0, 1]
    ll = idata.log_likelihood["x"]
    assert ll.dims == ("chain", "draw", "datapoint") and ll.shape == (1, k, n)
    stats_ = idata.sample_stats
    assert stats_["log_weight"].dims == ("chain", "draw", "datapoint")
    np.testing.assert_allclose(stats_["log_weight"],
                               ll + stats_["log_prior"] - stats_["log_guide"], atol=1e-4)
    assert idata.observed_data["x"].shape == (n, 6)
    np.testing.assert_array_equal(idata.observed_data["x"], problem.x[:n].numpy())
    # the same draws as evaluate (same seed and batches): log-mean-exp of the weights
    log_w = torch.from_numpy(stats_["log_weight"].values[0]).double()
    expected = evaluate(vae, problem.x[:n], particles=k, seed=3).log_likelihood.double()
    torch.testing.assert_close(torch.logsumexp(log_w, 0) - math.log(k), expected,
                               atol=1e-5, rtol=0)
    # z really are the guide's draws, which here is the exact posterior: the mean of k draws
    # sits within sd/√k of the exact posterior mean; a z-test per entry (n × 2 of them) at the
    # family-wise error of one 3σ test
    A, b, cov = problem.exact_posterior()
    mean = torch.from_numpy(z.values[0].mean(0)).double()
    z_scores = (mean - (problem.x[:n].double() @ A.T + b)) / (cov.diagonal().sqrt() / math.sqrt(k))
    threshold = statistics.NormalDist().inv_cdf(1 - 0.0027 / (2 * z_scores.numel()))
    assert float(z_scores.abs().max()) < threshold, float(z_scores.abs().max())
    assert "posterior" not in arviz_groups(inference_data(vae, problem.x, particles=5,
                                                          max_datapoints=4, latents=False))


def test_inference_data_of_a_conditional_vae_takes_the_split_labels(digits):
    vae = VAE(digits.data_shape, latent_dim=2, hidden=(16,), conditional=True, num_classes=10)
    idata = inference_data(vae, digits, split="val", particles=5, max_datapoints=7)
    np.testing.assert_array_equal(idata.constant_data["y"], digits.split_labels("val")[:7])
    assert idata.posterior["z"].shape == (1, 5, 7, 2)
    assert idata.posterior.attrs["split"] == "val"


def test_diagnostics_file_round_trips(tmp_path):
    problem = make_linear_gaussian(num_data=50)
    diagnosis = diagnose(problem.vae, problem.x, particles=PARETO_MIN_DRAWS, run_dir=tmp_path)
    path = tmp_path / DIAGNOSTICS_FILE
    assert diagnosis.netcdf_path == path and path.is_file()
    assert diagnosis.summary()["diagnostics_file"] == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [DIAGNOSTICS_FILE]   # no temp files
    restored = arviz.from_netcdf(path)
    assert "posterior" in arviz_groups(restored)
    np.testing.assert_array_equal(restored.posterior["z"], diagnosis.inference_data.posterior["z"])
    np.testing.assert_array_equal(restored.sample_stats["log_weight"],
                                  diagnosis.inference_data.sample_stats["log_weight"])


# -- PSIS k̂ ----------------------------------------------------------------------------------

def _gaussian_log_ratios(s: float, draws: int, replicates: int, rng) -> np.ndarray:
    """log N(x; 0, 1) − log N(x; 0, s²) for x ~ N(0, s²): [draws, replicates]."""
    x = rng.normal(0.0, s, size=(draws, replicates))
    return stats.norm.logpdf(x) - stats.norm.logpdf(x, 0.0, s)


def _pseudo_true_k(s: float, draws: int) -> float:
    """The value k̂ converges to over replicates at this sample size (see the test below).

    With u ~ N(0, 1), x = s·u and c = (1 − s²)/2, the ratio is w = s·exp(c u²). PSIS fits a
    generalized Pareto distribution (GPD) to the M = ⌈min(S/5, 3√S)⌉ largest weights, i.e. to
    the exceedances of w over its (1 − M/S) quantile; in terms of v = u² ~ χ²₁ above
    v₀ = χ²₁-isf(M/S) the exceedance is (up to scale) exp(c(v − v₀)) − 1. The GPD that best
    fits that distribution (maximum expected log-likelihood) has shape k*; ArviZ then shrinks
    k towards 0.5 with 10 pseudo-observations: (M k* + 5)/(M + 10)."""
    tail = math.ceil(min(draws / 5, 3 * math.sqrt(draws)))
    c = (1 - s * s) / 2
    v0 = stats.chi2.isf(tail / draws, 1)
    a = np.linspace(0.0, 120.0, 24001)                    # v − v₀; χ²₁ mass beyond: e^-60
    density = stats.chi2.pdf(v0 + a, 1) / (tail / draws)
    excess = np.expm1(c * a)

    def negative_log_likelihood(params):
        k, log_sigma = params
        if k <= 0:
            return np.inf
        log_density = log_sigma + (1 / k + 1) * np.log1p(k * excess / np.exp(log_sigma))
        return integrate.simpson(log_density * density, x=a)

    k = optimize.minimize(negative_log_likelihood, [0.5, 0.0], method="Nelder-Mead",
                          options={"xatol": 1e-7, "fatol": 1e-10}).x[0]
    return (tail * k + 10 * 0.5) / (tail + 10)


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_pareto_k_recovers_the_tail_of_a_gaussian_ratio(s):
    """Target N(0, 1), proposal N(0, s²), s < 1: P(w > t) ∝ t^(−1/(1−s²)) / √log t, so the
    tail shape is k = 1 − s² (0.75 and 0.51).

    The slowly varying factor 1/√log t makes the tail *locally* lighter at any finite
    threshold, so k̂ is biased low, and the bias decays only like 1/log S: measured mean k̂
    over 200 replicates at S = 20000 is 0.698 ± 0.006 (s = 0.5) and 0.484 ± 0.006 (s = 0.7),
    and still ≈ 0.71 at S = 200000. That bias is not noise, so it is not absorbed into a wider
    tolerance: `_pseudo_true_k` computes it (the GPD best fitting the exact exceedance
    distribution at the threshold PSIS uses, plus ArviZ's prior shrinkage): k*(20000) = 0.693
    (s = 0.5) and 0.481 (s = 0.7). The replicates' mean must lie within 3 standard errors of
    k*; hence within 3 se + |k* − (1 − s²)| of 1 − s², and never above 1 − s² + 3 se."""
    S, R = 20000, 20
    rng = np.random.default_rng(2018 + int(100 * s))
    khat = pareto_k(_gaussian_log_ratios(s, S, R, rng))
    assert khat.shape == (R,) and np.isfinite(khat).all()
    mean, se = khat.mean(), khat.std(ddof=1) / math.sqrt(R)
    target = 1 - s * s
    expected = _pseudo_true_k(s, S)
    bias = expected - target
    assert -0.08 < bias < 0                               # a finite-threshold underestimate
    assert abs(mean - expected) < 3 * se, (mean, se, expected)
    assert abs(mean - target) < 3 * se + abs(bias), (mean, se, target)
    # the bias shrinks as the threshold moves out: k* → 1 − s² (slowly)
    assert abs(_pseudo_true_k(s, 2 * 10**8) - target) < abs(bias)


def _reference_pareto_k(log_weights: np.ndarray) -> np.ndarray:
    """PSIS k̂ written from the papers, independent of ArviZ: per column of ``[draws, n]``, the
    M = ⌈min(S/5, 3√S)⌉ largest weights above the (M+1)-th largest, fitted with Zhang &
    Stephens' (2009) empirical-Bayes estimate of the generalized Pareto shape, shrunk towards
    0.5 with a weakly informative prior worth 10 observations (Vehtari et al. 2024)."""
    draws = log_weights.shape[0]
    tail = int(math.ceil(min(draws / 5.0, 3.0 * math.sqrt(draws))))
    out = []
    for column in log_weights.T:
        ordered = np.sort(column - column.max())
        exceedances = np.exp(ordered[-tail:]) - np.exp(ordered[-tail - 1])
        n = exceedances.shape[0]
        grid = 30 + int(math.sqrt(n))
        b = 1 - np.sqrt(grid / (np.arange(1, grid + 1) - 0.5))
        b = b / (3 * exceedances[int(n / 4 + 0.5) - 1]) + 1 / exceedances[-1]
        k = np.log1p(-b[:, None] * exceedances).mean(axis=1)
        profile = n * (np.log(-(b / k)) - k - 1)
        weights = 1 / np.exp(profile - profile[:, None]).sum(axis=1)
        keep = weights >= 10 * np.finfo(float).eps
        weights, b = weights[keep] / weights[keep].sum(), b[keep]
        shape = np.log1p(-(b * weights).sum() * exceedances).mean()
        out.append((n * shape + 10 * 0.5) / (n + 10))
    return np.array(out)


def _mixed_log_weights(rng) -> np.ndarray:
    heavy = _gaussian_log_ratios(0.5, 2000, 3, rng)            # k ≈ 0.7
    light = -_gaussian_log_ratios(0.8, 2000, 2, rng)           # bounded weights
    constant = np.full((2000, 1), -3.0)
    return np.concatenate([heavy, light, constant], axis=1)


@pytest.mark.parametrize("draws", [100, 1000, 4000, 20000])
def test_pareto_k_with_the_installed_arviz_equals_the_reference(draws):
    """Whichever ArviZ line is installed (0.x: arviz.psislw; 1.x: arviz_stats, which negates
    its input and rounds its tail length down), k̂ equals the reference to float precision,
    where the tails agree (S·r_eff > 225; CI runs both lines)."""
    rng = np.random.default_rng(1)
    heavy = _gaussian_log_ratios(0.5, draws, 3, rng)           # k = 1 − s² = 0.75
    np.testing.assert_allclose(pareto_k(heavy), _reference_pareto_k(heavy), rtol=1e-9,
                               atol=1e-9)
    # the sign matters (arviz_stats negates its input): the negated weights are bounded
    assert (pareto_k(-heavy) < 0.5).all() and (_reference_pareto_k(heavy) > 0.6).all()


def test_the_psis_backend_follows_the_installed_arviz():
    expected = "arviz" if int(arviz.__version__.split(".")[0]) < 1 else "arviz_stats"
    assert psis_backend() == expected


def test_pareto_k_of_equal_weights_is_finite_and_small():
    equal = np.zeros((500, 3)) + np.array([0.0, -7.5, 123.0])
    np.testing.assert_array_equal(pareto_k(equal), BOUNDED_PARETO_K)
    rng = np.random.default_rng(0)
    noisy = equal + 1e-6 * rng.standard_normal(equal.shape)   # float32 round-off
    np.testing.assert_array_equal(pareto_k(noisy), BOUNDED_PARETO_K)
    assert pareto_k(np.zeros(100)).shape == ()
    special = np.zeros((100, 3))
    special[:, 0] = -np.inf
    special[5, 1] = np.inf
    special[7, 2] = np.nan
    khat = pareto_k(special)
    assert khat[0] == np.inf and khat[1] == np.inf and np.isnan(khat[2])


def test_exact_posterior_gives_small_finite_k(linear_gaussian):
    diagnosis = diagnose(linear_gaussian.vae, linear_gaussian.x, particles=200)
    assert np.isfinite(diagnosis.pareto_k).all()
    assert (diagnosis.pareto_k <= 0.5).all()
    summary = diagnosis.summary()
    assert summary["pareto_k_max"] <= 0.5 and summary["pareto_k_share_above_0.5"] == 0.0
    assert summary["collapsed_dims"] == [] and not summary["warnings"]


def test_too_narrow_guide_has_larger_k_than_too_wide(linear_gaussian):
    problem = linear_gaussian
    set_diagonal_guide(problem, loc_shift=0.3, scale_factor=0.5)
    narrow = diagnose(problem.vae, problem.x[:100], particles=500).pareto_k
    set_diagonal_guide(problem, loc_shift=0.3, scale_factor=1.6)
    wide = diagnose(problem.vae, problem.x[:100], particles=500).pareto_k
    assert np.median(narrow) > 0.7 > 0.5 > np.median(wide)
    assert np.mean(narrow > 0.5) > 0.9 and np.mean(wide > 0.5) == 0
    assert np.median(narrow) - np.median(wide) > 1.0


# -- KL per dimension and collapse ----------------------------------------------------------

def test_kl_per_dimension_sums_to_the_analytic_kl(linear_gaussian):
    problem = linear_gaussian
    set_diagonal_guide(problem, loc_shift=0.4, scale_factor=0.7)
    diagnosis = diagnose(problem.vae, problem.x, particles=PARETO_MIN_DRAWS)
    assert diagnosis.kl_method == "closed form"
    with torch.no_grad():
        q = problem.vae.encode(problem.x)
    loc, scale = q.mean.double(), q.stddev.double()
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ (σ² + μ² − 1 − log σ²), summed over z, mean over x
    total = (0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log())).sum(-1).mean()
    assert diagnosis.kl_per_dim.shape == (2,)
    assert diagnosis.kl_per_dim.sum() == pytest.approx(float(total), rel=1e-6, abs=1e-6)
    assert diagnosis.summary()["kl_total"] == pytest.approx(float(total), rel=1e-6)


def test_kl_per_dimension_falls_back_to_monte_carlo_or_none(linear_gaussian, digits):
    problem = linear_gaussian
    vae = VAE(6, 2, prior="studentt", likelihood="normal", likelihood_options={"scale": 0.5},
              encoder="linear", decoder="linear")
    vae.encoder.load_state_dict(problem.vae.encoder.state_dict())
    x = problem.x[:100]
    kl = kl_per_dimension(vae, x, samples=2000, seed=1)
    assert kl.method == "monte carlo" and "Monte Carlo" in kl.note
    # the per-dimension sum against an independent joint estimate E_q[log q(z) − log p(z)]
    torch.manual_seed(7)
    with torch.no_grad():
        q, p = vae.encode(x), vae.prior.distribution()
        z = q.sample((4000,))
        joint = (q.log_prob(z) - p.log_prob(z)).double()
    se = float(joint.mean(1).std() / math.sqrt(joint.shape[0]))
    assert kl.values.sum() == pytest.approx(float(joint.mean()), abs=5 * se + 1e-3)
    mog = VAE(digits.data_shape, latent_dim=2, hidden=(16,), prior="mog")
    none = kl_per_dimension(mog, digits.test[:10])
    assert none.values is None and none.method is None and "factorize" in none.note


def test_collapse_warning_fires_for_a_dimension_at_the_prior(trained, digits):
    healthy = diagnose(trained, digits, particles=PARETO_MIN_DRAWS)
    assert healthy.collapsed == [d for d in range(4) if healthy.kl_per_dim[d] < COLLAPSE_THRESHOLD]
    assert any("collapse" in text for text in healthy.warnings) == bool(healthy.collapsed)
    collapsed = _copy(trained)
    out = collapsed.encoder.net[-1]                     # rows 0..3: loc, rows 4..7: raw scale
    with torch.no_grad():
        for row in (2, 2 + 4):
            out.weight[row].zero_()
        out.bias[2] = 0.0
        out.bias[2 + 4] = _inverse_softplus(1.0 - collapsed.guide_family.min_scale)
    with torch.no_grad():
        q = collapsed.encode(digits.test)
    torch.testing.assert_close(q.base_dist.scale[:, 2], torch.ones(len(digits.test)))
    diagnosis = diagnose(collapsed, digits, particles=PARETO_MIN_DRAWS)
    assert diagnosis.kl_per_dim[2] < 1e-6
    assert 2 in diagnosis.collapsed
    assert set(diagnosis.collapsed) - {2} == set(healthy.collapsed)
    warning = [text for text in diagnosis.warnings if "collapse" in text]
    assert len(warning) == 1 and "z2" in warning[0]
    assert "z2" in diagnosis.format() and diagnosis.summary()["collapsed_dims"] == diagnosis.collapsed


def test_no_collapse_warning_with_informative_dimensions(linear_gaussian):
    diagnosis = diagnose(linear_gaussian.vae, linear_gaussian.x, particles=PARETO_MIN_DRAWS)
    assert (diagnosis.kl_per_dim > 0.5).all()
    assert diagnosis.collapsed == [] and not any("collapse" in t for t in diagnosis.warnings)


def test_diagnosis_summary_and_format(trained, digits):
    diagnosis = diagnose(trained, digits, particles=100, seed=2)
    summary = diagnosis.summary()
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    for key in ("pareto_k_max", "pareto_k_median", "pareto_k_share_above_0.5",
                "pareto_k_share_above_0.7", "active_units", "kl_per_dim", "collapsed_dims",
                "log_likelihood", "num_datapoints"):
        assert key in summary
    assert summary["num_datapoints"] == len(digits.test) and summary["particles"] == 100
    assert summary["active_units"] == evaluate(trained, digits, particles=100,
                                               seed=2).summary["active_units"]
    text = diagnosis.format()
    assert "k̂" in text and "active units" in text and len(text.splitlines()) >= 5


def test_diagnostics_refuse_bad_input(linear_gaussian, digits, tmp_path):
    vae, x = linear_gaussian.vae, linear_gaussian.x
    with pytest.raises(ConfigError, match="at least 25"):
        diagnose(vae, x, particles=10)
    with pytest.raises(ConfigError, match="at least 25"):
        pareto_k(np.zeros((10, 3)))
    with pytest.raises(ConfigError):
        pareto_k(np.zeros((30, 3, 2)))
    with pytest.raises(ConfigError, match="backend"):
        pareto_k(np.zeros((30, 3)), backend="psis")
    with pytest.raises(ConfigError, match="data_dim"):
        diagnose(vae, torch.zeros(5, 7), particles=30)
    with pytest.raises(ConfigError):
        inference_data(vae, x, particles=0)
    with pytest.raises(PyroVAEError, match="not found"):
        diagnose(vae, x, particles=30, run_dir=tmp_path / "missing")
    with pytest.raises(PyroVAEError):
        diagnose(vae, digits, particles=30)                  # 64 dimensions, VAE expects 6


# -- comparison -------------------------------------------------------------------------------

def test_comparing_a_model_with_itself_gives_exactly_zero(trained, digits):
    comparison = compare_runs(trained, trained, digits, particles=50)
    assert np.all(comparison.difference == 0)
    assert comparison.mean_difference == 0 and comparison.se_difference == 0 and comparison.z == 0
    assert not comparison.significant and comparison.better is None
    assert "no significant difference" in comparison.format().splitlines()[-1]


def test_good_model_beats_a_crippled_copy(trained, digits):
    crippled = _copy(trained)
    with torch.no_grad():
        for parameter in crippled.decoder.parameters():
            parameter.mul_(0.1)
    good_first = compare_runs(trained, crippled, digits, particles=100,
                              names=("good", "crippled"))
    assert good_first.z > 3 and good_first.mean_difference > 0
    assert good_first.better == "good"
    swapped = compare_runs(crippled, trained, digits, particles=100, names=("crippled", "good"))
    assert swapped.z < -3 and swapped.better == "good"
    assert swapped.mean_difference == pytest.approx(-good_first.mean_difference)
    assert swapped.se_difference == pytest.approx(good_first.se_difference)
    # the paired statistics and the elpd table agree
    n = len(digits.test)
    summary = good_first.summary()
    d = good_first.difference
    assert summary["difference_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(n))
    assert summary["elpd_diff"] == pytest.approx(n * summary["difference"])
    assert summary["elpd_diff_se"] == pytest.approx(math.sqrt(n) * d.std(ddof=1))
    assert summary["runs"]["good"]["elpd"] == pytest.approx(good_first.log_likelihood_a.sum())
    assert summary["runs"]["good"]["log_likelihood"] == pytest.approx(
        good_first.log_likelihood_a.mean(), rel=1e-6)
    table = summary["table"]
    assert [row["name"] for row in table] == ["good", "crippled"]
    assert table[0]["elpd_diff"] == 0 and table[1]["elpd_diff"] == pytest.approx(n * d.mean())
    assert [row["name"] for row in swapped.table()] == ["good", "crippled"]
    lines = good_first.format().splitlines()
    assert lines[-1].startswith("good is better by") and "z = " in lines[-1]
    assert lines[3].split()[1] == "good"                  # best first


def test_compare_refuses_models_of_different_data(trained, digits):
    other = VAE(6, 2, hidden=(8,))
    with pytest.raises(ConfigError, match="data_dim") as info:
        compare_runs(trained, other, digits)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        compare_runs(trained, trained, digits, names=("A", "A"))
