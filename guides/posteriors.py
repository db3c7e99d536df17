r"""Posterior families :math:`q_\phi(z \mid x)`, amortized by an encoder network.

Protocol: a guide family is an ``nn.Module`` with

- ``encoder_outputs(latent_dim) -> int``: how many numbers the encoder emits per datapoint;
- ``setup(latent_dim)``: called once by the VAE (create learned parameters here);
- ``distribution(encoder_output)``: a Pyro distribution over :math:`z` with
  ``event_shape == (latent_dim,)`` and the encoder output's leading dimensions as batch shape;
- optionally ``name`` and ``options()`` as for priors;
- optionally ``has_rsample`` (default true): false when the distribution has no
  reparameterized sampler, so gradients for :math:`\phi` must come from a score-function
  estimator;
- optionally ``infer`` (default ``{}``): the ``infer`` dict of the guide's ``"z"`` site, e.g.
  ``{"enumerate": "parallel"}`` to have the site summed out exactly instead of sampled.

The catalogue (``POSTERIORS``):

.. list-table::
   :header-rows: 1

   * - name
     - :math:`q(z \mid x)`
     - encoder outputs
   * - ``normal``
     - :math:`\mathcal{N}(\mu(x), \operatorname{diag} \sigma(x)^2)`
     - :math:`2d`
   * - ``full-rank``
     - :math:`\mathcal{N}(\mu(x), L(x) L(x)^\top)`, :math:`L` lower triangular
     - :math:`d + d(d+1)/2`
   * - ``flow``
     - :math:`\mathcal{N}(\mu(x), \operatorname{diag} \sigma(x)^2)` through ``layers`` conditional
       IAFs
     - :math:`2d` + ``context``
   * - ``categorical``
     - :math:`\mathrm{OneHotCategorical}(\text{logits}(x))`; ``enumerate``: summed out
     - :math:`d`
   * - ``relaxed-categorical``
     - :math:`\mathrm{RelaxedOneHotCategorical}(\tau, \text{logits}(x))`, :math:`\tau` =
       ``temperature``
     - :math:`d`

The ``categorical`` and ``relaxed-categorical`` guides pair with the priors of the same name
(see ``pyro_vae.models.priors``); :math:`d` is then the number of categories.

Importing this module also registers the closed-form KL between a full-rank Gaussian and a
diagonal Gaussian (``Independent(Normal, 1)``), so ``meanfield`` works for ``full-rank`` with
the ``normal`` and ``learned-normal`` priors.
"""

from __future__ import annotations

import math
from functools import partial

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl

from ..errors import ConfigError
from ..models.priors import OneHotCategorical, RelaxedOneHotCategorical, _positive_float

#: Factor on the initial output weights of a flow guide's layers (near-identity start).
INITIAL_OUTPUT_SCALE = 0.01


