r"""Training objectives, by the names of the public contract.

Every objective reduces the per-datapoint log-weights of :func:`pyro_vae.log_weights.log_weights`

.. math:: \log w_k = \log p_\theta(x \mid z_k) + \beta\,[\log p(z_k) - \log q_\phi(z_k \mid x)],
          \qquad z_k \sim q_\phi(z \mid x)

to a per-datapoint *surrogate* ``[batch]`` whose value is the bound and whose gradient is the
estimator's gradient; the loss is :math:`-\frac{N}{B}\sum_{b=1}^{B} \text{surrogate}_b`
(``num_data`` :math:`N`, ``batch`` :math:`B`), an estimate of the whole data set's negative bound
in nats. The minibatch scale is applied outside every
log-mean-exp (Pyro's ``RenyiELBO`` applies it inside, which mis-scales minibatch IWAE).

Every objective is a Pyro :class:`~pyro.infer.ELBO` (``elbo`` and ``meanfield`` subclass
``Trace_ELBO`` and ``TraceMeanField_ELBO``): use it with ``pyro.infer.SVI``, or call its
``differentiable_loss`` and drive a ``torch.optim`` optimizer, as :func:`pyro_vae.fit` does
through :class:`pyro_vae.distributed.LossModule` (the ``nn.Module`` that owns the VAE's
parameters, which DDP wraps). None of them reads the loss back to the host while computing it.

``beta`` (:math:`\beta`) multiplies the latent terms; ``beta`` is an attribute that
:func:`pyro_vae.fit` changes during KL annealing. ``free_bits`` (:math:`\lambda`, nats per latent
dimension; Kingma et al. 2016) replaces the KL by :math:`\sum_d \max(\lambda, \mathrm{KL}_d)`,
:math:`\mathrm{KL}_d` averaged over the minibatch; it needs a factorized guide and prior and is
offered by ``elbo`` and ``meanfield`` only.
"""

from __future__ import annotations

import math

import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Independent, kl_divergence

from .errors import ConfigError
from .log_weights import LogWeights, log_weights, program_structure


def _leave_one_out_mean(values: torch.Tensor) -> torch.Tensor:
    """For each particle k (dim 0, K > 1), the mean of the other particles' values."""
    return (values.sum(0, keepdim=True) - values) / (values.shape[0] - 1)


