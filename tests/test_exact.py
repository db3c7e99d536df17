r"""Exact references (:mod:`pyro_vae.exact`): the linear-Gaussian evidence and posterior against
brute-force integrals over z, the closed-form maximum-likelihood PPCA, reading the model off a
VAE, and the gap identity log p(x) = ELBO + KL(q ‖ p(z|x)) for three guide families.

**The grid's error.** The integrand p(z) p(x|z) is an unnormalized Gaussian in z with
covariance Σ = M⁻¹ ≼ I. A Riemann sum with step h over ℝ^d equals the integral up to the
aliased terms of the Poisson summation formula, of relative size
Σ_{k≠0} exp(−2π² kᵀΣk / h²) ≈ 2d·exp(−2π² λ_min(Σ) / h²); with λ_min(Σ) ≥ 0.15² and
h = 0.04 that is below e^{-270}. The box [−12, 12]^d cuts off mass beyond 9 posterior standard
deviations (means within ±3, standard deviations ≤ 1): below 1e-18. What is left is float64
summation over ≤ 4·10⁵ terms, ~1e-13 relative, so 1e-9 is a safe tolerance for log p(x) and
the posterior moments.
"""

from __future__ import annotations

import copy
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import (MultivariateNormal, Normal, TransformedDistribution,
                                 kl_divergence)

from pyro_vae import VAE
from pyro_vae.errors import ConfigError
from pyro_vae.exact import (PPCA, LinearGaussian, exact_log_likelihood, exact_reference,
                            gap_identity, linear_gaussian)
from pyro_vae.lvm import data_plate, program

from helpers import make_linear_gaussian, set_diagonal_guide

HALF_WIDTH, STEP = 12.0, 0.04


def random_model(D: int, d: int, per_dim: bool, seed: int) -> LinearGaussian:
    generator = torch.Generator().manual_seed(seed)
    W = 0.8 * torch.randn(D, d, generator=generator, dtype=torch.float64)
    mu = torch.randn(D, generator=generator, dtype=torch.float64)
    sigma = (0.5 + 0.4 * torch.rand(D, generator=generator, dtype=torch.float64)
             if per_dim else 0.6)
    return LinearGaussian(W, mu, sigma)


