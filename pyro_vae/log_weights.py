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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from .errors import ConfigError


@dataclass
class LatentSite:
    """One latent site: its value and the distributions that scored it."""

    value: torch.Tensor
    prior: torch.distributions.Distribution   # the model's distribution at the site
    guide: torch.distributions.Distribution   # the guide's distribution at the site


class LogWeights:
    """Per-datapoint log-density terms of K particles, each of shape ``[particles, batch]``.

    ``log_likelihood``: log p_θ(x | z) (observed sites);
    ``log_prior``: log p(z) (latent sites of the model);
    ``log_guide``: log q_φ(z | x) (sites of the guide; with ``stop_guide_gradient`` its
    parameters are detached and only the path through z carries gradient);
    ``sites``: the latent sites by name (value ``[particles, batch, ...]`` and distributions),
    for objectives that need more than the sums (analytic KL, per-dimension KL);
    ``scale``: num_data / batch, the factor that turns a minibatch sum into a data-set estimate.

    ``log_prior`` and ``log_guide`` may be given as functions of no arguments: they are then
    computed when first read (an objective with the KL in closed form never reads them).
    """

    def __init__(self, log_likelihood: torch.Tensor,
                 log_prior: torch.Tensor | Callable[[], torch.Tensor],
                 log_guide: torch.Tensor | Callable[[], torch.Tensor], scale: float,
                 sites: dict[str, LatentSite] | None = None):
        self.log_likelihood = log_likelihood
        self._log_prior, self._log_guide = log_prior, log_guide
        self._grad_enabled = torch.is_grad_enabled()  # a deferred term is computed as if now
        self.scale = scale
        self.sites = {} if sites is None else sites

    def _resolved(self, term):
        if not callable(term):
            return term
        with torch.set_grad_enabled(self._grad_enabled):
            return term()

    @property
    def log_prior(self) -> torch.Tensor:
        self._log_prior = self._resolved(self._log_prior)
        return self._log_prior

    @property
    def log_guide(self) -> torch.Tensor:
        self._log_guide = self._resolved(self._log_guide)
        return self._log_guide

    def __repr__(self) -> str:
        return (f"LogWeights(particles={self.particles}, batch={self.log_likelihood.shape[-1]}, "
                f"scale={self.scale}, sites={list(self.sites)})")

    @property
    def particles(self) -> int:
        return self.log_likelihood.shape[0]

    @property
    def latents(self) -> torch.Tensor | None:
        """The values of the latent site ``"z"``, ``[particles, batch, latent_dim]``."""
        site = self.sites.get("z")
        return None if site is None else site.value

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


