"""STL and DReG on guides beyond the VAE: several dependent sites, ``pyro.param`` parameters,
plain functions, and global latents shared by the local particles.

The references are written directly with ``torch.autograd`` on the expanded expression of the
estimator, from the same random draws.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.errors import ConfigError
from pyro_vae.objectives import make_objective

X = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("float64")  # float64 and a clean param store (conftest)


def chain_model(x):
    """z₁ ~ N(0, 1), z₂ | z₁ ~ N(z₁, 1), x | z₂ ~ N(z₂, 1), per datapoint."""
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


GUIDE_INIT = {"a": 0.4, "b": 0.1, "log_s1": -0.3, "c": 0.6, "d": 0.2, "log_s2": -0.5}


def guide_parameters():
    return {name: pyro.param(name, torch.tensor(value)) for name, value in GUIDE_INIT.items()}


def chain_guide(x):
    """q(z₁|x) q(z₂|z₁, x): z₂ depends on z₁ (a plain function with ``pyro.param``)."""
    p = guide_parameters()
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(p["a"] * x + p["b"], p["log_s1"].exp()))
        pyro.sample("z2", dist.Normal(p["c"] * z1 + p["d"] * x, p["log_s2"].exp()))


def reference_dreg_gradient(x, particles: int, seed: int):
    """Σ_b Σ_k w̃²_kb ∂/∂φ log w_kb(z_kb(φ, ε)), log q scored at stopped φ: Tucker et al. (2019)
    eq. (5) for the joint z = (z₁, z₂), from the draws ``chain_guide`` makes under ``seed``."""
    p = {name: torch.tensor(value, requires_grad=True) for name, value in GUIDE_INIT.items()}
    stopped = {name: value.detach() for name, value in p.items()}
    pyro.set_rng_seed(seed)
    shape = (particles, x.shape[0])
    z1 = dist.Normal((p["a"] * x + p["b"]).expand(shape), p["log_s1"].exp().expand(shape)).rsample()
    z2 = dist.Normal(p["c"] * z1 + p["d"] * x, p["log_s2"].exp().expand(shape)).rsample()

    def log_w(q):
        log_p = (dist.Normal(0.0, 1.0).log_prob(z1) + dist.Normal(z1, 1.0).log_prob(z2)
                 + dist.Normal(z2, 1.0).log_prob(x))
        log_q = (dist.Normal(q["a"] * x + q["b"], q["log_s1"].exp()).log_prob(z1)
                 + dist.Normal(q["c"] * z1 + q["d"] * x, q["log_s2"].exp()).log_prob(z2))
        return log_p - log_q

    weights = log_w(stopped)
    normalized = torch.softmax(weights.detach(), 0)
    surrogate = (normalized.pow(2) * weights).sum()
    grads = torch.autograd.grad(surrogate, list(p.values()))
    bound = (torch.logsumexp(weights.detach(), 0) - math.log(particles)).sum()
    return float(bound), dict(zip(p, grads))


def pyro_vae_gradient(objective, seed: int):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(chain_model, chain_guide, X)
    store = pyro.get_param_store()
    unconstrained = [store._params[name] for name in GUIDE_INIT]  # no constraints: the values
    grads = torch.autograd.grad(loss, unconstrained)
    return -float(loss.detach()), {name: -g for name, g in zip(GUIDE_INIT, grads)}


@pytest.mark.parametrize("particles", [2, 5, 17])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dreg_on_a_dependent_two_site_guide_equals_the_brute_force_surrogate(particles, seed):
    bound, grads = pyro_vae_gradient(make_objective("dreg", particles), seed)
    ref_bound, ref_grads = reference_dreg_gradient(X, particles, seed)
    assert bound == pytest.approx(ref_bound, rel=1e-12)
    for name in GUIDE_INIT:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12), name


def conjugate_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def exact_posterior_guide(x):
    """q = p(z | x) = N(x/2, 1/√2), parameterized with ``pyro.param``."""
    slope = pyro.param("slope", torch.tensor(0.5))
    log_scale = pyro.param("log_scale", torch.tensor(-0.5 * math.log(2.0)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(slope * x, log_scale.exp()))


@pytest.mark.parametrize("name,particles", [("stl", 1), ("stl", 4), ("dreg", 4)])
def test_path_estimators_stop_pyro_param_guide_parameters(name, particles):
    """At the exact posterior log w is constant in z, so the path gradient of the guide is zero
    for every draw; the plain ELBO gradient (score term kept) is not."""
    for seed in range(3):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        loss = make_objective(name, particles).differentiable_loss(
            conjugate_model, exact_posterior_guide, X)
        store = pyro.get_param_store()
        grads = torch.autograd.grad(loss, [store._params["slope"], store._params["log_scale"]])
        for grad in grads:
            assert float(grad.abs()) < 1e-12
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = make_objective("elbo", 1).differentiable_loss(conjugate_model, exact_posterior_guide, X)
    store = pyro.get_param_store()
    grads = torch.autograd.grad(loss, [store._params["slope"], store._params["log_scale"]])
    assert max(float(g.abs()) for g in grads) > 1e-3


def test_path_estimators_refuse_a_discrete_guide_site():
    def model():
        with pyro.plate("data", 3):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=torch.zeros(3))

    def guide():
        with pyro.plate("data", 3):
            pyro.sample("c", dist.Bernoulli(pyro.param("p", torch.tensor(0.3))))

    for name in ("stl", "dreg"):
        with pytest.raises(ConfigError, match="'c'.*not reparameterizable"):
            make_objective(name, 2).differentiable_loss(model, guide)