def grid_reference(W, mu, sigma, x):
    """log p(x), E[z|x] and Cov[z|x] by a Riemann sum of p(z) p(x|z) over a grid of z, written
    from the densities alone; and the smallest eigenvalue of the posterior covariance, formed
    directly, for the error bound of the module docstring."""
    D, d = W.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(D)
    centres = torch.arange(-HALF_WIDTH, HALF_WIDTH + STEP / 2, STEP, dtype=torch.float64)
    z = torch.cartesian_prod(*[centres] * d) if d > 1 else centres[:, None]   # [G, d]
    log_prior = -0.5 * z.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    results = []
    for row in x:
        residual = (row - mu - z @ W.T) / sigma
        log_lik = (-0.5 * residual.pow(2) - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_joint = log_prior + log_lik
        log_evidence = torch.logsumexp(log_joint, 0) + d * math.log(STEP)
        weights = torch.softmax(log_joint, 0)
        mean = weights @ z
        centred = z - mean
        covariance = (weights[:, None] * centred).T @ centred
        results.append((log_evidence, mean, covariance))
    W_hat = W / sigma[:, None]
    smallest = torch.linalg.eigvalsh(torch.linalg.inv(torch.eye(d, dtype=torch.float64)
                                                      + W_hat.T @ W_hat))[0]
    log_evidence, means, covariances = (torch.stack(parts) for parts in zip(*results))
    return log_evidence, means, covariances, float(smallest)


@pytest.mark.parametrize("D,d,per_dim", [(3, 1, False), (5, 1, True), (4, 2, False),
                                         (5, 2, True)])
def test_log_likelihood_and_posterior_match_a_grid_over_z(D, d, per_dim):
    model = random_model(D, d, per_dim, seed=10 * D + d)
    x = model.sample(4, torch.Generator().manual_seed(D + d))
    log_evidence, means, covariances, smallest = grid_reference(model.W, model.mu, model.sigma, x)
    assert smallest >= 0.15**2 and means.abs().max() <= 3.0  # the error bound's premises
    assert torch.allclose(model.log_likelihood(x), log_evidence, rtol=0, atol=1e-9)
    posterior = model.posterior(x)
    assert posterior.batch_shape == (4,) and posterior.event_shape == (d,)
    assert torch.allclose(posterior.mean, means, rtol=0, atol=1e-9)
    assert torch.allclose(posterior.covariance_matrix, covariances, rtol=0, atol=1e-9)


def test_log_likelihood_is_the_dense_gaussian_density_in_float64_for_float32_data():
    model = random_model(6, 3, per_dim=True, seed=3)
    x = model.sample(50, torch.Generator().manual_seed(0)).float()
    dense = MultivariateNormal(model.mu, model.covariance).log_prob(x.double())
    result = model.log_likelihood(x)
    assert result.dtype == torch.float64 and result.shape == (50,)
    assert torch.allclose(result, dense, rtol=0, atol=1e-10)


def test_isotropic_posterior_is_tipping_and_bishop():
    # mean M⁻¹Wᵀ(x − μ), covariance σ²M⁻¹, M = WᵀW + σ²I (Tipping & Bishop 1999, eq. 6)
    model = random_model(5, 2, per_dim=False, seed=4)
    x = model.sample(7, torch.Generator().manual_seed(1))
    W, sigma2 = model.W, float(model.sigma) ** 2
    M = W.T @ W + sigma2 * torch.eye(2, dtype=torch.float64)
    posterior = model.posterior(x)
    assert torch.allclose(posterior.mean, torch.linalg.solve(M, W.T @ (x - model.mu).T).T,
                          rtol=0, atol=1e-12)
    assert torch.allclose(model.posterior_covariance(), sigma2 * torch.linalg.inv(M),
                          rtol=0, atol=1e-12)


def test_samples_follow_the_generative_story():
    model = random_model(4, 2, per_dim=True, seed=5)
    n = 20000
    x, z = model.sample(n, torch.Generator().manual_seed(0), latents=True)
    again = model.sample(n, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # the generator decides the draws
    noise = (x - model.mu - z @ model.W.T) / model.sigma  # ε, which must be N(0, I)
    for draws in (noise, z):
        count = draws.numel()
        assert abs(float(draws.mean())) <= 3 / math.sqrt(count)
        assert abs(float(draws.pow(2).mean()) - 1.0) <= 3 * math.sqrt(2 / count)


# -- maximum likelihood ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppca_data():
    truth = LinearGaussian(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.5], [0.5, 0.5],
                                         [0.0, 0.3]], dtype=torch.float64),
                           torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64), 0.4)
    return truth.sample(400, torch.Generator().manual_seed(7))


def test_mle_reproduces_the_sample_covariance_on_its_principal_subspace(ppca_data):
    x, d = ppca_data, 2
    fit = PPCA.mle(x, d)
    assert torch.allclose(fit.mu, x.mean(0), rtol=0, atol=1e-12)
    # the principal subspace from the SVD of the centred data: S = V diag(s²/N) Vᵀ
    _, s, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    eigenvalues, V = s.pow(2) / x.shape[0], Vh.T
    S = (x - x.mean(0)).T @ (x - x.mean(0)) / x.shape[0]
    C = fit.covariance
    assert torch.allclose(C @ V[:, :d], S @ V[:, :d], rtol=0, atol=1e-10)
    assert float(fit.sigma) ** 2 == pytest.approx(float(eigenvalues[d:].mean()), rel=1e-12)
    # on the complement the model's covariance is σ² I
    complement = V[:, d:]
    assert torch.allclose(complement.T @ C @ complement,
                          float(fit.sigma) ** 2 * torch.eye(x.shape[1] - d, dtype=torch.float64),
                          rtol=0, atol=1e-10)
    assert fit.W.shape == (5, 2) and fit.isotropic


