r"""Exact references: the evidence and the posterior of a linear-Gaussian model in closed form.

**The model** (probabilistic PCA, Tipping & Bishop 1999; factor analysis when the noise is
per-dimension):

.. math:: z \sim \mathcal{N}(0, I_d), \qquad x = \mu + W z + \Psi^{1/2} \varepsilon,
          \qquad \varepsilon \sim \mathcal{N}(0, I_D), \qquad \Psi = \operatorname{diag}(\sigma^2),

with :math:`W` ``[D, d]`` and :math:`\sigma` one number (:math:`\Psi = \sigma^2 I`) or one per
dimension. Then

.. math:: p(x) = \mathcal{N}(x;\ \mu,\ W W^\top + \Psi), \qquad
          p(z \mid x) = \mathcal{N}\big(M^{-1} \hat W^\top \hat r,\ M^{-1}\big),

where :math:`\hat W = \Psi^{-1/2} W`, :math:`\hat r = \Psi^{-1/2}(x - \mu)` and
:math:`M = I + \hat W^\top \hat W`; for :math:`\Psi = \sigma^2 I` this is the mean
:math:`(W^\top W + \sigma^2 I)^{-1} W^\top (x - \mu)` and the covariance
:math:`\sigma^2 (W^\top W + \sigma^2 I)^{-1}`.

**Computation.** Everything is in float64 with one Cholesky factor :math:`M = L L^\top`
(:math:`d \times d`, all its eigenvalues :math:`\ge 1`). By the matrix determinant lemma
:math:`\log\lvert W W^\top + \Psi\rvert = \sum_i \log \sigma_i^2 + 2 \sum_j \log L_{jj}`, and the
quadratic form is the minimum over :math:`z` of the joint one, attained at the posterior mean
:math:`m`,

.. math:: (x - \mu)^\top (W W^\top + \Psi)^{-1} (x - \mu)
          = \lVert \hat r - \hat W m \rVert^2 + \lVert m \rVert^2,

a sum of two non-negative terms (no cancellation), in :math:`O(N D d)` per batch.

**The maximum-likelihood solution** (Tipping & Bishop 1999) of the isotropic model for
data with sample mean :math:`\bar x` and sample covariance
:math:`S = \frac1N \sum_n (x_n - \bar x)(x_n - \bar x)^\top` with eigenvalues
:math:`\lambda_1 \ge \dots \ge \lambda_D` and eigenvectors :math:`U`:

.. math:: \mu = \bar x, \qquad \sigma^2 = \frac{1}{D - d} \sum_{j > d} \lambda_j, \qquad
          W = U_d (\Lambda_d - \sigma^2 I)^{1/2}

(unique up to a rotation :math:`W R`; :meth:`LinearGaussian.mle` takes :math:`R = I`).

**The gap identity.** For any guide :math:`q(z \mid x)` and every particle :math:`z_k`,

.. math:: \underbrace{\log p(x, z_k) - \log q(z_k \mid x)}_{\log w_k}
          + \underbrace{\log q(z_k \mid x) - \log p(z_k \mid x)}_{\text{KL integrand}}
          = \log p(x),

so the Monte Carlo ELBO and the Monte Carlo :math:`\mathrm{KL}(q \,\Vert\, p(z \mid x))` of the
*same* particles add up to :math:`\log p(x)` exactly, and the true gap
:math:`\log p(x) - \mathrm{ELBO}` estimates the KL (:func:`gap_identity`).

:func:`linear_gaussian` reads this model off a :class:`pyro_vae.VAE` that is one;
:func:`exact_reference` gives any latent-variable model's exact answers where it has them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from .errors import ConfigError
from .lvm import device_of, has

__all__ = ["LinearGaussian", "PPCA", "KLEstimate", "ExactReference", "GapIdentity",
           "linear_gaussian", "exact_reference", "exact_log_likelihood", "gap_identity"]

_LOG_2PI = math.log(2 * math.pi)


class KLEstimate(NamedTuple):
    r""":math:`\mathrm{KL}(q(z \mid x) \,\Vert\, p(z \mid x))` per datapoint, ``[N]`` float64, with
    its Monte Carlo standard error (zero in closed form)."""

    value: torch.Tensor
    se: torch.Tensor
    closed_form: bool


def _float64(value: Any, what: str, device: torch.device | None = None,
             who: str = "LinearGaussian") -> torch.Tensor:
    if isinstance(value, bool) or not (torch.is_tensor(value) or isinstance(value, numbers.Real)
                                       or isinstance(value, (list, tuple))):
        raise ConfigError(f"{who}: {what} must be a tensor, not {type(value).__name__}")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{who}: {what} must be a tensor of numbers") from None
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ConfigError(f"{who}: {what} must be real numbers, not {tensor.dtype}")
    tensor = tensor.to(device=device if device is not None else tensor.device,
                       dtype=torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ConfigError(f"{who}: {what} holds a non-finite value")
    return tensor


def _batch(x: Any, data_dim: int, what: str) -> torch.Tensor:
    """``x`` as a ``[N, data_dim]`` tensor, or one line."""
    if not torch.is_tensor(x):
        raise ConfigError(f"{what} takes x as a [N, {data_dim}] tensor, not {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != data_dim:
        raise ConfigError(f"{what} takes x of shape [N, {data_dim}], not {list(x.shape)}")
    if x.shape[0] == 0:
        raise ConfigError(f"{what}: x holds no datapoints")
    if not x.dtype.is_floating_point:
        raise ConfigError(f"{what} takes floating-point data, not {x.dtype}")
    return x


def _as_gaussian(q: Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loc, scale_tril) of a Gaussian over vectors, or None for any other distribution."""
    if isinstance(q, MultivariateNormal):
        return q.loc, q.scale_tril
    if (isinstance(q, Independent) and q.reinterpreted_batch_ndims == 1
            and isinstance(q.base_dist, Normal)):
        loc, scale = torch.broadcast_tensors(q.base_dist.loc, q.base_dist.scale)
        return loc, torch.diag_embed(scale)
    return None


