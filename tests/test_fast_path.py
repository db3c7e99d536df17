"""The untraced path of the log-weights core equals the traced Pyro path exactly."""

from __future__ import annotations

import itertools

import pyro
import pytest
import torch

from pyro_vae import VAE, load_data
from pyro_vae.log_weights import _plain_vae, log_weights
from pyro_vae.objectives import OBJECTIVES, make_objective

CASES = list(itertools.product(("normal", "mog", "vamp", "flow"), ("normal", "full-rank", "flow")))


@pytest.fixture(scope="module")
def batch():
    data = load_data("digits")
    return data.train[:32], data.labels["train"][:32]


def _loss_and_grads(vae, objective, x, y, traced: bool):
    assert traced or _plain_vae(vae.model, vae.guide) is vae  # this call takes the fast path
    pyro.set_rng_seed(1)
    if traced:
        with pyro.poutine.block():  # any active handler sends the core down the traced path
            loss = objective.differentiable_loss(vae.model, vae.guide, x, y, num_data=500)
    else:
        loss = objective.differentiable_loss(vae.model, vae.guide, x, y, num_data=500)
    params = [p for p in vae.parameters()]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("prior,guide", CASES, ids=["-".join(c) for c in CASES])
def test_fast_path_equals_traced_path_for_every_objective(batch, prior, guide):
    x, _ = batch
    pyro.set_rng_seed(0)
    vae = VAE((1, 8, 8), 3, prior=prior, guide=guide, hidden=(16,))
    for name in OBJECTIVES:
        objective = make_objective(name, 3 if name not in ("elbo", "meanfield", "stl") else 1)
        try:
            fast = _loss_and_grads(vae, objective, x, None, traced=False)
        except Exception as exc:  # an objective that refuses this combination refuses on both
            with pytest.raises(type(exc)):
                _loss_and_grads(vae, objective, x, None, traced=True)
            continue
        traced = _loss_and_grads(vae, objective, x, None, traced=True)
        assert torch.equal(fast[0], traced[0]), name
        for a, b in zip(fast[1], traced[1]):
            assert (a is None) == (b is None), name
            if a is not None:
                # the same sums in a differently shaped graph: float32 rounding (ε ≈ 1.2e-7)
                # accumulated over at most a few hundred terms
                assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()) + 1e-30), name


def test_fast_path_for_a_conditional_vae_and_evaluation_statistics(batch):
    x, y = batch
    pyro.set_rng_seed(0)
    vae = VAE((1, 8, 8), 3, hidden=(16,), conditional=True, num_classes=10)
    pyro.set_rng_seed(2)
    fast = log_weights(vae.model, vae.guide, x, y, particles=4, num_data=100)
    pyro.set_rng_seed(2)
    with pyro.poutine.block():
        traced = log_weights(vae.model, vae.guide, x, y, particles=4, num_data=100)
    for field in ("log_likelihood", "log_prior", "log_guide"):
        assert torch.equal(getattr(fast, field), getattr(traced, field)), field
    assert torch.equal(fast.latents, traced.latents) and fast.scale == traced.scale == 100 / 32


def test_the_traced_path_is_kept_wherever_pyro_is_listening(batch):
    x, _ = batch
    vae = VAE((1, 8, 8), 2, hidden=(8,))
    assert _plain_vae(vae.model, vae.guide) is vae
    with pyro.poutine.trace():
        assert _plain_vae(vae.model, vae.guide) is None      # SVI's parameter capture, poutine

    class Custom(VAE):
        def model(self, x, y=None, num_data=None):
            return super().model(x, y, num_data)

    custom = Custom((1, 8, 8), 2, hidden=(8,))
    assert _plain_vae(custom.model, custom.guide) is None    # a user's own program is traced


def test_validation_still_catches_bad_values_on_the_fast_path():
    vae = VAE(3, 2, likelihood="poisson", hidden=(8,))
    with pyro.validation_enabled(True), pytest.raises(ValueError):
        log_weights(vae.model, vae.guide, torch.tensor([[0.5, 1.0, 2.0]]))  # not a count


def test_log_prior_and_log_guide_are_computed_only_when_read(batch, monkeypatch):
    """meanfield takes the KL in closed form: the fast path does not compute log p(z) and
    log q(z|x) for it; elbo reads both. A deferred term is computed under the gradient mode
    the weights were made in."""
    x, _ = batch
    vae = VAE((1, 8, 8), 3, hidden=(16,))
    reads = []

    class Counting(pyro.distributions.Independent):
        def log_prob(self, value):
            reads.append(value.shape)
            return super().log_prob(value)

    latent = vae.latent_dim
    monkeypatch.setattr(vae.prior, "distribution", lambda: Counting(
        pyro.distributions.Normal(torch.zeros(latent), torch.ones(latent)), 1))
    make_objective("meanfield", 1).differentiable_loss(vae.model, vae.guide, x)
    assert reads == []
    make_objective("elbo", 1).differentiable_loss(vae.model, vae.guide, x)
    assert reads == [torch.Size([1, 32, latent])]
    with torch.no_grad():
        weights = log_weights(vae.model, vae.guide, x)
    assert weights.log_prior.grad_fn is None and weights.log_guide.grad_fn is None
    weights = log_weights(vae.model, vae.guide, x)
    assert weights.log_guide.grad_fn is not None