def test_mle_is_a_maximum_of_the_log_likelihood(ppca_data):
    x = ppca_data
    fit = LinearGaussian.mle(x, 2)
    best = float(fit.log_likelihood(x).sum())
    generator = torch.Generator().manual_seed(8)
    for size in (1e-3, 1e-1):
        for _ in range(10):
            W = fit.W + size * torch.randn(fit.W.shape, generator=generator, dtype=torch.float64)
            mu = fit.mu + size * torch.randn(fit.mu.shape, generator=generator,
                                             dtype=torch.float64)
            sigma = fit.sigma * math.exp(size * float(torch.randn(1, generator=generator)))
            perturbed = float(LinearGaussian(W, mu, sigma).log_likelihood(x).sum())
            assert perturbed < best, (size, best - perturbed)


def gradient_norms(x, W, mu, sigma):
    W, mu, sigma = (t.clone().requires_grad_(True) for t in (W, mu, sigma))
    LinearGaussian(W, mu, sigma).log_likelihood(x).sum().backward()
    return [float(t.grad.abs().max()) for t in (W, mu, sigma)]


def test_gradient_of_the_log_likelihood_vanishes_at_the_mle(ppca_data):
    x = ppca_data
    fit = LinearGaussian.mle(x, 2)
    # zero up to float64 rounding: 400 terms of size ~10 at ε ≈ 2e-16 leave ~1e-12
    assert max(gradient_norms(x, fit.W, fit.mu, fit.sigma)) <= 1e-8
    # while one step away from it the gradient is of order one
    assert max(gradient_norms(x, fit.W * 1.1, fit.mu + 0.1, fit.sigma * 1.1)) > 1.0


@pytest.mark.parametrize("x,latent_dim,message", [
    (torch.randn(10, 4), 4, "below the data dimension"),
    (torch.randn(10, 4), 5, "below the data dimension"),
    (torch.randn(10, 4), 0, "positive integer"),
    (torch.randn(10, 4), 1.0, "positive integer"),
    (torch.randn(1, 4), 2, "at least 2 datapoints"),
    (torch.randn(40), 2, "[N, D] tensor"),
    (torch.randn(3, 1) * torch.ones(1, 4), 2, "are zero"),  # data on a line: σ = 0
    (torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 1.0, 0.0], [1.0, 1.0, 1.0]]), 1,
     "non-finite"),
])
def test_mle_refuses_bad_input_in_one_line(x, latent_dim, message):
    with pytest.raises(ConfigError) as error:
        LinearGaussian.mle(x, latent_dim)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- reading the model off a VAE -----------------------------------------------------------------
def test_linear_gaussian_reads_w_mu_sigma_off_the_vae():
    problem = make_linear_gaussian()
    model = linear_gaussian(problem.vae)
    assert torch.equal(model.W, problem.W.double()) and torch.equal(model.mu, problem.mu.double())
    assert model.isotropic and float(model.sigma) == pytest.approx(problem.sigma, rel=1e-7)
    assert torch.allclose(model.log_likelihood(problem.x), problem.exact_log_likelihood(),
                          rtol=0, atol=1e-10)
    A, b, covariance = problem.exact_posterior()
    posterior = model.posterior(problem.x)
    assert torch.allclose(posterior.mean, problem.x.double() @ A.T + b, rtol=0, atol=1e-10)
    assert torch.allclose(model.posterior_covariance(), covariance, rtol=0, atol=1e-12)
    assert not model.W.requires_grad  # a snapshot, not a view of the decoder


@pytest.mark.parametrize("options", [
    {"likelihood": "bernoulli"},
    {"decoder": "mlp", "hidden": (4,)},
    {"prior": "learned-normal"},
    {"prior": "laplace"},
    {"likelihood_options": {"scale": "decoder"}},
    {"likelihood": "laplace"},
    {"conditional": True, "num_classes": 3},
], ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()))
def test_linear_gaussian_is_none_for_any_other_vae(options):
    arguments = {"likelihood": "normal", "likelihood_options": {"scale": 0.5},
                 "encoder": "linear", "decoder": "linear", **options}
    if arguments["likelihood"] != "normal" and "likelihood_options" not in options:
        arguments.pop("likelihood_options")
    vae = VAE(6, 2, **arguments)
    assert linear_gaussian(vae) is None
    assert exact_reference(vae) is None