def _non_negative_float(what: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a non-negative number, not {value!r}") from None
    if isinstance(value, bool) or not (number >= 0 and math.isfinite(number)):
        raise ConfigError(f"{what} must be a non-negative finite number, not {value!r}")
    return number


def _boolean(what: str, value) -> bool:
    if not isinstance(value, bool):  # a real bool: "false" or 0 would pass ``bool(value)``
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    return value


def _positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, not {value!r}")
    return int(value)


class DiagonalNormal(nn.Module):
    r""":math:`q(z \mid x) = \mathcal{N}(\mu_\phi(x), \operatorname{diag}(\sigma_\phi(x)^2))`, with
    :math:`\sigma = \operatorname{softplus}(\cdot)` + ``min_scale``.

    The floor keeps :math:`\log q` finite when the encoder drives a scale towards zero.
    """

    name = "normal"

    def __init__(self, min_scale: float = 1e-4):
        super().__init__()
        if not min_scale >= 0:
            raise ConfigError(f"normal guide min_scale must be non-negative, not {min_scale!r}")
        self.min_scale = float(min_scale)

    def encoder_outputs(self, latent_dim: int) -> int:
        return 2 * latent_dim

    def setup(self, latent_dim: int) -> None:
        pass

    def distribution(self, encoder_output: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = encoder_output.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)

    def options(self) -> dict:
        return {"min_scale": self.min_scale}


class FullRankNormal(nn.Module):
    r""":math:`q(z \mid x) = \mathcal{N}(\mu_\phi(x), L_\phi(x) L_\phi(x)^\top)` with a full
    lower-triangular Cholesky factor :math:`L`.

    The encoder emits :math:`d + d(d+1)/2` numbers per datapoint: :math:`\mu`, then the lower
    triangle of :math:`L` row by row (``torch.tril_indices`` order:
    :math:`L_{00}, L_{10}, L_{11}, L_{20}, \dots`). Diagonal entries go through
    :math:`\operatorname{softplus}(\cdot)` + ``min_scale`` (positive, so :math:`L` is a valid
    Cholesky factor); off-diagonal
    entries are used as they are. It can represent any Gaussian posterior, e.g. the exact one
    of a linear-Gaussian model with correlated latents.
    """

    name = "full-rank"

    def __init__(self, min_scale: float = 1e-4):
        super().__init__()
        self.min_scale = _non_negative_float("full-rank guide min_scale", min_scale)

    def encoder_outputs(self, latent_dim: int) -> int:
        return latent_dim + latent_dim * (latent_dim + 1) // 2

    def setup(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim
        rows, cols = torch.tril_indices(latent_dim, latent_dim)
        self.register_buffer("tril_rows", rows, persistent=False)
        self.register_buffer("tril_cols", cols, persistent=False)

    def distribution(self, encoder_output: torch.Tensor) -> dist.Distribution:
        d = self.latent_dim
        loc, entries = encoder_output[..., :d], encoder_output[..., d:]
        raw = encoder_output.new_zeros(encoder_output.shape[:-1] + (d, d))
        raw[..., self.tril_rows, self.tril_cols] = entries
        diagonal = F.softplus(raw.diagonal(dim1=-2, dim2=-1)) + self.min_scale
        scale_tril = raw.tril(-1) + torch.diag_embed(diagonal)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    def options(self) -> dict:
        return {"min_scale": self.min_scale}


class _AffineAutoregressive(T.AffineAutoregressive):
    """Pyro's ``AffineAutoregressive`` (Eq. 10 form) whose sequential inverse steps through the
    autoregressive order as Python integers. Pyro's iterates over the permutation *tensor*, and
    indexing with each 0-d element reads it back to the host: on a GPU, one device
    synchronisation per latent dimension and layer every time a point is scored (the stopped
    re-score of STL and DReG, the VampPrior's mixture). Same operations in the same order
    otherwise, so the values are identical."""

    def __init__(self, autoregressive_nn, order: tuple[int, ...], **kwargs):
        super().__init__(autoregressive_nn, **kwargs)
        self.order = order

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = [torch.zeros(y.shape[:-1], dtype=y.dtype, device=y.device)] * y.size(-1)
        for idx in self.order:
            mean, log_scale = self.arn(torch.stack(x, dim=-1))
            inverse_scale = torch.exp(-clamp_preserve_gradients(
                log_scale[..., idx], min=self.log_scale_min_clip, max=self.log_scale_max_clip))
            x[idx] = (y[..., idx] - mean[..., idx]) * inverse_scale
        self._cached_log_scale = clamp_preserve_gradients(
            log_scale, min=self.log_scale_min_clip, max=self.log_scale_max_clip)
        return torch.stack(x, dim=-1)


class _ConditionalAffineAutoregressive(T.ConditionalAffineAutoregressive):
    """Pyro's ``ConditionalAffineAutoregressive``, conditioning to :class:`_AffineAutoregressive`
    (the permutation is read to the host once, here, not at every inversion)."""

    def __init__(self, autoregressive_nn, **kwargs):
        super().__init__(autoregressive_nn, **kwargs)
        self.order = tuple(int(i) for i in autoregressive_nn.permutation.tolist())

    def condition(self, context: torch.Tensor) -> _AffineAutoregressive:
        conditioned = partial(self.nn, context=context)
        conditioned.permutation = self.nn.permutation
        conditioned.get_permutation = self.nn.get_permutation
        return _AffineAutoregressive(conditioned, self.order, **self.kwargs)


class FlowGuide(nn.Module):
    r""":math:`q(z \mid x)`: a diagonal Gaussian
    :math:`\mathcal{N}(\mu_\phi(x), \operatorname{diag} \sigma_\phi(x)^2)` pushed through
    ``layers`` inverse autoregressive flows (Kingma et al. 2016) conditioned on a context vector
    :math:`h_\phi(x)`.

    The encoder emits :math:`2d` + ``context`` numbers per datapoint: :math:`\mu`, the raw scale
    (:math:`\sigma = \operatorname{softplus}(\cdot)` + ``min_scale``), and :math:`h`. Each layer is
    Pyro's ``ConditionalAffineAutoregressive``,
    :math:`z_i \mapsto m_i(z_{<i}, h) + s_i(z_{<i}, h)\, z_i`, with a masked network (one hidden
    ReLU layer of ``hidden`` units reading :math:`[h, z]`, plus a masked linear skip connection, so
    that a linear dependence on :math:`z_{<i}` is exact) in the natural order of :math:`z`,
    dimensions reversed between layers. Each layer starts close to the identity map (its output
    weights are scaled by ``INITIAL_OUTPUT_SCALE``, its output bias is zero), so training starts
    near the diagonal Gaussian and moves away only as far as the bound gains.

    Sampling is one parallel pass per layer, and the density of the guide's own samples reuses the
    transforms' cache; scoring other points (as STL and DReG do, re-scoring the same z with the
    parameters detached) runs the exact sequential inverse, :math:`d` network passes per layer,
    without reading anything back from the device (``_AffineAutoregressive``). The context
    broadcasts over particles: :math:`z` ``[K, B, d]`` against :math:`h` ``[B, context]``.

    ``.mean`` has no closed form (callers fall back to sample means). There is no closed-form
    KL to any prior, so ``meanfield`` refuses this guide.

    Needs ``latent_dim`` ≥ 2: for :math:`d = 1` an autoregressive transform has nothing to condition
    on but :math:`h(x)`, and the family is again a Gaussian with x-dependent mean and scale, i.e.
    the ``normal`` guide; it is refused with that advice.
    """

    name = "flow"

    def __init__(self, layers: int = 2, context: int = 16, hidden: int = 64,
                 min_scale: float = 1e-4):
        super().__init__()
        self.layers = _positive_int("flow guide layers", layers)
        self.context = _positive_int("flow guide context", context)
        self.hidden = _positive_int("flow guide hidden", hidden)
        self.min_scale = _non_negative_float("flow guide min_scale", min_scale)

    def encoder_outputs(self, latent_dim: int) -> int:
        return 2 * latent_dim + self.context

    def setup(self, latent_dim: int) -> None:
        if latent_dim < 2:
            raise ConfigError("the flow guide needs latent_dim >= 2 (with one latent dimension "
                              "an autoregressive flow reduces to the 'normal' guide: use it)")
        self.latent_dim = latent_dim
        self.register_buffer("reverse", torch.arange(latent_dim - 1, -1, -1), persistent=False)
        self.transforms = nn.ModuleList(self._layer(latent_dim) for _ in range(self.layers))

    def _layer(self, latent_dim: int) -> _ConditionalAffineAutoregressive:
        """One IAF layer in the natural order of z, initialised close to the identity map."""
        network = ConditionalAutoRegressiveNN(latent_dim, self.context, [self.hidden],
                                              permutation=torch.arange(latent_dim),
                                              skip_connections=True)
        with torch.no_grad():
            # Output weights scaled down (not zeroed, so every weight has a gradient from the
            # first step on), output bias zero: shift ≈ 0 and log-scale ≈ 0.
            network.layers[-1].weight.mul_(INITIAL_OUTPUT_SCALE)
            network.layers[-1].bias.zero_()
            network.skip_layer.weight.mul_(INITIAL_OUTPUT_SCALE)
        return _ConditionalAffineAutoregressive(network)

    def distribution(self, encoder_output: torch.Tensor) -> dist.Distribution:
        d = self.latent_dim
        loc, raw_scale = encoder_output[..., :d], encoder_output[..., d:2 * d]
        context = encoder_output[..., 2 * d:]
        base = dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)
        chain: list = []
        for i, transform in enumerate(self.transforms):
            if i:
                chain.append(T.Permute(self.reverse))
            chain.append(transform.condition(context))
        return dist.TransformedDistribution(base, chain)

    def options(self) -> dict:
        return {"layers": self.layers, "context": self.context, "hidden": self.hidden,
                "min_scale": self.min_scale}


class CategoricalGuide(nn.Module):
    r""":math:`q(z \mid x) = \mathrm{OneHotCategorical}(\operatorname{softmax}(g_\phi(x)))` over the
    :math:`d` = ``latent_dim`` one-hot vectors; the encoder output is the logits.

    :math:`z` is discrete, so the family has no reparameterized sampler
    (``has_rsample = False``): the gradient for :math:`\phi` comes from the score-function
    estimator, :math:`\nabla_\phi \mathbb{E}_q[f] = \mathbb{E}_q[f\, \nabla_\phi \log q]`, whose
    variance the objectives must reduce (baselines, control variates). With ``enumerate`` true
    the ``"z"`` site carries ``infer = {"enumerate": "parallel"}``: enumeration-aware objectives
    (Pyro's ``TraceEnum_ELBO``) then sum over the :math:`d` values exactly,

    .. math:: \mathrm{ELBO}(x) = \sum_c q(c \mid x)\,
              \big[\log p(c) + \log p(x \mid c) - \log q(c \mid x)\big],

    with no sampling variance at the cost of :math:`d` decoder passes.
    """

    name = "categorical"
    has_rsample = False

    def __init__(self, enumerate: bool = False):
        super().__init__()
        self.enumerate = _boolean("categorical guide enumerate", enumerate)
        self.infer = {"enumerate": "parallel"} if self.enumerate else {}

    def encoder_outputs(self, latent_dim: int) -> int:
        return latent_dim

    def setup(self, latent_dim: int) -> None:
        pass

    def distribution(self, encoder_output: torch.Tensor) -> dist.Distribution:
        return OneHotCategorical(logits=encoder_output)

    def options(self) -> dict:
        return {"enumerate": self.enumerate}


class RelaxedCategoricalGuide(nn.Module):
    r""":math:`q(z \mid x) = \mathrm{RelaxedOneHotCategorical}(\tau, \text{logits} = g_\phi(x))`,
    the Concrete / Gumbel-softmax relaxation of the ``categorical`` guide (Maddison et al. 2017;
    Jang et al. 2017) on the open simplex, :math:`\tau` = ``temperature`` > 0 (default 0.5):
    :math:`z = \operatorname{softmax}((g_\phi(x) + G) / \tau)`, :math:`G_c` i.i.d.
    :math:`\mathrm{Gumbel}(0, 1)`.

    Reparameterized, so pathwise gradients flow to the encoder. The bound it gives is that of
    the relaxed model (pair with the ``relaxed-categorical`` prior), not of the discrete one;
    small :math:`\tau` makes it closer at the price of higher gradient variance.

    .. warning:: ``.mean`` has no closed form (callers fall back to sample means); at small
       :math:`\tau` a coordinate of :math:`z` can underflow to 0 in float32, where
       :math:`\log q(z \mid x)` is :math:`-\infty`.
    """

    name = "relaxed-categorical"
    has_rsample = True

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = _positive_float("relaxed-categorical guide temperature", temperature)

    def encoder_outputs(self, latent_dim: int) -> int:
        return latent_dim

    def setup(self, latent_dim: int) -> None:
        # a tensor on the module's device: torch's log_prob needs τ as a tensor
        self.register_buffer("temperature_tensor", torch.tensor(self.temperature))

    def distribution(self, encoder_output: torch.Tensor) -> dist.Distribution:
        return RelaxedOneHotCategorical(self.temperature_tensor, logits=encoder_output)

    def options(self) -> dict:
        return {"temperature": self.temperature}


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal_normal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    r"""KL(q ‖ p) for q = N(μ_q, Σ_q) (any covariance) and p = N(μ_p, diag s²):

    .. math:: \tfrac12\big[\mathrm{tr}(Σ_p^{-1}Σ_q) + (μ_p-μ_q)^T Σ_p^{-1}(μ_p-μ_q) - d
              + \log\det Σ_p - \log\det Σ_q\big]

    with Σ_q = L Lᵀ, so tr(Σ_p⁻¹Σ_q) = Σ_ij L_ij² / s_i². Batch shapes broadcast.
    """
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1
            and p.event_shape == q.event_shape):
        raise NotImplementedError
    d = q.event_shape[0]
    loc_p, scale_p = p.base_dist.loc, p.base_dist.scale
    tril = q._unbroadcasted_scale_tril
    variance_p = scale_p.pow(2)
    trace = (tril.pow(2) / variance_p.unsqueeze(-1)).sum((-2, -1))
    mahalanobis = ((loc_p - q.loc).pow(2) / variance_p).sum(-1)
    log_det_p = 2 * scale_p.log().sum(-1)
    log_det_q = 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    kl = 0.5 * (trace + mahalanobis - d + log_det_p - log_det_q)
    return kl.expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))


#: The built-in guide families by name (the ``guide=`` names of :class:`pyro_vae.VAE`).
POSTERIORS: dict[str, type[nn.Module]] = {
    "normal": DiagonalNormal,
    "full-rank": FullRankNormal,
    "flow": FlowGuide,
    "categorical": CategoricalGuide,
    "relaxed-categorical": RelaxedCategoricalGuide,
}
#: The methods every guide family must have.
PROTOCOL = ("encoder_outputs", "setup", "distribution")
