"""Every continuous prior × likelihood × guide, and the relaxed-categorical pair with every
likelihood, trains with elbo, iwae and dreg: a few steps give finite losses and move the
parameters of every component."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import VAE, load_data
from pyro_vae.data import from_array
from pyro_vae.guides.posteriors import POSTERIORS
from pyro_vae.models.likelihoods import LIKELIHOODS
from pyro_vae.models.priors import PRIORS
from pyro_vae.objectives import make_objective

COUNT_LIKELIHOODS = ("poisson", "negative-binomial")
OBJECTIVES = ("elbo", "iwae", "dreg")
LIKELIHOOD_OPTIONS = {"categorical": {"levels": 17}}
# The discrete families score only z in their own support (one-hot vectors, the simplex), so
# they pair with each other, not with the continuous ones; the categorical pair (no rsample, so
# no dreg) is tested in test_discrete_components.py.
DISCRETE = ("categorical", "relaxed-categorical")
CONTINUOUS_PRIORS = sorted(set(PRIORS) - set(DISCRETE))
CONTINUOUS_GUIDES = sorted(set(POSTERIORS) - set(DISCRETE))
COMBINATIONS = (list(itertools.product(CONTINUOUS_PRIORS, sorted(LIKELIHOODS), CONTINUOUS_GUIDES))
                + [("relaxed-categorical", likelihood, "relaxed-categorical")
                   for likelihood in sorted(LIKELIHOODS)])


@pytest.fixture(scope="module")
def batches():
    digits = load_data("digits").train[:16]  # image-type data: grey levels k/16 in [0, 1]
    counts = from_array(np.random.default_rng(0).poisson(3.0, size=(40, 64)).astype(np.float32))
    return {"digits": digits, "counts": counts.train[:16]}


def _components(vae):
    return {"prior": vae.prior, "likelihood": vae.likelihood, "guide": vae.guide_family,
            "encoder": vae.encoder, "decoder": vae.decoder}


@pytest.mark.parametrize("prior,likelihood,guide", COMBINATIONS,
                         ids=["-".join(c) for c in COMBINATIONS])
def test_combination_trains_with_every_objective(batches, prior, likelihood, guide):
    x = batches["counts" if likelihood in COUNT_LIKELIHOODS else "digits"]
    for objective in OBJECTIVES:
        pyro.set_rng_seed(0)
        vae = VAE((1, 8, 8), 2, prior=prior, likelihood=likelihood, guide=guide, hidden=(8,),
                  likelihood_options=LIKELIHOOD_OPTIONS.get(likelihood))
        before = {name: [p.detach().clone() for p in part.parameters()]
                  for name, part in _components(vae).items()}
        loss_fn = make_objective(objective, 1 if objective == "elbo" else 3)(vae.model, vae.guide)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
        for step in range(3):
            with pyro.validation_enabled(step == 0):
                loss = loss_fn(x, num_data=100)
            assert math.isfinite(float(loss.detach())), (objective, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for name, part in _components(vae).items():
            if before[name]:
                moved = any(not torch.equal(old, new.detach())
                            for old, new in zip(before[name], part.parameters()))
                assert moved, f"{objective}: no parameter of the {name} moved"