@pytest.mark.parametrize("scale", ["shared", "per-dim"])
def test_a_learned_scale_is_read_at_its_current_value(scale):
    """A learned σ does not depend on z: the model is linear-Gaussian at σ's value now, and the
    exact model's log p(x) is that of the same VAE with σ fixed at that value."""
    torch.manual_seed(0)
    learned = VAE(6, 2, likelihood="normal", likelihood_options={"scale": scale},
                  encoder="linear", decoder="linear")
    with torch.no_grad():
        learned.likelihood.raw_scale.copy_(torch.randn_like(learned.likelihood.raw_scale))
    _, sigma = learned.likelihood.loc_scale(torch.zeros(1, 6))
    model = linear_gaussian(learned)
    assert model is not None
    expected = sigma[0, 0] if scale == "shared" else sigma[0]
    assert torch.allclose(model.sigma.float(), expected, rtol=0, atol=1e-7)
    x = torch.randn(5, 6)
    dense = torch.distributions.MultivariateNormal(
        learned.decoder.linear.bias.double(),
        learned.decoder.linear.weight.double() @ learned.decoder.linear.weight.double().T
        + torch.diag(sigma[0].double() ** 2))
    assert torch.allclose(model.log_likelihood(x), dense.log_prob(x.double()), rtol=0,
                          atol=1e-9)


def test_linear_gaussian_is_none_for_what_is_not_a_vae():
    assert linear_gaussian(torch.nn.Linear(2, 6)) is None
    assert linear_gaussian(None) is None


@pytest.mark.usefixtures("float64")
def test_a_fixed_per_dimension_scale_gives_factor_analysis_exactly():
    # log w_k + log q(z_k|x) − log p(z_k|x) = log p(x) for every particle only if W, μ and every
    # σ_i were read correctly: the residual is float64 rounding.
    problem = make_linear_gaussian(seed=1)
    vae = problem.vae
    sigma = torch.linspace(0.3, 0.9, 6)
    vae.likelihood.fixed_scale = sigma
    model = linear_gaussian(vae)
    assert not model.isotropic and torch.equal(model.sigma, sigma)
    set_diagonal_guide(problem, loc_shift=0.2, scale_factor=1.3)
    result = gap_identity(vae, problem.x[:16], particles=200)
    assert float(result.residual.max()) <= 1e-9


def test_exact_reference_of_a_linear_gaussian_vae():
    problem = make_linear_gaussian()
    reference = exact_reference(problem.vae)
    assert reference.source == "linear-gaussian" and reference.linear is not None
    assert torch.allclose(reference.log_likelihood(problem.x), problem.exact_log_likelihood(),
                          rtol=0, atol=1e-10)
    assert reference.posterior(problem.x).batch_shape == (problem.x.shape[0],)
    assert torch.equal(exact_log_likelihood(problem.vae, problem.x),
                       reference.log_likelihood(problem.x))
    with pytest.raises(ConfigError, match="no labels"):
        reference.log_likelihood(problem.x, torch.zeros(problem.x.shape[0], dtype=torch.long))


def linear_gaussian_program(model: LinearGaussian, shift: float, **capabilities):
    """A hand-written Pyro pair for ``model`` with the latent site named "w" and a Gaussian guide
    that is the exact posterior, shifted by ``shift`` and widened by 1.5."""
    D, d = model.W.shape
    W, mu, sigma = model.W, model.mu, model.sigma
    covariance = model.posterior_covariance()

    def generative(x):
        with data_plate(x):
            w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mu + w @ W.T, sigma.expand(D)).to_event(1), obs=x)

    def guide(x):
        with data_plate(x):
            loc = model.posterior(x).mean + shift
            pyro.sample("w", dist.MultivariateNormal(loc, 2.25 * covariance))

    return program(generative, guide, data_dim=D, **capabilities)