@contextmanager
def _parameters_detached(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``module`` reads as a detached tensor."""
    saved = []
    for owner in module.modules():
        for name, parameter in owner._parameters.items():
            if parameter is not None:
                saved.append((owner, name, parameter))
    try:
        for owner, name, parameter in saved:
            owner._parameters[name] = parameter.detach()
        yield
    finally:
        for owner, name, parameter in saved:
            owner._parameters[name] = parameter


def _plain_vae(model: Callable, guide: Callable):
    """The VAE whose unmodified ``model``/``guide`` these are, when nothing else is listening:
    no Pyro handler is active (SVI's parameter capture, a user's ``poutine``). Then tracing
    would add bookkeeping and nothing else: the site structure is fixed by construction, and
    Pyro's validation switch also governs torch's argument and support checks, which the
    distributions run either way."""
    owner = getattr(model, "__self__", None)
    if owner is None or getattr(guide, "__self__", None) is not owner:
        return None
    from .vae import VAE

    if (not isinstance(owner, VAE) or type(owner).model is not VAE.model
            or type(owner).guide is not VAE.guide or _PYRO_STACK):
        return None
    return owner


def _vae_log_weights(vae, particles: int, stop_guide_gradient: bool, x: torch.Tensor,
                     y: torch.Tensor | None = None, num_data: int | None = None) -> LogWeights:
    """The same quantities as the traced path, computed from the VAE's components directly:
    z ~ q(z|x) with the particle dimension leftmost (the same random draws as Pyro's
    plate-expanded sample), then log p(x|z), log p(z), log q(z|x) per particle and datapoint."""
    batch = x.shape[0]
    if num_data is not None and num_data < batch:
        raise ConfigError(f"num_data ({num_data}) is smaller than the batch ({batch})")
    encoded = vae.encoder_output(x, y)
    guide = vae.guide_family.distribution(encoded)
    z = guide.rsample((particles,))
    prior = vae.prior.distribution()
    log_likelihood = vae.decode(z, y).log_prob(x)

    def log_guide() -> torch.Tensor:
        if not stop_guide_gradient:
            return guide.log_prob(z)
        # q scored with φ stopped: the same guide family on the detached encoder output, with
        # the family's own parameters detached; only the path through z carries gradient
        with _parameters_detached(vae.guide_family):
            return vae.guide_family.distribution(encoded.detach()).log_prob(z)

    shape = (particles, batch)
    site = LatentSite(z, prior.expand(shape), guide.expand(shape))
    # log p(z) and log q(z|x) are computed when an objective reads them (meanfield does not)
    return LogWeights(log_likelihood, lambda: prior.log_prob(z), log_guide,
                      1.0 if num_data is None else num_data / batch, {"z": site})


def log_weights(model: Callable, guide: Callable, *args, particles: int = 1,
                stop_guide_gradient: bool = False, **kwargs) -> LogWeights:
    """Trace ``guide`` and replay ``model`` against it with ``particles`` vectorized particles.

    Both programs must place every sample site inside the plate ``"data"`` (dim −1), as
    :class:`pyro_vae.VAE` does; the particle plate takes dim −2. The result is differentiable
    with respect to both programs' parameters through reparameterized samples.

    For an unmodified :class:`pyro_vae.VAE` with no Pyro handler active (how
    :func:`pyro_vae.fit` and :func:`pyro_vae.evaluate` run), the same numbers are computed from
    its components without tracing; a test holds the two paths equal.

    With ``stop_guide_gradient`` the guide is scored a second time at the same z with its
    parameters detached, so log q(z|x) keeps only the gradient through z(φ, ε): the "path"
    gradient used by STL and DReG. The guide must then be a method of an ``nn.Module``.

    .. warning:: Gradients are pathwise: guide sites must be reparameterizable
       (``has_rsample``); non-reparameterized guide sites are refused.
    """
    if not isinstance(particles, int) or particles < 1:
        raise ConfigError(f"particles must be a positive integer, not {particles!r}")
    vae = _plain_vae(model, guide)
    if vae is not None:
        return _vae_log_weights(vae, particles, stop_guide_gradient, *args, **kwargs)
    with pyro.plate("particles", particles, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        scored_trace, stopped = guide_trace, {}
        if stop_guide_gradient:
            owner = getattr(guide, "__self__", None)
            if not isinstance(owner, torch.nn.Module):
                raise ConfigError("a stopped guide gradient (stl, dreg) needs the guide to be a "
                                  "method of an nn.Module, such as VAE.guide")
            with _parameters_detached(owner), warnings.catch_warnings():
                # pyro.module notes that detached tensors are not registered: intended here
                warnings.filterwarnings("ignore", message=".*not registered in the param store")
                scored_trace = poutine.trace(poutine.replay(guide, trace=guide_trace)).get_trace(
                    *args, **kwargs)
                # score while the parameters read detached: a flow's inverse runs lazily
                # inside log_prob, and must not see the live parameters
                stopped = {name: _site_log_prob(site) for name, site in scored_trace.nodes.items()
                           if site["type"] == "sample" and not site["is_observed"]
                           and not site_is_subsample(site)}

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
    sites = {}
    for name, site in scored_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if not site["fn"].has_rsample:
            raise ConfigError(f"guide site {name!r} is not reparameterizable; "
                              "these bounds need pathwise gradients")
        log_guide = log_guide + (stopped[name] if name in stopped else _site_log_prob(site))
        if name in model_trace.nodes:
            sites[name] = LatentSite(site["value"], model_trace.nodes[name]["fn"], site["fn"])
    if shape is None or len(shape) != 2:
        raise ConfigError("log_weights needs sample sites inside the plate 'data' "
                          f"(got log-density shape {tuple(shape) if shape else None})")
    shape = (particles, shape[-1])

    def full(term):
        if torch.is_tensor(term):
            return term.expand(shape)
        return torch.zeros(shape, device=log_likelihood.device)

    return LogWeights(full(log_likelihood), full(log_prior), full(log_guide), scale, sites)
