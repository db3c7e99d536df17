"""Training objectives, by the names of the public contract.

Every objective is a Pyro :class:`~pyro.infer.ELBO`: use it with ``pyro.infer.SVI``, or call
``objective(model, guide)`` for an ``nn.Module`` loss to drive with ``torch.optim`` (the form
:func:`pyro_vae.fit` uses). Losses are the negative bound summed over the minibatch and scaled
by ``num_data / batch``: an estimate of the whole data set's negative bound, in nats.

``beta`` multiplies the latent terms: log p(x|z) + β (log p(z) − log q(z|x)). For ``elbo`` and
``meanfield`` that is the β-VAE objective (Higgins et al. 2017); for ``iwae`` β weights the latent
terms *inside* each importance weight, so β ≠ 1 no longer gives a bound on log p(x).
"""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .errors import ConfigError
from .log_weights import log_weights


class _ScaleLatentSites(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by β."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


def _weighted(program, beta: float):
    return program if beta == 1.0 else _ScaleLatentSites(beta)(program)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta >= 0 and math.isfinite(beta)):
        raise ConfigError(f"beta must be a non-negative number, not {beta!r}")
    return beta


class TraceELBO(Trace_ELBO):
    r"""``elbo``: Pyro's :class:`~pyro.infer.Trace_ELBO` with an optional β.

    .. math:: \mathcal{L}(x) = \mathbb{E}_{q(z|x)}[\log p(x|z) + β(\log p(z) - \log q(z|x))]

    estimated with ``num_particles`` reparameterized samples (Monte Carlo KL). Unbiased for the
    bound; its gradient is the pathwise (reparameterization) gradient.
    """

    name = "elbo"

    def __init__(self, num_particles: int = 1, beta: float = 1.0):
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=1)
        self.beta = _check_beta(beta)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(_weighted(model, self.beta), _weighted(guide, self.beta),
                                           *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(_weighted(model, self.beta), _weighted(guide, self.beta), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(_weighted(model, self.beta), _weighted(guide, self.beta),
                                      *args, **kwargs)


class MeanFieldELBO(TraceMeanField_ELBO):
    r"""``meanfield``: Pyro's :class:`~pyro.infer.TraceMeanField_ELBO` with an optional β.

    .. math:: \mathcal{L}(x) = \mathbb{E}_{q(z|x)}[\log p(x|z)] - β\,\mathrm{KL}(q(z|x)\,\|\,p(z))

    with the KL in closed form, which removes its Monte Carlo variance.

    .. warning:: Pyro silently falls back to a Monte Carlo KL when no closed form is registered
       for the (guide, prior) pair. This objective refuses instead, on its first call, naming
       the objectives that do work.
    """

    name = "meanfield"

    def __init__(self, num_particles: int = 1, beta: float = 1.0):
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=1)
        self.beta = _check_beta(beta)
        self._checked = False

    def _check_analytic_kl(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            try:
                kl_divergence(guide_trace.nodes[name]["fn"], site["fn"])
            except NotImplementedError:
                raise ConfigError(
                    f"objective 'meanfield' needs a closed-form KL for site {name!r}, and none is "
                    f"registered between {type(guide_trace.nodes[name]['fn']).__name__} and "
                    f"{type(site['fn']).__name__}; use 'elbo', 'iwae', 'dreg' or 'stl'") from None
        self._checked = True

    def differentiable_loss(self, model, guide, *args, **kwargs):
        model, guide = _weighted(model, self.beta), _weighted(guide, self.beta)
        if not self._checked:
            self._check_analytic_kl(model, guide, args, kwargs)
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs):
        model, guide = _weighted(model, self.beta), _weighted(guide, self.beta)
        if not self._checked:
            self._check_analytic_kl(model, guide, args, kwargs)
        return super().loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


class IWAE(ELBO):
    r"""``iwae``: the importance-weighted bound of Burda et al. (2016), per datapoint.

    .. math:: \mathcal{L}_K(x) = \mathbb{E}\Big[\log \frac{1}{K}\sum_{k=1}^K w_k\Big],\quad
              w_k = \frac{p(x, z_k)}{q(z_k|x)},\ z_k \sim q(z|x)

    :math:`\mathcal{L}_1` is the ELBO; :math:`\mathcal{L}_K` rises monotonically in K towards
    log p(x). The K particles are drawn in one vectorized pass; the minibatch scale
    num_data / batch multiplies the per-datapoint bounds *outside* the log-mean-exp.
    The gradient is the standard IWAE gradient Σ_k w̃_k ∇ log w_k, whose signal-to-noise ratio
    for the guide's parameters decays like 1/√K (Rainforth et al. 2018).

    .. warning:: With β ≠ 1 the latent terms are weighted inside each w_k; the result is no
       longer a bound on log p(x).
    """

    name = "iwae"

    def __init__(self, num_particles: int = 5, beta: float = 1.0):
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=1)
        self.beta = _check_beta(beta)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("IWAE reduces vectorized log-weights; it has no per-particle trace")

    def per_datapoint_bound(self, model, guide, *args, **kwargs):
        """The IWAE_K estimate per datapoint, ``[batch]``, and the minibatch scale."""
        weights = log_weights(model, guide, *args, particles=self.num_particles, **kwargs)
        return weights.log_mean_weight(self.beta), weights.scale

    def differentiable_loss(self, model, guide, *args, **kwargs):
        bound, scale = self.per_datapoint_bound(model, guide, *args, **kwargs)
        return -scale * bound.sum()

    def loss(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


OBJECTIVES: dict[str, type[ELBO]] = {
    "elbo": TraceELBO,
    "meanfield": MeanFieldELBO,
    "iwae": IWAE,
}


def make_objective(name: str, particles: int = 1, beta: float = 1.0) -> ELBO:
    """The objective called ``name`` (see :data:`OBJECTIVES`) with K = ``particles``."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    if not isinstance(particles, int) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, not {particles!r}")
    return OBJECTIVES[name](num_particles=particles, beta=beta)