def test_exact_reference_prefers_the_models_own_capabilities():
    model = random_model(4, 2, per_dim=False, seed=6)
    x = model.sample(5, torch.Generator().manual_seed(3))
    full = linear_gaussian_program(model, 0.0, exact_log_likelihood=model.log_likelihood,
                                   exact_posterior=model.posterior)
    reference = exact_reference(full)
    assert reference.source == "model"
    assert torch.equal(reference.log_likelihood(x), model.log_likelihood(x))
    assert torch.equal(reference.posterior(x).mean, model.posterior(x).mean)
    partial = exact_reference(linear_gaussian_program(model, 0.0,
                                                      exact_log_likelihood=model.log_likelihood))
    assert partial.posterior is None and torch.equal(partial.log_likelihood(x),
                                                     model.log_likelihood(x))
    assert exact_reference(linear_gaussian_program(model, 0.0)) is None
    vae = make_linear_gaussian().vae
    vae.exact_log_likelihood = lambda x, y=None: torch.zeros(x.shape[0])
    assert exact_reference(vae).source == "model" and exact_reference(vae).posterior is None


# -- the gap identity -----------------------------------------------------------------------------
def imperfect_vae(guide: str) -> tuple[VAE, LinearGaussian, torch.Tensor]:
    """The linear-Gaussian VAE of the helpers (float64 when the fixture is on) with the given
    guide family and an encoder of small random weights: a guide far from the posterior."""
    problem = make_linear_gaussian(seed=2)
    vae = VAE(6, 2, likelihood="normal", likelihood_options={"scale": problem.sigma},
              encoder="linear", decoder="linear", guide=guide)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        vae.decoder.linear.weight.copy_(problem.W)
        vae.decoder.linear.bias.copy_(problem.mu)
        for parameter in vae.encoder.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return vae, linear_gaussian(vae), problem.x[:32].to(torch.get_default_dtype())


def aggregate(values: torch.Tensor, se: torch.Tensor) -> tuple[float, float]:
    """The mean over datapoints and its Monte Carlo standard error (independent particles)."""
    return float(values.mean()), float(se.pow(2).sum().sqrt() / values.numel())


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("guide", ["normal", "full-rank", "flow"])
def test_elbo_plus_kl_is_the_exact_log_likelihood(guide):
    vae, model, x = imperfect_vae(guide)
    result = gap_identity(vae, x, particles=1000, seed=1)
    exact = model.log_likelihood(x)
    assert torch.equal(result.log_likelihood, exact)
    # the same particles: exact per particle, so for the means too (float64 rounding)
    assert float(result.residual.max()) <= 1e-9
    assert torch.allclose(result.elbo + result.kl, exact, rtol=0, atol=1e-9)
    assert torch.allclose(result.gap, result.kl, rtol=0, atol=1e-9)
    assert torch.allclose(result.kl_se, result.elbo_se, rtol=1e-6)
    gap, gap_se = aggregate(result.gap, result.gap_se)
    assert gap > 3 * gap_se > 0  # the guide is imperfect: a true gap, far beyond noise
    if guide == "flow":
        assert result.kl_closed_form is None
        # an independent Monte Carlo KL, from kl_from's own draws of q
        torch.manual_seed(2)
        independent = model.kl_from(vae.encode(x), x, samples=1000)
        assert not independent.closed_form
        kl, kl_se = aggregate(independent.value, independent.se)
        assert abs(gap - kl) <= 3 * math.hypot(gap_se, kl_se), (gap, kl, gap_se, kl_se)
        return
    # the true gap estimates KL(q ‖ p(z|x)), here in closed form
    closed = result.kl_closed_form
    assert bool((closed >= 0).all())
    reference = kl_divergence(MultivariateNormal(vae.encode(x).mean,
                                                 vae.encode(x).covariance_matrix
                                                 if guide == "full-rank"
                                                 else torch.diag_embed(vae.encode(x).variance)),
                              model.posterior(x))
    assert torch.allclose(closed, reference.detach(), rtol=0, atol=1e-9)
    assert abs(gap - float(closed.mean())) <= 3 * gap_se, (gap, float(closed.mean()), gap_se)


