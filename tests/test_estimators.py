"""The estimators against theory: bounds below log p(x), DReG unbiased with lower variance,
Rainforth et al. (2018)'s SNR trends, STL's zero-variance property, scales, β and free bits."""

from __future__ import annotations

import json
import math
import statistics

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyro_vae import VAE, fit, load_data
from pyro_vae.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.estimators import ROW_KEYS, compare_estimators, gradient_draws
from pyro_vae.objectives import OBJECTIVES, make_objective

from helpers import make_linear_gaussian, set_diagonal_guide


@pytest.fixture
def imperfect():
    """A linear-Gaussian VAE whose guide is shifted and too wide: every bound is loose."""
    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.3, scale_factor=1.6)
    return problem


def _bound(problem, name, k, seed=0, **options):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        bound, _ = make_objective(name, k, **options).per_datapoint_bound(
            problem.vae.model, problem.vae.guide, problem.x)
    return bound.double()


def _paired(a, b):
    d = a - b
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_bound_is_below_the_exact_log_likelihood(imperfect, name):
    exact = imperfect.exact_log_likelihood()
    for k in (1, 5, 50, 500):
        gap, se = _paired(exact, _bound(imperfect, name, k, seed=k))
        assert gap > -3 * se, (name, k, gap, se)


def test_iwae_rises_towards_the_exact_value_as_k_grows():
    # A guide narrower than the posterior keeps every step of K = 1, 5, 50, 500 measurable.
    problem = make_linear_gaussian()
    set_diagonal_guide(problem, loc_shift=0.5, scale_factor=0.6)
    exact = problem.exact_log_likelihood()
    bounds = [_bound(problem, "iwae", k, seed=k) for k in (1, 5, 50, 500)]
    for lower, upper in zip(bounds, bounds[1:]):
        gap, se = _paired(upper, lower)
        assert gap > 3 * se, (gap, se)
    gap, se = _paired(exact, bounds[-1])
    assert gap > -3 * se, (gap, se)


def test_renyi_interpolates_between_iwae_and_the_elbo_for_the_same_particles(imperfect):
    # For fixed particles, L_α = 1/(1−α) log mean w^(1−α) is non-increasing in α (power means);
    # α = 0 is IWAE exactly.
    bounds = {alpha: _bound(imperfect, "renyi", 20, seed=1, alpha=alpha) for alpha in (0.0, 0.5, 0.9)}
    iwae = _bound(imperfect, "iwae", 20, seed=1)
    elbo_same_particles = _bound(imperfect, "elbo", 20, seed=1)
    assert torch.allclose(bounds[0.0], iwae, atol=1e-5)
    assert bool((bounds[0.0] >= bounds[0.5] - 1e-5).all())
    assert bool((bounds[0.5] >= bounds[0.9] - 1e-5).all())
    assert bool((bounds[0.9] >= elbo_same_particles - 1e-5).all())


def test_renyi_minibatch_scale_is_outside_the_log_mean_exp(imperfect):
    vae, x = imperfect.vae, imperfect.x[:16]
    num_data, k, alpha = 400, 6, 0.3
    pyro.set_rng_seed(2)
    loss = make_objective("renyi", k, alpha=alpha).loss(vae.model, vae.guide, x, num_data=num_data)
    pyro.set_rng_seed(2)
    with torch.no_grad():
        q = vae.encode(x)
        z = q.rsample((k,))
        log_w = vae.decode(z).log_prob(x) + vae.prior.distribution().log_prob(z) - q.log_prob(z)
        bound = (torch.logsumexp((1 - alpha) * log_w, 0) - math.log(k)) / (1 - alpha)
    assert loss == pytest.approx(-(num_data / 16) * float(bound.sum()), rel=1e-5)


def _bonferroni_z(num_tests: int, family_error: float = 0.0027) -> float:
    """The |z| threshold for ``num_tests`` tests at the family-wise error of one 3σ test."""
    return statistics.NormalDist().inv_cdf(1 - family_error / (2 * num_tests))


@pytest.mark.parametrize("k", [10, 50])
def test_dreg_encoder_gradient_is_unbiased_for_iwae_with_lower_variance(imperfect, k):
    vae, x = imperfect.vae, imperfect.x[:8]
    repeats = 3000
    pyro.set_rng_seed(0)
    iwae = gradient_draws(vae, make_objective("iwae", k), x, repeats)["encoder"].double()
    dreg = gradient_draws(vae, make_objective("dreg", k), x, repeats)["encoder"].double()
    varying = iwae.std(0) > 0
    z = (dreg.mean(0) - iwae.mean(0)) / (dreg.var(0) / repeats + iwae.var(0) / repeats).sqrt()
    assert float(z[varying].abs().max()) < _bonferroni_z(int(varying.sum())), z
    assert float(dreg.var(0).mean()) < float(iwae.var(0).mean())


