"""Bounds against exact answers on a linear-Gaussian (probabilistic PCA) VAE."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_vae import VAE, evaluate, log_weights
from pyro_vae.objectives import make_objective

from helpers import set_diagonal_guide


def test_exact_posterior_gives_exact_log_likelihood(linear_gaussian):
    # With q equal to the true posterior every importance weight equals p(x): the ELBO and the
    # IWAE estimate are log p(x) up to float32 rounding, with any K.
    evaluation = evaluate(linear_gaussian.vae, linear_gaussian.x, particles=50)
    exact = linear_gaussian.exact_log_likelihood()
    assert torch.allclose(evaluation.log_likelihood.double(), exact, atol=2e-4)
    assert torch.allclose(evaluation.elbo.double(), exact, atol=2e-4)
    assert torch.allclose(evaluation.ess, torch.full_like(evaluation.ess, 50.0), rtol=1e-3)


def test_log_likelihood_k5000_matches_closed_form_within_3_mc_se(linear_gaussian):
    set_diagonal_guide(linear_gaussian, loc_shift=0.3, scale_factor=1.6)
    evaluation = evaluate(linear_gaussian.vae, linear_gaussian.x, particles=5000)
    exact = linear_gaussian.exact_log_likelihood()
    difference = float(evaluation.log_likelihood.double().mean() - exact.mean())
    mc_se = evaluation.summary["log_likelihood_mc_se"]
    # The IWAE_K estimate is biased low by ≈ se_b²/2 per datapoint (delta method).
    bias = float(evaluation.log_likelihood_mc_se.pow(2).mean() / 2)
    assert mc_se > 0  # the guide is imperfect: the weights do vary
    assert abs(difference + bias) <= 3 * mc_se, (difference, bias, mc_se)
    # and the importance-sampled estimate is far tighter than the ELBO of the same guide
    assert float(exact.mean() - evaluation.elbo.double().mean()) > 100 * mc_se


def test_bounds_are_ordered_elbo_iwae5_iwae50_exact(linear_gaussian):
    set_diagonal_guide(linear_gaussian, loc_shift=0.3, scale_factor=1.6)
    exact = linear_gaussian.exact_log_likelihood().float()
    bounds = [evaluate(linear_gaussian.vae, linear_gaussian.x, particles=k, seed=k).log_likelihood
              for k in (1, 5, 50)]
    n = exact.shape[0]

    def paired(a, b):  # mean and standard error of a − b over datapoints
        d = a - b
        return float(d.mean()), float(d.std() / math.sqrt(n))

    for lower, upper in zip(bounds, bounds[1:]):
        gap, se = paired(upper, lower)
        assert gap > 3 * se, (gap, se)  # strictly tighter, far beyond noise, for this guide
    gap, se = paired(exact, bounds[-1])
    assert gap > -3 * se, (gap, se)  # IWAE_50 ≤ log p(x) in expectation


def test_analytic_kl_of_diagonal_gaussian_matches_closed_form_and_monte_carlo():
    # q = N((2, 0), diag(0.25, 4)), p = N(0, I): KL = ½ Σ (σ² + μ² − 1 − log σ²) = 3.125
    vae = VAE(3, 2, encoder="linear", decoder="linear")
    std = torch.tensor([0.5, 2.0])
    raw = std - vae.guide_family.min_scale
    raw = raw + torch.log(-torch.expm1(-raw))
    with torch.no_grad():
        vae.encoder.linear.weight.zero_()
        vae.encoder.linear.bias.copy_(torch.cat([torch.tensor([2.0, 0.0]), raw]))
    x = torch.zeros(1, 3)
    q, p = vae.encode(x), vae.prior.distribution()
    analytic = float(kl_divergence(q, p).detach())
    assert analytic == pytest.approx(3.125, abs=1e-5)

    pyro.set_rng_seed(0)
    with torch.no_grad():
        weights = log_weights(vae.model, vae.guide, x, particles=20000)
    kl_samples = (weights.log_guide - weights.log_prior).squeeze(-1)
    mc_mean = float(kl_samples.mean())
    mc_se = float(kl_samples.std() / math.sqrt(kl_samples.numel()))
    assert abs(mc_mean - 3.125) <= 3 * mc_se, (mc_mean, mc_se)


def test_core_elbo_equals_pyro_trace_elbo_including_minibatch_scale(linear_gaussian):
    vae, x = linear_gaussian.vae, linear_gaussian.x[:32]
    num_data = 400
    objective = make_objective("elbo", particles=3)
    pyro.set_rng_seed(3)
    pyro_loss = objective.loss(vae.model, vae.guide, x, num_data=num_data)
    pyro.set_rng_seed(3)
    weights = log_weights(vae.model, vae.guide, x, particles=3, num_data=num_data)
    assert weights.scale == pytest.approx(num_data / 32)
    ours = -weights.scale * float(weights.total().detach().mean(0).sum())
    assert pyro_loss == pytest.approx(ours, rel=1e-5)


def test_iwae_minibatch_scale_is_outside_the_log_mean_exp(linear_gaussian):
    # Regression test for Pyro RenyiELBO's scaling: loss(batch of B from N) = (N/B) Σ_b IWAE_b.
    set_diagonal_guide(linear_gaussian, loc_shift=0.3, scale_factor=1.6)
    vae, x = linear_gaussian.vae, linear_gaussian.x[:16]
    num_data, k = 400, 7
    pyro.set_rng_seed(5)
    loss = make_objective("iwae", particles=k).loss(vae.model, vae.guide, x, num_data=num_data)
    # the same particles, computed by hand from the two halves of the VAE
    pyro.set_rng_seed(5)
    with torch.no_grad():
        q = vae.encode(x)
        z = q.rsample((k,))
        log_w = vae.decode(z).log_prob(x) + vae.prior.distribution().log_prob(z) - q.log_prob(z)
        per_datapoint = torch.logsumexp(log_w, 0) - math.log(k)
    assert loss == pytest.approx(-(num_data / 16) * float(per_datapoint.sum()), rel=1e-5)
    # and β weights the latent terms inside each weight
    pyro.set_rng_seed(5)
    loss_beta = make_objective("iwae", particles=k, beta=0.5).loss(vae.model, vae.guide, x,
                                                                   num_data=num_data)
    with torch.no_grad():
        log_w_beta = vae.decode(z).log_prob(x) + 0.5 * (vae.prior.distribution().log_prob(z)
                                                        - q.log_prob(z))
        per_datapoint_beta = torch.logsumexp(log_w_beta, 0) - math.log(k)
    assert loss_beta == pytest.approx(-(num_data / 16) * float(per_datapoint_beta.sum()), rel=1e-5)


def test_monte_carlo_kl_of_the_core_is_unbiased_for_the_analytic_kl(linear_gaussian):
    # elbo (Monte Carlo KL) and meanfield (analytic KL) estimate the same bound.
    vae, x = linear_gaussian.vae, linear_gaussian.x
    q = vae.encode(x)
    analytic = kl_divergence(q, vae.prior.distribution())
    pyro.set_rng_seed(0)
    with torch.no_grad():
        weights = log_weights(vae.model, vae.guide, x, particles=2000)
    kl_samples = (weights.log_guide - weights.log_prior).double()
    difference = kl_samples - analytic.detach().double()  # [particles, datapoints], mean zero
    se = float(difference.std() / math.sqrt(difference.numel()))
    assert abs(float(difference.mean())) <= 3 * se, (float(difference.mean()), se)
