r"""Training objectives, by the names of the public contract.

Every objective reduces the per-datapoint log-weights of :func:`pyro_vae.log_weights.log_weights`

.. math:: \log w_k = \log p_θ(x|z_k) + β\,[\log p(z_k) - \log q_φ(z_k|x)],\qquad z_k \sim q_φ(z|x)

to a per-datapoint *surrogate* ``[batch]`` whose value is the bound and whose gradient is the
estimator's gradient; the loss is ``−(num_data / batch) · Σ_batch surrogate``, an estimate of the
whole data set's negative bound in nats. The minibatch scale is applied outside every
log-mean-exp (Pyro's ``RenyiELBO`` applies it inside, which mis-scales minibatch IWAE).

Every objective is a Pyro :class:`~pyro.infer.ELBO` (``elbo`` and ``meanfield`` subclass
``Trace_ELBO`` and ``TraceMeanField_ELBO``): use it with ``pyro.infer.SVI``, or call
``objective(model, guide)`` for an ``nn.Module`` loss to drive with ``torch.optim`` or DDP, as
:func:`pyro_vae.fit` does. None of them reads the loss back to the host while computing it.

``beta`` (β) multiplies the latent terms; ``beta`` is an attribute that :func:`pyro_vae.fit`
changes during KL annealing. ``free_bits`` (λ, nats per latent dimension; Kingma et al. 2016)
replaces the KL by Σ_d max(λ, KL_d), KL_d averaged over the minibatch; it needs a factorized
guide and prior and is offered by ``elbo`` and ``meanfield`` only.
"""

from __future__ import annotations

import math

import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Independent, kl_divergence

from .errors import ConfigError
from .log_weights import LogWeights, log_weights


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta >= 0 and math.isfinite(beta)):
        raise ConfigError(f"beta must be a non-negative number, not {beta!r}")
    return beta


def _check_free_bits(free_bits: float) -> float:
    free_bits = float(free_bits)
    if not (free_bits >= 0 and math.isfinite(free_bits)):
        raise ConfigError(f"free bits must be a non-negative number, not {free_bits!r}")
    return free_bits