def _leave_one_out_log_mean_exp(log_w: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """For each particle k, (1/p) log (1/(K−1)) Σ_{j≠k} w_j^p, ``[particles, batch]``."""
    particles = log_w.shape[0]
    scaled = power * log_w
    eye = torch.eye(particles, dtype=torch.bool, device=log_w.device)
    eye = eye.reshape(eye.shape + (1,) * (scaled.dim() - 1))
    others = scaled.unsqueeze(0).masked_fill(eye, -math.inf)  # row k: every particle but k
    return (torch.logsumexp(others, dim=1) - math.log(particles - 1)) / power


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
    r"""An objective that reduces :class:`~pyro_vae.log_weights.LogWeights`.

    Subclasses define :meth:`surrogate` (per datapoint, over the local terms); the rest is
    shared: the loss

    .. math:: -\Big[\bar G + \frac{N}{B}\sum_b S_b\Big] \;-\; \text{score-function terms},

    where :math:`\bar G` is the global terms' ELBO (sites outside plate ``"data"``: averaged over
    the particles when each particle draws its own globals, one draw when they are shared) and
    :math:`S_b` the per-datapoint surrogate. For guide sites sampled without ``rsample`` the
    score-function (REINFORCE) term :math:`\sum_k s_k\,\nabla\log q(z_k)` is added with zero
    value, where the learning signal :math:`s_k` is the objective's value minus a control variate
    that does not depend on :math:`z_k`: leave-one-out over the K particles, or at K = 1 a
    running mean of past values (decay 0.9). For a local site the signal is its datapoint's
    (the plate declares the datapoints independent given the globals); for a global one, the
    whole bound's.
    """

    name = ""
    #: whether :math:`\log q(z \mid x)` is scored with the guide's parameters detached (STL, DReG)
    stop_guide_gradient = False
    supports_free_bits = False
    #: linear in the particles (ELBO family): every site, global or local, gets the particle
    #: dimension; non-linear objectives share one draw of the globals across local particles
    linear = False
    #: a learning signal for guide sites without ``rsample``; ``None`` refuses them
    supports_score_function = True
    supports_guide_enumeration = True
    baseline_decay = 0.9

    def __init__(self, num_particles: int = 1, beta: float = 1.0, free_bits: float = 0.0,
                 max_plate_nesting: int | None = None):
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ConfigError(f"particles must be a positive integer, not {num_particles!r}")
        if max_plate_nesting is not None and (not isinstance(max_plate_nesting, int)
                                              or max_plate_nesting < 0):
            raise ConfigError(f"max_plate_nesting must be a non-negative integer, not "
                              f"{max_plate_nesting!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=1 if max_plate_nesting is None else max_plate_nesting)
        self.beta = _check_beta(beta)
        self.free_bits = _check_free_bits(free_bits)
        if self.free_bits and not self.supports_free_bits:
            raise ConfigError(f"objective {self.name!r} does not support free bits; "
                              "use 'elbo' or 'meanfield'")
        self._user_nesting = max_plate_nesting
        self._structures: dict = {}
        self._baselines: dict[str, torch.Tensor] = {}

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} reduces vectorized log-weights")

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        """Per-datapoint surrogate ``[batch]``: value = the bound, gradient = the estimator."""
        raise NotImplementedError

    def _structure(self, model, guide, args, kwargs):
        """The program's structure, found once per model/guide pair (as Pyro's ELBOs guess
        ``max_plate_nesting`` once)."""
        key = (model, guide)
        found = self._structures.get(key)
        if found is None:
            found = program_structure(model, guide, *args, **kwargs)
            if self._user_nesting is not None:
                found = found._replace(max_plate_nesting=max(self._user_nesting,
                                                             found.max_plate_nesting))
            self._structures[key] = found
        return found

    def weights(self, model, guide, *args, **kwargs) -> LogWeights:
        shared = not self.linear and self.num_particles > 1
        return log_weights(model, guide, *args, particles=self.num_particles,
                           stop_guide_gradient=self.stop_guide_gradient, shared_globals=shared,
                           additive=not shared,
                           structure=lambda: self._structure(model, guide, args, kwargs),
                           **kwargs)

    def per_datapoint_bound(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """The surrogate per datapoint, ``[batch]``, and the minibatch scale
        ``num_data / batch``."""
        weights = self.weights(model, guide, *args, **kwargs).per_datapoint_only(
            "per_datapoint_bound")
        self._check_supported(weights)
        return self.surrogate(weights), weights.scale

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        weights = self.weights(model, guide, *args, **kwargs)
        self._check_supported(weights)
        local = self.surrogate(weights)
        bound = weights.scale * local.sum()
        global_part = self.global_surrogate(weights)
        if global_part is not None:
            bound = bound + global_part
        if weights.score_local is not None or weights.score_global is not None:
            bound = bound + self._score_terms(weights, local, global_part)
        return -bound

    def loss(self, model, guide, *args, **kwargs) -> float:
        # not under no_grad: a guide may differentiate inside itself (Pyro's loss allows it)
        return self.differentiable_loss(model, guide, *args, **kwargs).detach().item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:  # a program with nothing to train (no site, no parameter)
            loss.backward()
        return loss.item()

    # -- global terms and score-function terms --------------------------------------------------
    def global_surrogate(self, weights: LogWeights) -> torch.Tensor | None:
        r"""The globals' ELBO, :math:`\log p(x_g \mid g) + \beta\,(\log p(g) - \log q(g))`,
        averaged over draws."""
        total = weights.global_total(self.beta)
        return None if total is None else total.mean()

    def _check_supported(self, weights: LogWeights) -> None:
        discrete = weights.score_local is not None or weights.score_global is not None
        if discrete and not self.supports_score_function:
            raise ConfigError(f"objective {self.name!r} needs reparameterized guide sites; for "
                              "discrete ones use 'elbo', 'iwae', 'renyi' or 'vimco' (score "
                              "function) or enumerate them")
        if weights.has_guide_enumeration and not self.supports_guide_enumeration:
            raise ConfigError(f"objective {self.name!r} does not support enumerated guide "
                              "sites; use 'elbo', 'iwae', 'renyi' or 'vimco'")

    def local_signal(self, weights: LogWeights, local: torch.Tensor) -> torch.Tensor:
        """The learning signal of each local particle, ``[particles, batch]``: the ELBO's
        per-particle value minus the mean of the other particles', over K (K > 1)."""
        reward = weights.expected_total(self.beta).detach()
        if weights.particles == 1:
            return reward - self._running_baseline("local", reward)
        return (reward - _leave_one_out_mean(reward)) / weights.particles

    def _running_baseline(self, key: str, reward: torch.Tensor) -> torch.Tensor:
        """The running mean of past rewards (0 before the first); updated after it is read."""
        baseline = self._baselines.get(key)
        current = reward.mean().detach()
        if torch.is_grad_enabled():
            self._baselines[key] = (current if baseline is None else
                                    self.baseline_decay * baseline
                                    + (1 - self.baseline_decay) * current)
        return current.new_zeros(()) if baseline is None else baseline

    def _score_terms(self, weights: LogWeights, local: torch.Tensor,
                     global_part: torch.Tensor | None) -> torch.Tensor:
        """Σ signal · (log q − stop(log q)): zero in value, the score-function gradient."""
        terms = []
        if weights.score_local is not None:
            signal = self.local_signal(weights, local).detach()
            score = weights.score_local
            terms.append(weights.scale * (signal * (score - score.detach())).sum())
        if weights.score_global is not None:
            score = weights.score_global
            if score.shape[0] > 1:  # each particle drew its own globals (a linear objective)
                reward = weights.global_total(self.beta).detach() + weights.scale * (
                    weights.expected_total(self.beta).detach().sum(-1))
                signal = (reward - _leave_one_out_mean(reward)) / score.shape[0]
            else:
                value = weights.scale * local.detach().sum()
                if global_part is not None:
                    value = value + global_part.detach()
                signal = value - self._running_baseline("global", value)
            terms.append((signal * (score - score.detach())).sum())
        return sum(terms[1:], terms[0])

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

    .. math:: \mathcal{L}(x) = \frac{1}{K}\sum_{k=1}^K \big[\log p(x \mid z_k)
              + \beta\,(\log p(z_k) - \log q(z_k \mid x))\big],\quad z_k \sim q(z \mid x)

    Unbiased for the bound; the gradient is the pathwise (reparameterization) gradient, whose
    variance falls like :math:`1/K`. Equal, particle for particle, to ``pyro.infer.Trace_ELBO``.
    """

    name = "elbo"
    supports_free_bits = True
    linear = True

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        if not self.free_bits:
            return weights.expected_total(self.beta).mean(0)
        site = self._latent_site(weights)
        prior = self._factor(site.prior, "prior")
        guide = self._factor(site.guide, "guide")
        # Monte Carlo KL per dimension: log q_d(z_d) − log p_d(z_d), [particles, batch, dims]
        kl_per_dim = guide.log_prob(site.value) - prior.log_prob(site.value)
        return weights.log_likelihood.mean(0) - self.beta * self._free_bits_kl(kl_per_dim)


class MeanFieldELBO(CoreObjective, TraceMeanField_ELBO):
    r"""``meanfield``: the ELBO with the KL in closed form, as Pyro's ``TraceMeanField_ELBO``.

    .. math:: \mathcal{L}(x) = \frac{1}{K}\sum_{k=1}^K \log p(x \mid z_k)
              - \beta\,\mathrm{KL}\big(q(z \mid x)\,\|\,p(z)\big)

    The closed-form KL removes that term's Monte Carlo variance.

    .. warning:: Pyro silently falls back to a Monte Carlo KL when no closed form is registered
       for the (guide, prior) pair. This objective refuses instead, naming the objectives that
       work.
    """

    name = "meanfield"
    supports_free_bits = True
    linear = True
    supports_score_function = False
    supports_guide_enumeration = False

    def _kl(self, site_name: str, site) -> torch.Tensor:
        try:
            kl = kl_divergence(site.guide, site.prior)
            if not torch.is_tensor(kl):  # e.g. two fully masked distributions: a number
                kl = site.value.new_full(site.guide.batch_shape, float(kl))
            return kl
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
            if site.local:
                kl = kl + site.weigh(self._kl(name, site)).mean(0)
        factor = weights.guide_factors[0]  # a guide's pyro.factor is part of log q, as in Trace_ELBO
        if factor is not None:
            reconstruction = reconstruction - self.beta * factor.mean(0)
        return reconstruction - self.beta * kl

    def global_surrogate(self, weights: LogWeights) -> torch.Tensor | None:
        factor = weights.guide_factors[1]
        if weights.global_terms is None and factor is None:
            return None
        kl = 0.0
        for name, site in weights.sites.items():
            if not site.local:
                kl = kl + site.weigh(self._kl(name, site)).mean()
        likelihood = 0.0 if weights.global_terms is None else weights.global_terms[0].mean()
        if factor is not None:
            kl = kl + factor.mean()
        return likelihood - self.beta * kl

    def _check_supported(self, weights: LogWeights) -> None:
        if weights.model_only:
            raise ConfigError(f"objective 'meanfield' needs a guide site for every latent site "
                              f"of the model; {weights.model_only[0]!r} has none (use 'elbo')")
        for name, site in weights.sites.items():
            if not site.guide.has_rsample:
                raise ConfigError(f"objective 'meanfield' needs reparameterized guide sites; "
                                  f"site {name!r} is not (use 'elbo')")
        if weights.enum_dependent_latents:
            raise ConfigError(f"objective 'meanfield': the prior of site "
                              f"{weights.enum_dependent_latents[0]!r} depends on an enumerated "
                              "site, so no closed-form KL applies (use 'elbo')")
        model_order, guide_order = weights.site_order
        if model_order != guide_order:
            raise ConfigError(
                "objective 'meanfield' needs the guide to sample the latent sites in the model's "
                f"order (model: {', '.join(model_order)}; guide: {', '.join(guide_order)}): the "
                "per-site closed-form KLs assume the mean-field factorization (use 'elbo')")
        super()._check_supported(weights)


class IWAE(CoreObjective):
    r"""``iwae``: the importance-weighted bound of Burda et al. (2016), per datapoint.

    .. math:: \mathcal{L}_K(x) = \log \frac{1}{K}\sum_{k=1}^K w_k,\quad
              w_k = \frac{p(x \mid z_k)\,p(z_k)^\beta}{q(z_k \mid x)^\beta},\ z_k \sim q(z \mid x)

    :math:`\mathcal{L}_1` is the ELBO; in expectation :math:`\mathcal{L}_K` rises monotonically
    in K towards :math:`\log p(x)`. The gradient is the standard IWAE gradient
    :math:`\sum_k \tilde w_k \nabla \log w_k` (:math:`\tilde w` the normalized weights), whose
    signal-to-noise ratio for the guide's parameters decays like :math:`1/\sqrt K` while the
    model's grows like :math:`\sqrt K` (Rainforth et al. 2018).

    .. warning:: With :math:`\beta \ne 1` the latent terms are weighted inside each :math:`w_k`;
       the result is no longer a bound on :math:`\log p(x)`.
    """

    name = "iwae"

    def __init__(self, num_particles: int = 5, beta: float = 1.0, free_bits: float = 0.0,
                 max_plate_nesting: int | None = None):
        super().__init__(num_particles, beta, free_bits, max_plate_nesting)

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        return weights.log_mean_weight(self.beta)

    def local_signal(self, weights: LogWeights, local: torch.Tensor) -> torch.Tensor:
        r"""The bound minus the bound of the other particles,
        :math:`L - \log \frac{1}{K-1}\sum_{j \ne k} w_j`."""
        if weights.particles == 1:
            return super().local_signal(weights, local)
        log_w = weights.total(self.beta).detach()
        return local.detach() - _leave_one_out_log_mean_exp(log_w)


class Renyi(CoreObjective, RenyiELBO):
    r"""``renyi``: the variational Rényi bound of Li & Turner (2016), per datapoint.

    .. math:: \mathcal{L}_\alpha(x) = \frac{1}{1-\alpha} \log \frac{1}{K}\sum_{k=1}^K w_k^{1-\alpha}

    :math:`\alpha = 0` is the IWAE bound; :math:`\alpha \to 1` tends to the ELBO; for
    :math:`0 \le \alpha < 1` the bound lies between them, and for :math:`\alpha < 0` it can exceed
    :math:`\log p(x)` (no longer a lower bound). Gradients are pathwise.
    Unlike Pyro's ``RenyiELBO``, the minibatch scale stays outside the log-mean-exp.
    """

    name = "renyi"

    def __init__(self, num_particles: int = 5, alpha: float = 0.5, beta: float = 1.0,
                 free_bits: float = 0.0, max_plate_nesting: int | None = None):
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha == 1.0:
            raise ConfigError(f"renyi needs a finite alpha other than 1 (alpha = 1 is the ELBO: "
                              f"use 'elbo'), not {alpha!r}")
        CoreObjective.__init__(self, num_particles, beta, free_bits, max_plate_nesting)
        self.alpha = alpha

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        power = 1.0 - self.alpha
        scaled = power * weights.total(self.beta)
        return (torch.logsumexp(scaled, 0) - math.log(weights.particles)) / power

    def local_signal(self, weights: LogWeights, local: torch.Tensor) -> torch.Tensor:
        r""":math:`L_\alpha` minus the Rényi bound of the other particles."""
        if weights.particles == 1:
            return super().local_signal(weights, local)
        log_w = weights.total(self.beta).detach()
        return local.detach() - _leave_one_out_log_mean_exp(log_w, 1.0 - self.alpha)


class STL(CoreObjective):
    r"""``stl``: "sticking the landing" (Roeder et al. 2017) for the ELBO (K = 1) or IWAE (K > 1).

    The bound's value is that of ``elbo`` (K = 1) or ``iwae`` (K > 1), but
    :math:`\log q(z \mid x)` is scored with the guide's parameters stopped, so the guide's
    gradient keeps only the path term
    :math:`\frac{\partial \log w}{\partial z}\,\frac{\partial z}{\partial \phi}` and drops the
    score term :math:`\nabla_\phi \log q_\phi(z \mid x)`, whose expectation is zero. When
    :math:`q` equals the true posterior, :math:`\log w` is constant in :math:`z` and the guide's
    gradient is exactly zero for every sample: zero variance at the optimum.

    .. warning:: For K > 1 the dropped term no longer has zero expectation: STL-IWAE is biased
       for the guide (Tucker et al. 2019); use ``dreg`` for an unbiased alternative.
    """

    name = "stl"
    stop_guide_gradient = True
    supports_score_function = False
    supports_guide_enumeration = False

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        if weights.particles == 1:
            return weights.total(self.beta)[0]
        return weights.log_mean_weight(self.beta)


class DReG(CoreObjective):
    r"""``dreg``: the IWAE bound with doubly-reparameterized gradients (Tucker et al. 2019).

    Value: the IWAE_K bound. Gradients:

    - the guide's (:math:`\phi`):
      :math:`\sum_k \tilde w_k^2\, \frac{\partial \log w_k}{\partial z_k}\,
      \frac{\partial z_k}{\partial \phi}`, with :math:`\log q` scored with :math:`\phi` stopped;
      unbiased for the IWAE gradient, and its signal-to-noise ratio does not decay with K;
    - the model's (:math:`\theta`): the plain IWAE gradient
      :math:`\sum_k \tilde w_k \nabla_\theta \log w_k`.

    Implementation: the IWAE bound over stopped-:math:`\phi` log-weights already gives the
    :math:`\theta` gradient and :math:`\tilde w_k\, \partial \log w_k / \partial z_k` at each
    :math:`z_k`; a gradient hook multiplies the latter by :math:`\tilde w_k`. The hook sits on an
    alias of :math:`z_k` through which only the weights read it (the *partial* derivative of
    :math:`\log w_k` as a function of all of particle k's latents); the guide's own dependence of a
    later site on an earlier one (:math:`z_2` drawn given :math:`z_1`) is then chained through
    unweighted, so :math:`\tilde w_k` is applied once per path, as the identity requires. Global
    latents (outside plate "data") are shared by the particles: they keep the path gradient of their
    ELBO term, and the local sites are scored given stopped globals, which act as parameters of the
    local guide.

    .. warning:: The identity behind DReG needs :math:`w = p(x, z)/q(z \mid x)`;
       :math:`\beta \ne 1` (and so KL annealing) breaks it and is refused.
    """

    name = "dreg"
    stop_guide_gradient = True
    supports_score_function = False
    supports_guide_enumeration = False

    def __init__(self, num_particles: int = 5, beta: float = 1.0, free_bits: float = 0.0,
                 max_plate_nesting: int | None = None):
        super().__init__(num_particles, beta, free_bits, max_plate_nesting)
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
                # local sites only: a global latent is shared by the particles, not one of them
                if site.local and site.value.requires_grad:
                    factor = site.per_particle(normalized)
                    site.value.register_hook(lambda grad, factor=factor: grad * factor)
        return torch.logsumexp(log_w, 0) - math.log(weights.particles)


class VIMCO(IWAE):
    r"""``vimco``: the IWAE bound for discrete latents, with VIMCO's control variate
    (Mnih & Rezende 2016).

    Value: the IWAE_K bound :math:`\hat L = \log \frac1K \sum_k w_k`. For guide sites sampled
    without ``rsample`` the score-function gradient uses, per particle, the signal

    .. math:: \hat L - \log \frac1K \Big(\sum_{j\ne k} w_j + \hat w_{-k}\Big),\qquad
              \hat w_{-k} = \exp\Big(\frac{1}{K-1}\sum_{j\ne k}\log w_j\Big),

    the bound minus the bound with :math:`w_k` replaced by the others' geometric mean: a baseline
    that does not depend on :math:`z_k`, so the estimator stays unbiased, and that tracks the bound
    closely. Reparameterized sites keep their pathwise IWAE gradient. At K = 1 (the ELBO) the
    control
    variate is a running mean of past values.
    """

    name = "vimco"

    def __init__(self, num_particles: int = 5, beta: float = 1.0, free_bits: float = 0.0,
                 max_plate_nesting: int | None = None):
        super().__init__(num_particles, beta, free_bits, max_plate_nesting)

    def local_signal(self, weights: LogWeights, local: torch.Tensor) -> torch.Tensor:
        log_w = weights.total(self.beta).detach()
        particles = log_w.shape[0]
        if particles == 1:  # no other particle to leave in: the ELBO's running-mean baseline
            return super().local_signal(weights, local)
        geometric = (log_w.sum(0, keepdim=True) - log_w) / (particles - 1)  # log ŵ_{-k}
        eye = torch.eye(particles, dtype=torch.bool, device=log_w.device)
        eye = eye.reshape(eye.shape + (1,) * (log_w.dim() - 1))
        # row k: the weights with w_k replaced by the others' geometric mean
        replaced = torch.where(eye, geometric.unsqueeze(1), log_w.unsqueeze(0))
        baseline = torch.logsumexp(replaced, dim=1) - math.log(particles)
        return local.detach() - baseline


def _check_groups(groups: int) -> int:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ConfigError(f"groups must be a positive integer, not {groups!r}")
    return groups


def _check_elbo_weight(elbo_weight: float) -> float:
    if isinstance(elbo_weight, bool) or not isinstance(elbo_weight, (int, float)) or \
            not 0.0 <= float(elbo_weight) <= 1.0:
        raise ConfigError(f"elbo_weight must be a number from 0 to 1, not {elbo_weight!r}")
    return float(elbo_weight)


class MIWAE(CoreObjective):
    r"""``miwae``: the multiply importance-weighted bound MIWAE(M, K) of Rainforth et al. (2018),
    per datapoint: M independent IWAE_K bounds, averaged.

    .. math:: \mathcal{L}_{M,K}(x) = \frac1M \sum_{m=1}^M \log \frac1K \sum_{k=1}^K w_{m,k},
              \qquad z_{m,k} \sim q(z \mid x)

    ``particles`` is K, the particles *per group*, and ``groups`` is M: the objective draws
    M·K particles in one pass (``groups=8, particles=8`` is MIWAE(8, 8), 64 draws).
    MIWAE(1, K) is IWAE_K, draw for draw; MIWAE(M, 1) is the ELBO with M particles. Its
    expectation is that of IWAE_K (an average of M independent copies), below IWAE_MK of as many
    draws; what the groups buy is the gradient: the standard gradient of each group's bound,
    averaged, whose signal-to-noise ratio is :math:`O(\sqrt{M/K})` for the guide's parameters
    and :math:`O(\sqrt{MK})` for the model's (Rainforth et al. 2018, theorem 1), where IWAE_MK's
    guide SNR decays like :math:`1/\sqrt{MK}`. Guide sites without ``rsample`` get the
    score-function gradient with a leave-one-out control variate within their group.

    .. warning:: With :math:`\beta \ne 1` the latent terms are weighted inside each
       :math:`w_{m,k}`; the result is no longer a bound on :math:`\log p(x)`.
    """

    name = "miwae"

    def __init__(self, num_particles: int = 5, groups: int = 1, beta: float = 1.0,
                 free_bits: float = 0.0, max_plate_nesting: int | None = None):
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or \
                num_particles < 1:
            raise ConfigError(f"particles must be a positive integer, not {num_particles!r}")
        self.groups = _check_groups(groups)
        #: K, the particles of each group (``num_particles`` is M·K, the draws)
        self.group_size = num_particles
        super().__init__(self.groups * num_particles, beta, free_bits, max_plate_nesting)

    def _grouped(self, log_w: torch.Tensor) -> torch.Tensor:
        """``[M·K, batch]`` as ``[M, K, batch]``: particle m·K + k is particle k of group m."""
        return log_w.reshape(self.groups, -1, log_w.shape[-1])

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        grouped = self._grouped(weights.total(self.beta))
        return (torch.logsumexp(grouped, 1) - math.log(grouped.shape[1])).mean(0)

    def local_signal(self, weights: LogWeights, local: torch.Tensor) -> torch.Tensor:
        r"""Particle k of group m: :math:`\frac1M` (its group's bound minus the bound of the
        group's other particles); with one particle per group, the ELBO's signal."""
        grouped = self._grouped(weights.total(self.beta).detach())
        if grouped.shape[1] == 1:
            return super().local_signal(weights, local)
        bound = torch.logsumexp(grouped, 1, keepdim=True) - math.log(grouped.shape[1])
        # leave-one-out within each group: the group's particles on dim 0
        others = _leave_one_out_log_mean_exp(grouped.transpose(0, 1)).transpose(0, 1)
        return ((bound - others) / self.groups).reshape(-1, grouped.shape[-1])


class CIWAE(CoreObjective):
    r"""``ciwae``: the combination importance-weighted bound CIWAE_β of Rainforth et al. (2018),
    per datapoint: a convex combination of the ELBO and IWAE_K on the same K particles.

    .. math:: \mathcal{L}^{\mathrm{C}}_{\beta}(x) = \beta\,\frac1K\sum_{k=1}^K \log w_k
              + (1 - \beta)\,\log \frac1K \sum_{k=1}^K w_k,\qquad z_k \sim q(z \mid x)

    with :math:`\beta` = ``elbo_weight`` in [0, 1] (not the KL weight ``beta``, which acts inside
    each :math:`w_k` as for every objective). By Jensen's inequality the ELBO term lies below the
    IWAE term on every draw, so ELBO ≤ CIWAE ≤ IWAE_K draw for draw; ``elbo_weight`` 0 is
    ``iwae``, 1 is ``elbo``. The gradient is the same combination of the two standard
    gradients: the ELBO's share keeps the guide's gradient from vanishing as K grows (its
    signal-to-noise ratio does not decay to zero, where IWAE's decays like
    :math:`1/\sqrt K`), at the price of a looser bound. Guide sites without ``rsample`` get the
    same combination of the two score-function signals.

    .. warning:: With a KL weight :math:`\beta \ne 1` the latent terms are weighted inside each
       :math:`w_k`; the result is no longer a bound on :math:`\log p(x)`.
    """

    name = "ciwae"

    def __init__(self, num_particles: int = 5, elbo_weight: float = 0.5, beta: float = 1.0,
                 free_bits: float = 0.0, max_plate_nesting: int | None = None):
        self.elbo_weight = _check_elbo_weight(elbo_weight)
        super().__init__(num_particles, beta, free_bits, max_plate_nesting)

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        if self.elbo_weight == 1.0:
            return weights.expected_total(self.beta).mean(0)
        iwae = weights.log_mean_weight(self.beta)
        if self.elbo_weight == 0.0:
            return iwae
        elbo = weights.expected_total(self.beta).mean(0)
        return self.elbo_weight * elbo + (1.0 - self.elbo_weight) * iwae

    def local_signal(self, weights: LogWeights, local: torch.Tensor) -> torch.Tensor:
        """The ELBO's signal and IWAE's, combined with the same weights."""
        elbo_signal = super().local_signal(weights, local)
        if weights.particles == 1:  # the ELBO and IWAE_1 are one bound
            return elbo_signal
        log_w = weights.total(self.beta).detach()
        iwae = torch.logsumexp(log_w, 0) - math.log(weights.particles)
        iwae_signal = iwae - _leave_one_out_log_mean_exp(log_w)
        return self.elbo_weight * elbo_signal + (1.0 - self.elbo_weight) * iwae_signal


class PIWAE(MIWAE):
    r"""``piwae``: the partially importance-weighted estimator PIWAE(M, K) of Rainforth et al.
    (2018): the model trained on IWAE_MK, the guide on MIWAE(M, K), from the same M·K draws.

    Value: IWAE_MK, :math:`\log \frac{1}{MK}\sum_{m,k} w_{m,k}` (``particles`` is K and ``groups``
    M, as for ``miwae``). Gradients, with :math:`a_{m,k}` the weights normalized over all M·K
    particles (IWAE_MK's coefficients) and :math:`b_{m,k}` those normalized within group m,
    divided by M (MIWAE's):

    - the model's (:math:`\theta`): :math:`\sum a_{m,k} \nabla_\theta \log w_{m,k}`, IWAE_MK's,
      whose signal-to-noise ratio grows like :math:`\sqrt{MK}`;
    - the guide's (:math:`\phi`): :math:`\sum b_{m,k} \nabla_\phi \log w_{m,k}`, MIWAE(M, K)'s,
      whose signal-to-noise ratio is :math:`O(\sqrt{M/K})` instead of IWAE_MK's
      :math:`O(1/\sqrt{MK})`.

    Implementation, without telling the two programs' parameters apart: :math:`\theta` enters
    only :math:`\log p(x, z)`, :math:`\phi` only through :math:`z` (the path) and :math:`\log q`
    directly. The weights are scored with :math:`\log q` stopped (as for ``dreg``), so the
    IWAE_MK bound gives :math:`\theta` its gradient and each latent value
    :math:`a_{m,k}\,\partial \log w_{m,k} / \partial z_{m,k}`, on an alias through which only the
    weights read the latents (a later site drawn given an earlier one is chained through
    unweighted, as for ``dreg``). Each latent value :math:`z` (local, and global ones shared by
    the M·K particles) then gets the difference to MIWAE's share through a zero-valued term
    :math:`v \cdot z`, :math:`v = \partial_z \sum (b - a) \log w` (one extra backward pass, from
    the weights to the latent values). The ratio :math:`b_{m,k}/a_{m,k}` is never formed: in
    float32 it overflows once a group lies about 88 nats below the best one, while
    :math:`a` and :math:`b` themselves stay in [0, 1]. The direct term is
    added with zero value, :math:`-\beta\sum b_{m,k} \log q_\phi(\bar z_{m,k} \mid x)` with
    :math:`\bar z` detached and :math:`\phi` live
    (:meth:`~pyro_vae.log_weights.LogWeights.direct_log_guide`); a ``pyro.factor`` of the guide,
    scored live, is reweighted from :math:`a` to :math:`b` the same way. Global latents (outside
    plate "data") are drawn once with the ELBO's gradient on their own terms; their part in
    the local weights gets :math:`b` through the local guide directly (scored given the live
    globals) and through the term above for the model's direct dependence on them.
    A parameter read by both programs gets the model's share from IWAE_MK and the guide's from
    MIWAE. PIWAE(1, K) is IWAE_K in value and gradient.
    """

    name = "piwae"
    stop_guide_gradient = True
    supports_score_function = False
    supports_guide_enumeration = False

    def surrogate(self, weights: LogWeights) -> torch.Tensor:
        log_w = weights.total(self.beta)
        value = torch.logsumexp(log_w, 0) - math.log(weights.particles)
        if not torch.is_grad_enabled():
            return value
        detached = log_w.detach()
        grouped = self._grouped(detached)
        group = torch.logsumexp(grouped, 1, keepdim=True)          # [M, 1, batch]
        b = (grouped - group).exp().reshape(detached.shape) / self.groups
        direct_local, _ = weights.direct_log_guide()
        correction = -self.beta * (b * direct_local).sum(0)
        if self.groups > 1:
            a = torch.softmax(detached, 0)
            factor = weights.guide_factors[0]
            if factor is not None:
                correction = correction - self.beta * ((b - a) * factor).sum(0)
            # the latent values receive a·∂log w/∂z from the IWAE_MK value; the guide wants
            # b·∂log w/∂z: the difference, ∂_z Σ (b − a) log w, is added through a zero-valued
            # term v·z (one extra backward pass to the latent values; never a ratio b/a, which
            # overflows in float32 once a group lies ~88 nats below the others)
            values = [site.value for site in weights.sites.values() if site.value.requires_grad]
            if values and log_w.requires_grad:
                grads = torch.autograd.grad(((b - a) * log_w).sum(), values, retain_graph=True,
                                            allow_unused=True)
                for grad, latent in zip(grads, values):
                    if grad is not None:
                        correction = correction + (grad * latent).sum() / log_w.shape[-1]
        return value + (correction - correction.detach())

    def global_surrogate(self, weights: LogWeights) -> torch.Tensor | None:
        """The globals' ELBO with its standard gradient: the direct term of their log q, which
        the stopped weights drop, added with zero value."""
        bound = super().global_surrogate(weights)
        if not torch.is_grad_enabled() or weights.global_terms is None:
            return bound
        _, direct_global = weights.direct_log_guide()
        if direct_global is None:
            return bound
        term = -self.beta * direct_global.mean()
        term = term - term.detach()
        return term if bound is None else bound + term


#: The objectives by name, the names of the public contract (``objective=`` of
#: :func:`pyro_vae.fit`).
OBJECTIVES: dict[str, type[CoreObjective]] = {
    "elbo": TraceELBO,
    "meanfield": MeanFieldELBO,
    "iwae": IWAE,
    "renyi": Renyi,
    "dreg": DReG,
    "stl": STL,
    "vimco": VIMCO,
    "miwae": MIWAE,
    "ciwae": CIWAE,
    "piwae": PIWAE,
}
#: K used when an objective is asked for without ``particles`` (per group for miwae, piwae).
DEFAULT_PARTICLES = {"elbo": 1, "meanfield": 1, "iwae": 5, "renyi": 5, "dreg": 5, "stl": 1,
                     "vimco": 5, "miwae": 5, "ciwae": 5, "piwae": 5}
#: the objectives that take ``groups`` (M groups of K particles)
GROUPED = ("miwae", "piwae")


def make_objective(name: str, particles: int | None = None, beta: float = 1.0,
                   free_bits: float = 0.0, alpha: float | None = None,
                   groups: int | None = None, elbo_weight: float | None = None) -> CoreObjective:
    """The objective called ``name`` (see :data:`OBJECTIVES`) with K = ``particles``;
    ``alpha`` (renyi, default 0.5), ``groups`` (M; miwae and piwae, default 1) and
    ``elbo_weight`` (ciwae, default 0.5) apply to one objective each."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    if particles is None:
        particles = DEFAULT_PARTICLES[name]
    if alpha is not None and name != "renyi":
        raise ConfigError(f"alpha applies to objective 'renyi' only, not {name!r}")
    if groups is not None and name not in GROUPED:
        raise ConfigError(f"groups applies to objectives 'miwae' and 'piwae' only, not {name!r}")
    if elbo_weight is not None and name != "ciwae":
        raise ConfigError(f"elbo_weight applies to objective 'ciwae' only, not {name!r}")
    if name == "renyi":
        return Renyi(particles, alpha=0.5 if alpha is None else alpha, beta=beta,
                     free_bits=free_bits)
    if name in GROUPED:
        return OBJECTIVES[name](particles, groups=1 if groups is None else groups, beta=beta,
                                free_bits=free_bits)
    if name == "ciwae":
        return CIWAE(particles, elbo_weight=0.5 if elbo_weight is None else elbo_weight,
                     beta=beta, free_bits=free_bits)
    return OBJECTIVES[name](particles, beta=beta, free_bits=free_bits)
