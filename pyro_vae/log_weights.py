"""The one core every bound reduces: per-datapoint log importance weights.

For K particles z_k ~ q_φ(z|x) drawn in one vectorized pass (particle dimension leftmost),

    log w_k(x) = log p_θ(x | z_k) + log p(z_k) − log q_φ(z_k | x),     shape [K, batch].

The three terms are kept apart so that objectives can weight the latent terms (β) or clamp them
(free bits), and the minibatch scale ``num_data / batch`` is returned separately, so that every
objective applies it *outside* any log-mean-exp over particles. (Pyro's ``RenyiELBO`` applies it
inside, which mis-scales minibatch IWAE.)

Objectives (:mod:`pyro_vae.objectives`), the evaluator and the diagnostics all start here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .errors import ConfigError


@dataclass
class LogWeights:
    """Per-datapoint log-density terms of K particles, each of shape ``[particles, batch]``.

    ``log_likelihood``: log p_θ(x | z) (observed sites);
    ``log_prior``: log p(z) (latent sites of the model);
    ``log_guide``: log q_φ(z | x) (sites of the guide);
    ``latents``: the sampled values of the latent site ``"z"``, ``[particles, batch, latent_dim]``;
    ``scale``: num_data / batch, the factor that turns a minibatch sum into a data-set estimate.
    """

    log_likelihood: torch.Tensor
    log_prior: torch.Tensor
    log_guide: torch.Tensor
    latents: torch.Tensor | None
    scale: float

    @property
    def particles(self) -> int:
        return self.log_likelihood.shape[0]

    def total(self, beta: float = 1.0) -> torch.Tensor:
        """log w = log p(x|z) + β (log p(z) − log q(z|x)); β = 1 is the usual importance weight."""
        latent = self.log_prior - self.log_guide
        return self.log_likelihood + (latent if beta == 1.0 else beta * latent)

    def log_mean_weight(self, beta: float = 1.0) -> torch.Tensor:
        """log (1/K) Σ_k w_k: the per-datapoint IWAE_K bound, ``[batch]``."""
        return torch.logsumexp(self.total(beta), dim=0) - math.log(self.particles)


def _site_log_prob(site: dict) -> torch.Tensor:
    log_prob = site["fn"].log_prob(site["value"])
    if site.get("mask") is not None:
        log_prob = log_prob * site["mask"]
    return log_prob


def log_weights(model: Callable, guide: Callable, *args, particles: int = 1, **kwargs) -> LogWeights:
    """Trace ``guide`` and replay ``model`` against it with ``particles`` vectorized particles.

    Both programs must place every sample site inside the plate ``"data"`` (dim −1), as
    :class:`pyro_vae.VAE` does; the particle plate takes dim −2. The result is differentiable
    with respect to both programs' parameters through reparameterized samples.

    .. warning:: Gradients are pathwise: guide sites must be reparameterizable
       (``has_rsample``); non-reparameterized guide sites are refused.
    """
    if not isinstance(particles, int) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, not {particles!r}")
    with pyro.plate("particles", particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)

    shape = None
    log_likelihood = log_prior = log_guide = 0.0
    scale = 1.0
    for site in model_trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        term = _site_log_prob(site)
        if site["is_observed"]:
            log_likelihood = log_likelihood + term
            scale = float(site["scale"])
        else:
            log_prior = log_prior + term
        shape = term.shape if shape is None else torch.broadcast_shapes(shape, term.shape)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise ConfigError(f"guide site {name!r} is not reparameterizable; "
                              "these bounds need pathwise gradients")
        log_guide = log_guide + _site_log_prob(site)
    if shape is None or len(shape) != 2:
        raise ConfigError("log_weights needs sample sites inside the plate 'data' "
                          f"(got log-density shape {tuple(shape) if shape else None})")
    shape = (particles, shape[-1])
    latents = guide_trace.nodes["z"]["value"] if "z" in guide_trace.nodes else None

    def full(term):
        if torch.is_tensor(term):
            return term.expand(shape)
        return torch.zeros(shape, device=log_likelihood.device)

    return LogWeights(full(log_likelihood), full(log_prior), full(log_guide), latents, scale)