class CoreObjective(ELBO):
    """An objective that reduces :class:`~pyro_vae.log_weights.LogWeights`.

    Subclasses define :meth:`surrogate`; everything else (loss, gradients, the per-datapoint
    bound, the ``nn.Module`` form inherited from :class:`~pyro.infer.ELBO`) is shared.
    """

    name = ""
    #: whether log q(z|x) is scored with the guide's parameters detached (STL, DReG)
    stop_guide_gradient = False
    supports_free_bits = False

    def __init__(self, num_particles: int = 1, beta: float = 1.0, free_bits: float = 0.0):
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ConfigError(f"particles must be a positive integer, not {num_particles!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=1)
        self.beta = _check_beta(beta)
        self.free_bits = _check_free_bits(free_bits)
        if self.free_bits and not self.supports_free_bits:
            raise ConfigError(f"objective {self.name!r} does not support free bits; "
                              "use 'elbo' or 'meanfield'")

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} reduces vectorized log-weights")

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        """Per-datapoint surrogate ``[batch]``: value = the bound, gradient = the estimator."""
        raise NotImplementedError

    def weights(self, model, guide, *args, **kwargs) -> LogWeights:
        return log_weights(model, guide, *args, particles=self.num_particles,
                           stop_guide_gradient=self.stop_guide_gradient, **kwargs)

    def per_datapoint_bound(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """The surrogate per datapoint, ``[batch]``, and the minibatch scale num_data / batch."""
        weights = self.weights(model, guide, *args, **kwargs)
        return self.surrogate(weights), weights.scale

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        bound, scale = self.per_datapoint_bound(model, guide, *args, **kwargs)
        return -scale * bound.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    # -- shared pieces -----------------------------------------------------------------------
    def _latent_site(self, weights: LogWeights):
        if set(weights.sites) != {"z"}:
            raise ConfigError(f"objective {self.name!r} with free bits needs exactly one latent "
                              f"site 'z', found {sorted(weights.sites)}")
        return weights.sites["z"]

    @staticmethod
    def _factor(distribution, what: str):
        """The per-dimension base of a factorized distribution over a vector."""
        if isinstance(distribution, Independent) and distribution.reinterpreted_batch_ndims == 1:
            return distribution.base_dist
        raise ConfigError(f"free bits need a factorized {what} (independent dimensions); "
                          f"{type(distribution).__name__} is not")

    def _free_bits_kl(self, kl_per_dim: torch.Tensor) -> torch.Tensor:
        """Σ_d max(λ, mean over batch and particles of KL_d), the same for every datapoint."""
        mean_kl = kl_per_dim.reshape(-1, kl_per_dim.shape[-1]).mean(0)
        return torch.clamp(mean_kl, min=self.free_bits).sum()


class TraceELBO(CoreObjective, Trace_ELBO):
    r"""``elbo``: the evidence lower bound with a Monte Carlo KL, as Pyro's ``Trace_ELBO``.

    .. math:: \mathcal{L}(x) = \frac{1}{K}\sum_{k=1}^K \big[\log p(x|z_k)
              + β(\log p(z_k) - \log q(z_k|x))\big],\quad z_k \sim q(z|x)

    Unbiased for the bound; the gradient is the pathwise (reparameterization) gradient,
    whose variance falls like 1/K. Equal, particle for particle, to ``pyro.infer.Trace_ELBO``.
    """

    name = "elbo"
    supports_free_bits = True

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        if not self.free_bits:
            return weights.total(self.beta).mean(0)
        site = self._latent_site(weights)
        prior = self._factor(site.prior, "prior")
        guide = self._factor(site.guide, "guide")
        # Monte Carlo KL per dimension: log q_d(z_d) − log p_d(z_d), [particles, batch, dims]
        kl_per_dim = guide.log_prob(site.value) - prior.log_prob(site.value)
        return weights.log_likelihood.mean(0) - self.beta * self._free_bits_kl(kl_per_dim)


class MeanFieldELBO(CoreObjective, TraceMeanField_ELBO):
    r"""``meanfield``: the ELBO with the KL in closed form, as Pyro's ``TraceMeanField_ELBO``.

    .. math:: \mathcal{L}(x) = \frac{1}{K}\sum_{k=1}^K \log p(x|z_k)
              - β\,\mathrm{KL}\big(q(z|x)\,\|\,p(z)\big)

    The closed-form KL removes that term's Monte Carlo variance.

    .. warning:: Pyro silently falls back to a Monte Carlo KL when no closed form is registered
       for the (guide, prior) pair. This objective refuses instead, naming the objectives that
       work.
    """

    name = "meanfield"
    supports_free_bits = True

    def _kl(self, site_name: str, site) -> torch.Tensor:
        try:
            return kl_divergence(site.guide, site.prior)
        except NotImplementedError:
            raise ConfigError(
                f"objective 'meanfield' needs a closed-form KL for site {site_name!r}, and none "
                f"is registered between {type(site.guide).__name__} and "
                f"{type(site.prior).__name__}; use 'elbo', 'iwae', 'renyi', 'dreg' or 'stl'"
            ) from None

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        reconstruction = weights.log_likelihood.mean(0)
        if self.free_bits:
            site = self._latent_site(weights)
            try:
                kl_per_dim = kl_divergence(self._factor(site.guide, "guide"),
                                           self._factor(site.prior, "prior"))
            except NotImplementedError:
                raise ConfigError(
                    "objective 'meanfield' with free bits needs a closed-form KL per latent "
                    f"dimension, and none is registered between the factors of "
                    f"{type(site.guide).__name__} and {type(site.prior).__name__}; use 'elbo'"
                ) from None
            return reconstruction - self.beta * self._free_bits_kl(kl_per_dim)
        kl = 0.0
        for name, site in weights.sites.items():
            kl = kl + self._kl(name, site).reshape(weights.particles, -1).mean(0)
        return reconstruction - self.beta * kl


class IWAE(CoreObjective):
    r"""``iwae``: the importance-weighted bound of Burda et al. (2016), per datapoint.

    .. math:: \mathcal{L}_K(x) = \log \frac{1}{K}\sum_{k=1}^K w_k,\quad
              w_k = \frac{p(x|z_k)\,p(z_k)^β}{q(z_k|x)^β},\ z_k \sim q(z|x)

    :math:`\mathcal{L}_1` is the ELBO; in expectation :math:`\mathcal{L}_K` rises monotonically
    in K towards log p(x). The gradient is the standard IWAE gradient Σ_k w̃_k ∇ log w_k
    (w̃ = normalized weights), whose signal-to-noise ratio for the guide's parameters decays
    like 1/√K while the model's grows like √K (Rainforth et al. 2018).

    .. warning:: With β ≠ 1 the latent terms are weighted inside each w_k; the result is no
       longer a bound on log p(x).
    """

    name = "iwae"

    def __init__(self, num_particles: int = 5, beta: float = 1.0, free_bits: float = 0.0):
        super().__init__(num_particles, beta, free_bits)

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        return weights.log_mean_weight(self.beta)


class Renyi(CoreObjective, RenyiELBO):
    r"""``renyi``: the variational Rényi bound of Li & Turner (2016), per datapoint.

    .. math:: \mathcal{L}_α(x) = \frac{1}{1-α} \log \frac{1}{K}\sum_{k=1}^K w_k^{1-α}

    α = 0 is the IWAE bound; α → 1 tends to the ELBO; for 0 ≤ α < 1 the bound lies between
    them, and for α < 0 it can exceed log p(x) (no longer a lower bound). Gradients are pathwise.
    Unlike Pyro's ``RenyiELBO``, the minibatch scale stays outside the log-mean-exp.
    """

    name = "renyi"

    def __init__(self, num_particles: int = 5, alpha: float = 0.5, beta: float = 1.0,
                 free_bits: float = 0.0):
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha == 1.0:
            raise ConfigError(f"renyi needs a finite alpha other than 1 (alpha = 1 is the ELBO: "
                              f"use 'elbo'), not {alpha!r}")
        CoreObjective.__init__(self, num_particles, beta, free_bits)
        self.alpha = alpha

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        power = 1.0 - self.alpha
        scaled = power * weights.total(self.beta)
        return (torch.logsumexp(scaled, 0) - math.log(weights.particles)) / power


class STL(CoreObjective):
    r"""``stl``: "sticking the landing" (Roeder et al. 2017) for the ELBO (K = 1) or IWAE (K > 1).

    The bound's value is that of ``elbo`` (K = 1) or ``iwae`` (K > 1), but log q(z|x) is scored
    with the guide's parameters stopped, so the guide's gradient keeps only the path term
    ∂ log w/∂z · ∂z/∂φ and drops the score term ∇_φ log q_φ(z|x), whose expectation is zero.
    When q equals the true posterior, log w is constant in z and the guide's gradient is exactly
    zero for every sample: zero variance at the optimum.

    .. warning:: For K > 1 the dropped term no longer has zero expectation: STL-IWAE is biased
       for the guide (Tucker et al. 2019); use ``dreg`` for an unbiased alternative.
    """

    name = "stl"
    stop_guide_gradient = True

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        if weights.particles == 1:
            return weights.total(self.beta)[0]
        return weights.log_mean_weight(self.beta)


class DReG(CoreObjective):
    r"""``dreg``: the IWAE bound with doubly-reparameterized gradients (Tucker et al. 2019).

    Value: the IWAE_K bound. Gradients:

    - the guide's (φ): Σ_k w̃_k² ∂log w_k/∂z_k · ∂z_k/∂φ, with log q scored with φ stopped;
      unbiased for the IWAE gradient, and its signal-to-noise ratio does not decay with K;
    - the model's (θ): the plain IWAE gradient Σ_k w̃_k ∇_θ log w_k.

    Implementation: the IWAE bound over stopped-φ log-weights already gives the θ gradient and
    w̃_k ∂log w_k/∂z_k at each z_k; a gradient hook on z_k multiplies the latter by w̃_k.

    .. warning:: The identity behind DReG needs w = p(x, z)/q(z|x); β ≠ 1 (and so KL annealing)
       breaks it and is refused.
    """

    name = "dreg"
    stop_guide_gradient = True

    def __init__(self, num_particles: int = 5, beta: float = 1.0, free_bits: float = 0.0):
        super().__init__(num_particles, beta, free_bits)
        if self.beta != 1.0:
            raise ConfigError("objective 'dreg' needs beta = 1 (no β-weighting or KL annealing): "
                              "its gradient identity holds for w = p(x,z)/q(z|x) only")

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        if self.beta != 1.0:
            raise ConfigError("objective 'dreg' needs beta = 1 (no β-weighting or KL annealing)")
        log_w = weights.total()
        if torch.is_grad_enabled():
            normalized = torch.softmax(log_w.detach(), dim=0)  # w̃, [particles, batch]
            for site in weights.sites.values():
                if site.value.requires_grad:
                    factor = normalized.reshape(normalized.shape + (1,) * (site.value.dim() - 2))
                    site.value.register_hook(lambda grad, factor=factor: grad * factor)
        return torch.logsumexp(log_w, 0) - math.log(weights.particles)


OBJECTIVES: dict[str, type[CoreObjective]] = {
    "elbo": TraceELBO,
    "meanfield": MeanFieldELBO,
    "iwae": IWAE,
    "renyi": Renyi,
    "dreg": DReG,
    "stl": STL,
}
#: K used when an objective is asked for without ``particles``.
DEFAULT_PARTICLES = {"elbo": 1, "meanfield": 1, "iwae": 5, "renyi": 5, "dreg": 5, "stl": 1}


def make_objective(name: str, particles: int | None = None, beta: float = 1.0,
                   free_bits: float = 0.0, alpha: float | None = None) -> CoreObjective:
    """The objective called ``name`` (see :data:`OBJECTIVES`) with K = ``particles``."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    if particles is None:
        particles = DEFAULT_PARTICLES[name]
    if alpha is not None and name != "renyi":
        raise ConfigError(f"alpha applies to objective 'renyi' only, not {name!r}")
    if name == "renyi":
        return Renyi(particles, alpha=0.5 if alpha is None else alpha, beta=beta,
                     free_bits=free_bits)
    return OBJECTIVES[name](particles, beta=beta, free_bits=free_bits)