def _gaussian_kl(loc_q: torch.Tensor, tril_q: torch.Tensor, loc_p: torch.Tensor,
                 tril_p: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(m_q, L_q L_q^\top) \,\Vert\, \mathcal N(m_p, L_p L_p^\top))
    = \frac12\big[\lVert L_p^{-1} L_q\rVert_F^2 + \lVert L_p^{-1}(m_p - m_q)\rVert^2 - d
    + 2\sum\log \operatorname{diag} L_p - 2\sum\log \operatorname{diag} L_q\big]` in float64."""
    loc_q, tril_q = loc_q.double(), tril_q.double()
    d = loc_q.shape[-1]
    shape = torch.broadcast_shapes(loc_q.shape[:-1], tril_q.shape[:-2], loc_p.shape[:-1])
    tril_q = tril_q.expand(shape + (d, d))
    tril_p = tril_p.expand(shape + (d, d))
    delta = (loc_p - loc_q).expand(shape + (d,)).unsqueeze(-1)
    trace = torch.linalg.solve_triangular(tril_p, tril_q, upper=False).pow(2).sum((-2, -1))
    mahalanobis = torch.linalg.solve_triangular(tril_p, delta, upper=False).pow(2).sum((-2, -1))
    log_det = 2 * (tril_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                   - tril_q.diagonal(dim1=-2, dim2=-1).log().sum(-1))
    return 0.5 * (trace + mahalanobis - d + log_det)


class LinearGaussian:
    r"""The linear-Gaussian model :math:`x = \mu + W z + \operatorname{diag}(\sigma)\,\varepsilon`,
    :math:`z \sim \mathcal N(0, I_d)` (see the module docstring for the formulas).

    :param W: ``[D, d]`` loadings (any :math:`d \ge 1`).
    :param mu: ``[D]`` mean.
    :param sigma: the noise standard deviation, a positive number (probabilistic PCA) or ``[D]``
        positive numbers (factor analysis).

    The parameters are held as float64 copies on ``W``'s device (differentiable: gradients reach
    tensors given with ``requires_grad``) and cannot be reassigned. Every result is float64.
    """

    __slots__ = ("_W", "_mu", "_sigma")

    def __init__(self, W: torch.Tensor, mu: torch.Tensor, sigma: float | torch.Tensor):
        W = _float64(W, "W")
        if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
            raise ConfigError(f"LinearGaussian: W must be a non-empty [D, d] matrix, not of shape "
                              f"{list(W.shape)}")
        D = W.shape[0]
        mu = _float64(mu, "mu", W.device)
        if mu.shape != (D,):
            raise ConfigError(f"LinearGaussian: mu must have shape [{D}] (W is {list(W.shape)}), "
                              f"not {list(mu.shape)}")
        sigma = _float64(sigma, "sigma", W.device)
        if sigma.shape not in ((), (1,), (D,)):
            raise ConfigError(f"LinearGaussian: sigma must be a number or have shape [{D}], not "
                              f"{list(sigma.shape)}")
        if not bool((sigma > 0).all()):
            raise ConfigError("LinearGaussian: sigma must be positive, not "
                              f"{sigma.min().item():g}")
        object.__setattr__(self, "_W", W.clone())
        object.__setattr__(self, "_mu", mu.clone())
        if sigma.shape == (1,) and D != 1:
            sigma = sigma.reshape(())
        object.__setattr__(self, "_sigma", sigma.clone())

    def __setattr__(self, name, value):
        raise AttributeError("a LinearGaussian is immutable; build a new one")

    def __reduce__(self):
        return type(self), (self._W, self._mu, self._sigma)

    def __repr__(self) -> str:
        noise = f"{self._sigma.item():g}" if self._sigma.ndim == 0 else f"[{self.data_dim}]"
        return f"LinearGaussian(D={self.data_dim}, d={self.latent_dim}, sigma={noise})"

    # -- the parameters -------------------------------------------------------------------------
    @property
    def W(self) -> torch.Tensor:
        """``[D, d]`` float64."""
        return self._W

    @property
    def mu(self) -> torch.Tensor:
        """``[D]`` float64."""
        return self._mu

    @property
    def sigma(self) -> torch.Tensor:
        """The noise standard deviation, float64: 0-dimensional (isotropic) or ``[D]``."""
        return self._sigma

    @property
    def isotropic(self) -> bool:
        return self._sigma.ndim == 0

    @property
    def data_dim(self) -> int:
        return self._W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self._W.shape[1]

    @property
    def noise_variance(self) -> torch.Tensor:
        r""":math:`\operatorname{diag} \Psi`, ``[D]``."""
        return self._sigma.pow(2).expand(self.data_dim)

    @property
    def covariance(self) -> torch.Tensor:
        r"""The marginal covariance :math:`W W^\top + \Psi`, ``[D, D]``."""
        return self._W @ self._W.T + torch.diag(self.noise_variance)

    # -- exact answers --------------------------------------------------------------------------
    def _whitened(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`\hat W = \Psi^{-1/2} W` and the Cholesky factor of :math:`M = I + \hat W^\top
        \hat W`."""
        scale = self._sigma.expand(self.data_dim)
        W_hat = self._W / scale.unsqueeze(-1)
        M = torch.eye(self.latent_dim, dtype=torch.float64, device=self._W.device) + W_hat.T @ W_hat
        return W_hat, torch.linalg.cholesky(M)

    def _posterior_parts(self, x: torch.Tensor, what: str):
        x = _batch(x, self.data_dim, what).to(device=self._W.device, dtype=torch.float64)
        W_hat, L = self._whitened()
        r_hat = (x - self._mu) / self._sigma.expand(self.data_dim)
        mean = torch.cholesky_solve((r_hat @ W_hat).T, L).T
        return r_hat, W_hat, L, mean

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \mathcal{N}(x;\ \mu,\ W W^\top + \Psi)` per datapoint of ``x`` ``[N, D]``:
        ``[N]``, float64."""
        r_hat, W_hat, L, mean = self._posterior_parts(x, "log_likelihood")
        quadratic = (r_hat - mean @ W_hat.T).pow(2).sum(-1) + mean.pow(2).sum(-1)
        log_det = (self._sigma.log().expand(self.data_dim).sum() * 2
                   + 2 * L.diagonal().log().sum())
        return -0.5 * (self.data_dim * _LOG_2PI + log_det + quadratic)

    def posterior_covariance(self) -> torch.Tensor:
        r""":math:`M^{-1}` (:math:`\sigma^2 (W^\top W + \sigma^2 I)^{-1}` when isotropic),
        ``[d, d]``: the same for every datapoint."""
        return torch.cholesky_inverse(self._whitened()[1])

    def _posterior_tril(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.posterior_covariance())

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        r""":math:`p(z \mid x)` for ``x`` ``[N, D]``: a float64 ``MultivariateNormal`` with batch
        shape ``[N]`` and event shape ``[d]``."""
        mean = self._posterior_parts(x, "posterior")[-1]
        return MultivariateNormal(mean, scale_tril=self._posterior_tril())

    def sample(self, n: int, generator: torch.Generator | None = None, *,
               latents: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of :math:`x`, ``[n, D]`` float64 (and their :math:`z`, ``[n, d]``, with
        ``latents=True``); ``generator`` (on ``W``'s device) makes them reproducible."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"sample: n must be a positive integer, not {n!r}")
        options = {"dtype": torch.float64, "device": self._W.device, "generator": generator}
        with torch.no_grad():
            z = torch.randn(n, self.latent_dim, **options)
            noise = torch.randn(n, self.data_dim, **options)
            x = self._mu + z @ self._W.T + self._sigma * noise
        return (x, z) if latents else x

    def kl_from(self, q: Distribution, x: torch.Tensor, samples: int = 1000) -> KLEstimate:
        r""":math:`\mathrm{KL}(q(z \mid x) \,\Vert\, p(z \mid x))` per datapoint, for ``q`` with
        batch shape ``[N]`` and event shape ``[d]``: in closed form when ``q`` is a
        ``MultivariateNormal`` or a diagonal Normal (``Normal(...).to_event(1)``), else the mean of
        :math:`\log q(z_s) - \log p(z_s \mid x)` over ``samples`` draws :math:`z_s \sim q` with
        its standard error (from the global random state)."""
        if not isinstance(q, Distribution):
            raise ConfigError(f"kl_from takes a torch distribution, not {type(q).__name__}")
        x = _batch(x, self.data_dim, "kl_from")
        if q.event_shape != (self.latent_dim,) or q.batch_shape != (x.shape[0],):
            raise ConfigError(f"kl_from needs q with batch shape [{x.shape[0]}] and event shape "
                              f"[{self.latent_dim}], not {list(q.batch_shape)} and "
                              f"{list(q.event_shape)}")
        gaussian = _as_gaussian(q)
        mean = self._posterior_parts(x, "kl_from")[-1]
        if gaussian is not None:
            value = _gaussian_kl(*gaussian, mean, self._posterior_tril())
            return KLEstimate(value, torch.zeros_like(value), True)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ConfigError(f"kl_from: samples must be an integer >= 2, not {samples!r}")
        with torch.no_grad():
            z = q.sample((samples,))
            posterior = MultivariateNormal(mean, scale_tril=self._posterior_tril())
            terms = q.log_prob(z).double() - posterior.log_prob(z.double())
        return KLEstimate(terms.mean(0), terms.std(0) / math.sqrt(samples), False)

    # -- fitting ---------------------------------------------------------------------------------
    @classmethod
    def mle(cls, x: torch.Tensor, latent_dim: int) -> "LinearGaussian":
        r"""The maximum-likelihood isotropic model of ``x`` ``[N, D]`` with ``latent_dim`` latents
        (the closed form of the module docstring, rotation :math:`R = I`, each column of
        :math:`W` signed so that its largest entry in absolute value is positive)."""
        if not torch.is_tensor(x) or x.ndim != 2:
            raise ConfigError("mle takes x as an [N, D] tensor, not "
                              + (f"shape {list(x.shape)}" if torch.is_tensor(x)
                                 else type(x).__name__))
        N, D = x.shape
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ConfigError(f"mle: latent_dim must be a positive integer, not {latent_dim!r}")
        if latent_dim >= D:
            raise ConfigError(f"mle: latent_dim ({latent_dim}) must be below the data dimension "
                              f"({D}): the noise variance is the mean of the D - d smallest "
                              "eigenvalues")
        if N < 2:
            raise ConfigError(f"mle needs at least 2 datapoints, not {N}")
        x = _float64(x, "x", who="mle")
        mean = x.mean(0)
        centred = x - mean
        covariance = centred.T @ centred / N
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        noise = eigenvalues[latent_dim:].mean()
        if not bool(noise > 1e-12 * eigenvalues[0].clamp(min=torch.finfo(torch.float64).tiny)):
            raise ConfigError(f"mle: the {D - latent_dim} smallest eigenvalues of the sample "
                              "covariance are zero (the data span at most "
                              f"{latent_dim} dimensions), so the maximum-likelihood sigma is 0")
        U = eigenvectors[:, :latent_dim]
        peaks = U.gather(0, U.abs().argmax(0, keepdim=True))
        U = torch.where(peaks < 0, -U, U)
        W = U * (eigenvalues[:latent_dim] - noise).clamp(min=0).sqrt()
        return cls(W, mean, noise.sqrt())


#: Probabilistic PCA (Tipping & Bishop 1999) is the isotropic :class:`LinearGaussian`.
PPCA = LinearGaussian


def linear_gaussian(vae: Any) -> LinearGaussian | None:
    r"""The exact :class:`LinearGaussian` of a :class:`pyro_vae.VAE` that is one, at its current
    parameters (detached), else ``None``.

    It is one when it is not conditional, its ``model``, ``decode`` and prior are unmodified, the
    prior is ``"normal"`` (:math:`\mathcal N(0, I)`), the decoder is ``"linear"``
    (:math:`W` = its weight, :math:`\mu` = its bias) and the likelihood is ``"normal"`` with a
    scale that does not depend on :math:`z`: fixed, or learned (``"shared"``, ``"per-dim"``) at its
    current value; a scale computed by the decoder gives ``None``.
    """
    from .models.likelihoods import Normal as NormalLikelihood
    from .models.priors import StandardNormal
    from .networks import LinearNet
    from .vae import VAE

    if not isinstance(vae, VAE) or vae.conditional:
        return None
    if (type(vae).model is not VAE.model or type(vae).decode is not VAE.decode
            or type(vae.prior) is not StandardNormal or type(vae.likelihood) is not NormalLikelihood
            or vae.decoder_kind != "linear" or type(vae.decoder) is not LinearNet):
        return None
    prior = vae.prior
    if not (bool((prior.loc == 0).all()) and bool((prior.scale == 1).all())):
        return None
    likelihood = vae.likelihood
    if likelihood.scale == "decoder":
        return None
    layer = vae.decoder.linear
    if layer.in_features != vae.latent_dim or layer.out_features != vae.data_dim:
        return None
    # σ as the likelihood computes it: fixed, or learned ("shared", "per-dim") at its value now
    with torch.no_grad():
        _, sigma = likelihood.loc_scale(torch.zeros(1, vae.data_dim, device=layer.weight.device))
    sigma = sigma[0] if bool((sigma[0] != sigma[0, 0]).any()) else sigma[0, 0]
    sigma = sigma.detach()
    if sigma.numel() not in (1, vae.data_dim):
        return None
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(vae.data_dim)
    return LinearGaussian(layer.weight.detach(), bias,
                          sigma.reshape(()) if sigma.numel() == 1 else sigma.reshape(-1))


@dataclass(frozen=True)
class ExactReference:
    r"""A model's exact answers: ``log_likelihood(x, y=None)`` :math:`\log p(x)` ``[N]`` and
    ``posterior(x, y=None)`` :math:`p(z \mid x)` (``None`` when unknown). ``source`` is
    ``"model"`` (its ``exact_log_likelihood`` / ``exact_posterior``) or ``"linear-gaussian"``
    (read off the VAE by :func:`linear_gaussian`, held in ``linear``; float64 results)."""

    log_likelihood: Callable[..., torch.Tensor]
    posterior: Callable[..., Distribution] | None
    source: str
    linear: LinearGaussian | None = None


def _with_labels(fn: Callable) -> Callable:
    def call(x, y=None):
        return fn(x) if y is None else fn(x, y)
    return call


def _unlabelled(fn: Callable, what: str) -> Callable:
    def call(x, y=None):
        if y is not None:
            raise ConfigError(f"{what}: the linear-Gaussian model takes no labels y")
        return fn(x)
    return call


def exact_reference(model: Any) -> ExactReference | None:
    r"""The exact :math:`\log p(x)` (and :math:`p(z \mid x)` where known) of a latent-variable
    model, or ``None``: the model's own ``exact_log_likelihood`` (with its ``exact_posterior`` if
    it has one) when it has that capability (:mod:`pyro_vae.lvm`), else the closed form of a
    linear-Gaussian :class:`pyro_vae.VAE` (:func:`linear_gaussian`)."""
    if has(model, "exact_log_likelihood"):
        posterior = (_with_labels(model.exact_posterior) if has(model, "exact_posterior")
                     else None)
        return ExactReference(_with_labels(model.exact_log_likelihood), posterior, "model")
    linear = linear_gaussian(model)
    if linear is None:
        return None
    return ExactReference(_unlabelled(linear.log_likelihood, "log_likelihood"),
                          _unlabelled(linear.posterior, "posterior"), "linear-gaussian", linear)


def exact_log_likelihood(model: Any, x: torch.Tensor, y: torch.Tensor | None = None
                         ) -> torch.Tensor:
    r""":math:`\log p(x)` ``[N]`` of ``model`` from :func:`exact_reference`, or one line saying
    that it has no closed form."""
    reference = exact_reference(model)
    if reference is None:
        raise ConfigError(f"{type(model).__name__} has no exact log-likelihood (no "
                          "exact_log_likelihood, and not a linear-Gaussian VAE)")
    return reference.log_likelihood(x, y)


@dataclass(frozen=True)
class GapIdentity:
    r"""The terms of :math:`\log p(x) = \mathrm{ELBO} + \mathrm{KL}(q \,\Vert\, p(z \mid x))` per
    datapoint (each ``[N]``, float64), from K particles :math:`z_k \sim q(z \mid x)`:

    - ``elbo``: :math:`\frac1K \sum_k \log w_k`, and ``elbo_se`` its Monte Carlo standard error
      (the sample standard deviation over :math:`\sqrt K`);
    - ``kl``: :math:`\frac1K \sum_k [\log q(z_k \mid x) - \log p(z_k \mid x)]` over the same
      particles, and ``kl_se``;
    - ``log_likelihood``: the exact :math:`\log p(x)`;
    - ``gap``: the true gap :math:`\log p(x) - \mathrm{ELBO}`, an unbiased estimate of the KL,
      with ``gap_se`` (= ``elbo_se``);
    - ``residual``: :math:`\max_k \lvert \log w_k + \log q(z_k \mid x) - \log p(z_k \mid x)
      - \log p(x)\rvert`, zero up to the rounding of the model's dtype;
    - ``kl_closed_form``: the KL in closed form when :math:`q` is Gaussian, else ``None``.
    """

    elbo: torch.Tensor
    elbo_se: torch.Tensor
    kl: torch.Tensor
    kl_se: torch.Tensor
    log_likelihood: torch.Tensor
    gap: torch.Tensor
    gap_se: torch.Tensor
    residual: torch.Tensor
    kl_closed_form: torch.Tensor | None
    particles: int

    def summary(self) -> dict[str, float]:
        """Means over the datapoints; ``*_se`` are the Monte Carlo standard errors of those means
        (the datapoints' particles are independent)."""
        n = self.elbo.shape[0]

        def se(values: torch.Tensor) -> float:
            return float(values.pow(2).sum().sqrt() / n)

        summary = {"elbo": float(self.elbo.mean()), "elbo_se": se(self.elbo_se),
                   "kl": float(self.kl.mean()), "kl_se": se(self.kl_se),
                   "log_likelihood": float(self.log_likelihood.mean()),
                   "gap": float(self.gap.mean()), "gap_se": se(self.gap_se),
                   "residual": float(self.residual.max()), "particles": self.particles}
        if self.kl_closed_form is not None:
            summary["kl_closed_form"] = float(self.kl_closed_form.mean())
        return summary


def _dtype_of(distribution: Distribution, fallback: torch.dtype) -> torch.dtype:
    try:
        return distribution.mean.dtype
    except (NotImplementedError, AttributeError):
        return fallback


def gap_identity(model: Any, x: torch.Tensor, particles: int = 1000, seed: int = 0,
                 y: torch.Tensor | None = None) -> GapIdentity:
    r"""The ELBO, :math:`\mathrm{KL}(q(z \mid x) \,\Vert\, p(z \mid x))` and :math:`\log p(x)` of a
    model with an exact reference and an exact posterior (:func:`exact_reference`) and one latent
    site, from ``particles`` particles of :func:`pyro_vae.log_weights.log_weights`, drawn under a
    forked random state seeded with ``seed`` (the caller's is untouched); see
    :class:`GapIdentity`."""
    from .log_weights import log_weights
    from .lvm import check_protocol

    check_protocol(model, "gap_identity")
    if isinstance(particles, bool) or not isinstance(particles, int) or particles < 2:
        raise ConfigError(f"gap_identity: particles must be an integer >= 2 (for the standard "
                          f"errors), not {particles!r}")
    reference = exact_reference(model)
    if reference is None:
        raise ConfigError(f"gap_identity needs an exact log-likelihood; {type(model).__name__} "
                          "has no exact_log_likelihood and is not a linear-Gaussian VAE")
    if reference.posterior is None:
        raise ConfigError(f"gap_identity needs the exact posterior; {type(model).__name__} has an "
                          "exact_log_likelihood but no exact_posterior")
    data_dim = getattr(model, "data_dim", None)
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[0] == 0 or (
            isinstance(data_dim, int) and x.shape[1] != data_dim):
        shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(f"gap_identity takes x as a non-empty [N, "
                          f"{data_dim if isinstance(data_dim, int) else 'D'}] tensor, not {shape}")
    device = device_of(model)
    x = x.to(device)
    arguments = (x,) if y is None else (x, y)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.no_grad():
        torch.manual_seed(seed)
        weights = log_weights(model.model, model.guide, *arguments, particles=particles)
        weights.per_datapoint_only("gap_identity")
        if len(weights.sites) != 1 or weights.model_only or weights.has_guide_enumeration:
            raise ConfigError(f"gap_identity needs one latent site sampled by the guide, not "
                              f"{sorted(weights.sites) + weights.model_only}")
        (site,) = weights.sites.values()
        log_w = weights.total().double()
        log_q = weights.log_guide.double()
        exact = reference.log_likelihood(*arguments).double().reshape(-1)
        posterior = reference.posterior(*arguments)
        z = site.value.to(_dtype_of(posterior, site.value.dtype))
        log_p = torch.broadcast_to(posterior.log_prob(z).double(), log_w.shape)
        kl_terms = log_q - log_p
        kl_closed_form = None
        gaussian = _as_gaussian(site.guide)
        target = _as_gaussian(posterior)
        if gaussian is not None and target is not None:
            kl = _gaussian_kl(*gaussian, target[0].double(), target[1].double())
            if kl.ndim >= 1 and kl.shape[-1] == x.shape[0]:
                kl_closed_form = kl.reshape(-1, x.shape[0]).mean(0)
    root = math.sqrt(particles)
    elbo, elbo_se = log_w.mean(0), log_w.std(0) / root
    return GapIdentity(
        elbo=elbo, elbo_se=elbo_se, kl=kl_terms.mean(0), kl_se=kl_terms.std(0) / root,
        log_likelihood=exact, gap=exact - elbo, gap_se=elbo_se,
        residual=(log_w + kl_terms - exact).abs().amax(0), kl_closed_form=kl_closed_form,
        particles=particles)