def test_signal_to_noise_trends_of_rainforth_et_al(imperfect):
    rows = compare_estimators(imperfect.vae, imperfect.x[:8], ("iwae", "dreg"), (1, 50),
                              repeats=800, timing_repeats=2)
    snr = {(r["objective"], r["particles"]): r for r in rows}
    assert set(rows[0]) == set(ROW_KEYS)
    assert snr["iwae", 50]["encoder_snr"] < snr["iwae", 1]["encoder_snr"]
    assert snr["iwae", 50]["decoder_snr"] > snr["iwae", 1]["decoder_snr"]
    assert snr["dreg", 50]["encoder_snr"] > snr["iwae", 50]["encoder_snr"]


@pytest.mark.parametrize("name,k", [("stl", 1), ("stl", 5), ("dreg", 5)])
def test_path_gradients_vanish_at_the_exact_posterior(linear_gaussian, name, k):
    # q = p(z|x): log w = log p(x) for every z, so the path gradient is exactly zero; the
    # standard estimators still carry the zero-mean score term.
    vae, x = linear_gaussian.vae, linear_gaussian.x[:50]
    pyro.set_rng_seed(0)
    path = gradient_draws(vae, make_objective(name, k), x, 3)["encoder"]
    standard = gradient_draws(vae, make_objective("elbo" if k == 1 else "iwae", k), x, 3)["encoder"]
    assert float(path.abs().max()) < 1e-4
    assert float(standard.abs().max()) > 1e-2


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_trains_with_plain_pyro_svi(imperfect, name):
    pyro.clear_param_store()
    vae, x = imperfect.vae, imperfect.x
    objective = make_objective(name)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.02}), objective)
    pyro.set_rng_seed(0)
    losses = [svi.step(x) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_annealing_raises_beta_linearly_per_step():
    digits = load_data("digits")
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 2, hidden=(16,))
    result = fit(vae, digits, "elbo", beta=2.0, anneal_steps=20, epochs=3, progress=False,
                 device="cpu")
    steps_per_epoch = math.ceil(len(digits.train) / 128)
    for row in result.history:
        # β for the last step of the epoch, whose index is step − 1
        assert row["beta"] == pytest.approx(2.0 * min(1.0, (row["step"] - 1) / 20))
    assert result.history[0]["step"] == steps_per_epoch


def test_free_bits_keep_every_latent_dimension_above_lambda():
    digits = load_data("digits")
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 8, hidden=(128,))
    free_bits, batch_size = 0.5, 128
    fit(vae, digits, "meanfield", free_bits=free_bits, epochs=60, batch_size=batch_size,
        progress=False, device="cpu")
    with torch.no_grad():
        q = vae.encode(digits.train)
        kl = torch.distributions.kl_divergence(q.base_dist, vae.prior.distribution().base_dist)
    kl_per_dim = kl.mean(0)
    # Training holds each minibatch's mean KL_d at ≥ λ; the training-set mean deviates from a
    # minibatch mean by about sd_d / √batch.
    tolerance = 3 * kl.std(0) / math.sqrt(batch_size)
    assert bool((kl_per_dim >= free_bits - tolerance).all()), (kl_per_dim, tolerance)


def test_objective_options_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="free bits"):
        make_objective("iwae", free_bits=0.5)
    with pytest.raises(ConfigError, match="beta = 1"):
        make_objective("dreg", beta=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        make_objective("renyi", alpha=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        make_objective("iwae", alpha=0.5)
    with pytest.raises(ConfigError, match="unknown objective"):
        make_objective("reinforce")


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_cli_trains_with_every_objective(tmp_path, name):
    out = tmp_path / name
    code = main(["train", "--objective", name, "--epochs", "1", "--hidden", "16",
                 "--latent-dim", "2", "--quiet", "--eval-particles", "10", "--out", str(out)])
    assert code == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_elbo"])
    assert json.loads((out / "config.json").read_text())["training"]["objective"] == name


def test_cli_compare_estimators_prints_json_rows_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    args = ["compare-estimators", "--objectives", "elbo,iwae,dreg,stl,renyi,meanfield",
            "--particles", "1,3", "--repeats", "4", "--hidden", "16", "--latent-dim", "2",
            "--batch-size", "16"]
    assert main(args + ["--json", "--plot", str(plot)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["objective"], r["particles"]) for r in rows] == [
        (o, k) for o in ("elbo", "iwae", "dreg", "stl", "renyi", "meanfield") for k in (1, 3)]
    assert all(set(r) == set(ROW_KEYS) for r in rows)
    assert plot.stat().st_size > 0
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "enc SNR" in table and table.count("\n") >= 14


@pytest.mark.parametrize("argv,message", [
    (["--objectives", "elbo,bogus"], "unknown objective"),
    (["--particles", "0"], "positive"),
    (["--particles", "a"], "integers"),
    (["--repeats", "1"], "at least 2"),
    (["--plot", "out.txt"], ".png"),
])
def test_cli_compare_estimators_refuses_bad_input(argv, message, capsys):
    assert main(["compare-estimators", "--hidden", "8", "--latent-dim", "2"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