@pytest.mark.usefixtures("float64")
def test_gap_identity_of_a_hand_written_program():
    # the traced path of log_weights, a latent site named "w", and the model's own capabilities
    model = random_model(5, 2, per_dim=True, seed=9)
    x = model.sample(24, torch.Generator().manual_seed(4))
    lvm = linear_gaussian_program(model, 0.4, exact_log_likelihood=model.log_likelihood,
                                  exact_posterior=model.posterior)
    result = gap_identity(lvm, x, particles=1000, seed=3)
    assert float(result.residual.max()) <= 1e-9
    # the guide is the posterior shifted by 0.4·1 and widened by 1.5: in closed form
    # KL = ½[d·1.5² − d − 2d·log 1.5 + 0.4²·1ᵀΣ⁻¹1], the same for every datapoint
    precision = torch.linalg.inv(model.posterior_covariance())
    expected = 0.5 * (2 * 2.25 - 2 - 4 * math.log(1.5) + 0.16 * float(precision.sum()))
    assert torch.allclose(result.kl_closed_form, torch.full((24,), expected, dtype=torch.float64),
                          rtol=0, atol=1e-10)
    gap, gap_se = aggregate(result.gap, result.gap_se)
    assert abs(gap - expected) <= 3 * gap_se, (gap, expected, gap_se)
    summary = result.summary()
    assert summary["kl_closed_form"] == pytest.approx(expected, abs=1e-10)
    assert summary["gap"] == pytest.approx(gap) and summary["particles"] == 1000


def test_gap_identity_is_seeded_and_leaves_the_callers_random_state_alone():
    vae, _, x = imperfect_vae("normal")
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = gap_identity(vae, x, particles=50, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.elbo, gap_identity(vae, x, particles=50, seed=4).elbo)
    assert not torch.equal(first.elbo, gap_identity(vae, x, particles=50, seed=5).elbo)


# -- KL(q ‖ p(z|x)) ---------------------------------------------------------------------------
@pytest.mark.usefixtures("float64")
def test_kl_from_closed_form_agrees_with_torch_and_with_monte_carlo():
    model = random_model(5, 2, per_dim=False, seed=12)
    x = model.sample(20, torch.Generator().manual_seed(5))
    posterior = model.posterior(x)
    assert float(model.kl_from(posterior, x).value.abs().max()) <= 1e-12  # KL(p ‖ p) = 0
    q = MultivariateNormal(posterior.mean + 0.3, 2.0 * posterior.covariance_matrix)
    closed = model.kl_from(q, x)
    assert closed.closed_form and bool((closed.se == 0).all())
    assert torch.allclose(closed.value, kl_divergence(q, posterior), rtol=0, atol=1e-10)
    # a diagonal Normal is scored as the MultivariateNormal of the same diagonal
    scale = torch.tensor([0.3, 0.7])
    diagonal = dist.Normal(posterior.mean, scale).to_event(1)
    as_full = MultivariateNormal(posterior.mean, torch.diag(scale**2))
    assert torch.allclose(model.kl_from(diagonal, x).value, model.kl_from(as_full, x).value,
                          rtol=0, atol=1e-12)
    # the same q hidden behind an identity transform: the Monte Carlo branch
    torch.manual_seed(6)
    sampled = model.kl_from(TransformedDistribution(q, []), x, samples=4000)
    assert not sampled.closed_form
    mc, mc_se = aggregate(sampled.value, sampled.se)
    assert abs(mc - float(closed.value.mean())) <= 3 * mc_se, (mc, mc_se)


# -- bad input ------------------------------------------------------------------------------------
W0, MU0 = torch.ones(4, 2), torch.zeros(4)


