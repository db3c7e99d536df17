"""The textbook first latent-variable model, a Gaussian mixture, as a VAE with a one-hot z:

    z ~ Categorical(1/3, 1/3, 1/3) (one-hot),   x | z ~ N(W z + b, σ² I),   q(z | x) from an MLP,

trained with each estimator a discrete latent admits: enumeration (z summed out exactly), the
score function with a leave-one-out baseline, VIMCO, and the Concrete relaxation; then compared
side by side on one model state.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pytest
import torch
from scipy import stats

from pyro_vae import VAE, evaluate, fit
from pyro_vae.data import from_array
from pyro_vae.estimators import compare_estimators, variance_ratios

MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
SIGMA = 0.5


@pytest.fixture(scope="module")
def mixture():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    x = (MEANS[labels] + SIGMA * rng.standard_normal((600, 2))).astype(np.float32)
    return from_array(x, name="mixture", labels=labels)


def gmm(**options) -> VAE:
    return VAE(2, 3, prior="categorical", guide="categorical", likelihood="normal",
               decoder="linear", hidden=(32,), **options)


def cluster_means(vae: VAE) -> np.ndarray:
    """The decoder's mean for each one-hot z: the columns of W plus b, ``[3, 2]``."""
    with torch.no_grad():
        return vae.decoder(torch.eye(3)).numpy()


@pytest.mark.parametrize("estimator,objective,particles,options", [
    ("enumeration", "elbo", 1, {"guide_options": {"enumerate": True}}),
    ("score function", "elbo", 5, {}),
    ("vimco", "vimco", 5, {}),
])
def test_the_mixture_is_recovered(mixture, estimator, objective, particles, options):
    """Every cluster mean lands on its cluster's sample mean (the maximum-likelihood estimate
    for well-separated clusters) within 4 standard errors σ/√n_c, up to relabelling."""
    pyro.set_rng_seed(0)
    vae = gmm(**options)
    fit(vae, mixture, objective, particles=particles, epochs=150, batch_size=64, lr=3e-2,
        progress=False, device="cpu")
    x, labels = mixture.train.numpy(), mixture.labels["train"].numpy()
    sample_means = np.stack([x[labels == c].mean(0) for c in range(3)])
    tolerance = 4 * SIGMA / np.sqrt(np.bincount(labels, minlength=3))
    learned = cluster_means(vae)
    best = min(itertools.permutations(range(3)),
               key=lambda p: np.abs(learned[list(p)] - sample_means).max())
    error = np.abs(learned[list(best)] - sample_means).max(1)
    assert (error < tolerance).all(), (estimator, error, tolerance)


def test_the_relaxed_mixture_trains(mixture):
    """The Concrete relaxation trains a model of its own (z on the simplex): its bound rises.
    (From this initialization it settles on one cluster; see the README.)"""
    pyro.set_rng_seed(0)
    vae = VAE(2, 3, prior="relaxed-categorical", guide="relaxed-categorical",
              likelihood="normal", decoder="linear", hidden=(32,))
    before = evaluate(vae, mixture.val, particles=1).summary["elbo"]
    fit(vae, mixture, "elbo", epochs=20, batch_size=64, lr=3e-2, progress=False, device="cpu")
    after = evaluate(vae, mixture.val, particles=1)
    assert after.summary["elbo"] > before + 3 * after.summary["elbo_se"]


def test_estimators_side_by_side_on_one_mixture(mixture):
    pyro.set_rng_seed(0)
    vae = gmm()
    fit(vae, mixture, "elbo", particles=5, epochs=5, batch_size=64, lr=3e-2, progress=False,
        device="cpu")
    specs = ["elbo:enum", "elbo", "vimco", "elbo:relaxed"]
    rows = compare_estimators(vae, mixture.val[:32], specs, (5,), repeats=40, timing_repeats=3)
    by_name = {row["objective"]: row for row in rows}
    assert list(by_name) == specs
    for row in rows:
        for key in ("bound", "bound_se", "encoder_grad_var", "decoder_grad_var", "ms_per_step"):
            assert math.isfinite(row[key]), (row["objective"], key)
    # z summed out: the bound and its gradient are exact, the same on every draw
    assert by_name["elbo:enum"]["encoder_grad_var"] == 0.0
    assert by_name["elbo:enum"]["decoder_grad_var"] == 0.0
    assert by_name["elbo"]["encoder_grad_var"] > 0 and by_name["vimco"]["encoder_grad_var"] > 0
    # the ELBO with z summed out is the expectation the sampled ELBO estimates
    enum, sampled = by_name["elbo:enum"], by_name["elbo"]
    assert abs(enum["bound"] - sampled["bound"]) < 3 * math.hypot(enum["bound_se"],
                                                                  sampled["bound_se"])


def test_score_function_variance_ratio_on_the_default_continuous_model(digits):
    """The reparameterization trick's point, measured: on the default Gaussian VAE the encoder
    gradient of the score-function estimator varies more than the pathwise one (an F-test at
    α = 0.001 on R = 60 draws each)."""
    pyro.set_rng_seed(0)
    vae = VAE(digits.data_shape, 4, hidden=(32,))
    repeats = 60
    rows = compare_estimators(vae, digits.val[:32], ["elbo", "elbo:score"], (1,),
                              repeats=repeats, timing_repeats=2)
    ratio = variance_ratios(rows)[("elbo", 1)]
    assert ratio > stats.f.ppf(1 - 0.001, repeats - 1, repeats - 1)