@pytest.mark.parametrize("build,message", [
    (lambda: LinearGaussian(torch.ones(4), MU0, 1.0), "[D, d] matrix"),
    (lambda: LinearGaussian(torch.ones(4, 0), MU0, 1.0), "[D, d] matrix"),
    (lambda: LinearGaussian(W0, torch.zeros(3), 1.0), "mu must have shape [4]"),
    (lambda: LinearGaussian(W0, MU0, 0.0), "sigma must be positive"),
    (lambda: LinearGaussian(W0, MU0, -1.0), "sigma must be positive"),
    (lambda: LinearGaussian(W0, MU0, float("inf")), "non-finite"),
    (lambda: LinearGaussian(W0, MU0, torch.tensor([1.0, 1.0, 0.0, 1.0])), "positive"),
    (lambda: LinearGaussian(W0, MU0, torch.ones(3)), "sigma must be a number or have shape"),
    (lambda: LinearGaussian(W0, MU0, True), "must be a tensor"),
    (lambda: LinearGaussian(W0, MU0, "1"), "must be a tensor"),
    (lambda: LinearGaussian(W0 * float("nan"), MU0, 1.0), "non-finite"),
    (lambda: LinearGaussian(W0, MU0, 1.0).log_likelihood(torch.zeros(3, 5)), "[N, 4]"),
    (lambda: LinearGaussian(W0, MU0, 1.0).log_likelihood(torch.zeros(4)), "[N, 4]"),
    (lambda: LinearGaussian(W0, MU0, 1.0).log_likelihood(torch.zeros(0, 4)), "no datapoints"),
    (lambda: LinearGaussian(W0, MU0, 1.0).posterior(torch.zeros(2, 4, 1)), "[N, 4]"),
    (lambda: LinearGaussian(W0, MU0, 1.0).sample(0), "positive integer"),
    (lambda: LinearGaussian(W0, MU0, 1.0).kl_from(Normal(torch.zeros(2), 1.0),
                                                  torch.zeros(2, 4)), "event shape [2]"),
    (lambda: LinearGaussian(W0, MU0, 1.0).kl_from(
        TransformedDistribution(dist.Normal(torch.zeros(2, 2), 1.0).to_event(1), []),
        torch.zeros(2, 4), samples=1), "samples must be"),
    (lambda: gap_identity(VAE(4, 2, decoder="linear", hidden=(4,)), torch.rand(3, 4)),
     "needs an exact log-likelihood"),
    (lambda: exact_log_likelihood(VAE(4, 2, hidden=(4,)), torch.rand(3, 4)),
     "has no exact log-likelihood"),
    (lambda: gap_identity(linear_gaussian_program(
        random_model(4, 2, False, 0), 0.0,
        exact_log_likelihood=random_model(4, 2, False, 0).log_likelihood), torch.rand(3, 4)),
     "no exact_posterior"),
    (lambda: gap_identity(make_linear_gaussian().vae, torch.rand(3, 6), particles=1),
     "particles must be"),
    (lambda: gap_identity(make_linear_gaussian().vae, torch.rand(3, 5)), "[N, 6]"),
    (lambda: gap_identity(torch.nn.Linear(2, 2), torch.rand(3, 2)), "model/guide pair"),
    (lambda: gap_identity("model", torch.rand(3, 2)), "latent-variable model"),
], ids=lambda case: case if isinstance(case, str) else "")
def test_bad_input_is_a_one_line_config_error(build, message):
    with pytest.raises(ConfigError) as error:
        build()
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_linear_gaussian_holds_copies():
    W = torch.ones(4, 2, dtype=torch.float64)
    held = LinearGaussian(W, MU0, 1.0)
    W.zero_()
    assert bool((held.W == 1).all())  # a copy, not the caller's tensor
    x = torch.randn(3, 4, dtype=torch.float64)
    for copied in (copy.deepcopy(held), pickle.loads(pickle.dumps(held))):
        assert torch.equal(copied.log_likelihood(x), held.log_likelihood(x))
